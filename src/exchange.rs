//! The provider exchange, done by Tollgate itself rather than by Pingora's proxy loop.
//!
//! Why: Tollgate must see the whole JSON body before contacting the provider (routing by
//! `model`, stripping `_tollgate`, budget checks), and must send cost headers on
//! non-streaming responses, which are only known after the body. pingora-proxy 0.9.1 can
//! forward a body read in `request_filter` only through its 64 KiB retry buffer, and it
//! sends response headers before the body is read. So `request_filter` reads the body,
//! then calls the provider through pingora-core's pooled `Connector` (HTTP/1.1
//! keep-alive, HTTP/2 over TLS via ALPN) and answers the client itself, returning
//! `Ok(true)`:
//!
//! ```text
//! client ──► request_filter: route ─ auth ─ read body ─ attribute ─ price check ─ rewrite
//!                 │
//!                 ├─ sandbox? ──► simulated provider response (no network)
//!                 └─ Connector::get_http_session ──► provider
//!                          │ response header
//!                 ├─ JSON:  read whole body ─ usage ─ cost ─► header + cost headers + body
//!                 └─ SSE:   header ─► each chunk: usage tap ─► client (no buffering)
//!                                     end: `: tollgate cost=…` comment, trailers (h2)
//!         logging: the record (usage, cost, attribution) ─► metrics, access log
//! ```
//!
//! This module owns only the byte transport: a response source that yields a header and
//! then body chunks, whether from a provider or from the sandbox.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error as PingoraError, ErrorType};

use crate::errors::GatewayError;
use crate::providers::Provider;

/// Where a response's bytes come from.
pub enum Source {
    Provider {
        session: Box<HttpSession>,
        peer: Box<HttpPeer>,
        idle: Duration,
    },
    Sandbox {
        header: Box<ResponseHeader>,
        chunks: VecDeque<Bytes>,
    },
}

/// A response header plus the source of its body. A provider's header stays in its
/// session (Pingora keeps the one it read), so it is not copied per request.
pub struct Upstream {
    pub source: Source,
}

/// What `Upstream::header` shows if a session had lost its header, which `send` rules
/// out (it hands on only a session whose header was read).
static NO_HEADER: std::sync::LazyLock<ResponseHeader> = std::sync::LazyLock::new(|| {
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = http::StatusCode::BAD_GATEWAY;
    ResponseHeader::from(parts)
});

impl Upstream {
    /// A response made in process (the sandbox).
    pub fn own(header: ResponseHeader, chunks: VecDeque<Bytes>) -> Self {
        Upstream {
            source: Source::Sandbox {
                header: Box::new(header),
                chunks,
            },
        }
    }

    pub fn header(&self) -> &ResponseHeader {
        match &self.source {
            Source::Provider { session, .. } => {
                debug_assert!(session.response_header().is_some(), "send checked it");
                session.response_header().unwrap_or(&NO_HEADER)
            }
            Source::Sandbox { header, .. } => header,
        }
    }
}

fn classify(provider: &str, e: &PingoraError) -> GatewayError {
    let msg = format!("{provider}: {e}");
    match e.etype() {
        ErrorType::ConnectTimedout
        | ErrorType::ReadTimedout
        | ErrorType::WriteTimedout
        | ErrorType::TLSHandshakeTimedout => GatewayError::Timeout(msg),
        _ => GatewayError::Unreachable(msg),
    }
}

/// How soon after the request has gone out a pooled connection's failure still counts as
/// the connection having been stale: closed by the provider (an idle timeout, a restart)
/// before the request reached it, which shows within a round trip. A later failure may
/// come after the provider took the request and began to bill it, so it is not retried:
/// a second try would be billed again, and only one would be metered.
const STALE_WITHIN: Duration = Duration::from_secs(1);

/// A failed attempt, and whether another may follow.
struct Failed {
    error: GatewayError,
    retry: Retry,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    Never,
    /// It failed as a stale pooled connection does, soon after the request went out:
    /// safe if the connection was pooled.
    IfPooled,
    /// Safe on any connection, for the reason given (`tollgate_upstream_retries_total`):
    /// `refused`, the provider said it did not process the request (HTTP/2's
    /// REFUSED_STREAM, or a GOAWAY that leaves the stream out); `unsent`, the request's
    /// header or body could not be written, so the provider never had it whole.
    Always(&'static str),
}

impl Retry {
    fn reason(self) -> &'static str {
        match self {
            Retry::Always(reason) => reason,
            Retry::IfPooled => "stale_connection",
            Retry::Never => "none",
        }
    }
}

