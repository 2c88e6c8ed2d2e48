//! The usage ledger and API over real HTTP, and the books: records, usage API, Prometheus
//! and the budget store agree to the nano-USD.

mod common;

use common::{records, sha256_hex};

use std::time::Duration;

use common::client::{self, Response};
use common::gateway::Gateway;
use common::mock::MockProvider;

const KEY: &str = "tg_usage_key";
const OTHER_KEY: &str = "tg_other_team_key";
const ADMIN: &str = "admin-secret-token";

fn config(mock: &MockProvider) -> String {
    format!(
        r#"
server: {{ listen: "{{{{PROXY_ADDR}}}}", admin_listen: "{{{{ADMIN_ADDR}}}}", data_dir: "{{{{DATA_DIR}}}}" }}
providers:
  openai: {{ kind: openai, base_url: "{mock}", api_key: sk-test, timeouts: {{ idle_ms: 2000 }} }}
  anthropic: {{ kind: anthropic, base_url: "{mock}", api_key: sk-ant }}
models:
  gpt-4o: {{ provider: openai }}
  claude-sonnet-4-5: {{ provider: anthropic }}
pricing: {{ file: "{prices}" }}
admin: {{ token: {ADMIN} }}
keys:
  - {{ id: k1, team: alpha, sha256: {key} }}
  - {{ id: k2, team: beta, sha256: {other} }}
limits:
  budgets:
    - {{ scope: global, period: total, cap_usd: 1000 }}
"#,
        mock = mock.base_url(),
        prices = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/prices.yaml"),
        key = sha256_hex(KEY),
        other = sha256_hex(OTHER_KEY),
    )
}

