//! `batch:` rules, validated for their shape: the single call a rule matches and the bulk call
//! it folds into. What a bulk format is (its bulk calls, its cap on items) is the batch room's
//! knowledge, not config's: config keeps the format's name, and `batch::check` holds each rule
//! to its format when a generation is built.

use std::time::Duration;

use http::Method;

use super::file::BatchFile;
use super::policy::{parse_route_match, PathPattern, Segment};
use super::Problem;

/// A batch rule, its shape validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRule {
    pub method: Method,
    pub path: PathPattern,
    pub bulk_method: Method,
    /// The bulk path template, `{name}` filled from the single call's captures.
    pub bulk_path: String,
    /// The bulk format's name (`format:`), as the batch room knows it.
    pub format: String,
    pub max_items: usize,
    pub max_delay: Duration,
}

impl BatchRule {
    /// The names the single call's path captures (`{object}`, `{id}`).
    pub fn captures(&self) -> impl Iterator<Item = &str> {
        self.path.segments.iter().filter_map(|segment| match segment {
            Segment::Capture(Some(name)) => Some(name.as_str()),
            _ => None,
        })
    }
}

pub(super) fn validate_batch(raw: &[BatchFile], key: &str, problems: &mut Vec<Problem>) -> Vec<BatchRule> {
    let mut rules = Vec::new();
    for (at, rule) in raw.iter().enumerate() {
        let key = format!("{key}[{at}]");
        let parsed = parse_route_match(&rule.matches).map_err(|m| (format!("{key}.match"), m)).and_then(|single| {
            parse_route_match(&rule.bulk).map(|bulk| (single, bulk)).map_err(|m| (format!("{key}.bulk"), m))
        });
        let ((method, path), (bulk_method, bulk_pattern)) = match parsed {
            Ok(parsed) => parsed,
            Err((field, message)) => {
                problems.push(Problem::new(field, message));
                continue;
            }
        };
        let (Some(method), Some(bulk_method)) = (method, bulk_method) else {
            problems.push(Problem::new(format!("{key}.match"), "both match and bulk need a method (POST /path)"));
            continue;
        };
        let bulk_path = rule.bulk.trim().split_once(' ').map_or("", |(_, p)| p.trim()).to_owned();
        let rule = BatchRule {
            method,
            path,
            bulk_method,
            bulk_path,
            format: rule.format.clone(),
            max_items: rule.max_items,
            max_delay: rule.max_delay,
        };
        for segment in &bulk_pattern.segments {
            if let Segment::Capture(Some(name)) = segment {
                if !rule.captures().any(|captured| captured == name) || name == "id" {
                    problems.push(Problem::new(
                        format!("{key}.bulk"),
                        format!("`{{{name}}}` is not a capture of match (or is the record id)"),
                    ));
                }
            }
        }
        if rule.max_delay.is_zero() || rule.max_delay > Duration::from_secs(5) {
            problems.push(Problem::new(format!("{key}.max_delay"), "must be between 1ms and 5s"));
        }
        rules.push(rule);
    }
    rules
}
