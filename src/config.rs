//! Typed configuration, loaded from YAML once at start and validated before any listener
//! opens. A bad file fails with the file, the key path and the reason.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::api::ProviderKind;
use crate::pricing::{ModelPrice, PriceTable};

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: {reason}")]
    Parse { file: String, reason: String },
    #[error("{file}: {key}: {reason}")]
    Invalid {
        file: String,
        key: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    #[serde(default)]
    pub models: BTreeMap<String, ModelConfig>,
    #[serde(default)]
    pub pricing: PricingConfig,
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    /// Budgets, tiers and rate limits (see `budgets`).
    #[serde(default)]
    pub limits: crate::budgets::LimitsConfig,
    /// Filled from `pricing.file` (and inline `pricing.models`) at load.
    #[serde(skip)]
    pub prices: PriceTable,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Proxy listener: where SDKs send their calls.
    pub listen: String,
    /// Admin listener: metrics, health, admin API. Keep it off public interfaces.
    pub admin_listen: String,
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// Let the proxy's worker threads steal each other's tasks (tokio's multi-threaded
    /// scheduler, Pingora's default). Off, each thread runs its own connections on a
    /// single-threaded runtime (Pingora's no-steal runtime): fewer cross-thread wake-ups,
    /// at the price of no rebalancing when one thread's connections are busier.
    pub work_stealing: bool,
    /// Largest request body accepted; larger ones get 413 and nothing is forwarded.
    pub max_body_bytes: usize,
    /// Largest non-streaming response body held to read its usage.
    pub max_response_bytes: usize,
    /// Accept HTTP/2 over plaintext (h2c) on the proxy listener as well as HTTP/1.1.
    pub h2c: bool,
    /// Where stores keep their files (relative to the config file).
    pub data_dir: PathBuf,
    /// Emit one JSON access-log line per request on stdout.
    pub access_log: bool,
    /// On SIGTERM, how long requests in flight (and their settlements) may take to finish
    /// before the process exits anyway (`crate::shutdown`). It exits as soon as they are
    /// done. The orchestrator's kill timeout should exceed it by 7 s (Pingora's runtimes
    /// live 2 s past it, then get 5 s to stop); Kubernetes' default 30 s fits 20.
    pub shutdown_drain_seconds: u64,
    /// How long one write to a client may wait for the client to read (0: no bound). A
    /// client that stops reading would otherwise hold its response (and, until the write
    /// ends, the provider connection it came on) for as long as its TCP connection lives.
    pub client_write_timeout_seconds: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9090".into(),
            threads: 2,
            work_stealing: true,
            max_body_bytes: 32 * 1024 * 1024,
            max_response_bytes: 64 * 1024 * 1024,
            h2c: true,
            data_dir: PathBuf::from("data"),
            access_log: true,
            shutdown_drain_seconds: 20,
            client_write_timeout_seconds: 60,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KindConfig {
    Openai,
    Anthropic,
}

impl From<KindConfig> for ProviderKind {
    fn from(k: KindConfig) -> Self {
        match k {
            KindConfig::Openai => ProviderKind::OpenAi,
            KindConfig::Anthropic => ProviderKind::Anthropic,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub kind: KindConfig,
    /// `https://api.openai.com` or `http://127.0.0.1:8000/prefix`; a path is prepended to routes.
    pub base_url: String,
    /// Name of the environment variable that holds the provider key (preferred).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// The provider key in clear; use only for local servers that need a dummy key.
    #[serde(default)]
    pub api_key: Option<String>,
    #[serde(default)]
    pub timeouts: TimeoutConfig,
    /// Extra headers sent upstream on every request (e.g. `OpenAI-Organization`), checked
    /// at start; names go out in lower case, as HTTP/2 sends every name.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The upstream circuit breaker (on by default).
    #[serde(default)]
    pub breaker: crate::breaker::BreakerConfig,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutConfig {
    pub connect_ms: u64,
    /// Until the provider's response header arrives.
    pub first_byte_ms: u64,
    /// Between two reads of the response body (a stalled stream).
    pub idle_ms: u64,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        TimeoutConfig {
            connect_ms: 5_000,
            first_byte_ms: 120_000,
            idle_ms: 120_000,
        }
    }
}

impl TimeoutConfig {
    pub fn connect(&self) -> Duration {
        Duration::from_millis(self.connect_ms)
    }
    pub fn first_byte(&self) -> Duration {
        Duration::from_millis(self.first_byte_ms)
    }
    pub fn idle(&self) -> Duration {
        Duration::from_millis(self.idle_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub provider: String,
    /// The name sent upstream when it differs from the name clients use.
    #[serde(default)]
    pub upstream_model: Option<String>,
    /// Largest output the model can produce; bounds a request's worst case.
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    /// A price for this model that overrides the price table.
    #[serde(default)]
    pub price: Option<ModelPrice>,
    /// A configured model (on another provider) that serves this one's requests while its
    /// provider's circuit is open.
    #[serde(default)]
    pub fallback: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PricingConfig {
    /// A price table file such as `prices.yaml` (relative to the config file).
    pub file: Option<PathBuf>,
    /// Prices declared inline; they win over the file's.
    pub models: BTreeMap<String, ModelPrice>,
    /// Serve models with no price at zero cost (records say `unpriced`) instead of a 400.
    pub allow_unpriced: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// A stable, non-secret identifier used in records and metrics.
    pub id: String,
    pub team: String,
    /// Hex SHA-256 of the key. The key itself is never stored.
    pub sha256: String,
    /// May this key bring its own provider key in `x-provider-key`?
    #[serde(default)]
    pub allow_byok: bool,
    #[serde(default)]
    pub revoked: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Customers that get their own label value; every other customer is `other`.
    pub customer_labels: Vec<String>,
    /// Features that get their own label value; every other feature is `other`.
    pub feature_labels: Vec<String>,
    /// When above zero, the first N distinct unconfigured values also get labels.
    pub dynamic_label_cap: usize,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Name of the environment variable holding the admin API token (preferred).
    pub token_env: Option<String>,
    /// The admin token in clear (local setups only).
    pub token: Option<String>,
}

impl AdminConfig {
    /// The admin token, if one is configured. Without one the admin API answers 403.
    pub fn resolve(&self) -> Option<String> {
        self.token
            .clone()
            .or_else(|| self.token_env.as_ref().and_then(|v| std::env::var(v).ok()))
            .filter(|t| !t.is_empty())
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Embedded, journaled under `server.data_dir`: one gateway process.
    #[default]
    Memory,
    /// Shared by every gateway instance that points at the same Redis.
    Redis,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// `redis://host:port/db`; the password may come from `redis_url_env` instead.
    pub redis_url: Option<String>,
    /// Name of an environment variable holding the Redis URL.
    pub redis_url_env: Option<String>,
    /// Redis Cluster seed URLs (instead of `redis_url`).
    pub redis_cluster: Vec<String>,
    /// Prefix of every Redis key.
    pub prefix: String,
    /// Bound on every store call.
    pub timeout_ms: u64,
    /// How long a reservation holds budget if its request never settles.
    pub lease_seconds: u64,
    /// Most settlements a gateway keeps waiting for the store (queued, in flight and to be
    /// retried); past it a finished request's settlement is dropped and counted lost.
    pub settle_queue_max: usize,
    /// How often each gateway checks the admin catalog (budgets, customers, keys,
    /// prompts) for changes made through another gateway.
    pub catalog_refresh_ms: u64,
    /// Redis only: budget slices (`store::slices`). 0 (the default) is off: every request
    /// reserves in Redis. N > 0: a gateway reserves N requests' worth of its scopes'
    /// budgets and requests-per-minute in one call and admits locally against it.
    pub slice_requests: u64,
    /// How long a gateway admits from one slice before giving back what is left.
    pub slice_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Memory,
            redis_url: None,
            redis_url_env: None,
            redis_cluster: Vec::new(),
            prefix: "tollgate:".into(),
            timeout_ms: 250,
            lease_seconds: 600,
            settle_queue_max: crate::settler::DEFAULT_MAX_WAITING,
            catalog_refresh_ms: 250,
            slice_requests: 0,
            slice_ms: 1000,
        }
    }
}

/// Parses YAML into a typed value: the one place that knows the config syntax.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &str,
) -> Result<T, ConfigError> {
    serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
        file: file.to_string(),
        reason: e.to_string(),
    })
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.display().to_string(),
        source,
    })
}

