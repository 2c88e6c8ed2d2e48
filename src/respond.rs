//! Writing responses to the client: gateway errors, the model list, and provider
//! responses with their usage metered and priced on the way through.

use bytes::Bytes;
use http::HeaderMap;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use crate::errors::GatewayError;
use crate::exchange::Upstream;
use crate::pricing::format_usd;
use crate::proxy::{client_header, Admitted, Failure, RequestCtx, State};
use crate::record::UsageRecord;
use crate::usage::{Forward, StreamMeter, Usage};

/// Writes a gateway error in the route's provider format.
pub async fn error(session: &mut Session, ctx: &mut RequestCtx, e: &GatewayError) {
    if let Some(r) = ctx.record.as_mut() {
        r.status = e.status();
        r.error.get_or_insert_with(|| e.to_string());
    }
    let body = Bytes::from(e.body(ctx.error_kind));
    let Ok(mut h) = ResponseHeader::build(e.status(), Some(4)) else {
        return;
    };
    let _ = h.insert_header("content-type", "application/json");
    let _ = h.insert_header("content-length", body.len().to_string());
    add_extra_headers(&mut h, ctx);
    // The error's own headers win over the request's (inserted after them).
    for (k, v) in e.headers() {
        let _ = h.insert_header(k, v);
    }
    if e.status() == 401 {
        let _ = h.insert_header("www-authenticate", "Bearer");
    }
    if session
        .write_response_header(Box::new(h), false)
        .await
        .is_ok()
    {
        let _ = session.write_response_body(Some(body), true).await;
    }
}

/// `GET /v1/models` in OpenAI's list format.
pub async fn model_list(
    session: &mut Session,
    ctx: &mut RequestCtx,
    state: &State,
) -> Result<(), Failure> {
    let data: Vec<_> = state
        .routes
        .models()
        .into_iter()
        .map(|(id, owner)| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": owner}))
        .collect();
    let body = Bytes::from(serde_json::json!({"object": "list", "data": data}).to_string());
    let mut h =
        ResponseHeader::build(200, Some(3)).map_err(|e| GatewayError::Internal(e.to_string()))?;
    let _ = h.insert_header("content-type", "application/json");
    let _ = h.insert_header("content-length", body.len().to_string());
    add_extra_headers(&mut h, ctx);
    write_all(session, ctx, h, body).await
}

async fn write_all(
    session: &mut Session,
    ctx: &mut RequestCtx,
    h: ResponseHeader,
    body: Bytes,
) -> Result<(), Failure> {
    let client_gone =
        |e: pingora::BError| Failure::Abort(GatewayError::Internal(format!("client gone: {e}")));
    session
        .write_response_header(Box::new(h), false)
        .await
        .map_err(client_gone)?;
    ctx.ttfb.get_or_insert(ctx.started.elapsed());
    session
        .write_response_body(Some(body), true)
        .await
        .map_err(client_gone)
}

fn is_event_stream(h: &ResponseHeader) -> bool {
    h.headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
}

/// Sends the provider's response to the client, metering its usage.
pub async fn forward(
    session: &mut Session,
    ctx: &mut RequestCtx,
    state: &State,
    a: &Admitted,
    up: Upstream,
) -> Result<(), Failure> {
    let status = up.header().status.as_u16();
    if let Some(r) = ctx.record.as_mut() {
        r.status = status;
    }
    if (200..300).contains(&status) && is_event_stream(up.header()) {
        stream(session, ctx, state, a, up).await
    } else {
        whole(session, ctx, state, a, up).await
    }
}

/// A non-streaming response: read it whole, price it, send it with cost headers.
async fn whole(
    session: &mut Session,
    ctx: &mut RequestCtx,
    state: &State,
    a: &Admitted,
    mut up: Upstream,
) -> Result<(), Failure> {
    let wait = std::time::Instant::now();
    let body = read_whole(&mut up, state.config.server.max_response_bytes).await?;
    ctx.io_wait += wait.elapsed();
    let ok = up.header().status.is_success();
    let (usage, served) = crate::usage::from_json_body_with_model(a.endpoint, &body);
    let metered = if ok && a.endpoint.is_priced() {
        match usage {
            Some(u) => Some((u, false)),
            None => Some((estimate(a, None, 0), true)),
        }
    } else {
        None
    };
    // Content length, request id, admission's headers and up to five cost headers.
    let adding = 2 + ctx.extra_headers.len() + if metered.is_some() { 5 } else { 0 };
    let mut h = client_header(up.header(), adding);
    let _ = h.insert_header("content-length", body.len().to_string());
    add_extra_headers(&mut h, ctx);
    if let Some((usage, estimated)) = metered {
        let cost = price_record(ctx, a, usage, estimated, served);
        for (k, v) in cost_headers(ctx, &usage, cost, estimated) {
            let _ = h.insert_header(k, v);
        }
    }
    crate::proxy::persist(state, ctx);
    let r = write_all(session, ctx, h, body).await;
    // The provider's connection goes back to its pool after the client has the response,
    // as in Pingora's own proxy: releasing tests the socket (a syscall) and spawns the
    // pool's idle watcher, work the client need not wait for.
    up.source.release(&state.connector).await;
    if r.is_err() {
        mark_client_gone(ctx);
    }
    r
}

/// A whole response body. One chunk (the usual case) is kept as it came, not copied.
async fn read_whole(up: &mut Upstream, limit: usize) -> Result<Bytes, GatewayError> {
    let mut single: Option<Bytes> = None;
    let mut joined: Vec<u8> = Vec::new();
    while let Some(chunk) = up.source.next_chunk().await? {
        let so_far = single.as_ref().map_or(joined.len(), Bytes::len);
        if so_far + chunk.len() > limit {
            return Err(GatewayError::BadUpstream(format!(
                "response larger than {limit} bytes"
            )));
        }
        match single.take() {
            None if joined.is_empty() => single = Some(chunk),
            Some(first) => {
                joined.reserve(first.len() + chunk.len());
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&chunk);
            }
            None => joined.extend_from_slice(&chunk),
        }
    }
    Ok(single.unwrap_or_else(|| Bytes::from(joined)))
}

