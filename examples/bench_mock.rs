//! `bench_mock`: a fast OpenAI-compatible provider for the benchmarks (`scripts/bench`).
//!
//! Hand-written HTTP/1.1 on tokio with keep-alive, so the upstream costs as little as
//! possible and the gateway under test dominates. Loopback addresses only.
//!
//! ```text
//! bench_mock [--listen 127.0.0.1:0] [--threads 2] [--delay-ms 0] [--chunks 100]
//!            [--chunk-interval-ms 0] [--provider-headers 0|1]
//! ```
//!
//! Prints `listening 127.0.0.1:PORT` once bound. Answers:
//!
//! - `POST …/chat/completions`: a chat completion with `usage`; with `"stream":true`,
//!   an SSE stream of `--chunks` content events, a finish event, the usage-only event when
//!   the body asks for `include_usage`, and `data: [DONE]`. Each event is one HTTP chunk,
//!   written on its own (one `write` per event, yielding to other connections in between,
//!   or paced by `--chunk-interval-ms`).
//! - `GET …/models`: a one-entry model list. Anything else: 404 in OpenAI's error shape.
//!
//! `--provider-headers 1` adds the response headers OpenAI sent with a recorded chat
//! completion (`tests/fixtures/openai-chat-nonstream.headers.txt`: rate limits, request id,
//! processing time, Cloudflare's; 17 beyond the default three) to every 200 response;
//! by default only `content-type`, the framing header and `openai-processing-ms` (JSON) or
//! `cache-control` (SSE) are sent.
//!
//! Per-request overrides (the gateways forward these headers unchanged):
//! `x-mock-delay-ms` (before the status line), `x-mock-chunks`, `x-mock-chunk-interval-ms`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head or body the mock reads.
const MAX_REQUEST: usize = 64 * 1024 * 1024;

struct Opts {
    listen: SocketAddr,
    threads: usize,
    delay_ms: u64,
    chunks: usize,
    chunk_interval_ms: u64,
    provider_headers: bool,
}

/// What OpenAI sends beside the body (recorded; see the module note), without the framing
/// and encoding headers the mock sets itself.
const PROVIDER_HEADERS: &str = "Connection: keep-alive\r\nDate: Thu, 03 Jul 2025 18:41:59 GMT\r\nServer: cloudflare\r\nX-Content-Type-Options: nosniff\r\naccess-control-expose-headers: X-Request-ID\r\nalt-svc: h3=\":443\"; ma=86400\r\ncf-cache-status: DYNAMIC\r\nopenai-version: 2020-10-01\r\nstrict-transport-security: max-age=31536000; includeSubDomains; preload\r\nx-ratelimit-limit-requests: 10000\r\nx-ratelimit-limit-tokens: 30000000\r\nx-ratelimit-remaining-requests: 9999\r\nx-ratelimit-remaining-tokens: 29998186\r\nx-ratelimit-reset-requests: 6ms\r\nx-ratelimit-reset-tokens: 3ms\r\nx-request-id: req_c0f374d27da52b49fbc9e28b67f5496a\r\nopenai-organization: org-bench\r\n";

/// Response bytes built once at startup.
struct Canned {
    json_head_and_body: Vec<u8>,
    sse_head: Vec<u8>,
    /// `data: …` event for content chunk `i` (the first also carries the role).
    first_event: Vec<u8>,
    content_event: Vec<u8>,
    finish_event: Vec<u8>,
    usage_event: Vec<u8>,
    done_event: Vec<u8>,
    models: Vec<u8>,
    not_found: Vec<u8>,
}

fn usage_json(completion_tokens: usize) -> String {
    format!(
        r#"{{"prompt_tokens":19,"completion_tokens":{completion_tokens},"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":0,"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}}"#,
        19 + completion_tokens
    )
}

fn chunk_frame(event: &str) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", event.len()).into_bytes();
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

