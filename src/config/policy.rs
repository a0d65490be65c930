//! Validated rate-limit policy: quotas, their scopes, route costs, and how the vendor's own
//! rate-limit headers are read.
//!
//! Kept apart from `validate` because the limiter reads these types on every request: they are
//! shaped for that (header names pre-parsed, path patterns pre-split), not for the YAML.

use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::Method;

use super::file::{LaneFile, LanesFile, LimitHeadersFile, QuotaFile, RouteFile};
use super::kinds::{Lane, OverLimit, ShapeKind, WindowKind};
use super::Problem;
use crate::vendor::{ProfileKind, ResetUnit};

/// One vendor quota, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    pub name: Arc<str>,
    pub limit: u64,
    pub per: Duration,
    /// `shape: smooth` only: requests allowed back to back.
    pub burst: u64,
    pub margin: Duration,
    pub window: Window,
    pub scope: Vec<ScopeKey>,
    pub max_keys: usize,
    /// The trailing window the spend rate is measured over, for the exhaustion forecast.
    pub forecast_window: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Window {
    /// The vendor's rolling window: a full burst of `limit`, then a slot per admission that leaves.
    Rolling,
    /// Rolling, paced with GCRA (`shape: smooth`): `burst` at once, then evenly spaced.
    Smooth,
    /// Fixed windows of `per`, aligned to `resets_at` when given, else to the Unix epoch.
    Fixed { resets_at: Option<ResetsAt> },
}

/// `"HH:MM Area/City"`: the daily instant a fixed window resets, in the vendor account's zone.
#[derive(Debug, Clone)]
pub struct ResetsAt {
    pub hour: i8,
    pub minute: i8,
    pub zone_name: String,
    pub zone: jiff::tz::TimeZone,
}

impl PartialEq for ResetsAt {
    fn eq(&self, other: &Self) -> bool {
        (self.hour, self.minute, &self.zone_name) == (other.hour, other.minute, &other.zone_name)
    }
}
impl Eq for ResetsAt {}

/// What a quota is scoped by; each distinct combination of values is its own bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeKey {
    Header(HeaderName),
    ClientIp,
    ProxyUser,
    /// A hash of the credential in this header, as sent upstream (after injection).
    Credential(HeaderName),
}

impl ScopeKey {
    /// The request header this scope reads, if any. A bulk call keeps it, so the call is
    /// charged to its callers' bucket. `proxy_user` without `clients:` reads the header itself.
    pub fn header(&self) -> Option<HeaderName> {
        match self {
            ScopeKey::Header(name) | ScopeKey::Credential(name) => Some(name.clone()),
            ScopeKey::ProxyUser => Some(http::header::PROXY_AUTHORIZATION),
            ScopeKey::ClientIp => None,
        }
    }

    /// Whether the scope reads the client's address: calls from different addresses are then
    /// different buckets and never share a bulk call.
    pub fn reads_peer(&self) -> bool {
        matches!(self, ScopeKey::ClientIp)
    }
}

/// A route's token cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteCost {
    pub method: Option<Method>,
    pub path: PathPattern,
    pub cost: u64,
}

/// `/crm/v3/objects/{object}/batch/*`: literal segments, one-segment wildcards (`{name}`, `*`),
/// and an optional trailing `**` for any rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    pub segments: Vec<Segment>,
    pub rest: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    Capture(Option<String>),
}

