//! A provider reached over HTTP/2 (TLS, ALPN `h2`), as the real APIs are: with a client on
//! HTTP/1.1, the response reaches it whole, its headers in the provider's order, priced
//! (the other tests' mock speaks HTTP/1.1, whose headers keep their case; an HTTP/2
//! provider's take another path, which once kept the `HTTP/2.0` version that an HTTP/1.1
//! client cannot be sent); its errors pass through unpriced; pooled connections it closes,
//! and streams it refuses, never reach the client as errors nor reach it twice; and an
//! HTTP/2 client in front gets the cost in trailers.

mod common;

use common::client;
use common::gateway::Gateway;
use common::h2_provider::{test_ca, AfterAnswer, H2Provider};
use common::{fixture, sha256_hex};

const KEY: &str = "tg_test_key";
/// A chat completion request for the provider's model.
const HI: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

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
    let r = chat(&gw, HI).await;
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

/// HTTP/2 connections are pooled and used again: requests one after another share one,
/// and bursts of requests side by side find the connections earlier ones left.
/// (Each connection carries one request at a time: Pingora's default of one stream per
/// HTTP/2 connection, `max_h2_streams`, which Tollgate keeps.) The gateway asks the pool
/// before it makes a connection, so the connections made never outnumber the requests
/// that were in flight together.
#[tokio::test(flavor = "multi_thread")]
async fn requests_to_an_http2_provider_reuse_its_connections() {
    let headers = vec![("content-type".to_string(), "application/json".to_string())];
    let provider = H2Provider::start(200, headers, fixture("openai-chat-nonstream.json")).await;
    let gw = gateway(&provider).await;
    for i in 1..=5 {
        let r = chat(&gw, HI).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.describe());
    }
    assert_eq!(provider.connection_count(), 1, "one after another");
    let burst = || futures_util::future::join_all((0..8).map(|_| chat(&gw, HI)));
    for round in 1..=4 {
        for r in burst().await {
            assert_eq!(r.status, 200, "burst {round}: {}", r.describe());
        }
        // Never more than the most requests in flight at once (8), over all the bursts.
        let made = provider.connection_count();
        assert!(made <= 8, "{made} connections after burst {round} of 8");
    }
    assert_eq!(provider.request_count(), 5 + 4 * 8);
}

/// Providers close HTTP/2 connections the gateway keeps pooled: with GOAWAY, or without a
/// word (an idle timeout, a restart). Neither may reach the client as an error, and no
/// request may reach the provider twice (it would be billed twice).
#[tokio::test(flavor = "multi_thread")]
async fn a_provider_closing_its_http2_connections_is_never_an_error_for_the_client() {
    for after in [AfterAnswer::GoAway, AfterAnswer::Drop] {
        let headers = vec![("content-type".to_string(), "application/json".to_string())];
        let provider =
            H2Provider::start_with(200, headers, fixture("openai-chat-nonstream.json"), after)
                .await;
        let gw = gateway(&provider).await;
        for i in 1..=8 {
            let r = chat(&gw, HI).await;
            assert_eq!(r.status, 200, "{after:?}, request {i}: {}", r.describe());
            assert_eq!(r.header("x-tollgate-cost"), Some("0.002610"), "{after:?}");
            assert_eq!(provider.request_count(), i, "{after:?}: answered once each");
            // Half the requests follow at once, half after the close has landed.
            if i % 2 == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// A provider that refuses a stream (REFUSED_STREAM: not processed) gets the request
/// again, even on a connection just made (no stale pooled one involved), and only once.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_stream_is_sent_again_once() {
    let headers = vec![("content-type".to_string(), "application/json".to_string())];
    let provider = H2Provider::start(200, headers, fixture("openai-chat-nonstream.json")).await;
    let gw = gateway(&provider).await;
    provider.refuse_next(1);
    let r = chat(&gw, HI).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.header("x-tollgate-cost"), Some("0.002610"));
    assert_eq!((provider.refused_count(), provider.request_count()), (1, 1));

    provider.refuse_next(2);
    let r = chat(&gw, HI).await;
    assert_eq!(r.status, 502, "one more try, not two: {}", r.describe());
    assert_eq!((provider.refused_count(), provider.request_count()), (3, 1));
    // Counted as `refused`, or as `unsent` when the refusal ends the body's writing.
    let text = client::get(gw.admin_addr(), "/metrics").await.text();
    let retries: f64 = text
        .lines()
        .filter(|l| l.starts_with("tollgate_upstream_retries_total{"))
        .filter(|l| l.contains(r#"provider="openai""#) && !l.contains("stale_connection"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(retries, 2.0, "{text}");
}

/// A provider's error over HTTP/2 reaches the client as the provider sent it: its status,
/// its body byte for byte, and no cost (nothing was served).
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_providers_error_reaches_the_client_as_sent_and_costs_nothing() {
    let headers = vec![
        (
            "content-type".to_string(),
            "application/json; charset=utf-8".to_string(),
        ),
        ("x-request-id".to_string(), "req_429".to_string()),
    ];
    let body = fixture("openai-error-429.json");
    let provider = H2Provider::start(429, headers, body.clone()).await;
    let gw = gateway(&provider).await;
    let r = chat(&gw, HI).await;
    assert_eq!(r.status, 429, "{}", r.describe());
    assert_eq!(r.body, body);
    assert_eq!(r.header("x-request-id"), Some("req_429"));
    assert_eq!(r.header("x-tollgate-cost"), None, "{}", r.describe());
    assert_eq!(provider.request_count(), 1);
}

/// An HTTP/2 client (h2c) in front of an HTTP/2 provider: the JSON response arrives whole
/// and priced, and a stream ends with its cost in trailers.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_client_behind_an_http2_provider_gets_the_response_and_its_cost() {
    let json = fixture("openai-chat-nonstream.json");
    let provider = H2Provider::start(
        200,
        vec![("content-type".to_string(), "application/json".to_string())],
        json.clone(),
    )
    .await;
    let gw = gateway(&provider).await;
    let out = curl_h2c(&gw, HI).await;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    assert!(head.starts_with("HTTP/2 200"), "{out}");
    assert!(head.contains("x-tollgate-cost: 0.002610"), "{head}");
    assert_eq!(body.as_bytes(), json.as_slice());

    let stream = fixture("openai-chat-stream-include-usage.sse");
    let provider = H2Provider::start(
        200,
        vec![(
            "content-type".to_string(),
            "text/event-stream; charset=utf-8".to_string(),
        )],
        stream.clone(),
    )
    .await;
    let gw = gateway(&provider).await;
    let out = curl_h2c(
        &gw,
        r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(
        out.contains(std::str::from_utf8(&stream).expect("utf-8 fixture")),
        "the provider's events as sent: {out}"
    );
    let after_body = out.rsplit("data: [DONE]").next().unwrap_or_default();
    assert!(
        after_body.contains("x-tollgate-cost: 0.002950"),
        "trailers after the body: {after_body}"
    );
}

/// The gateway's chat completions over h2c (`client::curl_h2c`).
async fn curl_h2c(gw: &Gateway, body: &str) -> String {
    let url = format!("{}/v1/chat/completions", gw.proxy_url());
    client::curl_h2c(&url, &format!("Bearer {KEY}"), body).await
}
