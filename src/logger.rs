//! Operational log lines (store trouble, dropped settlements, webhook failures, the
//! shutdown drain; Pingora's own errors) on stderr, one line each: unix ms, level, where
//! from, message. The access log is separate: JSON on stdout (`server.access_log`).
//!
//! The level comes from `TOLLGATE_LOG` (off, error, warn, info, debug, trace; `warn` when
//! unset). Messages never carry credentials: store errors are scrubbed of the Redis
//! password, and neither gateway keys nor provider keys are ever formatted.

use std::str::FromStr;

use log::{LevelFilter, Log, Metadata, Record};

struct Stderr;

static STDERR: Stderr = Stderr;

impl Log for Stderr {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            let ms = crate::record::unix_ms(std::time::SystemTime::now());
            eprintln!(
                "{ms} {} {}: {}",
                record.level(),
                record.target(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
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
}
