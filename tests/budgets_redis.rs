//! Budgets on the Redis store: two gateway processes sharing one Redis, and Redis faults.

mod common;

use common::sha256_hex;

use std::time::Duration;

use common::client;
use common::gateway::Gateway;
use common::mock::MockProvider;
use common::redis::RedisServer;

fn config(mock: &MockProvider, redis: &RedisServer, limits: &str) -> String {
    format!(
        r#"
server: {{ listen: "{{{{PROXY_ADDR}}}}", admin_listen: "{{{{ADMIN_ADDR}}}}", data_dir: "{{{{DATA_DIR}}}}" }}
providers:
  openai: {{ kind: openai, base_url: "{mock}", api_key: sk-test }}
models:
  metered: {{ provider: openai, max_output_tokens: 16, price: {{ input: 0, output: 1 }} }}
keys:
  - {{ id: k1, team: t1, sha256: {hash} }}
store: {{ kind: redis, redis_url: "{redis}", prefix: "tg-test:", timeout_ms: 300 }}
admin: {{ token: admin-token }}
limits:
{limits}
"#,
        mock = mock.base_url(),
        redis = redis.url(),
        hash = sha256_hex("tg_redis_key"),
    )
}

async fn completion(addr: std::net::SocketAddr, customer: &str) -> u16 {
    client::request(
        addr,
        "POST",
        "/v1/completions",
        &[
            ("authorization", "Bearer tg_redis_key"),
            ("x-tollgate-customer", customer),
            ("x-mock-fixture", "openai-completions-legacy"),
        ],
        br#"{"model":"metered","prompt":"hi","max_tokens":16}"#,
    )
    .await
    .status
}

/// `n` completions for `customer` sent at once, alternately through `a` and `b`; their
/// statuses.
async fn send_at_once(a: &Gateway, b: &Gateway, customer: &'static str, n: usize) -> Vec<u16> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let addr = if i % 2 == 0 {
                a.proxy_addr()
            } else {
                b.proxy_addr()
            };
            tokio::spawn(async move { completion(addr, customer).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.expect("task"));
    }
    statuses
}

#[tokio::test(flavor = "multi_thread")]
async fn two_gateways_sharing_redis_admit_exactly_the_affordable_requests() {
    let redis = RedisServer::start();
    let mock = MockProvider::start().await;
    let yaml = config(
        &mock,
        &redis,
        "  budgets:\n    - { scope: customer, id: agent, period: daily, cap_usd: \"0.000168\" }",
    );
    let a = Gateway::start_async(&yaml).await;
    let b = Gateway::start_async(&yaml).await;
    let statuses = send_at_once(&a, &b, "agent", 200).await;
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(admitted, 10, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 190);
    assert_eq!(
        mock.request_count(),
        10,
        "refused requests never reach the provider"
    );
}

