//! From samples to findings: which profile the vendor speaks, each window's limit and length,
//! rolling or fixed, how `reset` is written, and what the over-limit answer looks like.
//!
//! Every header is read by the vendor profiles' own parsers ([`vendor::observe`]), never here,
//! so the probe sees exactly what `run` would. What this room adds is judgement across answers:
//! which profile reads the most of them, which reset unit makes the numbers plausible, how
//! `remaining` came back. Pure: it reads only the samples, so it is tested on made-up ones.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::sample::{Answer, Phase, Sample};
use crate::vendor::{self, Observation, ProfileKind, ResetUnit, VendorWindow, PROFILES};

/// What one answer means for the probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx or 3xx: the vendor served it.
    Accepted,
    /// Refused for quota reasons, as some profile reads it (any 429; Salesforce's 403
    /// `REQUEST_LIMIT_EXCEEDED`; GitHub's 403 at remaining 0; a 5xx with `Retry-After`).
    OverLimit,
    /// 401, 407, or a 403 no profile reads as over-limit: the credential is wrong or lacks a scope.
    Unauthorized,
    /// 404 or 410: the path is not one this account can read.
    NotFound,
    /// Any other 4xx.
    Refused,
    /// A 5xx without a pause: the vendor failed.
    VendorFailure,
}

pub fn judge(answer: &Answer, wall: SystemTime) -> Verdict {
    let response =
        vendor::Response { status: answer.status, headers: &answer.headers, body: answer.body.as_deref(), now: wall };
    let throttled = PROFILES
        .iter()
        .chain(&[ProfileKind::None])
        .any(|profile| vendor::observe(*profile, ResetUnit::Seconds, &response).throttle.is_some());
    if throttled {
        return Verdict::OverLimit;
    }
    match answer.status.as_u16() {
        200..=399 => Verdict::Accepted,
        401 | 403 | 407 => Verdict::Unauthorized,
        404 | 410 => Verdict::NotFound,
        500..=599 => Verdict::VendorFailure,
        _ => Verdict::Refused,
    }
}

/// Which profile reads the vendor's answers.
#[derive(Debug, Clone, Serialize)]
pub struct ProfileFinding {
    pub kind: ProfileKind,
    /// Answers the profile found windows in, of `of`.
    pub read: usize,
    pub of: usize,
    /// The rate-limit fields the vendor sent, by name.
    pub fields: Vec<String>,
    pub evidence: String,
}

/// How the vendor says when a window resets.
#[derive(Debug, Clone, Serialize)]
pub struct ResetFinding {
    /// `x-ratelimit` only: the unit `limit_headers.reset` must name.
    pub unit: Option<ResetUnit>,
    /// How reset is written, in words.
    pub form: String,
    pub evidence: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Counting {
    Rolling,
    Fixed,
    Unknown,
}

impl Counting {
    pub fn as_str(self) -> &'static str {
        match self {
            Counting::Rolling => "rolling",
            Counting::Fixed => "fixed",
            Counting::Unknown => "unknown",
        }
    }
}

/// One of the vendor's windows, as far as the answers show it.
#[derive(Debug, Clone, Serialize)]
pub struct WindowFinding {
    /// The vendor's name for it, as its profile reports it (`rolling`, `daily`, `api-usage`).
    pub name: String,
    pub limit: Option<u64>,
    /// The vendor stated the limit (not an estimate).
    pub limit_stated: bool,
    pub limit_evidence: String,
    #[serde(with = "optional_millis")]
    pub length: Option<Duration>,
    /// The length is known, not a lower bound.
    pub length_exact: bool,
    pub length_evidence: String,
    pub counting: Counting,
    /// Seen in how `remaining` came back, not taken from the profile's documentation.
    pub counting_observed: bool,
    pub counting_evidence: String,
    /// Fixed windows: whether they reset on multiples of their length since the Unix epoch, as
    /// sluice's fixed windows do (`None`: not seen).
    pub epoch_aligned: Option<bool>,
    /// This window ran out when the vendor refused.
    pub exhausted: bool,
    /// Requests the vendor accepted in this window before refusing (counted by the probe).
    pub measured: Option<u64>,
    pub measured_evidence: Option<String>,
}

/// The vendor's first over-limit answer.
#[derive(Debug, Clone, Serialize)]
pub struct OverLimitFinding {
    pub seq: u64,
    pub status: u16,
    /// What the body looks like.
    pub body: String,
    /// `Retry-After`'s form and value, or `none`.
    pub retry_after: String,
    /// The profile's class for the refusal (`burst`, `daily`, `concurrency`, `unknown`).
    pub class: Option<&'static str>,
    /// Requests accepted before it.
    pub accepted_before: usize,
}

/// The one request sent after the vendor's pause.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryFinding {
    pub seq: u64,
    pub status: u16,
    pub accepted: bool,
    pub description: String,
}

/// Everything inferred from one probe's samples.
#[derive(Debug, Clone, Serialize)]
pub struct Findings {
    pub profile: ProfileFinding,
    pub reset: ResetFinding,
    pub windows: Vec<WindowFinding>,
    pub over_limit: Option<OverLimitFinding>,
    pub recovery: Option<RecoveryFinding>,
}

