//! Graceful shutdown (SIGTERM): what a deploy's restart must not lose.
//!
//! Pingora stops accepting connections and closes idle ones when the signal comes, but
//! left to itself it then drops every request still running once its grace period ends:
//! a call the provider is already answering (and billing) would lose its usage record
//! and its settlement, and the embedded store's journal would lose what its syncer had
//! not yet written (up to `SYNC_INTERVAL`). So the gateway drains instead:
//!
//! 1. it waits, for at most `server.shutdown_drain_seconds`, until nothing is left and
//!    nothing new has started for `QUIET`: no proxy request in flight (streams included),
//!    no task started on a request's behalf (alert webhooks, runaway blocks, prompt
//!    records), no settlement queued (`crate::settler`);
//! 2. it hands its last usage rollups to a shared store, flushes the embedded store's
//!    journal and fsyncs the ledger;
//! 3. it exits at once, instead of sleeping out the rest of Pingora's grace period.
//!
//! The quiet period covers what zero alone would not: an HTTP/2 client may still open a
//! stream on its connection after the GOAWAY, and a response's last frames and trailers
//! are written by the connection's task just after the request's `logging` has ended.
//!
//! A request still running at the bound is cut, as a crash would cut it: its reservation
//! is released when its lease expires. Admin-port calls in flight (a budget or key being
//! made, a usage query) are waited for once the rest is quiet, but do not break the
//! quiet, so a probe or a scrape polling the admin port cannot hold the drain to its
//! bound. (A call's guard ends when its handler returns, just before Pingora writes its
//! reply: one that starts and ends in the drain's last few milliseconds can still lose
//! its reply, though not its change, which the last writes keep.) Once the
//! drain has started, Pingora listens for no further signal: only SIGKILL stops it early.
//! SIGINT is Pingora's fast shutdown: nothing drains, but the journal and the ledger still
//! get their last writes (`last_writes`).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::logger::stderr_line;
use crate::proxy::State;

/// How often the drain looks at what is left.
const POLL: Duration = Duration::from_millis(10);
/// How long everything must have stayed idle before the process exits.
const QUIET: Duration = Duration::from_millis(300);

/// Requests and request-started tasks running now: what a drain waits for.
#[derive(Default)]
pub struct Work {
    running: Arc<AtomicUsize>,
    /// Bumped by every start, so that the drain sees work that came and went between
    /// two of its looks.
    started: AtomicUsize,
    /// Admin-port calls in flight (`hold`): waited for once the rest is quiet.
    held: Arc<AtomicUsize>,
}

/// One unit of running work; dropping it (however its request or task ends, a panic
/// included) ends it.
pub struct WorkGuard(Arc<AtomicUsize>);

impl Drop for WorkGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Work {
    pub fn start(&self) -> WorkGuard {
        self.started.fetch_add(1, Ordering::AcqRel);
        self.running.fetch_add(1, Ordering::AcqRel);
        WorkGuard(self.running.clone())
    }

    /// An admin-port call: the drain waits for it once the proxy's work is quiet, but it
    /// does not break the quiet, so a readiness probe or a scrape that keeps polling
    /// during the drain (a slow one too, `/readyz` while Redis is down) cannot hold the
    /// drain to its bound.
    pub fn hold(&self) -> WorkGuard {
        self.held.fetch_add(1, Ordering::AcqRel);
        WorkGuard(self.held.clone())
    }

    fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// `tokio::spawn`, counted as work until the task ends.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let guard = self.start();
        tokio::spawn(async move {
            task.await;
            drop(guard);
        });
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    fn started(&self) -> usize {
        self.started.load(Ordering::Acquire)
    }
}

/// What was left when the drain ended.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Leftover {
    pub running: usize,
    pub settlements: usize,
    pub rollups_pushed: bool,
}

/// Steps 1 and 2 above; returns what could not finish within `within`.
pub async fn drain(state: &Arc<State>, within: Duration) -> Leftover {
    let deadline = Instant::now() + within;
    // A share of the bound is kept for giving back budget slices, which can only go once
    // their requests have settled.
    let give_back_share = (within / 10).min(Duration::from_secs(1));
    let (running, settlements) = wait_for_quiet(state, deadline - give_back_share).await;
    let held = wait_for_admin_calls(state, deadline - give_back_share).await;
    // Budget slices go back once their requests have settled.
    // Within the bound only: the last rollup push may need the second past it.
    let _ = tokio::time::timeout_at(deadline, state.store.give_back_all()).await;
    let rollups_pushed = push_last_rollups(state, deadline).await;
    last_writes(state);
    Leftover {
        running: running + held,
        settlements,
        rollups_pushed,
    }
}

