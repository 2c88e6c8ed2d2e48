//! Budget slices: admission without a Redis round trip for most requests.
//!
//! With `store.slice_requests: N`, a gateway reserves N requests' worth of a set of scopes'
//! budgets (and N requests-per-minute steps) in one ordinary reservation (a "slice", a lease
//! like any request's), then admits the next requests of that same set of scopes against
//! it in process, until it is used up or `store.slice_ms` has passed. A request admitted
//! from a slice makes no Redis call at all: when it settles, its actual cost is added to
//! its slice's give-back. Once the slice is closed and every request admitted from it has
//! settled, the give-back settles the slice's lease in Redis, exactly once, with the sum
//! of their costs (and the requests-per-minute steps it did not use). So their worst case
//! stays reserved in Redis until their actual cost is counted there, and nothing is
//! counted twice meanwhile.
//!
//! What this keeps: nothing is ever admitted that Redis has not reserved, so no gateway
//! can overspend a cap, whatever the others do. What it costs:
//! - A quarter before a slice is used up, the next request takes the next slice while the
//!   others go on admitting from the old one (`Shared::refill_at`): for that moment a set
//!   holds up to two slices, and the old one's unused requests go back with it.
//! - Headroom parked in one gateway's slice is not available to another until the slice
//!   is closed and given back: near a cap a request may be refused that a per-request
//!   reservation would have admitted. When a slice cannot be reserved (the cap, or the rate
//!   limit, is too close), the set goes back to per-request reservations for `slice_ms`.
//! - A slice takes its N requests-per-minute steps at once (so slicing is only used where
//!   N steps are at most a second of the limit's allowance); the unused ones go back with
//!   it.
//! - A request admitted from a slice has no lease of its own: its cost counts in the
//!   periods of its slice's lease (or, if that lapsed first, those current when it lands).
//!   So slices are not used in the last lease time before a budget's period ends
//!   (`period_allows_slices`).
//! - Budget headers of a request admitted from a slice show the budgets as the slice's
//!   reservation left them, less what the slice still holds unused.
//! - The spend of a slice's requests reaches Redis when the slice is given back (within
//!   `slice_ms` of its last admission, plus its longest request), not request by request:
//!   `spent` and other gateways see the slice's reservation until then. After a crash
//!   that spend is missing from Redis's budgets (the ledger has every request), as a
//!   queued settlement's is; the slice's lease then lapses as any lease does.
//!
//! Only requests whose scopes have nothing but block budgets and requests-per-minute
//! limits take slices; clamp or shadow budgets, tokens-per-minute and concurrency limits
//! (which need each request's own count) reserve per request, as without slices.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use super::memory::{system_clock, Clock};
use super::{
    BudgetStatus, Decision, Enforcement, Period, ReserveRequest, ScopeCheck, Settlement, Store,
    StoreError, UnusedSteps,
};

/// Most slices waiting to be given back: past it the oldest are left to their leases'
/// expiry (Redis unreachable for long).
const MAX_RETURNS: usize = 4096;

/// 2^53: the largest amount the Redis script keeps exactly.
const EXACT: u64 = 1 << 53;

pub struct Sliced {
    shared: Arc<Shared>,
}

struct Shared {
    inner: Arc<dyn Store>,
    /// Requests per slice.
    requests: u64,
    /// How long a slice admits.
    ttl: Duration,
    /// Slice lease ids: unique to this process, so gateways never share one.
    id_prefix: String,
    next: AtomicU64,
    book: Mutex<Book>,
    /// Woken when a set's slice taking ends (taken, refused, failed or dropped), for the
    /// requests waiting for it. Why they wait rather than reserve one by one: under load,
    /// the requests arriving during a slice's round trip were a third of all, and each
    /// cost Redis a reservation and a settlement of its own (BENCHMARKS.md, sixteenth
    /// round); they would have waited as long for their own round trip.
    changed: tokio::sync::Notify,
    sweeper: std::sync::Once,
    /// Wall-clock milliseconds, for where a budget's period ends (tests pin it away from
    /// midnight; slice lifetimes run on `Instant`).
    clock: Clock,
}

#[derive(Default)]
struct Book {
    /// Per set of scopes (`set_key`): what a request of that set does now.
    sets: HashMap<String, SetState>,
    /// Every slice not yet given back, by number.
    slices: HashMap<u64, Slice>,
    /// Which slice each request admitted from one came from, until it settles.
    owners: HashMap<String, u64>,
    /// Closed slices whose requests have all settled: to give back.
    returns: Vec<Settlement>,
}

enum SetState {
    /// A request is reserving a new slice; the others wait for it (`Local::Wait`).
    Taking,
    /// Admitting from this slice.
    Live(u64),
    /// Admitting from this slice, nearly used up, while a request reserves the next one
    /// (`Shared::refill_at`); once it is used up the others wait for the next.
    Refilling(u64),
    /// The last slice was refused: per-request reservations until then.
    Exact { until: Instant },
}

struct Slice {
    /// Its set's key.
    key: String,
    /// Its zero-cost settlement, which gives the reservation back.
    release: Settlement,
    money_left: u64,
    requests_left: u64,
    /// Admits until then.
    until: Instant,
    /// The budgets as the slice's reservation left them.
    budgets: Vec<BudgetStatus>,
    /// Requests admitted from it and not yet settled.
    in_flight: u64,
    closed: bool,
    /// When Redis releases its lease by itself: a slice whose requests never all settle
    /// (a settlement dropped as lost) is forgotten then.
    lease_ends: Instant,
}

enum Local {
    Admitted(Vec<BudgetStatus>),
    /// Reserve this request alone.
    Exact,
    /// This request takes a new slice (to replace this one, still admitting meanwhile).
    Take(Option<u64>),
    /// Another request is taking the set's next slice: wait for it (`Shared::changed`).
    Wait,
}

impl Sliced {
    pub fn new(inner: Arc<dyn Store>, requests: u64, ttl: Duration) -> Sliced {
        Sliced::with_clock(inner, requests, ttl, system_clock())
    }

    pub fn with_clock(inner: Arc<dyn Store>, requests: u64, ttl: Duration, clock: Clock) -> Sliced {
        let nonce = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Sliced {
            shared: Arc::new(Shared {
                inner,
                requests: requests.max(1),
                ttl,
                id_prefix: format!("slice-{}-{nonce:x}-", std::process::id()),
                next: AtomicU64::new(0),
                book: Mutex::new(Book::default()),
                changed: tokio::sync::Notify::new(),
                sweeper: std::sync::Once::new(),
                clock,
            }),
        }
    }
}