impl Canned {
    fn new(provider_headers: bool) -> Canned {
        let extra = if provider_headers {
            PROVIDER_HEADERS
        } else {
            ""
        };
        const ID: &str = r#""id":"chatcmpl-bench0000000000000000000000","created":1764000000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_bench00000""#;
        let text = "Hello from the benchmark mock provider. ".repeat(10);
        let body = format!(
            r#"{{{ID},"object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"{text}","refusal":null,"annotations":[]}},"logprobs":null,"finish_reason":"stop"}}],"usage":{},"service_tier":"default"}}"#,
            usage_json(100)
        );
        let mut json = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nopenai-processing-ms: 1\r\n{extra}\r\n",
            body.len()
        )
        .into_bytes();
        json.extend_from_slice(body.as_bytes());
        let chunk = |delta: &str, finish: &str| {
            format!(
                "data: {{{ID},\"object\":\"chat.completion.chunk\",\"service_tier\":\"default\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}],\"usage\":null}}\n\n"
            )
        };
        let models = r#"{"object":"list","data":[{"id":"gpt-4o-mini","object":"model","created":1721172741,"owned_by":"system"}]}"#;
        let not_found = r#"{"error":{"message":"Unknown route on the bench mock.","type":"invalid_request_error","param":null,"code":"unknown_url"}}"#;
        Canned {
            json_head_and_body: json,
            sse_head: format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\ncache-control: no-cache\r\n{extra}\r\n").into_bytes(),
            first_event: chunk_frame(&chunk(
                r#"{"role":"assistant","content":"Hello","refusal":null}"#,
                "null",
            )),
            content_event: chunk_frame(&chunk(r#"{"content":" token"}"#, "null")),
            finish_event: chunk_frame(&chunk("{}", r#""stop""#)),
            usage_event: chunk_frame(&format!(
                "data: {{{ID},\"object\":\"chat.completion.chunk\",\"service_tier\":\"default\",\"choices\":[],\"usage\":{}}}\n\n",
                usage_json(100)
            )),
            done_event: chunk_frame("data: [DONE]\n\n"),
            models: with_head(200, "OK", models),
            not_found: with_head(404, "Not Found", not_found),
        }
    }
}

fn with_head(status: u16, reason: &str, body: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

fn usage() -> ! {
    eprintln!(
        "usage: bench_mock [--listen 127.0.0.1:0] [--threads N] [--delay-ms N] [--chunks N] \
         [--chunk-interval-ms N] [--provider-headers 0|1]"
    );
    std::process::exit(2)
}

fn parse_opts() -> Opts {
    let mut opts = Opts {
        listen: "127.0.0.1:0".parse().expect("literal address"),
        threads: 2,
        delay_ms: 0,
        chunks: 100,
        chunk_interval_ms: 0,
        provider_headers: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| usage());
        let number = || value.parse::<u64>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--listen" => opts.listen = value.parse().unwrap_or_else(|_| usage()),
            "--threads" => opts.threads = number().max(1) as usize,
            "--delay-ms" => opts.delay_ms = number(),
            "--chunks" => opts.chunks = number() as usize,
            "--chunk-interval-ms" => opts.chunk_interval_ms = number(),
            "--provider-headers" => opts.provider_headers = number() != 0,
            _ => usage(),
        }
    }
    if !opts.listen.ip().is_loopback() {
        eprintln!(
            "bench_mock: refusing to listen on {}: loopback only",
            opts.listen
        );
        std::process::exit(2);
    }
    opts
}

fn main() {
    let opts = parse_opts();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(serve(opts));
}

async fn serve(opts: Opts) {
    let listener = TcpListener::bind(opts.listen)
        .await
        .unwrap_or_else(|e| panic!("bind {}: {e}", opts.listen));
    let addr = listener.local_addr().expect("local address");
    println!("listening {addr}");
    let shared = Arc::new((Canned::new(opts.provider_headers), opts));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors or similar: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = connection(stream, &shared.0, &shared.1).await;
        });
    }
}

/// What one request asked for.
struct Request {
    get: bool,
    chat: bool,
    models: bool,
    stream: bool,
    include_usage: bool,
    close: bool,
    delay_ms: Option<u64>,
    chunks: Option<usize>,
    chunk_interval_ms: Option<u64>,
}

type Io = std::io::Result<()>;

fn bad(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

async fn fill(stream: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<bool> {
    if buf.capacity() - buf.len() < 8192 {
        buf.reserve(16 * 1024);
    }
    Ok(stream.read_buf(buf).await? > 0)
}

async fn connection(mut stream: TcpStream, canned: &Canned, opts: &Opts) -> Io {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut body = Vec::new();
    loop {
        let head_end = loop {
            if let Some(at) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                break at + 4;
            }
            if buf.len() > MAX_REQUEST {
                return Err(bad("request head too large"));
            }
            if !fill(&mut stream, &mut buf).await? {
                return Ok(()); // clean close between requests
            }
        };
        let head = buf.split_to(head_end);
        let (mut req, length, chunked) = parse_head(&head)?;
        body.clear();
        if chunked {
            read_chunked(&mut stream, &mut buf, &mut body).await?;
        } else {
            while buf.len() < length {
                if length > MAX_REQUEST || !fill(&mut stream, &mut buf).await? {
                    return Err(bad("short body"));
                }
            }
            body.extend_from_slice(&buf[..length]);
            buf.advance(length);
        }
        if req.chat {
            req.stream = has_true(&body, b"\"stream\"");
            req.include_usage = has_true(&body, b"\"include_usage\"");
        }
        let delay = req.delay_ms.unwrap_or(opts.delay_ms);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if req.chat && !req.get && req.stream {
            let chunks = req.chunks.unwrap_or(opts.chunks);
            let interval = req.chunk_interval_ms.unwrap_or(opts.chunk_interval_ms);
            write_stream(&mut stream, canned, chunks, interval, req.include_usage).await?;
        } else if req.chat && !req.get {
            stream.write_all(&canned.json_head_and_body).await?;
        } else if req.models && req.get {
            stream.write_all(&canned.models).await?;
        } else {
            stream.write_all(&canned.not_found).await?;
        }
        if req.close {
            return Ok(());
        }
    }
}

/// Whether `key` is followed (after optional whitespace and the colon) by `true`.
fn has_true(body: &[u8], key: &[u8]) -> bool {
    let mut from = 0;
    while let Some(at) = memchr::memmem::find(&body[from..], key) {
        let rest = &body[from + at + key.len()..];
        let rest = trim_start(rest);
        if let Some(rest) = rest.strip_prefix(b":") {
            if trim_start(rest).starts_with(b"true") {
                return true;
            }
        }
        from += at + key.len();
    }
    false
}

fn trim_start(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t' | b'\r' | b'\n', rest @ ..] = s {
        s = rest;
    }
    s
}

