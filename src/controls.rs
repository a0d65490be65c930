//! The caller's own controls over its request (`Sluice-Deadline`, `Sluice-Max-Wait`,
//! `Sluice-Batch`, `Sluice-Consumer`, `Sluice-Priority`), read once, in the Route step, into one
//! typed value in the request's extensions. Later layers read [`RequestControls`], never the
//! headers, so there is exactly one parser of what a client sends here, and it is the one that is
//! fuzzed. A leaf: it imports nothing from sluice, so `route` parses the controls and `retry`,
//! `limit` and `batch` read them without naming each other.
//!
//! The numbers are a client's word, so they are clamped before any arithmetic: a wait or a
//! deadline is at most [`MAX_CONTROL`] (24 h) from now, every instant is computed with
//! `checked_add`, and a value that is not a duration at all is refused with
//! `400 malformed_request` naming the header, rather than ignored: a caller who asked for a
//! deadline and silently got none would not know its request is unbounded.
//!
//! `Sluice-Consumer` is the exception that proves the rule: any name is a valid claim (one sluice
//! does not know is counted as `other` by the consumer room), so only a value that is not text
//! at all, or one given twice, is refused; an empty one (an unset variable in the client's
//! template) is taken as absent.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use tokio::time::Instant;

pub use crate::config::Lane;

/// Request header with which a caller caps the whole time sluice may spend on its request.
pub const DEADLINE_HEADER: &str = "sluice-deadline";

/// Request header with which a caller shortens (never lengthens) its own queue wait.
pub const MAX_WAIT_HEADER: &str = "sluice-max-wait";

/// Request header with which a caller opts out of batching.
pub const BATCH_HEADER: &str = "sluice-batch";

/// Request header with which a caller says which consumer (service, job) it spends quota for.
pub const CONSUMER_HEADER: &str = "sluice-consumer";

/// Request header with which a caller picks its request's lane: `high`, `normal` or `low`.
pub const PRIORITY_HEADER: &str = "sluice-priority";

/// The longest `Sluice-Consumer` value kept; a longer one is no known consumer's name anyway,
/// so it is cut here (and counted as `other`) rather than carried along whole.
pub const MAX_CONSUMER_BYTES: usize = 128;

/// The longest deadline or wait a caller can ask for; longer values are taken as this. The
/// upstream's own bounds (`timeouts.request`, `max_queue_wait`) still apply on top.
pub const MAX_CONTROL: Duration = Duration::from_secs(24 * 60 * 60);

/// What the caller asked of sluice for this one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestControls {
    /// `Sluice-Deadline`: when sluice must have answered, at most [`MAX_CONTROL`] after the
    /// request was routed.
    pub deadline: Option<Instant>,
    /// `Sluice-Max-Wait`: the longest the request may queue (for quota, a concurrency slot or a
    /// vendor pause), at most [`MAX_CONTROL`]. Retry narrows it to what is left of the deadline.
    pub max_wait: Option<Duration>,
    /// `Sluice-Batch`: whether the call may be folded into a bulk call (`off` says no).
    pub batch: bool,
    /// `Sluice-Consumer`: who the caller says it spends for, trimmed, at most
    /// [`MAX_CONSUMER_BYTES`]. A claim only: the consumer room decides what it counts as.
    pub consumer: Option<Arc<str>>,
    /// `Sluice-Priority`: the lane the caller asked for (else its consumer's, else `normal`).
    pub priority: Option<Lane>,
}

impl Default for RequestControls {
    fn default() -> Self {
        Self { deadline: None, max_wait: None, batch: true, consumer: None, priority: None }
    }
}

/// A control header that does not say what it must.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{header}: {problem}")]
pub struct ControlError {
    /// The header as clients spell it (`Sluice-Deadline`).
    pub header: &'static str,
    pub problem: &'static str,
}

impl RequestControls {
    /// Reads the three headers of `headers`; `now` is when the deadline starts counting.
    pub fn parse(headers: &HeaderMap, now: Instant) -> Result<Self, ControlError> {
        let mut controls = Self::default();
        if let Some(text) = single(headers, DEADLINE_HEADER, "Sluice-Deadline")? {
            let asked = duration("Sluice-Deadline", text)?;
            // With the clamp this cannot overflow; should the clock be that close to its end,
            // the request is simply not bounded by the caller.
            controls.deadline = now.checked_add(asked);
        }
        if let Some(text) = single(headers, MAX_WAIT_HEADER, "Sluice-Max-Wait")? {
            controls.max_wait = Some(duration("Sluice-Max-Wait", text)?);
        }
        if let Some(text) = single(headers, BATCH_HEADER, "Sluice-Batch")? {
            controls.batch = match text.to_ascii_lowercase().as_str() {
                "off" | "false" | "0" | "no" => false,
                "on" | "true" | "1" | "yes" => true,
                _ => return Err(ControlError { header: "Sluice-Batch", problem: "expected off or on" }),
            };
        }
        controls.consumer = consumer(headers)?;
        if let Some(text) = single(headers, PRIORITY_HEADER, "Sluice-Priority")? {
            controls.priority = Some(
                Lane::parse(text)
                    .ok_or(ControlError { header: "Sluice-Priority", problem: "expected high, normal or low" })?,
            );
        }
        Ok(controls)
    }

