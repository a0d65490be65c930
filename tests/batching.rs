#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Batching (issue 6): single HubSpot and Salesforce calls folded into the vendors' bulk endpoints,
//! each caller still getting its own single answer. Real sockets and real clients throughout: a
//! bulk-capable mock vendor (`support::bulk`), sluice in-process, reqwest callers.
mod support;

use std::collections::HashSet;
use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};
use tokio::time::Instant;

use support::bulk::{single_calls, BulkCrm};
use support::{direct_client, metric_value, MockCrm, TestSluice};

const CONTACTS: &str = "/crm/v3/objects/contacts";

fn create_rule(max_items: usize, max_delay: &str) -> String {
    format!(
        "{{ match: 'POST /crm/v3/objects/{{object}}', bulk: 'POST /crm/v3/objects/{{object}}/batch/create', \
         format: hubspot, max_items: {max_items}, max_delay: {max_delay} }}"
    )
}

fn id_rule(method: &str, op: &str, max_delay: &str) -> String {
    format!(
        "{{ match: '{method} /crm/v3/objects/{{object}}/{{id}}', bulk: 'POST /crm/v3/objects/{{object}}/batch/{op}', \
         format: hubspot, max_items: 100, max_delay: {max_delay} }}"
    )
}

/// One upstream block (reverse prefix mode) with its batch rules.
fn upstream(name: &str, prefix: &str, target: &str, rules: &[String]) -> String {
    let mut text = format!("  - name: {name}\n    prefix: {prefix}\n    target: '{target}'\n");
    if !rules.is_empty() {
        text.push_str("    batch:\n");
        for rule in rules {
            text.push_str(&format!("      - {rule}\n"));
        }
    }
    text
}

async fn start(upstreams: &[String]) -> TestSluice {
    TestSluice::start(&format!("upstreams:\n{}", upstreams.concat())).await
}

/// A mock with bulk endpoints, and sluice with a hubspot upstream at `/hubspot` using `rules`.
async fn hubspot(rules: &[String]) -> (MockCrm, BulkCrm, TestSluice) {
    let mock = MockCrm::start().await;
    let bulk = BulkCrm::install(&mock);
    let sluice = start(&[upstream("hubspot", "/hubspot", &mock.url(), rules)]).await;
    (mock, bulk, sluice)
}

/// Status and JSON body (`Null` when empty, a string when not JSON).
async fn answer(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    (status, body)
}

fn contact(email: &str) -> Value {
    json!({"properties": {"email": email, "firstname": "Ada", "lastname": "Lovelace"}, "associations": []})
}

