//! Finds a JSON object's top-level members without parsing their values: a response body's
//! `usage` and `model` sit beside a `choices` or `content` member that can be most of the
//! body, and a full parse of it only to skip it cost more than everything else in reading
//! the response. Strings are skipped with `memchr`; nesting is tracked by counting
//! brackets outside strings.
//!
//! This is a locator, not a validator: members it skips are not checked (a body malformed
//! only inside `choices` still yields its usage). Anything it cannot place with certainty
//! (not an object, an escaped key, a repeated wanted key, an unbalanced or truncated body,
//! trailing bytes) gives `None`, and the caller falls back to a full parse.

use memchr::{memchr2, memchr3};

/// The raw values of the wanted top-level members, as slices of the body.
pub fn find<'a, const N: usize>(
    body: &'a [u8],
    wanted: [&str; N],
) -> Option<[Option<&'a [u8]>; N]> {
    let mut found = [None; N];
    let mut at = skip_ws(body, 0);
    if body.get(at) != Some(&b'{') {
        return None;
    }
    at = skip_ws(body, at + 1);
    if body.get(at) == Some(&b'}') {
        return end(body, at + 1).then_some(found);
    }
    loop {
        let (key, after_key) = key(body, at)?;
        at = skip_ws(body, after_key);
        if body.get(at) != Some(&b':') {
            return None;
        }
        let start = skip_ws(body, at + 1);
        let stop = value_end(body, start)?;
        if let Some(i) = wanted.iter().position(|w| w.as_bytes() == key) {
            if found[i].is_some() {
                return None;
            }
            found[i] = Some(&body[start..stop]);
        }
        at = skip_ws(body, stop);
        match body.get(at) {
            Some(b',') => at = skip_ws(body, at + 1),
            Some(b'}') => return end(body, at + 1).then_some(found),
            _ => return None,
        }
    }
}

fn skip_ws(body: &[u8], mut at: usize) -> usize {
    while matches!(body.get(at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        at += 1;
    }
    at
}

/// Only whitespace may follow the object.
fn end(body: &[u8], at: usize) -> bool {
    skip_ws(body, at) == body.len()
}

/// A member name without escapes (an escaped one could spell a wanted name: not placed).
fn key(body: &[u8], at: usize) -> Option<(&[u8], usize)> {
    if body.get(at) != Some(&b'"') {
        return None;
    }
    let rest = body.get(at + 1..)?;
    let close = memchr2(b'"', b'\\', rest)?;
    if rest[close] != b'"' {
        return None;
    }
    Some((&rest[..close], at + 1 + close + 1))
}

/// Where the string opening at `at` ends (just past its closing quote).
fn string_end(body: &[u8], at: usize) -> Option<usize> {
    let mut i = at + 1;
    loop {
        let rest = body.get(i..)?;
        let hit = memchr2(b'"', b'\\', rest)?;
        if rest[hit] == b'"' {
            return Some(i + hit + 1);
        }
        i += hit + 2; // the backslash and the character it escapes
    }
}

/// Where the value starting at `at` ends.
fn value_end(body: &[u8], at: usize) -> Option<usize> {
    match body.get(at)? {
        b'"' => string_end(body, at),
        b'{' | b'[' => nested_end(body, at),
        // A number, `true`, `false` or `null`: up to the next delimiter.
        _ => {
            let len = body[at..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(body.len() - at);
            (len > 0).then_some(at + len)
        }
    }
}

/// Where the object or array opening at `at` closes.
fn nested_end(body: &[u8], at: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = at;
    loop {
        let rest = body.get(i..)?;
        // Between strings only brackets matter; jump to the next quote or bracket of
        // either kind (memchr3 takes three bytes, so `[`/`]` are checked on the way).
        let hit = memchr3(b'"', b'{', b'}', rest).unwrap_or(rest.len());
        for (k, &b) in rest[..hit].iter().enumerate() {
            match b {
                b'[' => depth += 1,
                b']' => {
                    depth = depth.checked_sub(1)?;
                    if depth == 0 {
                        return Some(i + k + 1);
                    }
                }
                _ => {}
            }
        }
        i += hit;
        match body.get(i)? {
            b'"' => i = string_end(body, i)?,
            b'{' => {
                depth += 1;
                i += 1;
            }
            _ => {
                depth = depth.checked_sub(1)?;
                i += 1;
            }
        }
        if depth == 0 {
            return Some(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find2(body: &str) -> Option<[Option<&str>; 2]> {
        find(body.as_bytes(), ["usage", "model"])
            .map(|f| f.map(|v| v.map(|s| std::str::from_utf8(s).expect("utf-8"))))
    }

    #[test]
    fn finds_top_level_members_and_not_nested_ones() {
        let body = r#" {"id":"x","model":"gpt-4o","choices":[{"message":{"content":"say \"usage\": {}","usage":1}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4} , "n": -1.5e3, "ok": true } "#;
        assert_eq!(
            find2(body),
            Some([
                Some(r#"{"prompt_tokens": 3, "completion_tokens": 4}"#),
                Some(r#""gpt-4o""#)
            ])
        );
        assert_eq!(find2("{}"), Some([None, None]));
        assert_eq!(find2(r#"{"model":null}"#), Some([None, Some("null")]));
    }

    #[test]
    fn brackets_and_escapes_inside_strings_do_not_count() {
        let body = r#"{"a":["]]}}{{[[", "\\", "\\\"}"],"b":{"c":"}"},"usage":{}}"#;
        assert_eq!(find2(body), Some([Some("{}"), None]));
    }

    #[test]
    fn anything_it_cannot_place_gives_none() {
        for body in [
            "",
            "[]",
            r#""usage""#,
            r#"{"usage":{}"#,             // truncated
            r#"{"usage":{}} x"#,          // trailing bytes
            r#"{"usage":{},"usage":{}}"#, // repeated
            r#"{"us\u0061ge":{}}"#,       // escaped name
            r#"{"a":[1,2}"#,              // unbalanced
            r#"{"a":"open}"#,             // unterminated string
            r#"{"a" 1}"#,                 // no colon
            r#"{"a":1 "b":2}"#,           // no comma
            r#"{"a":}"#,                  // no value
            r#"{"a":"\"#,                 // escape at the end
        ] {
            assert_eq!(find2(body), None, "{body}");
        }
    }

    /// On valid JSON it agrees with serde, member by member.
    #[test]
    fn agrees_with_serde_on_valid_bodies() {
        let bodies = [
            r#"{"usage":{"input_tokens":1},"model":"m","content":[{"type":"text","text":"[{\"x\"}]"}]}"#,
            r#"{"model":"m","usage":[1,[2,{"a":[]}]],"x":{"y":[{"z":"]"}]}}"#,
            "{\n  \"model\" : \"m\\u00e9\" ,\n  \"usage\" : 12 \n}\n",
        ];
        for body in bodies {
            let v: serde_json::Value = serde_json::from_str(body).expect("valid");
            let found = find2(body).expect("placed");
            for (i, name) in ["usage", "model"].iter().enumerate() {
                let raw =
                    found[i].map(|s| serde_json::from_str::<serde_json::Value>(s).expect("value"));
                assert_eq!(raw.as_ref(), v.get(name), "{body} {name}");
            }
        }
    }
}
