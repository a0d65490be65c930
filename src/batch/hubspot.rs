//! HubSpot CRM v3 batch endpoints: `batch/create`, `batch/read`, `batch/update` and
//! `batch/archive`, at most 100 inputs.
//!
//! HubSpot promises no result order, so every input carries a unique `objectWriteTraceId` (which
//! also turns on 207 multi-status answers) and results are matched on it, or on `id`. A single
//! read batches only when its query is one batch read takes too; `archived` goes on the bulk
//! call's query, the property lists into its body.

use http::StatusCode;
use serde_json::{json, Map, Value};

use super::format::{BatchOp, BulkFormat, Item, Single, SplitError};
use crate::config::BatchRule;

/// `format: hubspot`.
pub struct Hubspot;

impl BulkFormat for Hubspot {
    fn name(&self) -> &'static str {
        "hubspot"
    }

    fn max_items(&self) -> usize {
        100
    }

    /// The bulk path's last segment says what it does; the methods are the rule's own.
    fn op_for(&self, rule: &BatchRule) -> Option<BatchOp> {
        match rule.bulk_path.trim_end_matches('/').rsplit('/').next().unwrap_or("") {
            "create" => Some(BatchOp::Create),
            "read" => Some(BatchOp::Read),
            "update" => Some(BatchOp::Update),
            "archive" => Some(BatchOp::Archive),
            _ => None,
        }
    }

    fn bulk_calls(&self) -> &'static str {
        "hubspot bulk paths end in batch/create|read|update|archive"
    }

    fn accepts_query(&self, op: BatchOp, query: Option<&str>) -> bool {
        op != BatchOp::Read || read_query_batchable(query)
    }

    fn bulk_query(&self, op: BatchOp, query: &[(String, String)]) -> Option<String> {
        let (_, archived) = query.iter().find(|(name, _)| name == "archived").filter(|_| op == BatchOp::Read)?;
        Some(format!("archived={archived}"))
    }

    fn wrap(&self, op: BatchOp, items: &[Item], query: &[(String, String)]) -> Value {
        let inputs: Vec<Value> = items.iter().map(|item| hubspot_input(op, item)).collect();
        let mut body = Map::new();
        body.insert("inputs".into(), Value::Array(inputs));
        if op == BatchOp::Read {
            for (name, value) in query {
                match name.as_str() {
                    "properties" | "propertiesWithHistory" => {
                        let list: Vec<Value> = value.split(',').filter(|v| !v.is_empty()).map(|v| json!(v)).collect();
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

    fn splittable(&self, op: BatchOp, status: StatusCode) -> bool {
        match op {
            BatchOp::Archive => status == StatusCode::NO_CONTENT,
            _ => matches!(status.as_u16(), 200 | 201 | 207),
        }
    }

    fn split(&self, op: BatchOp, body: &[u8], items: &[Item]) -> Result<Vec<Option<Single>>, SplitError> {
        if op == BatchOp::Archive {
            return Ok(items.iter().map(|_| Some(Single { status: StatusCode::NO_CONTENT, body: None })).collect());
        }
        split_hubspot(op, body, items)
    }
}

/// HubSpot batch read takes `properties`, `propertiesWithHistory`, `idProperty`, `archived`;
/// a single read asking for anything else (associations, say) is not batched.
fn read_query_batchable(query: Option<&str>) -> bool {
    query.is_none_or(|query| {
        query.split('&').filter(|pair| !pair.is_empty()).all(|pair| {
            let name = pair.split('=').next().unwrap_or("");
            matches!(name, "properties" | "propertiesWithHistory" | "idProperty" | "archived")
        })
    })
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

#[cfg(test)]
mod tests {
    use super::super::format::fixture;
    use super::*;

    /// The fixture's inputs as queued calls.
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
        let wrapped = Hubspot.wrap(BatchOp::Create, &items, &[]);
        assert_eq!(wrapped, fixture("hubspot/batch-create.request.json")["request"]["body"]);
    }

    #[test]
    fn hubspot_split_success_and_partial_match_fixtures() {
        for name in ["hubspot/batch-create.response.success.json", "hubspot/batch-create.response.partial.json"] {
            let fixture = fixture(name);
            let body = serde_json::to_vec(&fixture["response"]["body"]).unwrap();
            let items = hubspot_items();
            let split = Hubspot.split(BatchOp::Create, &body, &items).unwrap();
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
    fn hubspot_read_wraps_query_and_maps_misses() {
        let items = vec![
            Item { id: Some("1".into()), body: Value::Null, trace: "a".into() },
            Item { id: Some("2".into()), body: Value::Null, trace: "b".into() },
        ];
        let query = vec![("properties".to_owned(), "email,firstname".to_owned())];
        let wrapped = Hubspot.wrap(BatchOp::Read, &items, &query);
        assert_eq!(wrapped["inputs"], json!([{"id": "1"}, {"id": "2"}]));
        assert_eq!(wrapped["properties"], json!(["email", "firstname"]));
        let answer = json!({
            "status": "COMPLETE",
            "results": [{"id": "1", "properties": {"email": "a@example.com"}}],
            "numErrors": 1,
            "errors": [{"status": "error", "category": "OBJECT_NOT_FOUND", "message": "Could not get some CONTACT objects", "context": {"ids": ["2"]}}]
        });
        let split = Hubspot.split(BatchOp::Read, &serde_json::to_vec(&answer).unwrap(), &items).unwrap();
        assert_eq!(split[0].as_ref().unwrap().status, StatusCode::OK);
        assert_eq!(split[1].as_ref().unwrap().status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn missing_results_and_garbage() {
        let items = hubspot_items();
        let split = Hubspot.split(BatchOp::Create, br#"{"results":[]}"#, &items).unwrap();
        assert!(split.iter().all(Option::is_none));
        assert_eq!(split_hubspot(BatchOp::Create, b"<html>", &items), Err(SplitError::Unparseable));
    }

    #[test]
    fn read_queries_and_ops() {
        assert!(read_query_batchable(None));
        assert!(read_query_batchable(Some("properties=email,firstname&archived=false")));
        assert!(!read_query_batchable(Some("associations=companies")));
        assert!(Hubspot.accepts_query(BatchOp::Create, Some("associations=companies")), "only reads are picky");
        let archived = [("archived".to_owned(), "true".to_owned())];
        assert_eq!(Hubspot.bulk_query(BatchOp::Read, &archived).as_deref(), Some("archived=true"));
        assert_eq!(Hubspot.bulk_query(BatchOp::Update, &archived), None);
    }
}