/// Sends `emails.len()` single creates to `url` at once; answers in the order of `emails`.
async fn create_all(
    client: &reqwest::Client,
    url: &str,
    emails: &[String],
    token: impl Fn(usize) -> Option<String>,
) -> Vec<(u16, Value)> {
    let tasks: Vec<_> = emails
        .iter()
        .enumerate()
        .map(|(at, email)| {
            let mut request = client.post(url).json(&contact(email));
            if let Some(token) = token(at) {
                request = request.header("authorization", token);
            }
            tokio::spawn(answer(request))
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

/// Each caller got 201 and the object made from its own input, stored under the id it was given.
fn assert_own_objects(bulk: &BulkCrm, emails: &[String], answers: &[(u16, Value)]) {
    let mut ids = HashSet::new();
    for (email, (status, body)) in emails.iter().zip(answers) {
        assert_eq!(*status, 201, "{email}: {body}");
        assert_eq!(body["properties"]["email"], email.as_str(), "{body}");
        assert!(body.get("objectWriteTraceId").is_none(), "the trace id is sluice's business: {body}");
        assert_eq!(body["archived"], false);
        let id = body["id"].as_str().expect("an id");
        assert_eq!(body["properties"]["hs_object_id"], id);
        let stored = bulk.hubspot_object(id).expect("the object exists at the vendor");
        assert_eq!(stored["email"], email.as_str(), "id {id} was created from another caller's input");
        assert!(ids.insert(id.to_owned()), "id {id} handed to two callers");
    }
}

/// Every bulk create carried unique trace ids and the contacts' own properties.
fn assert_bulk_creates(bulk: &BulkCrm) {
    let mut traces = HashSet::new();
    for call in bulk.bulk_calls() {
        assert_eq!((call.method.as_str(), call.path.as_str()), ("POST", "/crm/v3/objects/contacts/batch/create"));
        for input in &call.inputs {
            let trace = input["objectWriteTraceId"].as_str().expect("every input traced");
            assert!(traces.insert(trace.to_owned()), "trace id {trace} used twice");
            assert_eq!(input["associations"], json!([]));
            assert_eq!(input["properties"]["lastname"], "Lovelace");
        }
    }
}

fn emails(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|at| format!("{prefix}-{at}@example.com")).collect()
}

// === the issue's test ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_concurrent_creates_become_three_bulk_calls() {
    let (mock, bulk, sluice) = hubspot(&[create_rule(100, "2s")]).await;
    let client = direct_client();
    let url = format!("{}/hubspot{CONTACTS}", sluice.proxy_url());
    let emails = emails("worker", 300);

    let answers = create_all(&client, &url, &emails, |_| None).await;

    assert_own_objects(&bulk, &emails, &answers);
    let calls = bulk.bulk_calls();
    assert!(calls.len() <= 3, "{} bulk calls for 300 creates", calls.len());
    assert!(
        calls.iter().all(|call| call.inputs.len() == 100),
        "{:?}",
        calls.iter().map(|c| c.inputs.len()).collect::<Vec<_>>()
    );
    assert_eq!(calls.iter().map(|call| call.inputs.len()).sum::<usize>(), 300);
    assert_bulk_creates(&bulk);
    assert!(single_calls(&mock).is_empty(), "no single creates reach the vendor");
    let metrics = sluice.metrics().await;
    assert_eq!(metric_value(&metrics, "sluice_batch_flushes_total", &[("reason", "size")]), 3.0);
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_through_https_proxy_interception_are_batched() {
    let mock = MockCrm::start().await;
    let bulk = BulkCrm::install(&mock);
    let sluice = TestSluice::start(&format!(
        "intercept: {{ ca_cert: $DIR/ca.crt, ca_key: $DIR/ca.key }}
upstreams:
  - name: hubspot
    hosts: [api.hubapi.com]
    target: '{}'
    intercept: true
    batch:
      - {}
",
        mock.url(),
        create_rule(30, "2s")
    ))
    .await;
    let client = sluice.proxied_client();
    let emails = emails("tunnel", 60);

    let answers =
        create_all(&client, "https://api.hubapi.com/crm/v3/objects/contacts", &emails, |_| Some("Bearer t".into()))
            .await;

    assert_own_objects(&bulk, &emails, &answers);
    let sizes: Vec<usize> = bulk.bulk_calls().iter().map(|call| call.inputs.len()).collect();
    assert_eq!(sizes, [30, 30]);
    assert_bulk_creates(&bulk);
    assert!(single_calls(&mock).is_empty());
    assert!(bulk.bulk_calls().iter().all(|call| call.authorization.as_deref() == Some("Bearer t")));
    sluice.shutdown().await;
}

// === per-item and whole-batch failures ===

#[tokio::test]
async fn a_per_item_conflict_reaches_only_its_caller() {
    let (_mock, bulk, sluice) = hubspot(&[create_rule(100, "1s")]).await;
    let client = direct_client();
    let url = format!("{}/hubspot{CONTACTS}", sluice.proxy_url());
    let mut emails = emails("fine", 5);
    emails[2] = "dup-ada@example.com".into();

    let answers = create_all(&client, &url, &emails, |_| None).await;

    assert_eq!(bulk.bulk_count(), 1);
    assert_eq!(bulk.bulk_calls()[0].status, 207, "the vendor answered multi-status");
    for (at, (email, (status, body))) in emails.iter().zip(&answers).enumerate() {
        if at == 2 {
            assert_eq!(*status, 409, "{body}");
            // The single call's error: the StandardError without sluice's trace id (fixture split).
            assert_eq!(
                body,
                &json!({
                    "status": "error",
                    "category": "CONFLICT",
                    "message": "Contact already exists. Existing ID: 51",
                    "context": {"existingId": ["51"]}
                })
            );
        } else {
            assert_eq!(*status, 201, "{email}: {body}");
            assert_eq!(body["properties"]["email"], email.as_str());
        }
    }
    sluice.shutdown().await;
}

/// The vendor's whole-batch body used to reach every caller as it came; it can quote any
/// caller's input (security review M4), so each caller now gets sluice's own 502.
#[tokio::test]
async fn a_whole_batch_failure_gives_every_caller_an_error_of_its_own() {
    let (mock, bulk, sluice) = hubspot(&[create_rule(100, "300ms")]).await;
    let client = direct_client();
    let url = format!("{}/hubspot{CONTACTS}", sluice.proxy_url());

    for (status, body) in [
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"status": "error", "message": "internal error", "correlationId": "x", "category": "INTERNAL_ERROR"}),
        ),
        (
            StatusCode::BAD_REQUEST,
            json!({"status": "error", "message": "Invalid input JSON", "correlationId": "y", "category": "VALIDATION_ERROR"}),
        ),
    ] {
        bulk.clear();
        bulk.fail_bulk(Some((status, body.clone())));
        let answers = create_all(&client, &url, &emails(&format!("fail{}", status.as_u16()), 4), |_| None).await;
        assert_eq!(bulk.bulk_count(), 1, "one bulk call, no retries of a create");
        for (got, got_body) in &answers {
            assert_eq!(*got, 502, "{got_body}");
            assert_eq!(got_body["error"], "upstream_protocol_error", "{got_body}");
            assert!(got_body["detail"].as_str().unwrap().contains(&status.as_u16().to_string()), "{got_body}");
            assert_ne!(got_body, &body, "the vendor's body is not passed on");
        }
    }
    assert!(single_calls(&mock).is_empty());
    sluice.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_vendor_fails_every_caller_in_the_batch() {
    let target = format!("http://127.0.0.1:{}", support::closed_port());
    let sluice = start(&[upstream("hubspot", "/hubspot", &target, &[create_rule(100, "200ms")])]).await;
    let client = direct_client();
    let url = format!("{}/hubspot{CONTACTS}", sluice.proxy_url());
    let answers = create_all(&client, &url, &emails("down", 3), |_| None).await;
    for (status, body) in &answers {
        assert_eq!(*status, 502, "{body}");
        assert_eq!(body["upstream"], "hubspot", "{body}");
    }
    let metrics = sluice.metrics().await;
    assert_eq!(metric_value(&metrics, "sluice_batch_flushes_total", &[("upstream", "hubspot")]), 1.0);
    sluice.shutdown().await;
}

