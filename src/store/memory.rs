//! The embedded store: all state in one process, behind one mutex, so admission is
//! trivially atomic. Durability: every reservation and settlement is appended to a
//! journal, flushed and fsynced at most `SYNC_INTERVAL` later (the durability window,
//! well under a second); on start the journal is replayed, then compacted into a
//! snapshot. Rate-limit state (GCRA clocks, in-flight counts) is not journaled: after a
//! restart the minute's allowance starts fresh, and in-flight leases are restored only as
//! budget reservations.

// Maps keyed by what the gateway makes (request ids, period ids) use foldhash: they are
// looked up several times per request and SipHash was a measurable share of it
// (BENCHMARKS.md, "Third round: instructions and allocations"). The map of scopes grows
// with caller-chosen names (`customer:…`), so it keeps std's SipHash against HashDoS.
use foldhash::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{
    BudgetStatus, Decision, Enforcement, LimitKind, Period, PeriodId, Refusal, ReserveRequest,
    Settlement, Store, StoreError,
};

/// How often the journal is flushed and fsynced.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(200);
const MINUTE_US: u64 = 60_000_000;
/// Settled request ids are remembered this long to keep settlement exactly-once.
const SETTLED_MEMORY_MS: u64 = 24 * 3_600_000;

pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| crate::record::unix_ms(std::time::SystemTime::now()))
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Lease {
    amount: u64,
    tokens: u64,
    /// Period ids the reservation counted in.
    periods: Vec<PeriodId>,
    expires_ms: u64,
    concurrent: bool,
    /// The requests-per-minute step it took (µs), for a budget slice's give-back. Not
    /// journaled: neither are the rate clocks it corrects.
    #[serde(skip)]
    rpm_step_us: u64,
}

#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
struct Counter {
    spent: u64,
    reserved: u64,
}

#[derive(Debug, Default)]
struct ScopeState {
    periods: HashMap<String, Counter>,
    leases: HashMap<String, Lease>,
    rpm_tat_us: u64,
    tpm_tat_us: u64,
    in_flight: u64,
}

impl ScopeState {
    /// Releases leases whose time is up: their reservations no longer hold budget.
    fn expire(&mut self, now_ms: u64) {
        let expired: Vec<String> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires_ms <= now_ms)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            if let Some(lease) = self.leases.remove(&id) {
                self.release(&lease);
            }
        }
    }

    fn release(&mut self, lease: &Lease) {
        for p in &lease.periods {
            if let Some(c) = self.periods.get_mut(p.as_str()) {
                c.reserved = c.reserved.saturating_sub(lease.amount);
            }
        }
        if lease.concurrent {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
    }

    fn used(&self, period_id: &str) -> u64 {
        self.periods
            .get(period_id)
            .map_or(0, |c| c.spent.saturating_add(c.reserved))
    }
}

/// The whole state and the admission logic, free of I/O and clocks.
#[derive(Debug, Default)]
pub struct Ledger {
    scopes: std::collections::HashMap<String, ScopeState>,
    /// Settled request ids (exactly-once), forgotten after `SETTLED_MEMORY_MS`: a set for
    /// lookups and the same ids in settlement order, so expiry is O(1) per settlement
    /// rather than a scan of the whole set.
    settled: HashSet<String>,
    settled_order: std::collections::VecDeque<(u64, String)>,
}

/// The entry for `key`, created on first use: the key is copied only then (the usual
/// case, an existing entry, costs lookups and no allocation). Always `Some`.
fn entry_mut<'a, V: Default, S: std::hash::BuildHasher>(
    map: &'a mut std::collections::HashMap<String, V, S>,
    key: &str,
) -> Option<&'a mut V> {
    if !map.contains_key(key) {
        map.insert(key.to_owned(), V::default());
    }
    map.get_mut(key)
}

/// GCRA: may `weight` units pass now, with `per_minute` allowed per minute?
/// Returns the new theoretical arrival time, or how long to wait (µs).
fn gcra(tat_us: u64, now_us: u64, per_minute: u64, weight: u64) -> Result<u64, u64> {
    let interval = MINUTE_US / per_minute.max(1);
    let new_tat = tat_us
        .max(now_us)
        .saturating_add(interval.saturating_mul(weight));
    let ahead = new_tat - now_us;
    if ahead <= MINUTE_US {
        Ok(new_tat)
    } else {
        Err(ahead - MINUTE_US)
    }
}

