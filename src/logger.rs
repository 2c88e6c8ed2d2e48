//! Operational log lines (store trouble, dropped settlements, webhook failures, the
//! shutdown drain; Pingora's own errors) on stderr, one line each: unix ms, level, where
//! from, message. The access log is separate: JSON on stdout (`server.access_log`).
//!
//! The level comes from `TOLLGATE_LOG` (off, error, warn, info, debug, trace; `warn` when
//! unset). It applies in full to Tollgate's own lines only: other crates' lines stop at
//! `info`, because some of Pingora's debug and trace lines print whole request headers,
//! keys included. Tollgate's own lines never carry credentials: store errors are
//! scrubbed of the Redis password, a webhook URL is never quoted, and neither gateway
//! keys nor provider keys are ever formatted.
//!
//! Lines that a fault repeats for every request (the store down, the disk full) go
//! through `log_throttled!`: the first at once, then one at most every `THROTTLE_MS`,
//! saying how many were left out.

use std::io::Write;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Stderr;

static STDERR: Stderr = Stderr;

/// Where Tollgate's own lines come from (module paths).
const OWN: &str = "tollgate";

impl Log for Stderr {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
            && (metadata.level() <= Level::Info || metadata.target().starts_with(OWN))
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let ms = crate::record::unix_ms(std::time::SystemTime::now());
        stderr_line(&format!(
            "{ms} {} {}: {}",
            record.level(),
            record.target(),
            record.args()
        ));
    }

    fn flush(&self) {}
}

/// Writes one line to stderr in one write, so lines from different threads do not
/// interleave; a failed write (stderr closed) is dropped, never a panic in whatever was
/// logging (`eprintln!` panics).
pub fn stderr_line(line: &str) {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    let _ = std::io::stderr().lock().write_all(&bytes);
}

/// The level `TOLLGATE_LOG` names; an unknown name is an error, not a silent default.
pub fn level(setting: Option<&str>) -> Result<LevelFilter, String> {
    match setting.map(str::trim) {
        None | Some("") => Ok(LevelFilter::Warn),
        Some(s) => LevelFilter::from_str(s).map_err(|_| {
            format!("TOLLGATE_LOG={s:?}: expected off, error, warn, info, debug or trace")
        }),
    }
}

/// Installs the logger at the level `TOLLGATE_LOG` names.
pub fn init() -> Result<(), String> {
    let level = level(std::env::var("TOLLGATE_LOG").ok().as_deref())?;
    log::set_logger(&STDERR).map_err(|e| e.to_string())?;
    log::set_max_level(level);
    Ok(())
}

/// Lets a repeated line through at most once per `period_ms`; counts the rest.
pub struct Throttle {
    period_ms: u64,
    /// When a line last went through (unix ms); 0: never.
    last_ms: AtomicU64,
    left_out: AtomicU64,
}

impl Throttle {
    pub const fn new(period_ms: u64) -> Throttle {
        Throttle {
            period_ms,
            last_ms: AtomicU64::new(0),
            left_out: AtomicU64::new(0),
        }
    }

    /// Some(lines left out since the last one let through) if this one may go out.
    pub fn allow(&self, now_ms: u64) -> Option<u64> {
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last) >= self.period_ms;
        if due
            && self
                .last_ms
                .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.left_out.swap(0, Ordering::Relaxed));
        }
        self.left_out.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// `allow` at the current time.
    pub fn allow_now(&self) -> Option<u64> {
        self.allow(crate::record::unix_ms(std::time::SystemTime::now()))
    }
}

/// How often a throttled line (`log_throttled!`) may go out.
pub const THROTTLE_MS: u64 = 10_000;

/// `log::log!` for a line a fault repeats per request: each call site lets one through
/// per `THROTTLE_MS`, followed by how many it held back in between.
#[macro_export]
macro_rules! log_throttled {
    ($level:expr, $($arg:tt)+) => {{
        static THROTTLE: $crate::logger::Throttle =
            $crate::logger::Throttle::new($crate::logger::THROTTLE_MS);
        if let Some(n) = THROTTLE.allow_now() {
            log::log!($level, "{}{}", format_args!($($arg)+), $crate::logger::left_out(n));
        }
    }};
}

/// " (N like it in between not shown)" after a throttled line, or nothing.
pub fn left_out(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} like it in between not shown)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_level_defaults_to_warn_and_refuses_unknown_names() {
        assert_eq!(level(None), Ok(LevelFilter::Warn));
        assert_eq!(level(Some("")), Ok(LevelFilter::Warn));
        assert_eq!(level(Some("info")), Ok(LevelFilter::Info));
        assert_eq!(level(Some("OFF")), Ok(LevelFilter::Off));
        let err = level(Some("loud")).unwrap_err();
        assert!(err.contains("TOLLGATE_LOG"), "{err}");
    }

    #[test]
    fn other_crates_stop_at_info_and_ours_go_to_the_level() {
        log::set_max_level(LevelFilter::Trace);
        let at = |level, target| {
            STDERR.enabled(&Metadata::builder().level(level).target(target).build())
        };
        assert!(at(Level::Trace, "tollgate::settler"));
        assert!(at(Level::Info, "pingora_proxy"));
        assert!(!at(
            Level::Debug,
            "pingora_core::protocols::http::v1::client"
        ));
        assert!(!at(Level::Trace, "pingora_proxy"));
    }

    #[test]
    fn a_throttle_lets_one_line_through_per_period_and_counts_the_rest() {
        let t = Throttle::new(10_000);
        assert_eq!(t.allow(1_000), Some(0), "the first goes at once");
        assert_eq!(t.allow(1_001), None);
        assert_eq!(t.allow(10_999), None);
        assert_eq!(
            t.allow(11_000),
            Some(2),
            "then one per period, with the count"
        );
        assert_eq!(t.allow(11_001), None);
        assert_eq!(left_out(0), "");
        assert!(left_out(3).contains('3'));
    }
}
