//! Budgets and rate limits through the real gateway, embedded store.

mod common;

use common::{records, sha256_hex};

use std::time::Duration;

use common::client::{self, Response};
use common::gateway::Gateway;
use common::mock::MockProvider;

const KEY: &str = "tg_budget_key";

/// `metered` costs $1 per million output tokens and nothing for input, so a request's
/// worst case (max_tokens × 1000 nano-USD) equals its actual cost on the mock's legacy
/// completion fixture (16 completion tokens).
fn config(mock: &MockProvider, limits: &str) -> String {
    format!(
        r#"
server: {{ listen: "{{{{PROXY_ADDR}}}}", admin_listen: "{{{{ADMIN_ADDR}}}}", data_dir: "{{{{DATA_DIR}}}}", threads: 2 }}
providers:
  openai: {{ kind: openai, base_url: "{mock}", api_key: sk-test }}
models:
  metered: {{ provider: openai, max_output_tokens: 16, price: {{ input: 0, output: 1 }} }}
  gpt-4o: {{ provider: openai }}
  gpt-4o-mini: {{ provider: openai }}
pricing: {{ file: "{prices}" }}
keys:
  - {{ id: k1, team: t1, sha256: {hash} }}
limits:
{limits}
"#,
        mock = mock.base_url(),
        prices = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/prices.yaml"),
        hash = sha256_hex(KEY),
    )
}

async fn start(limits: &str) -> (MockProvider, Gateway) {
    let mock = MockProvider::start().await;
    let gw = Gateway::start_async(&config(&mock, limits)).await;
    (mock, gw)
}

