//! Incremental Server-Sent-Events parser: bytes in, events out.
//!
//! Implements the WHATWG "parse an event stream" rules on raw bytes. Network chunks may end
//! anywhere — inside a line, between `\r` and `\n`, inside a multi-byte UTF-8 character — so the
//! parser never decodes per chunk: it splits on the ASCII bytes `\r`, `\n` and `:`, which cannot
//! occur inside a multi-byte UTF-8 sequence, and hands out field values as byte slices.
//!
//! Events are passed to a callback and borrow from either the chunk being pushed or the parser's
//! own buffers, so the common case (a whole event inside one chunk) copies and allocates nothing.

use memchr::{memchr, memchr2};

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One dispatched event. Slices are only valid for the duration of the callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The `event:` field, or empty if the event had none (the spec's default type "message").
    pub event: &'a [u8],
    /// All `data:` lines joined by `\n`.
    pub data: &'a [u8],
    /// Absolute stream offset of the event's first line (after any preceding comment lines).
    pub start_offset: u64,
    /// Absolute stream offset just after the blank line that dispatched the event.
    ///
    /// When that blank line ends in a `\r` that is the last byte of a chunk, a `\n` opening the
    /// next chunk still belongs to this event's line end; the parser cannot know that yet.
    pub end_offset: u64,
}

