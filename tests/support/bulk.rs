//! A bulk-capable mock vendor, installable as a [`MockCrm`] handler: HubSpot CRM v3 objects (single
//! and `batch/create|read|update|archive`) and Salesforce REST (single sObject create/update and
//! sObject Collections), with the shapes of the vendors' bulk documentation (see `tests/fixtures/crm/README.md`) and the fixtures.
//!
//! HubSpot:
//! - `POST /crm/v3/objects/{t}` -> 201 `SimplePublicObject`; 409 CONFLICT for an email starting
//!   with `dup`; 400 VALIDATION_ERROR when the body is not a JSON object.
//! - `GET|PATCH|DELETE /crm/v3/objects/{t}/{id}` -> 200 / 200 / 204; 404 OBJECT_NOT_FOUND.
//! - `POST …/batch/create`: results in a shuffled order, each carrying `objectWriteTraceId` when its
//!   input had one; `dup…` emails become `errors[]` with `context.objectWriteTraceId` (207). Without
//!   trace ids on every input, a conflict fails the whole batch (409), as HubSpot does.
//! - `POST …/batch/read`: results shuffled, only the asked `properties`; misses in one error with
//!   `context.ids` (OBJECT_NOT_FOUND, 207).
//! - `POST …/batch/update`: like read, plus `objectWriteTraceId` echoed; misses are errors.
//! - `POST …/batch/archive`: 204, no body.
//!
//! Salesforce (any `vNN.N`):
//! - `POST /services/data/v/sobjects/{S}/` -> 201 `{id, success, errors}`; 400
//!   `[{message, errorCode, fields}]` when `LastName` is missing (Contact).
//! - `PATCH …/sobjects/{S}/{id}` -> 204; 404 `NOT_FOUND`.
//! - `POST|PATCH …/composite/sobjects` (`allOrNone: false`): one SaveResult per record, in request
//!   order; a record without `LastName` gets `REQUIRED_FIELD_MISSING`; more than 200 records: 400.
//!
//! Every bulk call is recorded with the credentials (`Authorization`) it carried; a whole-batch
//! failure can be injected for the bulk endpoints with [`BulkCrm::fail_bulk`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Map, Value};

use super::mock_crm::{hubspot_rate_headers, json, MockCrm, Recorded};

const TIMESTAMP: &str = "2026-01-15T10:00:00.000Z";
const UPDATED: &str = "2026-01-16T10:00:00.000Z";
const CORRELATION_ID: &str = "c033cdaa-2c40-4a64-ae48-b4cec88dad24";

/// One bulk call as the mock received it.
#[derive(Debug, Clone)]
pub struct BulkCall {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// The `Authorization` header it carried.
    pub authorization: Option<String>,
    /// `inputs` (HubSpot) or `records` (Salesforce).
    pub inputs: Vec<Value>,
    /// The whole request body.
    pub body: Value,
    /// The status the mock answered.
    pub status: u16,
}

impl BulkCall {
    /// The `properties.email` (HubSpot) or `Email` (Salesforce) of every input, in order.
    pub fn emails(&self) -> Vec<String> {
        self.inputs
            .iter()
            .filter_map(|input| input["properties"]["email"].as_str().or_else(|| input["Email"].as_str()))
            .map(str::to_owned)
            .collect()
    }
}

#[derive(Debug, Clone)]
struct HubspotObject {
    object_type: String,
    properties: Map<String, Value>,
    updated: bool,
}

#[derive(Default)]
struct State {
    calls: Mutex<Vec<BulkCall>>,
    hubspot: Mutex<HashMap<String, HubspotObject>>,
    salesforce: Mutex<HashMap<String, Value>>,
    failure: Mutex<Option<(StatusCode, Value)>>,
    next_id: AtomicU64,
    shuffles: AtomicU64,
}

/// Handle on the bulk-capable behaviour installed in a [`MockCrm`].
#[derive(Clone)]
pub struct BulkCrm {
    state: Arc<State>,
}

