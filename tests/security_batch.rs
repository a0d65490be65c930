#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Security review finding M4 at the batching door, through real sockets: the bulk call is made
//! from the rule and what every caller shares, never from the first caller's own controls; a
//! bulk answer that cannot be split gives each caller an error of its own, never the vendor's
//! body quoting other callers' inputs; and calls with different credentials, in whatever header,
//! or from different clients, never share a batch.
mod support;

use std::collections::HashSet;
use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};

use support::bulk::{is_bulk_path, single_calls, BulkCrm};
use support::raw_http::RawConn;
use support::{direct_client, MockCrm, Recorded, TestSluice};

const CONTACTS: &str = "/crm/v3/objects/contacts";
const CREATE_RULE: &str =
    "{ match: 'POST /crm/v3/objects/{object}', bulk: 'POST /crm/v3/objects/{object}/batch/create', \
                           format: hubspot, max_items: 100, max_delay: 600ms }";

fn contact(email: &str) -> Value {
    json!({"properties": {"email": email, "firstname": "Ada", "lastname": "Lovelace"}, "associations": []})
}

/// sluice in front of a bulk-capable mock, one hubspot upstream at `/hubspot` with `extra` keys.
async fn batching(extra: &str, clients: &str) -> (MockCrm, BulkCrm, TestSluice) {
    let mock = MockCrm::start().await;
    let bulk = BulkCrm::install(&mock);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "pat-123\n").unwrap();
    let sluice = TestSluice::start_in(
        dir,
        &format!(
            "{clients}upstreams:\n  - {{ name: hubspot, prefix: /hubspot, target: '{}', batch: [{CREATE_RULE}]{extra} }}\n",
            mock.url()
        ),
    )
    .await;
    (mock, bulk, sluice)
}