impl Ledger {
    /// The one admission step; see the module docs of `store` for the rules.
    pub fn decide(&mut self, req: &ReserveRequest, now_ms: u64) -> Decision {
        for check in &req.scopes {
            if let Some(state) = self.scopes.get_mut(&check.scope) {
                state.expire(now_ms);
            }
        }
        if let Some(refusal) = self.rate_refusal(req, now_ms) {
            return Decision::Refused(refusal);
        }
        let output = match self.affordable_output(req, now_ms) {
            Ok(n) => n,
            Err(refusal) => return Decision::Refused(refusal),
        };
        let amount = req
            .fixed_nano
            .saturating_add(req.per_output_nano.saturating_mul(output));
        let shadow_refusals = self.shadow_refusals(req, now_ms, amount);
        let budgets = self.apply(req, now_ms, amount);
        Decision::Admitted {
            output_tokens: output,
            reserved_nano: amount,
            budgets,
            shadow_refusals,
        }
    }

    fn rate_refusal(&self, req: &ReserveRequest, now_ms: u64) -> Option<Refusal> {
        let now_us = now_ms.saturating_mul(1000);
        for check in &req.scopes {
            let state = self.scopes.get(&check.scope);
            let refuse = |kind, limit, retry_after_ms| Refusal {
                scope: check.scope.clone(),
                kind,
                limit,
                remaining: 0,
                retry_after_ms,
            };
            if let Some(limit) = check.concurrency {
                if state.map_or(0, |s| s.in_flight) >= limit {
                    return Some(refuse(LimitKind::Concurrency, limit, 1000));
                }
            }
            if let Some(rpm) = check.rpm {
                let tat = state.map_or(0, |s| s.rpm_tat_us);
                if let Err(wait) = gcra(tat, now_us, rpm, req.requests.max(1)) {
                    return Some(refuse(
                        LimitKind::RequestsPerMinute,
                        rpm,
                        wait.div_ceil(1000),
                    ));
                }
            }
            if let Some(tpm) = check.tpm {
                let tat = state.map_or(0, |s| s.tpm_tat_us);
                if let Err(wait) = gcra(tat, now_us, tpm, req.tokens) {
                    return Some(refuse(LimitKind::TokensPerMinute, tpm, wait.div_ceil(1000)));
                }
            }
        }
        None
    }

    /// The output tokens the enforced budgets afford, or the refusal of the tightest.
    fn affordable_output(&self, req: &ReserveRequest, now_ms: u64) -> Result<u64, Refusal> {
        let mut output = req.max_output_tokens;
        for check in &req.scopes {
            for b in check
                .budgets
                .iter()
                .filter(|b| b.enforcement != Enforcement::Shadow)
            {
                let (period_id, reset) = b.period.window(now_ms);
                let used = self
                    .scopes
                    .get(&check.scope)
                    .map_or(0, |s| s.used(&period_id));
                let headroom = b.cap_nano.saturating_sub(used);
                let fits = |n: u64| {
                    req.fixed_nano
                        .saturating_add(req.per_output_nano.saturating_mul(n))
                        <= headroom
                };
                if fits(output) {
                    continue;
                }
                // With free output, not fitting means the input side alone is too dear.
                let most = headroom
                    .saturating_sub(req.fixed_nano)
                    .checked_div(req.per_output_nano)
                    .unwrap_or(0);
                let clampable = b.enforcement == Enforcement::Clamp
                    && req.fixed_nano <= headroom
                    && most >= req.min_output_tokens;
                if !clampable {
                    return Err(Refusal {
                        scope: check.scope.clone(),
                        kind: LimitKind::Budget(b.period),
                        limit: b.cap_nano,
                        remaining: headroom,
                        retry_after_ms: reset.map_or(0, |r| r.saturating_sub(now_ms)),
                    });
                }
                output = output.min(most);
            }
        }
        Ok(output)
    }