impl PathPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        if !text.starts_with('/') {
            return Err(format!("path `{text}` must start with /"));
        }
        let mut segments = Vec::new();
        let mut rest = false;
        let parts: Vec<&str> = text[1..].split('/').collect();
        for (at, part) in parts.iter().enumerate() {
            if *part == "**" {
                if at + 1 != parts.len() {
                    return Err("`**` may only end a path".into());
                }
                rest = true;
            } else if *part == "*" {
                segments.push(Segment::Capture(None));
            } else if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                if name.is_empty() {
                    return Err("`{}` needs a name".into());
                }
                segments.push(Segment::Capture(Some(name.to_owned())));
            } else {
                segments.push(Segment::Literal((*part).to_owned()));
            }
        }
        Ok(Self { segments, rest })
    }

    /// The captured values when `path` matches, in order of the captures.
    pub fn captures<'p>(&self, path: &'p str) -> Option<Vec<(&str, &'p str)>> {
        let path = path.split('?').next().unwrap_or(path);
        let mut parts = path.strip_prefix('/')?.split('/');
        let mut captured = Vec::new();
        for segment in &self.segments {
            let part = parts.next()?;
            match segment {
                Segment::Literal(literal) if literal == part => {}
                Segment::Literal(_) => return None,
                Segment::Capture(_) if part.is_empty() => return None,
                Segment::Capture(name) => captured.push((name.as_deref().unwrap_or("*"), part)),
            }
        }
        match parts.next() {
            None => Some(captured),
            Some(_) if self.rest => Some(captured),
            Some("") if !self.rest && parts.next().is_none() => Some(captured),
            Some(_) => None,
        }
    }
}

/// `METHOD /path` (method `*` or omitted: any).
pub fn parse_route_match(text: &str) -> Result<(Option<Method>, PathPattern), String> {
    let text = text.trim();
    let (method, path) = match text.split_once(' ') {
        Some((method, path)) => (Some(method), path.trim()),
        None => (None, text),
    };
    let method = match method {
        None | Some("*") => None,
        Some(name) => Some(Method::from_bytes(name.as_bytes()).map_err(|_| format!("`{name}` is not a method"))?),
    };
    Ok((method, PathPattern::parse(path)?))
}

/// Per-upstream limiting settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub quotas: Vec<Quota>,
    pub over_limit: OverLimit,
    pub max_queue_wait: Duration,
    pub max_concurrency: Option<usize>,
    pub routes: Vec<RouteCost>,
    /// `lanes:`: what the `normal` and `low` lanes may take of any window of each quota.
    pub lanes: LaneCaps,
}

/// `lanes:` validated: each lane's `max_share`, in millionths (so the limits stay `Eq`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaneCaps {
    pub normal: Option<u32>,
    pub low: Option<u32>,
}

impl LaneCaps {
    /// The cap of `lane` on a quota of `limit`: at least 1 token, at most `limit`.
    pub fn cap(&self, lane: Lane, limit: u64) -> Option<u64> {
        let share = match lane {
            Lane::High => None,
            Lane::Normal => self.normal,
            Lane::Low => self.low,
        }?;
        let capped = u128::from(limit) * u128::from(share) / 1_000_000;
        Some(u64::try_from(capped).unwrap_or(limit).clamp(1, limit))
    }
}

pub(super) fn validate_lanes(raw: &LanesFile, key: &str, problems: &mut Vec<Problem>) -> LaneCaps {
    let mut share = |lane: Option<LaneFile>, name: &str| {
        let lane = lane?;
        if !(lane.max_share > 0.0 && lane.max_share <= 1.0) {
            problems.push(Problem::new(format!("{key}.lanes.{name}.max_share"), "must be above 0 and at most 1"));
            return None;
        }
        Some((lane.max_share * 1_000_000.0).round() as u32)
    };
    LaneCaps { normal: share(raw.normal, "normal"), low: share(raw.low, "low") }
}

impl Limits {
    /// Tokens a request takes: the first matching route's cost, else 1. Routes are matched on
    /// the [normalised](normalise_path) path, so a costly call spelt another way costs the same.
    pub fn cost(&self, method: &Method, path: &str) -> u64 {
        if self.routes.is_empty() {
            return 1;
        }
        let path = normalise_path(path);
        self.routes
            .iter()
            .find(|route| route.method.as_ref().is_none_or(|m| m == method) && route.path.captures(&path).is_some())
            .map_or(1, |route| route.cost)
    }
}

