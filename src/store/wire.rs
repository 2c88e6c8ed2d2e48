//! The Redis store's script calls on the wire: keys and arguments written into one buffer
//! per call, and the combined call's reply decoded from one string.
//!
//! Why: a reservation has about forty keys and arguments. Built as a `String` each, then
//! copied by `redis::ScriptInvocation` into a `Vec<u8>` each, they cost some eighty
//! allocations per request, and the reply, as nested arrays of integers, went through the
//! `redis` crate's general parser value by value (≈ 40k instructions per request, more than
//! the rest of the store call). Here a call's keys and arguments are one buffer each, copied
//! once into the command, and the script answers a combined call with one bulk string of
//! integers that `decode_batch` reads in a single pass (see BENCHMARKS.md, fifth round).

use redis::Cmd;

/// Keys or arguments of one script call, back to back in one buffer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Args {
    bytes: Vec<u8>,
    /// Where each item ends in `bytes`.
    ends: Vec<usize>,
}

impl Args {
    /// Room for `items` items of about 16 bytes.
    pub fn with_capacity(items: usize) -> Args {
        Args {
            bytes: Vec::with_capacity(items * 16),
            ends: Vec::with_capacity(items),
        }
    }

    /// How many items.
    pub fn count(&self) -> usize {
        self.ends.len()
    }

    fn end(&mut self) -> &mut Args {
        self.ends.push(self.bytes.len());
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Args {
        self.bytes.extend_from_slice(s.as_bytes());
        self.end()
    }

    pub fn num(&mut self, n: u64) -> &mut Args {
        self.bytes
            .extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        self.end()
    }

    /// A limit, or the empty string for none (as the script reads it).
    pub fn limit(&mut self, n: Option<u64>) -> &mut Args {
        match n {
            Some(n) => self.num(n),
            None => self.end(),
        }
    }

    /// `<prefix>{<scope>}:<suffix>`: a scope's key (`suffix` empty: the scope's base).
    pub fn scope_key(&mut self, prefix: &str, scope: &str, suffix: &str) -> &mut Args {
        for part in [prefix, "{", scope, "}:", suffix] {
            self.bytes.extend_from_slice(part.as_bytes());
        }
        self.end()
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let item = &self.bytes[start..end];
            start = end;
            item
        })
    }

    fn byte_len(&self) -> usize {
        self.bytes.len()
    }
}

/// `EVALSHA sha numkeys keys... args...`, each part copied once into the command.
pub fn evalsha<'a>(sha: &str, keys: &[&'a Args], args: &[&'a Args]) -> Cmd {
    let count: usize = keys.iter().chain(args).map(|a| a.count()).sum();
    let bytes: usize = keys.iter().chain(args).map(|a| a.byte_len()).sum();
    let mut cmd = Cmd::with_capacity(3 + count, 16 + sha.len() + bytes);
    cmd.arg("EVALSHA")
        .arg(sha)
        .arg(keys.iter().map(|k| k.count()).sum::<usize>());
    for part in keys.iter().chain(args) {
        for item in part.iter() {
            cmd.arg(item);
        }
    }
    cmd
}

/// The `batch` command's reply (see `redis.lua`): the settlements' replies, then each
/// reservation's, as integers joined by `,`, the lists separated by `;`. Returns the
/// settlements' replies and one list per reservation; None if the reply is malformed.
/// A reservation's list is never empty, so an empty first list means no settlements.
pub fn decode_batch(reply: &[u8]) -> Option<(Vec<i64>, Vec<Vec<i64>>)> {
    let mut lists = reply.split(|&b| b == b';');
    let settled = integers(lists.next()?)?;
    let reserved = lists
        .map(|list| integers(list).filter(|l| !l.is_empty()))
        .collect::<Option<Vec<_>>>()?;
    Some((settled, reserved))
}

/// Integers joined by `,`; the empty string is the empty list.
fn integers(list: &[u8]) -> Option<Vec<i64>> {
    if list.is_empty() {
        return Some(Vec::new());
    }
    list.split(|&b| b == b',').map(integer).collect()
}

fn integer(digits: &[u8]) -> Option<i64> {
    let (negative, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(i64::from(d - b'0'))?;
    }
    Some(if negative { -n } else { n })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(a: &Args) -> Vec<String> {
        a.iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    #[test]
    fn args_keep_each_item_apart_including_empty_ones() {
        let mut a = Args::with_capacity(2);
        a.str("r-1")
            .num(0)
            .num(u64::MAX)
            .limit(None)
            .limit(Some(60))
            .scope_key("tg:", "customer:acme", "rl")
            .scope_key("tg:", "team:x", "")
            .str("");
        assert_eq!(
            items(&a),
            [
                "r-1",
                "0",
                "18446744073709551615",
                "",
                "60",
                "tg:{customer:acme}:rl",
                "tg:{team:x}:",
                ""
            ]
        );
        assert_eq!(a.count(), 8);
    }

    #[test]
    fn evalsha_counts_only_the_keys_and_keeps_their_order() {
        let mut k1 = Args::default();
        k1.str("a").str("b");
        let mut k2 = Args::default();
        k2.str("c");
        let mut head = Args::default();
        head.str("batch").num(2);
        let mut tail = Args::default();
        tail.limit(None).str("x");
        let cmd = evalsha("abc123", &[&k1, &k2], &[&head, &tail]);
        let got: Vec<Vec<u8>> = cmd
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                _ => b"<not simple>".to_vec(),
            })
            .collect();
        let want: Vec<&[u8]> = vec![
            b"EVALSHA", b"abc123", b"3", b"a", b"b", b"c", b"batch", b"2", b"", b"x",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn batch_replies_decode() {
        assert_eq!(decode_batch(b""), Some((vec![], vec![])));
        assert_eq!(decode_batch(b"2,0"), Some((vec![2, 0], vec![])));
        assert_eq!(
            decode_batch(b";1,1796083200000,512,0,42;0,1796083200000,1,3,0,59000000"),
            Some((
                vec![],
                vec![
                    vec![1, 1_796_083_200_000, 512, 0, 42],
                    vec![0, 1_796_083_200_000, 1, 3, 0, 59_000_000]
                ]
            ))
        );
        assert_eq!(
            decode_batch(b"3;1,9007199254740992,-1,0"),
            Some((vec![3], vec![vec![1, 9_007_199_254_740_992, -1, 0]]))
        );
    }

    #[test]
    fn malformed_batch_replies_are_refused() {
        for bad in [
            &b"1,,2"[..],
            b";",
            b"1;2,",
            b"1;-",
            b"x",
            b"1;1.5",
            b"1e3",
            b"99999999999999999999",
            b"1; 2",
        ] {
            assert_eq!(
                decode_batch(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