/// The findings of `samples` (in any order).
pub fn infer(samples: &[Sample]) -> Findings {
    let mut sorted: Vec<&Sample> = samples.iter().collect();
    sorted.sort_by_key(|sample| sample.seq);
    let profile = profile_of(&sorted);
    let reset = reset_of(profile.kind, &sorted);
    let unit = reset.unit.unwrap_or_default();
    let verdicts: Vec<Verdict> = sorted.iter().map(|sample| judge(&sample.answer, sample.wall)).collect();
    let first_over = sorted
        .iter()
        .zip(&verdicts)
        .position(|(sample, verdict)| *verdict == Verdict::OverLimit && sample.phase == Phase::Ramp);
    let observations: Vec<Observation> =
        sorted.iter().map(|sample| vendor::observe(profile.kind, unit, &sample.response())).collect();
    let windows = windows_of(profile.kind, &sorted, &verdicts, &observations, first_over);
    let over_limit = first_over.map(|at| over_limit_of(sorted[at], &observations[at], &verdicts[..at]));
    let recovery = sorted.iter().position(|sample| sample.phase == Phase::Recovery).map(|at| {
        let before = at.checked_sub(1).map(|before| &observations[before]);
        recovery_of(sorted[at], verdicts[at], &observations[at], before, &windows)
    });
    Findings { profile, reset, windows, over_limit, recovery }
}

/// How many fields of its windows `profile` reads in `sample`, if it finds any window there.
fn reads(profile: ProfileKind, sample: &Sample) -> Option<usize> {
    // GitHub and the generic `x-ratelimit` read the same triple; only GitHub's own fields
    // (the resource it is counted against, the count used) say the vendor is GitHub.
    if profile == ProfileKind::Github
        && !sample.answer.headers.contains_key("x-ratelimit-resource")
        && !sample.answer.headers.contains_key("x-ratelimit-used")
    {
        return None;
    }
    let observation = vendor::observe(profile, ResetUnit::Seconds, &sample.response());
    let fields = observation
        .windows
        .iter()
        .map(|w| {
            usize::from(w.limit.is_some())
                + usize::from(w.remaining.is_some())
                + usize::from(w.reset_in.is_some())
                + usize::from(w.window.is_some())
        })
        .sum();
    (!observation.windows.is_empty()).then_some(fields)
}

/// The profile that reads the most answers (then the most fields; then the more specific one).
fn profile_of(samples: &[&Sample]) -> ProfileFinding {
    let mut best: Option<(usize, usize, ProfileKind)> = None;
    for profile in PROFILES {
        let mut read = 0;
        let mut fields = 0;
        for sample in samples {
            if let Some(count) = reads(profile, sample) {
                read += 1;
                fields += count;
            }
        }
        if read > 0 && best.is_none_or(|(best_read, best_fields, _)| (read, fields) > (best_read, best_fields)) {
            best = Some((read, fields, profile));
        }
    }
    let mut names: Vec<String> = samples
        .iter()
        .flat_map(|sample| sample.answer.headers.keys())
        .map(|name| name.as_str().to_owned())
        .filter(|name| name != "content-type" && name != "retry-after")
        .collect();
    names.sort();
    names.dedup();
    let of = samples.len();
    match best {
        Some((read, _, kind)) => ProfileFinding {
            kind,
            read,
            of,
            evidence: format!(
                "its parser reads rate-limit windows in {read} of {of} answers; fields sent: {}",
                names.join(", ")
            ),
            fields: names,
        },
        None => ProfileFinding {
            kind: ProfileKind::None,
            read: 0,
            of,
            evidence: if names.is_empty() {
                format!("none of {of} answers carries a rate-limit header any profile reads")
            } else {
                format!("no profile reads windows in the fields the vendor sent ({})", names.join(", "))
            },
            fields: names,
        },
    }
}

/// How far from now a Unix time may be and still be read as one (400 days).
const EPOCH_PLAUSIBLE: u64 = 400 * 86_400;

fn epoch_secs(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH).map_or(0.0, |since| since.as_secs_f64())
}

/// How the vendor writes `reset`; for `x-ratelimit`, which unit makes the values plausible.
fn reset_of(profile: ProfileKind, samples: &[&Sample]) -> ResetFinding {
    let fixed = |form: &str, evidence: &str| ResetFinding { unit: None, form: form.into(), evidence: evidence.into() };
    match profile {
        ProfileKind::XRatelimit => {
            let mut epoch = Vec::new();
            let mut seconds = Vec::new();
            for sample in samples {
                let mut malformed = 0;
                let Some(raw) = vendor::header_u64(&sample.answer.headers, "x-ratelimit-reset", &mut malformed) else {
                    continue;
                };
                let now = epoch_secs(sample.wall);
                let plausible_epoch = raw >= 1_000_000_000 && (raw as f64 - now).abs() <= EPOCH_PLAUSIBLE as f64;
                if plausible_epoch {
                    epoch.push((raw, raw as f64 - now));
                } else {
                    seconds.push(raw);
                }
            }
            if epoch.is_empty() && seconds.is_empty() {
                return ResetFinding {
                    unit: None,
                    form: "not sent".into(),
                    evidence: "no answer carries X-RateLimit-Reset".into(),
                };
            }
            if epoch.len() >= seconds.len() {
                let (raw, ahead) = epoch[0];
                ResetFinding {
                    unit: Some(ResetUnit::Epoch),
                    form: "a Unix timestamp (epoch seconds)".into(),
                    evidence: format!(
                        "X-RateLimit-Reset on {} answer(s) is a Unix time within days of the answer \
                         (e.g. {raw}, {ahead:.1} s after it arrived); read as seconds from now it would be {} years",
                        epoch.len(),
                        raw / (365 * 86_400)
                    ),
                }
            } else {
                ResetFinding {
                    unit: Some(ResetUnit::Seconds),
                    form: "seconds from now".into(),
                    evidence: format!(
                        "X-RateLimit-Reset on {} answer(s) is a small count (e.g. {}), not a Unix time",
                        seconds.len(),
                        seconds[0]
                    ),
                }
            }
        }
        ProfileKind::Ietf => fixed("seconds from now (`t` / `reset`)", "the IETF fields always count seconds from now"),
        ProfileKind::Github => fixed("a Unix timestamp (epoch seconds)", "GitHub's x-ratelimit-reset is epoch seconds"),
        ProfileKind::Zendesk => fixed("seconds from now", "Zendesk's reset fields count seconds from now"),
        ProfileKind::Hubspot => fixed(
            "none: HubSpot states each window's length (interval), not when it resets",
            "HubSpot sends X-HubSpot-RateLimit-Interval-Milliseconds and no reset",
        ),
        ProfileKind::Salesforce => fixed(
            "none: Sforce-Limit-Info states used/allowed only",
            "Salesforce sends no reset; its count rolls over 24 h",
        ),
        ProfileKind::Dynamics => fixed("none: remaining only", "Dataverse sends remaining figures only"),
        ProfileKind::None => fixed("not sent", "no rate-limit header was read"),
    }
}

