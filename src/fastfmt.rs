//! Text written on the request path without `format!`'s or serde's general machinery,
//! which showed up in the per-request instruction counts (BENCHMARKS.md, "Third round:
//! instructions and allocations"): numbers into ids, header values and period keys, and
//! JSON objects for the ledger and the budget journal, byte for byte what `serde_json`
//! would write.

/// Appends `n` in decimal.
pub fn push_u64(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// Appends `n` in decimal, zero-padded on the left to at least `width` digits.
pub fn push_padded(out: &mut String, n: u64, width: usize) {
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(n);
    for _ in digits.len()..width {
        out.push('0');
    }
    out.push_str(digits);
}

/// Appends `n` in lower-case hexadecimal, without leading zeros.
pub fn push_hex(out: &mut String, n: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 16];
    let mut i = buf.len();
    let mut rest = n;
    loop {
        i -= 1;
        buf[i] = HEX[(rest & 0xf) as usize];
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    for &b in &buf[i..] {
        out.push(char::from(b));
    }
}

/// Writes one JSON object field by field: keys are trusted identifiers written as they
/// are; string values are escaped as `serde_json` escapes them.
pub struct JsonObject<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> JsonObject<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        JsonObject { out, first: true }
    }

    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    pub fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        push_json_str(self.out, value);
    }

    pub fn opt_str(&mut self, key: &str, value: Option<&str>) {
        match value {
            Some(v) => self.str(key, v),
            None => self.raw(key, "null"),
        }
    }

    pub fn strs(&mut self, key: &str, values: &[impl AsRef<str>]) {
        self.key(key);
        self.out.push(b'[');
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            push_json_str(self.out, v.as_ref());
        }
        self.out.push(b']');
    }

    pub fn u64(&mut self, key: &str, value: u64) {
        self.key(key);
        self.out
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    pub fn bool(&mut self, key: &str, value: bool) {
        self.raw(key, if value { "true" } else { "false" });
    }

    pub fn f64(&mut self, key: &str, value: f64) {
        self.key(key);
        // serde_json's own number format (and `null` for a non-finite value).
        let _ = serde_json::to_writer(&mut *self.out, &value);
    }

    pub fn opt_f64(&mut self, key: &str, value: Option<f64>) {
        match value {
            Some(v) => self.f64(key, v),
            None => self.raw(key, "null"),
        }
    }

    /// A nested object under `key`, written by `fill`.
    pub fn object(&mut self, key: &str, fill: impl FnOnce(&mut JsonObject<'_>)) {
        self.key(key);
        let mut inner = JsonObject::new(self.out);
        fill(&mut inner);
        inner.end();
    }

    fn raw(&mut self, key: &str, json: &str) {
        self.key(key);
        self.out.extend_from_slice(json.as_bytes());
    }

    pub fn end(self) {
        self.out.push(b'}');
    }
}

/// A JSON string literal: plain text (the usual case) is copied as it is; anything that
/// needs escaping goes through serde_json.
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // No early exit: the compiler can check many bytes per instruction this way.
    let needs_escape = s.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !needs_escape {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn match_format_for_edge_values() {
        for n in [
            0u64,
            1,
            9,
            10,
            15,
            16,
            255,
            999,
            1000,
            123_456_789,
            u64::MAX,
        ] {
            let mut s = String::new();
            push_u64(&mut s, n);
            assert_eq!(s, format!("{n}"));
            for width in [0, 1, 2, 4, 9, 21] {
                let mut s = String::new();
                push_padded(&mut s, n, width);
                assert_eq!(s, format!("{n:0width$}"));
            }
            let mut s = String::from("x");
            push_hex(&mut s, n);
            assert_eq!(s, format!("x{n:x}"));
        }
    }

    #[test]
    fn json_strings_escape_as_serde_json_does() {
        for s in [
            "",
            "plain",
            "quote \" here",
            "back\\slash",
            "tab\tnl\n",
            "\u{1}ctl",
            "ünï ✓",
            "\u{7f}",
        ] {
            let mut out = Vec::new();
            push_json_str(&mut out, s);
            assert_eq!(out, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
    }
}
