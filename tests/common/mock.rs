//! `MockProvider`: a real HTTP/1.1 server on 127.0.0.1 that answers like the
//! OpenAI and Anthropic APIs by replaying the recorded fixtures.
//!
//! Default answer by path (matched on the path's end, query ignored, so a base
//! path such as `/openai/v1/chat/completions` works too):
//!
//! | request | fixture |
//! |---|---|
//! | `POST …/chat/completions` | `openai-chat-nonstream`; with `"stream":true`: `openai-chat-stream-include-usage` if `stream_options.include_usage` is true, else `openai-chat-stream-no-usage` |
//! | `POST …/completions` | `openai-completions-legacy` / `openai-completions-legacy-stream` |
//! | `POST …/embeddings` | `openai-embeddings` |
//! | `POST …/responses` | `openai-responses-nonstream` / `openai-responses-stream` |
//! | `POST …/messages` | `anthropic-messages-nonstream` / `anthropic-messages-stream` |
//! | `POST …/messages/count_tokens` | `{"input_tokens": N}`, N = `x-mock-input-tokens` or ceil(body bytes / 4) |
//! | `GET …/models` | a three-entry OpenAI model list |
//! | anything else | 404 with an OpenAI- or Anthropic-shaped error |
//!
//! Request headers that change the answer (the gateway forwards them unchanged):
//!
//! - `x-mock-fixture: <name>`: replay `<name>.sse` or `<name>.json` with the status
//!   line and headers of `<name>.headers.txt`.
//! - `x-mock-status: <code>`: answer `<code>` with an error body shaped for the path
//!   (Anthropic for `…/messages*`, OpenAI otherwise).
//! - `x-mock-delay-ms: N`: wait N ms before the status line.
//! - `x-mock-chunk-delay-ms: N`: wait N ms between SSE events.
//! - `x-mock-reset-after-events: N`: send the head and N SSE events (N bytes of a
//!   JSON body), then abort the TCP connection with RST (SO_LINGER 0). The last
//!   chunk is never sent.
//! - `x-mock-close-after-events: N`: the same, but a clean FIN instead of RST.
//! - `x-mock-reset-before-response: 1`: abort with RST without sending anything.
//! - `x-mock-input-tokens: N`: the count returned by `count_tokens`.
//! - `x-mock-pad-bytes: N`: N spaces after a JSON body's opening brace (a large body).
//!
//! Bad values in these headers produce a 400 `mock_error` response.
//!
//! Replayed fixtures drop the recorded `Content-Length`, `Content-Encoding`,
//! `Transfer-Encoding`, `Connection` and `Keep-Alive` headers; the mock frames
//! bodies itself: JSON with Content-Length, SSE chunked with one HTTP chunk per
//! event, flushed each. Every response also carries `x-mock-connection-id` and
//! `x-mock-request-index`.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

use super::wire::{self, Headers};

/// Largest request body the mock accepts (larger ones get 413).
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// The request target as sent, query string included.
    pub path: String,
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    /// Lowercased names, in arrival order.
    pub headers: Headers,
    /// The decoded body (de-chunked if it came chunked).
    pub body: Vec<u8>,
    /// Whether the body arrived with `Transfer-Encoding: chunked`.
    pub chunked: bool,
    /// Trailer fields of a chunked body.
    pub trailers: Headers,
    /// Which accepted TCP connection carried it (0, 1, 2, … in accept order).
    pub connection_id: usize,
    /// Position among all requests this mock received (0-based).
    pub index: usize,
}

impl Received {
    /// First value of a header (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        wire::header(&self.headers, name)
    }

    /// All values of a header (case-insensitive).
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        wire::header_all(&self.headers, name)
    }

    /// The path without the query string.
    pub fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or("")
    }

    /// The body as (lossy) UTF-8.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics with the body text if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "mock: body of {} {} is not JSON ({e}): {:?}",
                self.method,
                self.path,
                truncate_text(&self.body, 2000)
            )
        })
    }
}

