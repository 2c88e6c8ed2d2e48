//! The usage ledger: every record appended to `usage.ledger` (one JSON line each) under
//! the data directory, plus daily rollups in memory that answer usage queries without
//! reading raw records.
//!
//! Durability: a record is written with one `pwrite(2)` before the response's last bytes
//! go to the client (see `respond`), so a `kill -9` of the gateway loses nothing the
//! client had received: the kernel holds the bytes. The file is fsynced every second
//! against power loss. If a write fails (disk full, unwritable file), the record stays in
//! a bounded in-memory backlog that is retried every second, the
//! `tollgate_ledger_errors_total` counter rises, and `/readyz` says so.
//!
//! On start the ledger is read once to rebuild the rollups and the request-id index.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::record::{StoredRecord, UsageRecord};

const DAY_MS: u64 = 86_400_000;
/// Records kept in memory when the file cannot be written, oldest dropped first.
const BACKLOG_LIMIT: usize = 100_000;
/// Request ids whose records can be looked up by id.
const INDEX_LIMIT: usize = 500_000;

/// The dimensions a rollup row is keyed by.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Dims {
    pub provider: String,
    pub model: String,
    pub customer: Option<String>,
    pub feature: Option<String>,
    pub team: Option<String>,
    pub key_id: Option<String>,
    pub prompt_key: Option<String>,
    pub prompt_version: Option<String>,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    pub requests: u64,
    pub cost_nano: u64,
    pub input_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub cache_write_1h_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub errors: u64,
    pub estimated: u64,
}

impl Totals {
    /// One request's counts.
    fn of(r: &UsageRecord) -> Totals {
        let u = &r.usage;
        Totals {
            requests: 1,
            cost_nano: r.cost_nano_usd,
            input_tokens: u.input_tokens,
            cache_read_tokens: u.cache_read_tokens,
            cache_write_tokens: u.cache_write_tokens,
            cache_write_1h_tokens: u.cache_write_1h_tokens,
            output_tokens: u.output_tokens,
            reasoning_tokens: u.reasoning_tokens,
            errors: u64::from(r.status >= 400 || r.error.is_some()),
            estimated: u64::from(r.estimated),
        }
    }

    /// Adds a record read back from the ledger (as `of` counts it when it is appended).
    fn add_record(&mut self, r: &StoredRecord) {
        self.requests += 1;
        self.cost_nano = self.cost_nano.saturating_add(r.cost_nano_usd);
        self.input_tokens += r.input_tokens;
        self.cache_read_tokens += r.cache_read_tokens;
        self.cache_write_tokens += r.cache_write_tokens;
        self.cache_write_1h_tokens += r.cache_write_1h_tokens;
        self.output_tokens += r.tokens_out;
        self.reasoning_tokens += r.reasoning_tokens;
        self.errors += u64::from(r.status >= 400 || r.error.is_some());
        self.estimated += u64::from(r.estimated);
    }

    pub fn add(&mut self, o: &Totals) {
        self.requests += o.requests;
        self.cost_nano = self.cost_nano.saturating_add(o.cost_nano);
        self.input_tokens += o.input_tokens;
        self.cache_read_tokens += o.cache_read_tokens;
        self.cache_write_tokens += o.cache_write_tokens;
        self.cache_write_1h_tokens += o.cache_write_1h_tokens;
        self.output_tokens += o.output_tokens;
        self.reasoning_tokens += o.reasoning_tokens;
        self.errors += o.errors;
        self.estimated += o.estimated;
    }