// === read, update, archive ===

#[tokio::test]
async fn batch_read_answers_each_caller_and_misses_with_404() {
    let (mock, bulk, sluice) = hubspot(&[id_rule("GET", "read", "1s")]).await;
    let ada = bulk.seed_contact("ada@example.com", "Ada");
    let grace = bulk.seed_contact("grace@example.com", "Grace");
    let client = direct_client();
    let base = format!("{}/hubspot{CONTACTS}", sluice.proxy_url());

    let ids = [ada.clone(), "987654".to_owned(), grace.clone()];
    let tasks: Vec<_> =
        ids.iter().map(|id| tokio::spawn(answer(client.get(format!("{base}/{id}?properties=email"))))).collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }

    let calls = bulk.bulk_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].path, "/crm/v3/objects/contacts/batch/read");
    assert_eq!(calls[0].body["properties"], json!(["email"]));
    let asked: HashSet<&str> = calls[0].inputs.iter().filter_map(|input| input["id"].as_str()).collect();
    assert_eq!(asked, ids.iter().map(String::as_str).collect());
    assert!(single_calls(&mock).is_empty());

    for (id, email, (status, body)) in
        [(&ada, "ada@example.com", &answers[0]), (&grace, "grace@example.com", &answers[2])]
    {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["id"], id.as_str());
        assert_eq!(body["properties"]["email"], email);
        assert!(body["properties"].get("firstname").is_none(), "only the asked properties: {body}");
    }
    let (status, body) = &answers[1];
    assert_eq!(*status, 404, "{body}");
    assert_eq!(body["category"], "OBJECT_NOT_FOUND");
    assert_eq!(body["context"]["ids"], json!(["987654"]), "only the caller's own id: {body}");

    // Different property lists never share a bulk read.
    bulk.clear();
    let first = tokio::spawn(answer(client.get(format!("{base}/{ada}?properties=email"))));
    let second = tokio::spawn(answer(client.get(format!("{base}/{grace}?properties=firstname"))));
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!((first.0, second.0), (200, 200));
    assert_eq!(first.1["properties"]["email"], "ada@example.com");
    assert_eq!(second.1["properties"]["firstname"], "Grace");
    assert!(second.1["properties"].get("email").is_none());
    assert_eq!(bulk.bulk_count(), 2);
    sluice.shutdown().await;
}

#[tokio::test]
async fn two_reads_of_the_same_id_both_get_the_object() {
    let (_mock, bulk, sluice) = hubspot(&[id_rule("GET", "read", "1s")]).await;
    let ada = bulk.seed_contact("ada@example.com", "Ada");
    let client = direct_client();
    let url = format!("{}/hubspot{CONTACTS}/{ada}?properties=email", sluice.proxy_url());
    let first = tokio::spawn(answer(client.get(&url)));
    let second = tokio::spawn(answer(client.get(&url)));
    for (status, body) in [first.await.unwrap(), second.await.unwrap()] {
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["id"], ada.as_str());
    }
    sluice.shutdown().await;
}

