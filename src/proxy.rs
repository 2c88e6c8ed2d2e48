//! The Pingora `ProxyHttp` implementation. Each phase does one job and hands state on
//! through `RequestCtx`; the provider exchange itself is described in `exchange`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;

use crate::admission::{self, Reservation};
use crate::api::{Endpoint, ProviderKind};
use crate::attribution::{self, Attribution, HeaderMetadata};
use crate::auth::{self, Caller, KeyRing};
use crate::body::{Edits, RequestBody};
use crate::breaker::Admit as BreakerAdmit;
use crate::budgets::Policy;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::errors::GatewayError;
use crate::exchange;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::pricing::{ModelPrice, PriceTable};
use crate::providers::Credential;
use crate::record::{unix_ms, UsageRecord};
use crate::respond;
use crate::routing::{ModelRoute, PathTarget, RouteTable};
use crate::sandbox::{self, SandboxRequest};
use crate::store::Store;

/// Request headers that never reach a provider.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "accept-encoding",
    "authorization",
    "x-api-key",
    "x-provider-key",
];

/// Everything a request needs that lives as long as the process.
pub struct State {
    pub config: Config,
    pub store: Arc<dyn Store>,
    /// Settlements on their way to a store that is not in-process.
    pub settler: Arc<crate::settler::Settler>,
    pub ledger: Arc<Ledger>,
    pub admin_token: Option<String>,
    pub routes: RouteTable,
    pub metrics: Metrics,
    pub connector: crate::exchange::Connections,
    pub runaway: crate::runaway::RunawayGuard,
    /// Requests in flight and tasks started for them: what a graceful shutdown waits for.
    pub work: crate::shutdown::Work,
    request_ids: RequestIds,
    /// What the admin catalog changes at run time, swapped whole when it changes.
    live: std::sync::RwLock<Arc<Live>>,
    /// Prompt keys whose automatic creation is on its way (so it is asked for once).
    prompts_pending: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Whether the catalog was loaded from the store at least once.
    catalog_loaded: std::sync::atomic::AtomicBool,
    /// Rollup deltas on their way to the shared rollups: (batch id, rows). A batch whose
    /// outcome is unknown is sent again as it is, under the same id, so it counts once.
    rollup_batch: std::sync::Mutex<Option<(String, crate::ledger::Rollups)>>,
    rollup_batches: std::sync::atomic::AtomicU64,
}

/// The config merged with the admin catalog: what requests are checked against.
pub struct Live {
    pub catalog: Catalog,
    pub policy: Policy,
    pub keys: KeyRing,
}

