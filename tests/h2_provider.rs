//! A provider reached over HTTP/2 (TLS, ALPN `h2`), as the real APIs are, and a client on
//! HTTP/1.1: the response reaches the client whole, its headers in the provider's order,
//! priced. (The other tests' mock speaks HTTP/1.1, whose headers keep their case; an
//! HTTP/2 provider's take another path, which once kept the `HTTP/2.0` version that an
//! HTTP/1.1 client cannot be sent.)

mod common;

use common::client;
use common::gateway::Gateway;
use common::h2_provider::{test_ca, H2Provider};
use common::{fixture, sha256_hex};

const KEY: &str = "tg_test_key";

#[tokio::test(flavor = "multi_thread")]
async fn an_http2_providers_response_reaches_an_http1_client_in_order_and_priced() {
    let sent: Vec<(String, String)> = [
        ("content-type", "application/json"),
        ("x-request-id", "req_h2"),
        ("openai-processing-ms", "12"),
        ("x-ratelimit-limit-requests", "10000"),
        ("set-cookie", "a=1"),
        ("x-ratelimit-remaining-requests", "9999"),
        ("set-cookie", "b=2"),
        ("cf-cache-status", "DYNAMIC"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let provider =
        H2Provider::start(200, sent.clone(), fixture("openai-chat-nonstream.json")).await;
    let gw = gateway(&provider).await;
    let r = chat(
        &gw,
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.version, "HTTP/1.1");
    assert_eq!(provider.request_count(), 1);
    assert_eq!(r.body, fixture("openai-chat-nonstream.json"));
    // 68 uncached × $2.50 + 1152 cached × $1.25 + 100 out × $10 per Mtok = $0.002610.
    assert_eq!(r.header("x-tollgate-cost"), Some("0.002610"));
    let forwarded: Vec<(String, String)> = r
        .headers
        .iter()
        .filter(|(k, _)| sent.iter().any(|(s, _)| s == k))
        .cloned()
        .collect();
    // A name's repeated values arrive together (the provider's header is read into an
    // `http::HeaderMap`, which keeps them so): set-cookie's in their order, the rest in
    // the provider's.
    let mut want = sent.clone();
    let b = want.remove(6);
    want.insert(5, b);
    assert_eq!(forwarded, want);
}

/// A gateway with one provider, `provider`, serving gpt-4o.
async fn gateway(provider: &H2Provider) -> Gateway {
    // The gateway process inherits it: Pingora's TLS connector reads the platform's
    // roots and `SSL_CERT_FILE`.
    std::env::set_var("SSL_CERT_FILE", test_ca());
    Gateway::start_async(&format!(
        r#"
server:
  listen: "{{{{PROXY_ADDR}}}}"
  admin_listen: "{{{{ADMIN_ADDR}}}}"
  data_dir: "{{{{DATA_DIR}}}}"
  threads: 2
providers:
  openai:
    kind: openai
    base_url: "{base}"
    api_key: sk-provider-openai
models:
  gpt-4o: {{ provider: openai }}
pricing:
  file: "{prices}"
keys:
  - {{ id: k1, team: t1, sha256: {key} }}
"#,
        base = provider.base_url(),
        prices = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/prices.yaml"),
        key = sha256_hex(KEY),
    ))
    .await
}

async fn chat(gw: &Gateway, body: &str) -> client::Response {
    let auth = format!("Bearer {KEY}");
    client::request(
        gw.proxy_addr(),
        "POST",
        "/v1/chat/completions",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http2_providers_stream_reaches_an_http1_client_metered() {
    let stream = fixture("openai-chat-stream-include-usage.sse");
    let headers = vec![(
        "content-type".to_string(),
        "text/event-stream; charset=utf-8".to_string(),
    )];
    let provider = H2Provider::start(200, headers, stream.clone()).await;
    let gw = gateway(&provider).await;
    let r = chat(
        &gw,
        r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.version, "HTTP/1.1");
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    // The provider's events as sent, then the cost, metered from the stream's usage:
    // 140 uncached × $2.50 + 1280 cached × $1.25 + 100 × $10 per Mtok = $0.002950.
    assert!(r.body.starts_with(&stream), "{}", r.describe());
    let tail = String::from_utf8_lossy(&r.body[stream.len()..]).into_owned();
    assert!(
        tail.starts_with(": tollgate cost=0.002950 tokens_in=1420 tokens_out=100"),
        "{tail:?}"
    );
    assert!(!tail.contains("estimated"), "{tail:?}");
}