impl BulkCrm {
    /// Makes `mock` answer like HubSpot's and Salesforce's single and bulk endpoints.
    pub fn install(mock: &MockCrm) -> Self {
        let state = Arc::new(State { next_id: AtomicU64::new(1000), ..State::default() });
        let handler_state = state.clone();
        mock.set_handler(move |recorded| handle(&handler_state, recorded));
        Self { state }
    }

    /// Every bulk call so far, in arrival order.
    pub fn bulk_calls(&self) -> Vec<BulkCall> {
        self.state.calls.lock().unwrap().clone()
    }

    pub fn bulk_count(&self) -> usize {
        self.state.calls.lock().unwrap().len()
    }

    pub fn clear(&self) {
        self.state.calls.lock().unwrap().clear();
    }

    /// From now on every bulk call is answered `status` with `body` (`None`: normal service).
    pub fn fail_bulk(&self, failure: Option<(StatusCode, Value)>) {
        *self.state.failure.lock().unwrap() = failure;
    }

    /// Stores a HubSpot contact, as if created earlier; returns its id.
    pub fn seed_contact(&self, email: &str, firstname: &str) -> String {
        let id = self.state.next_id.fetch_add(1, Ordering::Relaxed).to_string();
        let mut properties = Map::new();
        properties.insert("email".into(), json!(email));
        properties.insert("firstname".into(), json!(firstname));
        properties.insert("lastname".into(), json!("Seeded"));
        stamp(&mut properties, &id);
        self.state
            .hubspot
            .lock()
            .unwrap()
            .insert(id.clone(), HubspotObject { object_type: "contacts".into(), properties, updated: false });
        id
    }

    /// The properties of a stored HubSpot object (`None`: unknown or archived).
    pub fn hubspot_object(&self, id: &str) -> Option<Map<String, Value>> {
        self.state.hubspot.lock().unwrap().get(id).map(|object| object.properties.clone())
    }

    /// The record a Salesforce id was created from (with `attributes` when it came in a collection).
    pub fn salesforce_record(&self, id: &str) -> Option<Value> {
        self.state.salesforce.lock().unwrap().get(id).cloned()
    }
}

/// Whether `path` is one of the bulk endpoints this mock serves.
pub fn is_bulk_path(path: &str) -> bool {
    path.contains("/batch/") || path.ends_with("/composite/sobjects")
}

/// The requests `mock` received that were not bulk calls.
pub fn single_calls(mock: &MockCrm) -> Vec<Recorded> {
    mock.requests().into_iter().filter(|request| !is_bulk_path(&request.path)).collect()
}

fn handle(state: &State, recorded: &Recorded) -> Response<Full<Bytes>> {
    let segments: Vec<&str> = recorded.path.trim_start_matches('/').split('/').collect();
    let method = recorded.method.as_str();
    match (method, segments.as_slice()) {
        ("POST", ["crm", "v3", "objects", object_type, "batch", op]) => {
            let object_type = (*object_type).to_owned();
            let op = (*op).to_owned();
            bulk(state, recorded, |body| hubspot_batch(state, &object_type, &op, body))
        }
        ("POST", ["crm", "v3", "objects", object_type]) => hubspot_create(state, object_type, &recorded.body),
        (_, ["crm", "v3", "objects", _object_type, id]) => hubspot_single(state, method, id, recorded),
        ("POST" | "PATCH", ["services", "data", _version, "composite", "sobjects"]) => {
            let update = method == "PATCH";
            bulk(state, recorded, |body| salesforce_collection(state, update, body))
        }
        (
            "POST",
            ["services", "data", _version, "sobjects", sobject]
            | ["services", "data", _version, "sobjects", sobject, ""],
        ) => salesforce_create(state, sobject, &recorded.body),
        ("PATCH", ["services", "data", _version, "sobjects", _sobject, id]) => {
            salesforce_update(state, id, &recorded.body)
        }
        _ => json(StatusCode::NOT_FOUND, json!({"status": "error", "message": "no such mock route"})),
    }
}

