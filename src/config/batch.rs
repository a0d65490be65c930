//! `batch:` rules, validated: the single call a rule matches and the bulk call it folds into.

use std::time::Duration;

use http::Method;

use super::file::{BatchFile, BatchFormat};
use super::policy::{parse_route_match, PathPattern, Segment};
use super::Problem;

/// What a batch rule does, derived from its format and bulk path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOp {
    Create,
    Read,
    Update,
    Archive,
}

/// A validated batch rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRule {
    pub method: Method,
    pub path: PathPattern,
    pub bulk_method: Method,
    /// The bulk path template, `{name}` filled from the single call's captures.
    pub bulk_path: String,
    pub format: BatchFormat,
    pub op: BatchOp,
    pub max_items: usize,
    pub max_delay: Duration,
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
        let captures: Vec<&str> = path
            .segments
            .iter()
            .filter_map(|s| match s {
                Segment::Capture(Some(name)) => Some(name.as_str()),
                _ => None,
            })
            .collect();
        let bulk_path = rule.bulk.trim().split_once(' ').map_or("", |(_, p)| p.trim()).to_owned();
        for segment in &bulk_pattern.segments {
            if let Segment::Capture(Some(name)) = segment {
                if !captures.contains(&name.as_str()) || name == "id" {
                    problems.push(Problem::new(
                        format!("{key}.bulk"),
                        format!("`{{{name}}}` is not a capture of match (or is the record id)"),
                    ));
                }
            }
        }
        let last = bulk_path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
        let op = match (rule.format, &method, last) {
            (BatchFormat::Hubspot, _, "create") => Some(BatchOp::Create),
            (BatchFormat::Hubspot, _, "read") => Some(BatchOp::Read),
            (BatchFormat::Hubspot, _, "update") => Some(BatchOp::Update),
            (BatchFormat::Hubspot, _, "archive") => Some(BatchOp::Archive),
            (BatchFormat::SalesforceCollections, &Method::POST, _) => Some(BatchOp::Create),
            (BatchFormat::SalesforceCollections, &Method::PATCH, _) => Some(BatchOp::Update),
            _ => None,
        };
        let Some(op) = op else {
            problems.push(Problem::new(
                format!("{key}.bulk"),
                "hubspot bulk paths end in batch/create|read|update|archive; salesforce-collections batches POST (create) or PATCH (update)",
            ));
            continue;
        };
        let needs_id = matches!(op, BatchOp::Read | BatchOp::Update | BatchOp::Archive);
        if needs_id && !captures.contains(&"id") {
            problems.push(Problem::new(format!("{key}.match"), "this operation needs the record id captured as {id}"));
        }
        let cap = match rule.format {
            BatchFormat::Hubspot => 100,
            BatchFormat::SalesforceCollections => 200,
        };
        if rule.max_items < 2 || rule.max_items > cap {
            problems
                .push(Problem::new(format!("{key}.max_items"), format!("must be between 2 and {cap} for this format")));
        }
        if rule.max_delay.is_zero() || rule.max_delay > Duration::from_secs(5) {
            problems.push(Problem::new(format!("{key}.max_delay"), "must be between 1ms and 5s"));
        }
        rules.push(BatchRule {
            method,
            path,
            bulk_method,
            bulk_path,
            format: rule.format,
            op,
            max_items: rule.max_items,
            max_delay: rule.max_delay,
        });
    }
    rules
}