/// A request path as a vendor's router would read it, for route-cost matching: the query is
/// dropped, and then each segment loses its `;params`, has its percent-encoded unreserved
/// characters decoded (RFC 3986 §6.2.2.2) and is lower-cased; empty and `.` segments are
/// dropped and `..` removes the one before (§5.2.4).
///
/// Case is folded for every vendor profile. Salesforce, HubSpot and Dynamics route paths without
/// regard to case; for a vendor that does not, a case variant of a costly route is a path it
/// does not serve, and charging that refused call the route's cost loses nothing. Route
/// patterns are normalised the same way when the config is loaded.
pub fn normalise_path(path: &str) -> String {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let mut segments: Vec<String> = Vec::new();
    for raw in path.split('/') {
        let raw = raw.split(';').next().unwrap_or("");
        let segment = decode_unreserved(raw).to_ascii_lowercase();
        match segment.as_str() {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(segment),
        }
    }
    format!("/{}", segments.join("/"))
}

/// Decodes `%XX` escapes of unreserved characters (letters, digits, `-`, `.`, `_`, `~`); other
/// escapes, and `%` not followed by two hex digits, stay as they are.
fn decode_unreserved(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = String::with_capacity(segment.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' && at + 2 < bytes.len() {
            let hex = |b: u8| char::from(b).to_digit(16);
            if let (Some(high), Some(low)) = (hex(bytes[at + 1]), hex(bytes[at + 2])) {
                let decoded = u8::try_from(high * 16 + low).unwrap_or(0);
                if decoded.is_ascii_alphanumeric() || matches!(decoded, b'-' | b'.' | b'_' | b'~') {
                    out.push(char::from(decoded));
                    at += 3;
                    continue;
                }
            }
        }
        // `at` is always at a char boundary: escapes are ASCII, and other chars are taken whole.
        let width = segment[at..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&segment[at..at + width]);
        at += width;
    }
    out
}

pub(super) fn validate_quota(raw: &QuotaFile, key: &str, problems: &mut Vec<Problem>) -> Option<Quota> {
    let before = problems.len();
    super::check_name(&raw.name, &format!("{key}.name"), problems);
    if raw.limit == 0 || raw.limit > 1_000_000_000_000 {
        problems.push(Problem::new(format!("{key}.limit"), "must be between 1 and 10^12"));
    }
    if raw.per < Duration::from_millis(100) || raw.per > Duration::from_secs(366 * 86_400) {
        problems.push(Problem::new(format!("{key}.per"), "must be between 100ms and 366d"));
    }
    let mut scope = Vec::new();
    for (at, text) in raw.key.iter().enumerate() {
        match parse_scope(text) {
            Ok(scope_key) => scope.push(scope_key),
            Err(message) => problems.push(Problem::new(format!("{key}.key[{at}]"), message)),
        }
    }
    if raw.max_keys == 0 {
        problems.push(Problem::new(format!("{key}.max_keys"), "must be at least 1"));
    }
    let window = match raw.window {
        WindowKind::Rolling => {
            if raw.resets_at.is_some() {
                problems.push(Problem::new(format!("{key}.resets_at"), "only for `window: fixed`"));
            }
            // `burst` without a shape keeps the pacing it asked for before `shape` existed.
            match raw.shape {
                Some(ShapeKind::Smooth) => Window::Smooth,
                None if raw.burst.is_some() => Window::Smooth,
                Some(ShapeKind::Burst) | None => {
                    if raw.burst.is_some() {
                        problems.push(Problem::new(
                            format!("{key}.burst"),
                            "only with `shape: smooth` (`shape: burst` admits all of `limit` back to back)",
                        ));
                    }
                    Window::Rolling
                }
            }
        }
        WindowKind::Fixed => {
            let resets_at = match raw.resets_at.as_deref().map(parse_resets_at) {
                None => None,
                Some(Ok(resets_at)) => Some(resets_at),
                Some(Err(message)) => {
                    problems.push(Problem::new(format!("{key}.resets_at"), message));
                    None
                }
            };
            if raw.resets_at.is_some() && raw.per.as_secs() % 86_400 != 0
                || raw.per.subsec_nanos() != 0 && raw.resets_at.is_some()
            {
                problems.push(Problem::new(format!("{key}.per"), "with resets_at, must be a whole number of days"));
            }
            if raw.burst.is_some() {
                problems.push(Problem::new(format!("{key}.burst"), "only for rolling windows"));
            }
            if raw.shape.is_some() {
                problems.push(Problem::new(format!("{key}.shape"), "only for rolling windows"));
            }
            Window::Fixed { resets_at }
        }
    };
    let burst = match window {
        Window::Smooth => raw.burst.unwrap_or_else(|| (raw.limit / 20).max(1)),
        // A full burst: what the vendor's rolling window accepts.
        _ => raw.limit,
    };
    if window == Window::Smooth && (burst == 0 || burst > raw.limit) {
        problems.push(Problem::new(format!("{key}.burst"), "must be between 1 and limit"));
    }
    let margin = raw.margin.unwrap_or_else(|| (raw.per / 100).min(Duration::from_millis(250)));
    if margin > raw.per {
        problems.push(Problem::new(format!("{key}.margin"), "must not exceed per"));
    }
    let forecast_window =
        raw.forecast_window.unwrap_or_else(|| (raw.per / 24).clamp(Duration::from_secs(10), Duration::from_secs(3600)));
    if !(Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&forecast_window) {
        problems.push(Problem::new(format!("{key}.forecast_window"), "must be between 1s and 1d"));
    }
    if problems.len() > before {
        return None;
    }
    Some(Quota {
        name: Arc::from(raw.name.as_str()),
        limit: raw.limit,
        per: raw.per,
        burst,
        margin,
        window,
        scope,
        max_keys: raw.max_keys,
        forecast_window,
    })
}