    /// The counters by name, for stores that keep rollups as named fields.
    pub fn fields(&self) -> [(&'static str, u64); 10] {
        [
            ("requests", self.requests),
            ("cost_nano", self.cost_nano),
            ("input_tokens", self.input_tokens),
            ("cache_read_tokens", self.cache_read_tokens),
            ("cache_write_tokens", self.cache_write_tokens),
            ("cache_write_1h_tokens", self.cache_write_1h_tokens),
            ("output_tokens", self.output_tokens),
            ("reasoning_tokens", self.reasoning_tokens),
            ("errors", self.errors),
            ("estimated", self.estimated),
        ]
    }

    /// Adds `n` to the counter named `name` (see `fields`); false for an unknown name.
    pub fn add_field(&mut self, name: &str, n: u64) -> bool {
        let counter = match name {
            "requests" => &mut self.requests,
            "cost_nano" => &mut self.cost_nano,
            "input_tokens" => &mut self.input_tokens,
            "cache_read_tokens" => &mut self.cache_read_tokens,
            "cache_write_tokens" => &mut self.cache_write_tokens,
            "cache_write_1h_tokens" => &mut self.cache_write_1h_tokens,
            "output_tokens" => &mut self.output_tokens,
            "reasoning_tokens" => &mut self.reasoning_tokens,
            "errors" => &mut self.errors,
            "estimated" => &mut self.estimated,
            _ => return false,
        };
        *counter = counter.saturating_add(n);
        true
    }

    pub fn tokens_in(&self) -> u64 {
        self.input_tokens
            + self.cache_read_tokens
            + self.cache_write_tokens
            + self.cache_write_1h_tokens
    }
}

/// One day's rows. hashbrown (with std's SipHash: the keys are caller-chosen names) for
/// its lookup by a borrowed key: counting a request finds its row without copying the
/// record's strings (`DimsRef`).
pub type RollupRows = hashbrown::HashMap<Dims, Totals, std::hash::RandomState>;

/// Day number (days since 1970-01-01, UTC) → rows.
pub type Rollups = BTreeMap<u64, RollupRows>;

/// Where daily rollups are read from: this gateway's ledger, or a snapshot of the rollups
/// every gateway shares (Redis).
pub trait DaySource {
    fn with_days<T>(
        &self,
        start: u64,
        end: u64,
        f: impl FnOnce(&mut dyn Iterator<Item = (u64, &RollupRows)>) -> T,
    ) -> T;
}

impl DaySource for Rollups {
    fn with_days<T>(
        &self,
        start: u64,
        end: u64,
        f: impl FnOnce(&mut dyn Iterator<Item = (u64, &RollupRows)>) -> T,
    ) -> T {
        let mut it = self.range(start..=end).map(|(d, rows)| (*d, rows));
        f(&mut it)
    }
}

/// The rollup key of a record, taking its strings rather than copying them.
fn into_dims(r: StoredRecord) -> Dims {
    let mut tags = r.tags;
    tags.sort();
    Dims {
        provider: r.provider,
        model: r.model,
        customer: r.customer,
        feature: r.feature,
        team: r.team,
        key_id: r.key_id,
        prompt_key: r.prompt_key,
        prompt_version: r.prompt_version,
        tags,
    }
}

/// A record's rollup key, borrowed. It hashes exactly as the `Dims` it stands for (the
/// same field types in the same order, `&str` hashing as `String`; a test holds them
/// equal), which is what lets it find that `Dims`'s row.
#[derive(Hash)]
struct DimsRef<'a> {
    provider: &'a str,
    model: &'a str,
    customer: Option<&'a str>,
    feature: Option<&'a str>,
    team: Option<&'a str>,
    key_id: Option<&'a str>,
    prompt_key: Option<&'a str>,
    prompt_version: Option<&'a str>,
    /// Sorted, as in `Dims`.
    tags: Vec<&'a str>,
}

impl<'a> DimsRef<'a> {
    fn of(r: &'a UsageRecord) -> Self {
        let a = &r.attribution;
        let mut tags: Vec<&str> = a.tags.iter().map(String::as_str).collect();
        tags.sort_unstable();
        DimsRef {
            provider: &r.provider,
            model: &r.model_requested,
            customer: a.customer.as_deref(),
            feature: a.feature.as_deref(),
            team: a.team.as_deref(),
            key_id: a.key_id.as_deref(),
            prompt_key: a.prompt_key.as_deref(),
            prompt_version: a.prompt_version.as_deref(),
            tags,
        }
    }