    /// Narrows the allowed wait to at most `left` (Retry: an attempt never queues past the
    /// request's deadline). Never lengthens it.
    pub fn narrow_wait(&mut self, left: Duration) {
        self.max_wait = Some(self.max_wait.map_or(left, |asked| asked.min(left)));
    }
}

/// The one value of `name`, trimmed; more than one is refused (which would win is anyone's guess).
fn single<'a>(headers: &'a HeaderMap, name: &str, shown: &'static str) -> Result<Option<&'a str>, ControlError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(ControlError { header: shown, problem: "given more than once" });
    }
    let text = value.to_str().map_err(|_| ControlError { header: shown, problem: "not visible ASCII" })?.trim();
    if text.is_empty() {
        return Err(ControlError { header: shown, problem: "empty" });
    }
    Ok(Some(text))
}

/// `Sluice-Consumer`: text, at most once; empty is absent; cut to [`MAX_CONSUMER_BYTES`].
fn consumer(headers: &HeaderMap) -> Result<Option<Arc<str>>, ControlError> {
    const SHOWN: &str = "Sluice-Consumer";
    let mut values = headers.get_all(CONSUMER_HEADER).iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(ControlError { header: SHOWN, problem: "given more than once" });
    }
    let text = value.to_str().map_err(|_| ControlError { header: SHOWN, problem: "not visible ASCII" })?.trim();
    if text.is_empty() {
        return Ok(None);
    }
    // ASCII, so any byte index is a char boundary.
    Ok(Some(Arc::from(&text[..text.len().min(MAX_CONSUMER_BYTES)])))
}