impl Shared {
    fn book(&self) -> MutexGuard<'_, Book> {
        // A panic while holding the lock leaves counts, never a broken invariant that
        // matters for money: the worst is a slice given back late (at its lease's expiry).
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this request may be admitted from a slice (see the module doc).
    fn sliceable(&self, req: &ReserveRequest) -> bool {
        req.requests <= 1
            && !req.scopes.is_empty()
            && req.scopes.iter().all(|c| {
                c.tpm.is_none()
                    && c.concurrency.is_none()
                    && c.budgets
                        .iter()
                        .all(|b| b.enforcement == Enforcement::Block)
                    && c.rpm
                        .is_none_or(|rpm| rpm >= self.requests.saturating_mul(60))
            })
    }

    /// When a live slice has this many requests left, the next request takes the next
    /// slice while the others go on admitting from this one. Why: at high concurrency,
    /// waiting until a slice is used up sent every request arriving during the next
    /// slice's round trip to Redis on its own (about half of them at 64 connections,
    /// BENCHMARKS.md, sixteenth round).
    /// Slices of fewer than 4 requests are not refilled ahead: a quarter of them is
    /// less than one request.
    fn refill_at(&self) -> u64 {
        self.requests / 4
    }

    fn decide_locally(&self, key: &str, amount: u64, req_id: &str, now: Instant) -> Local {
        let mut book = self.book();
        let book = &mut *book;
        let (n, refilling) = match book.sets.get(key) {
            Some(SetState::Taking) => return Local::Wait,
            Some(SetState::Exact { until }) if *until > now => return Local::Exact,
            Some(SetState::Live(n)) => (*n, false),
            Some(SetState::Refilling(n)) => (*n, true),
            _ => {
                book.sets.insert(key.to_string(), SetState::Taking);
                return Local::Take(None);
            }
        };
        if let Some(s) = book.slices.get_mut(&n) {
            let open = !s.closed && s.until > now;
            if open && s.money_left >= amount && s.requests_left > 0 {
                if !refilling && s.requests_left <= self.refill_at() {
                    book.sets.insert(key.to_string(), SetState::Refilling(n));
                    return Local::Take(Some(n));
                }
                s.money_left -= amount;
                s.requests_left -= 1;
                s.in_flight += 1;
                book.owners.insert(req_id.to_string(), n);
                return Local::Admitted(as_admitted(&s.budgets, s.money_left));
            }
        }
        close(book, n);
        if refilling {
            return Local::Wait;
        }
        book.sets.insert(key.to_string(), SetState::Taking);
        Local::Take(None)
    }