    fn to_dims(&self) -> Dims {
        let own = |s: Option<&str>| s.map(str::to_string);
        Dims {
            provider: self.provider.to_string(),
            model: self.model.to_string(),
            customer: own(self.customer),
            feature: own(self.feature),
            team: own(self.team),
            key_id: own(self.key_id),
            prompt_key: own(self.prompt_key),
            prompt_version: own(self.prompt_version),
            tags: self.tags.iter().map(|t| t.to_string()).collect(),
        }
    }
}

impl hashbrown::Equivalent<Dims> for DimsRef<'_> {
    fn equivalent(&self, d: &Dims) -> bool {
        self.provider == d.provider
            && self.model == d.model
            && self.customer == d.customer.as_deref()
            && self.feature == d.feature.as_deref()
            && self.team == d.team.as_deref()
            && self.key_id == d.key_id.as_deref()
            && self.prompt_key == d.prompt_key.as_deref()
            && self.prompt_version == d.prompt_version.as_deref()
            && self.tags.iter().eq(d.tags.iter())
    }
}

/// Adds one request to its row, copying the key only for a row's first request.
fn add_to_row(rows: &mut RollupRows, key: &DimsRef, totals: &Totals) {
    match rows.get_mut(key) {
        Some(row) => row.add(totals),
        None => {
            rows.insert(key.to_dims(), *totals);
        }
    }
}

/// Where each of the last `INDEX_LIMIT` records is, by a 64-bit hash of its request id
/// rather than the id itself: no copy of the id per request, and about 70 bytes per entry
/// instead of about 170 (≈ 33 MiB at the limit, not ≈ 83 MiB: a model of both measured
/// with glibc's allocator, BENCHMARKS.md fifteenth round). A line read back is checked
/// against the id asked for, so a hash shared by two ids (odds about 1 in 10^8 over a
/// full index) can only make the older one unfindable by id; its record stays in the
/// ledger and the rollups.
#[derive(Default)]
struct Index {
    ids: foldhash::quality::RandomState,
    /// Id hash → (offset, length) of its line. The key is a hash already; foldhash's fast
    /// mix of a `u64` costs a few instructions.
    offsets: foldhash::HashMap<u64, (u64, u32)>,
    /// (id hash, offset) in insertion order. An entry leaves the index when the line it
    /// points at is the one evicted, so a later line under the same hash (the same id
    /// again, or a shared hash) keeps its own place in the order.
    order: VecDeque<(u64, u64)>,
}

impl Index {
    fn key(&self, id: &str) -> u64 {
        use std::hash::BuildHasher;
        self.ids.hash_one(id)
    }

    fn insert(&mut self, id: &str, offset: u64, len: usize) {
        let Ok(len) = u32::try_from(len) else {
            return;
        };
        let key = self.key(id);
        self.offsets.insert(key, (offset, len));
        self.order.push_back((key, offset));
        while self.order.len() > INDEX_LIMIT {
            if let Some((old, at)) = self.order.pop_front() {
                if self.offsets.get(&old).is_some_and(|&(o, _)| o == at) {
                    self.offsets.remove(&old);
                }
            }
        }
    }

    fn get(&self, id: &str) -> Option<(u64, usize)> {
        let (offset, len) = *self.offsets.get(&self.key(id))?;
        Some((offset, len as usize))
    }
}