#[tokio::test]
async fn batch_update_answers_200_with_each_callers_object() {
    let (mock, bulk, sluice) = hubspot(&[id_rule("PATCH", "update", "1s")]).await;
    let ids = [bulk.seed_contact("ada@example.com", "Ada"), bulk.seed_contact("grace@example.com", "Grace")];
    let client = direct_client();
    let base = format!("{}/hubspot{CONTACTS}", sluice.proxy_url());

    let mut targets: Vec<String> = ids.to_vec();
    targets.push("424242".into());
    let tasks: Vec<_> = targets
        .iter()
        .enumerate()
        .map(|(at, id)| {
            let body = json!({"properties": {"firstname": format!("Renamed-{at}")}});
            tokio::spawn(answer(client.patch(format!("{base}/{id}")).json(&body)))
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }

    let calls = bulk.bulk_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].path, "/crm/v3/objects/contacts/batch/update");
    for input in &calls[0].inputs {
        assert!(input["id"].is_string() && input["objectWriteTraceId"].is_string(), "{input}");
        assert!(input["properties"]["firstname"].is_string(), "{input}");
    }
    assert!(single_calls(&mock).is_empty());
    for (at, id) in ids.iter().enumerate() {
        let (status, body) = &answers[at];
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["id"], id.as_str());
        assert_eq!(body["properties"]["firstname"], format!("Renamed-{at}"));
        assert!(body.get("objectWriteTraceId").is_none(), "{body}");
        assert_eq!(bulk.hubspot_object(id).unwrap()["firstname"], format!("Renamed-{at}"));
    }
    assert_eq!(answers[2].0, 404, "{}", answers[2].1);
    assert_eq!(answers[2].1["category"], "OBJECT_NOT_FOUND");
    sluice.shutdown().await;
}

#[tokio::test]
async fn batch_archive_answers_204_without_a_body() {
    let (mock, bulk, sluice) = hubspot(&[id_rule("DELETE", "archive", "1s")]).await;
    let ids = [bulk.seed_contact("ada@example.com", "Ada"), bulk.seed_contact("grace@example.com", "Grace")];
    let client = direct_client();
    let base = format!("{}/hubspot{CONTACTS}", sluice.proxy_url());

    let tasks: Vec<_> = ids.iter().map(|id| tokio::spawn(client.delete(format!("{base}/{id}")).send())).collect();
    for task in tasks {
        let response = task.await.unwrap().unwrap();
        assert_eq!(response.status(), 204);
        assert!(response.bytes().await.unwrap().is_empty());
    }

    let calls = bulk.bulk_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].path, "/crm/v3/objects/contacts/batch/archive");
    let archived: HashSet<&str> = calls[0].inputs.iter().filter_map(|input| input["id"].as_str()).collect();
    assert_eq!(archived, ids.iter().map(String::as_str).collect());
    assert!(ids.iter().all(|id| bulk.hubspot_object(id).is_none()));
    assert!(single_calls(&mock).is_empty());
    sluice.shutdown().await;
}

