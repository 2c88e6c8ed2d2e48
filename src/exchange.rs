//! The provider exchange, done by Tollgate itself rather than by Pingora's proxy loop.
//!
//! Why: Tollgate must see the whole JSON body before contacting the provider (routing by
//! `model`, stripping `_tollgate`, budget checks), and must send cost headers on
//! non-streaming responses, which are only known after the body. pingora-proxy 0.9.1 can
//! forward a body read in `request_filter` only through its 64 KiB retry buffer, and it
//! sends response headers before the body is read. So `request_filter` reads the body,
//! then calls the provider through pingora-core's pooled HTTP/1 and HTTP/2 connectors
//! ([`Connections`]: HTTP/1.1 keep-alive, HTTP/2 over TLS via ALPN) and answers the
//! client itself, returning `Ok(true)`:
//!
//! ```text
//! client ──► request_filter: route ─ auth ─ read body ─ attribute ─ price check ─ rewrite
//!                 │
//!                 ├─ sandbox? ──► simulated provider response (no network)
//!                 └─ Connections::get (pooled, or new) ──► provider
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
use pingora::connectors::http::{v1, v2};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora::{Error as PingoraError, ErrorType};

use crate::errors::GatewayError;
use crate::providers::Provider;

/// Provider connections: Pingora's HTTP/1 and HTTP/2 connectors and their pools, chosen
/// between as Pingora's own `connectors::http::Connector` does (HTTP/2 over TLS where ALPN
/// offers it, else HTTP/1.1; a pooled connection before a new one).
///
/// Why not that `Connector`: its `get_http_session` is one future that holds the states
/// of a new connection's connect and TLS handshake, 8.8 KB, and that size became part of
/// every request's future (copied whole into its box per request), though a request
/// usually gets a pooled connection. Here the pooled case is a small future, and a new
/// connection's is boxed and made only when one is needed. (Pingora's custom-protocol
/// sessions and `prefer_h1` are not used by Tollgate, so they are left out.)
pub struct Connections {
    h1: v1::Connector,
    h2: v2::Connector,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            h1: v1::Connector::new(None),
            h2: v2::Connector::new(None),
        }
    }
}

impl Connections {
    /// A session to `peer`, and whether its connection came from the pool.
    pub async fn get(&self, peer: &HttpPeer) -> pingora::Result<(HttpSession, bool)> {
        if let Some(session) = self.pooled(peer).await? {
            return Ok((session, true));
        }
        Box::pin(self.connect(peer)).await
    }

    async fn pooled(&self, peer: &HttpPeer) -> pingora::Result<Option<HttpSession>> {
        if offers_h2(peer) {
            if let Some(h2) = self.h2.reused_http_session(peer).await? {
                return Ok(Some(HttpSession::H2(h2)));
            }
            if requires_h2(peer) {
                return Ok(None);
            }
        }
        Ok(self.h1.reused_http_session(peer).await.map(HttpSession::H1))
    }

    /// A new connection. One offered HTTP/2 is made by the HTTP/2 connector, which hands
    /// back an HTTP/1 session if the provider chose HTTP/1.1.
    async fn connect(&self, peer: &HttpPeer) -> pingora::Result<(HttpSession, bool)> {
        if offers_h2(peer) {
            Ok((self.h2.new_http_session::<_, ()>(peer).await?, false))
        } else {
            let (h1, reused) = self.h1.get_http_session(peer).await?;
            Ok((HttpSession::H1(h1), reused))
        }
    }

    /// Returns a session to its pool (HTTP/1: the connection, if it can be reused; HTTP/2:
    /// the stream's slot on its connection).
    pub async fn release(&self, session: HttpSession, peer: &HttpPeer, idle: Option<Duration>) {
        match session {
            HttpSession::H1(h1) => self.h1.release_http_session(h1, peer, idle).await,
            HttpSession::H2(h2) => self.h2.release_http_session(h2, peer, idle),
            HttpSession::Custom(()) => {}
        }
    }
}

fn offers_h2(peer: &HttpPeer) -> bool {
    peer.get_peer_options()
        .is_some_and(|o| o.alpn.get_max_http_version() == 2)
}

fn requires_h2(peer: &HttpPeer) -> bool {
    peer.get_peer_options()
        .is_some_and(|o| o.alpn.get_min_http_version() == 2)
}

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
    connector: &Connections,
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
            .get(&peer)
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
    pub async fn release(self, connector: &Connections) {
        if let Source::Provider {
            mut session,
            peer,
            idle,
        } = self
        {
            if session.response_done() {
                connector.release(*session, &peer, Some(idle)).await;
            }
        }
    }
}
