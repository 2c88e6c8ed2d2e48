//! The Redis store: budget and rate-limit state shared by every gateway that points at the
//! same Redis. Each decision is one Lua script call (`redis.lua`), so admission is atomic
//! across gateways, and it behaves like the memory store: the script mirrors
//! `memory::Ledger` step for step and both pass `suite::run_all`.
//!
//! Time is Redis's (`TIME` inside the script), never the gateway's, so gateways with
//! skewed clocks agree on periods, leases and rate-limit clocks.
//!
//! Key layout (every key of a scope carries the hash tag `{<scope>}`, so one scope lives
//! on one Redis Cluster slot):
//! - `<prefix>{<scope>}:p:<period_id>`: hash `{spent}`, the settled spend of a period
//!   (`d<days since epoch>`, `mYYYYMM`, `t`). Kept 40 days after a daily period ends, 400
//!   days after a monthly one; the total never expires.
//! - `<prefix>{<scope>}:reserved`: hash `period_id -> nano-USD` held by live leases.
//! - `<prefix>{<scope>}:leases`: zset `request_id -> lease expiry (Unix ms)`.
//! - `<prefix>{<scope>}:lease`: hash `request_id -> amount|tokens|concurrent|rpm step|tpm
//!   step|periods`.
//! - `<prefix>{<scope>}:rl`: hash `{rpm_tat_us, tpm_tat_us, tpm, in_flight}`.
//! - `<prefix>{<scope>}:done:<request_id>`: exactly-once marker of a settlement, 24 h,
//!   under the first scope of the settlement's call (single node: one call for all of a
//!   request's scopes that have a lease; cluster: one call, so one marker, per scope).
//!
//! On a single node, a scope limiting requests per minute only gets no lease (it holds
//! nothing a settlement gives back) and is left out of settlements (`Settlement::rpm_only`);
//! in a cluster it keeps one, for the rollback of a refusal on another node.
//!
//! The four scope-state keys (`reserved`, `leases`, `lease`, `rl`) share one expiry,
//! pushed out to a day (plus an hour of slack, so it is rarely pushed) past the latest
//! lease or rate clock when an admission finds it short. Each holds a placeholder member
//! `~`, so none is ever emptied and recreated alone: `rl`'s expiry stands for all. An idle
//! scope's state disappears only once every lease in it has expired and every rate clock
//! has caught up, when it would read as zero anyway. Lease records live in one hash rather
//! than a key each for the same reason: a lease's record must outlive its contribution to
//! `reserved`, or an expired lease could never be given back.
//!
//! Numbers: Lua numbers are doubles, exact up to 2^53 nano-USD (about $9M). Caps, amounts
//! and token counts above that are clamped to it before the call (a cap that high means no
//! cap in practice); nothing is rejected, so an absurd `max_tokens` cannot push a request
//! into the store-error path.
//!
//! Redis Cluster (`connect_cluster`): scopes may live on different nodes, so a request is
//! reserved scope by scope in request order; a refusal rolls back the scopes already
//! reserved, and a later scope that clamps the output further shrinks the earlier ones.
//! The caps still hold. Differences from a single node: a request can be refused because
//! of another request that is itself about to be rolled back, and when several scopes
//! would refuse, the first refusing scope in request order is reported (a single node
//! reports rate limits of every scope before budgets).
//!
//! Operating it: Redis must keep these keys, so run it with `maxmemory-policy noeviction`
//! (an LRU policy would evict spend) and with AOF persistence if spend must survive a Redis
//! restart.
//!
//! Failures: every call is bounded by the store timeout. A reservation whose outcome is
//! unknown (timed out after it was sent) is left alone; its lease expires by itself.
//! Counters are never reset or deleted on an error path.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisFuture, RedisResult, Script, Value};

use super::combine::Combiner;
use super::wire::{decode_batch, evalsha, Args};
use super::{
    BudgetCheck, BudgetStatus, Decision, Enforcement, LimitKind, Period, Refusal, ReserveRequest,
    ScopeCheck, Settlement, Store, StoreError, UnusedSteps,
};

const SCRIPT: &str = include_str!("redis.lua");
/// Adds one batch of rollup deltas, once per batch id.
/// KEYS: batch marker, days sorted set, then one hash per day. ARGV: marker lifetime (ms);
/// then per day hash, in KEYS order: the day number, the number of (field, delta) pairs,
/// the pairs.
const ROLLUP_SCRIPT: &str = r#"
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  return 0
end
local i = 2
for k = 3, #KEYS do
  local day, pairs = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  redis.call('ZADD', KEYS[2], day, day)
  for _ = 1, pairs do
    redis.call('HINCRBY', KEYS[k], ARGV[i], ARGV[i + 1])
    i = i + 2
  end
end
return 1
"#;
/// How long a batch id is remembered: far longer than any retry of it.
const ROLLUP_BATCH_MEMORY_MS: u64 = 24 * 3_600_000;
/// Separates a rollup row's dimensions (JSON) from the counter's name in a hash field.
const FIELD_SEP: char = '\u{1f}';

/// Writes one catalog document and bumps the version in the same atomic step.
/// KEYS: docs hash, version counter. ARGV: field, mode (set | nx | del), document.
const CATALOG_SCRIPT: &str = r#"
local changed
if ARGV[2] == 'del' then
  changed = redis.call('HDEL', KEYS[1], ARGV[1])
elseif ARGV[2] == 'nx' then
  changed = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[3])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  changed = 1
end
if changed == 1 then redis.call('INCR', KEYS[2]) end
return changed
"#;

/// The largest integer a Lua number holds exactly: 2^53 nano-USD, about $9M.
pub const MAX_EXACT: u64 = 1 << 53;
/// Leases longer than this (ten years) are held for ten years.
const MAX_LEASE_MS: u64 = 10 * 365 * 86_400_000;
/// Keys the script is given per scope, in this order (see `redis.lua`).
const SCOPE_KEYS: [&str; 4] = ["rl", "leases", "lease", "reserved"];

/// Timeouts in a row after which a single node's connection is presumed dead.
const STALE_AFTER_TIMEOUTS: u32 = 3;

const REFUSED: i64 = 0;
const KIND_BUDGET: i64 = 1;
const KIND_CONCURRENCY: i64 = 2;
const KIND_RPM: i64 = 3;
const KIND_TPM: i64 = 4;

/// One Redis through a connection manager, which reconnects by itself after I/O errors.
/// A connection that merely stops answering (half-open after a network failure, or a
/// failover that moved the address) raises no error, only timeouts; after a few in a row
/// the manager is replaced by a fresh one. Only calls made on the current manager count,
/// so a burst of calls stuck on the old one does not replace the new one again.
struct SingleNode {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// The manager and its generation.
    current: RwLock<(ConnectionManager, u32)>,
    timeouts_in_a_row: AtomicU32,
}

impl SingleNode {
    fn connection(&self) -> (ConnectionManager, u32) {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn generation(&self) -> u32 {
        match self.current.read() {
            Ok(c) => c.1,
            Err(poisoned) => poisoned.into_inner().1,
        }
    }

    /// Counts a call made on generation `generation`, replacing a manager that only times out.
    fn observe(&self, generation: u32, timed_out: bool) {
        if generation != self.generation() {
            return;
        }
        if !timed_out {
            self.timeouts_in_a_row.store(0, Ordering::Relaxed);
            return;
        }
        if self.timeouts_in_a_row.fetch_add(1, Ordering::Relaxed) + 1 >= STALE_AFTER_TIMEOUTS {
            self.replace(generation);
        }
    }

    fn replace(&self, generation: u32) {
        // Lazy: the fresh manager connects on the next call, within that call's timeout.
        let Ok(fresh) =
            ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())
        else {
            return;
        };
        let mut current = match self.current.write() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if current.1 == generation {
            *current = (fresh, generation.wrapping_add(1));
            self.timeouts_in_a_row.store(0, Ordering::Relaxed);
        }
    }
}

enum Backend {
    Single(Box<SingleNode>),
    Cluster(ClusterConnection),
}

impl Backend {
    /// A handle for one call, and the generation it belongs to.
    fn connection(&self) -> (Connection, u32) {
        match self {
            Backend::Single(node) => {
                let (manager, generation) = node.connection();
                (Connection::Single(manager), generation)
            }
            Backend::Cluster(c) => (Connection::Cluster(c.clone()), 0),
        }
    }
}

/// A connection handle, cheap to clone, for either backend.
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// One request's part of a combined script call: its keys and its arguments.
struct Call {
    keys: Args,
    args: Args,
}

/// Most reservations in one script call (a script call holds Redis for its whole run).
const MAX_BATCH: usize = 32;
/// Settlements per script call: few, so that a reservation arriving meanwhile waits
/// ≈ 0.2 ms at most for one to finish in Redis, while a call's fixed cost (≈ 14 µs of the
/// script's top level, a round trip) is still shared. Calls go one after another, not
/// pipelined: Redis runs a connection's queued commands back to back, and reservations
/// waited behind them (P99 741 → 1192 µs at one connection with four in flight). Calls of
/// 32 cost Redis 12% more script time per request at 64 connections than calls of 8
/// (BENCHMARKS.md, sixth round), so calls grow only when a flush holds more than
/// `SETTLE_CALLS_PER_FLUSH` calls of 8: the calls, one after another, must keep up.
const SETTLE_BATCH: usize = 8;
/// ≈ 12 ms of calls of 8 against a local Redis: a flush then ends well within the next
/// gathering window.
const SETTLE_CALLS_PER_FLUSH: usize = 48;

fn settle_chunk(queued: usize) -> usize {
    queued
        .div_ceil(SETTLE_CALLS_PER_FLUSH)
        .clamp(SETTLE_BATCH, MAX_BATCH)
}

/// Settlements in flight at once on a cluster, where each goes scope by scope.
const CLUSTER_SETTLES_IN_FLIGHT: usize = 16;

