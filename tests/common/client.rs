//! A minimal HTTP/1.1 test client over tokio `TcpStream`.
//!
//! - [`request`] / [`Connection::send`] are strict: they panic with a readable
//!   message unless a complete, well-framed response arrives in time.
//! - [`try_request`] / [`Connection::try_send`] return `Err` only when no response
//!   head could be read (connect failure, timeout, connection closed early); a
//!   body that breaks off comes back as `Ok` with `complete == false` and `error`
//!   set, with everything received up to that point.
//! - Every call is bounded by a timeout ([`DEFAULT_TIMEOUT`] unless changed), so a
//!   hung gateway fails the test instead of hanging it.
//!
//! The client adds `host` and, for bodies, `content-length` unless the caller
//! passes them. Passing `transfer-encoding: chunked` makes it send the body
//! chunked (16 KiB chunks).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use super::wire::{self, Headers};

/// Limit for one whole exchange (connect, write, head, body).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How the response body was delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Framing {
    /// HEAD request, 1xx, 204 or 304: no body by definition.
    #[default]
    NoBody,
    ContentLength(u64),
    Chunked,
    /// No length information: the body ends when the server closes.
    CloseDelimited,
}

/// A response as received.
#[derive(Debug, Clone, Default)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    /// Lowercased names, in arrival order.
    pub headers: Headers,
    /// The decoded body (de-chunked).
    pub body: Vec<u8>,
    /// Trailer fields after the last chunk (chunked bodies only).
    pub trailers: Headers,
    /// Decoded chunk payloads in arrival order (chunked bodies only).
    pub raw_chunks: Vec<Vec<u8>>,
    /// For each entry of `raw_chunks`: time since the request started sending.
    pub chunk_times: Vec<Duration>,
    /// Time from the start of the request until the response head was parsed.
    pub head_time: Duration,
    /// Time from the start of the request until reading stopped.
    pub elapsed: Duration,
    pub framing: Framing,
    /// The body ended where its framing says it ends.
    pub complete: bool,
    /// The first problem seen after the head (reset, truncation, bad framing,
    /// timeout); `None` for a clean response.
    pub error: Option<String>,
}

/// One server-sent event (WHATWG parsing rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The `id:` field of this event, if any.
    pub id: Option<String>,
}

impl SseEvent {
    /// `data` parsed as JSON (`None` for `[DONE]` or other non-JSON data).
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.data).ok()
    }
}

impl Response {
    /// First value of a header (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        wire::header(&self.headers, name)
    }

    /// All values of a header (case-insensitive).
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        wire::header_all(&self.headers, name)
    }

    /// First value of a trailer field (case-insensitive).
    pub fn trailer(&self, name: &str) -> Option<&str> {
        wire::header(&self.trailers, name)
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics with status and body if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {}", self.describe()))
    }

    /// The body parsed as an SSE stream. An unterminated last event is dropped,
    /// as the WHATWG rules require.
    pub fn sse_events(&self) -> Vec<SseEvent> {
        parse_sse(&self.body)
    }

    /// Just the `data` of each SSE event.
    pub fn sse_data(&self) -> Vec<String> {
        self.sse_events().into_iter().map(|e| e.data).collect()
    }

    /// One-paragraph summary for assertion messages (body cut at 2000 bytes).
    pub fn describe(&self) -> String {
        let shown = &self.body[..self.body.len().min(2000)];
        format!(
            "HTTP {} {:?}, framing {:?}, complete {}, error {:?}, {} body bytes in {} chunks, \
             headers {:?}, body {:?}{}",
            self.status,
            self.reason,
            self.framing,
            self.complete,
            self.error,
            self.body.len(),
            self.raw_chunks.len(),
            self.headers,
            String::from_utf8_lossy(shown),
            if self.body.len() > shown.len() {
                " …"
            } else {
                ""
            }
        )
    }
}