/// Records a bulk call and answers it (or the injected whole-batch failure).
fn bulk(
    state: &State,
    recorded: &Recorded,
    answer: impl FnOnce(&Value) -> Response<Full<Bytes>>,
) -> Response<Full<Bytes>> {
    let body: Value = serde_json::from_slice(&recorded.body).unwrap_or(Value::Null);
    let inputs =
        body.get("inputs").or_else(|| body.get("records")).and_then(Value::as_array).cloned().unwrap_or_default();
    let failure = state.failure.lock().unwrap().clone();
    let response = match failure {
        Some((status, failure_body)) => json(status, failure_body),
        None => answer(&body),
    };
    state.calls.lock().unwrap().push(BulkCall {
        method: recorded.method.clone(),
        path: recorded.path.clone(),
        query: recorded.query.clone(),
        authorization: recorded.header("authorization").map(str::to_owned),
        inputs,
        body,
        status: response.status().as_u16(),
    });
    response
}

// === HubSpot ===

fn hubspot_json(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = json(status, body);
    hubspot_rate_headers(response.headers_mut(), 190, 189);
    response
}

fn no_content() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    hubspot_rate_headers(response.headers_mut(), 190, 189);
    response
}

fn hubspot_error(category: &str, message: &str, context: Value) -> Value {
    let mut error = json!({"status": "error", "category": category, "message": message});
    if context.as_object().is_some_and(|map| !map.is_empty()) {
        error["context"] = context;
    }
    error
}

fn validation_error(message: &str) -> Value {
    json!({"status": "error", "message": message, "correlationId": CORRELATION_ID, "category": "VALIDATION_ERROR"})
}

fn stamp(properties: &mut Map<String, Value>, id: &str) {
    properties.insert("hs_object_id".into(), json!(id));
    properties.entry("createdate").or_insert_with(|| json!(TIMESTAMP));
    properties.insert("lastmodifieddate".into(), json!(TIMESTAMP));
}

/// The `SimplePublicObject` for `id`, with only `wanted` properties (plus the defaults) when given.
fn public_object(id: &str, object: &HubspotObject, wanted: Option<&[String]>) -> Value {
    let properties: Map<String, Value> = match wanted {
        None => object.properties.clone(),
        Some(wanted) => object
            .properties
            .iter()
            .filter(|(name, _)| {
                wanted.contains(name) || matches!(name.as_str(), "hs_object_id" | "createdate" | "lastmodifieddate")
            })
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect(),
    };
    json!({
        "id": id,
        "properties": properties,
        "createdAt": TIMESTAMP,
        "updatedAt": if object.updated { UPDATED } else { TIMESTAMP },
        "archived": false,
    })
}

fn is_dup(input: &Value) -> bool {
    input["properties"]["email"].as_str().is_some_and(|email| email.starts_with("dup"))
}

const EXISTING_ID: &str = "51";

fn conflict_message() -> String {
    format!("Contact already exists. Existing ID: {EXISTING_ID}")
}

/// Creates one object; `None` when its email is a duplicate.
fn create_object(state: &State, object_type: &str, input: &Value) -> Option<(String, HubspotObject)> {
    if is_dup(input) {
        return None;
    }
    let id = state.next_id.fetch_add(1, Ordering::Relaxed).to_string();
    let mut properties = input.get("properties").and_then(Value::as_object).cloned().unwrap_or_default();
    stamp(&mut properties, &id);
    let object = HubspotObject { object_type: object_type.to_owned(), properties, updated: false };
    state.hubspot.lock().unwrap().insert(id.clone(), object.clone());
    Some((id, object))
}

fn hubspot_create(state: &State, object_type: &str, body: &[u8]) -> Response<Full<Bytes>> {
    let input: Value = match serde_json::from_slice(body) {
        Ok(value @ Value::Object(_)) => value,
        _ => {
            return hubspot_json(
                StatusCode::BAD_REQUEST,
                validation_error("Invalid input JSON on line 1, column 1: expected an object"),
            )
        }
    };
    match create_object(state, object_type, &input) {
        Some((id, object)) => hubspot_json(StatusCode::CREATED, public_object(&id, &object, None)),
        None => hubspot_json(
            StatusCode::CONFLICT,
            json!({
                "status": "error",
                "message": conflict_message(),
                "correlationId": CORRELATION_ID,
                "category": "CONFLICT",
            }),
        ),
    }
}