async fn completion(gw: &Gateway, customer: &str, body: &str) -> Response {
    client::request(
        gw.proxy_addr(),
        "POST",
        "/v1/completions",
        &[
            ("authorization", "Bearer tg_budget_key"),
            ("x-tollgate-customer", customer),
            ("x-mock-fixture", "openai-completions-legacy"),
        ],
        body.as_bytes(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_parallel_requests_admit_exactly_the_affordable_ones() {
    // 10 requests of 16 tokens × 1000 nano fit in 168,000 nano; the 11th does not.
    let (mock, gw) = start(
        "  budgets:\n    - { scope: customer, id: agent, period: daily, cap_usd: \"0.000168\" }",
    )
    .await;
    let body = r#"{"model":"metered","prompt":"hi","max_tokens":16}"#;
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let addr = gw.proxy_addr();
            tokio::spawn(async move {
                client::request(
                    addr,
                    "POST",
                    "/v1/completions",
                    &[
                        ("authorization", "Bearer tg_budget_key"),
                        ("x-tollgate-customer", "agent"),
                        ("x-mock-fixture", "openai-completions-legacy"),
                    ],
                    body.as_bytes(),
                )
                .await
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.expect("task").status);
    }
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((admitted, refused), (10, 190), "statuses: {statuses:?}");
    assert_eq!(
        mock.request_count(),
        10,
        "refused requests never reach the provider"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let spent: u64 = records(&gw)
        .iter()
        .filter(|r| r["status"] == 200)
        .filter_map(|r| r["cost_nano_usd"].as_u64())
        .sum();
    assert_eq!(spent, 160_000);
    assert!(spent <= 168_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn refusal_is_a_429_in_provider_format_with_retry_after() {
    let (mock, gw) =
        start("  budgets:\n    - { scope: customer, id: broke, period: monthly, cap_usd: 0 }")
            .await;
    let r = completion(
        &gw,
        "broke",
        r#"{"model":"metered","prompt":"hi","max_tokens":16}"#,
    )
    .await;
    assert_eq!(r.status, 429);
    let v = r.json();
    assert_eq!(v["error"]["type"], "budget_exceeded");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("monthly budget of customer:broke"),
        "{v}"
    );
    let retry: u64 = r
        .header("retry-after")
        .and_then(|s| s.parse().ok())
        .expect("retry-after");
    assert!(retry > 0 && retry <= 31 * 86_400);
    assert_eq!(mock.request_count(), 0);

    let r = client::request(
        gw.proxy_addr(),
        "POST",
        "/v1/messages",
        &[("x-api-key", KEY), ("x-tollgate-customer", "broke")],
        br#"{"model":"metered","max_tokens":5,"messages":[]}"#,
    )
    .await;
    assert_eq!(
        r.status,
        400,
        "metered is an OpenAI-kind model: {}",
        r.text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn clamp_lowers_max_tokens_so_the_cap_holds_without_max_tokens() {
    // 16 tokens × 1000 nano = 16,000 per full request; the cap affords 2 full ones and 8 tokens.
    let (mock, gw) = start("  budgets:\n    - { scope: customer, id: c, period: daily, cap_usd: \"0.000040\", action: clamp }").await;
    let mut worst = 0u64;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r = completion(&gw, "c", r#"{"model":"metered","prompt":"hi"}"#).await;
        statuses.push(r.status);
        if r.status == 200 {
            let sent = mock.last().expect("called").json();
            worst += sent["max_tokens"]
                .as_u64()
                .expect("the bound is written into the request")
                * 1000;
        }
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 429],
        "two full requests, one clamped, then nothing fits"
    );
    let sent: Vec<u64> = mock
        .requests()
        .iter()
        .map(|r| r.json()["max_tokens"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(sent, [16, 16, 8]);
    assert!(worst <= 40_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn budget_headers_max_cost_shadow_and_downgrade() {
    let limits = "  budgets:\n    - { scope: team, period: monthly, cap_usd: 1 }\n    - { scope: customer, id: shady, period: daily, cap_usd: 0, action: shadow }\n    - { scope: customer, id: big, period: daily, cap_usd: \"0.002\", action: downgrade, downgrade_to: gpt-4o-mini, downgrade_at: 0 }";
    let (mock, gw) = start(limits).await;
    let r = completion(
        &gw,
        "anyone",
        r#"{"model":"metered","prompt":"hi","max_tokens":16}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-tollgate-budget-scope"), Some("team:t1 monthly"));
    assert_eq!(
        r.header("x-tollgate-budget-remaining"),
        Some("0.999984"),
        "$1 minus this request's reservation"
    );
    assert!(r
        .header("x-tollgate-budget-reset")
        .is_some_and(|t| t.ends_with("-01T00:00:00Z")));

    let r = client::request(
        gw.proxy_addr(),
        "POST",
        "/v1/completions",
        &[
            ("authorization", "Bearer tg_budget_key"),
            ("x-tollgate-max-cost", "0.00001"),
        ],
        br#"{"model":"metered","prompt":"hi","max_tokens":16}"#,
    )
    .await;
    assert_eq!(r.status, 429, "worst case $0.000016 > max cost $0.00001");
    let r = client::request(
        gw.proxy_addr(),
        "POST",
        "/v1/completions",
        &[
            ("authorization", "Bearer tg_budget_key"),
            ("x-tollgate-max-cost", "lots"),
        ],
        b"{\"model\":\"metered\"}",
    )
    .await;
    assert_eq!(r.status, 400);

    let r = completion(
        &gw,
        "shady",
        r#"{"model":"metered","prompt":"hi","max_tokens":16}"#,
    )
    .await;
    assert_eq!(r.status, 200, "a shadow budget never blocks");
    let m = client::get(gw.admin_addr(), "/metrics").await.text();
    assert!(
        m.contains("tollgate_shadow_budget_refusals_total{scope_kind=\"customer\"} 1"),
        "{m}"
    );

    mock.clear_requests();
    let r = client::request(
        gw.proxy_addr(),
        "POST",
        "/v1/chat/completions",
        &[
            ("authorization", "Bearer tg_budget_key"),
            ("x-tollgate-customer", "big"),
        ],
        br#"{"model":"gpt-4o","messages":[],"max_tokens":10}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-tollgate-model-shifted"),
        Some("gpt-4o -> gpt-4o-mini")
    );
    assert_eq!(mock.last().expect("called").json()["model"], "gpt-4o-mini");
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limits_answer_429_with_openai_headers() {
    let (_mock, gw) = start("  rate_limits:\n    - { scope: key, rpm: 2 }").await;
    let body = r#"{"model":"metered","prompt":"hi","max_tokens":16}"#;
    assert_eq!(completion(&gw, "x", body).await.status, 200);
    assert_eq!(completion(&gw, "x", body).await.status, 200);
    let r = completion(&gw, "x", body).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("2"));
    assert!(r
        .header("retry-after")
        .and_then(|s| s.parse::<u64>().ok())
        .is_some_and(|s| (1..=30).contains(&s)));
}

#[tokio::test(flavor = "multi_thread")]
async fn spend_survives_a_restart() {
    let (_mock, mut gw) =
        start("  budgets:\n    - { scope: customer, id: p, period: total, cap_usd: \"0.000040\" }")
            .await;
    let body = r#"{"model":"metered","prompt":"hi","max_tokens":16}"#;
    assert_eq!(completion(&gw, "p", body).await.status, 200);
    assert_eq!(completion(&gw, "p", body).await.status, 200);
    // Settlement is off the request path and the journal syncs within 200 ms.
    tokio::time::sleep(Duration::from_millis(600)).await;
    gw.restart_async().await;
    let r = completion(&gw, "p", body).await;
    assert_eq!(
        r.status,
        429,
        "32,000 of 40,000 nano spent before the restart: {}",
        r.text()
    );
    let r = completion(
        &gw,
        "p",
        r#"{"model":"metered","prompt":"hi","max_tokens":8}"#,
    )
    .await;
    assert_eq!(r.status, 200, "8,000 still fit");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_a_request_in_flight_finish_and_keeps_its_settlement() {
    // A request of max_tokens 8 reserves 8,000 nano; the fixture's 16 tokens cost 16,000.
    // After the restart, a 16,000-nano request fits in 30,000 only if the settlement
    // (not just the reservation) reached the journal before the process ended.
    let (mock, mut gw) =
        start("  budgets:\n    - { scope: customer, id: d, period: total, cap_usd: \"0.000030\" }")
            .await;
    let addr = gw.proxy_addr();
    let slow = tokio::spawn(async move {
        client::request(
            addr,
            "POST",
            "/v1/completions",
            &[
                ("authorization", "Bearer tg_budget_key"),
                ("x-tollgate-customer", "d"),
                ("x-mock-fixture", "openai-completions-legacy"),
                ("x-mock-delay-ms", "1500"),
            ],
            br#"{"model":"metered","prompt":"hi","max_tokens":8}"#,
        )
        .await
    });
    mock.wait_for("the slow request", Duration::from_secs(5), |m| {
        m.request_count() == 1
    })
    .await;
    let sent = std::time::Instant::now();
    let status = tokio::task::block_in_place(|| gw.terminate(Duration::from_secs(15)));
    let took = sent.elapsed();
    let r = slow.await.expect("the request's task");
    assert_eq!(r.status, 200, "finished during the drain: {}", r.describe());
    assert_eq!(r.header("x-tollgate-cost"), Some("0.000016"));
    assert!(
        status.is_some_and(|s| s.success()),
        "exits by itself, cleanly: {status:?}\n{}",
        gw.log()
    );
    assert!(
        took < Duration::from_secs(8),
        "exits once drained, not after the 20 s bound: {took:?}"
    );
    assert!(gw.log().contains("drained, exiting"), "{}", gw.log());

    gw.restart_async().await;
    let r = completion(
        &gw,
        "d",
        r#"{"model":"metered","prompt":"hi","max_tokens":16}"#,
    )
    .await;
    assert_eq!(
        r.status,
        429,
        "16,000 settled before the stop + 16,000 > 30,000: {}",
        r.text()
    );
    let r = completion(
        &gw,
        "d",
        r#"{"model":"metered","prompt":"hi","max_tokens":14}"#,
    )
    .await;
    assert_eq!(r.status, 200, "14,000 still fit: {}", r.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_right_after_a_request_keeps_its_settlement_in_the_journal() {
    // SIGINT is the fast stop: no drain, but the journal's buffer is written out, so a
    // settlement made just before it (inside the syncer's 200 ms) survives the restart.
    let (_mock, mut gw) =
        start("  budgets:\n    - { scope: customer, id: q, period: total, cap_usd: \"0.000030\" }")
            .await;
    let r = completion(
        &gw,
        "q",
        r#"{"model":"metered","prompt":"hi","max_tokens":8}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(gw.signal("INT"));
    assert!(
        gw.exits_within(Duration::from_secs(5)).await,
        "a fast stop is fast"
    );
    gw.restart_async().await;
    let r = completion(
        &gw,
        "q",
        r#"{"model":"metered","prompt":"hi","max_tokens":16}"#,
    )
    .await;
    assert_eq!(
        r.status,
        429,
        "16,000 settled before the stop + 16,000 > 30,000: {}",
        r.text()
    );
}