/// A streamed response: each chunk goes to the client as it arrives (chunks that arrived
/// together, together: see [`Batch`]), through the usage tap. The cost follows as an SSE
/// comment, and as trailers where the client takes them.
async fn stream(
    session: &mut Session,
    ctx: &mut RequestCtx,
    state: &State,
    a: &Admitted,
    mut up: Upstream,
) -> Result<(), Failure> {
    // Chunking or trailer announcement, request id, admission's headers.
    let mut h = client_header(up.header(), 2 + ctx.extra_headers.len());
    if !session.is_http2() {
        let _ = h.insert_header("transfer-encoding", "chunked");
    }
    add_extra_headers(&mut h, ctx);
    let trailers = a.trailers && session.is_http2();
    if trailers {
        let _ = h.insert_header(
            "trailer",
            "x-tollgate-cost, x-tollgate-tokens-in, x-tollgate-tokens-out",
        );
    }
    if let Err(e) = session.write_response_header(Box::new(h), false).await {
        mark_client_gone(ctx);
        return Err(Failure::Abort(GatewayError::Internal(format!(
            "client gone: {e}"
        ))));
    }
    ctx.ttfb.get_or_insert(ctx.started.elapsed());
    let mut meter = StreamMeter::new(a.endpoint, a.strip_usage_chunk);
    let outcome = pump(session, ctx, &mut up, &mut meter).await;
    let tail = meter.finish();
    let (usage, estimated) = stream_usage(a, &meter);
    note_stream_end(ctx, &meter, outcome.is_ok());
    let cost = price_record(ctx, a, usage, estimated, None);
    match outcome {
        Ok(()) => {
            let mut end = tail.clone();
            end.extend_from_slice(cost_comment(ctx, &usage, cost, estimated).as_bytes());
            crate::proxy::persist(state, ctx);
            let sent = session
                .write_response_body(Some(Bytes::from(end)), !trailers)
                .await;
            if trailers && sent.is_ok() {
                let mut map = HeaderMap::new();
                for (k, v) in cost_headers(ctx, &usage, cost, estimated) {
                    if let Ok(v) = v.parse() {
                        map.insert(k, v);
                    }
                }
                let _ = session.write_response_trailers(map).await;
            }
            // After the client's last bytes, as for a whole response.
            up.source.release(&state.connector).await;
            sent.map_err(|e| {
                mark_client_gone(ctx);
                Failure::Abort(GatewayError::Internal(format!("client gone: {e}")))
            })
        }
        Err(Pump::ClientGone(e)) => {
            mark_client_gone(ctx);
            Err(Failure::Abort(GatewayError::Internal(format!(
                "client gone: {e}"
            ))))
        }
        Err(Pump::Upstream(e)) => {
            state
                .metrics
                .upstream_error(&a.route.provider.name, "stream_broken");
            if let Some(r) = ctx.record.as_mut() {
                r.error = Some(e.to_string());
            }
            // Tell the client what was metered, then break the stream so it sees the failure.
            let mut end = tail.clone();
            if meter.truncated() {
                // The comment must start on its own line, after the partial event.
                end.extend_from_slice(b"\n\n");
            }
            end.extend_from_slice(cost_comment(ctx, &usage, cost, estimated).as_bytes());
            let _ = session
                .write_response_body(Some(Bytes::from(end)), false)
                .await;
            Err(Failure::Abort(e))
        }
    }
}