    fn shadow_refusals(&self, req: &ReserveRequest, now_ms: u64, amount: u64) -> Vec<Refusal> {
        let mut out = Vec::new();
        for check in &req.scopes {
            for b in check
                .budgets
                .iter()
                .filter(|b| b.enforcement == Enforcement::Shadow)
            {
                let (period_id, reset) = b.period.window(now_ms);
                let used = self
                    .scopes
                    .get(&check.scope)
                    .map_or(0, |s| s.used(&period_id));
                if used.saturating_add(amount) > b.cap_nano {
                    out.push(Refusal {
                        scope: check.scope.clone(),
                        kind: LimitKind::Budget(b.period),
                        limit: b.cap_nano,
                        remaining: b.cap_nano.saturating_sub(used),
                        retry_after_ms: reset.map_or(0, |r| r.saturating_sub(now_ms)),
                    });
                }
            }
        }
        out
    }

    fn apply(&mut self, req: &ReserveRequest, now_ms: u64, amount: u64) -> Vec<BudgetStatus> {
        let now_us = now_ms.saturating_mul(1000);
        let mut statuses = Vec::new();
        for check in &req.scopes {
            let Some(state) = entry_mut(&mut self.scopes, &check.scope) else {
                continue;
            };
            let mut periods: Vec<PeriodId> = Vec::with_capacity(check.budgets.len());
            for b in &check.budgets {
                let (period_id, reset_ms) = b.period.window(now_ms);
                // Two budgets of one scope can share a period: reserve in it once.
                let first_in_period = !periods.contains(&period_id);
                if first_in_period {
                    if let Some(c) = entry_mut(&mut state.periods, &period_id) {
                        c.reserved = c.reserved.saturating_add(amount);
                    }
                }
                statuses.push(BudgetStatus {
                    scope: check.scope.clone(),
                    period: b.period,
                    cap_nano: b.cap_nano,
                    used_nano: state.used(&period_id),
                    reset_ms,
                });
                if first_in_period {
                    periods.push(period_id);
                }
            }
            let mut rpm_step_us = 0;
            if let Some(rpm) = check.rpm {
                let before = state.rpm_tat_us.max(now_us);
                state.rpm_tat_us = gcra(state.rpm_tat_us, now_us, rpm, req.requests.max(1))
                    .unwrap_or(state.rpm_tat_us);
                rpm_step_us = state.rpm_tat_us.saturating_sub(before);
            }
            if let Some(tpm) = check.tpm {
                state.tpm_tat_us =
                    gcra(state.tpm_tat_us, now_us, tpm, req.tokens).unwrap_or(state.tpm_tat_us);
            }
            let concurrent = check.concurrency.is_some();
            if concurrent {
                state.in_flight += 1;
            }
            state.leases.insert(
                req.request_id.clone(),
                Lease {
                    amount,
                    tokens: req.tokens,
                    periods,
                    expires_ms: now_ms.saturating_add(req.lease_ms),
                    concurrent,
                    rpm_step_us,
                },
            );
        }
        statuses
    }

    /// Settles once per request id; a repeat is ignored. Returns whether it applied.
    pub fn settle(
        &mut self,
        s: &Settlement,
        now_ms: u64,
        tpm_of: impl Fn(&str) -> Option<u64>,
    ) -> bool {
        while let Some((at, id)) = self.settled_order.front() {
            if now_ms.saturating_sub(*at) < SETTLED_MEMORY_MS {
                break;
            }
            self.settled.remove(id);
            self.settled_order.pop_front();
        }
        if !self.settled.insert(s.request_id.clone()) {
            return false;
        }
        self.settled_order.push_back((now_ms, s.request_id.clone()));
        for scope in &s.scopes {
            let Some(state) = entry_mut(&mut self.scopes, scope) else {
                continue;
            };
            let lease = state.leases.remove(&s.request_id);
            let periods = match &lease {
                Some(l) => {
                    state.release(l);
                    std::borrow::Cow::Borrowed(l.periods.as_slice())
                }
                // No lease (it expired, or the request was admitted while the store was down):
                // the spend still happened; count it in every current period.
                None => [Period::Daily, Period::Monthly, Period::Total]
                    .iter()
                    .map(|p| p.window(now_ms).0)
                    .collect(),
            };
            for p in periods.iter() {
                if let Some(c) = entry_mut(&mut state.periods, p) {
                    c.spent = c.spent.saturating_add(s.cost_nano);
                }
            }
            if let (Some(l), Some(back)) = (&lease, s.unused_steps) {
                state.rpm_tat_us = state
                    .rpm_tat_us
                    .saturating_sub(unused_step_us(l.rpm_step_us, back));
            }
            if let (Some(l), Some(tpm)) = (&lease, tpm_of(scope)) {
                let interval = MINUTE_US / tpm.max(1);
                // Saturating: the tokens are the provider's count, however absurd.
                if s.tokens >= l.tokens {
                    state.tpm_tat_us = state
                        .tpm_tat_us
                        .saturating_add((s.tokens - l.tokens).saturating_mul(interval));
                } else {
                    state.tpm_tat_us = state
                        .tpm_tat_us
                        .saturating_sub((l.tokens - s.tokens).saturating_mul(interval));
                }
            }
        }
        true
    }

