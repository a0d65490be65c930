#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Quotas on a Redis Cluster of three masters on loopback (issue 3): every quota key of a request
//! shares the upstream's hash tag, so the one Lua call runs on one shard. Two sluice replicas,
//! two quotas with different scopes (a per-tenant rolling window and an upstream-wide fixed
//! window): each limit is enforced across both replicas and the store never degrades.
//!
//! Needs `redis-server` and `redis-cli` (CI installs redis-server / redis-tools); without them
//! the test fails loudly rather than skipping.
mod support;

use serde_json::Value;
use support::cluster::Cluster;
use support::{direct_client, metric_value, MockCrm, TestSluice};

fn yaml(cluster: &Cluster, mock: &MockCrm) -> String {
    let upstream = |name: &str| {
        format!(
            "  - name: {name}
    prefix: /{name}
    target: '{}'
    over_limit: reject
    quotas:
      - {{ name: burst, limit: 3, per: 10s, key: [header:x-tenant-id] }}
      - {{ name: daily, limit: 5, per: 1d, window: fixed, resets_at: '00:00 America/New_York' }}
",
            mock.url()
        )
    };
    format!(
        "store: {{ kind: redis, url: '{}', timeout: 1s, heartbeat: 500ms }}\nupstreams:\n{}{}",
        cluster.url(),
        upstream("hubspot"),
        upstream("salesforce")
    )
}

/// `n` requests for `tenant` to `upstream`, alternating between the replicas; allowed count.
async fn allowed(replicas: &[TestSluice], upstream: &str, tenant: &str, n: usize) -> usize {
    let client = direct_client();
    let mut ok = 0;
    for i in 0..n {
        let sluice = &replicas[i % replicas.len()];
        let url = format!("{}/{upstream}/crm/v3/objects/contacts", sluice.proxy_url());
        let response = client.get(&url).header("x-tenant-id", tenant).send().await.unwrap();
        match response.status().as_u16() {
            200 => ok += 1,
            429 => {}
            other => panic!("{upstream}/{tenant}: unexpected {other}: {}", response.text().await.unwrap()),
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_enforces_multi_window_quotas_across_replicas() {
    let cluster = Cluster::start();
    let mock = MockCrm::start().await;
    let replicas =
        vec![TestSluice::start(&yaml(&cluster, &mock)).await, TestSluice::start(&yaml(&cluster, &mock)).await];
    for sluice in &replicas {
        let ready: Value = direct_client().get(sluice.admin_url("/readyz")).send().await.unwrap().json().await.unwrap();
        assert_eq!(ready["store"]["mode"], "shared", "connected to the cluster: {ready}");
    }

    for upstream in ["hubspot", "salesforce"] {
        // The per-tenant rolling window is the smaller limit for one tenant...
        assert_eq!(allowed(&replicas, upstream, "acme", 6).await, 3, "{upstream}: burst 3 per tenant");
        // ...then the upstream-wide fixed window leaves 2 for the next tenant, and none after.
        assert_eq!(allowed(&replicas, upstream, "beta", 6).await, 2, "{upstream}: daily 5 per upstream");
        assert_eq!(allowed(&replicas, upstream, "gamma", 3).await, 0, "{upstream}: daily exhausted");
    }
    assert_eq!(mock.request_count(), 10);

    // Concurrent requests through both replicas for a third upstream-wide check: none slip by.
    let mut tasks = Vec::new();
    for sluice in &replicas {
        let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
        for _ in 0..5 {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                direct_client().get(&url).header("x-tenant-id", "delta").send().await.unwrap().status().as_u16()
            }));
        }
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 429, "the fixed window is spent for every tenant");
    }

    for sluice in &replicas {
        let metrics = sluice.metrics().await;
        assert_eq!(metric_value(&metrics, "sluice_store_degraded", &[]), 0.0, "{metrics}");
        assert_eq!(metric_value(&metrics, "sluice_store_errors_total", &[]), 0.0, "{metrics}");
        let quotas: Value =
            direct_client().get(sluice.admin_url("/quotas")).send().await.unwrap().json().await.unwrap();
        assert_eq!(quotas["store"]["mode"], "shared", "{quotas}");
        assert_eq!(quotas["store"]["kind"], "redis", "{quotas}");
    }
    let keys = cluster.key_counts();
    println!("cluster keys per node: {keys:?}");
    assert!(keys.iter().sum::<u64>() >= 4, "quota keys live in the cluster: {keys:?}");
    // `{hubspot}` and `{salesforce}` hash to slots served by different masters.
    assert!(keys.iter().filter(|k| **k > 0).count() >= 2, "keys spread over the shards: {keys:?}");

    for sluice in replicas {
        sluice.shutdown().await;
    }
}