/// How far (seconds) a fixed window's resets may fall from a multiple of its length since the
/// epoch and still count as on it: the answer's latency, and a clock a little off the vendor's.
const ALIGNED_WITHIN: f64 = 0.3;

/// One answer's reading of one window.
struct Point {
    sent: Duration,
    wall: SystemTime,
    accepted: bool,
    window: VendorWindow,
}

fn windows_of(
    profile: ProfileKind,
    samples: &[&Sample],
    verdicts: &[Verdict],
    observations: &[Observation],
    first_over: Option<usize>,
) -> Vec<WindowFinding> {
    let mut series: Vec<(String, Vec<(usize, Point)>)> = Vec::new();
    for (at, (sample, observation)) in samples.iter().zip(observations).enumerate() {
        for window in &observation.windows {
            let point = Point {
                sent: sample.sent,
                wall: sample.wall,
                accepted: verdicts[at] == Verdict::Accepted,
                window: window.clone(),
            };
            match series.iter_mut().find(|(name, _)| *name == window.name) {
                Some((_, points)) => points.push((at, point)),
                None => series.push((window.name.clone(), vec![(at, point)])),
            }
        }
    }
    series.into_iter().map(|(name, points)| window_of(profile, name, &points, samples, verdicts, first_over)).collect()
}

/// The most frequent value (the largest among equals).
fn mode<T: Ord + Copy>(values: &[T]) -> Option<T> {
    let mut sorted = values.to_vec();
    sorted.sort();
    let mut best: Option<(usize, T)> = None;
    let mut at = 0;
    while at < sorted.len() {
        let run = sorted[at..].iter().take_while(|value| **value == sorted[at]).count();
        if best.is_none_or(|(count, _)| run >= count) {
            best = Some((run, sorted[at]));
        }
        at += run.max(1);
    }
    best.map(|(_, value)| value)
}

/// `2s`, `1d`, `1.5s`, `250ms`: how a length is shown (and, whole, written in the config).
pub fn show(duration: Duration) -> String {
    let millis = duration.as_millis();
    let secs = duration.as_secs();
    if duration.subsec_nanos() == 0 && secs > 0 {
        for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
            if secs % size == 0 {
                return format!("{}{unit}", secs / size);
            }
        }
        return format!("{secs}s");
    }
    if millis < 1000 {
        return format!("{millis}ms");
    }
    format!("{:.1}s", duration.as_secs_f64())
}