/// Polls until no admin-port call is in flight, or the deadline; returns how many were.
async fn wait_for_admin_calls(state: &State, deadline: Instant) -> usize {
    loop {
        let held = state.work.held();
        if held == 0 || Instant::now() >= deadline {
            return held;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls until no work and no settlement has been seen for `QUIET`, or the deadline;
/// returns what was left at the last look.
async fn wait_for_quiet(state: &State, deadline: Instant) -> (usize, usize) {
    let mut idle_since: Option<Instant> = None;
    let mut started = state.work.started();
    loop {
        let (running, settlements) = (state.work.running(), state.settler.waiting());
        let now = Instant::now();
        let seen = state.work.started();
        let idle = running == 0 && settlements == 0 && seen == started;
        started = seen;
        idle_since = if idle { idle_since.or(Some(now)) } else { None };
        let quiet = idle_since.is_some_and(|t| now.duration_since(t) >= QUIET);
        if quiet || now >= deadline {
            return (running, settlements);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The rollups not yet in the shared store: a batch still pending from before goes first,
/// then what the drained requests added. False if some could not be pushed in time: the
/// tries end a second past the deadline at the latest, inside Pingora's 2 s margin.
async fn push_last_rollups(state: &State, deadline: Instant) -> bool {
    let tries = async {
        // At least three calls: a pending batch, then the newer rows, then a look that
        // finds nothing left; with a store that fails, until the deadline.
        let mut calls = 0;
        loop {
            if state.push_rollups().await {
                return true;
            }
            calls += 1;
            if calls >= 3 && Instant::now() >= deadline {
                return false;
            }
            if calls >= 3 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    tokio::time::timeout_at(deadline + Duration::from_secs(1), tries)
        .await
        .unwrap_or(false)
}

/// The embedded store's journal and the ledger, written out and fsynced now; also after
/// a fast shutdown (SIGINT), once Pingora's runtimes have stopped.
pub fn last_writes(state: &State) {
    if let Err(e) = state.store.flush() {
        stderr_line(&format!(
            "tollgate: shutdown: the store's last writes failed: {e}"
        ));
    }
    let unwritten = state.ledger.maintain();
    if unwritten > 0 {
        // Kept in memory while the file could not be written (`tollgate_ledger_errors_total`
        // counted each); the process ends with them.
        stderr_line(&format!(
            "tollgate: shutdown: {unwritten} usage records could not be written to the ledger and are lost"
        ));
    }
}

impl Leftover {
    fn is_clean(&self) -> bool {
        self.running == 0 && self.settlements == 0 && self.rollups_pushed
    }
}

/// One line on stderr saying how the drain ended (always shown, whatever `TOLLGATE_LOG`
/// says: it is the process's last word).
pub fn report(left: &Leftover) {
    if left.is_clean() {
        stderr_line("tollgate: drained, exiting");
        return;
    }
    stderr_line(&format!(
        "tollgate: exiting at server.shutdown_drain_seconds with {} requests or tasks \
         still running (cut), {} settlements not in the store (their leases expire){}",
        left.running,
        left.settlements,
        if left.rollups_pushed {
            ""
        } else {
            ", usage rollups not all shared"
        }
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_counts_requests_and_tasks_until_they_end() {
        let work = Work::default();
        let request = work.start();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        work.spawn(async move {
            let _ = rx.await;
        });
        assert_eq!(work.running(), 2);
        drop(request);
        assert_eq!(work.running(), 1);
        let _ = tx.send(());
        for _ in 0..100 {
            if work.running() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(work.running(), 0, "the task ended");
        assert_eq!(work.started(), 2);
    }

    #[test]
    fn an_admin_call_is_held_apart_from_the_work_that_breaks_the_quiet() {
        let work = Work::default();
        let call = work.hold();
        assert_eq!((work.held(), work.running(), work.started()), (1, 0, 0));
        drop(call);
        assert_eq!(work.held(), 0);
    }

    #[tokio::test]
    async fn a_panicking_task_still_ends_its_work() {
        let work = Work::default();
        work.spawn(async { panic!("a task's bug") });
        for _ in 0..100 {
            if work.running() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(work.running(), 0);
    }
}
