//! Budget and rate-limit state: one atomic admission step before the provider is called,
//! one settlement after. Two implementations behave identically and pass one test suite:
//! `memory` (embedded, journaled to disk) and `redis` (shared by several gateways).
//!
//! Semantics, shared by both stores (the Redis Lua script mirrors `memory::decide`):
//! - A reservation is checked against every budget of every scope of the request, all or
//!   nothing. A budget admits when `spent + reserved + amount <= cap`.
//! - `amount = fixed_nano + per_output_nano * output_tokens`. When `max_output_tokens` does
//!   not fit and every budget that refuses it is a clamp budget, `output_tokens` is lowered
//!   to the most that fits in all of them (not below `min_output_tokens`).
//! - Shadow budgets are counted like the others but never refuse; what they would have
//!   refused is reported in `Decision::Admitted::shadow_refusals`.
//! - Rate limits per scope: requests per minute and tokens per minute by GCRA (exact:
//!   a full minute's allowance may be used at once, then it refills continuously), and
//!   concurrent in-flight requests.
//! - Reservations are leases: a gateway that dies mid-request holds budget only until the
//!   lease expires. Settlement is exactly once per request id: it releases the lease and
//!   adds the actual cost to the periods the reservation counted in.

mod combine;
pub mod lazy;
pub mod memory;
pub mod redis;
pub mod slices;
mod wire;

use std::fmt;

use async_trait::async_trait;

/// A budget period. Periods are UTC calendar periods; a new one starts at zero by itself.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Daily,
    Monthly,
    #[default]
    Total,
}

impl Period {
    pub fn label(self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Monthly => "monthly",
            Period::Total => "total",
        }
    }

    /// The period's identifier at `now_ms` (Unix ms, UTC) and when it ends (None: never).
    pub fn window(self, now_ms: u64) -> (PeriodId, Option<u64>) {
        const DAY_MS: u64 = 86_400_000;
        let day = now_ms / DAY_MS;
        match self {
            Period::Daily => (PeriodId::of(b'd', &[(day, 1)]), Some((day + 1) * DAY_MS)),
            Period::Monthly => {
                let (y, m, _) = civil_from_days(day as i64);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                let next = days_from_civil(ny, nm, 1) as u64 * DAY_MS;
                // `m` then the year (4 digits) and month (2): "m202612".
                let id = PeriodId::of(b'm', &[(y.max(0) as u64, 4), (u64::from(m), 2)]);
                (id, Some(next))
            }
            Period::Total => (PeriodId::of(b't', &[]), None),
        }
    }
}

/// A period's identifier ("d20429", "m202612", "t"), kept inline: admission and settlement
/// make several per request, and as `String`s each was an allocation. Hashed, compared,
/// printed and serialized as the `str` it spells, so maps keyed by `String` find it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PeriodId {
    len: u8,
    /// Room for any `u64` clock: a letter and at most 12 digits (day) or 9 + 2 (month).
    bytes: [u8; 15],
}

impl PeriodId {
    /// `letter` then each number zero-padded to its width.
    fn of(letter: u8, numbers: &[(u64, usize)]) -> PeriodId {
        let mut id = PeriodId {
            len: 1,
            bytes: [0; 15],
        };
        id.bytes[0] = letter;
        for &(n, width) in numbers {
            let mut buf = itoa::Buffer::new();
            let digits = buf.format(n).as_bytes();
            for &b in std::iter::repeat_n(&b'0', width.saturating_sub(digits.len())).chain(digits) {
                if let Some(slot) = id.bytes.get_mut(usize::from(id.len)) {
                    *slot = b;
                    id.len += 1;
                }
            }
        }
        id
    }