    /// Reserves a slice for `req`'s scopes and admits `req` from it; when the slice is
    /// refused, reserves `req` alone.
    async fn take_slice(
        self: &Arc<Self>,
        req: &ReserveRequest,
        key: String,
        amount: u64,
        replacing: Option<u64>,
    ) -> Result<Decision, StoreError> {
        self.start_sweeper();
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let mut taking = Taking {
            shared: self,
            key: Some(key),
            release: None,
            replacing,
        };
        if !period_allows_slices(&req.scopes, (self.clock)(), req.lease_ms, ttl_ms) {
            taking.finish(SetState::Exact {
                until: Instant::now() + self.ttl,
            });
            return self.inner.reserve(req).await;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let slice = ReserveRequest {
            request_id: format!("{}{n}", self.id_prefix),
            scopes: req.scopes.clone(),
            // Redis's script holds amounts up to 2^53 (see store::redis): so does a slice.
            fixed_nano: amount.saturating_mul(self.requests).min(EXACT),
            per_output_nano: 0,
            max_output_tokens: 0,
            min_output_tokens: 0,
            tokens: 0,
            requests: self.requests,
            lease_ms: req.lease_ms.saturating_add(ttl_ms),
        };
        // A slice this gateway just closed goes back first, or its own parked headroom
        // could refuse the new one.
        self.give_back().await;
        // If the call fails or is dropped half way, Redis may still have made the slice:
        // its give-back is then queued (harmless if there was none: exactly once, zero cost).
        taking.release = Some(Settlement {
            request_id: slice.request_id.clone(),
            // Every scope of a slice holds a lease (see store::redis, rpm_leases), so the
            // give-back leaves none out.
            rpm_only: 0,
            scopes: slice.scopes.iter().map(|c| c.scope.clone()).collect(),
            cost_nano: 0,
            tokens: 0,
            unused_steps: Some(UnusedSteps {
                unused: self.requests,
                of: self.requests,
            }),
        });
        let started = Instant::now();
        let decision = match self.inner.reserve(&slice).await {
            Ok(d) => d,
            Err(e) => {
                // Likely Redis down: the set reserves one by one for a while, rather than
                // each request trying a slice first.
                taking.finish(SetState::Exact {
                    until: Instant::now() + self.ttl,
                });
                return Err(e);
            }
        };
        let now = Instant::now();
        let Decision::Admitted { budgets, .. } = decision else {
            taking.release = None; // refused: Redis holds nothing
            taking.finish(SetState::Exact {
                until: now + self.ttl,
            });
            return self.inner.reserve(req).await;
        };
        let Some(release) = taking.release.take() else {
            return Err(StoreError::Internal("slice give-back missing".into()));
        };
        let admits_for = admitting_for(self.ttl, &budgets, (self.clock)(), req.lease_ms);
        if admits_for.is_zero() {
            // Redis's clock puts a period's end nearer than the gateway's did: the slice
            // goes back unused and the request reserves alone, in its own periods.
            self.requeue(vec![release]);
            taking.finish(SetState::Exact {
                until: now + self.ttl,
            });
            return self.inner.reserve(req).await;
        }
        // Measured from before the call: Redis's lease began somewhere during it.
        let lease_ends = started
            .checked_add(Duration::from_millis(slice.lease_ms))
            .unwrap_or(started + admits_for);
        let money_left = slice.fixed_nano.saturating_sub(amount);
        let statuses = as_admitted(&budgets, money_left);
        {
            let mut book = self.book();
            let key = taking.key.clone().unwrap_or_default();
            book.slices.insert(
                n,
                Slice {
                    key,
                    release,
                    money_left,
                    requests_left: self.requests - 1,
                    until: started + admits_for,
                    budgets,
                    in_flight: 1,
                    closed: false,
                    lease_ends,
                },
            );
            book.owners.insert(req.request_id.clone(), n);
            // Under the same lock as the slice itself, so a sweep cannot close it in
            // between and leave the set pointing at a closed slice.
            if let Some(key) = taking.key.take() {
                book.sets.insert(key, SetState::Live(n));
            }
            if let Some(old) = taking.replacing.take() {
                close(&mut book, old);
            }
        }
        self.changed.notify_waiters();
        Ok(admitted(req, amount, statuses))
    }

    /// Settles `batch`, then gives back the slices whose requests have now all settled.
    /// A request admitted from a live slice makes no store call of its own: its cost is
    /// added to its slice's give-back, which settles the slice's lease with the sum of
    /// its requests' costs, once they have all finished (`fold_into_slices`). The rest go
    /// to the store; a slice's reservation goes only after its requests' spend is counted
    /// (a settlement that failed keeps its slice until its retry goes through).
    async fn settle_many(&self, batch: &[Settlement]) -> Vec<Result<(), StoreError>> {
        let folded = self.fold_into_slices(batch);
        let out = if folded.iter().all(|f| *f) {
            vec![Ok(()); batch.len()]
        } else if !folded.iter().any(|f| *f) {
            self.inner.settle_many(batch).await
        } else {
            let rest: Vec<Settlement> = batch
                .iter()
                .zip(&folded)
                .filter(|(_, f)| !**f)
                .map(|(s, _)| s.clone())
                .collect();
            let mut sent = self.inner.settle_many(&rest).await.into_iter();
            folded
                .iter()
                .map(|f| {
                    if *f {
                        Ok(())
                    } else {
                        sent.next().unwrap_or_else(|| {
                            Err(StoreError::Internal("no settlement result".into()))
                        })
                    }
                })
                .collect()
        };
        {
            let mut book = self.book();
            for ((s, result), f) in batch.iter().zip(&out).zip(&folded) {
                if result.is_ok() && !*f {
                    self.forget_owner(&mut book, &s.request_id);
                }
            }
        }
        // After a failure Redis is likely down: the sweeper tries again later.
        if out.iter().all(Result::is_ok) {
            self.give_back().await;
        }
        out
    }

    /// Adds the cost of each settlement whose request was admitted from a slice still
    /// held here to that slice's give-back, and marks it settled there: true for those.
    /// Why: one script call per slice instead of one per request is what Redis spends on
    /// them (BENCHMARKS.md, sixteenth round), and the slice's reservation keeps holding
    /// their worst case until the sum lands, so nothing counts twice meanwhile. A request
    /// whose slice was forgotten (its lease lapsed) settles alone, in the current periods.
    fn fold_into_slices(&self, batch: &[Settlement]) -> Vec<bool> {
        let mut book = self.book();
        let book = &mut *book;
        batch
            .iter()
            .map(|s| {
                let Some(n) = book.owners.get(&s.request_id).copied() else {
                    return false;
                };
                let Some(slice) = book.slices.get_mut(&n) else {
                    return false;
                };
                let release = &mut slice.release;
                release.cost_nano = release.cost_nano.saturating_add(s.cost_nano);
                book.owners.remove(&s.request_id);
                settled_one(book, n);
                true
            })
            .collect()
    }

    /// The cost folded into this gateway's slices and not yet given back, in `scope`'s
    /// budget for `period` (where their give-backs will count it).
    fn folded(&self, scope: &str, period: Period) -> u64 {
        let book = self.book();
        book.slices
            .values()
            .filter(|s| {
                s.budgets
                    .iter()
                    .any(|b| b.scope == scope && b.period == period)
            })
            .fold(0u64, |sum, s| sum.saturating_add(s.release.cost_nano))
    }

    /// A request admitted from a slice has settled (or needs no settling).
    fn forget_owner(&self, book: &mut Book, request_id: &str) {
        if let Some(n) = book.owners.remove(request_id) {
            settled_one(book, n);
        }
    }

    /// Sends the zero-cost settlements of the slices ready to go; keeps the failed ones.
    async fn give_back(&self) {
        let mut sending = Returning {
            shared: self,
            returns: std::mem::take(&mut self.book().returns),
        };
        if sending.returns.is_empty() {
            return;
        }
        let results = self.inner.settle_many(&sending.returns).await;
        let returns = std::mem::take(&mut sending.returns);
        let failed: Vec<Settlement> = returns
            .into_iter()
            .zip(results)
            .filter_map(|(s, r)| r.is_err().then_some(s))
            .collect();
        self.requeue(failed);
    }

    fn requeue(&self, returns: Vec<Settlement>) {
        if returns.is_empty() {
            return;
        }
        let mut book = self.book();
        book.returns.extend(returns);
        trim_returns(&mut book.returns);
    }

    /// Closes the slices whose time is up, then gives back what is ready.
    async fn sweep(&self, all: bool) {
        {
            let now = Instant::now();
            let mut book = self.book();
            let due: Vec<u64> = book
                .slices
                .iter()
                .filter(|(_, s)| !s.closed && (all || s.until <= now))
                .map(|(n, _)| *n)
                .collect();
            for n in due {
                close(&mut book, n);
            }
            // A refused set reserves one by one until `until`; after that it is forgotten,
            // so the map holds only sets that are active (one per customer, say).
            book.sets
                .retain(|_, state| !matches!(state, SetState::Exact { until } if *until <= now));
            // A slice whose lease would lapse before the next sweep (a request of it ran
            // about as long as a lease), or every slice at shutdown, goes back now with
            // the spend folded into it so far, while Redis still holds its lease: that
            // spend must not wait for requests that may never settle here. Those still
            // running settle alone, as requests that outlived their lease.
            let horizon = now + self.ttl + Duration::from_millis(CLOCK_SLACK_MS);
            let ending: Vec<u64> = book
                .slices
                .iter()
                .filter(|(_, s)| all || s.lease_ends <= horizon)
                .map(|(n, _)| *n)
                .collect();
            for n in &ending {
                // Closed first, so that its give-back returns the requests-per-minute
                // steps it really left unused (a slice can end here while still open).
                close(&mut book, *n);
                if let Some(s) = book.slices.remove(n) {
                    book.returns.push(s.release);
                }
            }
            if !ending.is_empty() {
                let book = &mut *book;
                let slices = &book.slices;
                book.owners.retain(|_, n| slices.contains_key(n));
            }
        }
        self.give_back().await;
    }

    /// One task per store, started by the first slice taken (so in the proxy's runtime),
    /// that closes slices whose time is up even when no request comes to notice it, and
    /// forgets refused sets once their time is up.
    fn start_sweeper(self: &Arc<Self>) {
        self.sweeper.call_once(|| {
            let weak: Weak<Shared> = Arc::downgrade(self);
            let every = self.ttl;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(shared) = weak.upgrade() else { return };
                    shared.sweep(false).await;
                }
            });
        });
    }
}

/// Keeps at most `MAX_RETURNS` give-backs waiting (Redis unreachable for long). The
/// oldest of those that carry no spend go first: their leases lapse by themselves. One
/// that carries its requests' spend is dropped only past that, and that spend is then
/// missing from the budgets (the ledger has every request).
fn trim_returns(returns: &mut Vec<Settlement>) {
    let mut over = returns.len().saturating_sub(MAX_RETURNS);
    if over == 0 {
        return;
    }
    returns.retain(|s| {
        let drop = over > 0 && s.cost_nano == 0;
        over -= usize::from(drop);
        !drop
    });
    if over > 0 {
        let lost = returns[..over]
            .iter()
            .fold(0u64, |sum, s| sum.saturating_add(s.cost_nano));
        log::warn!(
            "budget slices: {over} give-backs dropped while the store is unreachable; \
             {lost} nano-USD of their requests' spend is missing from the budgets"
        );
        returns.drain(..over);
    }
}

