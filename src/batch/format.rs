//! What a vendor's bulk endpoint is, as a trait: one implementation per format, each in its own
//! file beside this one (`hubspot.rs`, `salesforce.rs`), registered in [`FORMATS`], the way
//! `vendor/` keeps one file per header dialect.
//!
//! Everything vendor-specific about batching is behind [`BulkFormat`]: which bulk calls exist
//! and what they do, the cap on items, which single calls fit, how a call's body becomes an
//! item, how items become the bulk body, and how the answer comes apart into one answer per
//! caller. The formats are pure functions, no I/O, tested on the vendor fixtures in
//! `tests/fixtures/crm/`. Config only checks a rule's shape and keeps the format's name;
//! [`check`] holds each rule to its format's facts when a generation is built.
//!
//! [`FORMATS`]: super::FORMATS

use std::sync::Arc;

use http::StatusCode;
use serde_json::Value;

use crate::config::{BatchRule, Problem, Upstream};

/// What a batch rule does with the records of its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOp {
    Create,
    Read,
    Update,
    Archive,
}

impl BatchOp {
    /// Read, update and archive name a record: the single call must capture its id.
    pub fn needs_id(self) -> bool {
        matches!(self, BatchOp::Read | BatchOp::Update | BatchOp::Archive)
    }
}

/// One queued single call, as a format needs it.
#[derive(Debug, Clone)]
pub struct Item {
    /// The record id from the path (read, update, archive).
    pub id: Option<String>,
    /// The single call's item body (create, update); `Null` for read and archive.
    pub body: Value,
    /// Unique per item: HubSpot's `objectWriteTraceId`.
    pub trace: String,
}

/// What one caller receives.
#[derive(Debug, Clone, PartialEq)]
pub struct Single {
    pub status: StatusCode,
    /// `None`: no body (204).
    pub body: Option<Value>,
}

/// Why a bulk answer could not be split; every caller then gets an error of its own.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SplitError {
    #[error("bulk answer is not the expected JSON")]
    Unparseable,
    #[error("bulk answer has {got} results for {want} calls")]
    WrongCount { got: usize, want: usize },
}

/// A vendor's bulk endpoint.
pub trait BulkFormat: Sync {
    /// The name a batch rule's `format:` gives it.
    fn name(&self) -> &'static str;

    /// Most calls one bulk call may carry (the vendor's cap).
    fn max_items(&self) -> usize;

    /// The operation a rule performs (from its single call and its bulk call), or `None` when
    /// the format has no such bulk call.
    fn op_for(&self, rule: &BatchRule) -> Option<BatchOp>;

    /// The bulk calls the format has, in words: the problem when [`op_for`](Self::op_for)
    /// finds none.
    fn bulk_calls(&self) -> &'static str;

    /// Whether a single call with this query can be batched (its query rides on the bulk call).
    fn accepts_query(&self, _op: BatchOp, _query: Option<&str>) -> bool {
        true
    }

    /// The item a single call contributes, from its body, the rule's captures and the record
    /// id; `None` when the body is not what the bulk endpoint expects (the call goes alone).
    fn item_body(&self, op: BatchOp, body: &[u8], _captures: &[(String, String)], _id: Option<&str>) -> Option<Value> {
        plain_item(op, body)
    }

    /// The bulk call's query, from the single calls' shared query (decoded, sorted pairs).
    fn bulk_query(&self, _op: BatchOp, _query: &[(String, String)]) -> Option<String> {
        None
    }

    /// The bulk request body for `items`; `query` is the single calls' shared query.
    fn wrap(&self, op: BatchOp, items: &[Item], query: &[(String, String)]) -> Value;

    /// Whether a bulk answer with this status is one [`split`](Self::split) takes apart
    /// (any other is a whole-batch failure).
    fn splittable(&self, op: BatchOp, status: StatusCode) -> bool;

    /// One answer per item, in item order, from a splittable bulk answer. Items the vendor said
    /// nothing about get `None` (that caller answers 502).
    fn split(&self, op: BatchOp, body: &[u8], items: &[Item]) -> Result<Vec<Option<Single>>, SplitError>;
}

/// The item of a call whose bulk endpoint takes its body as is: nothing for read and archive
/// (the call must have no body), the JSON object for create and update.
pub fn plain_item(op: BatchOp, body: &[u8]) -> Option<Value> {
    match op {
        BatchOp::Read | BatchOp::Archive => body.iter().all(u8::is_ascii_whitespace).then_some(Value::Null),
        BatchOp::Create | BatchOp::Update => {
            let value: Value = serde_json::from_slice(body).ok()?;
            value.is_object().then_some(value)
        }
    }
}

/// The format a rule names and the operation its bulk call performs; `None` only for a rule
/// [`check`] refuses.
pub fn plan(rule: &BatchRule) -> Option<(&'static dyn BulkFormat, BatchOp)> {
    let format = super::format(&rule.format)?;
    Some((format, format.op_for(rule)?))
}

