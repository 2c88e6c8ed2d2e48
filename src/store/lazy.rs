//! Connects to Redis on first use, and again after a failed attempt, so a gateway can start
//! while Redis is still down: until it answers, requests follow their budgets'
//! `on_store_error`.
//!
//! Two connections: one for reservations and settlements, one for everything else (catalog
//! polling, shared rollups, alerts, the admin API). A connection's driver task lives in the
//! runtime that made its first call, and every call through it wakes that runtime's thread.
//! Reservations and settlements are only made from the proxy's runtime (`request_filter`,
//! and the settlement queue's flusher, started by the first `logging`), so their connection
//! is born there.
//! (Alert checks after a settlement use the other connection: rare, and only with a webhook
//! configured.) When the two shared one connection, the catalog poller made it at start, in
//! its own runtime, and each request's store call woke the poller's thread and back: at 200
//! req/s the gateway made 13.6 context switches and spent ≈ 390 µs of CPU per request,
//! against 3.9 and ≈ 200 µs with the embedded store (BENCHMARKS.md, fifth round).

use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::OnceCell;

use super::redis::RedisStore;
use super::{Decision, Period, ReserveRequest, Settlement, Store, StoreError};
use crate::config::StoreConfig;

pub struct LazyRedis {
    urls: Vec<String>,
    cluster: bool,
    prefix: String,
    timeout: Duration,
    /// Reservations and settlements (the proxy's runtime).
    requests: OnceCell<RedisStore>,
    /// Every other call, from whichever runtime.
    background: OnceCell<RedisStore>,
    /// The last failed connection attempt: for `timeout` after it, callers get its error
    /// at once instead of queueing for attempts of their own, one after another.
    failed: std::sync::Mutex<Option<(Instant, StoreError)>>,
}

impl LazyRedis {
    pub fn new(cfg: &StoreConfig) -> Result<LazyRedis, String> {
        let from_env = cfg
            .redis_url_env
            .as_ref()
            .and_then(|v| std::env::var(v).ok());
        let (urls, cluster) = match (&cfg.redis_url, from_env, cfg.redis_cluster.is_empty()) {
            (_, _, false) => (cfg.redis_cluster.clone(), true),
            (Some(u), _, true) => (vec![u.clone()], false),
            (None, Some(u), true) => (vec![u], false),
            (None, None, true) => {
                return Err("store.redis_url (or redis_url_env, redis_cluster) is required".into())
            }
        };
        Ok(LazyRedis {
            urls,
            cluster,
            prefix: cfg.prefix.clone(),
            timeout: Duration::from_millis(cfg.timeout_ms),
            requests: OnceCell::new(),
            background: OnceCell::new(),
            failed: Default::default(),
        })
    }

    /// One connection attempt, unless one failed within the last `timeout`. (Callers
    /// waiting on a `OnceCell` each make their own attempt after the one before fails: while
    /// Redis does not answer, the tenth in line would wait ten timeouts.)
    async fn connect(&self) -> Result<RedisStore, StoreError> {
        if let Some(e) = self.recent_failure() {
            return Err(e);
        }
        let connected = if self.cluster {
            RedisStore::connect_cluster(&self.urls, &self.prefix, self.timeout).await
        } else {
            let url = self.urls.first().map(String::as_str).unwrap_or_default();
            RedisStore::connect(url, &self.prefix, self.timeout).await
        };
        if let (Err(e), Ok(mut failed)) = (&connected, self.failed.lock()) {
            *failed = Some((Instant::now(), e.clone()));
        }
        connected
    }

    fn recent_failure(&self) -> Option<StoreError> {
        let failed = self.failed.lock().ok()?;
        let (at, e) = failed.as_ref()?;
        (at.elapsed() < self.timeout).then(|| e.clone())
    }

    async fn for_requests(&self) -> Result<&RedisStore, StoreError> {
        self.requests.get_or_try_init(|| self.connect()).await
    }

    async fn get(&self) -> Result<&RedisStore, StoreError> {
        self.background.get_or_try_init(|| self.connect()).await
    }
}

#[async_trait]
impl Store for LazyRedis {
    async fn reserve(&self, req: &ReserveRequest) -> Result<Decision, StoreError> {
        self.for_requests().await?.reserve(req).await
    }

    fn needs_settling(&self, s: &Settlement) -> bool {
        super::redis::needs_settling(self.cluster, s)
    }

    async fn settle(&self, s: &Settlement) -> Result<(), StoreError> {
        self.for_requests().await?.settle(s).await
    }

    async fn settle_many(&self, batch: &[Settlement]) -> Vec<Result<(), StoreError>> {
        match self.for_requests().await {
            Ok(store) => store.settle_many(batch).await,
            Err(e) => vec![Err(e); batch.len()],
        }
    }

    async fn spent(&self, scope: &str, period: Period) -> Result<u64, StoreError> {
        self.get().await?.spent(scope, period).await
    }

    async fn claim_once(&self, scope: &str, name: &str, ttl_ms: u64) -> Result<bool, StoreError> {
        self.get().await?.claim_once(scope, name, ttl_ms).await
    }

    async fn catalog_write(
        &self,
        kind: &str,
        id: &str,
        doc: Option<&str>,
        only_if_absent: bool,
    ) -> Result<bool, StoreError> {
        self.get()
            .await?
            .catalog_write(kind, id, doc, only_if_absent)
            .await
    }

    async fn catalog_version(&self) -> Result<u64, StoreError> {
        self.get().await?.catalog_version().await
    }

    async fn catalog_load(&self) -> Result<crate::catalog::CatalogDocs, StoreError> {
        self.get().await?.catalog_load().await
    }

    async fn rollups_add(
        &self,
        batch: &str,
        rows: &crate::ledger::Rollups,
    ) -> Result<(), StoreError> {
        self.get().await?.rollups_add(batch, rows).await
    }

    async fn rollups_read(
        &self,
        start_day: u64,
        end_day: u64,
    ) -> Result<Option<crate::ledger::Rollups>, StoreError> {
        self.get().await?.rollups_read(start_day, end_day).await
    }

    /// Both connections answer. The request connection is only checked once a request has
    /// made it: made here, it would be born in the admin runtime.
    async fn healthy(&self) -> bool {
        let background = match self.get().await {
            Ok(s) => s.healthy().await,
            Err(_) => false,
        };
        match self.requests.get() {
            Some(s) => background && s.healthy().await,
            None => background,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::suite::request;

    /// A Redis that accepts connections and never answers: every attempt takes a timeout.
    fn silent_redis() -> (std::net::TcpListener, String) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        (listener, format!("redis://127.0.0.1:{port}"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_queued_behind_a_failing_attempt_fail_with_it() {
        let (_listener, url) = silent_redis();
        let cfg = StoreConfig {
            redis_url: Some(url),
            timeout_ms: 200,
            ..StoreConfig::default()
        };
        let store = std::sync::Arc::new(LazyRedis::new(&cfg).expect("config"));
        let started = Instant::now();
        let calls: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(
                    async move { store.reserve(&request(&format!("r{i}"), "s", 10, 1)).await },
                )
            })
            .collect();
        for call in calls {
            let result = call.await.expect("task");
            assert!(result.is_err(), "{result:?}");
        }
        // One attempt's timeout (and the attempt's own retry), not eight in a row.
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1_200), "took {took:?}");
    }
}