enum Pump {
    ClientGone(pingora::BError),
    Upstream(GatewayError),
}

async fn pump(
    session: &mut Session,
    ctx: &mut RequestCtx,
    up: &mut Upstream,
    meter: &mut StreamMeter,
) -> Result<(), Pump> {
    loop {
        let wait = std::time::Instant::now();
        let (chunk, had_arrived) = next_chunk(up).await;
        ctx.io_wait += wait.elapsed();
        let Some(chunk) = chunk.map_err(Pump::Upstream)? else {
            return Ok(());
        };
        let mut batch = Batch::new(forwarded(meter, chunk));
        // A chunk that had to be waited for came on its own: looking for a next one would
        // only cost a read that is not ready yet, on every chunk of a paced stream.
        let next = if had_arrived {
            batch.add_ready(up, meter)
        } else {
            Ready::Waiting
        };
        let out = batch.into_bytes();
        if !out.is_empty() {
            let wait = std::time::Instant::now();
            session
                .write_response_body(Some(out), false)
                .await
                .map_err(Pump::ClientGone)?;
            ctx.io_wait += wait.elapsed();
        }
        match next {
            Ready::Waiting => {}
            Ready::End => return Ok(()),
            Ready::Failed(e) => return Err(Pump::Upstream(e)),
        }
    }
}

/// The next upstream chunk, and whether it had already arrived (ready when first asked).
async fn next_chunk(up: &mut Upstream) -> (Result<Option<Bytes>, GatewayError>, bool) {
    let mut read = std::pin::pin!(up.source.next_chunk());
    let mut waited = false;
    let chunk = std::future::poll_fn(|cx| {
        let poll = std::future::Future::poll(read.as_mut(), cx);
        waited |= poll.is_pending();
        poll
    })
    .await;
    (chunk, !waited)
}

/// What the meter lets through of one upstream chunk.
fn forwarded(meter: &mut StreamMeter, chunk: Bytes) -> Bytes {
    match meter.push(&chunk) {
        Forward::AsIs => chunk,
        Forward::Replace(bytes) => Bytes::copy_from_slice(bytes),
    }
}