    pub fn spent(&self, scope: &str, period: Period, now_ms: u64) -> u64 {
        let id = period.window(now_ms).0;
        self.scopes
            .get(scope)
            .and_then(|s| s.periods.get(id.as_str()))
            .map_or(0, |c| c.spent)
    }
}

/// The part of a slice's requests-per-minute step (`step_us` for `back.of` requests) its
/// unused requests stand for.
pub(super) fn unused_step_us(step_us: u64, back: super::UnusedSteps) -> u64 {
    if back.of == 0 {
        return 0;
    }
    (step_us / back.of).saturating_mul(back.unused.min(back.of))
}

/// One journal line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Entry {
    Reserve {
        scope: String,
        request_id: String,
        lease: Lease,
    },
    Settle {
        request_id: String,
        scopes: Vec<String>,
        cost_nano: u64,
        at_ms: u64,
    },
    Counter {
        scope: String,
        period: String,
        spent: u64,
    },
}

pub struct MemoryStore {
    ledger: Mutex<Ledger>,
    journal: Option<Arc<Mutex<BufWriter<File>>>>,
    clock: Clock,
    /// Keyed by scope, like the ledger's scopes (SipHash).
    tpm_limits: Mutex<std::collections::HashMap<String, u64>>,
    /// `claim_once` claims and when they lapse (not journaled: an alert may repeat after a
    /// restart, never be lost).
    claims: Mutex<std::collections::HashMap<String, u64>>,
    catalog: Mutex<CatalogFile>,
}

/// The admin catalog, written whole to `catalog.json` (through a temporary file, fsynced,
/// then renamed) on every change: admin writes are rare, and a crash leaves either the
/// old file or the new one.
#[derive(Debug, Default, Serialize, Deserialize)]
struct CatalogFile {
    version: u64,
    /// `kind/id` -> document
    docs: std::collections::BTreeMap<String, String>,
    #[serde(skip)]
    path: Option<PathBuf>,
}

impl CatalogFile {
    fn open(path: PathBuf) -> std::io::Result<CatalogFile> {
        let mut file = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => CatalogFile::default(),
            Err(e) => return Err(e),
        };
        file.path = Some(path);
        Ok(file)
    }

    fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let tmp = path.with_extension("json.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(self)?)?;
        f.sync_data()?;
        std::fs::rename(&tmp, path)
    }
}

impl MemoryStore {
    /// A store with no file behind it (tests, benchmarks).
    pub fn ephemeral(clock: Clock) -> MemoryStore {
        MemoryStore {
            ledger: Mutex::new(Ledger::default()),
            journal: None,
            clock,
            tpm_limits: Mutex::new(Default::default()),
            claims: Mutex::new(Default::default()),
            catalog: Mutex::new(CatalogFile::default()),
        }
    }

