//! What the probe tells: a summary for people, `probe.json` with every sample for machines, and
//! `suggested.yaml`, the `quotas:` and `limit_headers:` keys for the upstream, each number with
//! its evidence and the margin it leaves. The suggestion is validated by config's own validator
//! before it is shown, so what is printed is what `sluice check` accepts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::infer::{self, clip, show, Counting, Findings, Verdict};
use super::ramp::{show_rate, Plan, Recovery, Run, Stop};
use super::sample::{Phase, Sample};
use crate::vendor::{ProfileKind, ResetUnit};

/// What the probe was asked to do.
#[derive(Debug, Clone)]
pub struct Asked {
    pub upstream: String,
    pub method: String,
    pub path: String,
    pub url: String,
    pub plan: Plan,
    /// Percent of each vendor limit the suggestion leaves spare.
    pub headroom: u8,
}

/// The whole report, as `probe.json` holds it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: String,
    pub upstream: String,
    pub method: String,
    pub path: String,
    pub url: String,
    pub started_at: String,
    pub budget: u64,
    pub max_rate: Option<f64>,
    pub duration_ms: u64,
    pub sent: usize,
    pub elapsed_ms: u64,
    pub top_rate: f64,
    pub steps: u32,
    pub stopped: Stopped,
    pub exit_code: u8,
    pub hold: Option<HoldView>,
    pub findings: Findings,
    pub suggested: Suggestion,
    pub samples: Vec<SampleView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Stopped {
    /// `over_limit`, `budget`, `max_rate` or `duration`.
    pub reason: &'static str,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HoldView {
    pub wait_ms: Option<u64>,
    pub source: Option<String>,
    /// The recovery request, when it was sent.
    pub recovery_seq: Option<u64>,
    /// From the over-limit answer to the recovery request.
    pub waited_ms: Option<u64>,
    pub skipped: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SampleView {
    pub seq: u64,
    pub step: u32,
    pub rate: f64,
    pub phase: Phase,
    pub sent_ms: f64,
    pub answered_ms: f64,
    /// Wall time of the answer, RFC 3339.
    pub at: String,
    pub status: u16,
    pub verdict: &'static str,
    /// The rate-limit fields of the answer, as sent.
    pub headers: BTreeMap<String, String>,
    /// The start of a refusal's body.
    pub body: Option<String>,
    /// The windows the inferred profile reads in it.
    pub windows: Vec<WindowView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WindowView {
    pub name: String,
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    pub reset_in_ms: Option<u64>,
    pub window_ms: Option<u64>,
}

/// The suggested config block.
#[derive(Debug, Clone, Serialize)]
pub struct Suggestion {
    /// `suggested.yaml`: the `quotas:` and `limit_headers:` keys, commented.
    pub yaml: String,
    pub quotas: Vec<SuggestedQuota>,
    pub limit_headers: String,
    /// Windows not turned into a quota, and why.
    pub omitted: Vec<String>,
    /// What config's validator says of the block (`None`: it is valid).
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SuggestedQuota {
    pub name: String,
    pub limit: u64,
    pub per: String,
    pub window: &'static str,
    pub vendor_limit: u64,
    /// Requests per window left to other callers.
    pub spare: u64,
    pub evidence: Vec<String>,
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn ms_f64(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1000.0 * 10.0).round() / 10.0
}

/// RFC 3339 with milliseconds.
pub fn rfc3339(at: SystemTime) -> String {
    jiff::Timestamp::try_from(at).map(|ts| format!("{ts:.3}")).unwrap_or_default()
}

pub fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Accepted => "accepted",
        Verdict::OverLimit => "over_limit",
        Verdict::Unauthorized => "unauthorized",
        Verdict::NotFound => "not_found",
        Verdict::Refused => "refused",
        Verdict::VendorFailure => "vendor_failure",
    }
}

/// The exit code a finished probe ends with: 0 when it found the limit by reaching it, 3 when
/// the budget ran out first, 4 when `--max-rate` or `--duration` ended the ramp first.
pub fn exit_code(stop: &Stop) -> u8 {
    match stop {
        Stop::OverLimit { .. } => 0,
        Stop::Budget => 3,
        Stop::MaxRate { .. } | Stop::Duration => 4,
    }
}

impl Report {
    pub fn new(asked: &Asked, run: &Run, findings: Findings) -> Self {
        let unit = findings.reset.unit.unwrap_or_default();
        let samples = run.samples.iter().map(|sample| sample_view(sample, findings.profile.kind, unit)).collect();
        let stopped = stopped(&run.stop, asked.plan);
        let hold = run.recovery.as_ref().map(|recovery| match recovery {
            Recovery::Sent { hold, seq, waited } => HoldView {
                wait_ms: Some(millis(hold.wait)),
                source: Some(hold.source.clone()),
                recovery_seq: Some(*seq),
                waited_ms: Some(millis(*waited)),
                skipped: None,
            },
            Recovery::Skipped { hold, reason } => HoldView {
                wait_ms: hold.as_ref().map(|hold| millis(hold.wait)),
                source: hold.as_ref().map(|hold| hold.source.clone()),
                recovery_seq: None,
                waited_ms: None,
                skipped: Some(reason.clone()),
            },
        });
        let suggested = suggest(asked, &findings, run.started);
        Report {
            tool: concat!("sluice probe ", env!("CARGO_PKG_VERSION")).to_owned(),
            upstream: asked.upstream.clone(),
            method: asked.method.clone(),
            path: asked.path.clone(),
            url: asked.url.clone(),
            started_at: rfc3339(run.started),
            budget: asked.plan.budget,
            max_rate: asked.plan.max_rate,
            duration_ms: millis(asked.plan.duration),
            sent: run.sent(),
            elapsed_ms: millis(run.elapsed),
            top_rate: run.top_rate,
            steps: run.steps,
            stopped,
            exit_code: exit_code(&run.stop),
            hold,
            findings,
            suggested,
            samples,
        }
    }
}

fn stopped(stop: &Stop, plan: Plan) -> Stopped {
    match stop {
        Stop::OverLimit { seq } => {
            Stopped { reason: "over_limit", detail: format!("the vendor refused request {seq} for its rate limit") }
        }
        Stop::Budget => Stopped {
            reason: "budget",
            detail: format!(
                "the budget of {} requests ran out before the vendor refused one; the windows are what its headers say",
                plan.budget
            ),
        },
        Stop::MaxRate { rate } => Stopped {
            reason: "max_rate",
            detail: format!("a whole step at --max-rate ({} rps) passed without a refusal", show_rate(*rate)),
        },
        Stop::Duration => Stopped {
            reason: "duration",
            detail: format!("--duration ({}) ran out before the vendor refused a request", show(plan.duration)),
        },
    }
}

fn sample_view(sample: &Sample, profile: ProfileKind, unit: ResetUnit) -> SampleView {
    let mut headers = BTreeMap::new();
    for name in sample.answer.headers.keys() {
        let values: Vec<&str> =
            sample.answer.headers.get_all(name).iter().map(|value| value.to_str().unwrap_or("(not text)")).collect();
        headers.insert(name.as_str().to_owned(), values.join(", "));
    }
    let windows = infer::windows_in(sample, profile, unit)
        .into_iter()
        .map(|window| WindowView {
            name: window.name,
            limit: window.limit,
            remaining: window.remaining,
            reset_in_ms: window.reset_in.map(millis),
            window_ms: window.window.map(millis),
        })
        .collect();
    SampleView {
        seq: sample.seq,
        step: sample.step,
        rate: sample.rate,
        phase: sample.phase,
        sent_ms: ms_f64(sample.sent),
        answered_ms: ms_f64(sample.answered),
        at: rfc3339(sample.wall),
        status: sample.answer.status.as_u16(),
        verdict: verdict_name(infer::judge(&sample.answer, sample.wall)),
        headers,
        body: sample
            .answer
            .body
            .as_ref()
            .filter(|body| !body.is_empty())
            .map(|body| clip(&String::from_utf8_lossy(body), 300)),
        windows,
    }
}

/// A quota name from a vendor's window name: a-z, 0-9, - and _, at most 64.
fn quota_name(vendor: &str, taken: &[String]) -> String {
    let mut name: String = vendor
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' { c } else { '-' })
        .take(60)
        .collect();
    name = name.trim_matches('-').to_owned();
    if name.is_empty() {
        name = "window".into();
    }
    let mut candidate = name.clone();
    let mut n = 2;
    while taken.contains(&candidate) && n < 1000 {
        candidate = format!("{name}-{n}");
        n += 1;
    }
    candidate
}

/// `per` as the config writes it: whole units where it can, else milliseconds.
fn per_text(length: Duration) -> String {
    if length.subsec_nanos() == 0 {
        show(length)
    } else {
        format!("{}ms", length.as_millis())
    }
}

/// The `limit_headers:` value for the findings.
fn limit_headers(findings: &Findings) -> String {
    match (findings.profile.kind, findings.reset.unit) {
        (ProfileKind::XRatelimit, Some(ResetUnit::Epoch)) => "{ profile: x-ratelimit, reset: epoch }".into(),
        (kind, _) => kind.as_str().into(),
    }
}

/// The suggested `quotas:` and `limit_headers:` for what was found.
pub fn suggest(asked: &Asked, findings: &Findings, started: SystemTime) -> Suggestion {
    const DAY: Duration = Duration::from_secs(86_400);
    let mut quotas: Vec<SuggestedQuota> = Vec::new();
    let mut omitted = Vec::new();
    let mut blocks = Vec::new();
    for window in &findings.windows {
        let Some(vendor_limit) = window.limit.filter(|limit| (1..=1_000_000_000_000).contains(limit)) else {
            omitted.push(format!("`{}`: no usable limit ({})", window.name, window.limit_evidence));
            continue;
        };
        let Some(length) = window.length.filter(|l| *l >= Duration::from_millis(100) && *l <= 366 * DAY) else {
            omitted.push(format!("`{}`: its length is unknown ({})", window.name, window.length_evidence));
            continue;
        };
        let taken: Vec<String> = quotas.iter().map(|quota| quota.name.clone()).collect();
        let name = quota_name(&window.name, &taken);
        let spare = vendor_limit.saturating_mul(u64::from(asked.headroom)) / 100;
        let limit = vendor_limit.saturating_sub(spare).max(1);
        let spare = vendor_limit - limit;
        let per = per_text(length);
        let unaligned = window.epoch_aligned == Some(false) && length < DAY;
        let (kind, counting_note) = match window.counting {
            Counting::Fixed if unaligned => (
                "rolling",
                format!(
                    "rolling, though the vendor's windows are fixed: they do not start on multiples of {per} since the Unix epoch, \
                     as sluice's fixed windows do, and a rolling window of the same length is never looser ({})",
                    window.counting_evidence
                ),
            ),
            Counting::Fixed => ("fixed", format!("fixed: {}", window.counting_evidence)),
            Counting::Rolling => ("rolling", format!("rolling: {}", window.counting_evidence)),
            Counting::Unknown => (
                "rolling",
                format!(
                    "rolling, sluice's default, never looser than a fixed window of the same length: {}",
                    window.counting_evidence
                ),
            ),
        };
        let mut evidence = vec![
            format!("limit {vendor_limit}: {}", window.limit_evidence),
            format!("per {per}: {}", window.length_evidence),
            counting_note,
        ];
        if let Some(measured) = &window.measured_evidence {
            if !window.limit_evidence.contains(measured.as_str()) {
                evidence.push(format!("measured: {measured}"));
            }
        }
        let time_margin = (length / 100).min(Duration::from_millis(250));
        let share = if spare == 0 {
            "limit is the vendor's own, so nothing is left to other callers of the account (raise --headroom to leave some)"
                .to_owned()
        } else {
            format!(
                "limit {limit} leaves {spare} of the vendor's {vendor_limit} per window ({}%, --headroom) to other callers of the account",
                asked.headroom
            )
        };
        let timing = if kind == "rolling" {
            format!(
                "; sluice adds {} to each window against clock jitter (the quota's default margin)",
                show(time_margin)
            )
        } else {
            String::new()
        };
        evidence.push(format!("margin: {share}{timing}"));
        let mut lines = vec![format!(
            "  # `{}`: the vendor allows {vendor_limit} requests per {per}{}.",
            window.name,
            if window.counting == Counting::Unknown {
                String::new()
            } else {
                format!(", {}", window.counting.as_str())
            }
        )];
        for item in &evidence {
            lines.push(format!("  #   {}", clip(item, 600)));
        }
        lines.push(format!("  - name: {name}"));
        lines.push(format!("    limit: {limit}"));
        lines.push(format!("    per: {per}"));
        if kind == "fixed" {
            lines.push("    window: fixed".into());
            if length.as_secs() % 86_400 == 0 && length.subsec_nanos() == 0 {
                lines.push(
                    "    # resets_at: \"00:00 America/New_York\"   # the vendor account's reset time and zone; without it, 00:00 UTC"
                        .into(),
                );
            }
        }
        blocks.push(lines.join("\n"));
        quotas.push(SuggestedQuota { name, limit, per, window: kind, vendor_limit, spare, evidence });
    }
    let headers = limit_headers(findings);
    let mut yaml = vec![
        format!(
            "# Suggested by sluice probe {} for upstream `{}`: {} {} at {}.",
            env!("CARGO_PKG_VERSION"),
            asked.upstream,
            asked.method,
            asked.path,
            rfc3339(started)
        ),
        "# Put these keys in the upstream's entry, in place of any quotas: and limit_headers: it has,".into(),
        "# then run `sluice check -c FILE`. Quotas are named after the vendor's windows, so sluice also".into(),
        "# follows the vendor's own figures for each (see config/README.md, vendor header profiles).".into(),
    ];
    for reason in &omitted {
        yaml.push(format!("# Not suggested: {}", clip(reason, 600)));
    }
    if blocks.is_empty() {
        yaml.push("quotas: []".into());
    } else {
        yaml.push("quotas:".into());
        yaml.extend(blocks);
    }
    yaml.push(format!(
        "# limit_headers: {}: {}",
        findings.profile.kind.as_str(),
        clip(&findings.profile.evidence, 600)
    ));
    if let Some(unit) = findings.reset.unit {
        let unit = match unit {
            ResetUnit::Epoch => "epoch",
            ResetUnit::Seconds => "seconds",
        };
        yaml.push(format!("# reset: {unit}: {}", clip(&findings.reset.evidence, 600)));
    }
    yaml.push(format!("limit_headers: {headers}"));
    let yaml = yaml.join("\n") + "\n";
    let problem = validate(&yaml).err();
    Suggestion { yaml, quotas, limit_headers: headers, omitted, problem }
}

/// Whether config's validator accepts `block` in an upstream's entry.
pub fn validate(block: &str) -> Result<(), String> {
    let indented: String = block.lines().map(|line| format!("    {line}\n")).collect();
    let text = format!(
        "upstreams:\n  - name: probe-check\n    prefix: /probe-check\n    target: 'http://127.0.0.1:1'\n{indented}"
    );
    crate::config::Config::from_yaml(&text).map(drop).map_err(|error| error.to_string())
}

/// The human summary.
pub fn summary(report: &Report, written: &[PathBuf]) -> String {
    let mut out = Vec::new();
    out.push(format!("sluice probe · upstream `{}` · {} {}", report.upstream, report.method, report.url));
    out.push(format!(
        "Sent {} of {} requests in {:.1} s, ramping up to {} rps in {} step(s). Stopped: {}.",
        report.sent,
        report.budget,
        report.elapsed_ms as f64 / 1000.0,
        show_rate(report.top_rate),
        report.steps,
        report.stopped.detail
    ));
    out.push(String::new());
    let findings = &report.findings;
    out.push(format!("Profile: {}: {}", findings.profile.kind.as_str(), findings.profile.evidence));
    out.push(format!("Reset: {}; {}", findings.reset.form, findings.reset.evidence));
    out.push(String::new());
    if findings.windows.is_empty() {
        out.push("Windows: none announced.".into());
    } else {
        out.push("Windows:".into());
        for window in &findings.windows {
            let limit = window.limit.map_or("?".to_owned(), |limit| {
                if window.limit_stated {
                    limit.to_string()
                } else {
                    format!("≥{limit}")
                }
            });
            let length = window.length.map_or("?".to_owned(), |length| {
                if window.length_exact {
                    show(length)
                } else {
                    format!("≥{}", show(length))
                }
            });
            out.push(format!(
                "  {}: {limit} per {length}, {}{}",
                window.name,
                window.counting.as_str(),
                if window.exhausted { " (ran out)" } else { "" }
            ));
            out.push(format!("    limit: {}", window.limit_evidence));
            out.push(format!("    length: {}", window.length_evidence));
            out.push(format!("    {}: {}", window.counting.as_str(), window.counting_evidence));
            if let Some(measured) = &window.measured_evidence {
                out.push(format!("    measured: {measured}"));
            }
        }
    }
    out.push(String::new());
    match &findings.over_limit {
        Some(over) => {
            let reason = http::StatusCode::from_u16(over.status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
            out.push(format!(
                "Over-limit answer: {} {reason} to request {}, after {} accepted{}",
                over.status,
                over.seq,
                over.accepted_before,
                over.class.map(|class| format!(" ({class} class)")).unwrap_or_default()
            ));
            out.push(format!("  body: {}", over.body));
            out.push(format!("  Retry-After: {}", over.retry_after));
        }
        None => out.push("Over-limit answer: none seen.".into()),
    }
    if let Some(hold) = &report.hold {
        match (&hold.skipped, hold.wait_ms, &hold.source) {
            (None, Some(wait), Some(source)) => {
                let recovery = findings.recovery.as_ref().map(|r| r.description.clone()).unwrap_or_default();
                out.push(format!(
                    "  Recovery: held off {} ({source}), then request {}: {recovery}",
                    show(Duration::from_millis(wait)),
                    hold.recovery_seq.unwrap_or_default()
                ));
            }
            (Some(reason), _, _) => out.push(format!("  Recovery: not probed: {reason}")),
            _ => {}
        }
    }
    out.push(String::new());
    match &report.suggested.problem {
        None => out.push("Suggested config (valid for `sluice check`):".into()),
        Some(problem) => {
            out.push(format!("Suggested config (config's validator refuses it, please report: {problem}):"))
        }
    }
    out.push(report.suggested.yaml.trim_end().to_owned());
    if !written.is_empty() {
        out.push(String::new());
        out.push(format!(
            "Written: {}",
            written.iter().map(|path| path.display().to_string()).collect::<Vec<_>>().join(", ")
        ));
    }
    out.join("\n") + "\n"
}

/// Writes `summary.txt`, `probe.json`, `suggested.yaml` and `probe.svg` into `dir`.
pub fn write_all(dir: &Path, report: &Report, svg: &str) -> std::io::Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> =
        ["summary.txt", "probe.json", "suggested.yaml", "probe.svg"].iter().map(|name| dir.join(name)).collect();
    let json = serde_json::to_string_pretty(report).map_err(std::io::Error::other)?;
    std::fs::write(&paths[1], json + "\n")?;
    std::fs::write(&paths[2], &report.suggested.yaml)?;
    std::fs::write(&paths[3], svg)?;
    std::fs::write(&paths[0], summary(report, &paths))?;
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::infer::{OverLimitFinding, ProfileFinding, ResetFinding, WindowFinding};

    fn window(name: &str, limit: u64, length: Duration, counting: Counting) -> WindowFinding {
        WindowFinding {
            name: name.into(),
            limit: Some(limit),
            limit_stated: true,
            limit_evidence: format!("the vendor states {limit}"),
            length: Some(length),
            length_exact: true,
            length_evidence: "stated".into(),
            counting,
            counting_observed: true,
            counting_evidence: "seen".into(),
            epoch_aligned: None,
            exhausted: false,
            measured: None,
            measured_evidence: None,
        }
    }

    fn findings(kind: ProfileKind, unit: Option<ResetUnit>, windows: Vec<WindowFinding>) -> Findings {
        Findings {
            profile: ProfileFinding { kind, read: 1, of: 1, fields: Vec::new(), evidence: "read".into() },
            reset: ResetFinding { unit, form: "f".into(), evidence: "e".into() },
            windows,
            over_limit: None::<OverLimitFinding>,
            recovery: None,
        }
    }

    fn asked(headroom: u8) -> Asked {
        Asked {
            upstream: "hubspot".into(),
            method: "GET".into(),
            path: "/crm/v3/objects/contacts?limit=1".into(),
            url: "https://api.hubapi.com/crm/v3/objects/contacts?limit=1".into(),
            plan: Plan { budget: 100, max_rate: None, duration: Duration::from_secs(300) },
            headroom,
        }
    }

    #[test]
    fn the_suggestion_is_valid_config_with_headroom_and_names_from_the_vendor() {
        let windows = vec![
            window("rolling", 190, Duration::from_secs(10), Counting::Rolling),
            window("daily", 625_000, Duration::from_secs(86_400), Counting::Fixed),
            window("Odd Name!", 5, Duration::from_millis(1500), Counting::Unknown),
        ];
        let suggestion = suggest(&asked(10), &findings(ProfileKind::Hubspot, None, windows), SystemTime::now());
        assert_eq!(suggestion.problem, None, "{}", suggestion.yaml);
        let quotas: Vec<(&str, u64, &str, &str)> =
            suggestion.quotas.iter().map(|q| (q.name.as_str(), q.limit, q.per.as_str(), q.window)).collect();
        assert_eq!(
            quotas,
            [
                ("rolling", 171, "10s", "rolling"),
                ("daily", 562_500, "1d", "fixed"),
                ("odd-name", 5, "1500ms", "rolling")
            ]
        );
        assert!(suggestion.yaml.contains("limit_headers: hubspot\n"), "{}", suggestion.yaml);
        assert!(suggestion.yaml.contains("leaves 19 of the vendor's 190 per window (10%"), "{}", suggestion.yaml);
        assert!(suggestion.yaml.contains("sluice adds 100ms"), "{}", suggestion.yaml);
    }

    #[test]
    fn epoch_resets_and_unknown_lengths() {
        let mut unknown = window("default", 10, Duration::from_secs(2), Counting::Fixed);
        unknown.length = None;
        let suggestion = suggest(
            &asked(0),
            &findings(ProfileKind::XRatelimit, Some(ResetUnit::Epoch), vec![unknown]),
            SystemTime::now(),
        );
        assert_eq!(suggestion.problem, None, "{}", suggestion.yaml);
        assert!(suggestion.yaml.contains("quotas: []"), "{}", suggestion.yaml);
        assert!(
            suggestion.yaml.contains("limit_headers: { profile: x-ratelimit, reset: epoch }"),
            "{}",
            suggestion.yaml
        );
        assert_eq!(suggestion.omitted.len(), 1);

        let mut unaligned = window("default", 10, Duration::from_secs(60), Counting::Fixed);
        unaligned.epoch_aligned = Some(false);
        let suggestion = suggest(&asked(0), &findings(ProfileKind::Ietf, None, vec![unaligned]), SystemTime::now());
        assert_eq!(suggestion.quotas[0].window, "rolling", "{}", suggestion.yaml);
        assert_eq!(suggestion.quotas[0].limit, 10);
    }

    #[test]
    fn names_are_made_valid_and_unique() {
        assert_eq!(quota_name("api-usage", &[]), "api-usage");
        assert_eq!(quota_name("", &[]), "window");
        assert_eq!(quota_name("daily", &["daily".into()]), "daily-2");
        assert!(validate("quotas: [{ name: x, limit: 0, per: 1s }]\n").is_err());
    }
}
