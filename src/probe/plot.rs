//! The probe as a picture: requests sent (cumulative) and the vendor's `remaining` over time,
//! the over-limit answers marked, the pause shaded. Plain SVG written by hand: one chart with
//! two axes needs no plotting crate, and the file opens in any browser.

use std::fmt::Write as _;
use std::time::Duration;

use super::infer::{self, Findings, Verdict};
use super::ramp::{Recovery, Run};
use super::sample::Phase;
use crate::vendor::ResetUnit;

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 80.0;
const TOP: f64 = 60.0;
const BOTTOM: f64 = 50.0;

/// Text for XML: `&`, `<`, `>`, quotes escaped; control characters dropped.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// A tick step of 1, 2 or 5 times a power of ten, giving about `ticks` ticks over `span`.
fn tick_step(span: f64, ticks: f64) -> f64 {
    let raw = (span / ticks).max(f64::MIN_POSITIVE);
    let power = 10f64.powf(raw.log10().floor());
    let fraction = raw / power;
    let nice = if fraction <= 1.0 {
        1.0
    } else if fraction <= 2.0 {
        2.0
    } else if fraction <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * power
}

/// The chart of `run` for the title `title`.
pub fn svg(run: &Run, findings: &Findings, title: &str) -> String {
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let secs = |d: Duration| d.as_secs_f64();
    let t_max = run.samples.iter().map(|s| secs(s.answered)).fold(1.0, f64::max) * 1.05;
    let n_max = (run.samples.len().max(1)) as f64;
    let x = |t: f64| LEFT + t / t_max * plot_w;
    let y_sent = |n: f64| TOP + plot_h - n / n_max * plot_h;

    // The window whose remaining is drawn: the one that ran out, else the first with figures.
    let unit = findings.reset.unit.unwrap_or(ResetUnit::Seconds);
    let chosen = findings.windows.iter().find(|w| w.exhausted).or_else(|| findings.windows.first());
    let remaining: Vec<(f64, u64)> = match chosen {
        Some(window) => run
            .samples
            .iter()
            .filter_map(|sample| {
                infer::windows_in(sample, findings.profile.kind, unit)
                    .into_iter()
                    .find(|w| w.name == window.name)
                    .and_then(|w| w.remaining)
                    .map(|r| (secs(sample.answered), r))
            })
            .collect(),
        None => Vec::new(),
    };
    let r_max =
        chosen.and_then(|w| w.limit).into_iter().chain(remaining.iter().map(|(_, r)| *r)).max().unwrap_or(1).max(1)
            as f64;
    let y_rem = |r: f64| TOP + plot_h - r / r_max * plot_h;

    let mut out = String::new();
    let _ = writeln!(out, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, "<title>{}</title>", escape(title));
    let _ = writeln!(out, r##"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>"##);
    let _ = writeln!(out, r#"<text x="{LEFT}" y="22" font-size="15" font-weight="bold">{}</text>"#, escape(title));

    // The pause after the over-limit answer, shaded.
    if let Some(over) = findings.over_limit.as_ref().and_then(|o| run.samples.iter().find(|s| s.seq == o.seq)) {
        let end = match &run.recovery {
            Some(Recovery::Sent { seq, .. }) => run.samples.iter().find(|s| s.seq == *seq).map(|s| secs(s.sent)),
            Some(Recovery::Skipped { hold: Some(hold), .. }) => Some(secs(over.answered + hold.wait)),
            _ => None,
        };
        if let Some(end) = end {
            let (from, to) = (x(secs(over.answered)), x(end.min(t_max)));
            let _ = writeln!(
                out,
                r##"<rect class="hold" x="{from:.1}" y="{TOP}" width="{:.1}" height="{plot_h}" fill="#f8d7da" opacity="0.6"><title>held off after the over-limit answer</title></rect>"##,
                (to - from).max(1.0)
            );
        }
    }

    // Grid, axes and ticks.
    let t_step = tick_step(t_max, 8.0);
    let mut t = 0.0;
    while t <= t_max + 1e-9 {
        let px = x(t);
        let _ = writeln!(
            out,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#eeeeee"/>"##,
            TOP + plot_h
        );
        let _ = writeln!(
            out,
            r#"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            TOP + plot_h + 16.0,
            fmt_num(t)
        );
        t += t_step;
    }
    let n_step = tick_step(n_max, 6.0).max(1.0);
    let mut n = 0.0;
    while n <= n_max + 1e-9 {
        let py = y_sent(n);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#eeeeee"/>"##,
            LEFT + plot_w
        );
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#1f5fa8">{}</text>"##,
            LEFT - 6.0,
            py + 4.0,
            fmt_num(n)
        );
        n += n_step;
    }
    if !remaining.is_empty() {
        let r_step = tick_step(r_max, 6.0).max(1.0);
        let mut r = 0.0;
        while r <= r_max + 1e-9 {
            let py = y_rem(r);
            let _ = writeln!(
                out,
                r##"<text x="{:.1}" y="{:.1}" fill="#2e7d32">{}</text>"##,
                LEFT + plot_w + 6.0,
                py + 4.0,
                fmt_num(r)
            );
            r += r_step;
        }
    }
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888888"/>"##
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds since the probe started</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 12.0
    );
    let _ = writeln!(
        out,
        r##"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle" fill="#1f5fa8">requests sent</text>"##,
        TOP + plot_h / 2.0
    );
    if let Some(window) = chosen.filter(|_| !remaining.is_empty()) {
        let _ = writeln!(
            out,
            r##"<text transform="translate({:.1} {:.1}) rotate(90)" text-anchor="middle" fill="#2e7d32">remaining in `{}`</text>"##,
            WIDTH - 18.0,
            TOP + plot_h / 2.0,
            escape(&window.name)
        );
    }

    // Requests sent, as a step line.
    let mut sent: Vec<f64> = run.samples.iter().map(|s| secs(s.sent)).collect();
    sent.sort_by(f64::total_cmp);
    let mut points = format!("{:.1},{:.1}", x(0.0), y_sent(0.0));
    for (count, at) in sent.iter().enumerate() {
        let _ = write!(
            points,
            " {:.1},{:.1} {:.1},{:.1}",
            x(*at),
            y_sent(count as f64),
            x(*at),
            y_sent(count as f64 + 1.0)
        );
    }
    let _ =
        writeln!(out, r##"<polyline class="sent" points="{points}" fill="none" stroke="#1f5fa8" stroke-width="2"/>"##);

    // Remaining, as a line with dots; dashed across the pause, when nothing was sent.
    if !remaining.is_empty() {
        let pause_from = findings
            .over_limit
            .as_ref()
            .and_then(|over| run.samples.iter().find(|s| s.seq == over.seq))
            .map_or(f64::INFINITY, |over| secs(over.answered));
        let point = |(t, r): &(f64, u64)| format!("{:.1},{:.1}", x(*t), y_rem(*r as f64));
        let split = remaining.iter().position(|(t, _)| *t > pause_from + 1e-9).unwrap_or(remaining.len());
        let (before, after) = remaining.split_at(split);
        for part in [&before, &after] {
            if !part.is_empty() {
                let line: Vec<String> = part.iter().map(point).collect();
                let _ = writeln!(
                    out,
                    r##"<polyline class="remaining" points="{}" fill="none" stroke="#2e7d32" stroke-width="1.5"/>"##,
                    line.join(" ")
                );
            }
        }
        if let (Some(last), Some(first)) = (before.last(), after.first()) {
            let _ = writeln!(
                out,
                r##"<polyline points="{} {}" fill="none" stroke="#2e7d32" stroke-width="1" stroke-dasharray="3 4"/>"##,
                point(last),
                point(first)
            );
        }
        for (t, r) in &remaining {
            let _ =
                writeln!(out, r##"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="#2e7d32"/>"##, x(*t), y_rem(*r as f64));
        }
    }

    // Over-limit answers and the recovery request.
    for sample in &run.samples {
        let (px, verdict) = (x(secs(sample.answered)), infer::judge(&sample.answer, sample.wall));
        if verdict == Verdict::OverLimit {
            let _ = writeln!(
                out,
                r##"<g class="over-limit"><line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#c62828" stroke-dasharray="4 3"/><path d="M{:.1},{:.1} l8,8 m0,-8 l-8,8" stroke="#c62828" stroke-width="2"/><text x="{:.1}" y="{:.1}" fill="#c62828">{}</text><title>request {}: {} at +{:.2} s</title></g>"##,
                TOP + plot_h,
                px - 4.0,
                TOP + 4.0,
                px + 6.0,
                TOP + 26.0,
                sample.answer.status.as_u16(),
                sample.seq,
                sample.answer.status,
                secs(sample.answered)
            );
        }
        if sample.phase == Phase::Recovery {
            let py = y_sent(sample.seq as f64);
            let _ = writeln!(
                out,
                r##"<path class="recovery" d="M{px:.1},{:.1} l6,6 l-6,6 l-6,-6 z" fill="#ef6c00"><title>recovery request {}: {}</title></path>"##,
                py - 6.0,
                sample.seq,
                sample.answer.status
            );
        }
    }

    // Legend.
    let legend_y = 42.0;
    let _ = writeln!(
        out,
        r##"<g class="legend"><line x1="{LEFT}" y1="{legend_y}" x2="{:.1}" y2="{legend_y}" stroke="#1f5fa8" stroke-width="2"/><text x="{:.1}" y="{:.1}">requests sent</text><line x1="{:.1}" y1="{legend_y}" x2="{:.1}" y2="{legend_y}" stroke="#2e7d32" stroke-width="1.5"/><text x="{:.1}" y="{:.1}">remaining (vendor)</text><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#c62828" stroke-dasharray="4 3"/><text x="{:.1}" y="{:.1}">over-limit answer</text><path d="M{:.1},{:.1} l6,6 l-6,6 l-6,-6 z" fill="#ef6c00"/><text x="{:.1}" y="{:.1}">recovery request</text></g>"##,
        LEFT + 24.0,
        LEFT + 30.0,
        legend_y + 4.0,
        LEFT + 140.0,
        LEFT + 164.0,
        LEFT + 170.0,
        legend_y + 4.0,
        LEFT + 310.0,
        legend_y - 6.0,
        LEFT + 310.0,
        legend_y + 6.0,
        LEFT + 318.0,
        legend_y + 4.0,
        LEFT + 450.0,
        legend_y - 6.0,
        LEFT + 460.0,
        legend_y + 4.0
    );
    out.push_str("</svg>\n");
    out
}

fn fmt_num(value: f64) -> String {
    if (value - value.round()).abs() < 1e-6 {
        format!("{:.0}", value.round())
    } else {
        format!("{value:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_ticks_are_round() {
        assert_eq!(escape("a <b> & \"c\" 'd'\u{7}"), "a &lt;b&gt; &amp; &quot;c&quot; &apos;d&apos;");
        assert_eq!(tick_step(7.3, 8.0), 1.0);
        assert_eq!(tick_step(100.0, 6.0), 20.0);
        assert_eq!(tick_step(0.5, 5.0), 0.1);
    }
}
