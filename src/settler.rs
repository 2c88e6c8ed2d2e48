//! Settlements off the request path. A finished request queues its settlement here and
//! moves on; one task per gateway (the flusher) sends what has gathered to the store
//! `GATHER` after the first arrives (or after the flush before it ends), as one batch (`Store::settle_many`: with one Redis, script calls of 8
//! settlements), and retries what failed with backoff for up to
//! `RETRY_FOR`, which also replays the settlements of requests admitted `open` during an
//! outage. A settlement that still fails then is missing from the store (the ledger record
//! has it), and `tollgate_store_degraded_total{outcome="settlement_lost"}` counts it.
//!
//! Why one task and not one per settlement: with Redis, a task per request cost the gateway
//! a spawn, a timer and wake-ups across its worker threads on every request, and a
//! settlement that rode on the next reservation's script call made that reservation, on
//! the request path, wait for settlement work (BENCHMARKS.md, sixth round).
//!
//! Until its settlement is applied, a request's reservation holds its worst case, so a
//! late settlement lets no spend through as long as it lands within the lease
//! (`store.lease_seconds`); one retried past that counts its spend when it lands, and the
//! lease's expiry released the hold before. A graceful shutdown waits for the queue to
//! empty (`crate::shutdown`); settlements still queued when the process stops anyway are
//! missing from the store as a crash mid-request's are: their leases expire.
//!
//! Memory is bounded: at most `store.settle_queue_max` settlements wait (queued, in
//! flight and to be retried). During a long outage a finished request's settlement past
//! that is dropped at once and counted as `settlement_lost`, rather than growing the
//! gateway's memory with every request until the outage ends.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::budgets::Applied;
use crate::proxy::State;
use crate::store::{Settlement, StoreError};

/// How long the flusher gathers settlements after the first one arrives.
pub const GATHER: Duration = Duration::from_millis(20);
const RETRY_FOR: Duration = Duration::from_secs(30 * 60);
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LONGEST_RETRY: Duration = Duration::from_secs(5);
/// Most retries sent in one flush: after an outage, the backlog drains in steps, so that
/// fresh settlements are not stuck behind all of it.
const RETRIES_PER_FLUSH: usize = 1024;
/// Most fresh settlements sent in one flush; the rest go in the next (a bound on how long
/// one flush can take when the store falls behind).
const FRESH_PER_FLUSH: usize = 8192;

/// `store.settle_queue_max` by default: a few hundred bytes each, so tens of MiB at most;
/// at 100 requests a second, a quarter of an hour of outage.
pub const DEFAULT_MAX_WAITING: usize = 100_000;

/// Where the flusher's batches go and what it reports to: the gateway (or a test's fake).
#[async_trait]
pub trait Sink: Send + Sync + 'static {
    async fn settle_many(&self, batch: &[Settlement]) -> Vec<Result<(), StoreError>>;
    /// A settlement was applied.
    fn settled(self: Arc<Self>, scopes: Vec<String>, budgets: Vec<Applied>);
    /// A settlement was given up after `RETRY_FOR`.
    fn lost(&self);
    /// How many settlements wait: as a flush starts (fresh and retried), and after it (to
    /// be retried).
    fn waiting(&self, n: usize);
}

#[async_trait]
impl Sink for State {
    async fn settle_many(&self, batch: &[Settlement]) -> Vec<Result<(), StoreError>> {
        self.store.settle_many(batch).await
    }

    fn settled(self: Arc<Self>, scopes: Vec<String>, budgets: Vec<Applied>) {
        crate::admission::settled(&self, scopes, budgets);
    }

    fn lost(&self) {
        self.metrics.store_degraded("settlement_lost");
    }