#[tokio::test]
async fn read_update_and_archive_rules_on_one_upstream() {
    let (_mock, bulk, sluice) = hubspot(&[
        create_rule(100, "300ms"),
        id_rule("GET", "read", "300ms"),
        id_rule("PATCH", "update", "300ms"),
        id_rule("DELETE", "archive", "300ms"),
    ])
    .await;
    let ada = bulk.seed_contact("ada@example.com", "Ada");
    let grace = bulk.seed_contact("grace@example.com", "Grace");
    let client = direct_client();
    let base = format!("{}/hubspot{CONTACTS}", sluice.proxy_url());

    let (status, body) = answer(client.get(format!("{base}/{ada}"))).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) =
        answer(client.patch(format!("{base}/{ada}")).json(&json!({"properties": {"firstname": "Countess"}}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["properties"]["firstname"], "Countess");
    let (status, body) = answer(client.delete(format!("{base}/{grace}"))).await;
    assert_eq!(status, 204, "{body}");

    let paths: Vec<String> = bulk.bulk_calls().iter().map(|call| call.path.clone()).collect();
    assert_eq!(
        paths,
        [
            "/crm/v3/objects/contacts/batch/read",
            "/crm/v3/objects/contacts/batch/update",
            "/crm/v3/objects/contacts/batch/archive"
        ]
    );
    assert!(bulk.hubspot_object(&grace).is_none());
    sluice.shutdown().await;
}

// === Salesforce ===

fn salesforce_rules(max_delay: &str) -> Vec<String> {
    vec![
        format!(
            "{{ match: 'POST /services/data/{{version}}/sobjects/{{sobject}}', \
             bulk: 'POST /services/data/{{version}}/composite/sobjects', format: salesforce-collections, \
             max_items: 200, max_delay: {max_delay} }}"
        ),
        format!(
            "{{ match: 'PATCH /services/data/{{version}}/sobjects/{{sobject}}/{{id}}', \
             bulk: 'PATCH /services/data/{{version}}/composite/sobjects', format: salesforce-collections, \
             max_items: 200, max_delay: {max_delay} }}"
        ),
    ]
}

#[tokio::test]
async fn salesforce_collections_with_mixed_success() {
    let mock = MockCrm::start().await;
    let bulk = BulkCrm::install(&mock);
    let sluice = start(&[upstream("salesforce", "/salesforce", &mock.url(), &salesforce_rules("1s"))]).await;
    let client = direct_client();
    let url = format!("{}/salesforce/services/data/v62.0/sobjects/Contact/", sluice.proxy_url());

    let records = [
        json!({"FirstName": "Ada", "LastName": "Lovelace", "Email": "ada@example.com"}),
        json!({"FirstName": "Nobody", "Email": "nobody@example.com"}),
        json!({"FirstName": "Grace", "LastName": "Hopper", "Email": "grace@example.com"}),
    ];
    let tasks: Vec<_> = records
        .iter()
        .map(|record| tokio::spawn(answer(client.post(&url).bearer_auth("00Dxx!token").json(record))))
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }

    let calls = bulk.bulk_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!((calls[0].method.as_str(), calls[0].path.as_str()), ("POST", "/services/data/v62.0/composite/sobjects"));
    assert_eq!(calls[0].body["allOrNone"], false);
    assert_eq!(calls[0].inputs.len(), 3);
    assert!(calls[0].inputs.iter().all(|record| record["attributes"] == json!({"type": "Contact"})));
    assert_eq!(calls[0].authorization.as_deref(), Some("Bearer 00Dxx!token"));
    assert!(single_calls(&mock).is_empty());

    for at in [0, 2] {
        let (status, body) = &answers[at];
        assert_eq!(*status, 201, "{body}");
        assert_eq!(body["success"], true);
        assert_eq!(body["errors"], json!([]));
        let id = body["id"].as_str().unwrap();
        let record = bulk.salesforce_record(id).expect("created");
        assert_eq!(record["Email"], records[at]["Email"], "id {id} belongs to another caller's record");
    }
    let (status, body) = &answers[1];
    assert_eq!(*status, 400, "{body}");
    assert_eq!(
        body,
        &json!([{
            "message": "Required fields are missing: [LastName]",
            "errorCode": "REQUIRED_FIELD_MISSING",
            "fields": ["LastName"]
        }])
    );
    let metrics = sluice.metrics().await;
    assert_eq!(metric_value(&metrics, "sluice_batch_item_errors_total", &[("upstream", "salesforce")]), 1.0);
    sluice.shutdown().await;
}

#[tokio::test]
async fn salesforce_collections_update_answers_204() {
    let mock = MockCrm::start().await;
    let bulk = BulkCrm::install(&mock);
    let sluice = start(&[upstream("salesforce", "/salesforce", &mock.url(), &salesforce_rules("300ms"))]).await;
    let client = direct_client();
    let base = format!("{}/salesforce/services/data/v62.0/sobjects/Contact", sluice.proxy_url());
    // Created one by one (opted out), then updated in one collection.
    let mut ids = Vec::new();
    for name in ["Lovelace", "Hopper"] {
        let (status, body) =
            answer(client.post(format!("{base}/")).header("sluice-batch", "off").json(&json!({"LastName": name})))
                .await;
        assert_eq!(status, 201, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    bulk.clear();
    let tasks: Vec<_> = ids
        .iter()
        .map(|id| tokio::spawn(answer(client.patch(format!("{base}/{id}")).json(&json!({"Title": format!("t-{id}")})))))
        .collect();
    for task in tasks {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, 204, "{body}");
        assert_eq!(body, Value::Null);
    }
    let calls = bulk.bulk_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(
        (calls[0].method.as_str(), calls[0].path.as_str()),
        ("PATCH", "/services/data/v62.0/composite/sobjects")
    );
    for id in &ids {
        assert_eq!(bulk.salesforce_record(id).unwrap()["Title"], format!("t-{id}"));
    }
    sluice.shutdown().await;
}

// === delay flush, opt-out, malformed bodies ===

#[tokio::test]
async fn a_lone_create_is_flushed_after_max_delay() {
    let (_mock, bulk, sluice) = hubspot(&[create_rule(100, "25ms")]).await;
    let client = direct_client();
    let url = format!("{}/hubspot{CONTACTS}", sluice.proxy_url());
    // Warm the connection (and compare with an unbatched call on it).
    let (status, _) = answer(client.post(&url).header("sluice-batch", "off").json(&contact("warm@example.com"))).await;
    assert_eq!(status, 201);

    let started = Instant::now();
    let (status, _) = answer(client.post(&url).header("sluice-batch", "off").json(&contact("plain@example.com"))).await;
    let unbatched = started.elapsed();
    assert_eq!(status, 201);

    let started = Instant::now();
    let (status, body) = answer(client.post(&url).json(&contact("lone@example.com"))).await;
    let batched = started.elapsed();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["properties"]["email"], "lone@example.com");
    println!(
        "lone create: batched {:.1} ms, unbatched {:.1} ms, added {:.1} ms (max_delay 25 ms)",
        batched.as_secs_f64() * 1000.0,
        unbatched.as_secs_f64() * 1000.0,
        (batched.as_secs_f64() - unbatched.as_secs_f64()) * 1000.0
    );
    assert!(batched < Duration::from_secs(2), "a lone create waited {batched:?}");
    assert_eq!(bulk.bulk_count(), 1);
    assert_eq!(bulk.bulk_calls()[0].inputs.len(), 1);
    let metrics = sluice.metrics().await;
    assert_eq!(metric_value(&metrics, "sluice_batch_flushes_total", &[("reason", "delay")]), 1.0);
    sluice.shutdown().await;
}

