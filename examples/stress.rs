//! The overspend stress run (not part of CI): two gateways share one Redis; each
//! repetition fires N concurrent requests (JSON and streaming) for a fresh customer whose
//! default budget affords only some of them, sometimes with Redis slowed or killed
//! mid-run. It prints admitted vs affordable calls and spend vs cap per repetition.
//!
//!   cargo build --release && cargo run --release --example stress -- [--reps 20] [--concurrency 1000]
//!
//! Requests use the sandbox, which honours `max_tokens` like a real provider, so a
//! request's actual cost never exceeds its reservation and any overspend would be the
//! store's fault alone.

#[path = "../tests/common/mod.rs"]
mod common;

use common::sha256_hex;

use std::time::{Duration, Instant};

use common::client;
use common::gateway::Gateway;
use common::mock::MockProvider;
use common::redis::RedisServer;

/// $1 per million output tokens, free input: 16 output tokens cost 16,000 nano-USD.
const PER_REQUEST_WORST: u64 = 16_000;
const AFFORDABLE_WORST_CASE: u64 = 100;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .find(|w| w[0] == name)
        .and_then(|w| w[1].parse().ok())
        .unwrap_or(default)
}

fn binary() -> std::path::PathBuf {
    if let Some(bin) = std::env::var_os("TOLLGATE_BIN") {
        return bin.into();
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for p in ["target/release/tollgate", "target/debug/tollgate"] {
        if root.join(p).exists() {
            return root.join(p);
        }
    }
    panic!("build the gateway first: cargo build --release");
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    None,
    SlowRedis,
    KillRedis,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let reps = arg("--reps", 20);
    let concurrency = arg("--concurrency", 1000);
    let cap = PER_REQUEST_WORST * AFFORDABLE_WORST_CASE;
    let mut redis = RedisServer::start_persistent();
    let mock = MockProvider::start().await;
    let yaml = format!(
        r#"
server: {{ listen: "{{{{PROXY_ADDR}}}}", admin_listen: "{{{{ADMIN_ADDR}}}}", data_dir: "{{{{DATA_DIR}}}}", access_log: false, threads: 2 }}
providers:
  openai: {{ kind: openai, base_url: "{mock}", api_key: unused }}
models:
  metered: {{ provider: openai, max_output_tokens: 16, price: {{ input: 0, output: 1 }} }}
keys:
  - {{ id: stress, team: stress, sha256: {hash} }}
store: {{ kind: redis, redis_url: "{redis}", prefix: "stress:", timeout_ms: 250 }}
limits:
  default_customer_budgets:
    - {{ period: total, cap_usd: "{cap_usd}" }}
"#,
        mock = mock.base_url(),
        hash = sha256_hex("tg_stress"),
        redis = redis.url(),
        cap_usd = tollgate::pricing::format_usd(cap),
    );
    let a = Gateway::start_binary(binary(), &yaml, &[]);
    let b = Gateway::start_binary(binary(), &yaml, &[]);
    println!("rep  fault       admitted  affordable(worst case)  refused  spend_nano  cap_nano  over_cap");
    let mut overspent = 0;
    for rep in 0..reps {
        let fault = match rep % 5 {
            3 => Fault::SlowRedis,
            4 => Fault::KillRedis,
            _ => Fault::None,
        };
        let customer = format!("stress-{}-{rep}", std::process::id());
        let started = Instant::now();
        let tasks: Vec<_> = (0..concurrency)
            .map(|i| {
                let addr = if i % 2 == 0 {
                    a.proxy_addr()
                } else {
                    b.proxy_addr()
                };
                let customer = customer.clone();
                tokio::spawn(async move {
                    let body = format!(
                        r#"{{"model":"metered","prompt":"call {i}","max_tokens":16,"stream":{}}}"#,
                        i % 3 == 0
                    );
                    let headers = [
                        ("authorization", "Bearer tg_stress"),
                        ("x-tollgate-customer", customer.as_str()),
                        ("x-tollgate-sandbox", "true"),
                    ];
                    client::try_request_with_timeout(
                        addr,
                        "POST",
                        "/v1/completions",
                        &headers,
                        body.as_bytes(),
                        Duration::from_secs(30),
                    )
                    .await
                })
            })
            .collect();
        match fault {
            Fault::None => {}
            Fault::SlowRedis => {
                let _ = std::process::Command::new("redis-cli")
                    .args(["-p", &redis.port.to_string(), "CLIENT", "PAUSE", "400"])
                    .output();
            }
            Fault::KillRedis => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                redis.stop();
                tokio::time::sleep(Duration::from_millis(300)).await;
                // Redis comes back empty: the spend it held is gone, as after a crash
                // without persistence. A fresh customer per rep keeps the check honest.
                redis.restart();
            }
        }
        let mut admitted = 0u64;
        let mut refused = 0u64;
        let mut spend = 0u64;
        for t in tasks {
            let Ok(Ok(r)) = t.await else { continue };
            match r.status {
                200 => {
                    admitted += 1;
                    spend += cost_of(&r);
                }
                429 | 503 => refused += 1,
                _ => {}
            }
        }
        let over = spend > cap;
        overspent += usize::from(over);
        println!(
            "{rep:>3}  {:<10}  {admitted:>8}  {AFFORDABLE_WORST_CASE:>22}  {refused:>7}  {spend:>10}  {cap:>8}  {}  ({:?})",
            format!("{fault:?}"),
            if over { "OVER" } else { "ok" },
            started.elapsed()
        );
    }
    println!("{overspent} of {reps} repetitions overspent");
}

/// The cost the gateway reported: the header, or the SSE comment of a stream.
fn cost_of(r: &client::Response) -> u64 {
    let text = r.text();
    let usd = r
        .header("x-tollgate-cost")
        .map(str::to_string)
        .or_else(|| {
            text.lines()
                .find_map(|l| l.strip_prefix(": tollgate cost="))
                .and_then(|rest| rest.split(' ').next())
                .map(str::to_string)
        })
        .unwrap_or_default();
    tollgate::pricing::parse_usd(&usd).unwrap_or(0)
}