    /// Opens (or creates) the journal in `dir`, replays it, compacts it, and starts the
    /// background fsync. Must be called inside a tokio runtime.
    pub fn open(dir: &Path, clock: Clock) -> std::io::Result<MemoryStore> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("budgets.journal");
        let mut ledger = Ledger::default();
        if path.exists() {
            replay(&path, &mut ledger)?;
        }
        let file = compact(&path, &ledger)?;
        let catalog = CatalogFile::open(dir.join("catalog.json"))?;
        let journal = Arc::new(Mutex::new(BufWriter::new(file)));
        spawn_syncer(journal.clone());
        Ok(MemoryStore {
            ledger: Mutex::new(ledger),
            journal: Some(journal),
            clock,
            tpm_limits: Mutex::new(Default::default()),
            claims: Mutex::new(Default::default()),
            catalog: Mutex::new(catalog),
        })
    }

    /// Appends whole journal lines, written in one piece under the journal's lock.
    fn append(&self, lines: &[u8]) -> Result<(), StoreError> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        if lines.is_empty() {
            return Ok(());
        }
        let mut w = journal
            .lock()
            .map_err(|_| StoreError::Internal("journal lock poisoned".into()))?;
        w.write_all(lines)
            .map_err(|e| StoreError::Unavailable(format!("journal write: {e}")))
    }
}

fn replay(path: &Path, ledger: &mut Ledger) -> std::io::Result<()> {
    for line in BufReader::new(File::open(path)?).lines() {
        let line = line?;
        // A torn last line from a crash is skipped; everything before it counts.
        let Ok(entry) = serde_json::from_str::<Entry>(&line) else {
            continue;
        };
        match entry {
            Entry::Counter {
                scope,
                period,
                spent,
            } => {
                let s = ledger.scopes.entry(scope).or_default();
                s.periods.entry(period).or_default().spent = spent;
            }
            Entry::Reserve {
                scope,
                request_id,
                mut lease,
            } => {
                let s = ledger.scopes.entry(scope).or_default();
                for p in &lease.periods {
                    let c = s.periods.entry(p.to_string()).or_default();
                    c.reserved = c.reserved.saturating_add(lease.amount);
                }
                lease.concurrent = false;
                s.leases.insert(request_id, lease);
            }
            Entry::Settle {
                request_id,
                scopes,
                cost_nano,
                at_ms,
            } => {
                let s = Settlement {
                    unused_steps: None,
                    rpm_only: 0,
                    request_id,
                    scopes,
                    cost_nano,
                    tokens: 0,
                };
                ledger.settle(&s, at_ms, |_| None);
            }
        }
    }
    Ok(())
}

