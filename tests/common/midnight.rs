//! The guard against a test running across midnight (UTC). One file, included by the
//! integration tests' `common` and by the store suite in `src/store/suite.rs` (which
//! cannot reach `tests/`' modules otherwise).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Budgets count spend in the current UTC day and month, slices are not taken near a
/// period's end and `/v1/usage` defaults to the month so far: a test that ran across
/// midnight would see a new period half way. Redis counts spend by its own clock (`TIME`),
/// so its tests cannot pin the day either. Tests start clear of it instead: one that
/// would start in the last two minutes of a day waits until just after midnight (at each
/// gateway's or Redis's start, blocking the thread). Tests about period ends use fixed
/// clocks; two minutes do not cover the ten in which budget slices are not taken, so a
/// test that needs slices uses a total budget.
pub fn clear_of_midnight() {
    const DAY_MS: u128 = 86_400_000;
    const MARGIN_MS: u128 = 120_000;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let left = DAY_MS - now % DAY_MS;
    if left < MARGIN_MS {
        std::thread::sleep(Duration::from_millis(left as u64 + 1_000));
    }
}