fn window_of(
    profile: ProfileKind,
    name: String,
    points: &[(usize, Point)],
    samples: &[&Sample],
    verdicts: &[Verdict],
    first_over: Option<usize>,
) -> WindowFinding {
    let answers = samples.len();
    // Limit: what the vendor states, else a lower bound from what it said was left.
    let limits: Vec<u64> = points.iter().filter_map(|(_, p)| p.window.limit).collect();
    let remainings: Vec<u64> = points.iter().filter_map(|(_, p)| p.window.remaining).collect();
    let (limit, limit_stated, mut limit_evidence) = match mode(&limits) {
        Some(limit) => {
            let mut others: Vec<u64> = limits.iter().copied().filter(|value| *value != limit).collect();
            others.sort_unstable();
            others.dedup();
            let also = if others.is_empty() {
                String::new()
            } else {
                format!(" (also seen: {})", others.iter().map(u64::to_string).collect::<Vec<_>>().join(", "))
            };
            (Some(limit), true, format!("the vendor states {limit} on {} of {answers} answers{also}", limits.len()))
        }
        None => match remainings.iter().max() {
            Some(most) => (
                Some(most.saturating_add(1)),
                false,
                format!(
                    "the vendor states no limit: at least {} (the most it said was left, {most}, plus the request that read it)",
                    most.saturating_add(1)
                ),
            ),
            None => (None, false, "the vendor states neither a limit nor what is left".into()),
        },
    };

    // Length: what the vendor (or its profile) states, else the spacing of its resets.
    let lengths: Vec<Duration> = points.iter().filter_map(|(_, p)| p.window.window).collect();
    let instants: Vec<f64> = points
        .iter()
        .filter_map(|(_, p)| p.window.reset_in.map(|reset| epoch_secs(p.wall) + reset.as_secs_f64()))
        .collect();
    let (length, length_exact, length_evidence) = match mode(&lengths) {
        Some(length) => (
            Some(length),
            true,
            format!(
                "{}, as the {} profile reads this window in {} answers",
                show(length),
                profile.as_str(),
                lengths.len()
            ),
        ),
        None => match reset_spacing(&instants) {
            Some((spacing, exact, windows)) => (
                Some(spacing),
                exact,
                format!(
                    "the vendor's reset moved on by {} each time ({windows} windows seen){}",
                    show(spacing),
                    if exact { "" } else { ", to within a second" }
                ),
            ),
            None => match points.iter().filter_map(|(_, p)| p.window.reset_in).max() {
                Some(longest) => {
                    let at_least = Duration::from_secs(longest.as_secs() + u64::from(longest.subsec_nanos() > 0));
                    (
                        Some(at_least.max(Duration::from_secs(1))),
                        false,
                        format!("at least {}: the longest reset the vendor announced", show(at_least)),
                    )
                }
                None => (None, false, "the vendor states no length and no reset".into()),
            },
        },
    };

    // Rolling or fixed: how `remaining` came back between one answer and the next.
    let (counting, counting_observed, counting_evidence) = counting_of(profile, &name, points, limit, length);
    let epoch_aligned = match (counting, length) {
        (Counting::Fixed, Some(length)) if !instants.is_empty() => {
            // A reset in whole seconds from now falls up to a second after the real one, so
            // the earliest reset instant any answer implies is the closest to the real phase.
            let size = length.as_secs_f64();
            let phases: Vec<f64> = instants.iter().map(|instant| instant.rem_euclid(size)).collect();
            let earliest = phases.iter().copied().fold(f64::INFINITY, f64::min);
            Some(earliest <= ALIGNED_WITHIN || phases.iter().any(|phase| size - phase <= ALIGNED_WITHIN))
        }
        _ => None,
    };

    // Ran out when the vendor refused: 0 left in the refusal, else in the last answer before it.
    let exhausted = first_over.is_some_and(|over| {
        let at_refusal = points.iter().find(|(at, _)| *at == over).and_then(|(_, p)| p.window.remaining);
        let before = points.iter().rev().find(|(at, p)| *at < over && p.accepted).and_then(|(_, p)| p.window.remaining);
        at_refusal.or(before) == Some(0)
    });
    let (measured, measured_evidence) = match (exhausted, first_over, length) {
        (true, Some(over), Some(length)) => {
            let refused_at = samples[over].sent;
            let since = match counting {
                // The last time the window came back whole, else the probe's start.
                Counting::Fixed => points
                    .iter()
                    .rev()
                    .find(|(at, p)| {
                        *at < over && p.accepted && limit.is_some_and(|l| l > 0 && p.window.remaining == Some(l - 1))
                    })
                    .map_or(Duration::ZERO, |(_, p)| p.sent),
                _ => refused_at.saturating_sub(length),
            };
            let accepted = samples[..over]
                .iter()
                .zip(verdicts)
                .filter(|(sample, verdict)| {
                    **verdict == Verdict::Accepted
                        && sample.sent >= since
                        && (counting == Counting::Fixed || sample.sent > since || since.is_zero())
                })
                .count() as u64;
            let span = if counting == Counting::Fixed {
                "since the window last came back whole".to_owned()
            } else if refused_at < length {
                format!(
                    "from the probe's start to the first over-limit answer ({:.1} s, within one {} window)",
                    refused_at.as_secs_f64(),
                    show(length)
                )
            } else {
                format!("in the {} before the first over-limit answer", show(length))
            };
            (Some(accepted), Some(format!("{accepted} requests were accepted {span}")))
        }
        _ => (None, None),
    };
    if let (Some(measured), Some(limit)) = (measured, limit) {
        if !limit_stated {
            limit_evidence.push_str(&format!("; {measured} were accepted before the vendor refused"));
        } else if measured != limit {
            limit_evidence.push_str(&format!(
                "; the probe counted {measured} accepted before the refusal (another caller, or the vendor counts differently)"
            ));
        }
    }
    WindowFinding {
        name,
        limit,
        limit_stated,
        limit_evidence,
        length,
        length_exact,
        length_evidence,
        counting,
        counting_observed,
        counting_evidence,
        epoch_aligned,
        exhausted,
        measured,
        measured_evidence,
    }
}

/// The spacing of distinct reset instants: (length, exact, windows seen), when two or more were seen.
fn reset_spacing(instants: &[f64]) -> Option<(Duration, bool, usize)> {
    let mut distinct: Vec<f64> = Vec::new();
    let mut sorted = instants.to_vec();
    sorted.sort_by(f64::total_cmp);
    for instant in sorted {
        if distinct.last().is_none_or(|last| instant - last >= 0.999) {
            distinct.push(instant);
        }
    }
    if distinct.len() < 2 {
        return None;
    }
    let mut gaps: Vec<f64> = distinct.windows(2).map(|pair| pair[1] - pair[0]).collect();
    gaps.sort_by(f64::total_cmp);
    let median = gaps[gaps.len() / 2];
    let exact = gaps.iter().all(|gap| (gap - gaps[0]).abs() < 0.01) && (median - median.round()).abs() < 0.01;
    let seconds = median.round().max(1.0);
    Some((Duration::from_secs_f64(seconds), exact, distinct.len()))
}