/// Incremental parser state. Feed chunks in stream order with [`SseParser::push`].
#[derive(Debug, Default)]
pub struct SseParser {
    /// Start of a line whose end has not arrived yet (only ever holds bytes of one line).
    partial_line: Vec<u8>,
    data: Field,
    event: Field,
    /// The previous chunk ended in `\r`; a `\n` opening the next chunk completes that line end.
    skip_next_lf: bool,
    /// A line has been completed, so a BOM can no longer appear.
    seen_first_line: bool,
    /// A field line has been seen since the last blank line: an event is under construction.
    in_event: bool,
    /// Total bytes pushed so far.
    offset: u64,
    /// Offset just past the last line that left the parser between events.
    idle_offset: u64,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses `chunk` and calls `on_event` for every event it completes, in stream order.
    pub fn push(&mut self, chunk: &[u8], mut on_event: impl FnMut(SseEvent<'_>)) {
        if chunk.is_empty() {
            return;
        }
        let base = self.offset;
        let mut pos = self.skip_split_line_end(chunk, base);
        while let Some(found) = memchr2(b'\n', b'\r', &chunk[pos..]) {
            let line_end = pos + found;
            let next = line_end + self.terminator_len(chunk, line_end);
            let end_offset = base + next as u64;
            if self.partial_line.is_empty() {
                self.handle_line(
                    chunk,
                    &chunk[pos..line_end],
                    Some(pos),
                    end_offset,
                    &mut on_event,
                );
            } else {
                self.finish_carried_line(chunk, &chunk[pos..line_end], end_offset, &mut on_event);
            }
            pos = next;
        }
        self.partial_line.extend_from_slice(&chunk[pos..]);
        // Values still pointing into `chunk` must survive it.
        self.data.detach(chunk);
        self.event.detach(chunk);
        self.offset = base + chunk.len() as u64;
    }

    /// Total bytes pushed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Offset up to which the stream is settled: every byte before it belongs to a dispatched
    /// event, a comment, or an event that was discarded; no later byte can change its meaning.
    pub fn idle_offset(&self) -> u64 {
        self.idle_offset
    }

    /// Whether bytes after the last event boundary are pending — an unterminated line or an
    /// event without its closing blank line. True at end of stream means it was truncated.
    pub fn has_unterminated(&self) -> bool {
        self.idle_offset < self.offset
    }

    /// Consumes a `\n` that completes a `\r` ending the previous chunk. Returns the start position.
    fn skip_split_line_end(&mut self, chunk: &[u8], base: u64) -> usize {
        if !std::mem::take(&mut self.skip_next_lf) || chunk[0] != b'\n' {
            return 0;
        }
        if !self.in_event {
            self.idle_offset = base + 1;
        }
        1
    }

    /// Length of the line terminator starting at `at` (1 or 2 bytes).
    fn terminator_len(&mut self, chunk: &[u8], at: usize) -> usize {
        if chunk[at] == b'\n' {
            return 1;
        }
        match chunk.get(at + 1) {
            Some(b'\n') => 2,
            Some(_) => 1,
            None => {
                self.skip_next_lf = true;
                1
            }
        }
    }

    /// Completes a line that began in an earlier chunk.
    fn finish_carried_line(
        &mut self,
        chunk: &[u8],
        tail: &[u8],
        end_offset: u64,
        on_event: &mut impl FnMut(SseEvent<'_>),
    ) {
        let mut line = std::mem::take(&mut self.partial_line);
        line.extend_from_slice(tail);
        self.handle_line(chunk, &line, None, end_offset, on_event);
        line.clear();
        self.partial_line = line; // keep the allocation
    }

    /// `chunk_pos` is the line's start inside `chunk`, or None if the line lives elsewhere.
    fn handle_line(
        &mut self,
        chunk: &[u8],
        line: &[u8],
        chunk_pos: Option<usize>,
        end_offset: u64,
        on_event: &mut impl FnMut(SseEvent<'_>),
    ) {
        let (line, chunk_pos) = self.strip_bom(line, chunk_pos);
        if line.is_empty() {
            self.dispatch(chunk, end_offset, on_event);
        } else if line[0] == b':' {
            if !self.in_event {
                self.idle_offset = end_offset;
            }
        } else {
            self.in_event = true;
            self.apply_field(chunk, line, chunk_pos);
        }
    }

    fn strip_bom<'l>(&mut self, line: &'l [u8], pos: Option<usize>) -> (&'l [u8], Option<usize>) {
        if std::mem::replace(&mut self.seen_first_line, true) {
            return (line, pos);
        }
        match line.strip_prefix(BOM) {
            Some(rest) => (rest, pos.map(|p| p + BOM.len())),
            None => (line, pos),
        }
    }

    fn apply_field(&mut self, chunk: &[u8], line: &[u8], chunk_pos: Option<usize>) {
        let (name, value_start) = match memchr(b':', line) {
            Some(colon) if line.get(colon + 1) == Some(&b' ') => (&line[..colon], colon + 2),
            Some(colon) => (&line[..colon], colon + 1),
            None => (line, line.len()),
        };
        let value = &line[value_start..];
        let value_pos = chunk_pos.map(|p| p + value_start);
        match name {
            b"data" => self.data.append_line(chunk, value, value_pos),
            b"event" => self.event.set(value, value_pos),
            // `id` and `retry` only matter for reconnection, which a proxy never does.
            _ => {}
        }
    }

    fn dispatch(&mut self, chunk: &[u8], end_offset: u64, on_event: &mut impl FnMut(SseEvent<'_>)) {
        let start_offset = std::mem::replace(&mut self.idle_offset, end_offset);
        self.in_event = false;
        if self.data.is_set() {
            on_event(SseEvent {
                event: self.event.get(chunk),
                data: self.data.get(chunk),
                start_offset,
                end_offset,
            });
        }
        self.data.clear();
        self.event.clear();
    }
}

/// A field value that borrows from the current chunk when it can and is copied otherwise.
#[derive(Debug, Default)]
struct Field {
    slot: Slot,
    owned: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy)]
enum Slot {
    #[default]
    Unset,
    InChunk {
        start: usize,
        end: usize,
    },
    Owned,
}

impl Field {
    fn is_set(&self) -> bool {
        !matches!(self.slot, Slot::Unset)
    }

    fn get<'a>(&'a self, chunk: &'a [u8]) -> &'a [u8] {
        match self.slot {
            Slot::Unset => &[],
            Slot::InChunk { start, end } => &chunk[start..end],
            Slot::Owned => &self.owned,
        }
    }

    /// Replaces the value. `chunk_pos` is where `value` starts in the current chunk, if it is there.
    fn set(&mut self, value: &[u8], chunk_pos: Option<usize>) {
        self.slot = match chunk_pos {
            Some(start) => Slot::InChunk {
                start,
                end: start + value.len(),
            },
            None => {
                self.owned.clear();
                self.owned.extend_from_slice(value);
                Slot::Owned
            }
        };
    }

    /// Appends one more line, joined to the previous ones by `\n`.
    fn append_line(&mut self, chunk: &[u8], value: &[u8], chunk_pos: Option<usize>) {
        match self.slot {
            Slot::Unset => return self.set(value, chunk_pos),
            Slot::InChunk { .. } => self.detach(chunk),
            Slot::Owned => {}
        }
        self.owned.push(b'\n');
        self.owned.extend_from_slice(value);
    }

    /// Copies a value that points into `chunk` so it outlives the chunk.
    fn detach(&mut self, chunk: &[u8]) {
        if let Slot::InChunk { start, end } = self.slot {
            self.owned.clear();
            self.owned.extend_from_slice(&chunk[start..end]);
            self.slot = Slot::Owned;
        }
    }

    /// Forgets the value but keeps the allocation for the next event.
    fn clear(&mut self) {
        self.slot = Slot::Unset;
        self.owned.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An owned copy of an event, for comparing runs.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Owned {
        event: Vec<u8>,
        data: Vec<u8>,
        start: u64,
        end: u64,
    }

    fn collect_chunks(chunks: &[&[u8]]) -> (Vec<Owned>, SseParser) {
        let mut parser = SseParser::new();
        let mut events = Vec::new();
        for chunk in chunks {
            parser.push(chunk, |e| {
                events.push(Owned {
                    event: e.event.to_vec(),
                    data: e.data.to_vec(),
                    start: e.start_offset,
                    end: e.end_offset,
                })
            });
        }
        (events, parser)
    }

    /// Moves an event end that stopped between a chunk-final `\r` and its `\n` past the `\n`,
    /// so runs with different chunkings compare equal.
    fn settle_ends(stream: &[u8], mut events: Vec<Owned>) -> Vec<Owned> {
        for event in &mut events {
            let end = event.end as usize;
            if stream[end - 1] == b'\r' && stream.get(end) == Some(&b'\n') {
                event.end += 1;
            }
        }
        events
    }

    fn collect(stream: &[u8]) -> Vec<Owned> {
        collect_chunks(&[stream]).0
    }

    fn datas(stream: &[u8]) -> Vec<String> {
        collect(stream)
            .into_iter()
            .map(|e| String::from_utf8(e.data).unwrap())
            .collect()
    }

    fn fixture_paths() -> Vec<std::path::PathBuf> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|p| p.extension().is_some_and(|ext| ext == "sse"))
            .collect();
        paths.sort();
        assert!(paths.len() >= 19, "fixtures missing: {paths:?}");
        paths
    }

    #[test]
    fn all_three_line_endings_and_mixes() {
        let want = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        assert_eq!(datas(b"data: a\n\ndata: b\r\n\r\ndata: c\r\r"), want);
        assert_eq!(datas(b"data: a\r\n\ndata: b\n\r\ndata: c\r\n\r"), want);
    }

    #[test]
    fn field_parsing_rules() {
        // One leading space stripped, not two; split at the first colon only.
        assert_eq!(datas(b"data:  x: y\n\n"), vec![" x: y"]);
        assert_eq!(datas(b"data:no-space\n\n"), vec!["no-space"]);
        // A bare `data` line is a data field with an empty value: dispatched as "".
        assert_eq!(datas(b"data\n\n"), vec![""]);
        assert_eq!(datas(b"data\ndata\n\n"), vec!["\n"]);
        // Unknown fields, id and retry are ignored; field names are case-sensitive.
        assert_eq!(
            datas(b"id: 7\nretry: 10\nfoo: bar\nData: no\ndata: yes\n\n"),
            vec!["yes"]
        );
    }

    #[test]
    fn multi_line_data_joined_by_newline() {
        assert_eq!(datas(b"data: {\"a\":\ndata: 1}\n\n"), vec!["{\"a\":\n1}"]);
        assert_eq!(
            datas(b"data: x\r\ndata: \r\ndata: y\r\n\r\n"),
            vec!["x\n\ny"]
        );
    }

    #[test]
    fn comments_ignored_and_event_without_data_not_dispatched() {
        let stream = b": OPENROUTER PROCESSING\n\nevent: ping\n\n:x\nevent: a\n: mid\ndata: 1\n\n";
        let events = collect(stream);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event, b"a");
        assert_eq!(events[0].data, b"1");
    }