/// Status and JSON body of a reqwest answer.
async fn answer(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Sends one create per email at once, each with the headers `headers(at)` gives.
async fn create_all(
    sluice: &TestSluice,
    emails: &[String],
    headers: impl Fn(usize) -> Vec<(&'static str, String)>,
) -> Vec<(u16, Value)> {
    let client = direct_client();
    let url = format!("{}/hubspot{CONTACTS}", sluice.proxy_url());
    let tasks: Vec<_> = emails
        .iter()
        .enumerate()
        .map(|(at, email)| {
            let mut request = client.post(&url).json(&contact(email));
            for (name, value) in headers(at) {
                request = request.header(name, value);
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

fn emails(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|at| format!("{prefix}-{at}@example.com")).collect()
}

fn bulk_requests(mock: &MockCrm) -> Vec<Recorded> {
    mock.requests().into_iter().filter(|request| is_bulk_path(&request.path)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_callers_own_controls_do_not_steer_the_bulk_call() {
    let (mock, bulk, sluice) =
        batching(", credentials: { prefix: 'Bearer ', value_file: $DIR/token }, retry: { attempts: 2 }", "").await;
    // The first call of the batch carries everything that used to decide the bulk call for all:
    // a deadline that has passed, no wait, an Accept the codec cannot split, and a Connection
    // header naming the injected credential as hop-by-hop.
    let body = contact("first@example.com").to_string();
    let mut first = RawConn::connect(sluice.running().proxy_addr).await;
    first
        .send(
            format!(
                "POST /hubspot{CONTACTS} HTTP/1.1\r\nHost: sluice\r\nContent-Type: application/json\r\n\
                 Sluice-Deadline: 0.001\r\nSluice-Max-Wait: 0\r\nAccept: application/xml\r\n\
                 Connection: authorization, content-type\r\nIdempotency-Key: first-1\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let others = emails("other", 5);
    let answers = create_all(&sluice, &others, |_| Vec::new()).await;
    let first_answer = first.response("POST").await.unwrap();

    for (email, (status, body)) in others.iter().zip(&answers) {
        assert_eq!(*status, 201, "{email}: {body}");
        assert_eq!(body["properties"]["email"], email.as_str());
    }
    let calls = bulk.bulk_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].inputs.len(), 6, "the first call shared the batch");
    assert_eq!(first_answer.status, 201, "{}", first_answer.head);
    let sent = &bulk_requests(&mock)[0];
    assert_eq!(sent.header("authorization"), Some("Bearer pat-123"), "the credential reached the vendor");
    assert_eq!(sent.header("accept"), Some("application/json"));
    assert_eq!(sent.header("content-type"), Some("application/json"));
    assert!(sent.header("idempotency-key").is_none(), "{:?}", sent.headers);
    assert!(single_calls(&mock).is_empty());
    assert!(sluice.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_batch_error_never_shows_one_caller_another_callers_input() {
    let (_mock, bulk, sluice) = batching("", "").await;
    let batch = emails("leak", 4);
    bulk.fail_bulk(Some((
        StatusCode::BAD_REQUEST,
        json!({
            "status": "error",
            "category": "VALIDATION_ERROR",
            "message": format!("Property values were not valid: invalid email {}", batch[0]),
            "correlationId": "8f1d"
        }),
    )));
    let answers = create_all(&sluice, &batch, |_| Vec::new()).await;
    assert_eq!(bulk.bulk_count(), 1);
    for (status, body) in &answers {
        assert_eq!(*status, 502, "{body}");
        assert_eq!(body["error"], "upstream_protocol_error", "{body}");
        assert!(body["detail"].as_str().unwrap().contains("400"), "{body}");
        assert!(!body.to_string().contains("@example.com"), "a caller saw a batch mate's input: {body}");
    }

    // A throttle of the whole batch stays a throttle for each caller.
    bulk.clear();
    bulk.fail_bulk(Some((StatusCode::TOO_MANY_REQUESTS, json!({"status": "error", "category": "RATE_LIMITS"}))));
    let client = direct_client();
    let url = format!("{}/hubspot{CONTACTS}", sluice.proxy_url());
    let tasks: Vec<_> = emails("throttled", 3)
        .into_iter()
        .map(|email| tokio::spawn(client.post(&url).json(&contact(&email)).send()))
        .collect();
    for task in tasks {
        let response = task.await.unwrap().unwrap();
        assert_eq!(response.status(), 429, "{response:?}");
        assert!(response.headers().contains_key("retry-after"), "{response:?}");
        let proxy_status = response.headers()["proxy-status"].to_str().unwrap().to_owned();
        assert!(proxy_status.starts_with("sluice; error=http_request_denied"), "{proxy_status}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "rate_limited");
    }
    assert!(sluice.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_in_the_credential_header_keep_batches_apart() {
    // `if_absent`: callers may bring their own token, in the upstream's own credential header.
    let (mock, _bulk, sluice) =
        batching(", credentials: { header: x-foo-token, value_file: $DIR/token, mode: if_absent }", "").await;
    let owners = ["a", "b", "none"];
    let batch: Vec<String> = (0..24).map(|at| format!("{}-{at}@example.com", owners[at % 3])).collect();
    let answers = create_all(&sluice, &batch, |at| match owners[at % 3] {
        "none" => Vec::new(),
        owner => vec![("x-foo-token", format!("token-{owner}"))],
    })
    .await;
    for (email, (status, body)) in batch.iter().zip(&answers) {
        assert_eq!(*status, 201, "{email}: {body}");
        assert_eq!(body["properties"]["email"], email.as_str());
    }
    let sent = bulk_requests(&mock);
    assert_eq!(sent.len(), 3, "one batch per token");
    let mut seen = HashSet::new();
    for request in &sent {
        let owner = match request.header("x-foo-token") {
            Some("token-a") => "a",
            Some("token-b") => "b",
            Some("pat-123") => "none",
            other => panic!("unexpected token {other:?}"),
        };
        assert!(seen.insert(owner));
        let inputs = request.json()["inputs"].as_array().unwrap().clone();
        assert_eq!(inputs.len(), 8);
        for input in inputs {
            let email = input["properties"]["email"].as_str().unwrap();
            assert!(email.starts_with(&format!("{owner}-")), "{owner}'s bulk call carried {email}");
        }
    }
    assert!(sluice.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_of_a_shared_egress_never_share_a_batch() {
    let sha = |text: &str| -> String {
        ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let clients = format!(
        "clients:\n  - {{ name: billing, secret_sha256: '{}', upstreams: [hubspot] }}\n  - {{ name: support, secret_sha256: '{}', upstreams: [hubspot] }}\n",
        sha("billing-pass"),
        sha("support-pass")
    );
    let (mock, _bulk, sluice) =
        batching(", credentials: { prefix: 'Bearer ', value_file: $DIR/token }", &clients).await;
    let batch = emails("tenant", 10);
    let answers = create_all(&sluice, &batch, |at| {
        let token = if at % 2 == 0 { "billing-pass" } else { "support-pass" };
        vec![("proxy-authorization", format!("Bearer {token}"))]
    })
    .await;
    assert!(answers.iter().all(|(status, _)| *status == 201), "{answers:?}");
    let sent = bulk_requests(&mock);
    assert_eq!(sent.len(), 2, "one batch per client, though both send the same injected credential");
    for request in &sent {
        let inputs = request.json()["inputs"].as_array().unwrap().clone();
        let parity: HashSet<u64> = inputs
            .iter()
            .map(|input| {
                let email = input["properties"]["email"].as_str().unwrap();
                email.trim_start_matches("tenant-").split('@').next().unwrap().parse::<u64>().unwrap() % 2
            })
            .collect();
        assert_eq!(parity.len(), 1, "a bulk call mixed both clients' calls");
        assert!(request.header("proxy-authorization").is_none(), "never forwarded");
    }
    assert!(sluice.shutdown().await);
}