impl Config {
    /// Reads, parses and validates a config file and the price table it names.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let mut config: Config = parse_yaml(&read(path)?, &file)?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.load_prices()?;
        config.validate(&file)?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        if self.server.data_dir.is_relative() {
            self.server.data_dir = base.join(&self.server.data_dir);
        }
        if let Some(f) = self.pricing.file.as_mut() {
            if f.is_relative() {
                *f = base.join(&*f);
            }
        }
    }

    fn load_prices(&mut self) -> Result<(), ConfigError> {
        let mut table = match &self.pricing.file {
            Some(path) => parse_yaml::<PriceTable>(&read(path)?, &path.display().to_string())?,
            None => PriceTable::default(),
        };
        for (model, price) in &self.pricing.models {
            table.insert(model.clone(), price.clone());
        }
        self.prices = table;
        Ok(())
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let invalid = |key: String, reason: String| ConfigError::Invalid {
            file: file.to_string(),
            key,
            reason,
        };
        for (key, addr) in [
            ("server.listen", &self.server.listen),
            ("server.admin_listen", &self.server.admin_listen),
        ] {
            addr.parse::<std::net::SocketAddr>()
                .map_err(|e| invalid(key.into(), format!("{addr:?} is not host:port ({e})")))?;
        }
        if self.server.shutdown_drain_seconds > 3600 {
            return Err(invalid(
                "server.shutdown_drain_seconds".into(),
                "at most 3600 (an hour)".into(),
            ));
        }
        if self.server.client_write_timeout_seconds > 3600 {
            return Err(invalid(
                "server.client_write_timeout_seconds".into(),
                "at most 3600 (an hour; 0 for no bound)".into(),
            ));
        }
        if self.store.slice_requests > 0 {
            if self.store.kind != StoreKind::Redis {
                return Err(invalid(
                    "store.slice_requests".into(),
                    "budget slices are for the Redis store (the embedded one decides in process)"
                        .into(),
                ));
            }
            if !(2..=10_000).contains(&self.store.slice_requests) {
                return Err(invalid(
                    "store.slice_requests".into(),
                    "0 (off), or from 2 to 10000".into(),
                ));
            }
            if !(10..=60_000).contains(&self.store.slice_ms) {
                return Err(invalid(
                    "store.slice_ms".into(),
                    "from 10 to 60000 (a minute)".into(),
                ));
            }
        }
        if self.server.threads == 0 {
            return Err(invalid(
                "server.threads".into(),
                "must be at least 1".into(),
            ));
        }
        for (name, p) in &self.providers {
            if name.is_empty() || name.contains('/') || name == "v1" {
                return Err(invalid(
                    format!("providers.{name}"),
                    "a provider name is a URL path segment: not empty, no '/', not 'v1'".into(),
                ));
            }
            crate::routing::BaseUrl::provider(&p.base_url)
                .map_err(|reason| invalid(format!("providers.{name}.base_url"), reason))?;
            if p.api_key_env.is_some() && p.api_key.is_some() {
                return Err(invalid(
                    format!("providers.{name}"),
                    "set api_key_env or api_key, not both".into(),
                ));
            }
        }
        for (model, m) in &self.models {
            if let Some(f) = &m.fallback {
                if !self.models.contains_key(f) || f == model {
                    return Err(invalid(
                        format!("models.{model}.fallback"),
                        format!("{f:?} is not another configured model"),
                    ));
                }
            }
            if !self.providers.contains_key(&m.provider) {
                return Err(invalid(
                    format!("models.{model}.provider"),
                    format!("no provider named {:?} in providers", m.provider),
                ));
            }
        }
        self.limits
            .validate()
            .map_err(|(key, reason)| invalid(format!("limits.{key}"), reason))?;
        if self.store.kind == StoreKind::Redis
            && self.store.redis_url.is_none()
            && self.store.redis_url_env.is_none()
            && self.store.redis_cluster.is_empty()
        {
            return Err(invalid(
                "store.redis_url".into(),
                "required with kind: redis".into(),
            ));
        }
        if self.store.settle_queue_max == 0 {
            return Err(invalid(
                "store.settle_queue_max".into(),
                "must be at least 1".into(),
            ));
        }
        let mut ids = HashMap::new();
        for (i, k) in self.keys.iter().enumerate() {
            if crate::auth::parse_hash(&k.sha256).is_none() {
                return Err(invalid(
                    format!("keys[{i}].sha256"),
                    "must be 64 hex characters (the SHA-256 of the key)".into(),
                ));
            }
            if ids.insert(k.id.as_str(), i).is_some() {
                return Err(invalid(
                    format!("keys[{i}].id"),
                    format!("{:?} is used twice", k.id),
                ));
            }
        }
        Ok(())
    }

    /// The provider key from config, read from the environment when named there.
    pub fn provider_credential(&self, provider: &str) -> Option<String> {
        let p = self.providers.get(provider)?;
        match (&p.api_key, &p.api_key_env) {
            (Some(k), _) => Some(k.clone()),
            (None, Some(var)) => std::env::var(var).ok().filter(|v| !v.is_empty()),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("tollgate-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(format!("c{}.yaml", text.len()));
        std::fs::write(&path, text).expect("write");
        Config::load(&path)
    }

    #[test]
    fn example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/tollgate.yaml");
        let c = Config::load(&path).expect("conf/tollgate.yaml must load");
        assert!(c.providers.contains_key("openai"));
        assert!(c.prices.lookup("gpt-4o").is_some());
    }

    #[test]
    fn unknown_key_names_the_key() {
        let err = load_text("server:\n  listn: 1\n").unwrap_err().to_string();
        assert!(err.contains("listn"), "{err}");
    }

    #[test]
    fn model_with_missing_provider_is_refused_with_key_path() {
        let err = load_text("models:\n  gpt-4o:\n    provider: nope\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("models.gpt-4o.provider"), "{err}");
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn bad_key_hash_is_refused() {
        let err = load_text("keys:\n  - id: a\n    team: t\n    sha256: abc\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("keys[0].sha256"), "{err}");
    }

    #[test]
    fn bad_listen_address_is_refused() {
        let err = load_text("server:\n  listen: nowhere\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.listen"), "{err}");
    }

    #[test]
    fn bad_base_url_is_refused() {
        let err = load_text("providers:\n  x:\n    kind: openai\n    base_url: ftp://a\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("providers.x.base_url"), "{err}");
    }

    #[test]
    fn a_bad_webhook_url_is_refused_without_repeating_it() {
        let err = load_text(
            "limits:\n  alerts:\n    webhook_url: hooks.example.com/services/T0/B0/SECRETTOKEN\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("limits.alerts.webhook_url"), "{err}");
        assert!(!err.contains("SECRETTOKEN"), "{err}");
        let ok = load_text("limits:\n  alerts:\n    webhook_url: https://hooks.example.com/x\n");
        assert!(ok.is_ok(), "{:?}", ok.err());
    }

    #[test]
    fn the_client_write_timeout_defaults_to_a_minute_and_is_bounded() {
        let server = |text: &str| load_text(text).map(|c| c.server.client_write_timeout_seconds);
        assert_eq!(server("server:\n  threads: 2\n").expect("default"), 60);
        assert_eq!(
            server("server:\n  client_write_timeout_seconds: 0\n").expect("0: no bound"),
            0
        );
        let err = server("server:\n  client_write_timeout_seconds: 3601\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.client_write_timeout_seconds"), "{err}");
    }

    #[test]
    fn a_drain_longer_than_an_hour_is_refused() {
        assert_eq!(
            load_text("server:\n  shutdown_drain_seconds: 0\n")
                .expect("0: exit at once")
                .server
                .shutdown_drain_seconds,
            0
        );
        let err = load_text("server:\n  shutdown_drain_seconds: 3601\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.shutdown_drain_seconds"), "{err}");
    }

    #[test]
    fn an_empty_settlement_queue_is_refused() {
        let err = load_text("store:\n  settle_queue_max: 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("store.settle_queue_max"), "{err}");
        assert!(err.contains("at least 1"), "{err}");
    }
}