/// What the profile's vendor documents about a window it reads, when the answers do not show it.
fn documented(profile: ProfileKind, name: &str) -> Option<(Counting, &'static str)> {
    match (profile, name) {
        (ProfileKind::Hubspot, "daily") => {
            Some((Counting::Fixed, "HubSpot resets the daily count at midnight in the account's time zone"))
        }
        (ProfileKind::Hubspot, _) => {
            Some((Counting::Rolling, "HubSpot's interval limit is rolling (TEN_SECONDLY_ROLLING)"))
        }
        (ProfileKind::Salesforce, _) => Some((Counting::Rolling, "Salesforce counts API requests over a rolling 24 h")),
        (ProfileKind::Github, _) => Some((Counting::Fixed, "GitHub's limit resets whole at x-ratelimit-reset")),
        (ProfileKind::Dynamics, _) => Some((Counting::Rolling, "Dataverse counts in a 5-minute sliding window")),
        _ => None,
    }
}

/// Rolling if `remaining` came back a little at a time (as each old request left the window);
/// fixed if it came back whole at once while requests made less than a window earlier were
/// still in it. A window that came back whole after a full window's quiet says nothing.
fn counting_of(
    profile: ProfileKind,
    name: &str,
    points: &[(usize, Point)],
    limit: Option<u64>,
    length: Option<Duration>,
) -> (Counting, bool, String) {
    let mut partial = Vec::new();
    let mut whole = Vec::new();
    let readings: Vec<&Point> = points.iter().map(|(_, p)| p).filter(|p| p.window.remaining.is_some()).collect();
    for pair in readings.windows(2) {
        let (before, after) = (pair[0], pair[1]);
        let (Some(was), Some(now)) = (before.window.remaining, after.window.remaining) else { continue };
        if !after.accepted {
            continue;
        }
        // Without recovery, an accepted request leaves one fewer than the answer before it.
        let came_back = i128::from(now) - i128::from(was) + 1;
        if came_back <= 0 {
            continue;
        }
        let full = limit.is_some_and(|limit| now.saturating_add(1) >= limit);
        let gap = after.sent.saturating_sub(before.sent);
        let example = format!("{was} left, then {now} after the next request at +{:.2} s", after.sent.as_secs_f64());
        if full && came_back >= 2 && length.is_none_or(|length| gap < length) {
            whole.push(example);
        } else if !full {
            partial.push(example);
        }
    }
    if partial.len() > whole.len() {
        return (
            Counting::Rolling,
            true,
            format!(
                "remaining came back a little at a time as old requests left the window ({} times, e.g. {})",
                partial.len(),
                partial[0]
            ),
        );
    }
    if whole.len() > partial.len() {
        return (
            Counting::Fixed,
            true,
            format!(
                "remaining came back whole at once, with requests from less than a window before forgotten ({} times, e.g. {})",
                whole.len(),
                whole[0]
            ),
        );
    }
    match documented(profile, name) {
        Some((counting, note)) => (counting, false, format!("not seen in these answers; {note}")),
        None => (
            Counting::Unknown,
            false,
            "not seen in these answers (remaining never came back before the probe ended)".into(),
        ),
    }
}

fn over_limit_of(sample: &Sample, observation: &Observation, before: &[Verdict]) -> OverLimitFinding {
    OverLimitFinding {
        seq: sample.seq,
        status: sample.answer.status.as_u16(),
        body: body_shape(&sample.answer),
        retry_after: retry_after_form(&sample.answer),
        class: observation.throttle.map(|throttle| throttle.class.as_str()),
        accepted_before: before.iter().filter(|verdict| **verdict == Verdict::Accepted).count(),
    }
}

/// How the one request after the pause found each window, against the answer before it.
fn recovery_of(
    sample: &Sample,
    verdict: Verdict,
    observation: &Observation,
    before: Option<&Observation>,
    windows: &[WindowFinding],
) -> RecoveryFinding {
    let accepted = verdict == Verdict::Accepted;
    let mut parts = Vec::new();
    for window in &observation.windows {
        let Some(remaining) = window.remaining else { continue };
        let limit = window.limit.or_else(|| windows.iter().find(|w| w.name == window.name).and_then(|w| w.limit));
        let was =
            before.and_then(|before| before.windows.iter().find(|w| w.name == window.name)).and_then(|w| w.remaining);
        // An accepted request takes one: it came back if more is left than was, less one.
        let came_back = was.is_some_and(|was| i128::from(remaining) - i128::from(was) + 1 > 0);
        let state = match limit {
            Some(limit) if accepted && remaining.saturating_add(1) >= limit => " (back whole)",
            Some(_) if accepted && came_back => " (partly back)",
            _ => "",
        };
        let of = limit.map(|limit| format!(" of {limit}")).unwrap_or_default();
        parts.push(format!("`{}` {remaining}{of} left{state}", window.name));
    }
    let status = sample.answer.status;
    let head = if accepted {
        format!("{} {}: accepted", status.as_u16(), status.canonical_reason().unwrap_or(""))
    } else {
        format!("{} {}: still refused", status.as_u16(), status.canonical_reason().unwrap_or(""))
    };
    let description = if parts.is_empty() { head } else { format!("{head}; {}", parts.join(", ")) };
    RecoveryFinding { seq: sample.seq, status: status.as_u16(), accepted, description }
}

