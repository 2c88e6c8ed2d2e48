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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::record::StoredRecord;

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

/// Day number (days since 1970-01-01, UTC) → rows.
pub type Rollups = BTreeMap<u64, HashMap<Dims, Totals>>;

/// Where daily rollups are read from: this gateway's ledger, or a snapshot of the rollups
/// every gateway shares (Redis).
pub trait DaySource {
    fn with_days<T>(
        &self,
        start: u64,
        end: u64,
        f: impl FnOnce(&mut dyn Iterator<Item = (u64, &HashMap<Dims, Totals>)>) -> T,
    ) -> T;
}

impl DaySource for Rollups {
    fn with_days<T>(
        &self,
        start: u64,
        end: u64,
        f: impl FnOnce(&mut dyn Iterator<Item = (u64, &HashMap<Dims, Totals>)>) -> T,
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

#[derive(Default)]
struct Index {
    /// Keyed by the gateway's own request ids: foldhash, not SipHash.
    offsets: foldhash::HashMap<String, (u64, usize)>,
    order: VecDeque<String>,
}

impl Index {
    fn insert(&mut self, id: &str, offset: u64, len: usize) {
        if self.offsets.insert(id.to_string(), (offset, len)).is_none() {
            self.order.push_back(id.to_string());
        }
        while self.order.len() > INDEX_LIMIT {
            if let Some(old) = self.order.pop_front() {
                self.offsets.remove(&old);
            }
        }
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
    pub fn append(&self, mut r: StoredRecord) {
        let mut line = Vec::with_capacity(768);
        r.write_json(&mut line);
        line.push(b'\n');
        let id = std::mem::take(&mut r.request_id);
        let written =
            self.backlog_empty.load(Ordering::Acquire) && self.write_line(&id, &line).is_ok();
        if !written {
            if let Ok(mut backlog) = self.backlog.lock() {
                backlog.push_back((id, line));
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

    fn count(&self, r: StoredRecord) {
        let mut totals = Totals::default();
        totals.add_record(&r);
        let day = r.time_ms / DAY_MS;
        let key = into_dims(r);
        if let Ok(mut shared) = self.shared.lock() {
            if let Some(pending) = shared.as_mut() {
                pending
                    .entry(day)
                    .or_default()
                    .entry(key.clone())
                    .or_default()
                    .add(&totals);
            }
        }
        if let Ok(mut rollups) = self.rollups.write() {
            rollups
                .entry(day)
                .or_default()
                .entry(key)
                .or_default()
                .add(&totals);
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
                log::error!("ledger write failed: {e}");
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

    fn maintain(&self) {
        if let Ok(mut backlog) = self.backlog.lock() {
            if !backlog.is_empty() {
                self.drain(&mut backlog);
            }
        }
        if let Ok(f) = self.file.read() {
            let _ = f.sync_data();
        }
    }

    /// The record of one request, if it is still indexed.
    pub fn get(&self, request_id: &str) -> Option<StoredRecord> {
        let (offset, len) = *self.index.lock().ok()?.offsets.get(request_id)?;
        let mut f = File::open(&self.path).ok()?;
        f.seek(SeekFrom::Start(offset)).ok()?;
        let mut buf = vec![0; len];
        f.read_exact(&mut buf).ok()?;
        serde_json::from_slice(&buf).ok()
    }
}

impl DaySource for Ledger {
    /// Runs `f` over the rollups of days `start..=end`.
    fn with_days<T>(
        &self,
        start: u64,
        end: u64,
        f: impl FnOnce(&mut dyn Iterator<Item = (u64, &HashMap<Dims, Totals>)>) -> T,
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
        l.maintain();
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn record(id: &str, day: u64, cost: u64, customer: &str) -> StoredRecord {
        StoredRecord {
            request_id: id.into(),
            time_ms: day * DAY_MS + 5,
            provider: "openai".into(),
            model: "gpt-4o".into(),
            customer: Some(customer.into()),
            cost_nano_usd: cost,
            tokens_out: 3,
            input_tokens: 10,
            status: 200,
            ..StoredRecord::default()
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
    fn records_survive_a_reopen_with_rollups_and_index() {
        let dir = temp("reopen");
        {
            let l = Ledger::open(&dir, Box::new(|| {})).expect("open");
            l.append(record("a", 20_000, 5, "x"));
            l.append(record("b", 20_001, 7, "y"));
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
        l.append(record("d", 20_001, 1, "y"));
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
        let line = |r: &StoredRecord| serde_json::to_vec(r).expect("json");
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
        l.append(record("c", 20_000, 1, "y"));
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
        l.append(record("lost?", 20_000, 9, "x"));
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
}