/// Parses an SSE byte stream per the WHATWG rules (BOM, CR/LF/CRLF, comments,
/// multi-line data, events without data are not dispatched).
pub fn parse_sse(bytes: &[u8]) -> Vec<SseEvent> {
    let text = String::from_utf8_lossy(bytes);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut events = Vec::new();
    let mut data = String::new();
    let mut has_data = false;
    let mut event: Option<String> = None;
    let mut id: Option<String> = None;
    let mut rest = text;
    while let Some(pos) = rest.find(['\r', '\n']) {
        let line = &rest[..pos];
        let skip = if rest[pos..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[pos + skip..];
        if line.is_empty() {
            if has_data {
                if data.ends_with('\n') {
                    data.pop();
                }
                events.push(SseEvent {
                    event: event.take(),
                    data: std::mem::take(&mut data),
                    id: id.take(),
                });
            }
            data.clear();
            has_data = false;
            event = None;
            id = None;
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => {
                data.push_str(value);
                data.push('\n');
                has_data = true;
            }
            "event" => event = Some(value.to_string()),
            "id" => id = Some(value.to_string()),
            _ => {}
        }
    }
    events
}

fn build_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let has = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    });
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !has("host") {
        head.push_str(&format!("host: {addr}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !chunked
        && !has("content-length")
        && (!body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH"))
    {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    if chunked {
        for piece in body.chunks(16 * 1024) {
            out.extend_from_slice(&wire::encode_chunk(piece));
        }
        out.extend_from_slice(wire::LAST_CHUNK);
    } else {
        out.extend_from_slice(body);
    }
    out
}

fn parse_status_line(line: &str) -> Result<(String, u16, String), String> {
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let code = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(format!("malformed status line {line:?}"));
    }
    let status = code
        .parse::<u16>()
        .map_err(|_| format!("malformed status line {line:?}"))?;
    Ok((
        version.to_string(),
        status,
        parts.next().unwrap_or("").to_string(),
    ))
}

/// Reads one response. `Err` only when no head could be read. The bool tells
/// whether the connection may carry another request.
async fn read_response(
    reader: &mut BufReader<OwnedReadHalf>,
    method: &str,
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    body_limit: Option<usize>,
) -> Result<(Response, bool), String> {
    let (head, version, status, reason) = loop {
        let head = match timeout_at(deadline, wire::read_head(reader, false)).await {
            Err(_) => {
                return Err(format!(
                    "timed out after {timeout:?} waiting for the response head"
                ))
            }
            Ok(Err(e)) => return Err(format!("reading the response head failed: {e}")),
            Ok(Ok(None)) => {
                return Err("connection closed before any response byte arrived".to_string())
            }
            Ok(Ok(Some(head))) => head,
        };
        let (version, status, reason) = parse_status_line(&head.start_line)?;
        if (100..200).contains(&status) && status != 101 {
            continue; // interim response (100 Continue, 103 Early Hints)
        }
        break (head, version, status, reason);
    };
    let mut resp = Response {
        status,
        reason,
        version,
        headers: head.headers,
        head_time: started.elapsed(),
        ..Response::default()
    };
    let te = wire::header(&resp.headers, "transfer-encoding").is_some();
    let cl = wire::content_length(&resp.headers);
    let no_body = method.eq_ignore_ascii_case("HEAD")
        || (100..200).contains(&status)
        || status == 204
        || status == 304;
    resp.framing = if no_body {
        Framing::NoBody
    } else if te {
        if wire::is_chunked(&resp.headers) {
            Framing::Chunked
        } else {
            Framing::CloseDelimited
        }
    } else {
        match &cl {
            Ok(Some(n)) => Framing::ContentLength(*n),
            Ok(None) => Framing::CloseDelimited,
            Err(e) => {
                resp.error = Some(format!("bad Content-Length: {e}"));
                resp.elapsed = started.elapsed();
                return Ok((resp, false));
            }
        }
    };
    if te && matches!(cl, Ok(Some(_))) {
        resp.error = Some("response has both Transfer-Encoding and Content-Length".to_string());
    }
    let limit_hit = |resp: &Response| body_limit.is_some_and(|n| resp.body.len() >= n);
    let progress = |resp: &Response| {
        format!(
            "{} body bytes in {} chunks so far",
            resp.body.len(),
            resp.raw_chunks.len()
        )
    };
    let mut stopped_early = false;
    match resp.framing {
        Framing::NoBody => resp.complete = true,
        Framing::Chunked => loop {
            if limit_hit(&resp) {
                stopped_early = true;
                break;
            }
            match timeout_at(deadline, wire::read_chunk(reader, usize::MAX)).await {
                Err(_) => {
                    let p = progress(&resp);
                    resp.error.get_or_insert(format!(
                        "timed out after {timeout:?} reading the chunked body ({p})"
                    ));
                    break;
                }
                Ok(Err(e)) => {
                    let p = progress(&resp);
                    resp.error = Some(format!("chunked body broken ({p}): {e}"));
                    break;
                }
                Ok(Ok(Some(data))) => {
                    resp.body.extend_from_slice(&data);
                    resp.raw_chunks.push(data);
                    resp.chunk_times.push(started.elapsed());
                }
                Ok(Ok(None)) => {
                    match timeout_at(deadline, wire::read_header_block(reader)).await {
                        Err(_) => {
                            resp.error =
                                Some(format!("timed out after {timeout:?} reading the trailers"))
                        }
                        Ok(Err(e)) => resp.error = Some(format!("bad trailer section: {e}")),
                        Ok(Ok(trailers)) => {
                            resp.trailers = trailers;
                            resp.complete = true;
                        }
                    }
                    break;
                }
            }
        },
        Framing::ContentLength(n) => {
            let mut buf = vec![0u8; 64 * 1024];
            while (resp.body.len() as u64) < n {
                if limit_hit(&resp) {
                    stopped_early = true;
                    break;
                }
                let want = ((n - resp.body.len() as u64) as usize).min(buf.len());
                match timeout_at(deadline, reader.read(&mut buf[..want])).await {
                    Err(_) => {
                        resp.error = Some(format!(
                            "timed out after {timeout:?} reading the body ({} of {n} bytes)",
                            resp.body.len()
                        ));
                        break;
                    }
                    Ok(Err(e)) => {
                        resp.error = Some(format!(
                            "body broken after {} of {n} bytes: {e}",
                            resp.body.len()
                        ));
                        break;
                    }
                    Ok(Ok(0)) => {
                        resp.error = Some(format!(
                            "connection closed after {} of {n} body bytes",
                            resp.body.len()
                        ));
                        break;
                    }
                    Ok(Ok(got)) => resp.body.extend_from_slice(&buf[..got]),
                }
            }
            if resp.body.len() as u64 == n {
                resp.complete = true;
            }
        }
        Framing::CloseDelimited => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                if limit_hit(&resp) {
                    stopped_early = true;
                    break;
                }
                match timeout_at(deadline, reader.read(&mut buf)).await {
                    Err(_) => {
                        resp.error = Some(format!(
                            "timed out after {timeout:?} reading a close-delimited body ({} bytes so far)",
                            resp.body.len()
                        ));
                        break;
                    }
                    Ok(Err(e)) => {
                        resp.error = Some(format!(
                            "close-delimited body broken after {} bytes: {e}",
                            resp.body.len()
                        ));
                        break;
                    }
                    Ok(Ok(0)) => {
                        resp.complete = true;
                        break;
                    }
                    Ok(Ok(got)) => resp.body.extend_from_slice(&buf[..got]),
                }
            }
        }
    }
    resp.elapsed = started.elapsed();
    let close = wire::has_token(&resp.headers, "connection", "close")
        || (resp.version == "HTTP/1.0"
            && !wire::has_token(&resp.headers, "connection", "keep-alive"));
    let reusable = resp.complete
        && !stopped_early
        && resp.error.is_none()
        && !close
        && resp.framing != Framing::CloseDelimited;
    Ok((resp, reusable))
}

fn strict(result: Result<Response, String>, what: &str) -> Response {
    match result {
        Err(e) => panic!("{what}: {e}"),
        Ok(resp) if !resp.complete || resp.error.is_some() => {
            panic!("{what}: incomplete or broken response: {}", resp.describe())
        }
        Ok(resp) => resp,
    }
}

/// A client connection that can carry several requests (keep-alive).
pub struct Connection {
    addr: SocketAddr,
    local: SocketAddr,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    timeout: Duration,
    reusable: bool,
    sent: usize,
}

impl Connection {
    /// Connects with [`DEFAULT_TIMEOUT`]; panics with the address on failure.
    pub async fn open(addr: SocketAddr) -> Connection {
        Self::try_open(addr, DEFAULT_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Connects; `timeout` bounds the connect and, later, each exchange.
    pub async fn try_open(addr: SocketAddr, timeout: Duration) -> Result<Connection, String> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(format!("connecting to {addr} timed out after {timeout:?}")),
            Ok(Err(e)) => return Err(format!("connecting to {addr} failed: {e}")),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let local = stream
            .local_addr()
            .map_err(|e| format!("local_addr of the connection to {addr}: {e}"))?;
        let (read, write) = stream.into_split();
        Ok(Connection {
            addr,
            local,
            reader: BufReader::new(read),
            writer: write,
            timeout,
            reusable: true,
            sent: 0,
        })
    }

    /// Changes the limit for the following exchanges.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The client-side address (distinguishes connections at the server).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Whether another request may be sent (last response was complete,
    /// length-delimited, and did not say `connection: close`).
    pub fn is_reusable(&self) -> bool {
        self.reusable
    }

    /// Number of requests written on this connection.
    pub fn requests_sent(&self) -> usize {
        self.sent
    }

    /// Strict: panics unless a complete response arrives in time.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        let what = format!(
            "{method} {path} on connection #{} to {}",
            self.sent + 1,
            self.addr
        );
        strict(self.try_send(method, path, headers, body).await, &what)
    }

    /// `Err` only if no response head was read; see the module docs.
    pub async fn try_send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response, String> {
        let request = build_request(self.addr, method, path, headers, body);
        self.exchange(&request, method, None).await
    }

    /// Writes `raw` bytes verbatim and reads one response (strict).
    pub async fn send_raw(&mut self, raw: &[u8]) -> Response {
        let what = format!(
            "raw request on connection #{} to {}",
            self.sent + 1,
            self.addr
        );
        strict(self.try_send_raw(raw).await, &what)
    }

    /// Writes `raw` bytes verbatim and reads one response (not a HEAD response).
    pub async fn try_send_raw(&mut self, raw: &[u8]) -> Result<Response, String> {
        self.exchange(raw, "GET", None).await
    }

    /// Sends a request, reads the head and at least `body_bytes` of the decoded
    /// body (or the whole body if shorter), then stops reading. The connection
    /// is consumed and closed on return.
    pub async fn send_and_stop_reading(
        mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        body_bytes: usize,
    ) -> Response {
        let request = build_request(self.addr, method, path, headers, body);
        let what = format!("{method} {path} to {}", self.addr);
        match self.exchange(&request, method, Some(body_bytes)).await {
            Ok(resp) => resp,
            Err(e) => panic!("{what}: {e}"),
        }
    }

    /// Waits up to `wait` for the server to close this idle connection. True if
    /// it closed (EOF or reset), false if it stayed open (or sent bytes).
    pub async fn peer_closed(&mut self, wait: Duration) -> bool {
        match tokio::time::timeout(wait, self.reader.fill_buf()).await {
            Err(_) => false,
            Ok(Ok(buf)) => buf.is_empty(),
            Ok(Err(_)) => true,
        }
    }

    async fn exchange(
        &mut self,
        request: &[u8],
        method: &str,
        body_limit: Option<usize>,
    ) -> Result<Response, String> {
        if !self.reusable {
            return Err(format!(
                "connection to {} cannot carry request #{}: the previous response ended it",
                self.addr,
                self.sent + 1
            ));
        }
        self.reusable = false;
        self.sent += 1;
        let timeout = self.timeout;
        let started = Instant::now();
        let deadline = started + timeout;
        let writer = &mut self.writer;
        let write = async move {
            writer.write_all(request).await?;
            writer.flush().await
        };
        let read = read_response(
            &mut self.reader,
            method,
            started,
            deadline,
            timeout,
            body_limit,
        );
        tokio::pin!(write, read);
        let mut written: Option<io::Result<()>> = None;
        let result = loop {
            tokio::select! {
                w = &mut write, if written.is_none() => written = Some(w),
                r = &mut read => break r,
            }
        };
        match (result, written) {
            (Ok((resp, reusable)), Some(Ok(()))) => {
                self.reusable = reusable;
                Ok(resp)
            }
            // Answered before the request was fully written: usable, but the
            // connection is in an unknown state.
            (Ok((resp, _)), _) => Ok(resp),
            (Err(e), Some(Err(w))) => Err(format!("{e} (writing the request failed: {w})")),
            (Err(e), None) => Err(format!("{e} (the request was not completely written)")),
            (Err(e), Some(Ok(()))) => Err(e),
        }
    }
}

