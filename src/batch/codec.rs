//! Bulk bodies in, single answers out: pure functions, no I/O, tested on the vendor fixtures in `tests/fixtures/crm/`.
//!
//! HubSpot promises no result order, so every input carries a unique `objectWriteTraceId` (which
//! also turns on 207 multi-status answers) and results are matched on it, or on `id`. Salesforce
//! sObject Collections answer in input order, so they are matched by index. Each caller gets the
//! status and body the single endpoint would have given it.

use http::StatusCode;
use serde_json::{json, Map, Value};

use crate::config::{BatchFormat, BatchOp};

/// One queued single call, as the codec needs it.
#[derive(Debug, Clone)]
pub struct Item {
    /// The record id from the path (read, update, archive).
    pub id: Option<String>,
    /// The single call's JSON body (create, update); `Null` for read and archive.
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

/// Why a bulk answer could not be split; every caller then gets the bulk answer as it came.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SplitError {
    #[error("bulk answer is not the expected JSON")]
    Unparseable,
    #[error("bulk answer has {got} results for {want} calls")]
    WrongCount { got: usize, want: usize },
}

/// The bulk request body for `items`. `query` is the single calls' shared query (HubSpot read).
pub fn wrap(format: BatchFormat, op: BatchOp, items: &[Item], query: &[(String, String)]) -> Value {
    match format {
        BatchFormat::Hubspot => {
            let inputs: Vec<Value> = items.iter().map(|item| hubspot_input(op, item)).collect();
            let mut body = Map::new();
            body.insert("inputs".into(), Value::Array(inputs));
            if op == BatchOp::Read {
                for (name, value) in query {
                    match name.as_str() {
                        "properties" | "propertiesWithHistory" => {
                            let list: Vec<Value> =
                                value.split(',').filter(|v| !v.is_empty()).map(|v| json!(v)).collect();
                            body.insert(name.clone(), Value::Array(list));
                        }
                        "idProperty" => {
                            body.insert(name.clone(), json!(value));
                        }
                        _ => {}
                    }
                }
                body.entry("properties").or_insert_with(|| json!([]));
                body.entry("propertiesWithHistory").or_insert_with(|| json!([]));
            }
            Value::Object(body)
        }
        BatchFormat::SalesforceCollections => {
            let records: Vec<Value> = items.iter().map(|item| item.body.clone()).collect();
            json!({ "allOrNone": false, "records": records })
        }
    }
}

fn hubspot_input(op: BatchOp, item: &Item) -> Value {
    let mut input = match (&item.body, op) {
        (Value::Object(map), BatchOp::Create | BatchOp::Update) => map.clone(),
        _ => Map::new(),
    };
    if let Some(id) = &item.id {
        input.insert("id".into(), json!(id));
    }
    if matches!(op, BatchOp::Create | BatchOp::Update) {
        input.insert("objectWriteTraceId".into(), json!(item.trace));
    }
    Value::Object(input)
}

/// Whether a bulk status is one the codec splits (anything else goes to every caller as is).
pub fn splittable(format: BatchFormat, op: BatchOp, status: StatusCode) -> bool {
    match (format, op) {
        (BatchFormat::Hubspot, BatchOp::Archive) => status == StatusCode::NO_CONTENT,
        (BatchFormat::Hubspot, _) => matches!(status.as_u16(), 200 | 201 | 207),
        (BatchFormat::SalesforceCollections, _) => status == StatusCode::OK,
    }
}

/// Splits a successful (or multi-status) bulk answer into one answer per item, in item order.
/// Items the vendor said nothing about get `None` (the caller answers 502).
pub fn split(format: BatchFormat, op: BatchOp, body: &[u8], items: &[Item]) -> Result<Vec<Option<Single>>, SplitError> {
    match format {
        BatchFormat::Hubspot if op == BatchOp::Archive => {
            Ok(items.iter().map(|_| Some(Single { status: StatusCode::NO_CONTENT, body: None })).collect())
        }
        BatchFormat::Hubspot => split_hubspot(op, body, items),
        BatchFormat::SalesforceCollections => split_salesforce(op, body, items),
    }
}