    #[test]
    fn event_type_resets_after_each_dispatch() {
        let events = collect(b"event: one\ndata: 1\n\ndata: 2\n\n");
        assert_eq!(events[0].event, b"one");
        assert_eq!(events[1].event, b"");
    }

    #[test]
    fn leading_bom_ignored_once() {
        assert_eq!(datas(b"\xEF\xBB\xBFdata: a\n\n"), vec!["a"]);
        let (events, _) = collect_chunks(&[b"\xEF", b"\xBB", b"\xBFdata: a\n\n"]);
        assert_eq!(events[0].data, b"a");
        // A second BOM is part of the field name, so the line is an unknown field.
        assert!(collect(b"\xEF\xBB\xBF\xEF\xBB\xBFdata: a\n\n").is_empty());
        // A BOM later in the stream is not special either.
        assert_eq!(datas(b"data: a\n\n\xEF\xBB\xBFdata: b\n\n"), vec!["a"]);
    }

    #[test]
    fn offsets_cover_events_and_skip_comments() {
        let stream = b": hi\n\ndata: a\n\n: keep\ndata: b\r\n\r\n";
        let events = collect(stream);
        assert_eq!((events[0].start, events[0].end), (6, 15));
        assert_eq!(&stream[22..], b"data: b\r\n\r\n");
        assert_eq!((events[1].start, events[1].end), (22, stream.len() as u64));
    }