/// Strict one-shot request on a new connection with [`DEFAULT_TIMEOUT`].
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let what = format!("{method} {path} to {addr}");
    strict(try_request(addr, method, path, headers, body).await, &what)
}

/// One-shot request; see the module docs for what is `Err`.
pub async fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, String> {
    try_request_with_timeout(addr, method, path, headers, body, DEFAULT_TIMEOUT).await
}

/// [`try_request`] with another overall limit.
pub async fn try_request_with_timeout(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<Response, String> {
    let started = Instant::now();
    let mut conn = Connection::try_open(addr, timeout).await?;
    conn.set_timeout(timeout.saturating_sub(started.elapsed()));
    conn.try_send(method, path, headers, body).await
}

/// Strict `GET path`.
pub async fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, &[], b"").await
}

/// Strict `POST path` with a JSON body and `content-type: application/json`.
pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> Response {
    let mut all: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    request(addr, "POST", path, &all, body.to_string().as_bytes()).await
}

/// Client-disconnect helper: sends the request, reads the head and at least
/// `body_bytes` of the decoded body, then drops the connection. Panics if no
/// head arrives in time.
pub async fn request_then_disconnect(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    body_bytes: usize,
) -> Response {
    Connection::open(addr)
        .await
        .send_and_stop_reading(method, path, headers, body, body_bytes)
        .await
}