async fn call(
    gw: &Gateway,
    key: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Response {
    let auth = format!("Bearer {key}");
    let mut all = vec![("authorization", auth.as_str())];
    all.extend_from_slice(headers);
    client::request(gw.proxy_addr(), "POST", path, &all, body.as_bytes()).await
}

async fn admin_get(gw: &Gateway, path: &str, token: &str) -> Response {
    let auth = format!("Bearer {token}");
    client::request(
        gw.admin_addr(),
        "GET",
        path,
        &[("authorization", auth.as_str())],
        b"",
    )
    .await
}

fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Drives every kind of call: both formats, JSON and streams, sandbox, a provider error,
/// a broken stream and a client that leaves.
async fn mixed_load(gw: &Gateway) {
    let chat = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    let chat_stream = r#"{"model":"gpt-4o","stream":true,"messages":[]}"#;
    let msgs = r#"{"model":"claude-sonnet-4-5","max_tokens":100,"messages":[]}"#;
    let msgs_stream =
        r#"{"model":"claude-sonnet-4-5","max_tokens":100,"stream":true,"messages":[]}"#;
    for (customer, feature) in [("acme", "search"), ("acme", "chat"), ("globex", "search")] {
        let h = [
            ("x-tollgate-customer", customer),
            ("x-tollgate-feature", feature),
            ("x-tollgate-prompt-key", "greet"),
            ("x-tollgate-prompt-version", "v1"),
        ];
        assert_eq!(
            call(gw, KEY, "/v1/chat/completions", &h, chat).await.status,
            200
        );
        assert_eq!(
            call(gw, KEY, "/v1/chat/completions", &h, chat_stream)
                .await
                .status,
            200
        );
        assert_eq!(call(gw, KEY, "/v1/messages", &h, msgs).await.status, 200);
        assert_eq!(
            call(gw, KEY, "/v1/messages", &h, msgs_stream).await.status,
            200
        );
    }
    let v2 = [
        ("x-tollgate-prompt-key", "greet"),
        ("x-tollgate-prompt-version", "v2"),
    ];
    assert_eq!(
        call(gw, OTHER_KEY, "/v1/chat/completions", &v2, chat)
            .await
            .status,
        200
    );
    let sandbox = [
        ("x-tollgate-sandbox", "true"),
        ("x-tollgate-customer", "sandboxed"),
    ];
    assert_eq!(
        call(gw, KEY, "/v1/chat/completions", &sandbox, chat_stream)
            .await
            .status,
        200
    );
    let err = [("x-mock-fixture", "openai-error-429")];
    assert_eq!(
        call(gw, KEY, "/v1/chat/completions", &err, chat)
            .await
            .status,
        429
    );
    let broken = [("x-mock-reset-after-events", "6")];
    let auth = format!("Bearer {KEY}");
    let mut h = vec![("authorization", auth.as_str())];
    h.extend_from_slice(&broken);
    let _ = client::try_request(
        gw.proxy_addr(),
        "POST",
        "/v1/chat/completions",
        &h,
        chat_stream.as_bytes(),
    )
    .await;
    let leave = [
        ("authorization", auth.as_str()),
        ("x-mock-chunk-delay-ms", "30"),
    ];
    client::request_then_disconnect(
        gw.proxy_addr(),
        "POST",
        "/v1/messages",
        &leave,
        msgs_stream.as_bytes(),
        500,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_books_balance_to_the_nano_usd() {
    let mock = MockProvider::start().await;
    let gw = Gateway::start_async(&config(&mock)).await;
    books_balance(&gw).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_books_balance_on_the_redis_store_too() {
    let redis = common::redis::RedisServer::start();
    let mock = MockProvider::start().await;
    let yaml = format!(
        "{}store: {{ kind: redis, redis_url: \"{}\" }}\n",
        config(&mock),
        redis.url()
    );
    let gw = Gateway::start_async(&yaml).await;
    books_balance(&gw).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gateways_sharing_redis_share_the_usage_rollups() {
    let redis = common::redis::RedisServer::start();
    let mock = MockProvider::start().await;
    let yaml = format!(
        "{}store: {{ kind: redis, redis_url: \"{}\", catalog_refresh_ms: 100 }}\n",
        config(&mock),
        redis.url()
    );
    let a = Gateway::start_async(&yaml).await;
    let b = Gateway::start_async(&yaml).await;
    mixed_load(&a).await;
    let chat = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    for customer in ["acme", "initech"] {
        let h = [("x-tollgate-customer", customer)];
        assert_eq!(
            call(&b, KEY, "/v1/chat/completions", &h, chat).await.status,
            200
        );
    }
    let mut last = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let recs: Vec<_> = records(&a).into_iter().chain(records(&b)).collect();
        let cost: u64 = recs
            .iter()
            .filter_map(|r| r["cost_nano_usd"].as_u64())
            .sum();
        let on_a = admin_get(&a, "/v1/usage?group_by=customer", ADMIN)
            .await
            .json();
        let on_b = admin_get(&b, "/v1/usage?group_by=customer", ADMIN)
            .await
            .json();
        let figures = [
            on_a["total_requests"].as_u64(),
            on_b["total_requests"].as_u64(),
            on_a["total_cost_nano"].as_u64(),
            on_b["total_cost_nano"].as_u64(),
        ];
        if recs.len() == 19
            && figures == [Some(19), Some(19), Some(cost), Some(cost)]
            && on_b["groups"]
                .as_array()
                .is_some_and(|g| g.iter().any(|g| g["key"] == "initech"))
        {
            // The CSV export and the team listing read the same shared rollups.
            let csv = admin_get(&a, "/v1/usage?group_by=customer&format=csv", ADMIN)
                .await
                .text();
            assert!(csv.lines().any(|l| l.starts_with("initech,1,")), "{csv}");
            return;
        }
        last = Some((recs.len(), cost, figures));
    }
    panic!("the usage API does not see both gateways' usage: {last:?}");
}

async fn books_balance(gw: &Gateway) {
    mixed_load(gw).await;
    // Records of the disconnected client and settlements land off the request path.
    let mut last = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let recs = records(gw);
        let from_records: u64 = recs
            .iter()
            .filter_map(|r| r["cost_nano_usd"].as_u64())
            .sum();
        let usage = admin_get(gw, "/v1/usage", ADMIN).await.json();
        let metrics = client::get(gw.admin_addr(), "/metrics").await.text();
        let prom = metric_sum(&metrics, "tollgate_cost_nano_usd_total");
        let budget = usage["budget"]["periods"]["total"]["spent_nano"]
            .as_u64()
            .unwrap_or(0);
        let figures = (
            recs.len() as u64,
            from_records,
            usage["total_requests"].as_u64().unwrap_or(0),
            usage["total_cost_nano"].as_u64().unwrap_or(0),
            prom,
            budget,
        );
        if recs.len() == 17
            && [figures.1, figures.3, figures.4, figures.5]
                .iter()
                .all(|v| *v == from_records)
        {
            assert!(from_records > 0);
            assert!(
                recs.iter().any(|r| r["estimated"] == true),
                "the broken and abandoned streams are estimated"
            );
            assert!(recs.iter().any(|r| r["client_gone"] == true));
            assert!(recs.iter().any(|r| r["sandbox"] == true));
            return;
        }
        last = Some(figures);
    }
    panic!("books do not balance (records, Σ records, API requests, API cost, Prometheus, budget): {last:?}\n{}", gw.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_api_filters_groups_exports_and_scopes_keys() {
    let mock = MockProvider::start().await;
    let gw = Gateway::start_async(&config(&mock)).await;
    mixed_load(&gw).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let all = admin_get(&gw, "/v1/usage", ADMIN).await.json();
    let acme = admin_get(&gw, "/v1/usage?customer=acme&group_by=feature", ADMIN)
        .await
        .json();
    let groups = acme["groups"].as_array().expect("groups");
    let keys: Vec<&str> = groups.iter().filter_map(|g| g["key"].as_str()).collect();
    assert_eq!(keys, ["chat", "search"]);
    assert_eq!(acme["total_requests"], 8);
    let by_model: u64 = all["by_model"]
        .as_array()
        .expect("by_model")
        .iter()
        .filter_map(|g| g["cost_nano"].as_u64())
        .sum();
    assert_eq!(
        by_model,
        all["total_cost_nano"].as_u64().unwrap_or(0),
        "breakdowns add up to the total"
    );

    let csv = admin_get(&gw, "/v1/usage?group_by=customer&format=csv", ADMIN).await;
    assert!(csv
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/csv")));
    let text = csv.text();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("customer,requests,cost_usd,cost_nano_usd,tokens_in,tokens_out,errors,estimated")
    );
    assert!(text.lines().any(|l| l.starts_with("acme,8,")), "{text}");

    let versions = admin_get(&gw, "/v1/usage/version-comparison?prompt_key=greet", ADMIN)
        .await
        .json();
    let v: Vec<&str> = versions["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g["key"].as_str())
        .collect();
    assert_eq!(v, ["v1", "v2"]);
    assert!(versions["groups"][0]["avg_cost_per_request"].is_string());
    assert_eq!(
        admin_get(&gw, "/v1/usage/by-team", ADMIN).await.json()["groups"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    assert_eq!(admin_get(&gw, "/v1/usage/monthly", ADMIN).await.status, 200);

    // A gateway key sees only its team.
    let mine = admin_get(&gw, "/v1/usage?group_by=team", OTHER_KEY)
        .await
        .json();
    assert_eq!(mine["total_requests"], 1);
    let me = admin_get(&gw, "/v1/usage/me", OTHER_KEY).await.json();
    assert_eq!(me["team"], "beta");
    assert_eq!(me["month_to_date"]["team"]["requests"], 1);

    // One request by id.
    let r = call(
        &gw,
        KEY,
        "/v1/chat/completions",
        &[],
        r#"{"model":"gpt-4o","messages":[]}"#,
    )
    .await;
    let id = r.header("x-tollgate-request-id").expect("id").to_string();
    let one = admin_get(&gw, &format!("/v1/usage/requests/{id}"), ADMIN)
        .await
        .json();
    assert_eq!(one["cost_nano_usd"], 2_610_000);
    assert_eq!(
        admin_get(&gw, &format!("/v1/usage/requests/{id}"), OTHER_KEY)
            .await
            .status,
        404,
        "other team"
    );

    // Bad input: a clear 400, unauthenticated: 401.
    for q in [
        "start=nope",
        "group_by=colour",
        "start=1990-01-01&end=2026-01-01",
        "format=xml",
    ] {
        let r = admin_get(&gw, &format!("/v1/usage?{q}"), ADMIN).await;
        assert_eq!(r.status, 400, "{q}: {}", r.text());
    }
    assert_eq!(
        admin_get(&gw, "/v1/usage/version-comparison", ADMIN)
            .await
            .status,
        400
    );
    assert_eq!(client::get(gw.admin_addr(), "/v1/usage").await.status, 401);
    assert_eq!(admin_get(&gw, "/v1/usage", "wrong").await.status, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn records_the_client_received_survive_kill_9() {
    let mock = MockProvider::start().await;
    let mut gw = Gateway::start_async(&config(&mock)).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let body = if i % 2 == 0 {
            r#"{"model":"gpt-4o","messages":[]}"#
        } else {
            r#"{"model":"gpt-4o","stream":true,"messages":[]}"#
        };
        let r = call(&gw, KEY, "/v1/chat/completions", &[], body).await;
        ids.push(r.header("x-tollgate-request-id").expect("id").to_string());
    }
    gw.stop(); // SIGKILL: no shutdown hooks run
    gw.restart_async().await;
    for id in &ids {
        let r = admin_get(&gw, &format!("/v1/usage/requests/{id}"), ADMIN).await;
        assert_eq!(r.status, 200, "{id} lost after kill -9");
    }
    let usage = admin_get(&gw, "/v1/usage", ADMIN).await.json();
    assert_eq!(usage["total_requests"], 20);
}