/// Marks slice `n` closed (no more admissions) and detaches it from its set; it is given
/// back once its requests have settled.
fn close(book: &mut Book, n: u64) {
    let ready = match book.slices.get_mut(&n) {
        Some(s) => {
            if matches!(book.sets.get(&s.key), Some(SetState::Live(m)) if *m == n) {
                book.sets.remove(&s.key);
            }
            s.closed = true;
            // The give-back was made for all N steps unused; now it is known how many are.
            if let Some(steps) = &mut s.release.unused_steps {
                steps.unused = s.requests_left;
            }
            s.in_flight == 0
        }
        None => false,
    };
    if ready {
        if let Some(s) = book.slices.remove(&n) {
            book.returns.push(s.release);
        }
    }
}

fn settled_one(book: &mut Book, n: u64) {
    let ready = match book.slices.get_mut(&n) {
        Some(s) => {
            s.in_flight = s.in_flight.saturating_sub(1);
            s.closed && s.in_flight == 0
        }
        None => false,
    };
    if ready {
        if let Some(s) = book.slices.remove(&n) {
            book.returns.push(s.release);
        }
    }
}

/// Slack for the gateway's clock against Redis's near a period's end.
const CLOCK_SLACK_MS: u64 = 2_000;

/// Whether a slice taken now can serve its whole time and its requests' leases inside
/// every budget's current period. A request admitted from a slice has no lease of its own:
/// its cost is counted in the slice's lease's periods, those current when the slice was
/// taken. A request that ran into the next period would then be charged to the one before
/// (or, past the slice's lease, to one that never reserved it), so near a period's end (the last
/// lease time of a day, with the default lease 10 minutes) requests reserve one by one,
/// each in its own periods, as without slices.
fn period_allows_slices(scopes: &[ScopeCheck], now_ms: u64, lease_ms: u64, ttl_ms: u64) -> bool {
    let needed = now_ms
        .saturating_add(ttl_ms)
        .saturating_add(lease_ms)
        .saturating_add(CLOCK_SLACK_MS);
    scopes.iter().flat_map(|c| &c.budgets).all(|b| {
        b.period
            .window(now_ms)
            .1
            .is_none_or(|period_end| needed < period_end)
    })
}

/// How long a new slice admits: `ttl`, but only while a request admitted from it would
/// still settle (within its lease) before the end of one of its budgets' periods, by
/// Redis's clock (the budgets' reset times) as well as the gateway's (see
/// `period_allows_slices`).
fn admitting_for(ttl: Duration, budgets: &[BudgetStatus], now_ms: u64, lease_ms: u64) -> Duration {
    let last_admission_ms = now_ms
        .saturating_add(lease_ms)
        .saturating_add(CLOCK_SLACK_MS);
    budgets
        .iter()
        .filter_map(|b| b.reset_ms)
        .map(|reset| Duration::from_millis(reset.saturating_sub(last_admission_ms)))
        .fold(ttl, Duration::min)
}

/// The budgets a request admitted from a slice reports: as the slice's reservation left
/// them, less what the slice still holds unused (so they count the requests admitted from
/// it, not the rest of it; other gateways' changes since are not seen).
fn as_admitted(budgets: &[BudgetStatus], money_left: u64) -> Vec<BudgetStatus> {
    budgets
        .iter()
        .map(|b| BudgetStatus {
            used_nano: b.used_nano.saturating_sub(money_left),
            ..b.clone()
        })
        .collect()
}

/// The identity of a set of scopes and their limits: a slice serves exactly the requests
/// its reservation was checked for (a config change makes a new set).
fn set_key(scopes: &[ScopeCheck]) -> String {
    let mut key = String::with_capacity(64 * scopes.len());
    for c in scopes {
        key.push_str(&c.scope);
        key.push('\u{1f}');
        if let Some(rpm) = c.rpm {
            let _ = write!(key, "r{rpm}");
        }
        for b in &c.budgets {
            let p = match b.period {
                Period::Daily => 'd',
                Period::Monthly => 'm',
                Period::Total => 't',
            };
            let _ = write!(key, "{p}{}", b.cap_nano);
        }
        key.push('\u{1e}');
    }
    key
}

fn admitted(req: &ReserveRequest, amount: u64, budgets: Vec<BudgetStatus>) -> Decision {
    Decision::Admitted {
        output_tokens: req.max_output_tokens,
        reserved_nano: amount,
        budgets,
        shadow_refusals: Vec::new(),
    }
}

/// A set marked `Taking` (or `Refilling`) by a request whose reservation of a slice may
/// be dropped half way (the client left) or fail: unmarks it then, so the set does not
/// stay on per-request reservations for good, closes the slice it was to replace, and
/// queues the give-back of a slice Redis may have made.
struct Taking<'a> {
    shared: &'a Shared,
    key: Option<String>,
    release: Option<Settlement>,
    replacing: Option<u64>,
}

impl Taking<'_> {
    fn finish(&mut self, state: SetState) {
        if let Some(key) = self.key.take() {
            let mut book = self.shared.book();
            book.sets.insert(key, state);
            if let Some(old) = self.replacing.take() {
                close(&mut book, old);
            }
            drop(book);
            self.shared.changed.notify_waiters();
        }
    }
}

impl Drop for Taking<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let mut book = self.shared.book();
            book.sets.remove(&key);
            if let Some(old) = self.replacing.take() {
                close(&mut book, old);
            }
            drop(book);
            self.shared.changed.notify_waiters();
        }
        if let Some(release) = self.release.take() {
            self.shared.requeue(vec![release]);
        }
    }
}

/// Give-backs being sent: back in the queue if the call is dropped half way.
struct Returning<'a> {
    shared: &'a Shared,
    returns: Vec<Settlement>,
}

impl Drop for Returning<'_> {
    fn drop(&mut self) {
        let unsent = std::mem::take(&mut self.returns);
        self.shared.requeue(unsent);
    }
}

#[async_trait]
impl Store for Sliced {
    async fn reserve(&self, req: &ReserveRequest) -> Result<Decision, StoreError> {
        let s = &self.shared;
        if !s.sliceable(req) {
            return s.inner.reserve(req).await;
        }
        let amount = req
            .fixed_nano
            .saturating_add(req.per_output_nano.saturating_mul(req.max_output_tokens));
        let key = set_key(&req.scopes);
        // A taking that never ends (it cannot: the store's calls time out) would otherwise
        // hold its waiters: past this they reserve alone.
        let wait_until = tokio::time::Instant::now() + s.ttl;
        loop {
            // Made before the set is looked at, so that a taking that ends in between
            // still wakes it.
            let changed = s.changed.notified();
            match s.decide_locally(&key, amount, &req.request_id, Instant::now()) {
                Local::Admitted(budgets) => return Ok(admitted(req, amount, budgets)),
                Local::Exact => return s.inner.reserve(req).await,
                Local::Take(replacing) => {
                    return s.take_slice(req, key, amount, replacing).await;
                }
                Local::Wait => {
                    if tokio::time::timeout_at(wait_until, changed).await.is_err() {
                        return s.inner.reserve(req).await;
                    }
                }
            }
        }
    }