pub struct Ledger {
    path: PathBuf,
    /// Each line is written with `pwrite` at an offset reserved from `len`, so concurrent
    /// appends never wait on each other's system call (a lock held across the syscall
    /// put the gateway's threads to sleep on each other).
    file: RwLock<File>,
    len: AtomicU64,
    /// (request id, JSON line) not yet written because the file failed; retried in order.
    backlog: Mutex<VecDeque<(String, Vec<u8>)>>,
    backlog_empty: AtomicBool,
    rollups: RwLock<Rollups>,
    /// Rollup deltas not yet added to the shared rollups (Redis), when sharing is on.
    shared: Mutex<Option<Rollups>>,
    index: Mutex<Index>,
    healthy: AtomicBool,
    on_error: Box<dyn Fn() + Send + Sync>,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger: {0}")]
    Io(#[from] std::io::Error),
}

impl Ledger {
    /// Opens the ledger in `dir`, rebuilding rollups and the index from what it holds.
    /// `on_error` is called for every failed write (a metric).
    pub fn open(
        dir: &Path,
        on_error: Box<dyn Fn() + Send + Sync>,
    ) -> Result<Arc<Ledger>, LedgerError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("usage.ledger");
        let mut rollups = Rollups::new();
        let mut index = Index::default();
        let len = rebuild(&path, &mut rollups, &mut index)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        let ledger = Arc::new(Ledger {
            path,
            file: RwLock::new(file),
            len: AtomicU64::new(len),
            backlog: Mutex::new(VecDeque::new()),
            backlog_empty: AtomicBool::new(true),
            rollups: RwLock::new(rollups),
            shared: Mutex::new(None),
            index: Mutex::new(index),
            healthy: AtomicBool::new(true),
            on_error,
        });
        spawn_maintenance(Arc::downgrade(&ledger));
        Ok(ledger)
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Appends a record and counts it in the rollups. Never fails the request: a record
    /// that cannot be written now is kept and retried.
    pub fn append(&self, r: &UsageRecord) {
        let mut line = Vec::with_capacity(768);
        r.write_json(&mut line);
        line.push(b'\n');
        let id = r.request_id.as_str();
        let written =
            self.backlog_empty.load(Ordering::Acquire) && self.write_line(id, &line).is_ok();
        if !written {
            if let Ok(mut backlog) = self.backlog.lock() {
                backlog.push_back((id.to_string(), line));
                while backlog.len() > BACKLOG_LIMIT {
                    backlog.pop_front();
                }
                self.backlog_empty.store(false, Ordering::Release);
                self.drain(&mut backlog);
            }
        }
        self.count(r);
    }

    /// From now on, collects what is counted as deltas for shared rollups (`take_shared`).
    pub fn share_rollups(&self) {
        if let Ok(mut s) = self.shared.lock() {
            s.get_or_insert_with(Rollups::new);
        }
    }

    /// The rollup deltas counted since the last call (empty when sharing is off).
    pub fn take_shared(&self) -> Rollups {
        self.shared
            .lock()
            .ok()
            .and_then(|mut s| s.as_mut().map(std::mem::take))
            .unwrap_or_default()
    }

    fn count(&self, r: &UsageRecord) {
        let totals = Totals::of(r);
        let day = r.time_ms / DAY_MS;
        let key = DimsRef::of(r);
        if let Ok(mut shared) = self.shared.lock() {
            if let Some(pending) = shared.as_mut() {
                add_to_row(pending.entry(day).or_default(), &key, &totals);
            }
        }
        if let Ok(mut rollups) = self.rollups.write() {
            add_to_row(rollups.entry(day).or_default(), &key, &totals);
        }
    }

