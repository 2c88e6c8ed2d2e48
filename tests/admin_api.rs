//! The management API on the admin listener: budgets, LiteLLM-compatible customers and
//! named budgets, teams, keys and prompts, persisted in the store (embedded and Redis),
//! and the runaway breaker.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::client::{self, Response};
use common::gateway::Gateway;
use common::mock::MockProvider;
use common::redis::RedisServer;
use common::{records, sha256_hex};

const KEY: &str = "tg_admin_api_key";
const ADMIN: &str = "admin-api-token";

/// `metered` costs $1 per million output tokens: a request with `max_tokens: 16`
/// reserves 16,000 nano-USD and costs 16,000 on the mock's legacy completion.
fn config(mock: &MockProvider, store: &str, limits: &str) -> String {
    format!(
        r#"
server: {{ listen: "{{{{PROXY_ADDR}}}}", admin_listen: "{{{{ADMIN_ADDR}}}}", data_dir: "{{{{DATA_DIR}}}}", threads: 2 }}
providers:
  openai: {{ kind: openai, base_url: "{mock}", api_key: sk-test }}
models:
  metered: {{ provider: openai, max_output_tokens: 16, price: {{ input: 0, output: 1 }} }}
keys:
  - {{ id: k1, team: t1, sha256: {hash} }}
admin: {{ token: {ADMIN} }}
{store}
limits:
{limits}
"#,
        mock = mock.base_url(),
        hash = sha256_hex(KEY),
    )
}

async fn admin(gw: &Gateway, method: &str, path: &str, body: Option<Value>) -> Response {
    admin_at(gw.admin_addr(), method, path, body).await
}

async fn admin_at(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Response {
    let auth = format!("Bearer {ADMIN}");
    let raw = body.map(|b| b.to_string()).unwrap_or_default();
    client::request(
        addr,
        method,
        path,
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ],
        raw.as_bytes(),
    )
    .await
}

async fn call(addr: SocketAddr, key: &str, headers: &[(&str, &str)]) -> Response {
    let auth = format!("Bearer {key}");
    let mut all = vec![
        ("authorization", auth.as_str()),
        ("x-mock-fixture", "openai-completions-legacy"),
    ];
    all.extend_from_slice(headers);
    client::request(
        addr,
        "POST",
        "/v1/completions",
        &all,
        br#"{"model":"metered","prompt":"hi","max_tokens":16}"#,
    )
    .await
}

async fn as_customer(gw: &Gateway, customer: &str) -> u16 {
    call(gw.proxy_addr(), KEY, &[("x-tollgate-customer", customer)])
        .await
        .status
}