pub struct RedisStore {
    backend: Backend,
    /// Concurrent reservations leave together as one script call (single node; in a
    /// cluster, calls for different scopes go to different nodes and are not combined).
    /// Settlements come in calls of their own (`settle_many`), so a reservation, on the
    /// request path, carries no settlement work.
    reservations: Combiner<Call, Vec<i64>>,
    script: Script,
    catalog_script: Script,
    rollup_script: Script,
    prefix: String,
    timeout: Duration,
    /// Passwords from the URLs, scrubbed from every error message.
    secrets: Vec<String>,
    /// The millisecond (Redis's `TIME`) the last reservation was decided at, so the
    /// comparison with the memory store can give it that very instant: a call reaches
    /// Redis some milliseconds after any clock read before it, and a rate limit's clock
    /// keeps such an offset for the rest of a run.
    #[cfg(test)]
    last_decided_ms: std::sync::atomic::AtomicU64,
}

/// One scope reserved on the way through a cluster reservation.
struct Held {
    scope: usize,
    /// What the scope holds, as the script counts it.
    amount: u64,
    reply: RawAdmission,
}

/// What the script answered to one reservation (of all scopes, or of one in a cluster).
#[derive(Debug)]
enum Reply {
    Refused(RawRefusal),
    Admitted(RawAdmission),
}

#[derive(Debug)]
struct RawRefusal {
    now_ms: u64,
    scope: usize,
    kind: i64,
    budget: usize,
    /// Used nano-USD for a budget, µs to wait for a rate limit.
    value: u64,
}

#[derive(Debug)]
struct RawAdmission {
    now_ms: u64,
    output: u64,
    lowered: bool,
    /// spent + reserved of every budget, in request order.
    used: Vec<u64>,
    /// (scope, budget, used before this request) of each shadow budget overrun.
    shadows: Vec<(usize, usize, u64)>,
}

impl RedisStore {
    /// Connects to one Redis. `prefix` starts every key; `timeout` bounds every call.
    pub async fn connect(
        url: &str,
        prefix: &str,
        timeout: Duration,
    ) -> Result<RedisStore, StoreError> {
        let secrets = password_of(url).into_iter().collect::<Vec<_>>();
        let scrub = |e: redis::RedisError| store_error(&e, &secrets);
        let client = redis::Client::open(url).map_err(scrub)?;
        // Few, quick reconnection attempts: while Redis is down a call should fail within
        // the timeout, and the next call starts another attempt anyway.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(timeout);
        let connecting = ConnectionManager::new_with_config(client.clone(), config.clone());
        let manager = bounded(timeout, &secrets, connecting).await?;
        let node = SingleNode {
            client,
            config,
            current: RwLock::new((manager, 0)),
            timeouts_in_a_row: AtomicU32::new(0),
        };
        Ok(RedisStore::new(
            Backend::Single(Box::new(node)),
            prefix,
            timeout,
            secrets,
        ))
    }

    /// Connects to a Redis Cluster through any of its nodes.
    pub async fn connect_cluster(
        urls: &[String],
        prefix: &str,
        timeout: Duration,
    ) -> Result<RedisStore, StoreError> {
        let secrets = urls
            .iter()
            .filter_map(|u| password_of(u))
            .collect::<Vec<_>>();
        let client = ClusterClientBuilder::new(urls.iter().map(String::as_str))
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(1)
            .build()
            .map_err(|e| store_error(&e, &secrets))?;
        let conn = bounded(timeout, &secrets, client.get_async_connection()).await?;
        Ok(RedisStore::new(
            Backend::Cluster(conn),
            prefix,
            timeout,
            secrets,
        ))
    }

    fn new(backend: Backend, prefix: &str, timeout: Duration, secrets: Vec<String>) -> RedisStore {
        RedisStore {
            backend,
            reservations: Combiner::new(MAX_BATCH),
            script: Script::new(SCRIPT),
            catalog_script: Script::new(CATALOG_SCRIPT),
            rollup_script: Script::new(ROLLUP_SCRIPT),
            prefix: prefix.to_string(),
            timeout,
            secrets,
            #[cfg(test)]
            last_decided_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The shared usage rollups' keys share one hash tag, like the catalog's.
    fn rollup_key(&self, name: &str) -> String {
        format!("{}{{usage}}:{name}", self.prefix)
    }

    /// The admin catalog's keys share one hash tag, so its script runs on one cluster node.
    fn catalog_key(&self, name: &str) -> String {
        format!("{}{{catalog}}:{name}", self.prefix)
    }

    /// `<prefix>{<scope>}:`, the start of every key of a scope.
    fn base(&self, scope: &str) -> String {
        format!("{}{{{}}}:", self.prefix, scope)
    }

    /// The keys of `scopes`, in the order the script reads them.
    fn keys(&self, scopes: &[&str]) -> Args {
        let mut keys = Args::with_capacity(scopes.len() * SCOPE_KEYS.len());
        for scope in scopes {
            for k in SCOPE_KEYS {
                keys.scope_key(&self.prefix, scope, k);
            }
        }
        keys
    }

    /// Runs one script command; `scopes` gives the keys, `args` follow the command name.
    async fn run<T: redis::FromRedisValue>(
        &self,
        command: &str,
        scopes: &[&str],
        args: Vec<String>,
    ) -> Result<T, StoreError> {
        let mut all = Args::with_capacity(args.len() + 1);
        all.str(command);
        for a in &args {
            all.str(a);
        }
        self.eval(&evalsha(
            self.script.get_hash(),
            &[&self.keys(scopes)],
            &[&all],
        ))
        .await
    }

    /// Runs a script command built by `evalsha`. On NOSCRIPT (Redis restarted, `SCRIPT
    /// FLUSH`) it loads the script and sends the command again, within the same timeout.
    async fn eval<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        let (mut conn, generation) = self.backend.connection();
        let call = async {
            match cmd.query_async(&mut conn).await {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    self.script.load_async(&mut conn).await?;
                    cmd.query_async(&mut conn).await
                }
                other => other,
            }
        };
        self.within(generation, call).await
    }