    #[test]
    fn cr_split_from_lf_is_one_line_end() {
        let (events, parser) = collect_chunks(&[b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n"]);
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[0].end, 10,
            "the blank line was ended by the chunk's final \\r"
        );
        assert_eq!(
            events[1].start, 11,
            "the split \\n belongs to the first event"
        );
        assert!(!parser.has_unterminated());
        // "\r" then "\r" is two line ends: a blank line dispatches.
        let (events, _) = collect_chunks(&[b"data: a\r", b"\r"]);
        assert_eq!(events.len(), 1);
    }

    #[test]
    fn truncated_stream_is_reported() {
        for tail in [
            &b"data: {\"usage\""[..],
            b"data: x\n",
            b"event: a\n",
            b"data: x\r\n\r\nda",
        ] {
            let (events, parser) = collect_chunks(&[b"data: 1\n\n", tail]);
            assert_eq!(events[0].data, b"1");
            assert!(parser.has_unterminated(), "{tail:?}");
        }
        for complete in [&b"data: x\n\n"[..], b": ping\n", b"data: x\r\n\r", b"\n"] {
            let (_, parser) = collect_chunks(&[complete]);
            assert!(!parser.has_unterminated(), "{complete:?}");
        }
    }

    #[test]
    fn utf8_split_anywhere_is_reassembled() {
        let stream = "event: é\ndata: ⇒ − 😄\n\n".as_bytes();
        for cut in 0..stream.len() {
            let (events, _) = collect_chunks(&[&stream[..cut], &stream[cut..]]);
            assert_eq!(events[0].event, "é".as_bytes());
            assert_eq!(events[0].data, "⇒ − 😄".as_bytes());
        }
    }

    #[test]
    fn gemini_crlf_fixture_yields_three_json_events() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/gemini-stream-crlf.sse"
        );
        let events = collect(&std::fs::read(path).unwrap());
        assert_eq!(events.len(), 3);
        for event in events {
            assert!(event.data.starts_with(b"{\"candidates\""));
            assert!(!event.data.contains(&b'\r'));
            serde_json::from_slice::<serde_json::Value>(&event.data).unwrap();
        }
    }

    #[test]
    fn every_fixture_parses_identically_under_any_chunking() {
        for path in fixture_paths() {
            let stream = std::fs::read(&path).unwrap();
            let whole = collect(&stream);
            assert!(!whole.is_empty(), "{path:?}");
            for event in &whole {
                let json = serde_json::from_slice::<serde_json::Value>(&event.data);
                assert!(json.is_ok() || event.data == b"[DONE]", "{path:?}");
            }
            for cut in 0..=stream.len() {
                let (split, parser) = collect_chunks(&[&stream[..cut], &stream[cut..]]);
                assert_eq!(settle_ends(&stream, split), whole, "{path:?} cut at {cut}");
                assert!(!parser.has_unterminated());
            }
            let bytes: Vec<&[u8]> = stream.chunks(1).collect();
            let split = collect_chunks(&bytes).0;
            assert_eq!(settle_ends(&stream, split), whole, "{path:?} 1-byte chunks");
            let step = stream.len() / 29 + 1;
            for a in (0..stream.len()).step_by(step) {
                for b in (a..=stream.len()).step_by(step + 3) {
                    let parts = [&stream[..a], &stream[a..b], &stream[b..]];
                    let split = collect_chunks(&parts).0;
                    assert_eq!(settle_ends(&stream, split), whole, "{path:?} cuts {a},{b}");
                }
            }
        }
    }

    #[test]
    fn crlf_and_cr_variants_of_fixtures_parse_the_same() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/openai-chat-stream-tool-calls.sse"
        );
        let lf = std::fs::read(path).unwrap();
        let data_of =
            |events: Vec<Owned>| -> Vec<Vec<u8>> { events.into_iter().map(|e| e.data).collect() };
        let want = data_of(collect(&lf));
        for ending in [&b"\r\n"[..], b"\r"] {
            let converted: Vec<u8> = lf
                .iter()
                .flat_map(|&b| if b == b'\n' { ending.to_vec() } else { vec![b] })
                .collect();
            for cut in 0..=converted.len() {
                let (events, _) = collect_chunks(&[&converted[..cut], &converted[cut..]]);
                assert_eq!(data_of(events), want, "cut at {cut}");
            }
        }
    }
}