fn parse_scope(text: &str) -> Result<ScopeKey, String> {
    match text.trim() {
        "client_ip" => Ok(ScopeKey::ClientIp),
        "proxy_user" => Ok(ScopeKey::ProxyUser),
        "credential" => Ok(ScopeKey::Credential(http::header::AUTHORIZATION)),
        other => match other.strip_prefix("header:") {
            Some(name) => HeaderName::from_bytes(name.trim().as_bytes())
                .map(ScopeKey::Header)
                .map_err(|_| format!("`{name}` is not a header name")),
            None => Err(format!("`{other}` is not a scope (header:NAME, client_ip, proxy_user, credential)")),
        },
    }
}

fn parse_resets_at(text: &str) -> Result<ResetsAt, String> {
    let usage = || format!("`{text}` must look like \"00:00 America/New_York\"");
    let (time, zone_name) = text.trim().split_once(' ').ok_or_else(usage)?;
    let (hour, minute) = time.split_once(':').ok_or_else(usage)?;
    let hour: i8 = hour.parse().map_err(|_| usage())?;
    let minute: i8 = minute.parse().map_err(|_| usage())?;
    if !(0..24).contains(&hour) || !(0..60).contains(&minute) {
        return Err(usage());
    }
    let zone_name = zone_name.trim().to_owned();
    let zone =
        jiff::tz::TimeZone::get(&zone_name).map_err(|error| format!("unknown time zone `{zone_name}`: {error}"))?;
    Ok(ResetsAt { hour, minute, zone_name, zone })
}

pub(super) fn validate_routes(raw: &[RouteFile], key: &str, problems: &mut Vec<Problem>) -> Vec<RouteCost> {
    let mut routes = Vec::new();
    for (at, route) in raw.iter().enumerate() {
        // Costs are matched on normalised request paths, so the pattern is normalised too.
        let parsed = parse_route_match(&route.matches).and_then(|(method, _)| {
            let text = route.matches.trim();
            let path = text.split_once(' ').map_or(text, |(_, path)| path.trim());
            Ok((method, PathPattern::parse(&normalise_path(path))?))
        });
        match parsed {
            Ok((method, path)) => {
                if route.cost == 0 {
                    problems.push(Problem::new(format!("{key}.routes[{at}].cost"), "must be at least 1"));
                }
                routes.push(RouteCost { method, path, cost: route.cost });
            }
            Err(message) => problems.push(Problem::new(format!("{key}.routes[{at}].match"), message)),
        }
    }
    routes
}

/// How an upstream's responses are read for quota information (`limit_headers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feedback {
    pub profile: ProfileKind,
    pub reset: ResetUnit,
    pub pause_at_remaining: u64,
}