#[tokio::test]
async fn opt_out_header_goes_through_as_a_single_call() {
    let (mock, bulk, sluice) = hubspot(&[create_rule(100, "2s")]).await;
    let client = direct_client();
    let url = format!("{}/hubspot{CONTACTS}", sluice.proxy_url());
    for value in ["off", "OFF", "false", "0", "no"] {
        mock.clear();
        let started = Instant::now();
        let (status, body) =
            answer(client.post(&url).header("Sluice-Batch", value).json(&contact("solo@example.com"))).await;
        assert_eq!(status, 201, "{value}: {body}");
        assert_eq!(body["properties"]["email"], "solo@example.com");
        assert!(started.elapsed() < Duration::from_secs(2), "an opted-out call does not wait for a batch");
        let seen = mock.requests();
        assert_eq!(seen.len(), 1);
        assert_eq!((seen[0].method.as_str(), seen[0].path.as_str()), ("POST", CONTACTS));
    }
    assert_eq!(bulk.bulk_count(), 0);
    sluice.shutdown().await;
}

#[tokio::test]
async fn opt_out_header_does_not_reach_the_vendor() {
    let (mock, _bulk, sluice) = hubspot(&[create_rule(100, "2s")]).await;
    let client = direct_client();
    let url = format!("{}/hubspot{CONTACTS}", sluice.proxy_url());
    let (status, _) = answer(client.post(&url).header("Sluice-Batch", "off").json(&contact("solo@example.com"))).await;
    assert_eq!(status, 201);
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("sluice-batch"), None, "{:?}", seen[0].headers);
    sluice.shutdown().await;
}

#[tokio::test]
async fn malformed_bodies_pass_through_unbatched() {
    let (mock, bulk, sluice) = hubspot(&[create_rule(100, "2s")]).await;
    let client = direct_client();
    let url = format!("{}/hubspot{CONTACTS}", sluice.proxy_url());
    for body in ["this is not json", r#"[{"properties":{"email":"array@example.com"}}]"#, "", "\"a string\""] {
        mock.clear();
        let started = Instant::now();
        let (status, answer_body) =
            answer(client.post(&url).header("content-type", "application/json").body(body.to_owned())).await;
        assert!(started.elapsed() < Duration::from_secs(2), "{body:?} waited for a batch");
        assert_eq!(status, 400, "{body:?}: the single endpoint's own answer, {answer_body}");
        assert_eq!(answer_body["category"], "VALIDATION_ERROR");
        let seen = mock.requests();
        assert_eq!(seen.len(), 1, "{body:?}");
        assert_eq!((seen[0].method.as_str(), seen[0].path.as_str()), ("POST", CONTACTS));
        assert_eq!(seen[0].body, body.as_bytes(), "the body reaches the vendor untouched");
    }
    assert_eq!(bulk.bulk_count(), 0);
    sluice.shutdown().await;
}

