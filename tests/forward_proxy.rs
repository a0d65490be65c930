#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use support::{MockCrm, TestSluice};

#[tokio::test]
async fn absolute_form_request_reaches_target() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&format!(
        "upstreams:\n  - {{ name: hubspot, hosts: [api.hubapi.com], target: '{}' }}\n",
        mock.url()
    ))
    .await;
    let response =
        sluice.proxied_client().get("http://api.hubapi.com/crm/v3/objects/contacts?limit=1").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/crm/v3/objects/contacts");
    assert_eq!(seen[0].query.as_deref(), Some("limit=1"));
    assert!(seen[0].header("via").unwrap().contains("sluice"));
    sluice.shutdown().await;
}
