//! Shared support for Tollgate's integration tests; include it with `mod common;`.
//!
//! - [`mock::MockProvider`]: a loopback HTTP/1.1 upstream that replays the recorded
//!   OpenAI / Anthropic responses in `tests/fixtures`.
//! - [`client`]: a small HTTP/1.1 client with timeouts, chunk-level visibility and
//!   keep-alive connections.
//! - [`gateway::Gateway`]: runs the `tollgate` binary on free loopback ports.
//! - [`wire`]: the framing helpers the mock and the client share.
//! - [`h2_provider::H2Provider`]: a provider on HTTP/2 over TLS (`tests/fixtures/tls`).
#![allow(dead_code)]

pub mod client;
pub mod gateway;
pub mod h2_provider;
pub mod mock;
pub mod redis;
pub mod wire;

use std::path::PathBuf;

mod midnight;
pub use midnight::clear_of_midnight;

/// Absolute path of `tests/fixtures`.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

/// Bytes of `tests/fixtures/<name>` (name includes the extension, e.g.
/// `"openai-chat-nonstream.json"`). Panics with the path if it cannot be read.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = fixtures_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

/// A fixture parsed as JSON. Panics with the path if it is not JSON.
pub fn fixture_json(name: &str) -> serde_json::Value {
    serde_json::from_slice(&fixture(name))
        .unwrap_or_else(|e| panic!("fixture {name} is not valid JSON: {e}"))
}

/// Hex SHA-256, as gateway key hashes are written in config.
pub fn sha256_hex(s: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The usage records a gateway printed in its access log, as JSON.
pub fn records(gw: &gateway::Gateway) -> Vec<serde_json::Value> {
    gw.log()
        .lines()
        .filter(|l| l.starts_with("{\"request_id\""))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