impl State {
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        ledger: Arc<Ledger>,
        metrics: Metrics,
    ) -> Result<State, String> {
        if config.store.kind == crate::config::StoreKind::Redis {
            ledger.share_rollups();
        }
        let live = Live {
            catalog: Catalog::default(),
            policy: Policy::new(config.limits.clone()),
            keys: KeyRing::from_config(&config.keys),
        };
        Ok(State {
            store,
            settler: Arc::new(crate::settler::Settler::new(config.store.settle_queue_max)),
            ledger,
            admin_token: config.admin.resolve(),
            routes: RouteTable::from_config(&config)?,
            metrics,
            connector: crate::exchange::Connections::default(),
            runaway: crate::runaway::RunawayGuard::new(&config.limits.runaway),
            work: Default::default(),
            request_ids: RequestIds::new(),
            live: std::sync::RwLock::new(Arc::new(live)),
            prompts_pending: Default::default(),
            catalog_loaded: Default::default(),
            rollup_batch: Default::default(),
            rollup_batches: Default::default(),
            config,
        })
    }

    /// The current policy, keys and catalog: one snapshot for a whole request.
    pub fn live(&self) -> Arc<Live> {
        match self.live.read() {
            Ok(l) => l.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Reloads the admin catalog from the store if its version moved (or `force`).
    pub async fn refresh_catalog(&self, force: bool) -> Result<(), crate::store::StoreError> {
        if !force {
            let version = self.store.catalog_version().await?;
            if version == self.live().catalog.version {
                return Ok(());
            }
        }
        let docs = self.store.catalog_load().await?;
        let catalog = Catalog::from_docs(&docs);
        let live = Live {
            policy: Policy::with_catalog(&self.config.limits, &catalog),
            keys: KeyRing::with_catalog(&self.config.keys, &catalog),
            catalog,
        };
        match self.live.write() {
            Ok(mut l) => *l = Arc::new(live),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(live),
        }
        self.catalog_loaded
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Loads the catalog on the request path if the background refresh has not yet
    /// (the first requests after a start), so a revoked key is not let through then.
    /// If the store cannot be read, the request goes on under the config file alone
    /// (keys made through the API are unknown until the store answers) and
    /// `tollgate_store_degraded_total{outcome="catalog_unavailable"}` counts it.
    async fn ensure_catalog(&self) {
        if self
            .catalog_loaded
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return;
        }
        if let Err(e) = self.refresh_catalog(true).await {
            crate::log_throttled!(log::Level::Warn, "admin catalog not loaded: {e}");
            self.metrics.store_degraded("catalog_unavailable");
        }
    }

    /// Adds this gateway's new rollup deltas to the shared rollups (Redis); a failed batch
    /// is kept and retried first. Called by the background refresh, off the request path,
    /// and by the shutdown drain, which calls until it returns true: there was nothing
    /// (left) to push.
    pub async fn push_rollups(&self) -> bool {
        let batch = {
            let Ok(mut pending) = self.rollup_batch.lock() else {
                return true;
            };
            if pending.is_none() {
                let rows = self.ledger.take_shared();
                if rows.is_empty() {
                    return true;
                }
                let n = self
                    .rollup_batches
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                *pending = Some((format!("{}-{n}", self.request_ids.prefix), rows));
            }
            pending.clone()
        };
        let Some((id, rows)) = batch else { return true };
        match self.store.rollups_add(&id, &rows).await {
            Ok(()) => {
                if let Ok(mut pending) = self.rollup_batch.lock() {
                    *pending = None;
                }
            }
            Err(e) => {
                crate::log_throttled!(log::Level::Warn, "shared usage rollups: {e}; retrying");
                self.metrics.store_degraded("rollups_delayed");
            }
        }
        false
    }

    /// The rollups the usage API answers from: the shared ones (Redis), else this
    /// gateway's ledger's.
    pub async fn shared_rollups(
        &self,
        start_day: u64,
        end_day: u64,
    ) -> Result<Option<crate::ledger::Rollups>, crate::store::StoreError> {
        if self.config.store.kind != crate::config::StoreKind::Redis {
            return Ok(None);
        }
        self.store.rollups_read(start_day, end_day).await
    }

    /// Creates a prompt on its first use, off the request path.
    pub fn note_prompt_use(self: &Arc<Self>, prompt_key: &str) {
        if self.live().catalog.prompts.contains_key(prompt_key) {
            return;
        }
        let Ok(mut pending) = self.prompts_pending.lock() else {
            return;
        };
        if !pending.insert(prompt_key.to_string()) {
            return;
        }
        drop(pending);
        let state = self.clone();
        let key = prompt_key.to_string();
        self.work.spawn(async move {
            let doc = crate::catalog::PromptDoc {
                prompt_key: key.clone(),
                description: None,
                active_version: None,
                created_ms: unix_ms(SystemTime::now()),
            };
            let json = serde_json::to_string(&doc).unwrap_or_default();
            let written = state
                .store
                .catalog_write(
                    crate::catalog::Kind::Prompt.label(),
                    &key,
                    Some(&json),
                    true,
                )
                .await;
            if let Err(e) = &written {
                log::warn!("recording prompt {key:?}: {e}");
            }
            let _ = state.refresh_catalog(false).await;
            if let Ok(mut pending) = state.prompts_pending.lock() {
                pending.remove(&key);
            }
        });
    }

    pub fn prices(&self) -> &PriceTable {
        &self.config.prices
    }

    /// The price for a model: its inline config price, else the table's for the name the
    /// client used, else for the name sent upstream.
    pub fn price_for(&self, model: &str, upstream_model: &str) -> Option<&ModelPrice> {
        self.routes
            .model_config(model)
            .and_then(|m| m.price.as_ref())
            .or_else(|| self.prices().lookup(model))
            .or_else(|| self.prices().lookup(upstream_model))
    }
}

/// Unique, unguessable-enough request ids: a per-process random prefix and a counter.
struct RequestIds {
    prefix: String,
    counter: std::sync::atomic::AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        let prefix = auth::mint_key()
            .map(|k| k[3..15].to_string())
            .unwrap_or_else(|_| format!("{:012x}", unix_ms(SystemTime::now())));
        RequestIds {
            prefix,
            counter: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn next(&self) -> String {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut id = String::with_capacity(3 + self.prefix.len() + 1 + 16);
        id.push_str("tg-");
        id.push_str(&self.prefix);
        id.push('-');
        crate::fastfmt::push_hex(&mut id, n);
        id
    }
}

/// Per-request state handed from phase to phase.
pub struct RequestCtx {
    pub started: Instant,
    pub request_id: String,
    /// The error format for gateway errors on this route.
    pub error_kind: ProviderKind,
    /// The record, once the request is far enough along to be metered.
    pub record: Option<UsageRecord>,
    /// Time spent waiting on the network (client body, provider), not in Tollgate.
    pub io_wait: Duration,
    pub ttfb: Option<Duration>,
    /// Headers added to whatever response this request gets (budget state, model shift).
    pub extra_headers: Vec<(&'static str, String)>,
    /// The budget reservation to settle when the request is done.
    pub reservation: Option<Reservation>,
    /// The record is already in the ledger (written before the response's last bytes).
    pub persisted: bool,
    /// Ends when the context is dropped, after `logging` (or in a panic's unwinding).
    pub work: crate::shutdown::WorkGuard,
}

/// A request that passed routing, auth and parsing, ready to be forwarded.
pub struct Admitted {
    pub endpoint: Endpoint,
    pub route: ModelRoute,
    pub stream: bool,
    pub strip_usage_chunk: bool,
    pub sandbox: bool,
    pub upstream_body: Bytes,
    pub credential: Credential,
    pub price: Option<ModelPrice>,
    pub input_estimate: u64,
    /// This request is the probe of a half-open upstream circuit.
    pub probe: bool,
    /// Upper bound on input tokens: the body's byte length.
    pub input_bound: u64,
    /// The max-output value the client sent, if any.
    pub client_max_output: Option<u64>,
    pub max_output_tokens: Option<u64>,
    pub trailers: bool,
}

pub struct Gateway {
    pub state: Arc<State>,
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        self.state.metrics.in_flight.inc();
        RequestCtx {
            started: Instant::now(),
            request_id: self.state.request_ids.next(),
            error_kind: ProviderKind::OpenAi,
            record: None,
            io_wait: Duration::ZERO,
            ttfb: None,
            extra_headers: Vec::new(),
            reservation: None,
            persisted: false,
            work: self.state.work.start(),
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        let bound = self.state.config.server.client_write_timeout_seconds;
        if bound > 0 {
            session.set_write_timeout(Some(Duration::from_secs(bound)));
        }
        match self.serve(session, ctx).await {
            Ok(()) => Ok(true),
            Err(Failure::Respond(e)) => {
                if ctx.record.is_none() {
                    self.state.metrics.rejected(e.status());
                }
                respond::error(session, ctx, &e).await;
                Ok(true)
            }
            // The response has started: abort the connection so the client sees the break.
            Err(Failure::Abort(e)) => Err(pingora::Error::explain(
                pingora::ErrorType::ConnectionClosed,
                e.to_string(),
            )),
        }
    }

    /// Every answer is written in `request_filter`, so an error that reaches Pingora is a
    /// `Failure::Abort`: the response had started (or its header could not be written)
    /// and can only be cut. Pingora's default would count it a 500 in its error line and
    /// send a 500 at a connection that can take none.
    async fn fail_to_proxy(
        &self,
        _session: &mut Session,
        _e: &pingora::Error,
        _ctx: &mut RequestCtx,
    ) -> FailToProxy {
        FailToProxy {
            error_code: 0,
            can_reuse_downstream: false,
        }
    }

    /// A client leaving mid-response is common (a user closes the tab) and already in the
    /// record (`client_gone`): no error line each time. Upstream breaks are still logged.
    fn suppress_error_log(
        &self,
        _session: &Session,
        ctx: &RequestCtx,
        _e: &pingora::Error,
    ) -> bool {
        client_gone(ctx)
    }

    /// What Pingora's error lines say about a request: method and path only. Its default
    /// adds the query string and `Host`, and a query string can carry a key.
    fn request_summary(&self, session: &Session, _ctx: &RequestCtx) -> String {
        let req = session.req_header();
        format!("{} {}", req.method, req.uri.path())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        // Every request is answered in request_filter; Pingora's proxy loop never runs.
        Err(pingora::Error::explain(
            pingora::ErrorType::InternalError,
            "no upstream phase",
        ))
    }

    async fn logging(
        &self,
        _session: &mut Session,
        _e: Option<&pingora::Error>,
        ctx: &mut RequestCtx,
    ) {
        if let Some(mut record) = ctx.record.take() {
            stamp_times(&mut record, ctx);
            if !ctx.persisted {
                self.state.ledger.append(&record);
            }
            if let Some(reservation) = ctx.reservation.take() {
                admission::settle(&self.state, reservation, &record).await;
            }
            admission::watch_runaway(&self.state, &record);
            respond::finish_record(&self.state, &record);
        }
        self.state.metrics.in_flight.dec();
    }
}

fn client_gone(ctx: &RequestCtx) -> bool {
    ctx.record.as_ref().is_some_and(|r| r.client_gone)
}

/// Fills the record's timings as of now.
pub fn stamp_times(record: &mut UsageRecord, ctx: &RequestCtx) {
    record.latency = ctx.started.elapsed();
    record.ttfb = ctx.ttfb;
    record.overhead = record.latency.saturating_sub(ctx.io_wait);
}

/// Writes the record to the ledger now, before the response's last bytes go out.
pub fn persist(state: &State, ctx: &mut RequestCtx) {
    let (started, io_wait, ttfb) = (ctx.started, ctx.io_wait, ctx.ttfb);
    if let Some(record) = ctx.record.as_mut() {
        record.latency = started.elapsed();
        record.ttfb = ttfb;
        record.overhead = record.latency.saturating_sub(io_wait);
        state.ledger.append(record);
        ctx.persisted = true;
    }
}

/// How a request ends when it does not end well.
pub enum Failure {
    /// Nothing sent yet: answer with this error in the provider's format.
    Respond(GatewayError),
    /// The response already started: break the connection.
    Abort(GatewayError),
}

impl From<GatewayError> for Failure {
    fn from(e: GatewayError) -> Self {
        Failure::Respond(e)
    }
}

impl Gateway {
    async fn serve(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), Failure> {
        let state = &self.state;
        let target = {
            let req = session.req_header();
            ctx.error_kind = error_kind_for_path(req.uri.path());
            state.routes.target(req.method.as_str(), req.uri.path())?
        };
        state.ensure_catalog().await;
        let caller = authenticate(state, session.req_header())?;
        let (endpoint, pinned) = match target {
            PathTarget::ListModels => return respond::model_list(session, ctx, state).await,
            PathTarget::Endpoint { endpoint, pinned } => (endpoint, pinned),
        };
        let body = read_body(session, ctx, state.config.server.max_body_bytes).await?;
        let mut admitted = admit(
            state,
            session.req_header(),
            ctx,
            &caller,
            endpoint,
            pinned.as_ref(),
            &body,
        )?;
        if let Some(key) = ctx
            .record
            .as_ref()
            .and_then(|r| r.attribution.prompt_key.as_deref())
        {
            state.note_prompt_use(key);
        }
        let max_cost = header_str(session.req_header(), "x-tollgate-max-cost");
        admission::admit(state, ctx, &mut admitted, max_cost).await?;
        let upstream = if admitted.sandbox {
            sandbox::respond(&SandboxRequest {
                endpoint,
                model: &admitted.route.upstream_model,
                stream: admitted.stream,
                include_usage: admitted.strip_usage_chunk
                    || !admitted.stream
                    || wants_usage(&admitted.upstream_body),
                max_output_tokens: admitted.max_output_tokens,
                body: &admitted.upstream_body,
            })?
        } else {
            let client = session.req_header();
            let first = upstream_header(client, &admitted)?;
            let wait = Instant::now();
            let sent = exchange::send(
                &state.connector,
                &admitted.route.provider,
                first,
                || upstream_header(client, &admitted),
                admitted.upstream_body.clone(),
                |reason| {
                    state
                        .metrics
                        .upstream_retry(&admitted.route.provider.name, reason)
                },
            )
            .await;
            ctx.io_wait += wait.elapsed();
            let healthy = matches!(&sent, Ok(up) if up.header().status.as_u16() < 500);
            let provider = &admitted.route.provider;
            provider
                .breaker
                .record(Instant::now(), healthy, admitted.probe);
            sent.inspect_err(|e| {
                state
                    .metrics
                    .upstream_error(&admitted.route.provider.name, upstream_error_kind(e));
                if let Some(r) = ctx.record.as_mut() {
                    r.status = e.status();
                    r.error = Some(e.to_string());
                }
            })?
        };
        respond::forward(session, ctx, state, &admitted, upstream).await
    }
}

/// The route for a model, honouring the provider's circuit: while it is open, the
/// model's fallback serves (header `x-tollgate-model-shifted`), or the request fails fast.
/// Returns the route, the model name to price by, and whether this is a circuit probe.
fn choose_route(
    state: &State,
    ctx: &mut RequestCtx,
    endpoint: Endpoint,
    pinned: Option<&Arc<crate::providers::Provider>>,
    model: &str,
    sandbox: bool,
) -> Result<(ModelRoute, String, bool), GatewayError> {
    let route = state.routes.route(endpoint, pinned, model)?;
    if sandbox {
        return Ok((route, model.to_string(), false));
    }
    let now = Instant::now();
    match route.provider.breaker.admit(now) {
        BreakerAdmit::Yes => return Ok((route, model.to_string(), false)),
        BreakerAdmit::Probe => return Ok((route, model.to_string(), true)),
        BreakerAdmit::No => {}
    }
    let fallback = state
        .routes
        .model_config(model)
        .and_then(|m| m.fallback.clone());
    if let Some(fb) = fallback.filter(|_| pinned.is_none()) {
        let fb_route = state.routes.route(endpoint, None, &fb)?;
        let admit = fb_route.provider.breaker.admit(now);
        if admit != BreakerAdmit::No {
            ctx.extra_headers
                .push(("x-tollgate-model-shifted", format!("{model} -> {fb}")));
            return Ok((fb_route, fb, admit == BreakerAdmit::Probe));
        }
    }
    state
        .metrics
        .upstream_error(&route.provider.name, "circuit_open");
    Err(GatewayError::CircuitOpen(route.provider.name.clone()))
}

fn wants_usage(body: &[u8]) -> bool {
    RequestBody::parse(body)
        .map(|b| b.include_usage())
        .unwrap_or(false)
}

fn upstream_error_kind(e: &GatewayError) -> &'static str {
    match e {
        GatewayError::Timeout(_) => "timeout",
        _ => "connect",
    }
}

/// Which error format a path's clients expect, decided before anything else can fail.
fn error_kind_for_path(path: &str) -> ProviderKind {
    if path.ends_with("/v1/messages") || path.ends_with("/v1/messages/count_tokens") {
        ProviderKind::Anthropic
    } else {
        ProviderKind::OpenAi
    }
}

fn header_str<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a str> {
    req.headers.get(name).and_then(|v| v.to_str().ok())
}

fn authenticate(state: &State, req: &RequestHeader) -> Result<Arc<Caller>, GatewayError> {
    let presented = auth::presented_key(
        req.headers.get("authorization").map(|v| v.as_bytes()),
        req.headers.get("x-api-key").map(|v| v.as_bytes()),
    );
    state
        .live()
        .keys
        .authenticate(presented)
        .map_err(|e| GatewayError::Unauthorized(e.to_string()))
}

async fn read_body(
    session: &mut Session,
    ctx: &mut RequestCtx,
    limit: usize,
) -> Result<Bytes, GatewayError> {
    let declared =
        header_str(session.req_header(), "content-length").and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        session.set_keepalive(None);
        return Err(GatewayError::BodyTooLarge { limit });
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(0));
    let wait = Instant::now();
    loop {
        let chunk = session.read_request_body().await.map_err(|e| {
            GatewayError::BadRequest(format!("could not read the request body: {e}"))
        })?;
        let Some(chunk) = chunk else { break };
        if body.len() + chunk.len() > limit {
            session.set_keepalive(None);
            return Err(GatewayError::BodyTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    ctx.io_wait += wait.elapsed();
    Ok(body.freeze())
}

fn header_metadata(req: &RequestHeader) -> HeaderMetadata {
    let get = |name: &str| header_str(req, name).map(str::to_string);
    HeaderMetadata {
        customer: get("x-tollgate-customer"),
        feature: get("x-tollgate-feature"),
        prompt_key: get("x-tollgate-prompt-key"),
        prompt_version: get("x-tollgate-prompt-version"),
        tags: get("x-tollgate-tags"),
    }
}

fn bad(e: impl std::fmt::Display) -> GatewayError {
    GatewayError::BadRequest(e.to_string())
}

/// Parses, attributes, routes and prices a request, and builds the upstream body.
/// Any refusal here happens before the provider is contacted.
fn admit(
    state: &State,
    req: &RequestHeader,
    ctx: &mut RequestCtx,
    caller: &Caller,
    endpoint: Endpoint,
    pinned: Option<&Arc<crate::providers::Provider>>,
    raw: &Bytes,
) -> Result<Admitted, GatewayError> {
    let body = RequestBody::parse(raw).map_err(bad)?;
    let model = body
        .model()
        .map_err(bad)?
        .ok_or_else(|| GatewayError::BadRequest("the request body has no `model`".into()))?
        .into_owned();
    let stream = body.stream().map_err(bad)?;
    let provider_user = match endpoint.kind() {
        ProviderKind::OpenAi => body.user(),
        ProviderKind::Anthropic => body.metadata_user_id(),
    };
    let mut attribution = attribution::resolve(
        header_metadata(req),
        body.tollgate_metadata().map_err(bad)?,
        provider_user,
        &caller.key_id,
        &caller.team,
    )
    .map_err(bad)?;
    if let Some(key) = &attribution.prompt_key {
        if attribution.prompt_version.is_none() {
            attribution.prompt_version =
                state.live().catalog.active_version(key).map(str::to_string);
        }
    }
    let sandbox =
        header_str(req, "x-tollgate-sandbox").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let (route, priced_as, probe) = choose_route(state, ctx, endpoint, pinned, &model, sandbox)?;
    let price = state.price_for(&priced_as, &route.upstream_model).cloned();
    if price.is_none() && endpoint.is_priced() && !state.config.pricing.allow_unpriced {
        return Err(GatewayError::Unpriced(model));
    }
    let credential = credential_for(req, caller, &route, sandbox)?;
    let strip_usage_chunk = stream
        && matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions)
        && !body.include_usage();
    let edits = Edits {
        strip_metadata: body.has(crate::body::METADATA_MEMBER),
        model: (route.upstream_model != model).then(|| route.upstream_model.clone()),
        include_usage: strip_usage_chunk,
        max_tokens: None,
    };
    let upstream_body = if edits.is_empty() {
        raw.clone()
    } else {
        Bytes::from(body.rewrite(&edits))
    };
    let trailers =
        header_str(req, "te").is_some_and(|v| v.to_ascii_lowercase().contains("trailers"));
    ctx.record = Some(new_record(
        state,
        ctx,
        endpoint,
        &route,
        model,
        attribution,
        stream,
        sandbox,
        price.is_none(),
    ));
    Ok(Admitted {
        endpoint,
        max_output_tokens: body
            .max_output_tokens()
            .map(|(_, n)| n)
            .or(route.max_output_tokens),
        client_max_output: body.max_output_tokens().map(|(_, n)| n),
        input_bound: raw.len() as u64,
        probe,
        route,
        stream,
        strip_usage_chunk,
        sandbox,
        // Roughly four bytes of request JSON per token: used only when usage is missing.
        input_estimate: (raw.len() as u64 / 4).max(1),
        upstream_body,
        credential,
        price,
        trailers,
    })
}

#[allow(clippy::too_many_arguments)]
fn new_record(
    state: &State,
    ctx: &RequestCtx,
    endpoint: Endpoint,
    route: &ModelRoute,
    model: String,
    attribution: Attribution,
    stream: bool,
    sandbox: bool,
    unpriced: bool,
) -> UsageRecord {
    UsageRecord {
        request_id: ctx.request_id.clone(),
        time_ms: unix_ms(SystemTime::now()) - ctx.started.elapsed().as_millis() as u64,
        provider: route.provider.name.clone(),
        endpoint: endpoint.label(),
        model_requested: model,
        attribution,
        price_version: state.prices().version.clone(),
        streamed: stream,
        sandbox,
        unpriced: unpriced && endpoint.is_priced(),
        ..UsageRecord::default()
    }
}

/// The provider credential: the caller's own (`x-provider-key`) when allowed, else the
/// configured one. A sandbox call needs none.
fn credential_for(
    req: &RequestHeader,
    caller: &Caller,
    route: &ModelRoute,
    sandbox: bool,
) -> Result<Credential, GatewayError> {
    if let Some(own) = header_str(req, "x-provider-key") {
        if !caller.allow_byok {
            return Err(GatewayError::Forbidden(
                "this gateway key may not bring its own provider key (x-provider-key)".into(),
            ));
        }
        return Ok(Credential::Own(own.to_string()));
    }
    match (&route.provider.credential, sandbox) {
        (Some(_), _) => Ok(Credential::Configured),
        (None, true) => Ok(Credential::Empty),
        (None, false) => Err(GatewayError::Unreachable(format!(
            "provider {:?} has no credential configured",
            route.provider.name
        ))),
    }
}

/// The request header sent upstream: the client's headers minus gateway-only and
/// hop-by-hop ones, with the provider credential and identity encoding. Built without a
/// case map: each name goes in already parsed (Pingora's `insert_header` parses and copies
/// it again), and goes out as Pingora writes names it has no case for (a few titled,
/// the rest lower case). The client's names went out that way before too; configured
/// `headers` now do as well (names are case-insensitive; HTTP/2 lower-cases them all).
fn upstream_header(client: &RequestHeader, a: &Admitted) -> Result<RequestHeader, GatewayError> {
    use http::header::{HeaderValue, ACCEPT_ENCODING, CONTENT_LENGTH, HOST};
    let provider = &a.route.provider;
    let path = provider.upstream_path(a.endpoint.path(), client.uri.query());
    let internal = |e: pingora::BError| GatewayError::Internal(e.to_string());
    let full = |_| GatewayError::BadRequest("too many request headers".into());
    let mut parts: http::request::Parts =
        RequestHeader::build_no_case("POST", path.as_bytes(), None)
            .map_err(internal)?
            .into();
    let headers = &mut parts.headers;
    headers
        .try_reserve(client.headers.len() + 4 + provider.extra_headers.len())
        .map_err(full)?;
    for (name, value) in client.headers.iter() {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || n.starts_with("x-tollgate-") {
            continue;
        }
        headers
            .try_append(name.clone(), value.clone())
            .map_err(full)?;
    }
    headers
        .try_insert(HOST, provider.authority.clone())
        .map_err(full)?;
    headers
        .try_insert(CONTENT_LENGTH, HeaderValue::from(a.upstream_body.len()))
        .map_err(full)?;
    headers
        .try_insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"))
        .map_err(full)?;
    for (k, v) in &provider.extra_headers {
        headers.try_insert(k.clone(), v.clone()).map_err(full)?;
    }
    provider.apply_credential(headers, &a.credential)?;
    Ok(RequestHeader::from(parts))
}

/// Response headers not passed on to the client (hop-by-hop, or set by us).
const NOT_FORWARDED: [&str; 5] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "trailer",
];

/// Copies the provider's response header for the client, without hop-by-hop headers,
/// in the provider's order, with room for the `adding` headers Tollgate will add. Built
/// fresh, never cloned: a clone is sized for the provider's headers alone (its two maps
/// regrow as ours go in) and removing from it moves its last header into the gap, so
/// the client would see the headers reordered. A header that kept its case (HTTP/1
/// providers) keeps it. Sized to what is added, not generously: a stream's header lives
/// as long as the stream (1,000 open streams, see BENCHMARKS.md).
pub fn client_header(upstream: &ResponseHeader, adding: usize) -> ResponseHeader {
    if !upstream.has_case() {
        return without_case_for_client(upstream, adding);
    }
    let Ok(mut h) = ResponseHeader::build(upstream.status, Some(upstream.headers.len() + adding))
    else {
        return without_case_for_client(upstream, adding);
    };
    h.set_version(upstream.version);
    let _ = h.set_reason_phrase(upstream.get_reason_phrase());
    for (name, value) in upstream.case_header_iter() {
        let n = name.as_slice();
        if NOT_FORWARDED
            .iter()
            .any(|f| f.as_bytes().eq_ignore_ascii_case(n))
        {
            continue;
        }
        let _ = h.append_header(name.clone(), value.clone());
    }
    h
}

/// A header without case (HTTP/2 providers): its parsed names are moved over as they are
/// (a name's repeated values stay together, as the provider's map already holds them).
/// Written as HTTP/1.1: Pingora's HTTP/1 writer refuses an `HTTP/2.0` status line, and
/// its HTTP/2 writer takes either (Pingora's own proxy downgrades the same way).
fn without_case_for_client(upstream: &ResponseHeader, adding: usize) -> ResponseHeader {
    let mut headers = http::HeaderMap::new();
    // Room is only an optimisation (a failed reservation grows as it goes); past http's
    // size limit `try_append` drops a header rather than abort the process.
    let _ = headers.try_reserve(upstream.headers.len() + adding);
    for (name, value) in &upstream.headers {
        if !NOT_FORWARDED.contains(&name.as_str()) {
            let _ = headers.try_append(name.clone(), value.clone());
        }
    }
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = upstream.status;
    parts.version = http::Version::HTTP_11;
    parts.headers = headers;
    ResponseHeader::from(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(h: &ResponseHeader) -> String {
        let mut buf = bytes::BytesMut::new();
        h.header_to_h1_wire(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// The provider's headers reach the client as sent (case, order, repeats, reason),
    /// minus the hop-by-hop ones, whether or not the header kept its case.
    #[test]
    fn client_header_keeps_the_providers_headers_but_not_hop_by_hop_ones() {
        let sent = [
            ("Content-Type", "application/json"),
            ("Connection", "keep-alive"),
            ("X-Request-ID", "req_1"),
            ("set-cookie", "a=1"),
            ("Transfer-Encoding", "chunked"),
            ("Set-Cookie", "b=2"),
            ("openai-processing-ms", "12"),
            ("Content-Length", "99"),
            ("Keep-Alive", "timeout=5"),
            ("x-ratelimit-limit", "10"),
            ("Trailer", "x"),
            ("x-ratelimit-remaining", "9"),
        ];
        let mut up = ResponseHeader::build(429, None).expect("header");
        let _ = up.set_reason_phrase(Some("Slow Down"));
        let mut plain = ResponseHeader::build_no_case(429, None).expect("header");
        plain.set_version(http::Version::HTTP_2);
        for (k, v) in sent {
            up.append_header(k.to_string(), v).expect("append");
            plain.append_header(k.to_string(), v).expect("append");
        }
        let h = client_header(&up, 4);
        assert_eq!(h.status.as_u16(), 429);
        assert_eq!(h.get_reason_phrase(), Some("Slow Down"));
        assert_eq!(
            wire(&h),
            "Content-Type: application/json\r\nX-Request-ID: req_1\r\nset-cookie: a=1\r\n\
             Set-Cookie: b=2\r\nopenai-processing-ms: 12\r\nx-ratelimit-limit: 10\r\n\
             x-ratelimit-remaining: 9\r\n"
        );
        // Without case: the same headers in the same order (a clone with the hop-by-hop
        // ones removed would have moved the last ones into their places); Pingora titles
        // the names it knows when it writes them.
        let h = client_header(&plain, 4);
        assert!(!h.has_case());
        assert_eq!(h.status.as_u16(), 429);
        // An HTTP/2 provider's header goes to an HTTP/1.1 client too.
        assert_eq!(h.version, http::Version::HTTP_11);
        assert_eq!(
            wire(&h),
            "Content-Type: application/json\r\nx-request-id: req_1\r\nSet-Cookie: a=1\r\n\
             Set-Cookie: b=2\r\nopenai-processing-ms: 12\r\nx-ratelimit-limit: 10\r\n\
             x-ratelimit-remaining: 9\r\n"
        );
    }
}
