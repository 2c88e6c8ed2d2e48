//! The usage page in real headless Chromium: loaded against a gateway with known usage,
//! it must show the same figures as the API.

mod common;

use common::sha256_hex;

use std::time::Duration;

use common::client;
use common::gateway::Gateway;
use common::mock::MockProvider;

fn chromium() -> &'static str {
    for c in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if std::path::Path::new(c).exists() {
            return c;
        }
    }
    panic!("chromium is missing: run scripts/setup (scripts/test does)");
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_shows_the_api_figures() {
    let mock = MockProvider::start().await;
    let yaml = format!(
        r#"
server: {{ listen: "{{{{PROXY_ADDR}}}}", admin_listen: "{{{{ADMIN_ADDR}}}}", data_dir: "{{{{DATA_DIR}}}}" }}
providers:
  openai: {{ kind: openai, base_url: "{mock}", api_key: sk-test }}
models:
  gpt-4o: {{ provider: openai }}
pricing: {{ file: "{prices}" }}
admin: {{ token: dash-token }}
keys:
  - {{ id: k1, team: alpha, sha256: {key} }}
limits:
  budgets:
    # $0.5: each request reserves its worst case (~$0.041, 4096 output tokens) until it is
    # settled just after its response, so back-to-back requests must fit together.
    - {{ scope: customer, id: acme, period: monthly, cap_usd: "0.5" }}
"#,
        mock = mock.base_url(),
        prices = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/prices.yaml"),
        key = sha256_hex("tg_dash"),
    );
    let gw = Gateway::start_async(&yaml).await;
    for customer in ["acme", "acme", "globex"] {
        let r = client::request(
            gw.proxy_addr(),
            "POST",
            "/v1/chat/completions",
            &[
                ("authorization", "Bearer tg_dash"),
                ("x-tollgate-customer", customer),
                ("x-tollgate-feature", "search"),
            ],
            br#"{"model":"gpt-4o","messages":[]}"#,
        )
        .await;
        assert_eq!(r.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let profile = gw.dir().join("chromium-profile");
    let url = format!("{}/dashboard#token=dash-token", gw.admin_url());
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=10000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(&url)
            .output(),
    )
    .await
    .expect("chromium finished in time")
    .expect("chromium ran");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains(r#"data-loaded="true""#),
        "page did not load its data:\n{dom}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 3 calls × $0.002610 (68 uncached, 1152 cached and 100 output tokens each).
    assert!(
        dom.contains(r#"<div class="big" id="total-cost">$0.007830</div>"#),
        "{dom}"
    );
    assert!(dom.contains(r#"<div class="big" id="total-requests">3</div>"#));
    assert!(dom.contains(r#"<tr data-key="acme"><td>acme</td><td class="num">0.005220</td><td class="num">2</td></tr>"#), "{dom}");
    assert!(dom.contains(r#"<tr data-key="globex"><td>globex</td><td class="num">0.002610</td><td class="num">1</td></tr>"#));
    assert!(dom.contains(r#"<td>customer:acme</td><td>monthly</td><td class="num">0.500000</td><td class="num">0.005220</td>"#), "{dom}");
    assert!(
        dom.contains(r#"style="width: 1%;""#),
        "acme's budget bar at 1% ($0.00522 of $0.50)"
    );
}