/// Client-disconnect helper for the phase before any response: writes the
/// request, waits `wait`, then drops the connection without reading.
pub async fn send_then_disconnect(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    wait: Duration,
) {
    let mut conn = Connection::open(addr).await;
    let request = build_request(addr, method, path, headers, body);
    match tokio::time::timeout(DEFAULT_TIMEOUT, conn.writer.write_all(&request)).await {
        Err(_) => panic!("{method} {path} to {addr}: writing the request timed out"),
        Ok(Err(e)) => panic!("{method} {path} to {addr}: writing the request failed: {e}"),
        Ok(Ok(())) => {}
    }
    tokio::time::sleep(wait).await;
    drop(conn);
}

/// POSTs `body` to `url` with curl over HTTP/2 without TLS (h2c, prior knowledge), asking
/// for trailers; returns what curl prints with `-D -`: the response header, the body,
/// then the trailers. Panics, with curl's stderr, unless curl succeeds within 10 s.
pub async fn curl_h2c(url: &str, authorization: &str, body: &str) -> String {
    let auth = format!("authorization: {authorization}");
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "-D",
            "-",
            "-H",
            "te: trailers",
            "-H",
            &auth,
            "-H",
            "content-type: application/json",
            "-d",
            body,
            url,
            "--max-time",
            "10",
        ])
        .output()
        .await
        .expect("curl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