/// Holds every upstream's batch rules to their format's facts: the format exists, has the bulk
/// call, gets the record id it needs, and `max_items` is within its cap. Each problem names the
/// rule's key, like validation's.
pub fn check(upstreams: &[Arc<Upstream>]) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (index, upstream) in upstreams.iter().enumerate() {
        for (at, rule) in upstream.batch.iter().enumerate() {
            let key = format!("upstreams[{index}].batch[{at}]");
            let Some(format) = super::format(&rule.format) else {
                let known: Vec<&str> = super::FORMATS.iter().map(|format| format.name()).collect();
                problems.push(Problem::new(
                    format!("{key}.format"),
                    format!("`{}` is not a bulk format (sluice knows {})", rule.format, known.join(", ")),
                ));
                continue;
            };
            let Some(op) = format.op_for(rule) else {
                problems.push(Problem::new(format!("{key}.bulk"), format.bulk_calls()));
                continue;
            };
            if op.needs_id() && !rule.captures().any(|name| name == "id") {
                problems
                    .push(Problem::new(format!("{key}.match"), "this operation needs the record id captured as {id}"));
            }
            let cap = format.max_items();
            if rule.max_items < 2 || rule.max_items > cap {
                problems.push(Problem::new(
                    format!("{key}.max_items"),
                    format!("must be between 2 and {cap} for this format"),
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
pub(super) fn fixture(path: &str) -> Value {
    let full = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/crm").join(path);
    serde_json::from_str(&std::fs::read_to_string(full).expect("fixture present")).expect("fixture JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(rules: &str) -> Vec<(String, String)> {
        let config = crate::config::Config::from_yaml(&format!(
            "upstreams:\n  - name: crm\n    prefix: /crm\n    target: 'https://crm.example'\n    batch:\n{rules}"
        ))
        .expect("the rules' shape is valid");
        check(&config.live.upstreams).into_iter().map(|problem| (problem.key, problem.message)).collect()
    }

    #[test]
    fn rules_are_held_to_their_format() {
        let found = problems(
            "      - { match: 'POST /o/{object}', bulk: 'POST /o/{object}/batch/create', format: hubspot }
      - { match: 'POST /o/{object}', bulk: 'POST /o/{object}/batch/create', format: pipedrive }
      - { match: 'POST /o/{object}', bulk: 'POST /o/{object}/batch/upsert', format: hubspot }
      - { match: 'PATCH /o/{object}', bulk: 'POST /o/{object}/batch/update', format: hubspot }
      - { match: 'POST /s/{sobject}', bulk: 'POST /s/composite', format: salesforce-collections, max_items: 201 }
      - { match: 'PUT /s/{sobject}/{id}', bulk: 'PATCH /s/composite', format: salesforce-collections }
      - { match: 'POST /o/{object}', bulk: 'POST /o/{object}/batch/create', format: hubspot, max_items: 1 }
",
        );
        let keys: Vec<&str> = found.iter().map(|(key, _)| key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "upstreams[0].batch[1].format",
                "upstreams[0].batch[2].bulk",
                "upstreams[0].batch[3].match",
                "upstreams[0].batch[4].max_items",
                "upstreams[0].batch[5].bulk",
                "upstreams[0].batch[6].max_items",
            ],
            "{found:?}"
        );
        assert_eq!(found[0].1, "`pipedrive` is not a bulk format (sluice knows hubspot, salesforce-collections)");
        assert_eq!(found[3].1, "must be between 2 and 200 for this format");
        assert_eq!(found[5].1, "must be between 2 and 100 for this format");
    }

    #[test]
    fn a_rule_plans_its_format_and_operation() {
        let config = crate::config::Config::from_yaml(
            "upstreams:
  - name: crm
    prefix: /crm
    target: 'https://crm.example'
    batch:
      - { match: 'GET /o/{object}/{id}', bulk: 'POST /o/{object}/batch/read', format: hubspot }
      - { match: 'DELETE /o/{object}/{id}', bulk: 'POST /o/{object}/batch/archive/', format: hubspot }
      - { match: 'POST /s/{sobject}', bulk: 'POST /s/composite/sobjects', format: salesforce-collections }
      - { match: 'PATCH /s/{sobject}/{id}', bulk: 'PATCH /s/composite/sobjects', format: salesforce-collections }
",
        )
        .unwrap();
        let plans: Vec<_> = config.live.upstreams[0]
            .batch
            .iter()
            .map(|rule| plan(rule).map(|(format, op)| (format.name(), op)))
            .collect();
        assert_eq!(
            plans,
            [
                Some(("hubspot", BatchOp::Read)),
                Some(("hubspot", BatchOp::Archive)),
                Some(("salesforce-collections", BatchOp::Create)),
                Some(("salesforce-collections", BatchOp::Update)),
            ]
        );
    }
}