    /// One reservation's script reply; on a single node combined with concurrent calls.
    async fn reserve_call(&self, call: Call) -> Result<Vec<i64>, StoreError> {
        if let Backend::Cluster(_) = self.backend {
            return self.run_one("reserve", call).await;
        }
        let run = |calls: Vec<Call>| async move {
            match self.run_batch(&[], &calls).await {
                Ok((_, reserved)) => reserved.into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e); calls.len()],
            }
        };
        self.reservations.submit(call, run).await
    }

    /// Settlements of a single node, in script calls one after another (`settle_chunk`
    /// each). After a call finds Redis unreachable, the rest are not tried (each would wait
    /// out the timeout); a script error fails only its own call.
    async fn settle_calls(&self, calls: &[Call]) -> Vec<Result<(), StoreError>> {
        let mut out = Vec::with_capacity(calls.len());
        for chunk in calls.chunks(settle_chunk(calls.len())) {
            if gave_up_after_unreachable(&mut out, calls.len()) {
                break;
            }
            match self.run_batch(chunk, &[]).await {
                Ok((settled, _)) => out.extend(settled.iter().map(|_| Ok(()))),
                Err(e) => out.extend(chunk.iter().map(|_| Err(e.clone()))),
            }
        }
        out
    }

    /// One `batch` script call: the settlements, then the reservations. Replies: per
    /// settlement the number of scopes it settled, per reservation its reply.
    async fn run_batch(
        &self,
        settles: &[Call],
        reserves: &[Call],
    ) -> Result<(Vec<i64>, Vec<Vec<i64>>), StoreError> {
        let (mut settle_head, mut reserve_head) = (Args::default(), Args::default());
        settle_head.str("batch").num(settles.len() as u64);
        reserve_head.num(reserves.len() as u64);
        // KEYS: settlements' then reservations'; ARGV likewise, each part after its count.
        let keys: Vec<&Args> = settles.iter().chain(reserves).map(|c| &c.keys).collect();
        let mut args: Vec<&Args> = Vec::with_capacity(settles.len() + reserves.len() + 2);
        args.push(&settle_head);
        args.extend(settles.iter().map(|c| &c.args));
        args.push(&reserve_head);
        args.extend(reserves.iter().map(|c| &c.args));
        let cmd = evalsha(self.script.get_hash(), &keys, &args);
        let reply = self.eval::<Vec<u8>>(&cmd).await?;
        match decode_batch(&reply) {
            Some((settled, reserved))
                if settled.len() == settles.len() && reserved.len() == reserves.len() =>
            {
                Ok((settled, reserved))
            }
            Some(_) => Err(StoreError::Internal(format!(
                "wrong reply count to a batch of {}",
                settles.len() + reserves.len()
            ))),
            None => {
                let shown = String::from_utf8_lossy(&reply[..reply.len().min(200)]).into_owned();
                Err(StoreError::Internal(format!(
                    "malformed reply from the store script: {shown}"
                )))
            }
        }
    }

    /// One script call of `command` for a single request (a cluster, where calls for
    /// different scopes go to different nodes and are not combined).
    async fn run_one<T: redis::FromRedisValue>(
        &self,
        command: &str,
        call: Call,
    ) -> Result<T, StoreError> {
        let mut head = Args::default();
        head.str(command).num(1);
        let cmd = evalsha(self.script.get_hash(), &[&call.keys], &[&head, &call.args]);
        let replies: Vec<T> = self.eval(&cmd).await?;
        replies
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::Internal("no reply".into()))
    }

    /// Bounds a call by the timeout and lets a single node notice a dead connection.
    async fn within<T>(
        &self,
        generation: u32,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let result = bounded(self.timeout, &self.secrets, call).await;
        if let Backend::Single(node) = &self.backend {
            node.observe(generation, matches!(result, Err(StoreError::Timeout)));
        }
        result
    }

    /// The reservation script for `scopes` (all of the request's, or one in a cluster).
    async fn reserve_scopes(
        &self,
        req: &ReserveRequest,
        scopes: &[ScopeCheck],
        max_output: u64,
    ) -> Result<Reply, StoreError> {
        let names: Vec<&str> = scopes.iter().map(|c| c.scope.as_str()).collect();
        let budgets: usize = scopes.iter().map(|c| c.budgets.len()).sum();
        let mut args = Args::with_capacity(9 + 5 * scopes.len() + 3 * budgets);
        args.num(scopes.len() as u64)
            .str(&req.request_id)
            .num(exact(req.fixed_nano))
            .num(exact(req.per_output_nano))
            .num(exact(max_output))
            .num(exact(req.min_output_tokens))
            .num(exact(req.tokens))
            .num(exact(req.requests.max(1)))
            .num(req.lease_ms.min(MAX_LEASE_MS))
            // A cluster's rollback takes back a requests-per-minute step through the lease,
            // and a budget slice's give-back its unused steps.
            .num(u64::from(
                matches!(self.backend, Backend::Cluster(_)) || req.requests > 1,
            ));
        for check in scopes {
            args.scope_key(&self.prefix, &check.scope, "")
                .limit(check.rpm)
                .limit(check.tpm)
                .limit(check.concurrency);
            push_budgets(&mut args, &check.budgets);
        }
        let call = Call {
            keys: self.keys(&names),
            args,
        };
        let raw = self.reserve_call(call).await?;
        let reply = parse_reply(&raw, budgets)?;
        #[cfg(test)]
        self.last_decided_ms.store(
            match &reply {
                Reply::Refused(r) => r.now_ms,
                Reply::Admitted(a) => a.now_ms,
            },
            Ordering::Relaxed,
        );
        Ok(reply)
    }

    async fn reserve_single(&self, req: &ReserveRequest) -> Result<Decision, StoreError> {
        match self
            .reserve_scopes(req, &req.scopes, req.max_output_tokens)
            .await?
        {
            Reply::Refused(r) => refusal(req, &r).map(Decision::Refused),
            Reply::Admitted(a) => admission(req, &a, a.lowered.then_some(a.output)),
        }
    }

    /// Cluster: scope by scope in request order, rolling back on refusal or error.
    async fn reserve_scoped(&self, req: &ReserveRequest) -> Result<Decision, StoreError> {
        let mut output = exact(req.max_output_tokens);
        let mut lowered = false;
        let mut held = Vec::new();
        for (i, check) in req.scopes.iter().enumerate() {
            let reply = self.reserve_scopes(req, std::slice::from_ref(check), output);
            match reply.await {
                Err(e) => {
                    // This scope's outcome is unknown and left to its lease; the others are known.
                    self.roll_back(req, &held).await;
                    return Err(e);
                }
                Ok(Reply::Refused(mut r)) => {
                    self.roll_back(req, &held).await;
                    r.scope = i;
                    return refusal(req, &r).map(Decision::Refused);
                }
                Ok(Reply::Admitted(mut a)) => {
                    if a.lowered {
                        (output, lowered) = (a.output, true);
                    }
                    a.shadows.iter_mut().for_each(|s| s.0 = i);
                    held.push(Held {
                        scope: i,
                        amount: lua_amount(req, output),
                        reply: a,
                    });
                }
            }
        }
        let merged = self.finish_scoped(req, held, output).await?;
        admission(req, &merged, lowered.then_some(output))
    }

    /// Shrinks the scopes reserved before a later one clamped the output further, and
    /// merges every scope's statuses as one admission.
    async fn finish_scoped(
        &self,
        req: &ReserveRequest,
        held: Vec<Held>,
        output: u64,
    ) -> Result<RawAdmission, StoreError> {
        let amount = lua_amount(req, output);
        let mut merged = RawAdmission {
            now_ms: 0,
            output,
            lowered: false,
            used: Vec::new(),
            shadows: Vec::new(),
        };
        for h in held {
            let a = if h.amount > amount {
                self.shrink(req, h.scope, amount).await?
            } else {
                h.reply
            };
            merged.now_ms = merged.now_ms.max(a.now_ms);
            merged.used.extend(a.used);
            merged.shadows.extend(a.shadows);
        }
        Ok(merged)
    }

    /// Lowers scope `i`'s reservation to `amount`; returns its fresh statuses.
    async fn shrink(
        &self,
        req: &ReserveRequest,
        i: usize,
        amount: u64,
    ) -> Result<RawAdmission, StoreError> {
        let check = &req.scopes[i];
        let mut args = Args::with_capacity(5 + 3 * check.budgets.len());
        args.str("shrink")
            .str(&req.request_id)
            .num(amount)
            .scope_key(&self.prefix, &check.scope, "");
        push_budgets(&mut args, &check.budgets);
        let keys = self.keys(&[check.scope.as_str()]);
        let raw: Vec<i64> = self
            .eval(&evalsha(self.script.get_hash(), &[&keys], &[&args]))
            .await?;
        match parse_reply(&raw, check.budgets.len())? {
            Reply::Admitted(mut a) => {
                a.shadows.iter_mut().for_each(|s| s.0 = i);
                Ok(a)
            }
            Reply::Refused(_) => Err(StoreError::Internal("shrink cannot refuse".into())),
        }
    }

    /// Best effort: a scope that cannot be rolled back now is released by its lease expiry.
    async fn roll_back(&self, req: &ReserveRequest, held: &[Held]) {
        for h in held {
            let scope = req.scopes[h.scope].scope.as_str();
            let args = vec![req.request_id.clone(), self.base(scope)];
            let _: Result<i64, StoreError> = self.run("release", &[scope], args).await;
        }
    }

    /// A settlement's script call for `scopes`: all of the request's on a single node, one
    /// of them in a cluster.
    fn settle_call(&self, s: &Settlement, scopes: &[&str]) -> Call {
        let mut args = Args::with_capacity(6 + scopes.len());
        let back = s.unused_steps.unwrap_or(UnusedSteps { unused: 0, of: 0 });
        args.num(scopes.len() as u64)
            .str(&s.request_id)
            .num(exact(s.cost_nano))
            .num(exact(s.tokens))
            .num(exact(back.unused))
            .num(exact(back.of));
        for scope in scopes {
            args.scope_key(&self.prefix, scope, "");
        }
        Call {
            keys: self.keys(scopes),
            args,
        }
    }

    /// Cluster: `CLUSTER_SETTLES_IN_FLIGHT` settlements at once. After a whole wave finds
    /// its nodes unreachable, the rest are not tried (each wave would wait out the timeout).
    async fn settle_cluster(&self, batch: &[Settlement]) -> Vec<Result<(), StoreError>> {
        let mut out = Vec::with_capacity(batch.len());
        for wave in batch.chunks(CLUSTER_SETTLES_IN_FLIGHT) {
            let results = join_all(wave.iter().map(|s| self.settle_scoped(s))).await;
            let down = results
                .iter()
                .all(|r| r.as_ref().is_err_and(is_unreachable));
            out.extend(results);
            if down && gave_up_after_unreachable(&mut out, batch.len()) {
                break;
            }
        }
        out
    }

    /// Cluster: scope by scope, the scopes at once. Each scope has its own exactly-once
    /// marker, so a failed scope can be settled again without counting the others twice.
    async fn settle_scoped(&self, s: &Settlement) -> Result<(), StoreError> {
        let calls = s.scopes.iter().map(|scope| {
            let call = self.settle_call(s, &[scope.as_str()]);
            self.run_one::<i64>("settle", call)
        });
        let results = join_all(calls).await;
        results
            .into_iter()
            .find_map(Result::err)
            .map_or(Ok(()), Err)
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn reserve(&self, req: &ReserveRequest) -> Result<Decision, StoreError> {
        match self.backend {
            Backend::Single(_) => self.reserve_single(req).await,
            Backend::Cluster(_) => self.reserve_scoped(req).await,
        }
    }

    fn needs_settling(&self, s: &Settlement) -> bool {
        needs_settling(matches!(self.backend, Backend::Cluster(_)), s)
    }

    async fn settle(&self, s: &Settlement) -> Result<(), StoreError> {
        let mut results = self.settle_many(std::slice::from_ref(s)).await;
        results.pop().unwrap_or(Ok(()))
    }

    async fn settle_many(&self, batch: &[Settlement]) -> Vec<Result<(), StoreError>> {
        if let Backend::Cluster(_) = self.backend {
            return self.settle_cluster(batch).await;
        }
        let scopes: Vec<Vec<&str>> = batch.iter().map(leased_scopes).collect();
        let calls: Vec<Call> = batch
            .iter()
            .zip(&scopes)
            .filter(|(_, scopes)| !scopes.is_empty())
            .map(|(s, scopes)| self.settle_call(s, scopes))
            .collect();
        let mut results = self.settle_calls(&calls).await.into_iter();
        scopes
            .iter()
            .map(|scopes| {
                if scopes.is_empty() {
                    return Ok(());
                }
                let unanswered = || StoreError::Internal("no result for a settlement".into());
                results.next().unwrap_or_else(|| Err(unanswered()))
            })
            .collect()
    }

    async fn spent(&self, scope: &str, period: Period) -> Result<u64, StoreError> {
        let args = vec![self.base(scope), period_code(period).to_string()];
        let spent: String = self.run("spent", &[scope], args).await?;
        spent
            .parse()
            .map_err(|_| StoreError::Internal(format!("spent is not a number: {spent}")))
    }

    async fn claim_once(&self, scope: &str, name: &str, ttl_ms: u64) -> Result<bool, StoreError> {
        let (mut conn, generation) = self.backend.connection();
        let mut cmd = redis::cmd("SET");
        cmd.arg(format!("{}once:{name}", self.base(scope)))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms.max(1));
        let set: Option<String> = self.within(generation, cmd.query_async(&mut conn)).await?;
        Ok(set.is_some())
    }

    async fn catalog_write(
        &self,
        kind: &str,
        id: &str,
        doc: Option<&str>,
        only_if_absent: bool,
    ) -> Result<bool, StoreError> {
        let mode = match (doc, only_if_absent) {
            (None, _) => "del",
            (Some(_), true) => "nx",
            (Some(_), false) => "set",
        };
        let mut invocation = self.catalog_script.prepare_invoke();
        invocation
            .key(self.catalog_key("docs"))
            .key(self.catalog_key("version"))
            .arg(crate::catalog::CatalogDocs::field(kind, id))
            .arg(mode)
            .arg(doc.unwrap_or(""));
        let (mut conn, generation) = self.backend.connection();
        let changed: i64 = self
            .within(generation, invocation.invoke_async(&mut conn))
            .await?;
        Ok(changed == 1)
    }

    async fn catalog_version(&self) -> Result<u64, StoreError> {
        let (mut conn, generation) = self.backend.connection();
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.catalog_key("version"));
        let v: Option<u64> = self.within(generation, cmd.query_async(&mut conn)).await?;
        Ok(v.unwrap_or(0))
    }

    async fn catalog_load(&self) -> Result<crate::catalog::CatalogDocs, StoreError> {
        // The version is read first: a write that lands in between is picked up by the
        // next poll, never missed.
        let version = self.catalog_version().await?;
        let (mut conn, generation) = self.backend.connection();
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.catalog_key("docs"));
        let all: Vec<(String, String)> =
            self.within(generation, cmd.query_async(&mut conn)).await?;
        Ok(crate::catalog::CatalogDocs::from_fields(version, all))
    }

    async fn rollups_add(
        &self,
        batch: &str,
        rows: &crate::ledger::Rollups,
    ) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut invocation = self.rollup_script.prepare_invoke();
        invocation
            .key(self.rollup_key(&format!("batch:{batch}")))
            .key(self.rollup_key("days"))
            .arg(ROLLUP_BATCH_MEMORY_MS);
        for (day, day_rows) in rows {
            invocation.key(self.rollup_key(&format!("d{day}")));
            let mut pairs = Vec::new();
            for (dims, totals) in day_rows {
                let dims =
                    serde_json::to_string(dims).map_err(|e| StoreError::Internal(e.to_string()))?;
                for (name, n) in totals.fields() {
                    if n > 0 {
                        pairs.push((format!("{dims}{FIELD_SEP}{name}"), n));
                    }
                }
            }
            invocation.arg(*day).arg(pairs.len());
            for (field, n) in pairs {
                invocation.arg(field).arg(n);
            }
        }
        let (mut conn, generation) = self.backend.connection();
        let _: i64 = self
            .within(generation, invocation.invoke_async(&mut conn))
            .await?;
        Ok(())
    }

    async fn rollups_read(
        &self,
        start_day: u64,
        end_day: u64,
    ) -> Result<Option<crate::ledger::Rollups>, StoreError> {
        let (mut conn, generation) = self.backend.connection();
        let mut cmd = redis::cmd("ZRANGEBYSCORE");
        cmd.arg(self.rollup_key("days")).arg(start_day).arg(end_day);
        let days: Vec<u64> = self.within(generation, cmd.query_async(&mut conn)).await?;
        let mut rollups = crate::ledger::Rollups::new();
        for day in days {
            let mut cmd = redis::cmd("HGETALL");
            cmd.arg(self.rollup_key(&format!("d{day}")));
            let fields: Vec<(String, u64)> =
                self.within(generation, cmd.query_async(&mut conn)).await?;
            let rows = rollups.entry(day).or_default();
            for (field, n) in fields {
                let parsed = field.rsplit_once(FIELD_SEP).and_then(|(dims, name)| {
                    Some((
                        serde_json::from_str::<crate::ledger::Dims>(dims).ok()?,
                        name,
                    ))
                });
                match parsed {
                    Some((dims, name)) => {
                        rows.entry(dims).or_default().add_field(name, n);
                    }
                    None => log::warn!("shared rollups: skipping an unreadable field"),
                }
            }
        }
        Ok(Some(rollups))
    }

    async fn healthy(&self) -> bool {
        let (mut conn, generation) = self.backend.connection();
        let ping = redis::cmd("PING");
        let ping = ping.query_async::<String>(&mut conn);
        self.within(generation, ping).await.is_ok()
    }
}