pub(super) fn feedback_of(raw: &LimitHeadersFile) -> Feedback {
    match raw {
        LimitHeadersFile::Profile(profile) => {
            Feedback { profile: *profile, reset: ResetUnit::default(), pause_at_remaining: 0 }
        }
        LimitHeadersFile::Detailed(detail) => {
            Feedback { profile: detail.profile, reset: detail.reset, pause_at_remaining: detail.pause_at_remaining }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_patterns_capture() {
        let pattern = PathPattern::parse("/crm/v3/objects/{object}").unwrap();
        assert_eq!(pattern.captures("/crm/v3/objects/contacts"), Some(vec![("object", "contacts")]));
        assert_eq!(pattern.captures("/crm/v3/objects/contacts/batch/create"), None);
        assert_eq!(pattern.captures("/crm/v3/objects"), None);
        let rest = PathPattern::parse("/services/**").unwrap();
        assert!(rest.captures("/services/data/v62.0/sobjects").is_some());
    }

    fn costs(routes: &[(&str, u64)]) -> Limits {
        let raw: Vec<RouteFile> =
            routes.iter().map(|(matches, cost)| RouteFile { matches: (*matches).to_owned(), cost: *cost }).collect();
        let mut problems = Vec::new();
        let routes = validate_routes(&raw, "upstreams[0]", &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        Limits {
            quotas: Vec::new(),
            over_limit: OverLimit::Queue,
            max_queue_wait: Duration::from_secs(1),
            max_concurrency: None,
            routes,
            lanes: LaneCaps::default(),
        }
    }

    #[test]
    fn route_costs_see_the_normalised_path() {
        let limits = costs(&[("POST /crm/v3/objects/{object}/search", 5), ("GET /services/data/*/query", 3)]);
        let post = Method::POST;
        for path in [
            "/crm/v3/objects/contacts/search",
            "/crm/v3/objects/contacts//search",
            "//crm/v3/objects/contacts/search/",
            "/crm/v3/objects/contacts/%73earch",
            "/crm/v3/objects/contacts/%73%65%61%72%63%68",
            "/crm/v3/objects/Contacts/Search",
            "/CRM/V3/OBJECTS/contacts/search",
            "/crm/v3/objects/contacts/search;x",
            "/crm/v3/objects/contacts/search;jsessionid=1/",
            "/crm/v3/objects/contacts/./search",
            "/crm/v3/objects/contacts/x/../search",
            "/crm/v3/objects/contacts/x/%2E%2E/search",
            "/crm/v3/objects/contacts/search?limit=1",
        ] {
            assert_eq!(limits.cost(&post, path), 5, "{path}");
        }
        assert_eq!(limits.cost(&post, "/crm/v3/objects/contacts"), 1);
        assert_eq!(limits.cost(&post, "/crm/v3/objects/contacts/search%2Fx"), 1, "an encoded slash is not a separator");
        assert_eq!(limits.cost(&Method::GET, "/crm/v3/objects/contacts/search"), 1, "method still matters");
        assert_eq!(limits.cost(&Method::GET, "/services/data/v62.0/QUERY"), 3);
        assert_eq!(limits.cost(&Method::GET, "/services/data/v62.0/query/%"), 1, "a stray % is kept, not decoded");
    }

    #[test]
    fn patterns_are_normalised_like_paths() {
        let limits = costs(&[("POST /CRM/v3//objects/Contacts/%73earch/", 7)]);
        assert_eq!(limits.cost(&Method::POST, "/crm/v3/objects/contacts/search"), 7);
        assert_eq!(normalise_path(""), "/");
        assert_eq!(normalise_path("/../.."), "/");
        assert_eq!(normalise_path("/a/%7e%5F%2d/é"), "/a/~_-/é");
        assert_eq!(normalise_path("/a%2fb/%zz/%4"), "/a%2fb/%zz/%4");
    }

    #[test]
    fn resets_at_parses_zone() {
        let parsed = parse_resets_at("00:00 America/New_York").unwrap();
        assert_eq!((parsed.hour, parsed.minute), (0, 0));
        assert!(parse_resets_at("25:00 UTC").is_err());
        assert!(parse_resets_at("00:00 Mars/Base").is_err());
    }
}
