//! Settlements off the request path. A finished request queues its settlement here and
//! moves on; one task per gateway (the flusher) sends what has gathered to the store every
//! `GATHER`, as one batch (with Redis: script calls of up to 8 settlements), and retries
//! what failed with backoff for up to `RETRY_FOR`, which also replays the settlements of
//! requests admitted `open` during an outage. A settlement that still fails then is
//! missing from the store (the ledger record has it), and
//! `tollgate_store_degraded_total{outcome="settlement_lost"}` counts it.
//!
//! Why one task and not one per settlement: with Redis, a task per request cost the gateway
//! a spawn, a timer and wake-ups across its worker threads on every request, and a
//! settlement that rode on the next reservation's script call made that reservation, on
//! the request path, wait for settlement work (BENCHMARKS.md, sixth round).
//!
//! A late settlement never lets spend through: until it is applied, the request's
//! reservation holds its worst case. Settlements still queued when the process stops are
//! missing from the store as a crash mid-request's are: their leases expire.

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

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

#[derive(Default)]
struct Queue {
    fresh: Vec<Pending>,
    retrying: Vec<Pending>,
    /// The flusher waits for a push: nothing fresh was queued when it last looked.
    parked: bool,
    started: bool,
}

/// What the flusher does next.
enum Plan {
    /// Fresh settlements are queued: gather for `GATHER`, then send.
    Gather,
    /// Only retries wait: sleep until the first is due, unless a fresh one comes.
    RetryAt(Instant),
    /// Nothing is queued: wait for a push.
    Park,
}

#[derive(Default)]
pub struct Settler {
    queue: Mutex<Queue>,
    wake: Notify,
}

impl Settler {
    /// Queues a settlement. The first call starts the flusher, in the caller's runtime
    /// (the proxy's), where the store's request connection lives too.
    pub fn push(self: &Arc<Self>, state: &Arc<State>, s: Settlement, budgets: Vec<Applied>) {
        let now = Instant::now();
        let pending = Pending {
            settlement: s,
            meta: Meta {
                budgets,
                give_up: now + RETRY_FOR,
                due: now,
                backoff: FIRST_RETRY,
            },
        };
        let (start, wake) = {
            let mut q = self.lock();
            q.fresh.push(pending);
            (
                !std::mem::replace(&mut q.started, true),
                std::mem::take(&mut q.parked),
            )
        };
        if start {
            tokio::spawn(flush_loop(self.clone(), Arc::downgrade(state)));
        } else if wake {
            self.wake.notify_one();
        }
    }

    /// How many settlements wait, fresh or for a retry (tests).
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        let q = self.lock();
        q.fresh.len() + q.retrying.len()
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        match self.queue.lock() {
            Ok(q) => q,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn plan(&self) -> Plan {
        let mut q = self.lock();
        if !q.fresh.is_empty() {
            return Plan::Gather;
        }
        q.parked = true;
        match q.retrying.iter().map(|p| p.meta.due).min() {
            Some(due) => Plan::RetryAt(due),
            None => Plan::Park,
        }
    }

    /// Everything fresh, and the retries due by `now`.
    fn take(&self, now: Instant) -> Vec<Pending> {
        let mut q = self.lock();
        let mut batch = std::mem::take(&mut q.fresh);
        let (due, later) = std::mem::take(&mut q.retrying)
            .into_iter()
            .partition(|p| p.meta.due <= now);
        q.retrying = later;
        batch.extend::<Vec<Pending>>(due);
        batch
    }

    fn retry(&self, pending: Vec<Pending>) {
        self.lock().retrying.extend(pending);
    }
}

async fn flush_loop(settler: Arc<Settler>, state: Weak<State>) {
    loop {
        match settler.plan() {
            Plan::Gather => tokio::time::sleep(GATHER).await,
            Plan::RetryAt(due) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = settler.wake.notified() => continue,
                }
            }
            Plan::Park => {
                settler.wake.notified().await;
                continue;
            }
        }
        // The gateway is gone (a test's): so is what it would have settled.
        let Some(state) = state.upgrade() else {
            return;
        };
        let batch = settler.take(Instant::now());
        if !batch.is_empty() {
            let failed = flush(&state, batch).await;
            settler.retry(failed);
        }
    }
}

/// Sends one batch; returns what failed and is to be tried again.
async fn flush(state: &Arc<State>, batch: Vec<Pending>) -> Vec<Pending> {
    let (settlements, metas): (Vec<Settlement>, Vec<Meta>) =
        batch.into_iter().map(|p| (p.settlement, p.meta)).unzip();
    let results = state.store.settle_many(&settlements).await;
    // A store that answered for fewer than it was given left the rest unknown: retried.
    let unanswered = || Err(StoreError::Internal("no settlement result".into()));
    let results = results
        .into_iter()
        .chain(std::iter::repeat_with(unanswered));
    let now = Instant::now();
    let (mut failed, mut lost, mut first_error) = (Vec::new(), 0, None);
    for ((settlement, mut meta), result) in settlements.into_iter().zip(metas).zip(results) {
        let Err(e) = result else {
            crate::admission::settled(state, settlement.scopes, meta.budgets);
            continue;
        };
        first_error.get_or_insert(e);
        if now + meta.backoff > meta.give_up {
            state.metrics.store_degraded("settlement_lost");
            lost += 1;
            continue;
        }
        meta.due = now + meta.backoff;
        meta.backoff = (meta.backoff * 2).min(LONGEST_RETRY);
        failed.push(Pending { settlement, meta });
    }
    if let Some(e) = first_error {
        log::warn!(
            "settling requests: {e}; {} to retry with backoff, {lost} given up",
            failed.len()
        );
    }
    failed
}