// === credentials, disconnects ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_with_different_credentials_never_share_a_batch() {
    let (_mock, bulk, sluice) = hubspot(&[create_rule(100, "1s")]).await;
    let client = direct_client();
    let url = format!("{}/hubspot{CONTACTS}", sluice.proxy_url());
    // Interleaved: a, b, none, a, b, none, ...
    let owners = ["a", "b", "none"];
    let emails: Vec<String> = (0..45).map(|at| format!("{}-{at}@example.com", owners[at % 3])).collect();
    let token = |at: usize| match owners[at % 3] {
        "none" => None,
        owner => Some(format!("Bearer token-{owner}")),
    };

    let answers = create_all(&client, &url, &emails, token).await;

    assert_own_objects(&bulk, &emails, &answers);
    let calls = bulk.bulk_calls();
    assert_eq!(calls.len(), 3, "one batch per credential: {calls:?}");
    let mut seen = HashSet::new();
    for call in &calls {
        let owner = match call.authorization.as_deref() {
            None => "none",
            Some("Bearer token-a") => "a",
            Some("Bearer token-b") => "b",
            Some(other) => panic!("unexpected credentials {other}"),
        };
        assert!(seen.insert(owner), "two batches for {owner}");
        let batch_emails = call.emails();
        assert_eq!(batch_emails.len(), 15);
        assert!(
            batch_emails.iter().all(|email| email.starts_with(&format!("{owner}-"))),
            "the batch sent with {owner}'s credentials carries others' inputs: {batch_emails:?}"
        );
    }
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_disconnects_does_not_break_its_batch() {
    let (_mock, bulk, sluice) = hubspot(&[create_rule(100, "600ms")]).await;
    let url = format!("{}/hubspot{CONTACTS}", sluice.proxy_url());
    // The first caller (whose request head the bulk call is made with) goes away while waiting.
    let quitter = {
        let client = direct_client();
        let url = url.clone();
        tokio::spawn(async move { answer(client.post(&url).json(&contact("quitter@example.com"))).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let client = direct_client();
    let stayers = emails("stayer", 4);
    let rest = {
        let client = client.clone();
        let url = url.clone();
        let stayers = stayers.clone();
        tokio::spawn(async move { create_all(&client, &url, &stayers, |_| None).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    quitter.abort();
    assert!(quitter.await.unwrap_err().is_cancelled());

    let answers = rest.await.unwrap();
    assert_own_objects(&bulk, &stayers, &answers);
    assert_eq!(bulk.bulk_count(), 1, "the mates still went out together");

    // And batching goes on afterwards.
    let later = emails("later", 3);
    let answers = create_all(&client, &url, &later, |_| None).await;
    assert_own_objects(&bulk, &later, &answers);
    assert_eq!(bulk.bulk_count(), 2);
    sluice.shutdown().await;
}

// === metrics ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_metrics_count_sizes_flushes_savings_and_item_errors() {
    let (_mock, _bulk, sluice) = hubspot(&[create_rule(5, "500ms")]).await;
    let client = direct_client();
    let url = format!("{}/hubspot{CONTACTS}", sluice.proxy_url());
    let mut emails = emails("metric", 10);
    emails[7] = "dup-metric@example.com".into();
    let answers = create_all(&client, &url, &emails, |_| None).await;
    assert_eq!(answers.iter().filter(|(status, _)| *status == 201).count(), 9);
    assert_eq!(answers[7].0, 409);
    let (status, _) = answer(client.post(&url).json(&contact("alone@example.com"))).await;
    assert_eq!(status, 201);

    let metrics = sluice.metrics().await;
    let hubspot = [("upstream", "hubspot")];
    let value = |name: &str, extra: &[(&str, &str)]| {
        let mut labels = hubspot.to_vec();
        labels.extend_from_slice(extra);
        metric_value(&metrics, name, &labels)
    };
    assert_eq!(value("sluice_batch_flushes_total", &[("reason", "size")]), 2.0, "{metrics}");
    assert_eq!(value("sluice_batch_flushes_total", &[("reason", "delay")]), 1.0);
    assert_eq!(value("sluice_batch_size_count", &[]), 3.0);
    assert_eq!(value("sluice_batch_size_sum", &[]), 11.0);
    assert_eq!(value("sluice_batch_size_bucket", &[("le", "5")]), 3.0);
    assert_eq!(value("sluice_batch_size_bucket", &[("le", "1")]), 1.0);
    assert_eq!(value("sluice_batch_calls_saved_total", &[]), 8.0);
    assert_eq!(value("sluice_batch_item_errors_total", &[]), 1.0);
    sluice.shutdown().await;
}

// === the mock itself ===

#[tokio::test]
async fn the_bulk_mock_answers_like_hubspot() {
    let mock = MockCrm::start().await;
    let bulk = BulkCrm::install(&mock);
    let client = direct_client();
    let inputs: Vec<Value> = ["a@example.com", "dup@example.com", "c@example.com", "d@example.com"]
        .iter()
        .enumerate()
        .map(|(at, email)| {
            let mut input = contact(email);
            input["objectWriteTraceId"] = json!(format!("call-{at}"));
            input
        })
        .collect();
    let (status, body) =
        answer(client.post(format!("{}{CONTACTS}/batch/create", mock.url())).json(&json!({"inputs": inputs}))).await;
    assert_eq!(status, 207, "{body}");
    let traces: Vec<&str> =
        body["results"].as_array().unwrap().iter().map(|r| r["objectWriteTraceId"].as_str().unwrap()).collect();
    assert_eq!(traces.len(), 3);
    assert_ne!(traces, ["call-0", "call-2", "call-3"], "results come back shuffled");
    assert_eq!(body["numErrors"], 1);
    assert_eq!(body["errors"][0]["context"]["objectWriteTraceId"], json!(["call-1"]));
    assert_eq!(bulk.bulk_calls()[0].authorization, None);

    // Without trace ids a conflict fails the whole batch.
    let (status, _) = answer(
        client
            .post(format!("{}{CONTACTS}/batch/create", mock.url()))
            .json(&json!({"inputs": [contact("x@example.com"), contact("dup2@example.com")]})),
    )
    .await;
    assert_eq!(status, 409);

    let id = bulk.seed_contact("r@example.com", "R");
    let (status, body) = answer(
        client
            .post(format!("{}{CONTACTS}/batch/read", mock.url()))
            .json(&json!({"inputs": [{"id": id}, {"id": "1"}], "properties": ["email"]})),
    )
    .await;
    assert_eq!(status, 207, "{body}");
    assert_eq!(body["results"][0]["properties"]["email"], "r@example.com");
    assert_eq!(body["errors"][0]["context"]["ids"], json!(["1"]));

    let response = client
        .post(format!("{}{CONTACTS}/batch/archive", mock.url()))
        .json(&json!({"inputs": [{"id": id}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert!(bulk.hubspot_object(&id).is_none());
}

// === bounds, quotas, timeouts ===

#[tokio::test]
async fn an_oversized_body_passes_through_unbatched() {
    let (mock, bulk, sluice) = hubspot(&[create_rule(100, "2s")]).await;
    let client = direct_client();
    let url = format!("{}/hubspot{CONTACTS}", sluice.proxy_url());
    let mut big = contact("big@example.com");
    big["properties"]["notes"] = json!("x".repeat(300 * 1024));
    let started = Instant::now();
    let (status, body) = answer(client.post(&url).json(&big)).await;
    assert!(started.elapsed() < Duration::from_secs(2), "an oversized call does not wait for a batch");
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["properties"]["email"], "big@example.com");
    assert_eq!(bulk.bulk_count(), 0);
    assert_eq!(single_calls(&mock).len(), 1);
    sluice.shutdown().await;
}

#[tokio::test]
async fn a_bulk_call_takes_quota_tokens_at_the_bulk_routes_cost() {
    let mock = MockCrm::start().await;
    let bulk = BulkCrm::install(&mock);
    let mut block = upstream("hubspot", "/hubspot", &mock.url(), &[]);
    block.push_str(
        "    over_limit: reject
    quotas: [{ name: burst, limit: 3, per: 10s, burst: 3 }]
    routes: [{ match: 'POST /crm/v3/objects/{object}/batch/create', cost: 2 }]
    batch:
",
    );
    block.push_str(&format!("      - {}\n", create_rule(100, "300ms")));
    let sluice = start(&[block]).await;
    let client = direct_client();
    let url = format!("{}/hubspot{CONTACTS}", sluice.proxy_url());

    // Fifty creates cost one bulk call: two tokens of three.
    let first = emails("first", 50);
    let answers = create_all(&client, &url, &first, |_| None).await;
    assert_own_objects(&bulk, &first, &answers);
    assert_eq!(bulk.bulk_count(), 1);

    // The next bulk call needs two tokens, one is left: every caller in it hears the refusal.
    let answers = create_all(&client, &url, &emails("second", 5), |_| None).await;
    for (status, body) in &answers {
        assert_eq!(*status, 429, "{body}");
    }
    assert_eq!(bulk.bulk_count(), 1, "the refused bulk call never reached the vendor");
    sluice.shutdown().await;
}

#[tokio::test]
async fn a_bulk_call_that_times_out_answers_504_to_every_caller() {
    // A vendor that accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let mut block = upstream("hubspot", "/hubspot", &format!("http://{addr}"), &[create_rule(100, "200ms")]);
    block.push_str("    timeouts: { request: 500ms }\n");
    let sluice = start(&[block]).await;
    let client = direct_client();
    let url = format!("{}/hubspot{CONTACTS}", sluice.proxy_url());
    let answers = create_all(&client, &url, &emails("slow", 3), |_| None).await;
    for (status, body) in &answers {
        assert_eq!(*status, 504, "{body}");
        assert_eq!(body["error"], "upstream_timeout", "{body}");
    }
    sluice.shutdown().await;
    silent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_bulk_call_ever_exceeds_max_items() {
    let (mock, bulk, sluice) = hubspot(&[create_rule(2, "2s")]).await;
    let client = direct_client();
    let url = format!("{}/hubspot{CONTACTS}", sluice.proxy_url());
    let emails = emails("race", 400);
    let answers = create_all(&client, &url, &emails, |_| None).await;
    assert_own_objects(&bulk, &emails, &answers);
    let sizes: Vec<usize> = bulk.bulk_calls().iter().map(|call| call.inputs.len()).collect();
    assert!(sizes.iter().all(|size| *size <= 2), "bulk calls over max_items: {sizes:?}");
    assert!(single_calls(&mock).is_empty());
    sluice.shutdown().await;
}
