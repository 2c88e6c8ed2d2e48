//! The real Python `openai` and `anthropic` SDKs, unmodified but for `base_url`, calling
//! through Tollgate to the mock provider (`tests/sdk/clients.py`).

mod common;

use common::sha256_hex;

use common::gateway::Gateway;
use common::mock::MockProvider;

fn python() -> std::path::PathBuf {
    let path = std::env::var_os("TOLLGATE_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/target/venv/bin/python").into());
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup (scripts/test does)",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn python_sdks_work_through_the_gateway_and_see_costs() {
    let mock = MockProvider::start().await;
    let yaml = format!(
        r#"
server: {{ listen: "{{{{PROXY_ADDR}}}}", admin_listen: "{{{{ADMIN_ADDR}}}}", data_dir: "{{{{DATA_DIR}}}}" }}
providers:
  openai: {{ kind: openai, base_url: "{mock}", api_key: sk-test }}
  anthropic: {{ kind: anthropic, base_url: "{mock}", api_key: sk-ant-test }}
models:
  gpt-4o: {{ provider: openai }}
  claude-sonnet-4-5: {{ provider: anthropic }}
pricing: {{ file: "{prices}" }}
keys:
  - {{ id: sdk, team: sdk-team, sha256: {hash} }}
limits:
  budgets:
    - {{ scope: customer, id: broke, period: daily, cap_usd: 0 }}
"#,
        mock = mock.base_url(),
        prices = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/prices.yaml"),
        hash = sha256_hex("tg_sdk_key"),
    );
    let gw = Gateway::start_async(&yaml).await;
    let out = tokio::process::Command::new(python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/clients.py"))
        .arg(gw.proxy_url())
        .arg("tg_sdk_key")
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "clients.py failed:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("clients.py prints JSON");

    let j = &v["openai_json"];
    assert_eq!(j["cost"], "0.002610");
    assert_eq!(j["tokens_in"], "1220");
    assert_eq!(j["customer"], "sdk-cust");
    assert_eq!(
        j["prompt_tokens"], 1220,
        "the SDK parsed the provider's body"
    );

    let s = &v["openai_stream"];
    assert!(
        !s["text"].as_str().unwrap_or_default().is_empty(),
        "SDK reassembled the stream: {s}"
    );
    assert!(s["request_id"]
        .as_str()
        .is_some_and(|id| id.starts_with("tg-")));
    let comment = s["cost_comment"][0].as_str().unwrap_or_default();
    assert!(
        comment.starts_with(": tollgate cost=0.002950 tokens_in=1420 tokens_out=100"),
        "{s}"
    );

    let a = &v["anthropic_json"];
    assert_eq!(a["cost"], "0.0021495");
    assert_eq!(a["output_tokens"], 100);
    let a = &v["anthropic_stream"];
    assert_eq!(a["output_tokens"], 100, "{a}");
    assert!(!a["text"].as_str().unwrap_or_default().is_empty());

    let e = &v["errors"];
    assert_eq!(
        e["openai_401"], 401,
        "openai.AuthenticationError raised: {e}"
    );
    assert_eq!(
        e["anthropic_401"], 401,
        "anthropic.AuthenticationError raised: {e}"
    );
    assert_eq!(e["openai_404"], 404, "openai.NotFoundError raised: {e}");
    assert_eq!(
        e["openai_budget_429"], 429,
        "openai.RateLimitError on a budget refusal: {e}"
    );
    assert_eq!(e["openai_budget_type"], "budget_exceeded", "{e}");
    assert_eq!(
        e["anthropic_budget_429"], 429,
        "anthropic.RateLimitError on a budget refusal: {e}"
    );
}