    async fn settle(&self, s: &Settlement) -> Result<(), StoreError> {
        let mut out = self.shared.settle_many(std::slice::from_ref(s)).await;
        out.pop()
            .unwrap_or_else(|| Err(StoreError::Internal("no settlement result".into())))
    }

    async fn settle_many(&self, batch: &[Settlement]) -> Vec<Result<(), StoreError>> {
        self.shared.settle_many(batch).await
    }

    async fn give_back_all(&self) {
        self.shared.sweep(true).await;
    }

    fn needs_settling(&self, s: &Settlement) -> bool {
        let needs = self.shared.inner.needs_settling(s);
        if !needs {
            let mut book = self.shared.book();
            self.shared.forget_owner(&mut book, &s.request_id);
        }
        needs
    }

    /// What Redis has settled plus what this gateway's slices hold folded and not yet
    /// given back in that scope's budget for that period: the spend its own requests have
    /// made, as a budget alert checking after a settlement expects to see. (Read in that
    /// order, a give-back landing in between is missed for a moment, never counted twice.)
    async fn spent(&self, scope: &str, period: Period) -> Result<u64, StoreError> {
        let settled = self.shared.inner.spent(scope, period).await?;
        Ok(settled.saturating_add(self.shared.folded(scope, period)))
    }

    async fn healthy(&self) -> bool {
        self.shared.inner.healthy().await
    }

    async fn claim_once(&self, scope: &str, name: &str, ttl_ms: u64) -> Result<bool, StoreError> {
        self.shared.inner.claim_once(scope, name, ttl_ms).await
    }

    async fn catalog_write(
        &self,
        kind: &str,
        id: &str,
        doc: Option<&str>,
        only_if_absent: bool,
    ) -> Result<bool, StoreError> {
        self.shared
            .inner
            .catalog_write(kind, id, doc, only_if_absent)
            .await
    }

    async fn catalog_version(&self) -> Result<u64, StoreError> {
        self.shared.inner.catalog_version().await
    }

    async fn catalog_load(&self) -> Result<crate::catalog::CatalogDocs, StoreError> {
        self.shared.inner.catalog_load().await
    }

    async fn rollups_add(
        &self,
        batch: &str,
        rows: &crate::ledger::Rollups,
    ) -> Result<(), StoreError> {
        self.shared.inner.rollups_add(batch, rows).await
    }

