//! Which provider serves a request: from the path's optional provider prefix and the
//! body's `model`.

use foldhash::HashMap;
use std::sync::Arc;

use crate::api::Endpoint;
use crate::config::{Config, ModelConfig};
use crate::errors::GatewayError;
use crate::providers::Provider;

/// A provider's base URL, split for the connector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// The URL's path (may be empty); for a provider, prepended to every route, without a
    /// trailing slash or `/v1`.
    pub path_prefix: String,
}

impl BaseUrl {
    /// A provider's base URL: `https://api.openai.com/v1` is a common way to write it, and
    /// routes carry `/v1` themselves, so a trailing `/v1` (and `/`) is dropped.
    pub fn provider(url: &str) -> Result<BaseUrl, String> {
        let mut base = BaseUrl::parse(url)?;
        let kept = base.path_prefix.trim_end_matches('/');
        let kept = kept.strip_suffix("/v1").unwrap_or(kept).len();
        base.path_prefix.truncate(kept);
        Ok(base)
    }

    /// A URL as written (a webhook's): its path is kept whole.
    pub fn parse(url: &str) -> Result<BaseUrl, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("{url:?}: must start with http:// or https://"));
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let default_port = if tls { 443 } else { 80 };
        // `[v6]` or `[v6]:port`, else `host` or `host:port`.
        let bad_host = || format!("{url:?}: an IPv6 host goes in brackets, `[::1]:8080`");
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => match v6.split_once(']') {
                Some((h, _)) if h.parse::<std::net::Ipv6Addr>().is_err() => {
                    return Err(format!("{url:?}: {h:?} in brackets is not an IPv6 address"))
                }
                Some((h, "")) => (h, None),
                Some((h, p)) => (h, Some(p.strip_prefix(':').ok_or_else(bad_host)?)),
                None => return Err(bad_host()),
            },
            None => match authority.split_once(':') {
                Some((_, p)) if p.contains(':') => return Err(bad_host()),
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            },
        };
        let port = match port {
            Some(p) => p.parse().map_err(|_| format!("{url:?}: bad port {p:?}"))?,
            None => default_port,
        };
        if host.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        let prefix = path.to_string();
        Ok(BaseUrl {
            tls,
            host: host.to_string(),
            port,
            path_prefix: prefix,
        })
    }

    /// The `Host` header's value: the port unless it is the scheme's, an IPv6 literal in
    /// brackets (RFC 9110 §7.2, RFC 3986 §3.2.2).
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match (self.tls, self.port) {
            (true, 443) | (false, 80) => host,
            (_, port) => format!("{host}:{port}"),
        }
    }
}

/// What the request path asks for.
#[derive(Debug, Clone)]
pub enum PathTarget {
    /// A model route, optionally pinned to one provider by a `/<provider>` prefix.
    Endpoint {
        endpoint: Endpoint,
        pinned: Option<Arc<Provider>>,
    },
    /// `GET /v1/models`.
    ListModels,
}

/// A model's route, resolved.
#[derive(Debug, Clone)]
pub struct ModelRoute {
    pub provider: Arc<Provider>,
    /// The model name sent upstream.
    pub upstream_model: String,
    pub max_output_tokens: Option<u64>,
}

pub struct RouteTable {
    providers: HashMap<String, Arc<Provider>>,
    models: HashMap<String, (Arc<Provider>, ModelConfig)>,
}

impl RouteTable {
    pub fn from_config(config: &Config) -> Result<RouteTable, String> {
        let mut providers = HashMap::default();
        for (name, p) in &config.providers {
            let provider = Provider::new(name, p, config.provider_credential(name))?;
            providers.insert(name.clone(), Arc::new(provider));
        }
        let models = config
            .models
            .iter()
            .filter_map(|(name, m)| {
                let p = providers.get(&m.provider)?.clone();
                Some((name.clone(), (p, m.clone())))
            })
            .collect();
        Ok(RouteTable { providers, models })
    }

    /// Configured model names with their provider, sorted.
    pub fn models(&self) -> Vec<(&str, &str)> {
        let mut v: Vec<_> = self
            .models
            .iter()
            .map(|(m, (p, _))| (m.as_str(), p.name.as_str()))
            .collect();
        v.sort();
        v
    }

    pub fn model_config(&self, model: &str) -> Option<&ModelConfig> {
        self.models.get(model).map(|(_, m)| m)
    }