/// Awaits a Redis call within `timeout`, mapping failures to store errors.
async fn bounded<T>(
    timeout: Duration,
    secrets: &[String],
    call: impl Future<Output = RedisResult<T>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(StoreError::Timeout),
        Ok(Err(e)) => Err(store_error(&e, secrets)),
        Ok(Ok(v)) => Ok(v),
    }
}

/// A Redis error as a store error, passwords scrubbed. What Redis refused to run or failed
/// running (a script error, a key of the wrong type, a reply the gateway cannot read) is
/// `Internal`: asking again elsewhere in the same batch can still succeed. The rest
/// (connection, loading, busy, cluster down) is `Unavailable`.
fn store_error(e: &redis::RedisError, secrets: &[String]) -> StoreError {
    use redis::{ErrorKind, ServerErrorKind};
    let mut message = e.to_string();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        message = message.replace(secret.as_str(), "***");
    }
    let failed_running = match e.kind() {
        ErrorKind::Server(kind) => matches!(
            kind,
            ServerErrorKind::ResponseError
                | ServerErrorKind::ExecAbort
                | ServerErrorKind::CrossSlot
                | ServerErrorKind::NoPerm
        ),
        ErrorKind::Extension => e.code() != Some("BUSY"),
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => true,
        _ => false,
    };
    if failed_running {
        StoreError::Internal(message)
    } else {
        StoreError::Unavailable(message)
    }
}

fn is_unreachable(e: &StoreError) -> bool {
    matches!(e, StoreError::Unavailable(_) | StoreError::Timeout)
}

/// If the last result found Redis unreachable, fills `out` up to `total` with its error
/// (the rest untried: each would wait out the timeout) and says so.
fn gave_up_after_unreachable(out: &mut Vec<Result<(), StoreError>>, total: usize) -> bool {
    let Some(Err(e)) = out.last().filter(|r| r.as_ref().is_err_and(is_unreachable)) else {
        return false;
    };
    let e = e.clone();
    out.resize_with(total, || Err(e.clone()));
    true
}

fn password_of(url: &str) -> Option<String> {
    let info = url.into_connection_info().ok()?;
    info.redis_settings().password().map(str::to_string)
}

fn exact(n: u64) -> u64 {
    n.min(MAX_EXACT)
}

/// The amount the script holds for `output` tokens (clamped as the script's inputs are).
fn lua_amount(req: &ReserveRequest, output: u64) -> u64 {
    let per_output = exact(req.per_output_nano).saturating_mul(exact(output));
    exact(exact(req.fixed_nano).saturating_add(per_output))
}

fn period_code(p: Period) -> &'static str {
    match p {
        Period::Daily => "d",
        Period::Monthly => "m",
        Period::Total => "t",
    }
}

/// A single node's scopes to settle: those with a lease. A scope limiting requests per
/// minute only got none (`needs_lease` in the script), so a settlement of nothing but
/// those needs no call.
fn leased_scopes(s: &Settlement) -> Vec<&str> {
    let scopes = s.scopes.iter().enumerate();
    scopes
        .filter(|(i, _)| !s.is_rpm_only(*i))
        .map(|(_, scope)| scope.as_str())
        .collect()
}

/// `Store::needs_settling` for Redis: a cluster settles every scope (each has a lease).
pub(super) fn needs_settling(cluster: bool, s: &Settlement) -> bool {
    cluster || (0..s.scopes.len()).any(|i| !s.is_rpm_only(i))
}

fn push_budgets(args: &mut Args, budgets: &[BudgetCheck]) {
    args.num(budgets.len() as u64);
    for b in budgets {
        let enforcement = match b.enforcement {
            Enforcement::Block => "block",
            Enforcement::Clamp => "clamp",
            Enforcement::Shadow => "shadow",
        };
        args.str(period_code(b.period))
            .num(exact(b.cap_nano))
            .str(enforcement);
    }
}

fn malformed(raw: &[i64]) -> StoreError {
    StoreError::Internal(format!("unexpected reply from the store script: {raw:?}"))
}