/// Chunks the provider has already sent go to the client in one write, as Pingora's own
/// proxy loop does: one chunk frame and one syscall instead of one per chunk when a fast
/// provider (or a busy gateway) lets several queue up. Only chunks that have already
/// arrived are taken, so none waits for another. A batch takes no further chunk once this
/// many bytes have come in (what it holds can be less: the meter may hold bytes back, or
/// more: one read can bring a larger chunk).
const BATCH_BYTES: usize = 16 * 1024;

/// The bytes for one client write: one chunk as it came, or several joined.
struct Batch {
    first: Bytes,
    joined: Option<Vec<u8>>,
    /// Upstream bytes taken after the first chunk.
    taken: usize,
}

/// Why a batch stopped taking chunks.
enum Ready {
    /// The next chunk has not arrived yet (or the batch is full).
    Waiting,
    /// The upstream body ended.
    End,
    /// Reading the upstream failed; what came before it is still sent.
    Failed(GatewayError),
}

impl Batch {
    fn new(first: Bytes) -> Self {
        Batch {
            first,
            joined: None,
            taken: 0,
        }
    }

    /// Adds the chunks that are ready without waiting, metered in order.
    fn add_ready(&mut self, up: &mut Upstream, meter: &mut StreamMeter) -> Ready {
        use futures_util::FutureExt;
        while self.taken < BATCH_BYTES {
            // Pingora's body reads keep their state in the session, not the future, so a
            // read that is not ready can be dropped and started again later.
            match up.source.next_chunk().now_or_never() {
                None => return Ready::Waiting,
                Some(Ok(None)) => return Ready::End,
                Some(Err(e)) => return Ready::Failed(e),
                Some(Ok(Some(chunk))) => {
                    self.taken += chunk.len();
                    self.push(&forwarded(meter, chunk));
                }
            }
        }
        Ready::Waiting
    }

    fn push(&mut self, bytes: &[u8]) {
        let first = &self.first;
        self.joined
            .get_or_insert_with(|| {
                let mut joined = Vec::with_capacity(2 * (first.len() + bytes.len()));
                joined.extend_from_slice(first);
                joined
            })
            .extend_from_slice(bytes);
    }

    fn into_bytes(self) -> Bytes {
        self.joined.map_or(self.first, Bytes::from)
    }
}

/// The usage to bill for a stream, and whether any of it is an estimate.
fn stream_usage(a: &Admitted, meter: &StreamMeter) -> (Usage, bool) {
    match meter.usage() {
        Some(u) if meter.usage_complete() => (u, false),
        reported => (estimate(a, reported, meter.output_estimate()), true),
    }
}

/// Records how a stream that looked fine at the HTTP level really ended.
fn note_stream_end(ctx: &mut RequestCtx, meter: &StreamMeter, body_complete: bool) {
    let problem = if meter.saw_error() {
        Some("the provider sent an error event mid-stream")
    } else if body_complete && !meter.saw_terminal() {
        Some("the stream ended without its final event")
    } else {
        None
    };
    if let (Some(p), Some(r)) = (problem, ctx.record.as_mut()) {
        r.error.get_or_insert_with(|| p.to_string());
    }
}

/// Usage when the provider reported none (or only the input side): the reported part is
/// kept, the input is estimated from the request size, the output from what was sent.
///
/// An estimate never exceeds the output bound the provider was given: the provider cannot
/// have produced more, and the budget reservation was made for at most that.
fn estimate(a: &Admitted, reported: Option<Usage>, output_estimate: u64) -> Usage {
    let output_estimate = a
        .max_output_tokens
        .map_or(output_estimate, |m| output_estimate.min(m));
    match reported {
        Some(mut u) => {
            u.output_tokens = u.output_tokens.max(output_estimate);
            u
        }
        None => Usage {
            input_tokens: a.input_estimate,
            output_tokens: output_estimate,
            ..Usage::default()
        },
    }
}

/// Adds the request id and the headers admission left for the response. Those are moved
/// into it (a request gets one response header), so their values are not copied again.
fn add_extra_headers(h: &mut ResponseHeader, ctx: &mut RequestCtx) {
    let _ = h.insert_header("x-tollgate-request-id", ctx.request_id.as_str());
    for (k, v) in ctx.extra_headers.drain(..) {
        let _ = h.insert_header(k, v);
    }
}