    /// Splits `/openai/v1/chat/completions` into the pinned provider and the endpoint.
    pub fn target(&self, method: &str, path: &str) -> Result<PathTarget, GatewayError> {
        let (pinned, rest) = match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
            Some((first, rest)) if first != "v1" => {
                let provider = self.providers.get(first).ok_or_else(|| {
                    GatewayError::NotFound(format!(
                        "no route for {path}: unknown provider {first:?}"
                    ))
                })?;
                (Some(provider.clone()), format!("/{rest}"))
            }
            _ => (None, path.to_string()),
        };
        if rest == "/v1/models" {
            return match method {
                "GET" => Ok(PathTarget::ListModels),
                _ => Err(GatewayError::MethodNotAllowed(
                    "use GET for /v1/models".into(),
                )),
            };
        }
        let endpoint = Endpoint::from_path(&rest)
            .ok_or_else(|| GatewayError::NotFound(format!("no route for {path}")))?;
        if method != "POST" {
            return Err(GatewayError::MethodNotAllowed(format!(
                "use POST for {path}"
            )));
        }
        if let Some(p) = &pinned {
            if p.kind != endpoint.kind() {
                return Err(GatewayError::NotFound(format!(
                    "provider {:?} does not speak {}",
                    p.name,
                    endpoint.path()
                )));
            }
        }
        Ok(PathTarget::Endpoint { endpoint, pinned })
    }

    /// The route for a model on an endpoint. A pinned provider serves any model name;
    /// otherwise the model must be configured, and its provider must speak the endpoint.
    pub fn route(
        &self,
        endpoint: Endpoint,
        pinned: Option<&Arc<Provider>>,
        model: &str,
    ) -> Result<ModelRoute, GatewayError> {
        let configured = self.models.get(model);
        let provider = match (pinned, configured) {
            (Some(p), _) => p.clone(),
            (None, Some((p, _))) => p.clone(),
            (None, None) => return Err(GatewayError::UnknownModel(model.to_string())),
        };
        if provider.kind != endpoint.kind() {
            return Err(GatewayError::BadRequest(format!(
                "the model `{model}` is served by {:?}, which does not speak {}",
                provider.name,
                endpoint.path()
            )));
        }
        let m = configured
            .filter(|(p, _)| Arc::ptr_eq(p, &provider))
            .map(|(_, m)| m);
        Ok(ModelRoute {
            upstream_model: m
                .and_then(|m| m.upstream_model.clone())
                .unwrap_or_else(|| model.to_string()),
            max_output_tokens: m.and_then(|m| m.max_output_tokens),
            provider,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let b = BaseUrl::provider("https://api.openai.com/v1").expect("ok");
        assert_eq!(
            (b.tls, b.host.as_str(), b.port, b.path_prefix.as_str()),
            (true, "api.openai.com", 443, "")
        );
        let b = BaseUrl::provider("http://127.0.0.1:8000/api/").expect("ok");
        assert_eq!(
            (b.tls, b.host.as_str(), b.port, b.path_prefix.as_str()),
            (false, "127.0.0.1", 8000, "/api")
        );
        let b = BaseUrl::parse("http://[::1]:9").expect("ok");
        assert_eq!((b.host.as_str(), b.port), ("::1", 9));
        let b = BaseUrl::provider("https://[2001:db8::1]/v1").expect("ok");
        assert_eq!((b.host.as_str(), b.port), ("2001:db8::1", 443));
        assert!(BaseUrl::parse("http://[::1").is_err());
        assert!(BaseUrl::parse("http://[::1]8080").is_err());
        assert!(BaseUrl::parse("http://2001:db8::1/v1").is_err());
        assert!(BaseUrl::parse("http://[example.com]/").is_err());
        // A webhook keeps its whole path, `/v1` included.
        let b = BaseUrl::parse("https://hooks.example.com/tollgate/v1").expect("ok");
        assert_eq!(b.path_prefix, "/tollgate/v1");
        let b = BaseUrl::parse("https://hooks.example.com/tollgate/").expect("ok");
        assert_eq!(b.path_prefix, "/tollgate/");
        assert!(BaseUrl::parse("ftp://x").is_err());
        assert!(BaseUrl::parse("http://h:notaport").is_err());
    }

    fn table() -> RouteTable {
        let cfg: Config = crate::config::parse_yaml(
            "providers:\n  openai: {kind: openai, base_url: 'http://127.0.0.1:1'}\n  anthropic: {kind: anthropic, base_url: 'http://127.0.0.1:2'}\nmodels:\n  gpt-4o: {provider: openai}\n  fast: {provider: openai, upstream_model: gpt-4o-mini}\n  claude-haiku-4-5: {provider: anthropic}\n",
            "t",
        )
        .expect("yaml");
        RouteTable::from_config(&cfg).expect("table")
    }

    #[test]
    fn routes_by_model_and_prefix() {
        let t = table();
        let PathTarget::Endpoint { endpoint, pinned } =
            t.target("POST", "/v1/chat/completions").expect("ok")
        else {
            panic!("endpoint expected")
        };
        assert!(pinned.is_none());
        let r = t.route(endpoint, None, "fast").expect("routes");
        assert_eq!(
            (r.provider.name.as_str(), r.upstream_model.as_str()),
            ("openai", "gpt-4o-mini")
        );
        assert!(matches!(
            t.route(endpoint, None, "nope"),
            Err(GatewayError::UnknownModel(_))
        ));
        assert!(matches!(
            t.route(endpoint, None, "claude-haiku-4-5"),
            Err(GatewayError::BadRequest(_))
        ));

        let PathTarget::Endpoint { endpoint, pinned } =
            t.target("POST", "/openai/v1/chat/completions").expect("ok")
        else {
            panic!("endpoint expected")
        };
        let r = t
            .route(endpoint, pinned.as_ref(), "anything")
            .expect("pinned serves any model");
        assert_eq!(r.upstream_model, "anything");
        assert!(t.target("POST", "/anthropic/v1/chat/completions").is_err());
        assert!(t.target("POST", "/nope/v1/messages").is_err());
        assert!(t.target("GET", "/v1/messages").is_err());
        assert!(matches!(
            t.target("GET", "/anthropic/v1/models"),
            Ok(PathTarget::ListModels)
        ));
    }
}