/// Rewrites the journal as a snapshot: settled counters and live leases.
fn compact(path: &Path, ledger: &Ledger) -> std::io::Result<File> {
    let tmp: PathBuf = path.with_extension("journal.tmp");
    {
        let mut w = BufWriter::new(File::create(&tmp)?);
        for (scope, state) in &ledger.scopes {
            for (period, c) in &state.periods {
                let e = Entry::Counter {
                    scope: scope.clone(),
                    period: period.clone(),
                    spent: c.spent,
                };
                writeln!(
                    w,
                    "{}",
                    serde_json::to_string(&e).map_err(std::io::Error::other)?
                )?;
            }
            for (request_id, lease) in &state.leases {
                let e = Entry::Reserve {
                    scope: scope.clone(),
                    request_id: request_id.clone(),
                    lease: lease.clone(),
                };
                writeln!(
                    w,
                    "{}",
                    serde_json::to_string(&e).map_err(std::io::Error::other)?
                )?;
            }
        }
        w.flush()?;
        w.get_ref().sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    OpenOptions::new().append(true).open(path)
}

fn spawn_syncer(journal: Arc<Mutex<BufWriter<File>>>) {
    // fsync takes milliseconds: it runs on a second handle to the file, outside the lock,
    // so admissions never wait for the disk (they only wait for the buffer's write(2)).
    let sync_handle = journal
        .lock()
        .ok()
        .and_then(|w| w.get_ref().try_clone().ok());
    let weak = Arc::downgrade(&journal);
    drop(journal);
    std::thread::spawn(move || loop {
        std::thread::sleep(SYNC_INTERVAL);
        let Some(j) = weak.upgrade() else { return };
        let flushed = j.lock().map(|mut w| w.flush().is_ok()).unwrap_or(false);
        drop(j);
        if let (true, Some(f)) = (flushed, &sync_handle) {
            let _ = f.sync_data();
        }
    });
}

/// The journal lines of an admitted reservation (one `Entry::Reserve` per scope), written
/// straight from the ledger rather than cloned into entries first.
fn journal_reservation(req: &ReserveRequest, decision: &Decision, ledger: &Ledger) -> Vec<u8> {
    if !matches!(decision, Decision::Admitted { .. }) {
        return Vec::new();
    }
    let mut lines = Vec::with_capacity(256 * req.scopes.len());
    for c in &req.scopes {
        let lease = ledger
            .scopes
            .get(&c.scope)
            .and_then(|s| s.leases.get(&req.request_id));
        if let Some(lease) = lease {
            write_reserve(&mut lines, &c.scope, &req.request_id, lease);
        }
    }
    lines
}

/// `Entry::Reserve` as a journal line, byte for byte what serde writes for it.
fn write_reserve(out: &mut Vec<u8>, scope: &str, request_id: &str, lease: &Lease) {
    let mut o = crate::fastfmt::JsonObject::new(out);
    o.str("op", "reserve");
    o.str("scope", scope);
    o.str("request_id", request_id);
    o.object("lease", |l| {
        l.u64("amount", lease.amount);
        l.u64("tokens", lease.tokens);
        l.strs("periods", &lease.periods);
        l.u64("expires_ms", lease.expires_ms);
        l.bool("concurrent", lease.concurrent);
    });
    o.end();
    out.push(b'\n');
}

/// `Entry::Settle` as a journal line, byte for byte what serde writes for it.
fn write_settle(out: &mut Vec<u8>, s: &Settlement, at_ms: u64) {
    let mut o = crate::fastfmt::JsonObject::new(out);
    o.str("op", "settle");
    o.str("request_id", &s.request_id);
    o.strs("scopes", &s.scopes);
    o.u64("cost_nano", s.cost_nano);
    o.u64("at_ms", at_ms);
    o.end();
    out.push(b'\n');
}

#[async_trait]
impl Store for MemoryStore {
    async fn reserve(&self, req: &ReserveRequest) -> Result<Decision, StoreError> {
        let now = (self.clock)();
        if req.scopes.iter().any(|c| c.tpm.is_some()) {
            if let Ok(mut limits) = self.tpm_limits.lock() {
                for c in &req.scopes {
                    if let Some(t) = c.tpm {
                        limits.insert(c.scope.clone(), t);
                    }
                }
            }
        }
        let (decision, lines) = {
            let mut ledger = self
                .ledger
                .lock()
                .map_err(|_| StoreError::Internal("ledger lock poisoned".into()))?;
            let decision = ledger.decide(req, now);
            let lines = journal_reservation(req, &decision, &ledger);
            (decision, lines)
        };
        // The lines are rendered under the decision's lock (cheaper than copying the
        // leases out of it) and written after it is let go (every request needs that
        // lock). A request's settlement comes after its reservation returns, so its lines
        // stay in order.
        self.append(&lines)?;
        Ok(decision)
    }

    async fn settle(&self, s: &Settlement) -> Result<(), StoreError> {
        let now = (self.clock)();
        // Lock order everywhere: tpm_limits, then ledger.
        let applied = {
            let limits = self
                .tpm_limits
                .lock()
                .map_err(|_| StoreError::Internal("limits lock poisoned".into()))?;
            let mut ledger = self
                .ledger
                .lock()
                .map_err(|_| StoreError::Internal("ledger lock poisoned".into()))?;
            ledger.settle(s, now, |scope| limits.get(scope).copied())
        };
        if applied {
            let mut line = Vec::with_capacity(256);
            write_settle(&mut line, s, now);
            self.append(&line)?;
        }
        Ok(())
    }

    async fn spent(&self, scope: &str, period: Period) -> Result<u64, StoreError> {
        let now = (self.clock)();
        let ledger = self
            .ledger
            .lock()
            .map_err(|_| StoreError::Internal("ledger lock poisoned".into()))?;
        Ok(ledger.spent(scope, period, now))
    }

    fn settles_inline(&self) -> bool {
        true
    }

    /// Writes out the journal's buffer and fsyncs it, instead of leaving the last
    /// `SYNC_INTERVAL` of reservations and settlements to a syncer that stops with the
    /// process.
    fn flush(&self) -> Result<(), StoreError> {
        self.sync()
            .map_err(|e| StoreError::Unavailable(format!("journal flush: {e}")))
    }

    async fn healthy(&self) -> bool {
        true
    }

    async fn claim_once(&self, scope: &str, name: &str, ttl_ms: u64) -> Result<bool, StoreError> {
        let now = (self.clock)();
        let mut claims = self
            .claims
            .lock()
            .map_err(|_| StoreError::Internal("claims lock poisoned".into()))?;
        claims.retain(|_, until| *until > now);
        let key = format!("{scope}\u{0}{name}");
        if claims.contains_key(&key) {
            return Ok(false);
        }
        claims.insert(key, now.saturating_add(ttl_ms));
        Ok(true)
    }

    async fn catalog_write(
        &self,
        kind: &str,
        id: &str,
        doc: Option<&str>,
        only_if_absent: bool,
    ) -> Result<bool, StoreError> {
        let mut c = self
            .catalog
            .lock()
            .map_err(|_| StoreError::Internal("catalog lock poisoned".into()))?;
        let field = crate::catalog::CatalogDocs::field(kind, id);
        let previous = match doc {
            None => c.docs.remove(&field),
            Some(_) if only_if_absent && c.docs.contains_key(&field) => return Ok(false),
            Some(d) => c.docs.insert(field.clone(), d.to_string()),
        };
        if doc.is_none() && previous.is_none() {
            return Ok(false);
        }
        c.version += 1;
        if let Err(e) = c.save() {
            // Undo, so what the API reports matches what a restart would find.
            c.version -= 1;
            match previous {
                Some(p) => c.docs.insert(field, p),
                None => c.docs.remove(&field),
            };
            return Err(StoreError::Unavailable(format!("catalog write: {e}")));
        }
        Ok(true)
    }

    async fn catalog_version(&self) -> Result<u64, StoreError> {
        self.catalog
            .lock()
            .map(|c| c.version)
            .map_err(|_| StoreError::Internal("catalog lock poisoned".into()))
    }

    async fn catalog_load(&self) -> Result<crate::catalog::CatalogDocs, StoreError> {
        let c = self
            .catalog
            .lock()
            .map_err(|_| StoreError::Internal("catalog lock poisoned".into()))?;
        Ok(crate::catalog::CatalogDocs::from_fields(
            c.version,
            c.docs.iter().map(|(f, d)| (f.clone(), d.clone())),
        ))
    }
}

/// Flushes the journal now (tests; shutdown).
impl MemoryStore {
    pub fn sync(&self) -> std::io::Result<()> {
        if let Some(j) = &self.journal {
            if let Ok(mut w) = j.lock() {
                w.flush()?;
                w.get_ref().sync_data()?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn manual_clock(start: u64) -> (Clock, Arc<AtomicU64>) {
        let now = Arc::new(AtomicU64::new(start));
        let n = now.clone();
        (Arc::new(move || n.load(Ordering::SeqCst)), now)
    }

    /// The hand-written journal lines must stay what serde writes and replay reads.
    #[test]
    fn journal_lines_are_byte_for_byte_serde_json() {
        let lease = Lease {
            amount: 12_345,
            tokens: 678,
            periods: ["d20423", "m202612", "t"]
                .into_iter()
                .filter_map(PeriodId::parse)
                .collect(),
            expires_ms: 1_796_083_200_000,
            concurrent: true,
            rpm_step_us: 0,
        };
        for scope in ["team:bench", "customer:a \"quoted\" \\ ✓\n"] {
            let mut ours = Vec::new();
            write_reserve(&mut ours, scope, "tg-x-1", &lease);
            let mut theirs = serde_json::to_vec(&Entry::Reserve {
                scope: scope.into(),
                request_id: "tg-x-1".into(),
                lease: lease.clone(),
            })
            .unwrap();
            theirs.push(b'\n');
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&theirs)
            );
            let s = Settlement {
                unused_steps: None,
                rpm_only: 0,
                request_id: "tg-x-1".into(),
                scopes: vec![scope.into(), "global".into()],
                cost_nano: 42,
                tokens: 9,
            };
            let mut ours = Vec::new();
            write_settle(&mut ours, &s, 77);
            let mut theirs = serde_json::to_vec(&Entry::Settle {
                request_id: s.request_id.clone(),
                scopes: s.scopes.clone(),
                cost_nano: 42,
                at_ms: 77,
            })
            .unwrap();
            theirs.push(b'\n');
            assert_eq!(ours, theirs);
        }
    }

    #[tokio::test]
    async fn shared_suite_memory() {
        crate::store::suite::run_all(|clock| async move {
            Arc::new(MemoryStore::ephemeral(clock)) as Arc<dyn Store>
        })
        .await;
    }

    #[test]
    fn settled_ids_are_remembered_for_a_day_then_forgotten_in_order() {
        let s = |id: &str| Settlement {
            unused_steps: None,
            rpm_only: 0,
            request_id: id.into(),
            scopes: vec!["customer:a".into()],
            cost_nano: 5,
            tokens: 1,
        };
        let mut l = Ledger::default();
        let t0 = 1_795_435_200_000;
        assert!(l.settle(&s("r1"), t0, |_| None));
        assert!(l.settle(&s("r2"), t0 + 1_000, |_| None));
        assert!(!l.settle(&s("r1"), t0 + 2_000, |_| None), "exactly once");
        let day = SETTLED_MEMORY_MS;
        assert!(
            !l.settle(&s("r2"), t0 + day, |_| None),
            "r2 is younger than a day"
        );
        assert_eq!(l.settled.len(), 1, "r1 was forgotten");
        assert_eq!(l.spent("customer:a", Period::Total, t0), 10);
    }

    #[tokio::test]
    async fn the_catalog_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("tollgate-catalog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let clock = system_clock();
        {
            let store = MemoryStore::open(&dir, clock.clone()).expect("open");
            store
                .catalog_write("team", "t1", Some("{}"), false)
                .await
                .expect("write");
            store
                .catalog_write("team", "t2", Some("{}"), false)
                .await
                .expect("write");
            store
                .catalog_write("team", "t1", None, false)
                .await
                .expect("delete");
        }
        let store = MemoryStore::open(&dir, clock).expect("reopen");
        let docs = store.catalog_load().await.expect("load");
        assert_eq!(docs.version, 3);
        assert_eq!(
            docs.docs,
            [("team".to_string(), "t2".to_string(), "{}".to_string())]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn journal_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("tollgate-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (clock, _) = manual_clock(1_795_435_200_000);
        let req = crate::store::suite::request("r1", "customer:a", 1_000, 10);
        {
            let store = MemoryStore::open(&dir, clock.clone()).expect("open");
            assert!(matches!(
                store.reserve(&req).await,
                Ok(Decision::Admitted { .. })
            ));
            let req2 = crate::store::suite::request("r2", "customer:a", 1_000, 10);
            assert!(matches!(
                store.reserve(&req2).await,
                Ok(Decision::Admitted { .. })
            ));
            store
                .settle(&Settlement {
                    unused_steps: None,
                    rpm_only: 0,
                    request_id: "r1".into(),
                    scopes: vec!["customer:a".into()],
                    cost_nano: 300,
                    tokens: 1,
                })
                .await
                .expect("settle");
            store.sync().expect("sync");
        }
        let store = MemoryStore::open(&dir, clock).expect("reopen");
        assert_eq!(
            store
                .spent("customer:a", Period::Monthly)
                .await
                .expect("spent"),
            300
        );
        // r2's reservation (10 nano of 1000) still holds after the restart.
        let big = crate::store::suite::request("r3", "customer:a", 1_000, 691);
        assert!(matches!(
            store.reserve(&big).await,
            Ok(Decision::Refused(_))
        ));
        // Settling r1 again after the restart changes nothing: exactly once.
        store
            .settle(&Settlement {
                unused_steps: None,
                rpm_only: 0,
                request_id: "r1".into(),
                scopes: vec!["customer:a".into()],
                cost_nano: 300,
                tokens: 1,
            })
            .await
            .expect("settle");
        assert_eq!(
            store
                .spent("customer:a", Period::Monthly)
                .await
                .expect("spent"),
            300
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