    fn waiting(&self, n: usize) {
        self.metrics
            .settlements_waiting
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// A settlement on its way to the store, with what its retries and alerts need.
struct Pending {
    settlement: Settlement,
    meta: Meta,
}

struct Meta {
    /// The budgets its reservation counted in, checked for alerts once it is applied.
    budgets: Vec<Applied>,
    give_up: Instant,
    /// When it is tried next, and how long the wait after that is if it fails again.
    due: Instant,
    backoff: Duration,
}

/// What the request path shares with the flusher. Retries are the flusher's alone.
#[derive(Default)]
struct Queue {
    fresh: Vec<Pending>,
    /// The flusher waits for a push: nothing fresh was queued when it last looked.
    parked: bool,
    started: bool,
}

pub struct Settler {
    queue: Mutex<Queue>,
    wake: Notify,
    max_waiting: usize,
    /// Settlements the flusher holds: its retries and the batch it is sending.
    held: AtomicUsize,
    dropped: AtomicU64,
}

impl Default for Settler {
    fn default() -> Self {
        Settler::new(DEFAULT_MAX_WAITING)
    }
}

impl Settler {
    pub fn new(max_waiting: usize) -> Settler {
        Settler {
            queue: Mutex::default(),
            wake: Notify::new(),
            max_waiting,
            held: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues a settlement. The first call starts the flusher, in the caller's runtime
    /// (the proxy's), where the store's request connection lives too.
    pub fn push<S: Sink>(
        self: &Arc<Self>,
        sink: &Arc<S>,
        settlement: Settlement,
        budgets: Vec<Applied>,
    ) {
        let now = Instant::now();
        let meta = Meta {
            budgets,
            give_up: now + RETRY_FOR,
            due: now,
            backoff: FIRST_RETRY,
        };
        let (start, wake) = {
            let mut q = self.lock();
            if q.fresh.len() + self.held.load(Ordering::Relaxed) >= self.max_waiting {
                drop(q);
                self.drop_one(sink.as_ref());
                return;
            }
            q.fresh.push(Pending { settlement, meta });
            (
                !std::mem::replace(&mut q.started, true),
                std::mem::take(&mut q.parked),
            )
        };
        if start {
            let running = Running {
                settler: self.clone(),
                retries: Retries::default(),
            };
            tokio::spawn(flush_loop(running, Arc::downgrade(sink)));
        } else if wake {
            // `notify_one` keeps a permit when the flusher is not waiting yet (it marked
            // itself parked and is on its way to wait): the wake-up cannot be lost.
            self.wake.notify_one();
        }
    }

    /// Settlements not yet applied: queued, in flight or to be retried.
    pub fn waiting(&self) -> usize {
        self.lock().fresh.len() + self.held.load(Ordering::Relaxed)
    }

    fn drop_one<S: Sink>(&self, sink: &S) {
        sink.lost();
        let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if dropped == 1 || dropped.is_multiple_of(10_000) {
            log::warn!(
                "{} settlements wait for the store (store.settle_queue_max): dropping new \
                 ones, {dropped} so far (counted as settlement_lost)",
                self.max_waiting
            );
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        match self.queue.lock() {
            Ok(q) => q,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Marks the flusher parked if nothing fresh is queued; false if something is.
    fn park_if_idle(&self) -> bool {
        let mut q = self.lock();
        q.parked = q.fresh.is_empty();
        q.parked
    }

    /// Takes the next fresh settlements, counting them as held in the same step (so a
    /// push never sees them in neither place).
    fn take_fresh(&self) -> Vec<Pending> {
        let mut q = self.lock();
        let taken: Vec<Pending> = if q.fresh.len() <= FRESH_PER_FLUSH {
            std::mem::take(&mut q.fresh)
        } else {
            q.fresh.drain(..FRESH_PER_FLUSH).collect()
        };
        self.held.fetch_add(taken.len(), Ordering::Relaxed);
        taken
    }
}

/// The flusher's state: its hold on the settler, and the retries only it touches. If the
/// flusher ends (its gateway gone, or a panic), the retries go back to the queue and the
/// next push starts another flusher instead of queueing for no one. A batch in flight
/// when a flusher panics is counted lost (`Sending`), not retried: the same batch could
/// panic every flusher after it.
struct Running {
    settler: Arc<Settler>,
    retries: Retries,
}

impl Drop for Running {
    fn drop(&mut self) {
        if std::thread::panicking() {
            log::error!("the settlement flusher panicked; the next settlement starts another");
        }
        let retries = std::mem::take(&mut self.retries.0);
        let mut q = self.settler.lock();
        // Under the lock, like take_fresh's count, so that `waiting` never reads the
        // retries in neither place.
        self.settler.held.store(0, Ordering::Relaxed);
        q.fresh.extend(retries.into_iter().map(|Reverse(Due(p))| p));
        q.started = false;
        q.parked = false;
    }
}

/// Retries, the earliest due first.
#[derive(Default)]
struct Retries(BinaryHeap<Reverse<Due>>);

struct Due(Pending);

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.0.meta.due == other.0.meta.due
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.meta.due.cmp(&other.0.meta.due)
    }
}

impl Retries {
    fn next_due(&self) -> Option<Instant> {
        self.0.peek().map(|Reverse(d)| d.0.meta.due)
    }

    fn take_due(&mut self, now: Instant, into: &mut Vec<Pending>) {
        for _ in 0..RETRIES_PER_FLUSH {
            if self.next_due().is_none_or(|due| due > now) {
                break;
            }
            if let Some(Reverse(Due(p))) = self.0.pop() {
                into.push(p);
            }
        }
    }

    fn put(&mut self, p: Pending) {
        self.0.push(Reverse(Due(p)));
    }
}

async fn flush_loop<S: Sink>(mut running: Running, sink: Weak<S>) {
    loop {
        let settler = &running.settler;
        if !settler.park_if_idle() {
            tokio::time::sleep(GATHER).await;
        } else if !retry_due_or_push(settler, &running.retries).await {
            continue;
        }
        let mut batch = settler.take_fresh();
        running.retries.take_due(Instant::now(), &mut batch);
        if batch.is_empty() {
            continue;
        }
        // The gateway is gone (a test's): so is what it would have settled.
        let Some(sink) = sink.upgrade() else {
            return;
        };
        let held = batch.len() + running.retries.0.len();
        sink.waiting(held);
        flush(&sink, batch, &mut running.retries).await;
        let held = running.retries.0.len();
        running.settler.held.store(held, Ordering::Relaxed);
        sink.waiting(held);
    }
}

/// Parked: waits for the first retry to be due (true) or for a push (false: go round and
/// gather first).
async fn retry_due_or_push(settler: &Settler, retries: &Retries) -> bool {
    match retries.next_due() {
        Some(due) => tokio::select! {
            _ = tokio::time::sleep_until(due) => {
                settler.lock().parked = false;
                true
            }
            _ = settler.wake.notified() => false,
        },
        None => {
            settler.wake.notified().await;
            false
        }
    }
}

/// Sends one batch; what failed goes back to `retries` with its backoff, or is given up.
async fn flush<S: Sink>(sink: &Arc<S>, batch: Vec<Pending>, retries: &mut Retries) {
    let (settlements, metas): (Vec<Settlement>, Vec<Meta>) =
        batch.into_iter().map(|p| (p.settlement, p.meta)).unzip();
    let mut sending = Sending {
        sink: sink.as_ref(),
        n: settlements.len(),
    };
    let results = sink.settle_many(&settlements).await;
    sending.n = 0;
    // A store that answered for fewer than it was given left the rest unknown: retried.
    let unanswered = || Err(StoreError::Unavailable("no result for a settlement".into()));
    let results = results
        .into_iter()
        .chain(std::iter::repeat_with(unanswered));
    let now = Instant::now();
    let (mut retried, mut lost, mut first_error) = (0, 0, None);
    for ((settlement, mut meta), result) in settlements.into_iter().zip(metas).zip(results) {
        let Err(e) = result else {
            sink.clone().settled(settlement.scopes, meta.budgets);
            continue;
        };
        first_error.get_or_insert(e);
        if now + meta.backoff > meta.give_up {
            sink.lost();
            lost += 1;
            continue;
        }
        meta.due = now + meta.backoff;
        meta.backoff = (meta.backoff * 2).min(LONGEST_RETRY);
        retries.put(Pending { settlement, meta });
        retried += 1;
    }
    if let Some(e) = first_error {
        log::warn!("settling requests: {e}; {retried} to retry with backoff, {lost} given up");
    }
}

/// A batch handed to the store: if the store's call does not return (it panicked, or the
/// runtime is being torn down), its `n` settlements are counted lost as the flusher
/// ends (`n` is zeroed once the call returns).
struct Sending<'a, S: Sink> {
    sink: &'a S,
    n: usize,
}

impl<S: Sink> Drop for Sending<'_, S> {
    fn drop(&mut self) {
        for _ in 0..self.n {
            self.sink.lost();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A store that fails its first `failing` calls, and answers `short` results fewer than
    /// it was given on the call after those; with `panics`, its first call panics.
    #[derive(Default)]
    struct Fake {
        failing: usize,
        short: usize,
        panics: bool,
        calls: Mutex<Vec<Vec<String>>>,
        settled: Mutex<Vec<String>>,
        lost: AtomicUsize,
    }

    #[async_trait]
    impl Sink for Fake {
        async fn settle_many(&self, batch: &[Settlement]) -> Vec<Result<(), StoreError>> {
            let ids: Vec<String> = batch.iter().map(|s| s.request_id.clone()).collect();
            let n = {
                let mut calls = self.calls.lock().expect("lock");
                calls.push(ids);
                calls.len()
            };
            assert!(!(self.panics && n == 1), "the store's first call panics");
            if n <= self.failing {
                return vec![Err(StoreError::Timeout); batch.len()];
            }
            let answered = if n == self.failing + 1 {
                batch.len().saturating_sub(self.short)
            } else {
                batch.len()
            };
            vec![Ok(()); answered]
        }

        fn settled(self: Arc<Self>, scopes: Vec<String>, _budgets: Vec<Applied>) {
            self.settled.lock().expect("lock").extend(scopes);
        }

        fn lost(&self) {
            self.lost.fetch_add(1, Ordering::SeqCst);
        }

        fn waiting(&self, _n: usize) {}
    }

    fn settlement(id: &str) -> Settlement {
        Settlement {
            unused_steps: None,
            rpm_only: 0,
            request_id: id.into(),
            scopes: vec![format!("scope-of-{id}")],
            cost_nano: 1,
            tokens: 1,
        }
    }

    fn push(settler: &Arc<Settler>, sink: &Arc<Fake>, id: &str) {
        settler.push(sink, settlement(id), Vec::new());
    }

    fn calls(sink: &Fake) -> Vec<Vec<String>> {
        sink.calls.lock().expect("lock").clone()
    }

    fn settled(sink: &Fake) -> usize {
        sink.settled.lock().expect("lock").len()
    }

    /// Lets the flusher run until it waits on time that has not come yet.
    async fn settle_down() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pushes_gather_into_one_call_and_a_parked_flusher_wakes_for_the_next() {
        let (settler, sink) = (Arc::new(Settler::default()), Arc::new(Fake::default()));
        push(&settler, &sink, "a");
        push(&settler, &sink, "b");
        settle_down().await;
        assert!(
            calls(&sink).is_empty(),
            "nothing goes before the gather window"
        );
        tokio::time::sleep(GATHER).await;
        settle_down().await;
        assert_eq!(calls(&sink), vec![vec!["a", "b"]]);
        assert_eq!(settled(&sink), 2);
        // Parked now; a push a minute later wakes it and goes after its own window.
        tokio::time::sleep(Duration::from_secs(60)).await;
        push(&settler, &sink, "c");
        settle_down().await;
        assert_eq!(calls(&sink).len(), 1, "a woken flusher gathers first");
        tokio::time::sleep(GATHER).await;
        settle_down().await;
        assert_eq!(calls(&sink).len(), 2);
        assert_eq!(calls(&sink)[1], vec!["c"]);
        assert_eq!(settled(&sink), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_retried_with_backoff_until_they_land() {
        let sink = Arc::new(Fake {
            failing: 3,
            ..Fake::default()
        });
        let settler = Arc::new(Settler::default());
        push(&settler, &sink, "a");
        let start = Instant::now();
        while settled(&sink) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Tries at +20 ms, then 100, 200 and 400 ms after each failure.
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(720) && waited < Duration::from_millis(800),
            "{waited:?}"
        );
        assert_eq!(calls(&sink).len(), 4);
        assert_eq!(sink.lost.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_answer_is_retried_and_a_settlement_failing_for_good_is_counted_lost() {
        let sink = Arc::new(Fake {
            short: 1,
            ..Fake::default()
        });
        let settler = Arc::new(Settler::default());
        push(&settler, &sink, "a");
        push(&settler, &sink, "b");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(calls(&sink), vec![vec!["a", "b"], vec!["b"]]);
        assert_eq!(settled(&sink), 2);

        let sink = Arc::new(Fake {
            failing: usize::MAX,
            ..Fake::default()
        });
        let settler = Arc::new(Settler::default());
        push(&settler, &sink, "x");
        tokio::time::sleep(RETRY_FOR - Duration::from_secs(10)).await;
        assert_eq!(sink.lost.load(Ordering::SeqCst), 0, "still retrying");
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(sink.lost.load(Ordering::SeqCst), 1);
        let tries = calls(&sink).len();
        assert!(
            (360..=370).contains(&tries),
            "5 s apart after the first few: {tries}"
        );
        assert_eq!(settled(&sink), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlog_of_retries_drains_in_steps() {
        let sink = Arc::new(Fake {
            failing: 1,
            ..Fake::default()
        });
        let settler = Arc::new(Settler::default());
        for i in 0..RETRIES_PER_FLUSH + 100 {
            push(&settler, &sink, &format!("r{i}"));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let sizes: Vec<usize> = calls(&sink).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![RETRIES_PER_FLUSH + 100, RETRIES_PER_FLUSH, 100]);
        assert_eq!(settled(&sink), RETRIES_PER_FLUSH + 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_sends_at_most_its_share_of_fresh_settlements() {
        let sink = Arc::new(Fake::default());
        let settler = Arc::new(Settler::default());
        for i in 0..FRESH_PER_FLUSH + 10 {
            push(&settler, &sink, &format!("f{i}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sizes: Vec<usize> = calls(&sink).iter().map(Vec::len).collect();
        assert_eq!(
            sizes,
            vec![FRESH_PER_FLUSH, 10],
            "the rest in the next flush"
        );
        assert_eq!(
            calls(&sink)[1][0],
            format!("f{FRESH_PER_FLUSH}"),
            "in order"
        );
        assert_eq!(settled(&sink), FRESH_PER_FLUSH + 10);
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_cap_a_settlement_is_dropped_and_counted_lost() {
        let sink = Arc::new(Fake {
            failing: 2,
            ..Fake::default()
        });
        let settler = Arc::new(Settler::new(10));
        for i in 0..15 {
            push(&settler, &sink, &format!("a{i}"));
        }
        assert_eq!(sink.lost.load(Ordering::SeqCst), 5, "queued: 10");
        tokio::time::sleep(GATHER + Duration::from_millis(10)).await;
        assert_eq!(calls(&sink).len(), 1, "the first call failed");
        push(&settler, &sink, "b");
        assert_eq!(
            sink.lost.load(Ordering::SeqCst),
            6,
            "the ten to retry still count"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(settled(&sink), 10, "the retries landed");
        push(&settler, &sink, "c");
        tokio::time::sleep(GATHER + Duration::from_millis(10)).await;
        assert_eq!(settled(&sink), 11, "room again once they landed");
        assert_eq!(sink.lost.load(Ordering::SeqCst), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_flusher_panics_the_next_push_starts_another() {
        let sink = Arc::new(Fake {
            panics: true,
            ..Fake::default()
        });
        let settler = Arc::new(Settler::default());
        push(&settler, &sink, "a");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(calls(&sink).len(), 1, "the first call panicked");
        push(&settler, &sink, "b");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(calls(&sink), vec![vec!["a"], vec!["b"]]);
        assert_eq!(settled(&sink), 1);
        assert_eq!(
            sink.lost.load(Ordering::SeqCst),
            1,
            "the batch in flight when it panicked is counted lost"
        );
    }
}