/// A body's shape in a few words: `a JSON object with status, message, policyName=…`.
pub fn body_shape(answer: &Answer) -> String {
    let content_type = answer.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let Some(body) = answer.body.as_ref().filter(|body| !body.is_empty()) else { return "no body".into() };
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(map)) => format!("a JSON object: {}", object_shape(&map)),
        Ok(serde_json::Value::Array(items)) => match items.first() {
            Some(serde_json::Value::Object(first)) => {
                format!("a JSON array of {} object(s), the first: {}", items.len(), object_shape(first))
            }
            _ => format!("a JSON array of {} item(s)", items.len()),
        },
        Ok(other) => format!("a JSON value ({})", clip(&other.to_string(), 60)),
        Err(_) => {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            let kind = if content_type.is_empty() { "text".to_owned() } else { content_type.to_owned() };
            format!("{kind} ({} bytes): \"{}\"", body.len(), clip(&text, 60))
        }
    }
}

/// Keys of an object, with the values of those that name a limit or an error.
fn object_shape(map: &serde_json::Map<String, serde_json::Value>) -> String {
    const TELLING: &[&str] =
        &["policyName", "errorType", "errorCode", "error", "code", "category", "type", "title", "message", "status"];
    let keys: Vec<String> = map
        .iter()
        .take(12)
        .map(|(key, value)| match value {
            serde_json::Value::String(text) if TELLING.contains(&key.as_str()) => {
                format!("{key}={}", clip(text, 48))
            }
            serde_json::Value::Number(number) if TELLING.contains(&key.as_str()) => format!("{key}={number}"),
            _ => key.clone(),
        })
        .collect();
    if keys.is_empty() {
        "no keys".into()
    } else {
        keys.join(", ")
    }
}

/// At most `chars` characters of `text` on one line, with an ellipsis when cut.
pub fn clip(text: &str, chars: usize) -> String {
    let flat: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if flat.chars().count() <= chars {
        return flat;
    }
    format!("{}…", flat.chars().take(chars).collect::<String>())
}

fn retry_after_form(answer: &Answer) -> String {
    let Some(value) = answer.headers.get(http::header::RETRY_AFTER) else { return "none".into() };
    let text = value.to_str().unwrap_or("").trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        format!("delta-seconds (Retry-After: {text})")
    } else if httpdate::parse_http_date(text).is_ok() {
        format!("an HTTP-date (Retry-After: {text})")
    } else {
        format!("unreadable (Retry-After: {})", clip(text, 40))
    }
}

/// How long to send nothing after an over-limit answer, and who said so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub wait: Duration,
    pub source: String,
}

/// The pause the vendor asked for with its over-limit answer `over`, read with the profile
/// `samples` show (its `Retry-After`, else the profile's own pause, else the reset of a
/// window it reports exhausted); `None` when it said nothing of when to come back.
pub fn hold_off(samples: &[Sample], over: &Sample) -> Option<Hold> {
    let sorted: Vec<&Sample> = samples.iter().collect();
    let profile = profile_of(&sorted).kind;
    let unit = reset_of(profile, &sorted).unit.unwrap_or_default();
    let observation = vendor::observe(profile, unit, &over.response());
    if let Some(wait) = observation.throttle.and_then(|throttle| throttle.pause) {
        let mut malformed = 0;
        let source = match vendor::retry_after(&over.answer.headers, over.wall, &mut malformed) {
            Some(_) => {
                let value = over.answer.headers.get(http::header::RETRY_AFTER).and_then(|v| v.to_str().ok());
                format!("Retry-After: {}", value.unwrap_or(""))
            }
            None => format!("the {} profile's pause for this answer", profile.as_str()),
        };
        return Some(Hold { wait, source });
    }
    observation
        .windows
        .iter()
        .filter(|window| window.remaining == Some(0))
        .filter_map(|window| window.reset_in.map(|reset| (reset, window.name.clone())))
        .max()
        .map(|(wait, name)| Hold { wait, source: format!("the reset of window `{name}`, which is exhausted") })
}