/// Seconds (`2`, `0.5`, `1e3`) or a humantime duration (`2s`, `250ms`, `1h 30m`), clamped to
/// [`MAX_CONTROL`]. Negative, infinite and NaN seconds, and anything else, are refused.
fn duration(header: &'static str, text: &str) -> Result<Duration, ControlError> {
    // Only strings that look like a number take the number path, so `inf` and `nan` (which
    // Rust's float parser accepts) are refused instead of read as seconds.
    let numeric = text.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'));
    if numeric {
        let seconds: f64 = text.parse().map_err(|_| ControlError { header, problem: "not a number of seconds" })?;
        if !seconds.is_finite() || seconds < 0.0 {
            return Err(ControlError { header, problem: "seconds must be a finite number, at least 0" });
        }
        // Clamped before the conversion: `from_secs_f64` panics past u64::MAX seconds.
        return Ok(Duration::from_secs_f64(seconds.min(MAX_CONTROL.as_secs_f64())));
    }
    let parsed = humantime::parse_duration(text)
        .map_err(|_| ControlError { header, problem: "not a duration (use seconds, or e.g. 2s, 250ms)" })?;
    Ok(parsed.min(MAX_CONTROL))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&'static str, &str)]) -> Result<RequestControls, ControlError> {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, value.parse().unwrap());
        }
        RequestControls::parse(&headers, Instant::now())
    }

    #[test]
    fn nothing_asked_is_the_default() {
        assert_eq!(parse(&[]).unwrap(), RequestControls::default());
        assert!(RequestControls::default().batch);
    }

    #[test]
    fn seconds_and_humantime() {
        let now = Instant::now();
        let mut headers = HeaderMap::new();
        headers.insert(DEADLINE_HEADER, "1.5".parse().unwrap());
        headers.insert(MAX_WAIT_HEADER, "250ms".parse().unwrap());
        let controls = RequestControls::parse(&headers, now).unwrap();
        assert_eq!(controls.deadline, Some(now + Duration::from_millis(1500)));
        assert_eq!(controls.max_wait, Some(Duration::from_millis(250)));
        assert_eq!(parse(&[(MAX_WAIT_HEADER, " 0 ")]).unwrap().max_wait, Some(Duration::ZERO));
        assert_eq!(parse(&[(MAX_WAIT_HEADER, "1h 30m")]).unwrap().max_wait, Some(Duration::from_secs(5400)));
    }

    /// The inputs that panicked the connection task (security review M2) are clamped.
    #[test]
    fn huge_values_are_clamped_not_panics() {
        let now = Instant::now();
        for huge in ["18446744073709551615s", "18446744073709551615", "1e20", "1e308", "99999999h", "5000000w"] {
            let mut headers = HeaderMap::new();
            headers.insert(DEADLINE_HEADER, huge.parse().unwrap());
            headers.insert(MAX_WAIT_HEADER, huge.parse().unwrap());
            let controls = RequestControls::parse(&headers, now).unwrap();
            assert_eq!(controls.max_wait, Some(MAX_CONTROL), "{huge}");
            assert_eq!(controls.deadline, Some(now + MAX_CONTROL), "{huge}");
        }
    }

    #[test]
    fn garbage_names_the_header() {
        let cases = [
            (DEADLINE_HEADER, "soon", "Sluice-Deadline"),
            (DEADLINE_HEADER, "-1", "Sluice-Deadline"),
            (DEADLINE_HEADER, "", "Sluice-Deadline"),
            (MAX_WAIT_HEADER, "inf", "Sluice-Max-Wait"),
            (MAX_WAIT_HEADER, "NaN", "Sluice-Max-Wait"),
            (MAX_WAIT_HEADER, "1e400", "Sluice-Max-Wait"),
            (MAX_WAIT_HEADER, "2 s x", "Sluice-Max-Wait"),
            (MAX_WAIT_HEADER, "1.2.3", "Sluice-Max-Wait"),
            (MAX_WAIT_HEADER, "999999999999999999999999s", "Sluice-Max-Wait"),
            (BATCH_HEADER, "maybe", "Sluice-Batch"),
            (PRIORITY_HEADER, "urgent", "Sluice-Priority"),
            (PRIORITY_HEADER, "", "Sluice-Priority"),
        ];
        for (name, value, shown) in cases {
            let error = parse(&[(name, value)]).unwrap_err();
            assert_eq!(error.header, shown, "{name}: {value:?}");
            assert!(error.to_string().starts_with(shown), "{error}");
        }
        let error = parse(&[(DEADLINE_HEADER, "1"), (DEADLINE_HEADER, "2")]).unwrap_err();
        assert_eq!(error.problem, "given more than once");
        let mut headers = HeaderMap::new();
        headers.insert(MAX_WAIT_HEADER, http::HeaderValue::from_bytes(b"2\xffs").unwrap());
        assert_eq!(RequestControls::parse(&headers, Instant::now()).unwrap_err().header, "Sluice-Max-Wait");
    }

    #[test]
    fn batch_opt_out_words() {
        for off in ["off", "OFF", "false", "0", "no", " No "] {
            assert!(!parse(&[(BATCH_HEADER, off)]).unwrap().batch, "{off}");
        }
        for on in ["on", "true", "1", "yes"] {
            assert!(parse(&[(BATCH_HEADER, on)]).unwrap().batch, "{on}");
        }
    }

    #[test]
    fn a_consumer_is_any_text_once() {
        assert_eq!(parse(&[(CONSUMER_HEADER, " billing ")]).unwrap().consumer.as_deref(), Some("billing"));
        assert_eq!(parse(&[(CONSUMER_HEADER, "")]).unwrap().consumer, None, "empty is absent");
        assert_eq!(parse(&[(CONSUMER_HEADER, "   ")]).unwrap().consumer, None);
        assert_eq!(
            parse(&[(CONSUMER_HEADER, "not a {known} name")]).unwrap().consumer.as_deref(),
            Some("not a {known} name")
        );
        let long = "x".repeat(5000);
        assert_eq!(parse(&[(CONSUMER_HEADER, &long)]).unwrap().consumer.unwrap().len(), MAX_CONSUMER_BYTES);
        let error = parse(&[(CONSUMER_HEADER, "a"), (CONSUMER_HEADER, "b")]).unwrap_err();
        assert_eq!((error.header, error.problem), ("Sluice-Consumer", "given more than once"));
        let mut headers = HeaderMap::new();
        headers.insert(CONSUMER_HEADER, http::HeaderValue::from_bytes(b"bill\xffing").unwrap());
        assert_eq!(RequestControls::parse(&headers, Instant::now()).unwrap_err().header, "Sluice-Consumer");
    }

    #[test]
    fn priority_lanes() {
        assert_eq!(parse(&[(PRIORITY_HEADER, "high")]).unwrap().priority, Some(Lane::High));
        assert_eq!(parse(&[(PRIORITY_HEADER, " LOW ")]).unwrap().priority, Some(Lane::Low));
        assert_eq!(parse(&[(PRIORITY_HEADER, "normal")]).unwrap().priority, Some(Lane::Normal));
        assert_eq!(parse(&[]).unwrap().priority, None);
    }

    #[test]
    fn narrowing_never_lengthens() {
        let mut controls = RequestControls::default();
        controls.narrow_wait(Duration::from_secs(3));
        assert_eq!(controls.max_wait, Some(Duration::from_secs(3)));
        controls.narrow_wait(Duration::from_secs(5));
        assert_eq!(controls.max_wait, Some(Duration::from_secs(3)));
        controls.narrow_wait(Duration::from_millis(10));
        assert_eq!(controls.max_wait, Some(Duration::from_millis(10)));
    }
}