/// Prices the usage and fills the record. Returns the cost in nano-USD.
fn price_record(
    ctx: &mut RequestCtx,
    a: &Admitted,
    usage: Usage,
    estimated: bool,
    served: Option<String>,
) -> u64 {
    let cost = crate::admission::cost_of(a, &usage);
    if let Some(r) = ctx.record.as_mut() {
        r.usage = usage;
        r.cost_nano_usd = cost;
        r.estimated = estimated;
        if served.is_some() {
            r.model_served = served;
        }
    }
    cost
}

fn mark_client_gone(ctx: &mut RequestCtx) {
    if let Some(r) = ctx.record.as_mut() {
        r.client_gone = true;
    }
}

fn cost_headers(
    ctx: &RequestCtx,
    usage: &Usage,
    cost: u64,
    estimated: bool,
) -> Vec<(&'static str, String)> {
    let mut v = vec![
        ("x-tollgate-cost", format_usd(cost)),
        ("x-tollgate-tokens-in", usage.total_input().to_string()),
        ("x-tollgate-tokens-out", usage.output_tokens.to_string()),
    ];
    if let Some(c) = ctx
        .record
        .as_ref()
        .and_then(|r| r.attribution.customer.clone())
    {
        v.push(("x-tollgate-customer", c));
    }
    if estimated {
        v.push(("x-tollgate-usage-estimated", "true".into()));
    }
    v
}

fn cost_comment(ctx: &RequestCtx, usage: &Usage, cost: u64, estimated: bool) -> String {
    format!(
        ": tollgate cost={} tokens_in={} tokens_out={} request_id={}{}\n\n",
        format_usd(cost),
        usage.total_input(),
        usage.output_tokens,
        ctx.request_id,
        if estimated { " estimated=true" } else { "" }
    )
}

/// The one place a finished record leaves the request: metrics and the access log.
pub fn finish_record(state: &State, record: &UsageRecord) {
    let model = record.model_requested.as_str();
    let known =
        state.routes.model_config(model).is_some() || state.prices().lookup(model).is_some();
    state
        .metrics
        .observe(record, state.metrics.model_label(model, known));
    if state.config.server.access_log {
        println!("{}", record.log_line());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn upstream(chunks: &[&'static [u8]]) -> Upstream {
        let header = ResponseHeader::build(200, None).expect("header");
        Upstream::own(
            header,
            chunks
                .iter()
                .map(|c| Bytes::from_static(c))
                .collect::<VecDeque<_>>(),
        )
    }

    async fn read(chunks: &[&'static [u8]], limit: usize) -> Result<Bytes, GatewayError> {
        read_whole(&mut upstream(chunks), limit).await
    }

    #[tokio::test]
    async fn a_whole_body_is_one_chunk_as_it_came_or_the_chunks_joined() {
        let only: &'static [u8] = b"{\"a\":1}";
        let body = read(&[only], 100).await.expect("read");
        assert_eq!(body.as_ptr(), only.as_ptr(), "one chunk is not copied");
        assert_eq!(
            &read(&[b"ab", b"cd", b"e"], 100).await.expect("read")[..],
            b"abcde"
        );
        assert_eq!(&read(&[b"", b"ab"], 100).await.expect("read")[..], b"ab");
        assert_eq!(&read(&[], 100).await.expect("read")[..], b"");
    }

    #[tokio::test]
    async fn a_whole_body_over_the_limit_is_refused_whether_one_chunk_or_many() {
        assert!(read(&[b"abcd"], 4).await.is_ok());
        assert!(read(&[b"abcde"], 4).await.is_err());
        assert!(read(&[b"ab", b"cd"], 4).await.is_ok());
        assert!(read(&[b"ab", b"cde"], 4).await.is_err());
        assert!(read(&[b"ab", b"c", b"d", b"e"], 4).await.is_err());
    }
}
