//! Configured providers: where they live, how they authenticate, how to reach them.
//! Everything that differs between OpenAI-kind and Anthropic-kind upstreams is here.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pingora::http::RequestHeader;
use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;

use crate::api::ProviderKind;
use crate::config::{ProviderConfig, TimeoutConfig};
use crate::errors::GatewayError;
use crate::routing::BaseUrl;

/// How long a DNS answer is reused before asking again.
const DNS_TTL: Duration = Duration::from_secs(30);
/// The Anthropic API version sent when the client names none.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

#[derive(Debug)]
pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    pub base: BaseUrl,
    pub credential: Option<String>,
    pub timeouts: TimeoutConfig,
    pub extra_headers: Vec<(String, String)>,
    pub breaker: crate::breaker::Breaker,
    resolved: Mutex<Option<(Instant, SocketAddr)>>,
}

impl Provider {
    pub fn new(
        name: &str,
        cfg: &ProviderConfig,
        credential: Option<String>,
    ) -> Result<Self, String> {
        Ok(Provider {
            name: name.to_string(),
            kind: cfg.kind.into(),
            base: BaseUrl::parse(&cfg.base_url)?,
            credential,
            timeouts: cfg.timeouts,
            extra_headers: cfg
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            breaker: crate::breaker::Breaker::new(cfg.breaker),
            resolved: Mutex::new(None),
        })
    }

    /// The upstream path for an endpoint path, under the base URL's prefix.
    pub fn upstream_path(&self, endpoint_path: &str, query: Option<&str>) -> String {
        let mut p = format!("{}{}", self.base.path_prefix, endpoint_path);
        if let Some(q) = query {
            p.push('?');
            p.push_str(q);
        }
        p
    }

    /// Puts the provider credential in the provider's own header.
    pub fn apply_credential(
        &self,
        req: &mut RequestHeader,
        credential: &str,
    ) -> Result<(), GatewayError> {
        let bad =
            |_| GatewayError::BadRequest("the provider key is not a valid header value".into());
        match self.kind {
            ProviderKind::OpenAi => {
                req.insert_header("authorization", format!("Bearer {credential}"))
                    .map_err(bad)?;
            }
            ProviderKind::Anthropic => {
                req.insert_header("x-api-key", credential).map_err(bad)?;
                if req.headers.get("anthropic-version").is_none() {
                    req.insert_header("anthropic-version", ANTHROPIC_VERSION)
                        .map_err(bad)?;
                }
            }
        }
        Ok(())
    }

    /// A peer for the connector: resolved address, TLS settings and timeouts. Peers for
    /// the same provider hash alike, so Pingora's pool reuses their connections.
    pub async fn peer(&self) -> Result<HttpPeer, GatewayError> {
        let addr = self.resolve().await?;
        let mut peer = HttpPeer::new(addr, self.base.tls, self.base.host.clone());
        let o = &mut peer.options;
        o.connection_timeout = Some(self.timeouts.connect());
        o.total_connection_timeout = Some(self.timeouts.connect());
        o.idle_timeout = Some(Duration::from_secs(60));
        if self.base.tls {
            o.alpn = ALPN::H2H1;
        }
        Ok(peer)
    }

    async fn resolve(&self) -> Result<SocketAddr, GatewayError> {
        if let Ok(guard) = self.resolved.lock() {
            if let Some((at, addr)) = *guard {
                if at.elapsed() < DNS_TTL {
                    return Ok(addr);
                }
            }
        }
        let target = (self.base.host.as_str(), self.base.port);
        let addr = tokio::net::lookup_host(target)
            .await
            .map_err(|e| GatewayError::Unreachable(format!("{}: DNS: {e}", self.name)))?
            .next()
            .ok_or_else(|| GatewayError::Unreachable(format!("{}: no address", self.name)))?;
        if let Ok(mut guard) = self.resolved.lock() {
            *guard = Some((Instant::now(), addr));
        }
        Ok(addr)
    }
}