struct Shared {
    fixtures: PathBuf,
    requests: Mutex<Vec<Received>>,
    connections: AtomicUsize,
    aborted: AtomicUsize,
    tasks: Mutex<Vec<AbortHandle>>,
}

/// The mock upstream. Dropping it stops the accept loop and every connection.
pub struct MockProvider {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MockProvider {
    /// Binds 127.0.0.1:0 and serves the fixtures in `tests/fixtures`.
    pub async fn start() -> MockProvider {
        Self::start_with_fixtures(super::fixtures_dir()).await
    }

    /// Same as [`MockProvider::start`] with another fixture directory.
    pub async fn start_with_fixtures(dir: impl Into<PathBuf>) -> MockProvider {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("mock provider: bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("mock provider: local_addr of the listener");
        let shared = Arc::new(Shared {
            fixtures: dir.into(),
            requests: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            aborted: AtomicUsize::new(0),
            tasks: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        MockProvider {
            addr,
            shared,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Received> {
        lock(&self.shared.requests).clone()
    }

    /// The most recent request.
    pub fn last(&self) -> Option<Received> {
        lock(&self.shared.requests).last().cloned()
    }

    /// Number of requests received so far.
    pub fn request_count(&self) -> usize {
        lock(&self.shared.requests).len()
    }

    /// Forgets the recorded requests (counters are kept).
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// Number of TCP connections accepted so far.
    pub fn connections_accepted(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Responses the mock could not finish because the peer went away (write
    /// failed, or the peer closed while the mock waited on a delay). Deliberate
    /// `x-mock-reset-*` / `x-mock-close-*` cuts are not counted.
    pub fn responses_aborted(&self) -> usize {
        self.shared.aborted.load(Ordering::SeqCst)
    }

    /// Polls `cond` every 10 ms until it holds; panics after `timeout` with
    /// `what` and the recorded request count.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&MockProvider) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(self) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "mock: timed out after {timeout:?} waiting for {what} \
                     (requests: {}, connections: {}, aborted: {})",
                    self.request_count(),
                    self.connections_accepted(),
                    self.responses_aborted()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        self.accept.abort();
        for task in lock(&self.shared.tasks).drain(..) {
            task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("mock provider: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let id = shared.connections.fetch_add(1, Ordering::SeqCst);
        let task = tokio::spawn(serve_connection(stream, id, shared.clone()));
        let mut tasks = lock(&shared.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(task.abort_handle());
    }
}

type Conn = BufReader<TcpStream>;

enum ReadError {
    /// The connection broke; nothing more can be sent.
    Io,
    /// The request is unacceptable: answer with this status and message, then close.
    Reject(u16, String),
}

async fn serve_connection(stream: TcpStream, conn_id: usize, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let mut conn = BufReader::new(stream);
    loop {
        let request = match read_request(&mut conn, conn_id, &shared).await {
            Ok(Some(r)) => r,
            Ok(None) | Err(ReadError::Io) => return,
            Err(ReadError::Reject(status, message)) => {
                let plan = Plan::json(
                    status,
                    json!({"error": {"message": message, "type": "mock_error"}}),
                );
                let _ = send(&mut conn, plan, &Controls::default(), true).await;
                return;
            }
        };
        let close = wire::has_token(&request.headers, "connection", "close")
            || (request.version == "HTTP/1.0"
                && !wire::has_token(&request.headers, "connection", "keep-alive"));
        let (mut plan, controls) = match Controls::parse(&request.headers) {
            Ok(controls) => {
                let mut plan = respond(&request, &controls, &shared.fixtures);
                plan.pad(controls.pad);
                (plan, controls)
            }
            Err(message) => (
                Plan::json(
                    400,
                    json!({"error": {"message": message, "type": "mock_error"}}),
                ),
                Controls::default(),
            ),
        };
        plan.headers.push((
            "x-mock-connection-id".to_string(),
            request.connection_id.to_string(),
        ));
        plan.headers.push((
            "x-mock-request-index".to_string(),
            request.index.to_string(),
        ));
        match send(&mut conn, plan, &controls, close).await {
            Ok(Outcome::KeepAlive) => {}
            Ok(Outcome::Closed) => return,
            Err(_) => {
                shared.aborted.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    }
}

async fn read_request(
    conn: &mut Conn,
    conn_id: usize,
    shared: &Shared,
) -> Result<Option<Received>, ReadError> {
    let head = match wire::read_head(conn, true).await {
        Ok(Some(head)) => head,
        Ok(None) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            return Err(ReadError::Reject(
                400,
                format!("mock: bad request head: {e}"),
            ))
        }
        Err(_) => return Err(ReadError::Io),
    };
    let parts: Vec<&str> = head.start_line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(ReadError::Reject(
            400,
            format!("mock: bad request line {:?}", head.start_line),
        ));
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(ReadError::Reject(
            505,
            format!("mock: unsupported version {version:?}"),
        ));
    }
    let chunked = wire::is_chunked(&head.headers);
    let length = if chunked {
        None
    } else if wire::header(&head.headers, "transfer-encoding").is_some() {
        return Err(ReadError::Reject(
            501,
            "mock: only chunked transfer-encoding is supported".to_string(),
        ));
    } else {
        wire::content_length(&head.headers)
            .map_err(|e| ReadError::Reject(400, format!("mock: {e}")))?
    };
    if let Some(n) = length {
        if n > MAX_BODY as u64 {
            return Err(ReadError::Reject(
                413,
                format!("mock: request body of {n} bytes exceeds {MAX_BODY}"),
            ));
        }
    }
    if wire::has_token(&head.headers, "expect", "100-continue") {
        conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(|_| ReadError::Io)?;
        conn.flush().await.map_err(|_| ReadError::Io)?;
    }
    let mut body = Vec::new();
    let mut trailers = Headers::new();
    if chunked {
        loop {
            match wire::read_chunk(conn, MAX_BODY).await {
                Ok(Some(data)) => {
                    if body.len() + data.len() > MAX_BODY {
                        return Err(ReadError::Reject(
                            413,
                            format!("mock: chunked request body exceeds {MAX_BODY} bytes"),
                        ));
                    }
                    body.extend_from_slice(&data);
                }
                Ok(None) => break,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    return Err(ReadError::Reject(
                        400,
                        format!("mock: bad chunked body: {e}"),
                    ))
                }
                Err(_) => return Err(ReadError::Io),
            }
        }
        trailers = match wire::read_header_block(conn).await {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(ReadError::Reject(400, format!("mock: bad trailers: {e}")))
            }
            Err(_) => return Err(ReadError::Io),
        };
    } else if let Some(n) = length {
        // n <= MAX_BODY was checked above.
        body = vec![0u8; n as usize];
        conn.read_exact(&mut body)
            .await
            .map_err(|_| ReadError::Io)?;
    }
    let mut requests = lock(&shared.requests);
    let received = Received {
        method: method.to_string(),
        path: target.to_string(),
        version: version.to_string(),
        headers: head.headers,
        body,
        chunked,
        trailers,
        connection_id: conn_id,
        index: requests.len(),
    };
    requests.push(received.clone());
    Ok(Some(received))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CutMode {
    Reset,
    Close,
}

#[derive(Default, Debug)]
struct Controls {
    fixture: Option<String>,
    status: Option<u16>,
    delay: Duration,
    chunk_delay: Duration,
    cut: Option<(usize, CutMode)>,
    reset_before_response: bool,
    input_tokens: Option<u64>,
    pad: usize,
}

impl Controls {
    fn parse(headers: &[(String, String)]) -> Result<Controls, String> {
        fn number(headers: &[(String, String)], name: &str) -> Result<Option<u64>, String> {
            match wire::header(headers, name) {
                None => Ok(None),
                Some(v) => {
                    v.trim().parse::<u64>().map(Some).map_err(|_| {
                        format!("mock: {name} must be a non-negative integer, got {v:?}")
                    })
                }
            }
        }
        let mut c = Controls {
            fixture: wire::header(headers, "x-mock-fixture").map(|s| s.trim().to_string()),
            ..Controls::default()
        };
        if let Some(s) = number(headers, "x-mock-status")? {
            if !(100..=999).contains(&s) || (100..200).contains(&s) {
                return Err(format!("mock: x-mock-status {s} is not a final status"));
            }
            c.status = Some(s as u16);
        }
        c.delay = Duration::from_millis(number(headers, "x-mock-delay-ms")?.unwrap_or(0));
        c.chunk_delay =
            Duration::from_millis(number(headers, "x-mock-chunk-delay-ms")?.unwrap_or(0));
        if let Some(n) = number(headers, "x-mock-reset-after-events")? {
            c.cut = Some((n as usize, CutMode::Reset));
        }
        if let Some(n) = number(headers, "x-mock-close-after-events")? {
            c.cut = Some((n as usize, CutMode::Close));
        }
        c.reset_before_response = wire::header(headers, "x-mock-reset-before-response").is_some();
        c.input_tokens = number(headers, "x-mock-input-tokens")?;
        c.pad = number(headers, "x-mock-pad-bytes")?.unwrap_or(0) as usize;
        if c.pad > MAX_BODY {
            return Err(format!("mock: x-mock-pad-bytes is at most {MAX_BODY}"));
        }
        Ok(c)
    }
}

enum PlanBody {
    /// Sent with Content-Length.
    Full(Vec<u8>),
    /// Sent chunked, one HTTP chunk per element.
    Events(Vec<Vec<u8>>),
}

struct Plan {
    status: u16,
    reason: String,
    /// Names as they should appear on the wire (recorded case kept).
    headers: Headers,
    body: PlanBody,
}

impl Plan {
    /// `n` spaces after a JSON body's opening brace: the same JSON, `n` bytes longer.
    fn pad(&mut self, n: usize) {
        if let PlanBody::Full(body) = &mut self.body {
            if n > 0 && body.first() == Some(&b'{') {
                body.splice(1..1, std::iter::repeat_n(b' ', n));
            }
        }
    }

    fn json(status: u16, body: Value) -> Plan {
        Plan {
            status,
            reason: wire::reason_phrase(status).to_string(),
            headers: vec![("content-type".to_string(), "application/json".to_string())],
            body: PlanBody::Full(body.to_string().into_bytes()),
        }
    }
}

fn is_anthropic_path(path: &str) -> bool {
    path.ends_with("/messages") || path.ends_with("/messages/count_tokens")
}

/// Decides the response for one request.
fn respond(req: &Received, controls: &Controls, fixtures: &Path) -> Plan {
    let path = req.path_only();
    if let Some(status) = controls.status {
        return error_plan(status, is_anthropic_path(path), req.index);
    }
    if let Some(name) = &controls.fixture {
        return load_fixture(fixtures, name).unwrap_or_else(|message| {
            Plan::json(
                500,
                json!({"error": {"message": message, "type": "mock_error"}}),
            )
        });
    }
    let body: Option<Value> = serde_json::from_slice(&req.body).ok();
    let stream = body
        .as_ref()
        .and_then(|b| b.get("stream"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let include_usage = body
        .as_ref()
        .and_then(|b| b.pointer("/stream_options/include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let name = match (req.method.as_str(), path) {
        ("GET", p) if p.ends_with("/models") => return models_plan(),
        ("POST", p) if p.ends_with("/messages/count_tokens") => {
            let tokens = controls
                .input_tokens
                .unwrap_or_else(|| (req.body.len() as u64).div_ceil(4));
            return Plan::json(200, json!({ "input_tokens": tokens }));
        }
        ("POST", p) if p.ends_with("/chat/completions") => match (stream, include_usage) {
            (false, _) => "openai-chat-nonstream",
            (true, true) => "openai-chat-stream-include-usage",
            (true, false) => "openai-chat-stream-no-usage",
        },
        ("POST", p) if p.ends_with("/completions") => {
            if stream {
                "openai-completions-legacy-stream"
            } else {
                "openai-completions-legacy"
            }
        }
        ("POST", p) if p.ends_with("/embeddings") => "openai-embeddings",
        ("POST", p) if p.ends_with("/responses") => {
            if stream {
                "openai-responses-stream"
            } else {
                "openai-responses-nonstream"
            }
        }
        ("POST", p) if p.ends_with("/messages") => {
            if stream {
                "anthropic-messages-stream"
            } else {
                "anthropic-messages-nonstream"
            }
        }
        _ => return error_plan(404, is_anthropic_path(path), req.index),
    };
    load_fixture(fixtures, name).unwrap_or_else(|message| {
        Plan::json(
            500,
            json!({"error": {"message": message, "type": "mock_error"}}),
        )
    })
}

fn models_plan() -> Plan {
    Plan::json(
        200,
        json!({
            "object": "list",
            "data": [
                {"id": "gpt-4o", "object": "model", "created": 1715367049, "owned_by": "system"},
                {"id": "gpt-4o-mini", "object": "model", "created": 1721172741, "owned_by": "system"},
                {"id": "text-embedding-3-small", "object": "model", "created": 1705948997, "owned_by": "system"}
            ]
        }),
    )
}

/// An error body shaped like the provider's own (see FORMATS.md §6).
fn error_plan(status: u16, anthropic: bool, index: usize) -> Plan {
    let message = format!("mock: injected HTTP {status}");
    if anthropic {
        let kind = match status {
            400 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            529 => "overloaded_error",
            _ => "api_error",
        };
        let request_id = format!("req_mock{index:020}");
        let mut plan = Plan::json(
            status,
            json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}),
        );
        let retry = matches!(status, 408 | 409 | 429) || status >= 500;
        plan.headers.push(("request-id".to_string(), request_id));
        plan.headers
            .push(("x-should-retry".to_string(), retry.to_string()));
        plan
    } else {
        let (kind, code) = match status {
            400 => ("invalid_request_error", Value::Null),
            401 => ("invalid_request_error", json!("invalid_api_key")),
            403 => (
                "invalid_request_error",
                json!("unsupported_country_region_territory"),
            ),
            404 => ("invalid_request_error", json!("unknown_url")),
            429 => ("requests", json!("rate_limit_exceeded")),
            s if s >= 500 => ("server_error", Value::Null),
            _ => ("invalid_request_error", Value::Null),
        };
        let mut plan = Plan::json(
            status,
            json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
        );
        plan.headers
            .push(("x-request-id".to_string(), format!("req_mock{index:020}")));
        plan
    }
}

/// Loads `<name>.sse` or `<name>.json` plus `<name>.headers.txt`.
fn load_fixture(dir: &Path, name: &str) -> Result<Plan, String> {
    let base = name
        .strip_suffix(".json")
        .or_else(|| name.strip_suffix(".sse"))
        .unwrap_or(name);
    if base.is_empty()
        || base.contains("..")
        || !base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(format!("mock: bad fixture name {name:?}"));
    }
    let sse_path = dir.join(format!("{base}.sse"));
    let json_path = dir.join(format!("{base}.json"));
    let (is_sse, body) = if sse_path.is_file() {
        (true, std::fs::read(&sse_path))
    } else if json_path.is_file() {
        (false, std::fs::read(&json_path))
    } else {
        return Err(format!(
            "mock: no fixture {base}.sse or {base}.json in {}",
            dir.display()
        ));
    };
    let body = body.map_err(|e| format!("mock: cannot read fixture {base}: {e}"))?;
    let headers_path = dir.join(format!("{base}.headers.txt"));
    let (status, reason, mut headers) = if headers_path.is_file() {
        let text = std::fs::read_to_string(&headers_path)
            .map_err(|e| format!("mock: cannot read {}: {e}", headers_path.display()))?;
        parse_recorded_headers(&text)
            .map_err(|e| format!("mock: {}: {e}", headers_path.display()))?
    } else {
        (200, "OK".to_string(), Headers::new())
    };
    let has_content_type = headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-type"));
    if !has_content_type {
        let ct = if is_sse {
            "text/event-stream"
        } else {
            "application/json"
        };
        headers.push(("content-type".to_string(), ct.to_string()));
    }
    let body = if is_sse {
        PlanBody::Events(wire::split_sse_events(&body))
    } else {
        PlanBody::Full(body)
    };
    Ok(Plan {
        status,
        reason,
        headers,
        body,
    })
}

/// Parses a `<name>.headers.txt`: `#` comment lines, a status line, then
/// `Name: value` lines. Framing and connection headers are dropped.
fn parse_recorded_headers(text: &str) -> Result<(u16, String, Headers), String> {
    const DROP: [&str; 5] = [
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "connection",
        "keep-alive",
    ];
    let mut lines = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty());
    let status_line = lines.next().ok_or("no status line")?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/") {
        return Err(format!("bad status line {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let reason = parts.next().unwrap_or("").trim().to_string();
    let mut headers = Headers::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        let name = name.trim();
        if DROP.iter().any(|d| name.eq_ignore_ascii_case(d)) {
            continue;
        }
        headers.push((name.to_string(), value.trim().to_string()));
    }
    Ok((status, reason, headers))
}

enum Outcome {
    KeepAlive,
    Closed,
}

/// Waits `dur`, returning an error early if the peer closes the connection or
/// it breaks in the meantime (so aborted exchanges are noticed during delays).
async fn wait_watching_peer(conn: &mut Conn, dur: Duration) -> io::Result<()> {
    if dur.is_zero() {
        return Ok(());
    }
    let sleep = tokio::time::sleep(dur);
    tokio::pin!(sleep);
    tokio::select! {
        _ = &mut sleep => return Ok(()),
        r = conn.fill_buf() => match r {
            Ok([]) => return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "peer closed")),
            Ok(_) => {} // pipelined bytes: leave them buffered for the next request
            Err(e) => return Err(e),
        },
    }
    sleep.await;
    Ok(())
}

fn cut(conn: &mut Conn, mode: CutMode) -> Outcome {
    if mode == CutMode::Reset {
        // SO_LINGER 0: dropping the socket sends RST instead of FIN.
        let _ = conn.get_ref().set_zero_linger();
    }
    Outcome::Closed
}

async fn send(
    conn: &mut Conn,
    plan: Plan,
    controls: &Controls,
    close: bool,
) -> io::Result<Outcome> {
    wait_watching_peer(conn, controls.delay).await?;
    if controls.reset_before_response {
        return Ok(cut(conn, CutMode::Reset));
    }
    let mut head = format!("HTTP/1.1 {} {}\r\n", plan.status, plan.reason);
    for (name, value) in &plan.headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    match &plan.body {
        PlanBody::Full(body) => head.push_str(&format!("content-length: {}\r\n", body.len())),
        PlanBody::Events(_) => head.push_str("transfer-encoding: chunked\r\n"),
    }
    if close {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    match plan.body {
        PlanBody::Full(body) => {
            if let Some((n, mode)) = controls.cut {
                out.extend_from_slice(&body[..n.min(body.len())]);
                conn.write_all(&out).await?;
                conn.flush().await?;
                return Ok(cut(conn, mode));
            }
            out.extend_from_slice(&body);
            conn.write_all(&out).await?;
            conn.flush().await?;
        }
        PlanBody::Events(events) => {
            conn.write_all(&out).await?;
            conn.flush().await?;
            for (i, event) in events.iter().enumerate() {
                if i > 0 {
                    wait_watching_peer(conn, controls.chunk_delay).await?;
                }
                if let Some((n, mode)) = controls.cut {
                    if i == n {
                        return Ok(cut(conn, mode));
                    }
                }
                conn.write_all(&wire::encode_chunk(event)).await?;
                conn.flush().await?;
            }
            if let Some((_, mode)) = controls.cut {
                return Ok(cut(conn, mode));
            }
            conn.write_all(wire::LAST_CHUNK).await?;
            conn.flush().await?;
        }
    }
    if close {
        let _ = conn.get_mut().shutdown().await;
        return Ok(Outcome::Closed);
    }
    Ok(Outcome::KeepAlive)
}

fn truncate_text(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(max)]).into_owned();
    if bytes.len() > max {
        format!("{text}… ({} bytes)", bytes.len())
    } else {
        text
    }
}