fn hubspot_single(state: &State, method: &str, id: &str, recorded: &Recorded) -> Response<Full<Bytes>> {
    let not_found = || {
        hubspot_json(
            StatusCode::NOT_FOUND,
            json!({
                "status": "error",
                "message": "Object not found.  objectId are usually numeric.",
                "correlationId": CORRELATION_ID,
                "context": {"id": [id]},
                "category": "OBJECT_NOT_FOUND",
            }),
        )
    };
    let mut objects = state.hubspot.lock().unwrap();
    match method {
        "GET" => {
            let wanted = query_list(recorded.query.as_deref(), "properties");
            match objects.get(id) {
                Some(object) => hubspot_json(StatusCode::OK, public_object(id, object, wanted.as_deref())),
                None => not_found(),
            }
        }
        "PATCH" => {
            let input: Value = match serde_json::from_slice(&recorded.body) {
                Ok(value @ Value::Object(_)) => value,
                _ => return hubspot_json(StatusCode::BAD_REQUEST, validation_error("Invalid input JSON")),
            };
            match objects.get_mut(id) {
                Some(object) => {
                    update_object(object, &input);
                    hubspot_json(StatusCode::OK, public_object(id, object, None))
                }
                None => not_found(),
            }
        }
        "DELETE" => {
            objects.remove(id);
            no_content()
        }
        _ => hubspot_json(StatusCode::METHOD_NOT_ALLOWED, validation_error("method not allowed")),
    }
}

fn update_object(object: &mut HubspotObject, input: &Value) {
    for (name, value) in input.get("properties").and_then(Value::as_object).into_iter().flatten() {
        object.properties.insert(name.clone(), value.clone());
    }
    object.properties.insert("lastmodifieddate".into(), json!(UPDATED));
    object.updated = true;
}

/// `properties=email,firstname` (repeated or comma-separated) from a query string.
fn query_list(query: Option<&str>, name: &str) -> Option<Vec<String>> {
    let mut found: Option<Vec<String>> = None;
    for pair in query.unwrap_or("").split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == name {
            let value = value.replace("%2C", ",").replace("%2c", ",");
            found.get_or_insert_with(Vec::new).extend(value.split(',').filter(|v| !v.is_empty()).map(str::to_owned));
        }
    }
    found
}

/// A deterministic cyclic shuffle (Sattolo): no result keeps its input's position, as HubSpot
/// promises no order.
fn shuffle<T>(state: &State, items: &mut [T]) {
    let mut seed = state.shuffles.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for at in (1..items.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let other = (seed % at as u64) as usize;
        items.swap(at, other);
    }
}

fn batch_answer(state: &State, mut results: Vec<Value>, errors: Vec<Value>, ok: StatusCode) -> Response<Full<Bytes>> {
    shuffle(state, &mut results);
    let mut body = json!({
        "status": "COMPLETE",
        "results": results,
        "requestedAt": TIMESTAMP,
        "startedAt": TIMESTAMP,
        "completedAt": TIMESTAMP,
    });
    let status = if errors.is_empty() {
        ok
    } else {
        body["numErrors"] = json!(errors.len());
        body["errors"] = Value::Array(errors);
        StatusCode::MULTI_STATUS
    };
    hubspot_json(status, body)
}