/// Polls until `f` holds (another gateway picks changes up within its refresh interval).
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread")]
async fn budgets_posted_through_the_api_are_enforced_listed_deleted_and_survive_a_restart() {
    let mock = MockProvider::start().await;
    let mut gw = Gateway::start_async(&config(&mock, "", "  budgets: []")).await;
    // Daylite's form: two 16,000-nano requests fit in $0.000032 a month.
    let r = admin(
        &gw,
        "POST",
        "/v1/budgets",
        Some(json!({"customer_id": "acme", "monthly_cap_usd": "0.000032", "action_on_cap": "block", "alert_thresholds": [0.5, 1.0]})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.describe());
    assert_eq!(r.json()["id"], "customer:acme:monthly");
    assert_eq!(r.json()["cap_nano"], 32_000);
    assert_eq!(as_customer(&gw, "acme").await, 200);
    assert_eq!(as_customer(&gw, "acme").await, 200);
    let refused = call(gw.proxy_addr(), KEY, &[("x-tollgate-customer", "acme")]).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["error"]["type"], "budget_exceeded");
    assert_eq!(as_customer(&gw, "other").await, 200, "only acme is capped");

    let one = admin(&gw, "GET", "/v1/budgets/customer:acme:monthly", None).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["source"], "api");
    assert_eq!(one.json()["alert_thresholds"], json!([0.5, 1.0]));

    // Past the embedded store's durability window (200 ms), then a restart.
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.restart_async().await;
    let after = admin(&gw, "GET", "/v1/budgets/customer:acme:monthly", None).await;
    assert_eq!(after.json()["spent_nano"], 32_000, "{}", after.describe());
    assert_eq!(
        as_customer(&gw, "acme").await,
        429,
        "persisted in the store"
    );

    // The general form, for any scope and period; a bad one changes nothing.
    let before = admin(&gw, "GET", "/v1/budgets", None).await.json();
    for (body, field) in [
        (
            json!({"scope": "team", "period": "daily", "cap_usd": 1}),
            "id",
        ),
        (
            json!({"scope": "team", "id": "t1", "period": "weekly", "cap_usd": 1}),
            "period",
        ),
        (
            json!({"scope": "team", "id": "t1", "period": "daily", "cap_usd": -1}),
            "cap_usd",
        ),
        (
            json!({"scope": "planet", "id": "x", "period": "daily", "cap_usd": 1}),
            "scope",
        ),
        (
            json!({"customer_id": "acme", "monthly_cap_usd": "1", "action_on_cap": "downgrade"}),
            "downgrade_to",
        ),
        (
            json!({"customer_id": "acme", "monthly_cap_usd": 5, "alert_thresholds": "often"}),
            "alert_thresholds",
        ),
    ] {
        let r = admin(&gw, "POST", "/v1/budgets", Some(body.clone())).await;
        assert_eq!(r.status, 400, "{body}: {}", r.describe());
        let message = r.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(
            message.starts_with(&format!("{field}:")),
            "{body}: {message}"
        );
    }
    let r = client::request(
        gw.admin_addr(),
        "POST",
        "/v1/budgets",
        &[("authorization", &format!("Bearer {ADMIN}"))],
        b"{not json",
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(admin(&gw, "GET", "/v1/budgets", None).await.json(), before);

    let r = admin(&gw, "DELETE", "/v1/budgets/customer:acme:monthly", None).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(as_customer(&gw, "acme").await, 200, "the cap is gone");
    assert_eq!(
        admin(&gw, "DELETE", "/v1/budgets/customer:acme:monthly", None)
            .await
            .status,
        404
    );
    // A gateway key is not an admin token.
    let r = client::request(
        gw.admin_addr(),
        "GET",
        "/v1/budgets",
        &[("authorization", &format!("Bearer {KEY}"))],
        b"",
    )
    .await;
    assert_eq!(r.status, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn litellm_customer_and_budget_endpoints_cap_rate_limit_and_block_customers() {
    let mock = MockProvider::start().await;
    let gw = Gateway::start_async(&config(&mock, "", "  budgets: []")).await;
    let r = admin(
        &gw,
        "POST",
        "/budget/new",
        Some(json!({"budget_id": "free", "max_budget": 0.000032, "budget_duration": "1d", "rpm_limit": 100})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.json()["budget_duration"], "1d");
    let r = admin(
        &gw,
        "POST",
        "/customer/new",
        Some(json!({"user_id": "u1", "budget_id": "free", "alias": "User One"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(
        admin(&gw, "POST", "/customer/new", Some(json!({"user_id": "u1"})))
            .await
            .status,
        409
    );
    assert_eq!(as_customer(&gw, "u1").await, 200);
    assert_eq!(as_customer(&gw, "u1").await, 200);
    assert_eq!(
        as_customer(&gw, "u1").await,
        429,
        "the named budget caps u1"
    );

    let info = admin(&gw, "GET", "/customer/info?end_user_id=u1", None)
        .await
        .json();
    assert_eq!(info["user_id"], "u1");
    assert_eq!(info["litellm_budget_table"]["max_budget"], 0.000032);
    assert_eq!(info["litellm_budget_table"]["rpm_limit"], 100);
    eventually("u1's spend in the ledger", || async {
        admin(&gw, "GET", "/customer/info?end_user_id=u1", None)
            .await
            .json()["spend_nano"]
            == 32_000
    })
    .await;

    // The customer's own cap wins over its named budget.
    let r = admin(
        &gw,
        "POST",
        "/customer/update",
        Some(json!({"user_id": "u1", "max_budget": "0.000048", "budget_duration": "1d"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(as_customer(&gw, "u1").await, 200);
    assert_eq!(as_customer(&gw, "u1").await, 429);

    let r = admin(
        &gw,
        "POST",
        "/customer/block",
        Some(json!({"user_ids": ["u2"]})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let blocked = call(gw.proxy_addr(), KEY, &[("x-tollgate-customer", "u2")]).await;
    assert_eq!(blocked.status, 403);
    assert!(blocked.text().contains("blocked"), "{}", blocked.text());
    admin(
        &gw,
        "POST",
        "/customer/unblock",
        Some(json!({"user_ids": ["u2"]})),
    )
    .await;
    assert_eq!(as_customer(&gw, "u2").await, 200);

    let requests_before = mock.request_count();
    for (path, body, field) in [
        (
            "/budget/new",
            json!({"max_budget": 1, "budget_duration": "7d"}),
            "budget_duration",
        ),
        ("/budget/new", json!({"max_budget": "lots"}), "max_budget"),
        ("/customer/new", json!({"alias": "no id"}), "user_id"),
        (
            "/customer/new",
            json!({"user_id": "u3", "budget_id": "nope"}),
            "budget_id",
        ),
        ("/customer/block", json!({"user_ids": []}), "user_ids"),
        (
            "/customer/update",
            json!({"user_id": "u1", "rpm_limit": 0}),
            "rpm_limit",
        ),
    ] {
        let r = admin(&gw, "POST", path, Some(body.clone())).await;
        assert_eq!(r.status, 400, "{path} {body}: {}", r.describe());
        let message = r.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(message.starts_with(&format!("{field}:")), "{message}");
    }
    assert_eq!(
        admin(&gw, "GET", "/customer/info?end_user_id=u3", None)
            .await
            .status,
        404,
        "the refused customer was not created"
    );
    assert_eq!(mock.request_count(), requests_before);
}

#[tokio::test(flavor = "multi_thread")]
async fn teams_and_keys_are_created_listed_masked_and_revoked() {
    let mock = MockProvider::start().await;
    let gw = Gateway::start_async(&config(&mock, "", "  budgets: []")).await;
    let r = admin(&gw, "POST", "/v1/keys", Some(json!({"team": "nobody"}))).await;
    assert_eq!(r.status, 400, "a key needs an existing team");
    let r = admin(
        &gw,
        "POST",
        "/v1/teams",
        Some(json!({"team_id": "search", "description": "Search squad"})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.describe());
    assert_eq!(
        admin(&gw, "POST", "/v1/teams", Some(json!({"team_id": "search"})))
            .await
            .status,
        409
    );
    let created = admin(
        &gw,
        "POST",
        "/v1/keys",
        Some(json!({"team": "search", "id": "search-1"})),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.describe());
    let key = created.json()["key"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(key.starts_with("tg_") && key.len() > 40, "{key}");
    let preview = created.json()["preview"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(preview, format!("tg_...{}", &key[key.len() - 4..]));

    let ok = call(gw.proxy_addr(), &key, &[]).await;
    assert_eq!(ok.status, 200, "{}", ok.describe());

    let listed = admin(&gw, "GET", "/v1/keys?team=search", None).await;
    assert_eq!(listed.json()["keys"][0]["preview"], preview.as_str());
    assert!(!listed.text().contains(&key), "the key is shown once only");
    eventually("the team's cost and key count", || async {
        let teams = admin(&gw, "GET", "/v1/teams", None).await.json();
        teams["teams"].as_array().is_some_and(|t| {
            t.iter().any(|t| {
                t["team_id"] == "search" && t["key_count"] == 1 && t["total_cost_nano"] == 16_000
            }) && t
                .iter()
                .any(|t| t["team_id"] == "t1" && t["source"] == "config")
        })
    })
    .await;
    // Neither the key nor anything derived beyond its hash and preview is stored.
    let stored = std::fs::read_to_string(gw.data_dir().join("catalog.json")).unwrap_or_default();
    assert!(stored.contains(&sha256_hex(&key)) && !stored.contains(&key));

    let r = admin(&gw, "DELETE", "/v1/keys/search-1", None).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(call(gw.proxy_addr(), &key, &[]).await.status, 401);
    assert_eq!(
        admin(&gw, "DELETE", "/v1/keys/search-1", None).await.status,
        404
    );

    // A config key can be revoked too; deleting a team revokes its keys.
    assert_eq!(call(gw.proxy_addr(), KEY, &[]).await.status, 200);
    let r = admin(&gw, "DELETE", "/v1/teams/t1", None).await;
    assert_eq!(r.json()["keys_revoked"], 1, "{}", r.describe());
    assert_eq!(call(gw.proxy_addr(), KEY, &[]).await.status, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn prompts_are_created_on_first_use_and_requests_take_the_active_version() {
    let mock = MockProvider::start().await;
    let gw = Gateway::start_async(&config(&mock, "", "  budgets: []")).await;
    let r = call(
        gw.proxy_addr(),
        KEY,
        &[("x-tollgate-prompt-key", "summarise")],
    )
    .await;
    assert_eq!(r.status, 200);
    eventually("the prompt recorded on first use", || async {
        admin(&gw, "GET", "/v1/prompts/summarise", None)
            .await
            .status
            == 200
    })
    .await;
    let r = admin(
        &gw,
        "POST",
        "/v1/prompts/summarise/versions",
        Some(json!({"version": "v1", "model": "metered", "temperature": 0.2, "max_tokens": 16, "note": "first"})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.describe());
    assert_eq!(
        r.json()["active_version"],
        "v1",
        "the first version is active"
    );
    let r = admin(
        &gw,
        "POST",
        "/v1/prompts/summarise/versions",
        Some(json!({"version": "v2", "note": "shorter", "activate": true})),
    )
    .await;
    assert_eq!(r.json()["active_version"], "v2");
    assert_eq!(
        admin(
            &gw,
            "POST",
            "/v1/prompts/summarise/versions",
            Some(json!({"version": "v2"}))
        )
        .await
        .status,
        409
    );
    assert_eq!(
        admin(
            &gw,
            "POST",
            "/v1/prompts/summarise/activate",
            Some(json!({"version": "v9"}))
        )
        .await
        .status,
        400
    );
    let r = call(
        gw.proxy_addr(),
        KEY,
        &[
            ("x-tollgate-prompt-key", "summarise"),
            ("x-tollgate-request-tag", "a"),
        ],
    )
    .await;
    let id = r
        .header("x-tollgate-request-id")
        .unwrap_or_default()
        .to_string();
    let r = admin(
        &gw,
        "POST",
        "/v1/prompts/summarise/activate",
        Some(json!({"version": "v1"})),
    )
    .await;
    assert_eq!(r.status, 200);
    let explicit = call(
        gw.proxy_addr(),
        KEY,
        &[
            ("x-tollgate-prompt-key", "summarise"),
            ("x-tollgate-prompt-version", "v7"),
        ],
    )
    .await;
    let explicit_id = explicit
        .header("x-tollgate-request-id")
        .unwrap_or_default()
        .to_string();
    eventually("the records", || async { records(&gw).len() >= 3 }).await;
    let version_of = |id: &str| {
        records(&gw)
            .into_iter()
            .find(|r| r["request_id"] == id)
            .map(|r| r["prompt_version"].clone())
    };
    assert_eq!(
        version_of(&id),
        Some(json!("v2")),
        "the active version then"
    );
    assert_eq!(
        version_of(&explicit_id),
        Some(json!("v7")),
        "a named version wins"
    );
    let list = admin(&gw, "GET", "/v1/prompts", None).await.json();
    assert_eq!(
        list["prompts"][0]["versions"].as_array().map(Vec::len),
        Some(2)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_through_one_gateway_reach_another_sharing_redis() {
    let redis = RedisServer::start();
    let mock = MockProvider::start().await;
    let store = format!(
        "store: {{ kind: redis, redis_url: \"{}\", prefix: \"tg-admin:\", catalog_refresh_ms: 100 }}",
        redis.url()
    );
    let yaml = config(&mock, &store, "  budgets: []");
    let a = Gateway::start_async(&yaml).await;
    let b = Gateway::start_async(&yaml).await;
    admin(&a, "POST", "/v1/teams", Some(json!({"team_id": "shared"}))).await;
    let created = admin(&a, "POST", "/v1/keys", Some(json!({"team": "shared"}))).await;
    let key = created.json()["key"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let id = created.json()["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    eventually("the new key works on b", || async {
        call(b.proxy_addr(), &key, &[]).await.status == 200
    })
    .await;
    let r = admin(
        &a,
        "POST",
        "/v1/budgets",
        Some(json!({"scope": "customer", "id": "c9", "period": "daily", "cap_usd": "0.000016"})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.describe());
    eventually("b lists the budget", || async {
        admin(&b, "GET", "/v1/budgets/customer:c9:daily", None)
            .await
            .status
            == 200
    })
    .await;
    assert_eq!(as_customer(&b, "c9").await, 200);
    assert_eq!(as_customer(&a, "c9").await, 429, "one cap across both");

    assert_eq!(
        admin(&a, "DELETE", &format!("/v1/keys/{id}"), None)
            .await
            .status,
        200
    );
    assert_eq!(
        call(a.proxy_addr(), &key, &[]).await.status,
        401,
        "at once on a"
    );
    let revoked_at = Instant::now();
    eventually("the revoked key is refused on b", || async {
        call(b.proxy_addr(), &key, &[]).await.status == 401
    })
    .await;
    assert!(
        revoked_at.elapsed() < Duration::from_secs(2),
        "within the refresh interval: {:?}",
        revoked_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_runaway_breaker_blocks_a_scope_that_spends_too_fast() {
    let mock = MockProvider::start().await;
    // 16,000 nano per request: the fourth request in a minute passes $0.00005.
    let gw = Gateway::start_async(&config(
        &mock,
        "",
        "  runaway:\n    - { scope: customer, max_usd: \"0.00005\", window_seconds: 60, cooldown_seconds: 30 }",
    ))
    .await;
    for i in 0..4 {
        assert_eq!(as_customer(&gw, "loop").await, 200, "request {i}");
    }
    let mut refused = None;
    for _ in 0..20 {
        let r = call(gw.proxy_addr(), KEY, &[("x-tollgate-customer", "loop")]).await;
        if r.status == 429 {
            refused = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let r = refused.expect("the breaker trips");
    assert!(r.text().contains("runaway"), "{}", r.text());
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!((1..=30).contains(&retry), "retry-after {retry}");
    assert_eq!(as_customer(&gw, "calm").await, 200, "other customers pass");
    let metrics = client::get(gw.admin_addr(), "/metrics").await.text();
    assert!(metrics.contains("outcome=\"runaway_trip\"} 1"), "{metrics}");
}

/// SIGTERM while a management call is still arriving (its body half sent): the drain
/// waits for it, it is answered, and what it made survives the restart. Before, the
/// drain counted only proxy requests, so the process exited under it.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_waits_for_an_admin_call_in_flight() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = MockProvider::start().await;
    let mut gw = Gateway::start_async(&config(&mock, "", "  budgets: []")).await;
    let body = json!({"customer_id": "late", "monthly_cap_usd": "0.000032"}).to_string();
    let head = format!(
        "POST /v1/budgets HTTP/1.1\r\nhost: admin\r\nauthorization: Bearer {ADMIN}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let mut conn = tokio::net::TcpStream::connect(gw.admin_addr())
        .await
        .expect("connect");
    let (first, rest) = body.split_at(body.len() / 2);
    conn.write_all(format!("{head}{first}").as_bytes())
        .await
        .expect("write");
    // The call is in flight (its body not yet whole) when the signal comes; the rest
    // follows after the drain's quiet period (300 ms) would have ended it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(gw.signal("TERM"));
    tokio::time::sleep(Duration::from_millis(800)).await;
    conn.write_all(rest.as_bytes()).await.expect("the rest");
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply).into_owned();
    assert!(read.is_ok(), "answered in time: {reply:?}");
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply:?}\n{}", gw.log());
    let status = tokio::task::block_in_place(|| gw.terminate(Duration::from_secs(15)));
    assert!(
        status.is_some_and(|s| s.success()),
        "exits by itself, cleanly: {status:?}\n{}",
        gw.log()
    );
    assert!(gw.log().contains("drained, exiting"), "{}", gw.log());

    gw.restart_async().await;
    let after = admin(&gw, "GET", "/v1/budgets/customer:late:monthly", None).await;
    assert_eq!(
        after.status,
        200,
        "made before the exit: {}",
        after.describe()
    );
}