    async fn rollups_read(
        &self,
        start_day: u64,
        end_day: u64,
    ) -> Result<Option<crate::ledger::Rollups>, StoreError> {
        self.shared.inner.rollups_read(start_day, end_day).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{rpm_only_mask, BudgetCheck, Refusal};
    use std::sync::atomic::AtomicUsize;

    /// The embedded store standing in for Redis (same semantics, one suite), counting the
    /// reservations that reach it.
    struct Counting {
        inner: MemoryStore,
        reserves: AtomicUsize,
        slices: AtomicUsize,
        /// Settlements that reached the store.
        settles: AtomicUsize,
        /// Slice reservations wait this long (to drop one half way).
        slow_slices: Duration,
        /// Shared with the slices over it (see `midday_clock`).
        clock: Clock,
    }

    const DAY_MS: u64 = 86_400_000;

    /// Wall time that starts at noon of a fixed day and runs: slices are not taken near
    /// the end of a budget's day, so tests on the system clock failed just before midnight.
    fn midday_clock() -> Clock {
        let start = Instant::now();
        let noon = 20_000 * DAY_MS + DAY_MS / 2;
        Arc::new(move || noon + u64::try_from(start.elapsed().as_millis()).unwrap_or(0))
    }

    #[async_trait]
    impl Store for Counting {
        async fn reserve(&self, req: &ReserveRequest) -> Result<Decision, StoreError> {
            self.reserves.fetch_add(1, Ordering::SeqCst);
            if req.request_id.starts_with("slice-") {
                self.slices.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(self.slow_slices).await;
            }
            self.inner.reserve(req).await
        }
        async fn settle(&self, s: &Settlement) -> Result<(), StoreError> {
            self.settles.fetch_add(1, Ordering::SeqCst);
            self.inner.settle(s).await
        }
        async fn spent(&self, scope: &str, period: Period) -> Result<u64, StoreError> {
            self.inner.spent(scope, period).await
        }
        async fn healthy(&self) -> bool {
            true
        }
        async fn claim_once(&self, _: &str, _: &str, _: u64) -> Result<bool, StoreError> {
            Ok(true)
        }
        async fn catalog_write(
            &self,
            _: &str,
            _: &str,
            _: Option<&str>,
            _: bool,
        ) -> Result<bool, StoreError> {
            Ok(false)
        }
        async fn catalog_version(&self) -> Result<u64, StoreError> {
            Ok(0)
        }
        async fn catalog_load(&self) -> Result<crate::catalog::CatalogDocs, StoreError> {
            Err(StoreError::Internal("not in this test".into()))
        }
    }

    fn counting(name: &str, slow_slices: Duration) -> Arc<Counting> {
        counting_at(name, slow_slices, midday_clock())
    }

    fn counting_at(name: &str, slow_slices: Duration, clock: Clock) -> Arc<Counting> {
        static RUN: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tollgate-slices-{}-{name}-{}",
            std::process::id(),
            RUN.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Arc::new(Counting {
            inner: MemoryStore::open(&dir, clock.clone()).expect("open"),
            clock,
            reserves: AtomicUsize::new(0),
            slices: AtomicUsize::new(0),
            settles: AtomicUsize::new(0),
            slow_slices,
        })
    }

    fn scopes(cap: u64, rpm: Option<u64>) -> Vec<ScopeCheck> {
        vec![
            ScopeCheck {
                scope: "customer:acme".into(),
                budgets: vec![BudgetCheck {
                    period: Period::Daily,
                    cap_nano: cap,
                    enforcement: Enforcement::Block,
                }],
                ..ScopeCheck::default()
            },
            ScopeCheck {
                scope: "key:k1".into(),
                rpm,
                ..ScopeCheck::default()
            },
        ]
    }

    fn request(id: &str, scopes: &[ScopeCheck], amount: u64) -> ReserveRequest {
        ReserveRequest {
            request_id: id.into(),
            scopes: scopes.to_vec(),
            fixed_nano: amount,
            per_output_nano: 0,
            max_output_tokens: 0,
            min_output_tokens: 0,
            tokens: 10,
            requests: 1,
            lease_ms: 60_000,
        }
    }

    fn settlement(req: &ReserveRequest, cost: u64) -> Settlement {
        Settlement {
            unused_steps: None,
            request_id: req.request_id.clone(),
            scopes: req.scopes.iter().map(|c| c.scope.clone()).collect(),
            rpm_only: rpm_only_mask(&req.scopes),
            cost_nano: cost,
            tokens: 10,
        }
    }

    fn sliced(inner: &Arc<Counting>, requests: u64, ttl: Duration) -> Sliced {
        Sliced::with_clock(inner.clone(), requests, ttl, inner.clock.clone())
    }

    fn is_admitted(d: &Result<Decision, StoreError>) -> bool {
        matches!(d, Ok(Decision::Admitted { .. }))
    }

    /// What a request of `amount` sees when it reserves alone, straight in the store.
    async fn headroom_admits(inner: &Counting, scopes: &[ScopeCheck], amount: u64) -> bool {
        static PROBE: AtomicUsize = AtomicUsize::new(0);
        let id = format!("probe{}", PROBE.fetch_add(1, Ordering::Relaxed));
        let req = request(&id, scopes, amount);
        let admitted = is_admitted(&inner.inner.reserve(&req).await);
        if admitted {
            // Given back without a trace: a zero-cost settlement.
            let _ = inner.inner.settle(&settlement(&req, 0)).await;
        }
        admitted
    }

    #[tokio::test]
    async fn admits_a_slice_worth_of_requests_with_one_store_call_and_gives_back_the_rest() {
        let inner = counting("one-call", Duration::ZERO);
        let store = sliced(&inner, 8, Duration::from_secs(60));
        let sc = scopes(10_000, Some(1_000_000));
        // A slice of 8 admits until 2 are left (`refill_at`): six requests, one call.
        let reqs: Vec<_> = (0..6)
            .map(|i| request(&format!("r{i}"), &sc, 100))
            .collect();
        for r in &reqs {
            assert!(is_admitted(&store.reserve(r).await));
        }
        assert_eq!(
            inner.reserves.load(Ordering::SeqCst),
            1,
            "one slice, one call"
        );
        // The slice holds 800 of the 10,000: the store has 9,200 left for anyone else.
        assert!(headroom_admits(&inner, &sc, 9_200).await);
        assert!(!headroom_admits(&inner, &sc, 9_201).await);

        // The next request takes a second slice; the first closes with 2 left.
        let seventh = request("r6", &sc, 100);
        assert!(is_admitted(&store.reserve(&seventh).await));
        assert_eq!(inner.slices.load(Ordering::SeqCst), 2);
        assert_eq!(inner.reserves.load(Ordering::SeqCst), 2);
        // Until its requests settle, the first slice stays reserved whole, and their
        // settlements make no store call: their costs wait in the slice's give-back, so
        // nothing is counted twice meanwhile (reserved in the slice and settled).
        let batch: Vec<_> = reqs[..5].iter().map(|r| settlement(r, 30)).collect();
        assert!(store.settle_many(&batch).await.iter().all(Result::is_ok));
        assert_eq!(inner.settles.load(Ordering::SeqCst), 0);
        assert!(headroom_admits(&inner, &sc, 10_000 - 1_600).await);
        assert!(!headroom_admits(&inner, &sc, 10_000 - 1_600 + 1).await);
        // The last of them settles: the first slice goes back, in one store call that
        // counts their spend.
        assert!(store.settle(&settlement(&reqs[5], 30)).await.is_ok());
        assert_eq!(inner.settles.load(Ordering::SeqCst), 1);
        let spent = inner.inner.spent("customer:acme", Period::Daily).await;
        assert_eq!(spent.expect("spent"), 180);
        assert!(headroom_admits(&inner, &sc, 10_000 - 800 - 180).await);
        assert!(!headroom_admits(&inner, &sc, 10_000 - 800 - 180 + 1).await);

        // At shutdown the live slice goes back once its request has settled.
        assert!(store.settle(&settlement(&seventh, 70)).await.is_ok());
        store.give_back_all().await;
        assert!(headroom_admits(&inner, &sc, 10_000 - 250).await);
        assert!(!headroom_admits(&inner, &sc, 10_000 - 250 + 1).await);
    }

    /// Starts `reserve` for request `id` on its own task.
    fn spawn_reserve(
        store: &Arc<Sliced>,
        id: &str,
        sc: &[ScopeCheck],
        amount: u64,
    ) -> tokio::task::JoinHandle<Result<Decision, StoreError>> {
        let (store, req) = (store.clone(), request(id, sc, amount));
        tokio::spawn(async move { store.reserve(&req).await })
    }

    /// While a request reserves the set's first slice, the others wait for it; while one
    /// reserves the next, the others go on admitting from the one nearly used up, and once
    /// that is used up they wait for the next. None makes a store call of its own.
    #[tokio::test]
    async fn requests_wait_for_the_slice_being_taken_and_the_next_is_taken_ahead() {
        let inner = counting("refill", Duration::from_millis(200));
        let store = Arc::new(sliced(&inner, 8, Duration::from_secs(60)));
        let sc = scopes(1_000_000, None);
        let reserve = |id: &str| spawn_reserve(&store, id, &sc, 10);
        let first = reserve("f0");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let waiters: Vec<_> = (1..6).map(|i| reserve(&format!("f{i}"))).collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(inner.reserves.load(Ordering::SeqCst), 1, "they wait");
        assert!(is_admitted(&first.await.expect("first")));
        for w in waiters {
            assert!(is_admitted(&w.await.expect("waiter")));
        }
        assert_eq!(
            inner.reserves.load(Ordering::SeqCst),
            1,
            "all from the slice"
        );
        // Two left: the next request takes a slice, slowly (200 ms).
        let taker = reserve("taker");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(inner.slices.load(Ordering::SeqCst), 2, "taking the next");
        // Meanwhile the last two come from the old slice, with no call...
        for i in 0..2 {
            let r = request(&format!("m{i}"), &sc, 10);
            assert!(is_admitted(&store.reserve(&r).await));
        }
        // ...and, once it is used up, the next one waits for the new slice.
        let late = reserve("m2");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!late.is_finished());
        assert!(is_admitted(&taker.await.expect("taker")));
        assert!(is_admitted(&late.await.expect("late")));
        assert_eq!(inner.reserves.load(Ordering::SeqCst), 2);
    }