fn hubspot_batch(state: &State, object_type: &str, op: &str, body: &Value) -> Response<Full<Bytes>> {
    let Some(inputs) = body.get("inputs").and_then(Value::as_array) else {
        return hubspot_json(StatusCode::BAD_REQUEST, validation_error("Invalid input JSON: `inputs` is required"));
    };
    if inputs.len() > 100 {
        return hubspot_json(StatusCode::BAD_REQUEST, validation_error("Batch input limit exceeded: at most 100"));
    }
    let trace_of = |input: &Value| input.get("objectWriteTraceId").and_then(Value::as_str).map(str::to_owned);
    match op {
        "create" => {
            let traced = inputs.iter().all(|input| trace_of(input).is_some());
            if !traced && inputs.iter().any(is_dup) {
                // Without a trace id on every input there is no multi-status: the batch fails.
                return hubspot_json(
                    StatusCode::CONFLICT,
                    json!({"status": "error", "message": conflict_message(), "correlationId": CORRELATION_ID, "category": "CONFLICT"}),
                );
            }
            let mut results = Vec::new();
            let mut errors = Vec::new();
            for input in inputs {
                match create_object(state, object_type, input) {
                    Some((id, object)) => {
                        let mut result = public_object(&id, &object, None);
                        if let Some(trace) = trace_of(input) {
                            result["objectWriteTraceId"] = json!(trace);
                        }
                        results.push(result);
                    }
                    None => errors.push(hubspot_error(
                        "CONFLICT",
                        &conflict_message(),
                        json!({"objectWriteTraceId": [trace_of(input)], "existingId": [EXISTING_ID]}),
                    )),
                }
            }
            batch_answer(state, results, errors, StatusCode::CREATED)
        }
        "read" => {
            let wanted: Option<Vec<String>> = body
                .get("properties")
                .and_then(Value::as_array)
                .map(|list| list.iter().filter_map(Value::as_str).map(str::to_owned).collect::<Vec<_>>());
            let wanted = wanted.filter(|list| !list.is_empty());
            let objects = state.hubspot.lock().unwrap();
            let mut results = Vec::new();
            let mut missing = Vec::new();
            for input in inputs {
                let id = input["id"].as_str().unwrap_or("").to_owned();
                match objects.get(&id).filter(|object| object.object_type == object_type) {
                    Some(object) => results.push(public_object(&id, object, wanted.as_deref())),
                    None => missing.push(json!(id)),
                }
            }
            drop(objects);
            let errors = if missing.is_empty() {
                Vec::new()
            } else {
                vec![hubspot_error(
                    "OBJECT_NOT_FOUND",
                    "Could not get some CONTACT objects, they may be deleted or not exist. Check that ids are valid.",
                    json!({"ids": missing}),
                )]
            };
            batch_answer(state, results, errors, StatusCode::OK)
        }
        "update" => {
            let mut objects = state.hubspot.lock().unwrap();
            let mut results = Vec::new();
            let mut errors = Vec::new();
            for input in inputs {
                let id = input["id"].as_str().unwrap_or("").to_owned();
                match objects.get_mut(&id) {
                    Some(object) => {
                        update_object(object, input);
                        let mut result = public_object(&id, object, None);
                        if let Some(trace) = trace_of(input) {
                            result["objectWriteTraceId"] = json!(trace);
                        }
                        results.push(result);
                    }
                    None => {
                        let mut context = json!({"ids": [id]});
                        if let Some(trace) = trace_of(input) {
                            context["objectWriteTraceId"] = json!([trace]);
                        }
                        errors.push(hubspot_error("OBJECT_NOT_FOUND", "Object not found.", context));
                    }
                }
            }
            drop(objects);
            batch_answer(state, results, errors, StatusCode::OK)
        }
        "archive" => {
            let mut objects = state.hubspot.lock().unwrap();
            for input in inputs {
                if let Some(id) = input["id"].as_str() {
                    objects.remove(id);
                }
            }
            no_content()
        }
        _ => hubspot_json(StatusCode::NOT_FOUND, validation_error("unknown batch operation")),
    }
}

// === Salesforce ===

fn salesforce_json(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = json(status, body);
    response.headers_mut().insert("content-type", "application/json;charset=UTF-8".parse().unwrap());
    response.headers_mut().insert("sforce-limit-info", "api-usage=10019/100000".parse().unwrap());
    response
}

fn salesforce_id(state: &State) -> String {
    format!("003Hs{:010}AAV", state.next_id.fetch_add(1, Ordering::Relaxed))
}

fn missing_last_name(record: &Value, sobject: &str) -> bool {
    sobject == "Contact" && record.get("LastName").and_then(Value::as_str).is_none_or(str::is_empty)
}

const REQUIRED_MESSAGE: &str = "Required fields are missing: [LastName]";