/// Parses the script's reply; `budgets` is how many budgets the call covered.
fn parse_reply(raw: &[i64], budgets: usize) -> Result<Reply, StoreError> {
    let n = |i: usize| {
        raw.get(i)
            .and_then(|v| u64::try_from(*v).ok())
            .ok_or_else(|| malformed(raw))
    };
    let index = |i: usize| n(i).and_then(|v| usize::try_from(v).map_err(|_| malformed(raw)));
    if raw.first() == Some(&REFUSED) {
        return Ok(Reply::Refused(RawRefusal {
            now_ms: n(1)?,
            scope: index(2)?,
            kind: raw.get(3).copied().ok_or_else(|| malformed(raw))?,
            budget: index(4)?,
            value: n(5)?,
        }));
    }
    // After the header: one used value per budget, then (scope, budget, used) triples.
    let tail = raw.get(4..).ok_or_else(|| malformed(raw))?;
    if tail.len() < budgets || !(tail.len() - budgets).is_multiple_of(3) {
        return Err(malformed(raw));
    }
    let used = (4..4 + budgets).map(n).collect::<Result<Vec<_>, _>>()?;
    let shadows = (4 + budgets..raw.len())
        .step_by(3)
        .map(|i| Ok((index(i)?, index(i + 1)?, n(i + 2)?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(Reply::Admitted(RawAdmission {
        now_ms: n(1)?,
        output: n(2)?,
        lowered: n(3)? == 1,
        used,
        shadows,
    }))
}

fn admission(
    req: &ReserveRequest,
    a: &RawAdmission,
    lowered_to: Option<u64>,
) -> Result<Decision, StoreError> {
    let output = lowered_to.unwrap_or(req.max_output_tokens);
    let mut used = a.used.iter().copied();
    let mut budgets = Vec::new();
    for check in &req.scopes {
        for b in &check.budgets {
            budgets.push(BudgetStatus {
                scope: check.scope.clone(),
                period: b.period,
                cap_nano: b.cap_nano,
                used_nano: used.next().unwrap_or(0),
                reset_ms: b.period.window(a.now_ms).1,
            });
        }
    }
    let shadow_refusals = a
        .shadows
        .iter()
        .map(|&(scope, budget, used)| {
            let raw = RawRefusal {
                now_ms: a.now_ms,
                scope,
                kind: KIND_BUDGET,
                budget,
                value: used,
            };
            refusal(req, &raw)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Decision::Admitted {
        output_tokens: output,
        reserved_nano: req
            .fixed_nano
            .saturating_add(req.per_output_nano.saturating_mul(output)),
        budgets,
        shadow_refusals,
    })
}

fn refusal(req: &ReserveRequest, r: &RawRefusal) -> Result<Refusal, StoreError> {
    let check = req
        .scopes
        .get(r.scope)
        .ok_or_else(|| StoreError::Internal("refusal names an unknown scope".into()))?;
    let rate = |kind, limit: Option<u64>, retry_after_ms| Refusal {
        scope: check.scope.clone(),
        kind,
        limit: limit.unwrap_or(0),
        remaining: 0,
        retry_after_ms,
    };
    Ok(match r.kind {
        KIND_BUDGET => {
            let b = check
                .budgets
                .get(r.budget)
                .ok_or_else(|| StoreError::Internal("refusal names an unknown budget".into()))?;
            let reset = b.period.window(r.now_ms).1;
            Refusal {
                scope: check.scope.clone(),
                kind: LimitKind::Budget(b.period),
                limit: b.cap_nano,
                remaining: b.cap_nano.saturating_sub(r.value),
                retry_after_ms: reset.map_or(0, |t| t.saturating_sub(r.now_ms)),
            }
        }
        KIND_CONCURRENCY => rate(LimitKind::Concurrency, check.concurrency, 1000),
        KIND_RPM => rate(
            LimitKind::RequestsPerMinute,
            check.rpm,
            r.value.div_ceil(1000),
        ),
        KIND_TPM => rate(
            LimitKind::TokensPerMinute,
            check.tpm,
            r.value.div_ceil(1000),
        ),
        other => {
            return Err(StoreError::Internal(format!(
                "unknown refusal kind {other}"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::{system_clock, MemoryStore};
    use crate::store::rpm_only_mask;
    use crate::store::suite::request;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    use std::time::Instant;

    const TIMEOUT: Duration = Duration::from_secs(2);

    /// A private redis-server on a free port (never the shared 6379), killed on drop.
    struct TestRedis {
        child: Child,
        port: u16,
    }

    impl TestRedis {
        fn start() -> TestRedis {
            TestRedis::on_port(free_port(), &[])
        }

        fn on_port(port: u16, extra: &[&str]) -> TestRedis {
            crate::store::suite::clear_of_midnight();
            let child = Command::new("/usr/bin/redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--bind",
                    "127.0.0.1",
                ])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server");
            let server = TestRedis { child, port };
            let deadline = Instant::now() + Duration::from_secs(10);
            while !pings(port) {
                assert!(
                    Instant::now() < deadline,
                    "redis-server on {port} did not answer PING"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            server
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/", self.port)
        }

        /// Freezes (`-STOP`) or thaws (`-CONT`) the server: its socket stays open, silent.
        fn signal(&self, signal: &str) {
            let status = Command::new("kill")
                .args([signal, &self.child.id().to_string()])
                .status()
                .expect("kill");
            assert!(status.success(), "kill {signal}");
        }
    }

    impl Drop for TestRedis {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn free_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        listener.local_addr().expect("local addr").port()
    }

    fn pings(port: u16) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    /// A raw command, as an operator would type it into redis-cli.
    async fn command<T: redis::FromRedisValue>(url: &str, args: &[&str]) -> T {
        let client = redis::Client::open(url).expect("client");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let mut cmd = redis::cmd(args[0]);
        cmd.arg(&args[1..]);
        cmd.query_async(&mut conn).await.expect("command")
    }

    async fn store(url: &str, prefix: &str) -> Arc<dyn Store> {
        Arc::new(
            RedisStore::connect(url, prefix, TIMEOUT)
                .await
                .expect("connect"),
        )
    }

    fn admitted(d: &Result<Decision, StoreError>) -> bool {
        matches!(d, Ok(Decision::Admitted { .. }))
    }

    fn settlement(id: &str, scope: &str, cost: u64) -> Settlement {
        Settlement {
            unused_steps: None,
            rpm_only: 0,
            request_id: id.into(),
            scopes: vec![scope.into()],
            cost_nano: cost,
            tokens: 1,
        }
    }

    #[tokio::test]
    async fn shared_suite_redis() {
        let server = TestRedis::start();
        let url = server.url();
        // The clock argument is ignored: Redis uses its own TIME.
        crate::store::suite::run_all(|_clock| {
            let url = url.clone();
            async move { store(&url, "tg:").await }
        })
        .await;
    }

    #[tokio::test]
    async fn a_flushed_script_is_loaded_again_without_a_failed_call() {
        let server = TestRedis::start();
        let store = store(&server.url(), "tg:").await;
        assert!(admitted(
            &store.reserve(&request("r1", "flush", 1_000, 100)).await
        ));
        let _: String = command(&server.url(), &["SCRIPT", "FLUSH"]).await;
        assert!(admitted(
            &store.reserve(&request("r2", "flush", 1_000, 100)).await
        ));
        store
            .settle(&settlement("r1", "flush", 50))
            .await
            .expect("settle after flush");
        assert_eq!(
            store.spent("flush", Period::Monthly).await.expect("spent"),
            50
        );
    }

    #[tokio::test]
    async fn a_killed_redis_fails_fast_and_the_store_recovers_by_itself() {
        let server = TestRedis::start();
        let port = server.port;
        let timeout = Duration::from_millis(300);
        let store = RedisStore::connect(&server.url(), "tg:", timeout)
            .await
            .expect("connect");
        assert!(admitted(
            &store.reserve(&request("r1", "kill", 1_000, 100)).await
        ));
        drop(server);
        for i in 0..5 {
            let started = Instant::now();
            let result = store
                .reserve(&request(&format!("down{i}"), "kill", 1_000, 100))
                .await;
            assert!(result.is_err(), "Redis is down: {result:?}");
            // One timeout, not two: bounded by twice it (room for a loaded machine's timer).
            assert!(
                started.elapsed() < 2 * timeout,
                "took {:?}",
                started.elapsed()
            );
        }
        assert!(!store.healthy().await);
        let _server = TestRedis::on_port(port, &[]);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if admitted(&store.reserve(&request("back", "kill", 1_000, 100)).await) {
                break;
            }
            assert!(Instant::now() < deadline, "the store did not reconnect");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(store.healthy().await);
    }

    #[tokio::test]
    async fn a_silent_redis_times_out_and_its_connection_is_replaced() {
        let server = TestRedis::start();
        let timeout = Duration::from_millis(200);
        let store = RedisStore::connect(&server.url(), "tg:", timeout)
            .await
            .expect("connect");
        assert!(admitted(
            &store.reserve(&request("r1", "stall", 1_000, 100)).await
        ));
        server.signal("-STOP");
        for i in 0..STALE_AFTER_TIMEOUTS {
            let started = Instant::now();
            let result = store
                .reserve(&request(&format!("stalled{i}"), "stall", 1_000, 100))
                .await;
            assert!(matches!(result, Err(StoreError::Timeout)), "{result:?}");
            assert!(started.elapsed() < 2 * timeout, "{:?}", started.elapsed());
        }
        server.signal("-CONT");
        let Backend::Single(node) = &store.backend else {
            panic!("a single node")
        };
        assert_eq!(node.connection().1, 1, "a fresh connection manager");
        // Whether the stalled reservations ran is unknown; if they did, their leases expire.
        assert!(admitted(
            &store.reserve(&request("r2", "stall", 1_000, 100)).await
        ));
    }

    #[tokio::test]
    async fn a_lease_expires_in_real_time() {
        let server = TestRedis::start();
        let store = store(&server.url(), "tg:").await;
        let short = |id: &str| {
            let mut r = request(id, "lease", 1_000, 1_000);
            r.lease_ms = 300;
            r
        };
        assert!(admitted(&store.reserve(&short("r1")).await));
        assert!(
            !admitted(&store.reserve(&short("r2")).await),
            "r1 holds the whole cap"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            admitted(&store.reserve(&short("r3")).await),
            "r1's lease expired"
        );
        // r1 settles late: its spend still counts, in the current period.
        store
            .settle(&settlement("r1", "lease", 10))
            .await
            .expect("settle");
        assert_eq!(
            store.spent("lease", Period::Monthly).await.expect("spent"),
            10
        );
    }

    #[tokio::test]
    async fn many_leases_expiring_at_once_are_all_released() {
        let server = TestRedis::start();
        let url = server.url();
        let store = store(&url, "tg:").await;
        let leases = 600;
        let short = |id: String, fixed: u64| {
            let mut r = request(&id, "many", leases * 10, fixed);
            r.scopes[0].concurrency = Some(leases);
            // The 600 reservations must all be made within it, on a loaded machine too.
            r.lease_ms = 6_000;
            r
        };
        for i in 0..leases {
            assert!(admitted(&store.reserve(&short(format!("r{i}"), 10)).await));
        }
        assert!(!admitted(&store.reserve(&short("over".into(), 10)).await));
        // From the last reservation, not the first: on a loaded machine making 600 can
        // take longer than the 200 ms margin, and the last leases would still hold.
        let made = Instant::now();
        tokio::time::sleep_until((made + Duration::from_millis(6_200)).into()).await;
        assert!(
            admitted(&store.reserve(&short("whole".into(), leases * 10)).await),
            "every expired lease gave its reservation back"
        );
        let mut records: Vec<String> = command(&url, &["HKEYS", "tg:{many}:lease"]).await;
        records.sort();
        assert_eq!(
            records,
            ["whole", "~"],
            "the live lease and the placeholder"
        );
        let in_flight: Option<String> = command(&url, &["HGET", "tg:{many}:rl", "in_flight"]).await;
        assert_eq!(
            in_flight.as_deref(),
            Some("1"),
            "every expired lease gave its slot back"
        );
        let members: u64 = command(&url, &["ZCARD", "tg:{many}:leases"]).await;
        assert_eq!(members, 2, "the live lease and the placeholder");
    }

    #[tokio::test]
    async fn keys_carry_the_prefix_and_the_scope_hash_tag_and_expire() {
        let server = TestRedis::start();
        let url = server.url();
        let store = store(&url, "gw1:").await;
        let mut req = request("r1", "customer:acme", 1_000_000, 100);
        let c = &mut req.scopes[0];
        c.budgets.push(BudgetCheck {
            period: Period::Daily,
            cap_nano: 1_000_000,
            enforcement: Enforcement::Clamp,
        });
        c.budgets.push(BudgetCheck {
            period: Period::Total,
            cap_nano: 1_000_000,
            enforcement: Enforcement::Shadow,
        });
        (c.rpm, c.tpm, c.concurrency) = (Some(100), Some(10_000), Some(10));
        assert!(admitted(&store.reserve(&req).await));
        store
            .settle(&settlement("r1", "customer:acme", 80))
            .await
            .expect("settle");
        req.request_id = "r2".into();
        assert!(admitted(&store.reserve(&req).await));

        let mut keys: Vec<String> = command(&url, &["KEYS", "*"]).await;
        keys.sort();
        let now = crate::record::unix_ms(std::time::SystemTime::now());
        let day = Period::Daily.window(now).0;
        let month = Period::Monthly.window(now).0;
        let base = "gw1:{customer:acme}:";
        let mut expected: Vec<String> = [
            "done:r1".to_string(),
            "lease".into(),
            "leases".into(),
            format!("p:{day}"),
            format!("p:{month}"),
            "p:t".into(),
            "reserved".into(),
            "rl".into(),
        ]
        .iter()
        .map(|k| format!("{base}{k}"))
        .collect();
        expected.sort();
        assert_eq!(keys, expected);
        for key in &keys {
            let ttl: i64 = command(&url, &["PTTL", key]).await;
            if key.ends_with(":p:t") {
                assert_eq!(ttl, -1, "the total period never expires");
            } else {
                assert!(ttl > 0, "{key} has no expiry");
            }
        }
        let monthly_ttl: i64 = command(&url, &["PTTL", &format!("{base}p:{month}")]).await;
        assert!(
            monthly_ttl > 400 * 86_400_000,
            "kept 400 days past the month"
        );
        // Scope state lives a day past the last lease (60 s here), plus the hour of slack
        // that spares pushing the expiry on every call; all four keys expire together.
        let mut ttls = Vec::new();
        for key in ["leases", "lease", "reserved", "rl"] {
            let ttl: i64 = command(&url, &["PTTL", &format!("{base}{key}")]).await;
            assert!(
                (86_400_000 + 3_600_000..86_400_000 + 3_600_000 + 65_000).contains(&ttl),
                "{key}: {ttl}"
            );
            ttls.push(ttl);
        }
        assert!(ttls
            .iter()
            .max()
            .zip(ttls.iter().min())
            .is_some_and(|(a, b)| a - b < 100));
    }

    async fn evalsha_calls(url: &str) -> u64 {
        let stats: String = command(url, &["INFO", "commandstats"]).await;
        stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn settlements_go_in_batches_and_count_once() {
        let server = TestRedis::start();
        let url = server.url();
        let store = store(&url, "tg:").await;
        for i in 0..40 {
            let id = format!("r{i}");
            assert!(admitted(
                &store.reserve(&request(&id, "many", 100_000, 70)).await
            ));
        }
        let batch: Vec<Settlement> = (0..40)
            .map(|i| settlement(&format!("r{i}"), "many", 10 + i))
            .collect();
        let before = evalsha_calls(&url).await;
        let results = store.settle_many(&batch).await;
        assert_eq!(results.len(), 40);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(
            evalsha_calls(&url).await - before,
            40u64.div_ceil(SETTLE_BATCH as u64),
            "40 settlements in script calls of up to {SETTLE_BATCH}"
        );
        let total: u64 = (0..40).map(|i| 10 + i).sum();
        let spent = || store.spent("many", Period::Monthly);
        assert_eq!(spent().await.expect("spent"), total);
        // Sent again (an outcome that was unknown): nothing counts twice.
        assert!(store.settle_many(&batch).await.iter().all(Result::is_ok));
        assert_eq!(spent().await.expect("spent"), total);
        // The reservations were released: all of the cap but the spend is free again.
        let d = store
            .reserve(&request("last", "many", total + 70, 70))
            .await;
        assert!(admitted(&d), "{d:?}");
    }

    #[tokio::test]
    async fn a_script_error_fails_its_own_call_and_the_rest_still_land() {
        let server = TestRedis::start();
        let url = server.url();
        let store = store(&url, "tg:").await;
        // A key of the wrong type makes the script fail on the first settlement.
        let set: String = command(&url, &["SET", "tg:{broken}:lease", "x"]).await;
        assert_eq!(set, "OK");
        let mut batch = vec![settlement("b", "broken", 1)];
        batch.extend((0..15).map(|i| settlement(&format!("f{i}"), "fine", 10 + i)));
        let results = store.settle_many(&batch).await;
        let first_call = SETTLE_BATCH;
        for r in &results[..first_call] {
            assert!(matches!(r, Err(StoreError::Internal(_))), "{r:?}");
        }
        assert!(
            results[first_call..].iter().all(Result::is_ok),
            "{results:?}"
        );
        let landed: u64 = (first_call as u64 - 1..15).map(|i| 10 + i).sum();
        assert_eq!(
            store.spent("fine", Period::Monthly).await.expect("spent"),
            landed,
            "the second call's settlements landed"
        );
    }

    #[tokio::test]
    async fn a_silent_redis_stops_a_flush_after_one_timeout() {
        let server = TestRedis::start();
        let timeout = Duration::from_millis(200);
        let store = RedisStore::connect(&server.url(), "tg:", timeout)
            .await
            .expect("connect");
        let batch: Vec<Settlement> = (0..3 * SETTLE_BATCH)
            .map(|i| settlement(&format!("s{i}"), "silent", 1))
            .collect();
        server.signal("-STOP");
        let started = Instant::now();
        let results = store.settle_many(&batch).await;
        let took = started.elapsed();
        server.signal("-CONT");
        assert_eq!(results.len(), batch.len());
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(StoreError::Timeout))),
            "{results:?}"
        );
        assert!(
            took < 2 * timeout,
            "three calls' worth, one timeout: {took:?}"
        );
    }

    #[tokio::test]
    async fn two_gateways_admit_exactly_the_affordable_count() {
        let server = TestRedis::start();
        let gateways = [
            store(&server.url(), "tg:").await,
            store(&server.url(), "tg:").await,
        ];
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let store = gateways[i % 2].clone();
                let req = request(&format!("r{i}"), "shared", 10_000, 70);
                tokio::spawn(async move { admitted(&store.reserve(&req).await) })
            })
            .collect();
        let mut n = 0;
        for t in tasks {
            n += usize::from(t.await.expect("task"));
        }
        assert_eq!(n, 142, "10000 / 70 = 142 affordable reservations");
        // Concurrent reservations were combined: fewer script calls than reservations.
        let calls = evalsha_calls(&server.url()).await;
        assert!(calls > 0, "evalsha calls in INFO commandstats");
        assert!(
            calls < 150,
            "200 concurrent reservations took {calls} script calls"
        );
    }

    #[tokio::test]
    async fn lua_periods_match_rust() {
        let server = TestRedis::start();
        let url = server.url();
        let store = RedisStore::connect(&url, "tg:", TIMEOUT)
            .await
            .expect("connect");
        let day = 86_400_000u64;
        // Month ends, leap days, century years, around now and far out.
        let mut instants = vec![
            0,
            day - 1,
            1_795_435_200_000,
            1_798_761_599_999,
            1_798_761_600_000,
        ];
        instants.extend((0..3000).map(|i| 10_957 * day + i * 17 * day + i * 7_919));
        instants.extend([
            951_782_400_000,
            951_868_800_000,
            4_107_542_400_000,
            4_107_628_800_000,
        ]);
        for t in instants {
            let got: Vec<String> = store
                .run("window", &[], vec![t.to_string()])
                .await
                .expect("window");
            let (d, d_end) = Period::Daily.window(t);
            let (m, m_end) = Period::Monthly.window(t);
            let want = [
                d.to_string(),
                d_end.unwrap_or(0).to_string(),
                m.to_string(),
                m_end.unwrap_or(0).to_string(),
            ];
            assert_eq!(got, want, "at {t}");
        }
    }

    /// Requests at the edge of exact doubles decide as in the memory store.
    #[tokio::test]
    async fn large_amounts_decide_like_memory() {
        let server = TestRedis::start();
        let redis = store(&server.url(), "tg:").await;
        let memory = MemoryStore::ephemeral(system_clock());
        let mut cases = Vec::new();
        for (cap, fixed, per, max) in [
            (MAX_EXACT - 1, 1, 3, u64::MAX),
            (MAX_EXACT - 1, 7, 1_000_003, 1 << 40),
            (MAX_EXACT, 0, 1, 1 << 52),
            (123_456_789_012_345, 5, 97, u64::MAX / 2),
        ] {
            let mut r = request(
                &format!("big{}", cases.len()),
                &format!("big{}", cases.len()),
                cap,
                fixed,
            );
            r.scopes[0].budgets[0].enforcement = Enforcement::Clamp;
            (r.per_output_nano, r.max_output_tokens, r.min_output_tokens) = (per, max, 1);
            cases.push(r);
        }
        for r in cases {
            let want = memory.reserve(&r).await.expect("memory");
            let got = redis.reserve(&r).await.expect("redis");
            assert_same(&got, &want, &format!("{r:?}"));
        }
    }

    /// Retry hints depend on the instant of each call (and Redis's rate clocks count µs
    /// where memory's count ms): they must agree within a few ms, everything else exactly.
    fn assert_same(got: &Decision, want: &Decision, context: &str) {
        assert_eq!(without_retry(got), without_retry(want), "{context}");
        for (g, w) in retry_hints(got).into_iter().zip(retry_hints(want)) {
            assert!(g.abs_diff(w) <= 50, "retry hints {g} vs {w}: {context}");
        }
    }

    fn retry_hints(d: &Decision) -> Vec<u64> {
        match d {
            Decision::Refused(r) => vec![r.retry_after_ms],
            Decision::Admitted {
                shadow_refusals, ..
            } => shadow_refusals.iter().map(|r| r.retry_after_ms).collect(),
        }
    }

    fn without_retry(d: &Decision) -> Decision {
        let zero = |r: &Refusal| Refusal {
            retry_after_ms: 0,
            ..r.clone()
        };
        match d {
            Decision::Refused(r) => Decision::Refused(zero(r)),
            Decision::Admitted {
                output_tokens,
                reserved_nano,
                budgets,
                shadow_refusals,
            } => Decision::Admitted {
                output_tokens: *output_tokens,
                reserved_nano: *reserved_nano,
                budgets: budgets.clone(),
                shadow_refusals: shadow_refusals.iter().map(zero).collect(),
            },
        }
    }

    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
    }

    fn scope_config(name: &str) -> ScopeCheck {
        let budget = |period, cap_nano, enforcement| BudgetCheck {
            period,
            cap_nano,
            enforcement,
        };
        let mut c = ScopeCheck {
            scope: name.to_string(),
            ..ScopeCheck::default()
        };
        match name {
            "A" => {
                c.budgets = vec![
                    budget(Period::Monthly, 150_000, Enforcement::Block),
                    budget(Period::Daily, 300_000, Enforcement::Clamp),
                ];
            }
            "B" => {
                c.budgets = vec![
                    budget(Period::Total, 80_000, Enforcement::Shadow),
                    budget(Period::Monthly, 150_000, Enforcement::Clamp),
                ];
                (c.rpm, c.concurrency) = (Some(30), Some(10));
            }
            "C" => {
                c.budgets = vec![
                    budget(Period::Daily, 500_000, Enforcement::Block),
                    budget(Period::Daily, 120_000, Enforcement::Clamp),
                ];
                c.tpm = Some(60_000);
            }
            // Requests per minute only: no lease on a single node, left out of settlements.
            _ => c.rpm = Some(40),
        }
        c
    }

    /// Which rules a random mix of requests exercised.
    #[derive(Debug, Default)]
    struct Coverage {
        refusals: std::collections::HashMap<String, usize>,
        clamped: usize,
        shadowed: usize,
        admitted: usize,
    }

    impl Coverage {
        fn count(&mut self, req: &ReserveRequest, d: &Decision) {
            match d {
                Decision::Refused(r) => *self.refusals.entry(r.kind.to_string()).or_default() += 1,
                Decision::Admitted {
                    output_tokens,
                    shadow_refusals,
                    ..
                } => {
                    self.admitted += 1;
                    self.clamped += usize::from(*output_tokens < req.max_output_tokens);
                    self.shadowed += usize::from(!shadow_refusals.is_empty());
                }
            }
        }

        fn complete(&self) -> bool {
            self.refusals.len() >= 5 && self.clamped > 0 && self.shadowed > 0 && self.admitted > 0
        }
    }

    /// Redis's clock in ms, read early in a millisecond (so that a script sent next most
    /// likely runs within the same one).
    async fn redis_ms(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
        loop {
            let time: Vec<String> = redis::cmd("TIME")
                .query_async(&mut *conn)
                .await
                .expect("TIME");
            let part = |i: usize| time.get(i).and_then(|t| t.parse::<u64>().ok());
            let (s, us) = part(0).zip(part(1)).expect("TIME");
            if us % 1000 < 200 {
                return s * 1000 + us / 1000;
            }
            std::thread::sleep(Duration::from_micros(1000 - us % 1000));
        }
    }

    /// A random mix of reservations and settlements decides identically in both stores.
    #[tokio::test]
    async fn decides_exactly_like_the_memory_store() {
        let server = TestRedis::start();
        let redis = RedisStore::connect(&server.url(), "tg:", TIMEOUT)
            .await
            .expect("connect");
        // The memory store reads Redis's clock: for a reservation, the millisecond the
        // script decided at; for a settlement, one read just before it.
        let now_ms = Arc::new(AtomicU64::new(0));
        let clock = now_ms.clone();
        let memory = MemoryStore::ephemeral(Arc::new(move || clock.load(Ordering::Relaxed)));
        let mut clock_conn = redis::Client::open(server.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let mut rng = Lcg(42);
        let mut ids: Vec<(String, Vec<String>, u32)> = Vec::new();
        let mut seen = Coverage::default();
        for op in 0..400 {
            if rng.below(3) == 0 && !ids.is_empty() {
                now_ms.store(redis_ms(&mut clock_conn).await, Ordering::Relaxed);
                // Mostly a request still in flight, sometimes one settled before (a repeat).
                let pick = rng.below(ids.len() as u64) as usize;
                let (id, scopes, rpm_only) = if rng.below(5) == 0 {
                    ids[pick].clone()
                } else {
                    ids.swap_remove(pick)
                };
                let s = Settlement {
                    unused_steps: None,
                    rpm_only,
                    request_id: id,
                    scopes,
                    cost_nano: rng.below(4_000),
                    tokens: rng.below(3_000),
                };
                redis.settle(&s).await.expect("redis settle");
                memory.settle(&s).await.expect("memory settle");
                continue;
            }
            let first = ["A", "B", "C"][rng.below(3) as usize];
            let mut scopes = vec![scope_config(first)];
            if rng.below(2) == 0 {
                let second = ["A", "B", "C", "D"][rng.below(4) as usize];
                if second != first {
                    scopes.push(scope_config(second));
                }
            }
            let req = ReserveRequest {
                request_id: format!("q{op}"),
                scopes,
                fixed_nano: rng.below(2_000),
                per_output_nano: rng.below(20),
                max_output_tokens: rng.below(1_500),
                min_output_tokens: rng.below(3),
                tokens: rng.below(3_000),
                requests: if rng.below(8) == 0 {
                    1 + rng.below(4)
                } else {
                    1
                },
                lease_ms: 60_000,
            };
            let got = redis.reserve(&req).await.expect("redis");
            now_ms.store(
                redis.last_decided_ms.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
            let want = memory.reserve(&req).await.expect("memory");
            assert_same(&got, &want, &format!("op {op}: {req:?}"));
            seen.count(&req, &got);
            if let Decision::Admitted { .. } = got {
                ids.push((
                    req.request_id.clone(),
                    req.scopes.iter().map(|c| c.scope.clone()).collect(),
                    rpm_only_mask(&req.scopes),
                ));
            }
        }
        assert!(
            seen.complete(),
            "the mix must exercise every rule: {seen:?}"
        );
        for scope in ["A", "B", "C", "D"] {
            for period in [Period::Daily, Period::Monthly, Period::Total] {
                let want = memory.spent(scope, period).await.expect("memory spent");
                assert_eq!(
                    redis.spent(scope, period).await.expect("redis spent"),
                    want,
                    "{scope} {period:?}"
                );
            }
        }
    }

    #[test]
    fn error_messages_never_carry_the_password() {
        let secrets = password_of("redis://user:hunter2@127.0.0.1:1/")
            .into_iter()
            .collect::<Vec<_>>();
        assert_eq!(secrets, ["hunter2"]);
        let e = redis::RedisError::from((
            redis::ErrorKind::Client,
            "bad",
            "auth hunter2 failed".to_string(),
        ));
        assert!(!store_error(&e, &secrets).to_string().contains("hunter2"));
    }

    // --- Redis Cluster -------------------------------------------------------------------

    /// Three masters on free ports (each port + 10000 is its cluster bus), joined into one
    /// cluster; killed on drop.
    struct TestCluster {
        nodes: Vec<TestRedis>,
        dir: PathBuf,
    }

    impl TestCluster {
        fn start() -> TestCluster {
            let dir = std::env::temp_dir().join(format!(
                "tollgate-cluster-{}-{}",
                std::process::id(),
                free_port()
            ));
            std::fs::create_dir_all(&dir).expect("cluster dir");
            let nodes: Vec<TestRedis> = (0..3)
                .map(|i| {
                    let port = free_cluster_port();
                    let conf = dir.join(format!("nodes-{i}.conf"));
                    let conf = conf.to_str().expect("utf-8 path");
                    let dir = dir.to_str().expect("utf-8 path");
                    TestRedis::on_port(
                        port,
                        &[
                            "--cluster-enabled",
                            "yes",
                            "--cluster-config-file",
                            conf,
                            "--dir",
                            dir,
                        ],
                    )
                })
                .collect();
            let addrs: Vec<String> = nodes
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.port))
                .collect();
            let status = Command::new("redis-cli")
                .arg("--cluster")
                .arg("create")
                .args(&addrs)
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("redis-cli --cluster create");
            assert!(status.success(), "cluster create failed");
            let cluster = TestCluster { nodes, dir };
            cluster.wait_ok();
            cluster
        }

        fn urls(&self) -> Vec<String> {
            self.nodes.iter().map(TestRedis::url).collect()
        }

        fn wait_ok(&self) {
            let deadline = Instant::now() + Duration::from_secs(30);
            for node in &self.nodes {
                loop {
                    let out = Command::new("redis-cli")
                        .args(["-p", &node.port.to_string(), "cluster", "info"])
                        .output()
                        .expect("redis-cli cluster info");
                    if String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok") {
                        break;
                    }
                    assert!(Instant::now() < deadline, "cluster did not become ok");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    impl Drop for TestCluster {
        fn drop(&mut self) {
            self.nodes.clear();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A free port whose cluster bus port (+10000) is free as well.
    fn free_cluster_port() -> u16 {
        loop {
            let port = free_port();
            if port <= 55_535 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
                return port;
            }
        }
    }

    /// Which of the three masters (slots split evenly by `--cluster create`) owns a scope.
    async fn node_of(url: &str, scope: &str) -> i64 {
        let slot: i64 = command(url, &["CLUSTER", "KEYSLOT", &format!("tg:{{{scope}}}:rl")]).await;
        match slot {
            ..=5460 => 0,
            5461..=10922 => 1,
            _ => 2,
        }
    }

    /// Two scope names whose keys live on different nodes.
    async fn scopes_on_two_nodes(url: &str, stem: &str) -> (String, String) {
        let first = format!("{stem}:0");
        let home = node_of(url, &first).await;
        for i in 1.. {
            let other = format!("{stem}:{i}");
            if node_of(url, &other).await != home {
                return (first, other);
            }
        }
        unreachable!("some scope hashes to another node")
    }

    async fn cluster_store(urls: &[String]) -> Arc<dyn Store> {
        Arc::new(
            RedisStore::connect_cluster(urls, "tg:", TIMEOUT)
                .await
                .expect("connect cluster"),
        )
    }

    /// More settlements than one wave (`CLUSTER_SETTLES_IN_FLIGHT`), scopes on two nodes:
    /// every one lands once, and a repeat of the whole batch changes nothing.
    #[tokio::test]
    async fn cluster_settlements_land_in_waves_exactly_once() {
        let cluster = TestCluster::start();
        let urls = cluster.urls();
        let store = cluster_store(&urls).await;
        let (a, b) = scopes_on_two_nodes(&urls[0], "wave").await;
        let batch: Vec<Settlement> = (0..CLUSTER_SETTLES_IN_FLIGHT as u64 * 2 + 5)
            .map(|i| Settlement {
                unused_steps: None,
                rpm_only: 0,
                request_id: format!("w{i}"),
                scopes: vec![a.clone(), b.clone()],
                cost_nano: 1 + i,
                tokens: 1,
            })
            .collect();
        let want: u64 = batch.iter().map(|s| s.cost_nano).sum();
        for round in 0..2 {
            let results = store.settle_many(&batch).await;
            assert_eq!(results.len(), batch.len());
            assert!(results.iter().all(Result::is_ok), "{results:?}");
            for scope in [&a, &b] {
                let spent = store.spent(scope, Period::Monthly).await.expect("spent");
                assert_eq!(spent, want, "{scope}, round {round}");
            }
        }
    }

    #[tokio::test]
    async fn shared_suite_redis_cluster() {
        let cluster = TestCluster::start();
        let urls = cluster.urls();
        crate::store::suite::run_all(|_clock| {
            let urls = urls.clone();
            async move { cluster_store(&urls).await }
        })
        .await;
    }

    /// Scopes on different nodes: a refusal in one rolls the others back completely, and a
    /// tighter clamp in a later scope shrinks what the earlier one holds.
    #[tokio::test]
    async fn cluster_rolls_back_and_shrinks_across_nodes() {
        let cluster = TestCluster::start();
        let store = cluster_store(&cluster.urls()).await;
        let urls = cluster.urls();
        let (a, b) = scopes_on_two_nodes(&urls[0], "team").await;
        let (a, b) = (a.as_str(), b.as_str());
        // b refuses on rate: a's budget, in-flight slot and rpm allowance come back.
        let mut req = request("r1", a, 1_000, 600);
        (req.scopes[0].concurrency, req.scopes[0].rpm) = (Some(1), Some(1));
        req.scopes.push(request("x", b, 1_000, 0).scopes.remove(0));
        req.scopes[1].concurrency = Some(0);
        let refused = store.reserve(&req).await;
        assert!(
            matches!(refused, Ok(Decision::Refused(ref r)) if r.scope == b && r.kind == LimitKind::Concurrency)
        );
        let mut alone = request("r2", a, 1_000, 1_000);
        (alone.scopes[0].concurrency, alone.scopes[0].rpm) = (Some(1), Some(1));
        assert!(
            admitted(&store.reserve(&alone).await),
            "nothing of r1 is held in {a}"
        );
        store.settle(&settlement("r2", a, 0)).await.expect("settle");

        // a affords 80 output tokens, b (clamp) only 30: a is shrunk to hold 30 tokens' worth.
        let (c, d) = scopes_on_two_nodes(&urls[0], "clamp").await;
        let (c, d) = (c.as_str(), d.as_str());
        let mut req = request("r3", c, 800, 0);
        req.scopes[0].budgets[0].enforcement = Enforcement::Clamp;
        req.scopes.push(request("x", d, 300, 0).scopes.remove(0));
        req.scopes[1].budgets[0].enforcement = Enforcement::Clamp;
        (
            req.per_output_nano,
            req.max_output_tokens,
            req.min_output_tokens,
        ) = (10, 100, 1);
        match store.reserve(&req).await {
            Ok(Decision::Admitted {
                output_tokens,
                reserved_nano,
                budgets,
                ..
            }) => {
                assert_eq!((output_tokens, reserved_nano), (30, 300));
                assert_eq!(
                    budgets.iter().map(|b| b.used_nano).collect::<Vec<_>>(),
                    [300, 300]
                );
            }
            other => panic!("expected a clamped admission, got {other:?}"),
        }
        assert!(
            admitted(&store.reserve(&request("r4", c, 800, 500)).await),
            "{c} holds 300, not 800"
        );

        // A scope limiting requests per minute only keeps a lease in a cluster, so that a
        // refusal elsewhere gives its step back.
        let (e, f) = scopes_on_two_nodes(&urls[0], "rpm").await;
        let rpm_only = |id: &str| {
            let mut r = request(id, &e, 0, 0);
            r.scopes[0].budgets.clear();
            r.scopes[0].rpm = Some(1);
            r
        };
        let mut req = rpm_only("r5");
        req.scopes.push(request("x", &f, 1_000, 0).scopes.remove(0));
        req.scopes[1].concurrency = Some(0);
        assert!(matches!(
            store.reserve(&req).await,
            Ok(Decision::Refused(_))
        ));
        assert!(
            admitted(&store.reserve(&rpm_only("r6")).await),
            "r5's step in {e} came back"
        );
        assert!(!admitted(&store.reserve(&rpm_only("r7")).await), "1 rpm");
    }

    /// A budget slice (`store::slices`) takes N requests-per-minute steps at once, in a
    /// scope limited by requests per minute only too (it gets a lease for it), and its
    /// give-back returns the unused ones: the script's side of what the slices' tests check
    /// on the memory store.
    #[tokio::test]
    async fn a_slice_takes_n_steps_and_its_give_back_returns_the_unused_ones() {
        let server = TestRedis::start();
        let store = store(&server.url(), "tg:").await;
        let rpm_only = |id: &str, requests: u64| {
            let mut r = request(id, "rpm-slice", 0, 0);
            r.scopes[0].budgets.clear();
            // A step every 2.5 s: no step comes back while the test reserves (at 240 a
            // minute one did, on a loaded machine, within the 239 round trips below).
            r.scopes[0].rpm = Some(24);
            r.requests = requests;
            r
        };
        let slice = rpm_only("slice-1", 4);
        assert!(admitted(&store.reserve(&slice).await));
        let give_back = Settlement {
            unused_steps: Some(UnusedSteps { unused: 3, of: 4 }),
            request_id: slice.request_id.clone(),
            scopes: vec![slice.scopes[0].scope.clone()],
            cost_nano: 0,
            tokens: 0,
            rpm_only: 0,
        };
        assert!(store.needs_settling(&give_back));
        assert!(store.settle(&give_back).await.is_ok());
        // 24 a minute, one step used by the slice: 23 more now, one by one.
        let mut more = 0;
        for i in 0..30 {
            if !admitted(&store.reserve(&rpm_only(&format!("one{i}"), 1)).await) {
                break;
            }
            more += 1;
        }
        assert_eq!(more, 23);

        // A slice whose give-back landed first (its call was cut off while queued) is
        // refused when it arrives: it would otherwise stay parked until its lease ends.
        let late = rpm_only("slice-2", 4);
        let early_give_back = Settlement {
            request_id: late.request_id.clone(),
            ..give_back
        };
        assert!(store.settle(&early_give_back).await.is_ok());
        assert!(matches!(
            store.reserve(&late).await,
            Ok(Decision::Refused(_))
        ));
        let keys: Vec<String> = command(&server.url(), &["KEYS", "tg:*p:*"]).await;
        assert!(
            keys.is_empty(),
            "zero-cost give-backs open no period: {keys:?}"
        );
    }

    /// On a single node such a scope keeps no lease and is left out of the settlement;
    /// a settlement of nothing else makes no call. Its limit still holds.
    #[tokio::test]
    async fn a_scope_limiting_requests_per_minute_only_keeps_no_lease() {
        let server = TestRedis::start();
        let url = server.url();
        let store = store(&url, "tg:").await;
        let mut req = request("r1", "team", 1_000, 100);
        let mut key = request("x", "key", 0, 0).scopes.remove(0);
        (key.budgets, key.rpm) = (Vec::new(), Some(1));
        req.scopes.push(key);
        assert!(admitted(&store.reserve(&req).await));
        let records: Vec<String> = command(&url, &["HKEYS", "tg:{key}:lease"]).await;
        assert_eq!(records, ["~"], "only the placeholder");
        let records: Vec<String> = command(&url, &["HKEYS", "tg:{team}:lease"]).await;
        assert_eq!(records.len(), 2, "the budgeted scope's lease: {records:?}");

        let settlement = Settlement {
            unused_steps: None,
            request_id: "r1".into(),
            scopes: vec!["team".into(), "key".into()],
            cost_nano: 40,
            tokens: 1,
            rpm_only: rpm_only_mask(&req.scopes),
        };
        assert_eq!(settlement.rpm_only, 0b10);
        store.settle(&settlement).await.expect("settle");
        assert_eq!(
            store.spent("team", Period::Monthly).await.expect("spent"),
            40
        );
        for period in [Period::Daily, Period::Monthly, Period::Total] {
            assert_eq!(store.spent("key", period).await.expect("spent"), 0);
        }
        let calls = evalsha_calls(&url).await;
        let only_rpm = Settlement {
            unused_steps: None,
            request_id: "r2".into(),
            scopes: vec!["key".into()],
            rpm_only: 1,
            ..settlement
        };
        assert!(store.needs_settling(&settlement));
        assert!(!store.needs_settling(&only_rpm), "nothing to queue");
        assert!(store
            .settle_many(&[only_rpm])
            .await
            .iter()
            .all(Result::is_ok));
        assert_eq!(evalsha_calls(&url).await, calls, "no call for it");

        req.request_id = "r3".into();
        req.scopes.remove(0);
        assert!(
            matches!(store.reserve(&req).await, Ok(Decision::Refused(r)) if r.kind == LimitKind::RequestsPerMinute),
            "its limit still holds"
        );
    }
}