fn split_hubspot(op: BatchOp, body: &[u8], items: &[Item]) -> Result<Vec<Option<Single>>, SplitError> {
    let answer: Value = serde_json::from_slice(body).map_err(|_| SplitError::Unparseable)?;
    let mut out: Vec<Option<Single>> = vec![None; items.len()];
    let find = |trace: Option<&str>, id: Option<&str>| -> Option<usize> {
        trace
            .and_then(|trace| items.iter().position(|item| item.trace == trace))
            .or_else(|| id.and_then(|id| items.iter().position(|item| item.id.as_deref() == Some(id))))
    };
    let ok_status = if op == BatchOp::Create { StatusCode::CREATED } else { StatusCode::OK };
    for result in answer.get("results").and_then(Value::as_array).into_iter().flatten() {
        let trace = result.get("objectWriteTraceId").and_then(Value::as_str);
        let id = result.get("id").and_then(Value::as_str);
        // Create results carry no id the caller knows, so only the trace id can match them.
        let index = if op == BatchOp::Create { find(trace, None) } else { find(trace, id) };
        if let Some(index) = index {
            let mut single = result.clone();
            if let Some(map) = single.as_object_mut() {
                map.remove("objectWriteTraceId");
            }
            out[index] = Some(Single { status: ok_status, body: Some(single) });
        }
    }
    for error in answer.get("errors").and_then(Value::as_array).into_iter().flatten() {
        let context = error.get("context");
        let traces = strings(context.and_then(|c| c.get("objectWriteTraceId")));
        let ids = strings(context.and_then(|c| c.get("ids")).or_else(|| context.and_then(|c| c.get("id"))));
        let mut targets: Vec<usize> = traces.iter().filter_map(|t| find(Some(t), None)).collect();
        if targets.is_empty() {
            targets = ids.iter().filter_map(|id| find(None, Some(id))).collect();
        }
        let status = hubspot_error_status(error, op);
        for index in targets {
            let mut single = error.clone();
            if let Some(context) = single.get_mut("context").and_then(Value::as_object_mut) {
                context.remove("objectWriteTraceId");
                if let (Some(id), Some(_)) = (&items[index].id, context.get("ids")) {
                    context.insert("ids".into(), json!([id]));
                }
                if context.is_empty() {
                    if let Some(map) = single.as_object_mut() {
                        map.remove("context");
                    }
                }
            }
            out[index] = Some(Single { status, body: Some(single) });
        }
    }
    Ok(out)
}

/// The status a single call would have had for a HubSpot StandardError.
fn hubspot_error_status(error: &Value, op: BatchOp) -> StatusCode {
    let category = error.get("category").and_then(Value::as_str).unwrap_or("");
    match category {
        "CONFLICT" => StatusCode::CONFLICT,
        "OBJECT_NOT_FOUND" => StatusCode::NOT_FOUND,
        "RATE_LIMITS" => StatusCode::TOO_MANY_REQUESTS,
        "MISSING_SCOPES" | "INVALID_AUTHENTICATION" => StatusCode::FORBIDDEN,
        _ if op == BatchOp::Read => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_REQUEST,
    }
}

fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Array(list)) => list.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        Some(Value::String(one)) => vec![one.clone()],
        _ => Vec::new(),
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
    use super::*;

    fn fixture(path: &str) -> Value {
        let full = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/crm").join(path);
        serde_json::from_str(&std::fs::read_to_string(full).expect("fixture present")).expect("fixture JSON")
    }

    fn hubspot_items() -> Vec<Item> {
        let request = fixture("hubspot/batch-create.request.json");
        request["request"]["body"]["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|input| {
                let mut body = input.clone();
                let trace = body.as_object_mut().unwrap().remove("objectWriteTraceId").unwrap();
                Item { id: None, body, trace: trace.as_str().unwrap().to_owned() }
            })
            .collect()
    }

    #[test]
    fn hubspot_wrap_matches_fixture() {
        let items = hubspot_items();
        let wrapped = wrap(BatchFormat::Hubspot, BatchOp::Create, &items, &[]);
        assert_eq!(wrapped, fixture("hubspot/batch-create.request.json")["request"]["body"]);
    }

    #[test]
    fn hubspot_split_success_and_partial_match_fixtures() {
        for name in ["hubspot/batch-create.response.success.json", "hubspot/batch-create.response.partial.json"] {
            let fixture = fixture(name);
            let body = serde_json::to_vec(&fixture["response"]["body"]).unwrap();
            let items = hubspot_items();
            let split = split(BatchFormat::Hubspot, BatchOp::Create, &body, &items).unwrap();
            for (item, single) in items.iter().zip(split) {
                let single = single.expect("every call answered");
                let expected = &fixture["expected_split"][&item.trace];
                assert_eq!(
                    single.status.as_u16() as u64,
                    expected["status"].as_u64().unwrap(),
                    "{name} {}",
                    item.trace
                );
                match expected.get("body") {
                    Some(body) => assert_eq!(single.body.as_ref().unwrap(), body),
                    None => {
                        let result = fixture["response"]["body"]["results"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .find(|r| r["objectWriteTraceId"] == item.trace.as_str())
                            .unwrap();
                        let mut result = result.clone();
                        result.as_object_mut().unwrap().remove("objectWriteTraceId");
                        assert_eq!(single.body.unwrap(), result);
                    }
                }
            }
        }
    }

    #[test]
    fn salesforce_wrap_and_split_match_fixtures() {
        let request = fixture("salesforce/collections-create.request.json");
        let records = request["request"]["body"]["records"].as_array().unwrap();
        let items: Vec<Item> = records
            .iter()
            .enumerate()
            .map(|(i, r)| Item { id: None, body: r.clone(), trace: format!("call-{}", i + 1) })
            .collect();
        assert_eq!(wrap(BatchFormat::SalesforceCollections, BatchOp::Create, &items, &[]), request["request"]["body"]);
        for name in [
            "salesforce/collections-create.response.success.json",
            "salesforce/collections-create.response.partial.json",
        ] {
            let fixture = fixture(name);
            let body = serde_json::to_vec(&fixture["response"]["body"]).unwrap();
            let split = split(BatchFormat::SalesforceCollections, BatchOp::Create, &body, &items).unwrap();
            for (item, single) in items.iter().zip(split) {
                let single = single.unwrap();
                let expected = &fixture["expected_split"][&item.trace];
                assert_eq!(single.status.as_u16() as u64, expected["status"].as_u64().unwrap());
                assert_eq!(single.body.as_ref().unwrap(), &expected["body"], "{name} {}", item.trace);
            }
        }
    }

    #[test]
    fn hubspot_read_wraps_query_and_maps_misses() {
        let items = vec![
            Item { id: Some("1".into()), body: Value::Null, trace: "a".into() },
            Item { id: Some("2".into()), body: Value::Null, trace: "b".into() },
        ];
        let query = vec![("properties".to_owned(), "email,firstname".to_owned())];
        let wrapped = wrap(BatchFormat::Hubspot, BatchOp::Read, &items, &query);
        assert_eq!(wrapped["inputs"], json!([{"id": "1"}, {"id": "2"}]));
        assert_eq!(wrapped["properties"], json!(["email", "firstname"]));
        let answer = json!({
            "status": "COMPLETE",
            "results": [{"id": "1", "properties": {"email": "a@example.com"}}],
            "numErrors": 1,
            "errors": [{"status": "error", "category": "OBJECT_NOT_FOUND", "message": "Could not get some CONTACT objects", "context": {"ids": ["2"]}}]
        });
        let split = split(BatchFormat::Hubspot, BatchOp::Read, &serde_json::to_vec(&answer).unwrap(), &items).unwrap();
        assert_eq!(split[0].as_ref().unwrap().status, StatusCode::OK);
        assert_eq!(split[1].as_ref().unwrap().status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn missing_results_and_garbage() {
        let items = hubspot_items();
        let split = split(BatchFormat::Hubspot, BatchOp::Create, br#"{"results":[]}"#, &items).unwrap();
        assert!(split.iter().all(Option::is_none));
        assert_eq!(split_salesforce(BatchOp::Create, b"[]", &items), Err(SplitError::WrongCount { got: 0, want: 3 }));
        assert_eq!(split_hubspot(BatchOp::Create, b"<html>", &items), Err(SplitError::Unparseable));
    }
}