/// One answer's windows in a few words (`rolling 6/10, daily 990/1000`), for progress lines.
pub fn glance(sample: &Sample) -> Option<String> {
    let profile = profile_of(&[sample]).kind;
    if profile == ProfileKind::None {
        return None;
    }
    let unit = reset_of(profile, &[sample]).unit.unwrap_or_default();
    let observation = vendor::observe(profile, unit, &sample.response());
    let parts: Vec<String> = observation
        .windows
        .iter()
        .filter_map(|window| {
            let remaining = window.remaining?;
            Some(match window.limit {
                Some(limit) => format!("{} {remaining}/{limit}", window.name),
                None => format!("{} {remaining} left", window.name),
            })
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// The windows `profile` reads in one sample (for `probe.json`).
pub fn windows_in(sample: &Sample, profile: ProfileKind, unit: ResetUnit) -> Vec<VendorWindow> {
    vendor::observe(profile, unit, &sample.response()).windows
}

mod optional_millis {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(value: &Option<Duration>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(duration) => serializer.serialize_u64(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)),
            None => serializer.serialize_none(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    /// A made-up sample: request `seq` sent at `ms`, answered 1 ms later.
    pub fn sample(seq: u64, ms: u64, status: u16, headers: &[(&str, String)], body: Option<&str>) -> Sample {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        }
        let start = UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        Sample {
            seq,
            step: 1,
            rate: 1.0,
            phase: Phase::Ramp,
            sent: Duration::from_millis(ms),
            answered: Duration::from_millis(ms + 1),
            wall: start + Duration::from_millis(ms + 1),
            answer: Answer::new(StatusCode::from_u16(status).unwrap(), &map, body.map(|b| Bytes::from(b.to_owned()))),
        }
    }

    fn hubspot(seq: u64, ms: u64, status: u16, remaining: u64) -> Sample {
        let body = (status == 429).then_some(r#"{"status":"error","message":"You have reached your ten_secondly_rolling limit.","errorType":"RATE_LIMIT","policyName":"TEN_SECONDLY_ROLLING"}"#);
        sample(
            seq,
            ms,
            status,
            &[
                ("x-hubspot-ratelimit-max", "10".into()),
                ("x-hubspot-ratelimit-remaining", remaining.to_string()),
                ("x-hubspot-ratelimit-interval-milliseconds", "2000".into()),
                ("x-hubspot-ratelimit-daily", "1000".into()),
                ("x-hubspot-ratelimit-daily-remaining", (1000 - seq).to_string()),
                ("content-type", "application/json".into()),
            ],
            body,
        )
    }

    #[test]
    fn a_rolling_hubspot_window_is_told_by_partial_recoveries() {
        // 10 per 2 s rolling, the ramp of 1, 2, 4, 8 rps: slots come back one by one.
        let times = [0, 1000, 1500, 2000, 2250, 2500, 2750, 3000, 3125, 3250, 3375, 3500, 3625];
        let remaining = [9, 8, 7, 7, 6, 5, 4, 4, 3, 2, 1, 1, 0];
        let mut samples: Vec<Sample> =
            times.iter().zip(remaining).enumerate().map(|(i, (ms, r))| hubspot(i as u64 + 1, *ms, 200, r)).collect();
        samples.push(hubspot(14, 3750, 429, 0));
        let mut recovery = hubspot(15, 5800, 200, 9);
        recovery.phase = Phase::Recovery;
        samples.push(recovery);
        let findings = infer(&samples);
        assert_eq!(findings.profile.kind, ProfileKind::Hubspot);
        let rolling = &findings.windows[0];
        assert_eq!(
            (rolling.name.as_str(), rolling.limit, rolling.length),
            ("rolling", Some(10), Some(Duration::from_secs(2)))
        );
        assert_eq!(rolling.counting, Counting::Rolling, "{}", rolling.counting_evidence);
        assert!(rolling.counting_observed);
        assert!(rolling.exhausted);
        assert_eq!(rolling.measured, Some(10), "{:?}", rolling.measured_evidence);
        let daily = &findings.windows[1];
        assert_eq!((daily.name.as_str(), daily.limit), ("daily", Some(1000)));
        assert_eq!(daily.counting, Counting::Fixed, "documented: {}", daily.counting_evidence);
        assert!(!daily.counting_observed && !daily.exhausted);
        let over = findings.over_limit.unwrap();
        assert_eq!((over.seq, over.status, over.retry_after.as_str()), (14, 429, "none"));
        assert!(over.body.contains("policyName=TEN_SECONDLY_ROLLING"), "{}", over.body);
        assert_eq!(over.class, Some("burst"));
        let recovery = findings.recovery.unwrap();
        assert!(recovery.accepted && recovery.description.contains("back whole"), "{}", recovery.description);
        let hold = hold_off(&samples, &samples[13]).unwrap();
        assert_eq!(hold.wait, Duration::from_secs(2), "the interval: HubSpot sends no Retry-After");
    }

    fn ietf(seq: u64, ms: u64, status: u16, remaining: u64, reset: u64) -> Sample {
        let mut headers = vec![
            ("ratelimit-policy", "\"default\";q=10;w=2".to_owned()),
            ("ratelimit", format!("\"default\";r={remaining};t={reset}")),
        ];
        if status == 429 {
            headers.push(("retry-after", reset.to_string()));
        }
        sample(seq, ms, status, &headers, (status == 429).then_some(r#"{"title":"Too Many Requests"}"#))
    }

    #[test]
    fn a_fixed_window_comes_back_whole() {
        // Windows of 2 s on the epoch (the samples' clock starts on one): 4 in the first,
        // 10 and a refusal in the second, then the recovery in the third.
        let mut samples = vec![ietf(1, 0, 200, 9, 2), ietf(2, 1000, 200, 8, 1), ietf(3, 1500, 200, 7, 1)];
        let second = [2000, 2250, 2500, 2750, 3000, 3125, 3250, 3375, 3500, 3625];
        for (i, ms) in second.iter().enumerate() {
            samples.push(ietf(4 + i as u64, *ms, 200, 9 - i as u64, 2 - (*ms >= 3000) as u64));
        }
        samples.push(ietf(14, 3750, 429, 0, 1));
        let mut recovery = ietf(15, 4800, 200, 9, 2);
        recovery.phase = Phase::Recovery;
        samples.push(recovery);
        let findings = infer(&samples);
        assert_eq!(findings.profile.kind, ProfileKind::Ietf);
        let window = &findings.windows[0];
        assert_eq!((window.limit, window.length), (Some(10), Some(Duration::from_secs(2))));
        assert_eq!(window.counting, Counting::Fixed, "{}", window.counting_evidence);
        assert_eq!(window.epoch_aligned, Some(true));
        assert_eq!(window.measured, Some(10), "{:?}", window.measured_evidence);
        assert_eq!(findings.over_limit.unwrap().retry_after, "delta-seconds (Retry-After: 1)");
        assert_eq!(hold_off(&samples, &samples[13]).unwrap().source, "Retry-After: 1");
    }

    #[test]
    fn an_epoch_reset_is_told_from_seconds_and_gives_the_window_length() {
        let start = 1_767_225_600u64;
        let x = |seq: u64, ms: u64, status: u16, remaining: u64| {
            let reset = start + (ms / 2000 + 1) * 2;
            sample(
                seq,
                ms,
                status,
                &[
                    ("x-ratelimit-limit", "10".into()),
                    ("x-ratelimit-remaining", remaining.to_string()),
                    ("x-ratelimit-reset", reset.to_string()),
                ],
                None,
            )
        };
        let samples =
            vec![x(1, 0, 200, 9), x(2, 1000, 200, 8), x(3, 2100, 200, 9), x(4, 2500, 200, 8), x(5, 4100, 200, 9)];
        let findings = infer(&samples);
        assert_eq!(findings.profile.kind, ProfileKind::XRatelimit);
        assert_eq!(findings.reset.unit, Some(ResetUnit::Epoch), "{}", findings.reset.evidence);
        let window = &findings.windows[0];
        assert_eq!(window.length, Some(Duration::from_secs(2)), "{}", window.length_evidence);
        assert!(window.length_exact);
        assert_eq!(window.counting, Counting::Fixed, "{}", window.counting_evidence);

        let seconds = |seq: u64, ms: u64| {
            sample(
                seq,
                ms,
                200,
                &[
                    ("x-ratelimit-limit", "10".into()),
                    ("x-ratelimit-remaining", "5".into()),
                    ("x-ratelimit-reset", "30".into()),
                ],
                None,
            )
        };
        let findings = infer(&[seconds(1, 0), seconds(2, 10)]);
        assert_eq!(findings.reset.unit, Some(ResetUnit::Seconds), "{}", findings.reset.evidence);
    }

    #[test]
    fn github_needs_its_own_fields_and_salesforce_refuses_with_403() {
        let generic =
            sample(1, 0, 200, &[("x-ratelimit-limit", "60".into()), ("x-ratelimit-remaining", "59".into())], None);
        assert_eq!(infer(&[generic]).profile.kind, ProfileKind::XRatelimit);
        let github = sample(
            1,
            0,
            200,
            &[
                ("x-ratelimit-limit", "60".into()),
                ("x-ratelimit-remaining", "59".into()),
                ("x-ratelimit-resource", "core".into()),
            ],
            None,
        );
        assert_eq!(infer(&[github]).profile.kind, ProfileKind::Github);

        let ok = sample(1, 0, 200, &[("sforce-limit-info", "api-usage=15/15".into())], None);
        let refused = sample(
            2,
            100,
            403,
            &[],
            Some(r#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#),
        );
        assert_eq!(judge(&refused.answer, refused.wall), Verdict::OverLimit);
        let denied = sample(2, 100, 403, &[], Some(r#"[{"message":"no","errorCode":"INSUFFICIENT_ACCESS"}]"#));
        assert_eq!(judge(&denied.answer, denied.wall), Verdict::Unauthorized);
        let findings = infer(&[ok, refused.clone()]);
        assert_eq!(findings.profile.kind, ProfileKind::Salesforce);
        let window = &findings.windows[0];
        assert_eq!((window.name.as_str(), window.limit), ("api-usage", Some(15)));
        assert_eq!(window.length, Some(Duration::from_secs(86_400)));
        assert!(window.exhausted);
        assert_eq!(window.counting, Counting::Rolling, "documented");
        let over = findings.over_limit.unwrap();
        assert_eq!((over.status, over.class), (403, Some("daily")));
        assert!(over.body.contains("errorCode=REQUEST_LIMIT_EXCEEDED"), "{}", over.body);
        assert_eq!(hold_off(std::slice::from_ref(&refused), &refused), None, "Salesforce says not when");
    }

    #[test]
    fn verdicts() {
        let verdict = |status: u16, headers: &[(&str, String)]| {
            let s = sample(1, 0, status, headers, None);
            judge(&s.answer, s.wall)
        };
        assert_eq!(verdict(200, &[]), Verdict::Accepted);
        assert_eq!(verdict(429, &[]), Verdict::OverLimit);
        assert_eq!(verdict(503, &[("retry-after", "3".into())]), Verdict::OverLimit);
        assert_eq!(verdict(503, &[]), Verdict::VendorFailure);
        assert_eq!(verdict(401, &[]), Verdict::Unauthorized);
        assert_eq!(verdict(404, &[]), Verdict::NotFound);
        assert_eq!(verdict(400, &[]), Verdict::Refused);
    }

    #[test]
    fn lengths_are_shown_as_the_config_writes_them() {
        assert_eq!(show(Duration::from_secs(2)), "2s");
        assert_eq!(show(Duration::from_secs(86_400)), "1d");
        assert_eq!(show(Duration::from_secs(3600)), "1h");
        assert_eq!(show(Duration::from_secs(90)), "90s");
        assert_eq!(show(Duration::from_millis(250)), "250ms");
        assert_eq!(show(Duration::from_millis(1500)), "1.5s");
        assert_eq!(mode(&[3, 1, 3, 2]), Some(3));
        assert_eq!(mode::<u64>(&[]), None);
    }
}