    /// A stored id (a journal line); None if it cannot be one.
    pub fn parse(s: &str) -> Option<PeriodId> {
        let mut id = PeriodId {
            len: u8::try_from(s.len()).ok()?,
            bytes: [0; 15],
        };
        id.bytes.get_mut(..s.len())?.copy_from_slice(s.as_bytes());
        Some(id)
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII letters and digits, or a whole `str` (`parse`), are ever written.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl std::ops::Deref for PeriodId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for PeriodId {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::borrow::Borrow<str> for PeriodId {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

// Ordered as its str (as `Borrow<str>` requires), not by the derived field order.
impl Ord for PeriodId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialOrd for PeriodId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::hash::Hash for PeriodId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl fmt::Display for PeriodId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for PeriodId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq<str> for PeriodId {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for PeriodId {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl serde::Serialize for PeriodId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for PeriodId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        PeriodId::parse(&s).ok_or_else(|| serde::de::Error::custom("period id over 15 bytes"))
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// (year, month, day) to days since 1970-01-01.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// How a budget behaves when a request does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// Refuse the request.
    Block,
    /// Lower the request's output tokens to what fits; refuse if not even the minimum fits.
    Clamp,
    /// Count, never refuse; report what would have happened.
    Shadow,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetCheck {
    pub period: Period,
    pub cap_nano: u64,
    pub enforcement: Enforcement,
}

/// Everything one scope (e.g. `customer:acme`) enforces on a request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScopeCheck {
    pub scope: String,
    pub budgets: Vec<BudgetCheck>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub concurrency: Option<u64>,
}

impl ScopeCheck {
    /// No budget, TPM or concurrency limit (at most a requests-per-minute one): the scope
    /// holds nothing that a settlement gives back (no reservation, in-flight slot or token
    /// count).
    pub fn rpm_only(&self) -> bool {
        self.budgets.is_empty() && self.tpm.is_none() && self.concurrency.is_none()
    }
}

/// `Settlement::rpm_only` for these scopes: bit i set when scope i is `rpm_only`.
pub fn rpm_only_mask(scopes: &[ScopeCheck]) -> u32 {
    scopes
        .iter()
        .take(32)
        .enumerate()
        .filter(|(_, c)| c.rpm_only())
        .fold(0, |mask, (i, _)| mask | 1 << i)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveRequest {
    pub request_id: String,
    pub scopes: Vec<ScopeCheck>,
    /// Worst-case cost of the input side, nano-USD.
    pub fixed_nano: u64,
    /// Worst-case cost of one output token, nano-USD (rounded up).
    pub per_output_nano: u64,
    pub max_output_tokens: u64,
    pub min_output_tokens: u64,
    /// Tokens counted against tokens-per-minute limits (corrected at settlement).
    pub tokens: u64,
    /// Requests counted against requests-per-minute limits: 1, or a budget slice's
    /// request count (`store::slices`).
    pub requests: u64,
    pub lease_ms: u64,
}

/// One budget's state after an admission, for response headers and downgrades.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetStatus {
    pub scope: String,
    pub period: Period,
    pub cap_nano: u64,
    /// spent + reserved, this reservation included.
    pub used_nano: u64,
    pub reset_ms: Option<u64>,
}

impl BudgetStatus {
    pub fn remaining_nano(&self) -> u64 {
        self.cap_nano.saturating_sub(self.used_nano)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Budget(Period),
    RequestsPerMinute,
    TokensPerMinute,
    Concurrency,
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitKind::Budget(p) => write!(f, "{} budget", p.label()),
            LimitKind::RequestsPerMinute => f.write_str("requests per minute"),
            LimitKind::TokensPerMinute => f.write_str("tokens per minute"),
            LimitKind::Concurrency => f.write_str("concurrent requests"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub scope: String,
    pub kind: LimitKind,
    /// The limit (nano-USD for budgets, a count otherwise).
    pub limit: u64,
    pub remaining: u64,
    /// When a retry can succeed: next period start or the rate limit's refill.
    pub retry_after_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Admitted {
        output_tokens: u64,
        reserved_nano: u64,
        budgets: Vec<BudgetStatus>,
        shadow_refusals: Vec<Refusal>,
    },
    Refused(Refusal),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub request_id: String,
    pub scopes: Vec<String>,
    pub cost_nano: u64,
    pub tokens: u64,
    /// Bit i set: scope i limits requests per minute only (`rpm_only_mask`). A single
    /// Redis node keeps no lease for such a scope and leaves it out of the settlement
    /// (a script call spared when every scope is one); other stores ignore it. (So the
    /// memory store, which leases such a scope like any other, still counts the spend of
    /// a settlement that comes after its lease expired in it; no budget charges it.)
    pub rpm_only: u32,
    /// A budget slice's give-back (`slices`): the requests-per-minute steps it took and
    /// did not use, taken back from its scopes' clocks. None for a request.
    pub unused_steps: Option<UnusedSteps>,
}

/// Of a slice's `of` requests-per-minute steps, `unused` were not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnusedSteps {
    pub unused: u64,
    pub of: u64,
}

impl Settlement {
    /// Whether scope `i` limits requests per minute only (see `rpm_only`).
    pub fn is_rpm_only(&self, i: usize) -> bool {
        i < 32 && self.rpm_only & (1 << i) != 0
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store timed out")]
    Timeout,
    #[error("store error: {0}")]
    Internal(String),
}

#[async_trait]
pub trait Store: Send + Sync {
    /// The one atomic admission step.
    async fn reserve(&self, req: &ReserveRequest) -> Result<Decision, StoreError>;
    /// Releases the reservation and adds the actual cost, exactly once per request id.
    async fn settle(&self, s: &Settlement) -> Result<(), StoreError>;
    /// Settles several requests: one result per settlement, in order. Stores that can
    /// apply them in fewer round trips than one each override this.
    async fn settle_many(&self, batch: &[Settlement]) -> Vec<Result<(), StoreError>> {
        let mut out = Vec::with_capacity(batch.len());
        for s in batch {
            out.push(self.settle(s).await);
        }
        out
    }
    /// Settled spend of a scope in the current period (for the usage API and tests).
    async fn spent(&self, scope: &str, period: Period) -> Result<u64, StoreError>;
    /// Whether settling `s` changes anything here. A single Redis node keeps no lease for
    /// a scope limited by requests per minute only (`Settlement::rpm_only`), so a
    /// settlement of nothing else needs neither a place in the queue nor a call.
    fn needs_settling(&self, _s: &Settlement) -> bool {
        true
    }
    /// True for an in-process store whose calls never wait on I/O: settlements then run
    /// inline instead of going through the settlement queue (`crate::settler`).
    fn settles_inline(&self) -> bool {
        false
    }
    /// Makes what the store holds durable now, ahead of its own schedule: the last step of
    /// a graceful shutdown (`crate::shutdown`). Stores that keep nothing locally need not.
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Gives back what this gateway holds in the store beyond its requests' own
    /// reservations (budget slices, `slices`): the last step of a graceful shutdown, once
    /// the requests have settled. Stores that hold nothing need not.
    async fn give_back_all(&self) {}
    /// Whether the store answers right now (for `/readyz`).
    async fn healthy(&self) -> bool;
    /// True for exactly one caller per (scope, name) within `ttl_ms`, across every gateway
    /// sharing the store (alerts fire once).
    async fn claim_once(&self, scope: &str, name: &str, ttl_ms: u64) -> Result<bool, StoreError>;
    /// Writes (`Some`) or deletes (`None`) the admin catalog's document `(kind, id)`; with
    /// `only_if_absent`, writes only if there is none. Every change bumps the catalog's
    /// version atomically with it. Returns whether anything changed.
    async fn catalog_write(
        &self,
        kind: &str,
        id: &str,
        doc: Option<&str>,
        only_if_absent: bool,
    ) -> Result<bool, StoreError>;
    /// The catalog's version: cheap, polled by every gateway to notice changes.
    async fn catalog_version(&self) -> Result<u64, StoreError>;
    /// Every catalog document, with the version they are at.
    async fn catalog_load(&self) -> Result<crate::catalog::CatalogDocs, StoreError>;
    /// Adds one gateway's rollup deltas to the rollups every gateway shares. `batch` names
    /// the deltas: a retry of the same batch (its outcome was unknown) counts once. The
    /// embedded store shares nothing: its usage API reads the gateway's own ledger.
    async fn rollups_add(
        &self,
        _batch: &str,
        _rows: &crate::ledger::Rollups,
    ) -> Result<(), StoreError> {
        Ok(())
    }
    /// The shared rollups of days `start..=end`, or None when this store keeps none.
    async fn rollups_read(
        &self,
        _start_day: u64,
        _end_day: u64,
    ) -> Result<Option<crate::ledger::Rollups>, StoreError> {
        Ok(None)
    }
}

#[cfg(test)]
pub mod suite;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_round_trips() {
        for z in [-1000i64, 0, 59, 60, 365, 10_957, 20_515, 100_000] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        assert_eq!(civil_from_days(20_514), (2026, 3, 2));
    }

    #[test]
    fn periods_roll_over_at_utc_boundaries() {
        // 2026-11-23T12:00:00Z
        let now = 1_795_435_200_000;
        let (id, reset) = Period::Daily.window(now);
        assert_eq!(id, "d20780");
        assert_eq!(reset, Some(1_795_478_400_000)); // 2026-11-24T00:00Z
        let (id, reset) = Period::Monthly.window(now);
        assert_eq!(id, "m202611");
        assert_eq!(reset, Some(1_796_083_200_000)); // 2026-12-01T00:00Z
        let (id, _) = Period::Monthly.window(1_796_083_200_000);
        assert_eq!(id, "m202612");
        let (id, reset) = Period::Monthly.window(1_798_761_600_000); // 2027-01-01
        assert_eq!((id.as_str(), reset), ("m202701", Some(1_801_440_000_000)));
        assert_eq!(Period::Total.window(now).0, "t");
    }

    #[test]
    fn period_ids_spell_what_strings_did_for_any_clock_and_act_as_str() {
        use std::collections::HashMap;
        // The ids as `String`s were built (letter, then the numbers zero-padded).
        let spelled = |p: Period, now: u64| -> String {
            let day = now / 86_400_000;
            match p {
                Period::Daily => format!("d{day}"),
                Period::Monthly => {
                    let (y, m, _) = civil_from_days(day as i64);
                    format!("m{:04}{m:02}", y.max(0))
                }
                Period::Total => "t".into(),
            }
        };
        // Up to year 97,000: five-digit years still fit.
        for now in [
            0,
            1,
            1_795_435_200_000,
            253_402_300_800_000,
            3_000_000_000_000_000,
        ] {
            for p in [Period::Daily, Period::Monthly, Period::Total] {
                let id = p.window(now).0;
                assert_eq!(id.as_str(), spelled(p, now), "{p:?} at {now}");
                let json = serde_json::to_string(&id).expect("serialize");
                assert_eq!(json, serde_json::to_string(&spelled(p, now)).expect("json"));
                let back: PeriodId = serde_json::from_str(&json).expect("deserialize");
                assert_eq!(back, id);
            }
        }
        // Maps keyed by `String` (the stores' counters) find an id by its `str`.
        let id = Period::Daily.window(1_795_435_200_000).0;
        let counters = HashMap::from([("d20780".to_string(), 7)]);
        assert_eq!(counters.get(id.as_str()), Some(&7));
        let by_id = HashMap::from([(id, 7)]);
        assert_eq!(by_id.get("d20780"), Some(&7), "hashes as its str");
        assert!(serde_json::from_str::<PeriodId>("\"d1234567890123456\"").is_err());
        let (d, t) = (Period::Daily.window(0).0, Period::Total.window(0).0);
        assert!(d < t && "d0" < "t", "ordered as str, not by length");
    }
}
