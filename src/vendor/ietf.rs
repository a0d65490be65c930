//! The IETF httpapi RateLimit fields (draft-ietf-httpapi-ratelimit-headers), all three shapes
//! still seen in the wild:
//! - `-08` and later: `RateLimit-Policy: "burst";q=100;w=60` and `RateLimit: "burst";r=50;t=30`
//!   (RFC 9651 Lists of named Items, joined by name);
//! - `-07`: one Dictionary `RateLimit: limit=100, remaining=50, reset=5` (Close uses it);
//! - `-06` and earlier: `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (seconds).
//!
//! Malformed fields are ignored, as the draft requires.

use std::time::Duration;

use sfv::{BareItem, Dictionary, List, ListEntry, Parser};

use super::{header_u64, Observation, Response, Throttle, ThrottleClass, VendorWindow};

pub fn parse(response: &Response<'_>) -> Observation {
    let mut observation = Observation::default();
    let headers = response.headers;
    let joined = |name: &str| -> Option<String> {
        let values: Vec<&str> = headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
        (!values.is_empty()).then(|| values.join(", "))
    };
    let policy_text = joined("ratelimit-policy");
    let limit_text = joined("ratelimit");

    if let Some(text) = &limit_text {
        if let Ok(list) = Parser::new(text).parse::<List>() {
            let named = list
                .iter()
                .any(|entry| matches!(entry, ListEntry::Item(item) if matches!(item.bare_item, BareItem::String(_))));
            if named {
                observation.windows = named_windows(&list, policy_text.as_deref(), &mut observation.malformed);
            }
        }
        if observation.windows.is_empty() {
            match Parser::new(text).parse::<Dictionary>() {
                Ok(dictionary) if dictionary.contains_key("remaining") || dictionary.contains_key("limit") => {
                    let int = |key: &str| match dictionary.get(key) {
                        Some(ListEntry::Item(item)) => match item.bare_item {
                            BareItem::Integer(value) => u64::try_from(i64::from(value)).ok(),
                            _ => None,
                        },
                        _ => None,
                    };
                    let window = policy_text.as_deref().and_then(draft07_window);
                    observation.windows.push(VendorWindow {
                        name: "default".into(),
                        limit: int("limit"),
                        remaining: int("remaining"),
                        reset_in: int("reset").map(|s| Duration::from_secs(s.min(super::MAX_PAUSE_SECS))),
                        window,
                    });
                }
                _ => observation.malformed += 1,
            }
        }
    }

    if observation.windows.is_empty() {
        let bad = &mut observation.malformed;
        let limit = header_u64(headers, "ratelimit-limit", bad);
        let remaining = header_u64(headers, "ratelimit-remaining", bad);
        let reset = header_u64(headers, "ratelimit-reset", bad);
        if limit.is_some() || remaining.is_some() {
            let window = policy_text.as_deref().and_then(draft07_window);
            observation.windows.push(VendorWindow {
                name: "default".into(),
                limit,
                remaining,
                reset_in: reset.map(|s| Duration::from_secs(s.min(super::MAX_PAUSE_SECS))),
                window,
            });
        }
    }

    if response.status == http::StatusCode::TOO_MANY_REQUESTS {
        let exhausted = observation.windows.iter().filter(|w| w.remaining == Some(0)).filter_map(|w| w.reset_in).max();
        observation.throttle = Some(Throttle { class: ThrottleClass::Burst, pause: exhausted });
    }
    observation
}

/// `-08+` Lists: policies give q and w; service limits give r and t; joined by name.
fn named_windows(limits: &List, policy_text: Option<&str>, malformed: &mut u32) -> Vec<VendorWindow> {
    let mut windows: Vec<VendorWindow> = Vec::new();
    if let Some(text) = policy_text {
        match Parser::new(text).parse::<List>() {
            Ok(policies) => {
                for entry in &policies {
                    let ListEntry::Item(item) = entry else { continue };
                    let BareItem::String(name) = &item.bare_item else { continue };
                    windows.push(VendorWindow {
                        name: name.as_str().to_owned(),
                        limit: param(&item.params, "q"),
                        window: param(&item.params, "w").map(Duration::from_secs),
                        ..VendorWindow::default()
                    });
                }
            }
            Err(_) => *malformed += 1,
        }
    }
    for entry in limits {
        let ListEntry::Item(item) = entry else { continue };
        let BareItem::String(name) = &item.bare_item else { continue };
        let name = name.as_str();
        let remaining = param(&item.params, "r");
        let reset_in = param(&item.params, "t").map(|s| Duration::from_secs(s.min(super::MAX_PAUSE_SECS)));
        if remaining.is_none() {
            *malformed += 1;
            continue;
        }
        match windows.iter_mut().find(|window| window.name == name) {
            Some(window) => {
                window.remaining = remaining;
                window.reset_in = reset_in;
            }
            None => {
                windows.push(VendorWindow { name: name.to_owned(), remaining, reset_in, ..VendorWindow::default() })
            }
        }
    }
    windows.retain(|window| window.remaining.is_some() || window.limit.is_some());
    windows
}

fn param(params: &sfv::Parameters, key: &str) -> Option<u64> {
    match params.get(key)? {
        BareItem::Integer(value) => u64::try_from(i64::from(*value)).ok(),
        _ => None,
    }
}

/// `RateLimit-Policy: 100;w=10` (draft -06/-07): the window of the first policy.
fn draft07_window(text: &str) -> Option<Duration> {
    let list = Parser::new(text).parse::<List>().ok()?;
    list.iter().find_map(|entry| match entry {
        ListEntry::Item(item) => param(&item.params, "w").map(Duration::from_secs),
        ListEntry::InnerList(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn observe(status: u16, pairs: &[(&str, &str)]) -> Observation {
        let mut headers = http::HeaderMap::new();
        for (name, value) in pairs {
            headers.append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        }
        parse(&Response {
            status: http::StatusCode::from_u16(status).unwrap(),
            headers: &headers,
            body: None,
            now: SystemTime::now(),
        })
    }

    #[test]
    fn draft_10_named_lists() {
        let observation = observe(
            200,
            &[
                ("ratelimit-policy", r#""burst";q=100;w=60,"daily";q=1000;w=86400"#),
                ("ratelimit", r#""burst";r=50;t=30"#),
                ("ratelimit", r#""daily";r=900;t=3600"#),
            ],
        );
        assert_eq!(observation.malformed, 0);
        assert_eq!(observation.windows.len(), 2);
        assert_eq!(
            observation.windows[0],
            VendorWindow {
                name: "burst".into(),
                limit: Some(100),
                remaining: Some(50),
                reset_in: Some(Duration::from_secs(30)),
                window: Some(Duration::from_secs(60)),
            }
        );
    }

    #[test]
    fn draft_07_dictionary_and_06_triple() {
        let observation =
            observe(200, &[("ratelimit", "limit=100, remaining=0, reset=5"), ("ratelimit-policy", "100;w=10")]);
        assert_eq!(observation.windows[0].remaining, Some(0));
        assert_eq!(observation.windows[0].window, Some(Duration::from_secs(10)));
        let observation =
            observe(429, &[("ratelimit-limit", "10"), ("ratelimit-remaining", "0"), ("ratelimit-reset", "7")]);
        assert_eq!(observation.throttle.unwrap().pause, Some(Duration::from_secs(7)));
    }

    #[test]
    fn garbage_is_ignored() {
        let observation = observe(200, &[("ratelimit", "((((")]);
        assert!(observation.windows.is_empty());
        assert_eq!(observation.malformed, 1);
    }
}