/// Sends the request and waits for the response header. One more attempt is made on a
/// new connection after a failure the provider cannot have billed (never a timeout): one
/// it said so of, one before the request was written whole, or one on a pooled connection
/// within `STALE_WITHIN` after the request went out: the pool can hand out a connection
/// the provider has just closed. The session takes the request
/// header, so `again` builds the retry's (no copy is made for a retry that rarely comes);
/// the first is built by the caller, before any provider work, so a header that cannot
/// be built never counts against the provider.
/// `retrying` hears of each retry, with its reason (`tollgate_upstream_retries_total`).
pub async fn send(
    connector: &Connector,
    provider: &Provider,
    first: RequestHeader,
    again: impl Fn() -> Result<RequestHeader, GatewayError>,
    body: Bytes,
    retrying: impl Fn(&'static str),
) -> Result<Upstream, GatewayError> {
    let peer = provider.peer().await?;
    let mut header = Some(first);
    loop {
        let (mut session, reused) = connector
            .get_http_session(&peer)
            .await
            .map_err(|e| classify(&provider.name, &e))?;
        let retry_left = header.is_some();
        let this = match header.take() {
            Some(h) => h,
            None => again()?,
        };
        match exchange(&mut session, provider, this, body.clone()).await {
            Ok(()) => {
                session.set_read_timeout(Some(provider.timeouts.idle()));
                return Ok(Upstream {
                    source: Source::Provider {
                        session: Box::new(session),
                        peer: Box::new(peer),
                        idle: provider.timeouts.idle(),
                    },
                });
            }
            Err(f)
                if retry_left
                    && (matches!(f.retry, Retry::Always(_))
                        || reused && f.retry == Retry::IfPooled) =>
            {
                log::debug!("retrying on a new connection after: {}", f.error);
                retrying(f.retry.reason());
                continue;
            }
            Err(f) => return Err(f.error),
        }
    }
}

async fn exchange(
    session: &mut HttpSession,
    provider: &Provider,
    header: RequestHeader,
    body: Bytes,
) -> Result<(), Failed> {
    // `unsent`: the failure came before the request was written whole. `stale`: soon
    // enough after it to be a closed pooled connection's.
    let failed = |unsent: bool, stale: bool| {
        move |e: Box<PingoraError>| {
            let error = classify(&provider.name, &e);
            let retry = if matches!(error, GatewayError::Timeout(_)) {
                Retry::Never
            } else if not_processed(&e) {
                Retry::Always("refused")
            } else if unsent {
                Retry::Always("unsent")
            } else if stale {
                Retry::IfPooled
            } else {
                Retry::Never
            };
            Failed { error, retry }
        }
    };
    session.set_write_timeout(Some(provider.timeouts.first_byte()));
    session.set_read_timeout(Some(provider.timeouts.first_byte()));
    session
        .write_request_header(Box::new(header))
        .await
        .map_err(failed(true, true))?;
    session
        .write_request_body(body, true)
        .await
        .map_err(failed(true, true))?;
    // Past here the provider may have it all (an HTTP/2 body is queued, not yet sent).
    session
        .finish_request_body()
        .await
        .map_err(failed(false, true))?;
    let sent = std::time::Instant::now();
    if let Err(e) = session.read_response_header().await {
        return Err(failed(false, sent.elapsed() < STALE_WITHIN)(e));
    }
    match session.response_header() {
        Some(_) => Ok(()),
        None => Err(Failed {
            error: GatewayError::BadUpstream(format!("{}: no response header", provider.name)),
            retry: Retry::Never,
        }),
    }
}

/// Whether an HTTP/2 provider said it did not process the request: it reset the stream
/// with REFUSED_STREAM, or went away (GOAWAY, NO_ERROR) before taking it (RFC 9113,
/// 8.7). Read from the `h2` error Pingora keeps as the cause, not from Pingora's own
/// retry mark, which also covers a provider asking for HTTP/1.1 (sent again over HTTP/2,
/// it would fail the same way). When the reset ends the body's writing instead, Pingora's
/// error no longer carries it, and the failure counts as `unsent`.
fn not_processed(e: &PingoraError) -> bool {
    let Some(h2) = e.root_cause().downcast_ref::<h2::Error>() else {
        return false;
    };
    let refused = h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM);
    let going_away = h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR);
    h2.is_remote() && (refused || going_away)
}

impl Source {
    /// The next body chunk; `None` at the end of the body.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, GatewayError> {
        match self {
            Source::Provider { session, .. } => match session.read_response_body().await {
                Ok(chunk) => Ok(chunk),
                Err(e) => Err(match e.etype() {
                    ErrorType::ReadTimedout => GatewayError::Timeout(format!("stalled body: {e}")),
                    _ => GatewayError::BadUpstream(e.to_string()),
                }),
            },
            Source::Sandbox { chunks, .. } => Ok(chunks.pop_front()),
        }
    }

    /// Returns a fully read connection to the pool; anything else is dropped (closed).
    pub async fn release(self, connector: &Connector) {
        if let Source::Provider {
            mut session,
            peer,
            idle,
        } = self
        {
            if session.response_done() {
                connector
                    .release_http_session(*session, &*peer, Some(idle))
                    .await;
            }
        }
    }
}