fn parse_head(head: &[u8]) -> std::io::Result<(Request, usize, bool)> {
    let mut lines = head.split(|&b| b == b'\n');
    let line = lines.next().ok_or_else(|| bad("empty head"))?;
    let mut parts = line.split(|&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    let target = parts.next().ok_or_else(|| bad("no request target"))?;
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    let http10 = line.ends_with(b"HTTP/1.0\r");
    let mut req = Request {
        get: method == b"GET",
        chat: path.ends_with(b"/chat/completions"),
        models: path.ends_with(b"/models"),
        stream: false,
        include_usage: false,
        close: http10,
        delay_ms: None,
        chunks: None,
        chunk_interval_ms: None,
    };
    let mut length = 0usize;
    let mut chunked = false;
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = memchr::memchr(b':', line) else {
            continue;
        };
        let name = &line[..colon];
        let value = trim_start(&line[colon + 1..]);
        let number = || {
            std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if name.eq_ignore_ascii_case(b"content-length") {
            length = number().ok_or_else(|| bad("bad content-length"))? as usize;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = value.eq_ignore_ascii_case(b"chunked");
        } else if name.eq_ignore_ascii_case(b"connection") {
            if value.eq_ignore_ascii_case(b"close") {
                req.close = true;
            } else if value.eq_ignore_ascii_case(b"keep-alive") {
                req.close = false;
            }
        } else if name.eq_ignore_ascii_case(b"x-mock-delay-ms") {
            req.delay_ms = number();
        } else if name.eq_ignore_ascii_case(b"x-mock-chunks") {
            req.chunks = number().map(|n| n as usize);
        } else if name.eq_ignore_ascii_case(b"x-mock-chunk-interval-ms") {
            req.chunk_interval_ms = number();
        }
    }
    Ok((req, length, chunked))
}

async fn read_chunked(stream: &mut TcpStream, buf: &mut BytesMut, body: &mut Vec<u8>) -> Io {
    loop {
        let line_end = loop {
            if let Some(at) = memchr::memmem::find(buf, b"\r\n") {
                break at;
            }
            if !fill(stream, buf).await? {
                return Err(bad("eof in chunk size"));
            }
        };
        let size_text = std::str::from_utf8(&buf[..line_end]).map_err(|_| bad("chunk size"))?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| bad("chunk size"))?;
        buf.advance(line_end + 2);
        if size == 0 {
            // Trailers (usually none), then the blank line.
            loop {
                if let Some(at) = memchr::memmem::find(buf, b"\r\n") {
                    let empty = at == 0;
                    buf.advance(at + 2);
                    if empty {
                        return Ok(());
                    }
                    continue;
                }
                if !fill(stream, buf).await? {
                    return Err(bad("eof in trailers"));
                }
            }
        }
        if body.len() + size > MAX_REQUEST {
            return Err(bad("body too large"));
        }
        while buf.len() < size + 2 {
            if !fill(stream, buf).await? {
                return Err(bad("eof in chunk"));
            }
        }
        body.extend_from_slice(&buf[..size]);
        buf.advance(size + 2);
    }
}

async fn write_stream(
    stream: &mut TcpStream,
    canned: &Canned,
    chunks: usize,
    interval_ms: u64,
    include_usage: bool,
) -> Io {
    stream.write_all(&canned.sse_head).await?;
    for i in 0..chunks {
        pause(interval_ms).await;
        let event = if i == 0 {
            &canned.first_event
        } else {
            &canned.content_event
        };
        stream.write_all(event).await?;
    }
    pause(interval_ms).await;
    let mut tail = canned.finish_event.clone();
    if include_usage {
        tail.extend_from_slice(&canned.usage_event);
    }
    tail.extend_from_slice(&canned.done_event);
    tail.extend_from_slice(b"0\r\n\r\n");
    stream.write_all(&tail).await
}

/// Between two events: a fixed pace, or just a turn for the other connections.
async fn pause(interval_ms: u64) {
    if interval_ms > 0 {
        tokio::time::sleep(Duration::from_millis(interval_ms)).await;
    } else {
        tokio::task::yield_now().await;
    }
}
