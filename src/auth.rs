//! Gateway keys: hashed at rest, looked up by hash, compared in constant time.

use foldhash::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::config::KeyConfig;

pub type KeyHash = [u8; 32];

/// Who a request authenticated as. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub key_id: String,
    pub team: String,
    pub allow_byok: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing gateway key: send it as `Authorization: Bearer <key>` or `x-api-key`")]
    Missing,
    #[error("invalid gateway key")]
    Invalid,
}

pub fn hash_key(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

pub fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

pub fn parse_hash(hex: &str) -> Option<KeyHash> {
    let bytes = hex.trim().as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Equality whose time does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The configured keys, indexed by hash.
#[derive(Debug, Default)]
pub struct KeyRing {
    /// Callers shared (`Arc`): every request takes one, and a copy would be two strings.
    by_hash: HashMap<KeyHash, (KeyHash, Arc<Caller>)>,
}

impl KeyRing {
    pub fn from_config(keys: &[KeyConfig]) -> KeyRing {
        let by_hash = keys
            .iter()
            .filter(|k| !k.revoked)
            .filter_map(|k| {
                let hash = parse_hash(&k.sha256)?;
                let caller = Caller {
                    key_id: k.id.clone(),
                    team: k.team.clone(),
                    allow_byok: k.allow_byok,
                };
                Some((hash, (hash, Arc::new(caller))))
            })
            .collect();
        KeyRing { by_hash }
    }

    /// The config's keys, minus those the admin catalog revoked, plus the catalog's keys.
    pub fn with_catalog(keys: &[KeyConfig], catalog: &crate::catalog::Catalog) -> KeyRing {
        let (api_keys, revoked) = catalog.key_changes();
        let mut ring = KeyRing::from_config(keys);
        ring.by_hash
            .retain(|_, (_, caller)| !revoked.contains(&caller.key_id));
        for (hash, k) in api_keys {
            let caller = Caller {
                key_id: k.id,
                team: k.team,
                allow_byok: k.allow_byok,
            };
            ring.by_hash.insert(hash, (hash, Arc::new(caller)));
        }
        ring
    }

    /// Finds the caller for a presented key. The map is keyed by the key's SHA-256, which
    /// a caller cannot steer, and the stored hash is then compared in constant time.
    pub fn authenticate(&self, presented: Option<&str>) -> Result<Arc<Caller>, AuthError> {
        let key = presented
            .filter(|k| !k.is_empty())
            .ok_or(AuthError::Missing)?;
        let hash = hash_key(key);
        match self.by_hash.get(&hash) {
            Some((stored, caller)) if constant_time_eq(stored, &hash) => Ok(caller.clone()),
            _ => Err(AuthError::Invalid),
        }
    }
}

/// Extracts the presented gateway key from `Authorization: Bearer` or `x-api-key`.
/// Borrowed: the raw key is not copied (one copy fewer of a secret in memory).
pub fn presented_key<'a>(
    authorization: Option<&'a [u8]>,
    x_api_key: Option<&'a [u8]>,
) -> Option<&'a str> {
    if let Some(auth) = authorization.and_then(|v| std::str::from_utf8(v).ok()) {
        let auth = auth.trim();
        if auth.len() > 7 && auth[..7].eq_ignore_ascii_case("bearer ") {
            return Some(auth[7..].trim());
        }
    }
    x_api_key
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::trim)
}

/// Mints a new gateway key from the OS's random source: `tg_` + 48 hex characters.
pub fn mint_key() -> std::io::Result<String> {
    use std::io::Read;
    let mut raw = [0u8; 24];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
    Ok(format!("tg_{}", to_hex(&raw)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        KeyRing::from_config(&[
            KeyConfig {
                id: "k1".into(),
                team: "t1".into(),
                sha256: to_hex(&hash_key("tg_secret")),
                allow_byok: false,
                revoked: false,
            },
            KeyConfig {
                id: "old".into(),
                team: "t1".into(),
                sha256: to_hex(&hash_key("tg_revoked")),
                allow_byok: false,
                revoked: true,
            },
        ])
    }

    #[test]
    fn right_key_authenticates_to_its_team() {
        let c = ring().authenticate(Some("tg_secret")).expect("valid");
        assert_eq!((c.key_id.as_str(), c.team.as_str()), ("k1", "t1"));
    }

    #[test]
    fn wrong_missing_and_revoked_keys_fail() {
        let r = ring();
        assert_eq!(r.authenticate(Some("tg_secreT")), Err(AuthError::Invalid));
        assert_eq!(r.authenticate(None), Err(AuthError::Missing));
        assert_eq!(r.authenticate(Some("")), Err(AuthError::Missing));
        assert_eq!(r.authenticate(Some("tg_revoked")), Err(AuthError::Invalid));
    }

    #[test]
    fn key_comes_from_bearer_or_x_api_key() {
        assert_eq!(presented_key(Some(b"Bearer abc"), None), Some("abc"));
        assert_eq!(presented_key(Some(b"bearer  abc "), None), Some("abc"));
        assert_eq!(presented_key(None, Some(b"xyz")), Some("xyz"));
        assert_eq!(presented_key(Some(b"Basic abc"), None), None);
    }

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let h = hash_key("x");
        assert_eq!(parse_hash(&to_hex(&h)), Some(h));
        assert_eq!(parse_hash("zz"), None);
        assert_eq!(parse_hash(&"g".repeat(64)), None);
    }

    #[test]
    fn minted_keys_differ_and_have_the_prefix() {
        let a = mint_key().expect("urandom");
        let b = mint_key().expect("urandom");
        assert!(a.starts_with("tg_") && a.len() == 51);
        assert_ne!(a, b);
    }
}
