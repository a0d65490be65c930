//! Salesforce sObject Collections: create (`POST`) and update (`PATCH`) of up to 200 records,
//! with `allOrNone: false` so each record succeeds or fails on its own.
//!
//! Each record carries `attributes.type` (the `{sobject}` capture of the single call) and, for
//! an update, its `id`. The answer lists one result per record in input order, so it is split
//! by index.

use http::{Method, StatusCode};
use serde_json::{json, Value};

use super::format::{plain_item, BatchOp, BulkFormat, Item, Single, SplitError};
use crate::config::BatchRule;

/// `format: salesforce-collections`.
pub struct Collections;

impl BulkFormat for Collections {
    fn name(&self) -> &'static str {
        "salesforce-collections"
    }

    fn max_items(&self) -> usize {
        200
    }

    /// A `POST` of a record creates it and a `PATCH` updates it; the rule's bulk call is the
    /// collection endpoint either way.
    fn op_for(&self, rule: &BatchRule) -> Option<BatchOp> {
        match rule.method {
            Method::POST => Some(BatchOp::Create),
            Method::PATCH => Some(BatchOp::Update),
            _ => None,
        }
    }

    fn bulk_calls(&self) -> &'static str {
        "salesforce-collections batches POST (create) or PATCH (update)"
    }

    fn item_body(&self, op: BatchOp, body: &[u8], captures: &[(String, String)], id: Option<&str>) -> Option<Value> {
        let mut value = plain_item(op, body)?;
        if let Some(map) = value.as_object_mut() {
            let sobject = captures.iter().find(|(name, _)| name == "sobject").map(|(_, value)| value.clone())?;
            map.insert("attributes".into(), json!({ "type": sobject }));
            if let Some(id) = id {
                map.insert("id".into(), json!(id));
            }
        }
        Some(value)
    }

    fn wrap(&self, _op: BatchOp, items: &[Item], _query: &[(String, String)]) -> Value {
        let records: Vec<Value> = items.iter().map(|item| item.body.clone()).collect();
        json!({ "allOrNone": false, "records": records })
    }

    fn splittable(&self, _op: BatchOp, status: StatusCode) -> bool {
        status == StatusCode::OK
    }

    fn split(&self, op: BatchOp, body: &[u8], items: &[Item]) -> Result<Vec<Option<Single>>, SplitError> {
        split_salesforce(op, body, items)
    }
}

fn split_salesforce(op: BatchOp, body: &[u8], items: &[Item]) -> Result<Vec<Option<Single>>, SplitError> {
    let answer: Value = serde_json::from_slice(body).map_err(|_| SplitError::Unparseable)?;
    let results = answer.as_array().ok_or(SplitError::Unparseable)?;
    if results.len() != items.len() {
        return Err(SplitError::WrongCount { got: results.len(), want: items.len() });
    }
    Ok(results
        .iter()
        .map(|result| {
            let success = result.get("success").and_then(Value::as_bool).unwrap_or(false);
            Some(match (success, op) {
                (true, BatchOp::Update) => Single { status: StatusCode::NO_CONTENT, body: None },
                (true, _) => Single { status: StatusCode::CREATED, body: Some(result.clone()) },
                (false, _) => {
                    // Single-call errors say `errorCode` where collections say `statusCode`.
                    let errors: Vec<Value> = result
                        .get("errors")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .map(|error| {
                            json!({
                                "message": error.get("message").cloned().unwrap_or(Value::Null),
                                "errorCode": error.get("statusCode").cloned().unwrap_or(Value::Null),
                                "fields": error.get("fields").cloned().unwrap_or_else(|| json!([])),
                            })
                        })
                        .collect();
                    Single { status: StatusCode::BAD_REQUEST, body: Some(Value::Array(errors)) }
                }
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::format::fixture;
    use super::*;

    #[test]
    fn salesforce_wrap_and_split_match_fixtures() {
        let request = fixture("salesforce/collections-create.request.json");
        let records = request["request"]["body"]["records"].as_array().unwrap();
        let items: Vec<Item> = records
            .iter()
            .enumerate()
            .map(|(i, r)| Item { id: None, body: r.clone(), trace: format!("call-{}", i + 1) })
            .collect();
        assert_eq!(Collections.wrap(BatchOp::Create, &items, &[]), request["request"]["body"]);
        for name in [
            "salesforce/collections-create.response.success.json",
            "salesforce/collections-create.response.partial.json",
        ] {
            let fixture = fixture(name);
            let body = serde_json::to_vec(&fixture["response"]["body"]).unwrap();
            let split = Collections.split(BatchOp::Create, &body, &items).unwrap();
            for (item, single) in items.iter().zip(split) {
                let single = single.unwrap();
                let expected = &fixture["expected_split"][&item.trace];
                assert_eq!(single.status.as_u16() as u64, expected["status"].as_u64().unwrap());
                assert_eq!(single.body.as_ref().unwrap(), &expected["body"], "{name} {}", item.trace);
            }
        }
    }

    #[test]
    fn a_count_that_does_not_match_is_not_split() {
        let items = vec![Item { id: None, body: json!({}), trace: "a".into() }; 3];
        assert_eq!(split_salesforce(BatchOp::Create, b"[]", &items), Err(SplitError::WrongCount { got: 0, want: 3 }));
    }

    #[test]
    fn records_carry_their_type_and_id() {
        let captures = [("version".to_owned(), "v62.0".to_owned()), ("sobject".to_owned(), "Contact".to_owned())];
        let item = Collections.item_body(BatchOp::Update, br#"{"Email":"a@example.com"}"#, &captures, Some("003x"));
        assert_eq!(item, Some(json!({"Email": "a@example.com", "attributes": {"type": "Contact"}, "id": "003x"})));
        assert_eq!(Collections.item_body(BatchOp::Create, br#"{"Email":"a"}"#, &captures[..1], None), None);
        assert_eq!(Collections.item_body(BatchOp::Create, b"[1]", &captures, None), None, "not an object");
    }
}