fn salesforce_create(state: &State, sobject: &str, body: &[u8]) -> Response<Full<Bytes>> {
    let record: Value = match serde_json::from_slice(body) {
        Ok(value @ Value::Object(_)) => value,
        _ => {
            return salesforce_json(
                StatusCode::BAD_REQUEST,
                json!([{"message": "The request body is not a JSON object", "errorCode": "JSON_PARSER_ERROR"}]),
            )
        }
    };
    if missing_last_name(&record, sobject) {
        return salesforce_json(
            StatusCode::BAD_REQUEST,
            json!([{"message": REQUIRED_MESSAGE, "errorCode": "REQUIRED_FIELD_MISSING", "fields": ["LastName"]}]),
        );
    }
    let id = salesforce_id(state);
    state.salesforce.lock().unwrap().insert(id.clone(), record);
    salesforce_json(StatusCode::CREATED, json!({"id": id, "success": true, "errors": []}))
}

fn salesforce_update(state: &State, id: &str, body: &[u8]) -> Response<Full<Bytes>> {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
        return salesforce_json(
            StatusCode::BAD_REQUEST,
            json!([{"message": "The request body is not a JSON object", "errorCode": "JSON_PARSER_ERROR"}]),
        );
    };
    let mut records = state.salesforce.lock().unwrap();
    match records.get_mut(id) {
        Some(Value::Object(record)) => {
            record.extend(fields);
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
        _ => salesforce_json(
            StatusCode::NOT_FOUND,
            json!([{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}]),
        ),
    }
}

fn salesforce_collection(state: &State, update: bool, body: &Value) -> Response<Full<Bytes>> {
    let Some(records) = body.get("records").and_then(Value::as_array) else {
        return salesforce_json(
            StatusCode::BAD_REQUEST,
            json!([{"message": "records is required", "errorCode": "INVALID_FIELD"}]),
        );
    };
    if records.len() > 200 {
        return salesforce_json(
            StatusCode::BAD_REQUEST,
            json!([{"message": "Maximum number of records is 200", "errorCode": "EXCEEDED_ID_LIMIT"}]),
        );
    }
    let all_or_none = body.get("allOrNone").and_then(Value::as_bool).unwrap_or(false);
    let failure = |record: &Value| -> Option<Value> {
        let sobject = record["attributes"]["type"].as_str().unwrap_or("");
        if sobject.is_empty() {
            return Some(json!({"statusCode": "INVALID_TYPE", "message": "attributes.type is required", "fields": []}));
        }
        if update {
            let known = record["id"].as_str().is_some_and(|id| state.salesforce.lock().unwrap().contains_key(id));
            return (!known)
                .then(|| json!({"statusCode": "ENTITY_IS_DELETED", "message": "entity is deleted", "fields": []}));
        }
        missing_last_name(record, sobject).then(
            || json!({"statusCode": "REQUIRED_FIELD_MISSING", "message": REQUIRED_MESSAGE, "fields": ["LastName"]}),
        )
    };
    let failures: Vec<Option<Value>> = records.iter().map(failure).collect();
    let rolled_back = all_or_none && failures.iter().any(Option::is_some);
    let results: Vec<Value> = records
        .iter()
        .zip(failures)
        .map(|(record, failed)| match failed {
            Some(error) => json!({"success": false, "errors": [error]}),
            None if rolled_back => json!({"success": false, "errors": [{
                "statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK",
                "message": "Record rolled back because not all records were valid and the request was using AllOrNone header",
                "fields": []
            }]}),
            None if update => {
                let id = record["id"].as_str().unwrap_or("").to_owned();
                if let Some(Value::Object(stored)) = state.salesforce.lock().unwrap().get_mut(&id) {
                    if let Some(fields) = record.as_object() {
                        stored.extend(fields.clone());
                    }
                }
                json!({"id": id, "success": true, "errors": []})
            }
            None => {
                let id = salesforce_id(state);
                state.salesforce.lock().unwrap().insert(id.clone(), record.clone());
                json!({"id": id, "success": true, "errors": []})
            }
        })
        .collect();
    salesforce_json(StatusCode::OK, Value::Array(results))
}
