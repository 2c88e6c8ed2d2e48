//! The embedded store: all state in one process, behind one mutex, so admission is
//! trivially atomic. Durability: every reservation and settlement is appended to a
//! journal, flushed and fsynced at most `SYNC_INTERVAL` later (the durability window,
//! well under a second); on start the journal is replayed, then compacted into a
//! snapshot. Rate-limit state (GCRA clocks, in-flight counts) is not journaled: after a
//! restart the minute's allowance starts fresh, and in-flight leases are restored only as
//! budget reservations.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{
    BudgetStatus, Decision, Enforcement, LimitKind, Period, Refusal, ReserveRequest, ScopeCheck,
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
    periods: Vec<String>,
    expires_ms: u64,
    concurrent: bool,
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
            if let Some(c) = self.periods.get_mut(p) {
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
    scopes: HashMap<String, ScopeState>,
    /// Settled request ids (exactly-once), forgotten after `SETTLED_MEMORY_MS`: a set for
    /// lookups and the same ids in settlement order, so expiry is O(1) per settlement
    /// rather than a scan of the whole set.
    settled: std::collections::HashSet<String>,
    settled_order: std::collections::VecDeque<(u64, String)>,
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
            self.scopes
                .entry(check.scope.clone())
                .or_default()
                .expire(now_ms);
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
                if let Err(wait) = gcra(tat, now_us, rpm, 1) {
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
            let state = self.scopes.entry(check.scope.clone()).or_default();
            let mut periods = Vec::new();
            for b in &check.budgets {
                let (period_id, reset_ms) = b.period.window(now_ms);
                if !periods.contains(&period_id) {
                    let c = state.periods.entry(period_id.clone()).or_default();
                    c.reserved = c.reserved.saturating_add(amount);
                    periods.push(period_id.clone());
                }
                statuses.push(BudgetStatus {
                    scope: check.scope.clone(),
                    period: b.period,
                    cap_nano: b.cap_nano,
                    used_nano: state.used(&period_id),
                    reset_ms,
                });
            }
            if let Some(rpm) = check.rpm {
                state.rpm_tat_us =
                    gcra(state.rpm_tat_us, now_us, rpm, 1).unwrap_or(state.rpm_tat_us);
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
            let state = self.scopes.entry(scope.clone()).or_default();
            let lease = state.leases.remove(&s.request_id);
            let periods = match &lease {
                Some(l) => {
                    state.release(l);
                    l.periods.clone()
                }
                // No lease (it expired, or the request was admitted while the store was down):
                // the spend still happened; count it in every current period.
                None => [Period::Daily, Period::Monthly, Period::Total]
                    .iter()
                    .map(|p| p.window(now_ms).0)
                    .collect(),
            };
            for p in periods {
                let c = state.periods.entry(p).or_default();
                c.spent = c.spent.saturating_add(s.cost_nano);
            }
            if let (Some(l), Some(tpm)) = (&lease, tpm_of(scope)) {
                let interval = MINUTE_US / tpm.max(1);
                if s.tokens >= l.tokens {
                    state.tpm_tat_us = state
                        .tpm_tat_us
                        .saturating_add((s.tokens - l.tokens) * interval);
                } else {
                    state.tpm_tat_us = state
                        .tpm_tat_us
                        .saturating_sub((l.tokens - s.tokens) * interval);
                }
            }
        }
        true
    }

    pub fn spent(&self, scope: &str, period: Period, now_ms: u64) -> u64 {
        let id = period.window(now_ms).0;
        self.scopes
            .get(scope)
            .and_then(|s| s.periods.get(&id))
            .map_or(0, |c| c.spent)
    }
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
    tpm_limits: Mutex<HashMap<String, u64>>,
    /// `claim_once` claims and when they lapse (not journaled: an alert may repeat after a
    /// restart, never be lost).
    claims: Mutex<HashMap<String, u64>>,
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
            tpm_limits: Mutex::new(HashMap::new()),
            claims: Mutex::new(HashMap::new()),
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
            tpm_limits: Mutex::new(HashMap::new()),
            claims: Mutex::new(HashMap::new()),
            catalog: Mutex::new(catalog),
        })
    }

    fn append(&self, entries: &[Entry]) -> Result<(), StoreError> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        if entries.is_empty() {
            return Ok(());
        }
        // Serialized before taking the journal's lock, written in one piece under it.
        let mut lines = Vec::with_capacity(256 * entries.len());
        for e in entries {
            serde_json::to_writer(&mut lines, e)
                .map_err(|e| StoreError::Internal(e.to_string()))?;
            lines.push(b'\n');
        }
        let mut w = journal
            .lock()
            .map_err(|_| StoreError::Internal("journal lock poisoned".into()))?;
        w.write_all(&lines)
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
                    let c = s.periods.entry(p.clone()).or_default();
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

fn journal_entries(req: &ReserveRequest, decision: &Decision, ledger: &Ledger) -> Vec<Entry> {
    if !matches!(decision, Decision::Admitted { .. }) {
        return Vec::new();
    }
    req.scopes
        .iter()
        .filter_map(|c: &ScopeCheck| {
            let lease = ledger
                .scopes
                .get(&c.scope)?
                .leases
                .get(&req.request_id)?
                .clone();
            Some(Entry::Reserve {
                scope: c.scope.clone(),
                request_id: req.request_id.clone(),
                lease,
            })
        })
        .collect()
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
        let (decision, entries) = {
            let mut ledger = self
                .ledger
                .lock()
                .map_err(|_| StoreError::Internal("ledger lock poisoned".into()))?;
            let decision = ledger.decide(req, now);
            let entries = journal_entries(req, &decision, &ledger);
            (decision, entries)
        };
        // Journaled after the decision's lock is let go (serializing is the slow part, and
        // every request needs that lock). A request's settlement comes after its
        // reservation returns, so its entries stay in order.
        self.append(&entries)?;
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
            self.append(&[Entry::Settle {
                request_id: s.request_id.clone(),
                scopes: s.scopes.clone(),
                cost_nano: s.cost_nano,
                at_ms: now,
            }])?;
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