    /// Writes one line at a freshly reserved offset and indexes it. A failed write leaves
    /// its reserved range as a hole (or a torn line) that `rebuild` skips.
    fn write_line(&self, id: &str, line: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let offset = self.len.fetch_add(line.len() as u64, Ordering::Relaxed);
        let result = match self.file.read() {
            Ok(f) => f.write_all_at(line, offset),
            Err(_) => Err(std::io::Error::other("ledger file lock poisoned")),
        };
        match result {
            Ok(()) => {
                if let Ok(mut index) = self.index.lock() {
                    index.insert(id, offset, line.len());
                }
                self.healthy.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                crate::log_throttled!(log::Level::Error, "ledger write failed: {e}");
                (self.on_error)();
                self.healthy.store(false, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Writes the backlog in order; stops at the first failure.
    fn drain(&self, backlog: &mut VecDeque<(String, Vec<u8>)>) {
        while let Some((id, line)) = backlog.front() {
            if self.write_line(id, line).is_err() {
                return;
            }
            backlog.pop_front();
        }
        self.backlog_empty.store(true, Ordering::Release);
    }

    /// Retries the backlog and fsyncs the file: every second, and once more as the
    /// gateway stops (`crate::shutdown`). Returns how many records are still unwritten.
    pub fn maintain(&self) -> usize {
        let mut unwritten = 0;
        if let Ok(mut backlog) = self.backlog.lock() {
            if !backlog.is_empty() {
                self.drain(&mut backlog);
            }
            unwritten = backlog.len();
        }
        if let Ok(f) = self.file.read() {
            let _ = f.sync_data();
        }
        unwritten
    }

    /// The record of one request, if it is still indexed.
    pub fn get(&self, request_id: &str) -> Option<StoredRecord> {
        let (offset, len) = self.index.lock().ok()?.get(request_id)?;
        let mut f = File::open(&self.path).ok()?;
        f.seek(SeekFrom::Start(offset)).ok()?;
        let mut buf = vec![0; len];
        f.read_exact(&mut buf).ok()?;
        serde_json::from_slice::<StoredRecord>(&buf)
            .ok()
            .filter(|r| r.request_id == request_id)
    }
}

impl DaySource for Ledger {
    /// Runs `f` over the rollups of days `start..=end`.
    fn with_days<T>(
        &self,
        start: u64,
        end: u64,
        f: impl FnOnce(&mut dyn Iterator<Item = (u64, &RollupRows)>) -> T,
    ) -> T {
        let empty = Rollups::new();
        let guard = self.rollups.read();
        let rollups = guard.as_deref().unwrap_or(&empty);
        let mut it = rollups.range(start..=end).map(|(d, rows)| (*d, rows));
        f(&mut it)
    }
}

/// How every ledger line begins (`StoredRecord`'s first field).
const RECORD_START: &[u8] = b"{\"request_id\":";

fn rebuild(path: &Path, rollups: &mut Rollups, index: &mut Index) -> Result<u64, LedgerError> {
    let Ok(file) = File::open(path) else {
        return Ok(0);
    };
    let mut reader = BufReader::new(file);
    let mut offset = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        // Every record starts with `{"request_id":`, which cannot occur unescaped inside a
        // JSON string. A crash can leave a torn line, or a hole of NULs where a reserved
        // write never landed, with the next record appended right after it: the record
        // starts at the last such opening. Lines with none (blank, torn) are skipped.
        let start = memchr::memmem::rfind(&line, RECORD_START).unwrap_or(0);
        if let Ok(r) = serde_json::from_slice::<StoredRecord>(&line[start..]) {
            index.insert(&r.request_id, offset + start as u64, n - start);
            let mut totals = Totals::default();
            totals.add_record(&r);
            rollups
                .entry(r.time_ms / DAY_MS)
                .or_default()
                .entry(into_dims(r))
                .or_default()
                .add(&totals);
        }
        offset += n as u64;
    }
    Ok(offset)
}

fn spawn_maintenance(ledger: std::sync::Weak<Ledger>) {
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        let Some(l) = ledger.upgrade() else { return };
        let _ = l.maintain();
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn record(id: &str, day: u64, cost: u64, customer: &str) -> UsageRecord {
        UsageRecord {
            request_id: id.into(),
            time_ms: day * DAY_MS + 5,
            provider: "openai".into(),
            model_requested: "gpt-4o".into(),
            attribution: crate::attribution::Attribution {
                customer: Some(customer.into()),
                ..Default::default()
            },
            cost_nano_usd: cost,
            usage: crate::usage::Usage {
                input_tokens: 10,
                output_tokens: 3,
                ..Default::default()
            },
            status: 200,
            ..UsageRecord::default()
        }
    }

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tollgate-ledger-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn total(l: &Ledger) -> Totals {
        l.with_days(0, u64::MAX, |days| {
            let mut t = Totals::default();
            for (_, rows) in days {
                rows.values().for_each(|r| t.add(r));
            }
            t
        })
    }

    #[test]
    fn a_lookup_by_id_returns_only_that_ids_record() {
        let dir = temp("index-check");
        let l = Ledger::open(&dir, Box::new(|| {})).expect("open");
        l.append(&record("a", 20_000, 5, "x"));
        l.append(&record("b", 20_000, 7, "y"));
        assert_eq!(l.get("a").map(|r| r.cost_nano_usd), Some(5));
        assert_eq!(l.get("zzz").map(|r| r.cost_nano_usd), None);
        // As if "a" shared its hash with "b", which came later: the entry now points at
        // b's line, and a lookup of "a" must not answer with b's record.
        {
            let mut index = l.index.lock().expect("index");
            let b = index.get("b").expect("b indexed");
            let key = index.key("a");
            index.offsets.insert(key, (b.0, b.1 as u32));
        }
        assert!(
            l.get("a").is_none(),
            "another id's record is never returned"
        );
        assert_eq!(l.get("b").map(|r| r.cost_nano_usd), Some(7));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_id_written_again_stays_indexed_until_its_newer_line_is_evicted() {
        let mut index = Index::default();
        index.insert("again", 0, 10);
        for i in 1..INDEX_LIMIT as u64 {
            index.insert(&format!("filler-{i}"), i * 10, 10);
        }
        // The same id again, at a newer line; then one more, which evicts the first line.
        let newer = INDEX_LIMIT as u64 * 10;
        index.insert("again", newer, 10);
        index.insert("one-more", newer + 10, 10);
        assert_eq!(index.get("again"), Some((newer, 10)));
        assert_eq!(
            index.get("filler-1"),
            None,
            "the oldest line after the first went"
        );
        assert_eq!(index.get("filler-2"), Some((20, 10)));
        // Its own place in the order comes up later and removes it then.
        index.insert("yet-more", newer + 20, 10);
        for i in 0..INDEX_LIMIT as u64 {
            index.insert(&format!("late-{i}"), newer + 30 + i * 10, 10);
        }
        assert_eq!(index.get("again"), None);
        assert!(index.offsets.len() <= INDEX_LIMIT);
    }

    #[test]
    fn records_survive_a_reopen_with_rollups_and_index() {
        let dir = temp("reopen");
        {
            let l = Ledger::open(&dir, Box::new(|| {})).expect("open");
            l.append(&record("a", 20_000, 5, "x"));
            l.append(&record("b", 20_001, 7, "y"));
            assert_eq!(l.get("b").map(|r| r.cost_nano_usd), Some(7));
        }
        // A torn last line, as a crash mid-write would leave.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.join("usage.ledger"))
            .expect("file");
        f.write_all(b"{\"request_id\":\"c\",\"ti").expect("write");
        let l = Ledger::open(&dir, Box::new(|| {})).expect("reopen");
        let t = total(&l);
        assert_eq!((t.requests, t.cost_nano, t.output_tokens), (2, 12, 6));
        assert_eq!(l.get("a").map(|r| r.customer), Some(Some("x".to_string())));
        l.append(&record("d", 20_001, 1, "y"));
        assert_eq!(
            l.get("d").map(|r| r.cost_nano_usd),
            Some(1),
            "appends after a torn line start fresh"
        );
        drop(l);
        let l = Ledger::open(&dir, Box::new(|| {})).expect("reopen again");
        assert_eq!(
            l.get("d").map(|r| r.cost_nano_usd),
            Some(1),
            "the record appended after the torn line survives a rebuild"
        );
        assert_eq!(total(&l).cost_nano, 13);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn holes_and_torn_lines_from_a_crash_are_skipped_and_the_next_record_kept() {
        let dir = temp("holes");
        std::fs::create_dir_all(&dir).expect("dir");
        let line = |r: &UsageRecord| serde_json::to_vec(&r.stored()).expect("json");
        let mut file = line(&record("a", 20_000, 5, "x"));
        file.push(b'\n');
        // A torn write, then a reserved range that was never written, then a record.
        let torn = line(&record("torn", 20_000, 100, "x"));
        file.extend_from_slice(&torn[..torn.len() / 2]);
        file.extend_from_slice(&[0u8; 40]);
        file.extend_from_slice(&line(&record("b", 20_000, 7, "y")));
        file.push(b'\n');
        std::fs::write(dir.join("usage.ledger"), &file).expect("write");
        let l = Ledger::open(&dir, Box::new(|| {})).expect("open");
        assert_eq!(total(&l).cost_nano, 12);
        assert_eq!(l.get("b").map(|r| r.cost_nano_usd), Some(7));
        assert!(l.get("torn").is_none());
        l.append(&record("c", 20_000, 1, "y"));
        assert_eq!(
            l.get("c").map(|r| r.cost_nano_usd),
            Some(1),
            "appends after it"
        );
        drop(l);
        let l = Ledger::open(&dir, Box::new(|| {})).expect("reopen");
        assert_eq!(
            total(&l).cost_nano,
            13,
            "all three records survive a rebuild"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_write_keeps_the_record_for_later() {
        let dir = temp("fail");
        let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let e = errors.clone();
        let l = Ledger::open(
            &dir,
            Box::new(move || {
                e.fetch_add(1, Ordering::Relaxed);
            }),
        )
        .expect("open");
        // Swap in a read-only handle: every write now fails like a full disk would.
        if let Ok(mut f) = l.file.write() {
            *f = File::open(dir.join("usage.ledger")).expect("read-only");
        }
        l.append(&record("lost?", 20_000, 9, "x"));
        assert!(!l.healthy());
        assert!(errors.load(Ordering::Relaxed) >= 1);
        assert_eq!(total(&l).cost_nano, 9, "still counted");
        if let Ok(mut f) = l.file.write() {
            *f = OpenOptions::new()
                .write(true)
                .open(dir.join("usage.ledger"))
                .expect("rw");
        }
        l.maintain();
        assert!(l.healthy());
        drop(l);
        let l = Ledger::open(&dir, Box::new(|| {})).expect("reopen");
        assert_eq!(
            total(&l).cost_nano,
            9,
            "written once the file was writable again"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A record's borrowed key must find the row its owned key made: same hash, equal.
    #[test]
    fn a_borrowed_key_hashes_and_compares_as_the_owned_one() {
        use std::hash::BuildHasher;
        let mut r = record("k", 20_000, 5, "acme");
        r.attribution.feature = Some("chat".into());
        r.attribution.prompt_version = Some(String::new());
        r.attribution.tags = vec!["zeta".into(), "alpha".into(), "".into()];
        let owned = DimsRef::of(&r).to_dims();
        assert_eq!(owned.tags, ["", "alpha", "zeta"], "tags sorted");
        let s = std::hash::RandomState::new();
        assert_eq!(s.hash_one(DimsRef::of(&r)), s.hash_one(&owned));
        assert!(hashbrown::Equivalent::equivalent(&DimsRef::of(&r), &owned));
        let mut other = r.clone();
        other.attribution.prompt_version = None;
        assert!(!hashbrown::Equivalent::equivalent(
            &DimsRef::of(&other),
            &owned
        ));
        assert_ne!(s.hash_one(DimsRef::of(&other)), s.hash_one(&owned));
    }

    #[test]
    fn requests_with_the_same_dimensions_share_a_row_and_counts_match_a_rebuild() {
        let dir = temp("rows");
        let l = Ledger::open(&dir, Box::new(|| {})).expect("open");
        let mut a = record("a", 20_000, 5, "x");
        a.attribution.tags = vec!["t2".into(), "t1".into()];
        a.usage.cache_read_tokens = 4;
        let mut b = record("b", 20_000, 7, "x");
        b.attribution.tags = vec!["t1".into(), "t2".into()];
        b.status = 502;
        b.estimated = true;
        let c = record("c", 20_000, 1, "y");
        for r in [&a, &b, &c] {
            l.append(r);
        }
        let rows = |l: &Ledger| {
            l.with_days(0, u64::MAX, |days| {
                let mut rows: Vec<(Dims, Totals)> = days
                    .flat_map(|(_, rows)| rows.iter().map(|(d, t)| (d.clone(), *t)))
                    .collect();
                rows.sort_by(|x, y| x.0.cmp(&y.0));
                rows
            })
        };
        let live = rows(&l);
        assert_eq!(live.len(), 2, "a and b differ only in tag order: one row");
        let x = &live[0].1;
        assert_eq!((x.requests, x.cost_nano, x.cache_read_tokens), (2, 12, 4));
        assert_eq!((x.errors, x.estimated), (1, 1));
        drop(l);
        let rebuilt = Ledger::open(&dir, Box::new(|| {})).expect("reopen");
        assert_eq!(
            rows(&rebuilt),
            live,
            "appending counts what a rebuild counts"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