/// Budget slices (`store.slice_requests`): two gateways admit from slices of the same cap
/// at once. Neither may admit past the cap; once the slices are given back, the whole cap
/// is usable again, to the last request that fits, and the books balance.
#[tokio::test(flavor = "multi_thread")]
async fn budget_slices_never_overspend_and_give_the_whole_cap_back() {
    let redis = RedisServer::start();
    let mock = MockProvider::start().await;
    // A total budget: a daily one takes no slices in the last lease time before midnight.
    let yaml = config(
        &mock,
        &redis,
        "  budgets:\n    - { scope: customer, id: agent, period: total, cap_usd: \"0.000168\" }",
    )
    .replace(
        "timeout_ms: 300 }",
        "timeout_ms: 300, slice_requests: 4, slice_ms: 200 }",
    );
    let a = Gateway::start_async(&yaml).await;
    let b = Gateway::start_async(&yaml).await;
    // Each request reserves 16,000 and costs 16,000: ten fit in 168,000, not eleven.
    // Each gateway's first request takes a slice of 4 (the cap is untouched then).
    assert_eq!(completion(a.proxy_addr(), "agent").await, 200);
    assert_eq!(completion(b.proxy_addr(), "agent").await, 200);
    let statuses = send_at_once(&a, &b, "agent", 198).await;
    let at_once = 2 + statuses.iter().filter(|s| **s == 200).count();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!(at_once <= 10, "{statuses:?}");
    assert_eq!(
        mock.request_count(),
        at_once,
        "refused requests cost nothing"
    );

    // Headroom parked in a slice may refuse a request that would fit alone (the price of
    // slices); once slices are closed (within two slice_ms) and given back, it is free.
    let mut later = 0;
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(450)).await;
        match completion(a.proxy_addr(), "agent").await {
            200 => later += 1,
            429 => break,
            other => panic!("status {other}"),
        }
    }
    assert_eq!(at_once + later, 10, "{at_once} at once, then {later}");
    assert_eq!(mock.request_count(), 10);
    assert!(settlements_waiting_until(&a, |n| n == 0).await);
    assert!(settlements_waiting_until(&b, |n| n == 0).await);
    assert_eq!(spent_nano(&a, "customer:agent").await, Some(160_000));
    // Slices were taken and given back (each give-back leaves its exactly-once marker):
    // per-request reservations alone would also have passed the assertions above.
    let markers = redis.cli(&["--scan", "--pattern", "tg-test:*done:slice-*"]);
    assert!(markers.lines().count() >= 1, "{markers:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_down_follows_on_store_error_and_recovers() {
    let mut redis = RedisServer::start_persistent();
    let mock = MockProvider::start().await;
    let limits = "  budgets:\n    - { scope: customer, id: strict, period: daily, cap_usd: 1 }\n    - { scope: customer, id: lenient, period: daily, cap_usd: 1, on_store_error: open }";
    let gw = Gateway::start_async(&config(&mock, &redis, limits)).await;
    assert_eq!(completion(gw.proxy_addr(), "strict").await, 200);
    assert_eq!(client::get(gw.admin_addr(), "/readyz").await.status, 200);

    redis.stop();
    mock.clear_requests();
    let started = std::time::Instant::now();
    assert_eq!(
        completion(gw.proxy_addr(), "strict").await,
        503,
        "closed: refuse, forward nothing"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "no hang: {:?}",
        started.elapsed()
    );
    assert_eq!(mock.request_count(), 0);
    assert_eq!(
        completion(gw.proxy_addr(), "lenient").await,
        200,
        "open: admit"
    );
    assert_eq!(client::get(gw.admin_addr(), "/readyz").await.status, 503);
    let m = client::get(gw.admin_addr(), "/metrics").await.text();
    assert!(
        m.contains("tollgate_store_degraded_total{outcome=\"refused_closed\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("tollgate_store_degraded_total{outcome=\"admitted_open\"} 1"),
        "{m}"
    );

    // The open-mode request's settlement waits for Redis, shown by the queue's gauge.
    assert!(
        settlements_waiting_until(&gw, |n| n >= 1).await,
        "a settlement waits"
    );

    // Redis comes back empty (scripts gone): requests succeed again without a failure.
    redis.restart();
    let mut ok = false;
    for _ in 0..40 {
        if completion(gw.proxy_addr(), "strict").await == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the gateway reconnected to Redis by itself");
    for _ in 0..5 {
        assert_eq!(completion(gw.proxy_addr(), "strict").await, 200);
    }

    // The request admitted open during the outage is settled into Redis once it is back.
    let mut lenient = 0;
    for _ in 0..50 {
        lenient = spent_nano(&gw, "customer:lenient").await.unwrap_or(0);
        if lenient == 16_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(lenient, 16_000, "the open-mode settlement was replayed");
    assert!(
        settlements_waiting_until(&gw, |n| n == 0).await,
        "nothing waits once Redis is back"
    );
}

/// The spend the management API lists for a budget's scope, as the store counts it.
async fn spent_nano(gw: &Gateway, scope: &str) -> Option<u64> {
    let budgets = client::request(
        gw.admin_addr(),
        "GET",
        "/v1/budgets",
        &[("authorization", "Bearer admin-token")],
        b"",
    )
    .await
    .json();
    budgets["budgets"]
        .as_array()?
        .iter()
        .find(|x| x["scope"] == scope)?["spent_nano"]
        .as_u64()
}

/// Polls `tollgate_settlements_waiting` (for up to 5 s) until `done` holds for it.
async fn settlements_waiting_until(gw: &Gateway, done: impl Fn(u64) -> bool) -> bool {
    for _ in 0..50 {
        let m = client::get(gw.admin_addr(), "/metrics").await.text();
        let n = m
            .lines()
            .find_map(|l| l.strip_prefix("tollgate_settlements_waiting "))
            .and_then(|n| n.trim().parse().ok());
        if n.is_some_and(&done) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn alerts_fire_once_per_threshold_across_gateways_and_are_signed() {
    let redis = RedisServer::start();
    let mock = MockProvider::start().await;
    let limits = format!(
        "  budgets:\n    - {{ scope: customer, id: agent, period: daily, cap_usd: \"0.000168\", alert_thresholds: [0.5, 0.9] }}\n  alerts: {{ webhook_url: \"{}/hooks/tollgate\", secret: s3cret }}",
        mock.base_url()
    );
    let yaml = config(&mock, &redis, &limits);
    let a = Gateway::start_async(&yaml).await;
    let b = Gateway::start_async(&yaml).await;
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let addr = if i % 2 == 0 {
                a.proxy_addr()
            } else {
                b.proxy_addr()
            };
            tokio::spawn(async move { completion(addr, "agent").await })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let hooks = || {
        mock.requests()
            .into_iter()
            .filter(|r| r.path == "/hooks/tollgate")
            .collect::<Vec<_>>()
    };
    for _ in 0..50 {
        if hooks().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hooks = hooks();
    let thresholds: Vec<f64> = hooks
        .iter()
        .filter_map(|h| h.json()["threshold"].as_f64())
        .collect();
    assert_eq!(
        hooks.len(),
        2,
        "one event per threshold across both gateways: {thresholds:?}"
    );
    assert!(
        thresholds.contains(&0.5) && thresholds.contains(&0.9),
        "{thresholds:?}"
    );
    for h in &hooks {
        let sig = tollgate::auth::to_hex(&tollgate::alerts::hmac_sha256(b"s3cret", &h.body));
        assert_eq!(
            h.header("x-tollgate-signature"),
            Some(format!("sha256={sig}").as_str())
        );
        assert_eq!(h.json()["scope"], "customer:agent");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_the_settlement_queue_into_redis() {
    let redis = RedisServer::start();
    let mock = MockProvider::start().await;
    let yaml = config(
        &mock,
        &redis,
        "  budgets:\n    - { scope: customer, id: d, period: daily, cap_usd: 1 }",
    );
    let mut gw = Gateway::start_async(&yaml).await;
    let addr = gw.proxy_addr();
    // Reserves 8,000 nano (max_tokens 8); the fixture's 16 tokens cost 16,000.
    let slow = tokio::spawn(async move {
        client::request(
            addr,
            "POST",
            "/v1/completions",
            &[
                ("authorization", "Bearer tg_redis_key"),
                ("x-tollgate-customer", "d"),
                ("x-mock-fixture", "openai-completions-legacy"),
                ("x-mock-delay-ms", "1000"),
            ],
            br#"{"model":"metered","prompt":"hi","max_tokens":8}"#,
        )
        .await
    });
    mock.wait_for("the slow request", Duration::from_secs(5), |m| {
        m.request_count() == 1
    })
    .await;
    let status = tokio::task::block_in_place(|| gw.terminate(Duration::from_secs(15)));
    let r = slow.await.expect("the request's task");
    assert_eq!(r.status, 200, "finished during the drain: {}", r.describe());
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        gw.log()
    );

    // The settlement went through the queue (GATHER later) before the process ended:
    // Redis holds the actual cost, not the 8,000 reserved.
    gw.restart_async().await;
    assert_eq!(spent_nano(&gw, "customer:d").await, Some(16_000));

    // Its usage rollup reached the shared rollups too: pushed by the drain (the periodic
    // push stops at the signal), not rebuilt by the restarted gateway from its ledger.
    let usage = client::request(
        gw.admin_addr(),
        "GET",
        "/v1/usage",
        &[("authorization", "Bearer admin-token")],
        b"",
    )
    .await
    .json();
    assert_eq!(usage["total_requests"], 1, "{usage}");
    assert_eq!(usage["total_cost_nano"], 16_000, "{usage}");
}