    /// When the slice being taken is refused, its waiters reserve one by one.
    #[tokio::test]
    async fn when_the_slice_being_taken_is_refused_its_waiters_reserve_alone() {
        let inner = counting("refused", Duration::from_millis(200));
        let store = Arc::new(sliced(&inner, 8, Duration::from_secs(60)));
        // 8 × 100 does not fit in 500; one request alone does.
        let sc = scopes(500, None);
        let reserve = |id: &str| spawn_reserve(&store, id, &sc, 100);
        let first = reserve("s0");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let waiter = reserve("s1");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(inner.reserves.load(Ordering::SeqCst), 1, "it waits");
        assert!(is_admitted(&first.await.expect("first")));
        assert!(is_admitted(&waiter.await.expect("waiter")));
        // The slice, then each request on its own.
        assert_eq!(inner.slices.load(Ordering::SeqCst), 1);
        assert_eq!(inner.reserves.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn near_the_cap_the_slice_is_refused_and_requests_reserve_one_by_one() {
        let inner = counting("near-cap", Duration::ZERO);
        let store = sliced(&inner, 4, Duration::from_secs(60));
        let sc = scopes(250, None);
        let decisions = [
            store.reserve(&request("a", &sc, 100)).await,
            store.reserve(&request("b", &sc, 100)).await,
            store.reserve(&request("c", &sc, 100)).await,
        ];
        assert!(is_admitted(&decisions[0]) && is_admitted(&decisions[1]));
        match &decisions[2] {
            Ok(Decision::Refused(Refusal { remaining, .. })) => assert_eq!(*remaining, 50),
            other => panic!("the third does not fit: {other:?}"),
        }
        // One slice tried (refused: 400 > 250), then each request on its own.
        assert_eq!(inner.slices.load(Ordering::SeqCst), 1);
        assert_eq!(inner.reserves.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_request_dearer_than_what_the_slice_has_left_is_not_admitted_from_it() {
        let inner = counting("dearer", Duration::ZERO);
        let store = sliced(&inner, 4, Duration::from_secs(60));
        let sc = scopes(60, None);
        // A slice of 4 × 10 = 40; 30 left in it, 20 left in the store.
        assert!(is_admitted(
            &store.reserve(&request("cheap", &sc, 10)).await
        ));
        let dear = store.reserve(&request("dear", &sc, 35)).await;
        assert!(matches!(dear, Ok(Decision::Refused(_))), "{dear:?}");
        // A new slice (4 × 35) did not fit, nor did the request alone.
        assert_eq!(inner.slices.load(Ordering::SeqCst), 2);
        assert_eq!(inner.reserves.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn two_gateways_never_admit_past_the_cap_and_the_books_balance() {
        let inner = counting("two", Duration::ZERO);
        let gateways = [
            sliced(&inner, 8, Duration::from_secs(60)),
            sliced(&inner, 8, Duration::from_secs(60)),
        ];
        let cap = 50_000;
        let sc = scopes(cap, Some(10_000_000));
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |bound: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % bound
        };
        let (mut open, mut settled_cost, mut admitted_n) = (Vec::new(), 0u64, 0);
        for i in 0..2_000 {
            let g = next(2) as usize;
            let req = request(&format!("q{i}"), &sc, 50 + next(400));
            if is_admitted(&gateways[g].reserve(&req).await) {
                admitted_n += 1;
                open.push((g, req));
            }
            // Worst cases in flight plus what has settled never pass the cap.
            let in_flight: u64 = open.iter().map(|(_, r)| r.fixed_nano).sum();
            assert!(in_flight + settled_cost <= cap, "op {i}");
            if next(3) == 0 && !open.is_empty() {
                let (g, r) = open.swap_remove(next(open.len() as u64) as usize);
                let cost = next(r.fixed_nano + 1);
                settled_cost += cost;
                assert!(gateways[g].settle(&settlement(&r, cost)).await.is_ok());
            }
        }
        for (g, r) in open.drain(..) {
            let cost = r.fixed_nano / 2;
            settled_cost += cost;
            assert!(gateways[g].settle(&settlement(&r, cost)).await.is_ok());
        }
        for g in &gateways {
            g.give_back_all().await;
        }
        assert!(admitted_n > 100, "{admitted_n} admitted");
        let spent = inner.inner.spent("customer:acme", Period::Daily).await;
        assert_eq!(
            spent.expect("spent"),
            settled_cost,
            "every cost counted once"
        );
        // Nothing parked: the whole rest of the cap is free again.
        assert!(headroom_admits(&inner, &sc, cap - settled_cost).await);
        assert!(!headroom_admits(&inner, &sc, cap - settled_cost + 1).await);
    }

    #[tokio::test]
    async fn requests_a_slice_cannot_serve_reserve_alone() {
        let inner = counting("alone", Duration::ZERO);
        let store = sliced(&inner, 4, Duration::from_secs(60));
        let mut tpm = scopes(1_000_000, None);
        tpm[1].tpm = Some(1_000_000);
        let mut clamp = scopes(1_000_000, None);
        clamp[0].budgets[0].enforcement = Enforcement::Clamp;
        // 100 requests per minute: four of them are more than a second's allowance.
        let slow_rpm = scopes(1_000_000, Some(100));
        for (n, sc) in [tpm, clamp, slow_rpm].iter().enumerate() {
            for i in 0..3 {
                let d = store.reserve(&request(&format!("s{n}-{i}"), sc, 10)).await;
                assert!(is_admitted(&d));
            }
        }
        assert_eq!(inner.reserves.load(Ordering::SeqCst), 9);
        assert_eq!(inner.slices.load(Ordering::SeqCst), 0);
    }

    /// At shutdown every slice goes back with the spend folded into it, even one whose
    /// request still runs (that one settles alone, if it ever does).
    #[tokio::test]
    async fn at_shutdown_a_slice_with_a_request_still_running_goes_back_with_its_spend() {
        let inner = counting("shutdown", Duration::ZERO);
        let store = sliced(&inner, 8, Duration::from_secs(60));
        let sc = scopes(1_000_000, None);
        let (a, b) = (request("s0", &sc, 1_000), request("s1", &sc, 1_000));
        assert!(is_admitted(&store.reserve(&a).await));
        assert!(is_admitted(&store.reserve(&b).await));
        assert!(store.settle(&settlement(&a, 70)).await.is_ok());
        store.give_back_all().await;
        let spent = || inner.inner.spent("customer:acme", Period::Daily);
        assert_eq!(spent().await.expect("spent"), 70);
        // Nothing parked: only what was spent is taken.
        assert!(headroom_admits(&inner, &sc, 1_000_000 - 70).await);
        assert!(!headroom_admits(&inner, &sc, 1_000_000 - 70 + 1).await);
        assert!(store.settle(&settlement(&b, 30)).await.is_ok());
        assert_eq!(spent().await.expect("spent"), 100);
    }

    /// A slice whose lease would lapse (in Redis) while one of its requests still runs
    /// goes back before that, with the cost already folded into it; the request still
    /// running settles alone.
    #[tokio::test]
    async fn spend_folded_into_a_slice_goes_back_before_its_lease_lapses() {
        let inner = counting("lapsed", Duration::ZERO);
        let store = sliced(&inner, 4, Duration::from_millis(50));
        let sc = scopes(1_000_000, None);
        let short = |id: &str| ReserveRequest {
            lease_ms: 100,
            ..request(id, &sc, 1_000)
        };
        let (a, b) = (short("l0"), short("l1"));
        assert!(is_admitted(&store.reserve(&a).await));
        assert!(is_admitted(&store.reserve(&b).await));
        assert_eq!(inner.slices.load(Ordering::SeqCst), 1);
        assert!(store.settle(&settlement(&a, 70)).await.is_ok());
        assert_eq!(inner.settles.load(Ordering::SeqCst), 0, "folded");
        // Folded, not yet in the store, but this gateway's own spend shows.
        let daily = store.spent("customer:acme", Period::Daily).await;
        assert_eq!(daily.expect("spent"), 70);
        let monthly = store.spent("customer:acme", Period::Monthly).await;
        assert_eq!(monthly.expect("spent"), 0, "not a budget's period");
        // The slice's lease (100 + 50 ms) would lapse with b still running.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let spent = || inner.inner.spent("customer:acme", Period::Daily);
        assert_eq!(spent().await.expect("spent"), 70);
        assert_eq!(
            store
                .spent("customer:acme", Period::Daily)
                .await
                .expect("spent"),
            70
        );
        assert!(store.settle(&settlement(&b, 30)).await.is_ok());
        assert_eq!(spent().await.expect("spent"), 100);
        assert_eq!(inner.settles.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_slice_stops_admitting_after_its_time_and_is_given_back_by_the_sweeper() {
        let inner = counting("sweep", Duration::ZERO);
        let store = sliced(&inner, 100, Duration::from_millis(50));
        let sc = scopes(1_000_000, None);
        let first = request("t0", &sc, 1_000);
        assert!(is_admitted(&store.reserve(&first).await));
        assert!(store.settle(&settlement(&first, 10)).await.is_ok());
        // Its slice (100 × 1,000) is parked until the sweeper closes it.
        assert!(!headroom_admits(&inner, &sc, 1_000_000 - 10 - 99_000 + 1).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(headroom_admits(&inner, &sc, 1_000_000 - 10).await);
        // The next request takes a new slice.
        assert!(is_admitted(
            &store.reserve(&request("t1", &sc, 1_000)).await
        ));
        assert_eq!(inner.slices.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_slice_reservation_dropped_half_way_does_not_stop_slicing() {
        let inner = counting("dropped", Duration::from_millis(300));
        let store = Arc::new(sliced(&inner, 4, Duration::from_secs(60)));
        let sc = scopes(1_000_000, None);
        let taking = spawn_reserve(&store, "gone", &sc, 10);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let waiting = spawn_reserve(&store, "meanwhile", &sc, 10);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(inner.reserves.load(Ordering::SeqCst), 1, "it waits");
        taking.abort();
        let _ = taking.await;
        // The client left: the request that waited takes a slice itself.
        assert!(is_admitted(&waiting.await.expect("waiting")));
        assert_eq!(inner.slices.load(Ordering::SeqCst), 2);
        assert!(is_admitted(&store.reserve(&request("next", &sc, 10)).await));
        assert_eq!(inner.slices.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_slice_admits_no_further_than_its_budgets_period() {
        let now_ms = 20_000 * DAY_MS + 1_000;
        let status = |reset_ms| BudgetStatus {
            scope: "customer:acme".into(),
            period: Period::Daily,
            cap_nano: 1,
            used_nano: 0,
            reset_ms,
        };
        let ttl = Duration::from_secs(1);
        let lease_ms = 60_000;
        assert_eq!(admitting_for(ttl, &[status(None)], now_ms, lease_ms), ttl);
        // A request admitted later than a lease (and the clock slack) before the reset
        // could settle after it.
        let reset = now_ms + lease_ms + CLOCK_SLACK_MS + 5;
        let near = admitting_for(ttl, &[status(None), status(Some(reset))], now_ms, lease_ms);
        assert_eq!(near, Duration::from_millis(5));
        assert_eq!(
            admitting_for(ttl, &[status(Some(now_ms + lease_ms))], now_ms, lease_ms),
            Duration::ZERO
        );
    }

    #[test]
    fn near_a_periods_end_requests_reserve_one_by_one() {
        let midnight = 20_000 * DAY_MS;
        let (lease_ms, ttl_ms) = (600_000, 1_000);
        let daily = scopes(1_000, None);
        let allows = |now_ms| period_allows_slices(&daily, now_ms, lease_ms, ttl_ms);
        assert!(allows(midnight - 3_600_000), "an hour before midnight");
        assert!(!allows(midnight - lease_ms), "a lease before midnight");
        assert!(!allows(midnight - lease_ms - ttl_ms - CLOCK_SLACK_MS));
        assert!(allows(midnight - lease_ms - ttl_ms - CLOCK_SLACK_MS - 1));
        assert!(allows(midnight), "a new day");
        // Without a budget (a rate limit only) there is no period to stay inside.
        assert!(period_allows_slices(
            &scopes(1_000, Some(1_000))[1..],
            midnight - 1,
            lease_ms,
            ttl_ms
        ));
    }

    /// The path `near_a_periods_end_requests_reserve_one_by_one` decides, through the store.
    #[tokio::test]
    async fn in_the_last_lease_time_of_a_day_each_request_reserves_alone() {
        let midnight = 20_001 * DAY_MS;
        // A slice of 1 s would end before midnight; a request admitted from it at its
        // end could still settle up to its lease (60 s) later, in the next day.
        for (now, slices, reserves) in [(midnight - 30_000, 0, 3), (midnight - 3_600_000, 1, 1)] {
            let inner = counting_at("midnight", Duration::ZERO, Arc::new(move || now));
            let store = sliced(&inner, 4, Duration::from_secs(1));
            let sc = scopes(10_000, None);
            for i in 0..3 {
                assert!(is_admitted(
                    &store.reserve(&request(&format!("m{i}"), &sc, 100)).await
                ));
            }
            assert_eq!(inner.slices.load(Ordering::SeqCst), slices, "{now}");
            assert_eq!(inner.reserves.load(Ordering::SeqCst), reserves, "{now}");
        }
    }

    #[tokio::test]
    async fn a_slice_gives_back_the_requests_per_minute_steps_it_did_not_use() {
        let inner = counting("steps", Duration::ZERO);
        let store = sliced(&inner, 4, Duration::from_secs(60));
        // 240 a minute: a slice of 4 takes a second's worth; one request uses one step.
        let sc = scopes(1_000_000, Some(240));
        let first = request("used", &sc, 10);
        assert!(is_admitted(&store.reserve(&first).await));
        assert!(store.settle(&settlement(&first, 10)).await.is_ok());
        store.give_back_all().await;
        // The minute's other 239 requests are still there, reserved one by one.
        let mut more = 0;
        for i in 0..300 {
            let req = request(&format!("alone{i}"), &sc, 10);
            if !is_admitted(&inner.inner.reserve(&req).await) {
                break;
            }
            more += 1;
        }
        assert_eq!(more, 239);
    }
}
