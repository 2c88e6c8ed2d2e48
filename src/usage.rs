//! Token usage as providers report it, normalised to one shape.
//!
//! OpenAI counts cached tokens *inside* `prompt_tokens`; Anthropic counts cache reads and
//! writes *beside* `input_tokens`. `Usage` stores disjoint buckets so pricing never has to
//! know which convention a number came from.
//!
//! [`from_json_body`] reads a non-streaming response; [`StreamMeter`] taps a streamed one.

use std::ops::Range;
use std::sync::OnceLock;

use memchr::memmem::Finder;
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::api::{Endpoint, ProviderKind};
use crate::sse::{SseEvent, SseParser};

/// Disjoint token buckets: every input token is in exactly one of the input-side fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Input tokens billed at the base input price (no cache involved).
    pub input_tokens: u64,
    /// Input tokens served from the provider's prompt cache
    /// (OpenAI `cached_tokens`, Anthropic `cache_read_input_tokens`).
    pub cache_read_tokens: u64,
    /// Input tokens written to a cache at the default (short) TTL
    /// (Anthropic 5-minute writes, OpenAI Responses `cache_write_tokens`).
    pub cache_write_tokens: u64,
    /// Input tokens written to Anthropic's 1-hour cache.
    pub cache_write_1h_tokens: u64,
    /// All output tokens, reasoning included.
    pub output_tokens: u64,
    /// The part of `output_tokens` spent on hidden reasoning (informational).
    pub reasoning_tokens: u64,
}

impl Usage {
    /// Total prompt size: the `tokens_in` figure reported to clients.
    pub fn total_input(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.cache_read_tokens)
            .saturating_add(self.cache_write_tokens)
            .saturating_add(self.cache_write_1h_tokens)
    }
}

// ---------------------------------------------------------------------------------------------
// Reading usage from provider JSON
// ---------------------------------------------------------------------------------------------

/// Usage of a non-streaming response body, or None if the body carries none (errors,
/// count_tokens, unparseable JSON).
pub fn from_json_body(endpoint: Endpoint, body: &[u8]) -> Option<Usage> {
    from_json_body_with_model(endpoint, body).0
}

/// A non-streaming body's usage and the model that served it, in one parse.
pub fn from_json_body_with_model(
    endpoint: Endpoint,
    body: &[u8],
) -> (Option<Usage>, Option<String>) {
    let Ok(envelope) = serde_json::from_slice::<UsageEnvelope>(body) else {
        return (None, None);
    };
    let usage = UsageFormat::of(endpoint)
        .and_then(|format| envelope.usage.and_then(|raw| format.normalize(&raw)));
    (usage, envelope.model)
}

/// A string member, or None for anything else (a provider's odd shape never fails the parse).
fn string_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    })
}

/// Which convention a usage object follows; fixed by the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UsageFormat {
    /// `prompt_tokens` includes `prompt_tokens_details.cached_tokens` (chat, completions, embeddings).
    OpenAiChat,
    /// `input_tokens` includes `input_tokens_details.cached_tokens` and `cache_write_tokens`.
    OpenAiResponses,
    /// `input_tokens` excludes the cache counters, which sit beside it.
    Anthropic,
}

impl UsageFormat {
    fn of(endpoint: Endpoint) -> Option<Self> {
        if !endpoint.is_priced() {
            return None;
        }
        Some(match (endpoint.kind(), endpoint) {
            (ProviderKind::Anthropic, _) => UsageFormat::Anthropic,
            (ProviderKind::OpenAi, Endpoint::Responses) => UsageFormat::OpenAiResponses,
            (ProviderKind::OpenAi, _) => UsageFormat::OpenAiChat,
        })
    }

    /// None when the object holds no token counter at all (e.g. `"usage": {}`).
    fn normalize(self, raw: &RawUsage) -> Option<Usage> {
        if !raw.has_any_count() {
            return None;
        }
        Some(match self {
            UsageFormat::OpenAiChat => raw.openai_chat(),
            UsageFormat::OpenAiResponses => raw.openai_responses(),
            UsageFormat::Anthropic => raw.anthropic(),
        })
    }
}

/// Every counter any supported format may send, as sent. Absent and `null` are both None so
/// that Anthropic's "last value per field wins" merge can tell "not repeated" from "zero".
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
struct RawUsage {
    #[serde(deserialize_with = "lenient_count")]
    prompt_tokens: Option<u64>,
    #[serde(deserialize_with = "lenient_count")]
    completion_tokens: Option<u64>,
    #[serde(deserialize_with = "object_or_default")]
    prompt_tokens_details: RawInputDetails,
    #[serde(deserialize_with = "object_or_default")]
    completion_tokens_details: RawOutputDetails,
    /// DeepSeek's own name for cached prompt tokens; used when `cached_tokens` is absent.
    #[serde(deserialize_with = "lenient_count")]
    prompt_cache_hit_tokens: Option<u64>,
    #[serde(deserialize_with = "lenient_count")]
    input_tokens: Option<u64>,
    #[serde(deserialize_with = "lenient_count")]
    output_tokens: Option<u64>,
    #[serde(deserialize_with = "object_or_default")]
    input_tokens_details: RawInputDetails,
    #[serde(deserialize_with = "object_or_default")]
    output_tokens_details: RawOutputDetails,
    #[serde(deserialize_with = "lenient_count")]
    cache_read_input_tokens: Option<u64>,
    #[serde(deserialize_with = "lenient_count")]
    cache_creation_input_tokens: Option<u64>,
    #[serde(deserialize_with = "object_or_default")]
    cache_creation: RawCacheCreation,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
struct RawInputDetails {
    #[serde(deserialize_with = "lenient_count")]
    cached_tokens: Option<u64>,
    #[serde(deserialize_with = "lenient_count")]
    cache_write_tokens: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
struct RawOutputDetails {
    #[serde(deserialize_with = "lenient_count")]
    reasoning_tokens: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
struct RawCacheCreation {
    #[serde(deserialize_with = "lenient_count")]
    ephemeral_5m_input_tokens: Option<u64>,
    #[serde(deserialize_with = "lenient_count")]
    ephemeral_1h_input_tokens: Option<u64>,
}

impl RawUsage {
    fn has_any_count(&self) -> bool {
        [
            self.prompt_tokens,
            self.completion_tokens,
            self.input_tokens,
            self.output_tokens,
            self.cache_read_input_tokens,
            self.cache_creation_input_tokens,
        ]
        .iter()
        .any(Option::is_some)
    }

    /// The reported prompt total is authoritative: cached tokens are clamped into it, so the
    /// disjoint buckets always add up to exactly `prompt_tokens`.
    fn openai_chat(&self) -> Usage {
        let prompt = self.prompt_tokens.unwrap_or(0);
        let details = self.prompt_tokens_details;
        let cached = details
            .cached_tokens
            .or(self.prompt_cache_hit_tokens)
            .unwrap_or(0)
            .min(prompt);
        Usage {
            input_tokens: prompt - cached,
            cache_read_tokens: cached,
            output_tokens: self.completion_tokens.unwrap_or(0),
            reasoning_tokens: self.completion_tokens_details.reasoning_tokens.unwrap_or(0),
            ..Usage::default()
        }
    }

    /// Same clamping as chat: cached and cache-write tokens are both subsets of `input_tokens`.
    fn openai_responses(&self) -> Usage {
        let total = self.input_tokens.unwrap_or(0);
        let details = self.input_tokens_details;
        let cached = details.cached_tokens.unwrap_or(0).min(total);
        let written = details.cache_write_tokens.unwrap_or(0).min(total - cached);
        Usage {
            input_tokens: total - cached - written,
            cache_read_tokens: cached,
            cache_write_tokens: written,
            output_tokens: self.output_tokens.unwrap_or(0),
            reasoning_tokens: self.output_tokens_details.reasoning_tokens.unwrap_or(0),
            ..Usage::default()
        }
    }

    /// `cache_creation_input_tokens` is the authoritative write total; the optional TTL split
    /// only decides how much of it was a 1-hour write. Without a split everything is 5-minute.
    fn anthropic(&self) -> Usage {
        let split = self.cache_creation;
        let one_hour = split.ephemeral_1h_input_tokens.unwrap_or(0);
        let split_total = split
            .ephemeral_5m_input_tokens
            .unwrap_or(0)
            .saturating_add(one_hour);
        let writes = self.cache_creation_input_tokens.unwrap_or(split_total);
        let one_hour = one_hour.min(writes);
        Usage {
            input_tokens: self.input_tokens.unwrap_or(0),
            cache_read_tokens: self.cache_read_input_tokens.unwrap_or(0),
            cache_write_tokens: writes - one_hour,
            cache_write_1h_tokens: one_hour,
            output_tokens: self.output_tokens.unwrap_or(0),
            reasoning_tokens: 0, // Anthropic folds thinking into output_tokens without a breakdown
        }
    }

    /// Anthropic streaming: every field `newer` carries replaces ours; absent fields keep ours.
    fn overlay(&mut self, newer: &RawUsage) {
        let fields = [
            (&mut self.input_tokens, newer.input_tokens),
            (&mut self.output_tokens, newer.output_tokens),
            (
                &mut self.cache_read_input_tokens,
                newer.cache_read_input_tokens,
            ),
            (
                &mut self.cache_creation_input_tokens,
                newer.cache_creation_input_tokens,
            ),
            (
                &mut self.cache_creation.ephemeral_5m_input_tokens,
                newer.cache_creation.ephemeral_5m_input_tokens,
            ),
            (
                &mut self.cache_creation.ephemeral_1h_input_tokens,
                newer.cache_creation.ephemeral_1h_input_tokens,
            ),
        ];
        for (ours, theirs) in fields {
            if theirs.is_some() {
                *ours = theirs;
            }
        }
    }
}

/// Any JSON object with a `usage` member: a non-streaming body, a chat chunk, `message_delta`.
#[derive(Deserialize)]
struct UsageEnvelope {
    #[serde(default, deserialize_with = "object_or_none")]
    usage: Option<RawUsage>,
    /// The model that served a non-streaming body (read in the same pass as its usage).
    #[serde(default, deserialize_with = "string_or_none")]
    model: Option<String>,
}

/// Anthropic `message_start`: usage sits in the embedded message.
#[derive(Deserialize)]
struct MessageStart {
    message: UsageEnvelope,
}

/// Responses terminal events: usage sits in the embedded response.
#[derive(Deserialize)]
struct ResponseEvent {
    response: UsageEnvelope,
}

/// The parts of a chat chunk that decide metering and stripping.
#[derive(Deserialize)]
struct ChatChunk {
    #[serde(default, deserialize_with = "object_or_none")]
    usage: Option<RawUsage>,
    #[serde(default, deserialize_with = "array_len")]
    choices: Option<usize>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

// Lenient field readers: upstreams send floats, strings or junk where numbers belong, and one
// odd field must not cost the whole usage object.

/// A token counter from any JSON value: numbers (rounded, negatives as 0), numeric strings;
/// `null` and anything else count as absent.
fn lenient_count<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    deserializer.deserialize_any(CountVisitor)
}

/// `T` from a JSON object; `T::default()` from any other value.
fn object_or_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(object_or_none(deserializer)?.unwrap_or_default())
}

/// `Some(T)` from a JSON object; None from any other value, `null` included.
fn object_or_none<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    deserializer.deserialize_any(ObjectVisitor(std::marker::PhantomData))
}

/// The length of a JSON array; None for any other value.
fn array_len<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<usize>, D::Error> {
    deserializer.deserialize_any(ArrayLenVisitor)
}

/// Implements the visitor methods for JSON scalars by mapping each to `$value`.
macro_rules! scalars_yield {
    ($value:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

struct CountVisitor;

impl<'de> Visitor<'de> for CountVisitor {
    type Value = Option<u64>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a token count")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Some(v.max(0).unsigned_abs()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Some(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        // `as` saturates and maps NaN to 0, which is what a counter needs.
        Ok(Some(v.round().max(0.0) as u64))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.trim().parse().ok())
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        skip_seq(seq).map(|_| None)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        skip_map(map).map(|_| None)
    }
}

struct ObjectVisitor<T>(std::marker::PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object")
    }
    scalars_yield!(None);
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        skip_seq(seq).map(|_| None)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Some)
    }
}

struct ArrayLenVisitor;

impl<'de> Visitor<'de> for ArrayLenVisitor {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array")
    }
    scalars_yield!(None);
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        skip_seq(seq).map(Some)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        skip_map(map).map(|_| None)
    }
}

/// Consumes an array, returning its length.
fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<usize, A::Error> {
    let mut len = 0;
    while seq.next_element::<IgnoredAny>()?.is_some() {
        len += 1;
    }
    Ok(len)
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Streaming: the usage tap
// ---------------------------------------------------------------------------------------------

/// What to send downstream for one pushed chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward<'a> {
    /// Send the chunk exactly as it was pushed.
    AsIs,
    /// Send these bytes instead (possibly none): held-back bytes of earlier chunks plus the
    /// complete events of this one, minus a stripped usage chunk.
    Replace(&'a [u8]),
}

/// Meters one streamed response: watches the SSE events for usage, completion and errors and,
/// when asked, removes the usage-only chunk the gateway caused by adding
/// `stream_options.include_usage` to a chat request whose client did not ask for it.
///
/// Usage is taken per format: OpenAI chat/completions — the last non-null top-level `usage`
/// object (wherever it comes, so DeepSeek/Groq/llama.cpp finish chunks count; Groq's duplicate
/// `x_groq.usage` is ignored); Responses — `response.usage` of `response.completed`,
/// `.incomplete` or `.failed`; Anthropic — `message_start.message.usage` overlaid field by
/// field with `message_delta.usage` (last value wins, never summed).
///
/// For streams whose usage never arrives, [`StreamMeter::output_estimate`] approximates the
/// output tokens from what was forwarded.
#[derive(Debug)]
pub struct StreamMeter {
    parser: SseParser,
    tally: Tally,
    /// Present only when the injected usage chunk must be removed.
    stripper: Option<Stripper>,
}

impl StreamMeter {
    pub fn new(endpoint: Endpoint, strip_injected_usage: bool) -> Self {
        StreamMeter {
            parser: SseParser::new(),
            tally: Tally::new(UsageFormat::of(endpoint)),
            stripper: strip_injected_usage.then(Stripper::default),
        }
    }

    /// Observes the next chunk of the upstream body and says what to forward for it.
    ///
    /// Without stripping this is always [`Forward::AsIs`]. With stripping, bytes of an
    /// incomplete trailing event are held back until the event completes (or [`Self::finish`]),
    /// because only a complete event can be recognised as the one to drop.
    pub fn push(&mut self, chunk: &[u8]) -> Forward<'_> {
        let tally = &mut self.tally;
        let Some(stripper) = &mut self.stripper else {
            self.parser.push(chunk, |event| {
                tally.observe(event);
            });
            return Forward::AsIs;
        };
        let chunk_start = self.parser.offset();
        stripper.begin_chunk(chunk, chunk_start);
        self.parser.push(chunk, |event| {
            if tally.observe(event) == EventRole::InjectedUsage {
                stripper.drop_event(&event, chunk, chunk_start);
            }
        });
        stripper.release(chunk, chunk_start, self.parser.idle_offset())
    }

    /// End of the upstream body: returns the bytes still held back (empty unless stripping),
    /// which are forwarded unchanged. See [`Self::truncated`] for whether that tail was a
    /// partial event.
    pub fn finish(&mut self) -> Vec<u8> {
        self.stripper
            .as_mut()
            .map(Stripper::take_held)
            .unwrap_or_default()
    }

    /// What the provider reported so far, normalised; None if it reported nothing. For
    /// Anthropic before `message_delta` the output count is provisional, see
    /// [`Self::usage_complete`].
    pub fn usage(&self) -> Option<Usage> {
        self.tally.usage()
    }

    /// Whether the final numbers arrived: OpenAI chat — a usage object; Responses — a terminal
    /// event with usage; Anthropic — `message_delta` with usage.
    pub fn usage_complete(&self) -> bool {
        self.tally.usage_complete
    }

    /// Approximate output tokens forwarded so far, for when usage is missing or incomplete:
    /// the larger of the number of delta events (OpenAI-style servers stream about one token
    /// per chunk) and the delta text bytes / 4 (Anthropic batches several tokens per delta).
    /// Chat counts every JSON chunk except usage-only and error chunks, so it runs about two
    /// per choice high (role and finish chunks); Responses counts `*.delta` events and their
    /// `delta` text; Anthropic counts `content_block_delta` events and their
    /// `text`/`partial_json`/`thinking` text. Hidden reasoning is not visible to it.
    pub fn output_estimate(&self) -> u64 {
        self.tally.output_estimate()
    }

    /// Whether the stream's normal end marker arrived: `[DONE]`, `message_stop`,
    /// `response.completed` / `.incomplete` / `.failed`.
    pub fn saw_terminal(&self) -> bool {
        self.tally.saw_terminal
    }

    /// Whether the upstream reported an error inside the stream: Anthropic or Responses
    /// `error` events, `response.failed`, or a chat chunk with a top-level non-null `error`.
    pub fn saw_error(&self) -> bool {
        self.tally.saw_error
    }

    /// Whether the bytes pushed so far end inside an event (at end of stream: truncated).
    /// Such a trailing event is never metered, because the SSE rules discard it.
    pub fn truncated(&self) -> bool {
        self.parser.has_unterminated()
    }
}

/// How the meter classified one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventRole {
    Ordinary,
    /// A chat chunk with a usage object and `choices: []` — the chunk `include_usage` adds.
    InjectedUsage,
}

/// Everything learned from the events so far.
#[derive(Debug)]
struct Tally {
    /// None for endpoints that are never metered (count_tokens).
    format: Option<UsageFormat>,
    raw: Option<RawUsage>,
    usage_complete: bool,
    saw_terminal: bool,
    saw_error: bool,
    delta_events: u64,
    delta_text_bytes: u64,
}

impl Tally {
    fn new(format: Option<UsageFormat>) -> Self {
        Tally {
            format,
            raw: None,
            usage_complete: false,
            saw_terminal: false,
            saw_error: false,
            delta_events: 0,
            delta_text_bytes: 0,
        }
    }

    fn usage(&self) -> Option<Usage> {
        self.format?.normalize(self.raw.as_ref()?)
    }

    fn output_estimate(&self) -> u64 {
        self.delta_events.max(self.delta_text_bytes.div_ceil(4))
    }

    fn observe(&mut self, event: SseEvent<'_>) -> EventRole {
        match self.format {
            Some(UsageFormat::OpenAiChat) => return self.observe_chat(event.data),
            Some(UsageFormat::OpenAiResponses) => self.observe_responses(event),
            Some(UsageFormat::Anthropic) => self.observe_anthropic(event),
            None => {}
        }
        EventRole::Ordinary
    }

    fn observe_chat(&mut self, data: &[u8]) -> EventRole {
        let payload = data.trim_ascii();
        if payload == b"[DONE]" {
            self.saw_terminal = true;
            return EventRole::Ordinary;
        }
        // Parsing every chunk would cap throughput; only chunks that can matter are parsed.
        let (may_have_usage, may_have_error) = usage_or_error_keys(payload);
        if !may_have_usage && !may_have_error {
            self.delta_events += 1;
            return EventRole::Ordinary;
        }
        let Ok(chunk) = serde_json::from_slice::<ChatChunk>(payload) else {
            return EventRole::Ordinary;
        };
        self.saw_error |= chunk.error.is_some();
        let usage_only = chunk.usage.is_some() && chunk.choices == Some(0);
        if let Some(raw) = chunk.usage {
            self.replace_usage(raw);
        }
        if usage_only {
            return EventRole::InjectedUsage;
        }
        if chunk.error.is_none() {
            self.delta_events += 1;
        }
        EventRole::Ordinary
    }

    fn observe_responses(&mut self, event: SseEvent<'_>) {
        let kind = event_type(event);
        match kind {
            b"response.completed" | b"response.incomplete" | b"response.failed" => {
                self.saw_terminal = true;
                self.saw_error |= kind == b"response.failed";
                let usage = serde_json::from_slice::<ResponseEvent>(event.data).ok();
                if let Some(raw) = usage.and_then(|e| e.response.usage) {
                    self.replace_usage(raw);
                }
            }
            b"error" => self.saw_error = true,
            _ if kind.ends_with(b".delta") => {
                self.count_delta(event.data, &[&keys().delta]);
            }
            _ => {}
        }
    }

    fn observe_anthropic(&mut self, event: SseEvent<'_>) {
        match event_type(event) {
            b"message_start" => {
                let start = serde_json::from_slice::<MessageStart>(event.data).ok();
                if let Some(raw) = start.and_then(|s| s.message.usage) {
                    self.overlay(&raw);
                }
            }
            b"message_delta" => {
                let delta = serde_json::from_slice::<UsageEnvelope>(event.data).ok();
                if let Some(raw) = delta.and_then(|d| d.usage) {
                    self.overlay(&raw);
                    self.usage_complete = true;
                }
            }
            b"content_block_delta" => {
                let keys = keys();
                self.count_delta(
                    event.data,
                    &[&keys.text, &keys.partial_json, &keys.thinking],
                );
            }
            b"message_stop" => self.saw_terminal = true,
            b"error" => self.saw_error = true,
            _ => {}
        }
    }

    /// OpenAI formats: a later usage object supersedes an earlier one as a whole. One without
    /// any counter (`"usage": {}`) tells nothing, so it must not erase real numbers.
    fn replace_usage(&mut self, raw: RawUsage) {
        if raw.has_any_count() {
            self.raw = Some(raw);
            self.usage_complete = true;
        }
    }

    fn overlay(&mut self, newer: &RawUsage) {
        self.raw
            .get_or_insert_with(RawUsage::default)
            .overlay(newer);
    }

    /// `text_keys`: where the delta's text may be, most frequent first; a delta has one of them.
    fn count_delta(&mut self, data: &[u8], text_keys: &[&Finder<'static>]) {
        self.delta_events += 1;
        let len = text_keys
            .iter()
            .find_map(|key| string_value_len(data, key))
            .unwrap_or(0);
        self.delta_text_bytes = self.delta_text_bytes.saturating_add(len as u64);
    }
}

/// The event's type: the `event:` field, which Anthropic and the Responses API always send and
/// which equals `data.type`; servers that omit it get the first `"type"` string in the data.
fn event_type<'a>(event: SseEvent<'a>) -> &'a [u8] {
    if !event.event.is_empty() {
        return event.event;
    }
    string_value(event.data, &keys().type_).unwrap_or(b"")
}

/// Pre-built searchers for the JSON keys the meter looks for without parsing.
struct Keys {
    type_: Finder<'static>,
    delta: Finder<'static>,
    text: Finder<'static>,
    partial_json: Finder<'static>,
    thinking: Finder<'static>,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        type_: Finder::new(b"\"type\""),
        delta: Finder::new(b"\"delta\""),
        text: Finder::new(b"\"text\""),
        partial_json: Finder::new(b"\"partial_json\""),
        thinking: Finder::new(b"\"thinking\""),
    })
}

// Key scanning without a JSON parser. A quoted key can only be matched where it really is a
// key or a string value: inside another string its quotes would be escaped. A match followed
// by `:` is a key. Whitespace around the colon varies between serializers, so it is skipped.

/// The position of the value of each occurrence of `key` (a quoted key) in `json`.
fn key_values<'a>(json: &'a [u8], key: &'a Finder<'static>) -> impl Iterator<Item = usize> + 'a {
    key.find_iter(json)
        .filter_map(move |at| value_position(json, at + key.needle().len()))
}

/// A chat chunk's cheap pre-check before parsing: whether some `"usage"` key has an object
/// value and whether some `"error"` key has a value other than `null` (a false positive only
/// costs a parse). Both keys are five letters long, so one pass over the quoted five-letter
/// words finds both; this runs on every streamed chunk.
fn usage_or_error_keys(json: &[u8]) -> (bool, bool) {
    usage_or_error_keys_using(quote_pair_finder(), json)
}

/// [`usage_or_error_keys`] with a given vector search, or the byte loop alone (`None`), so
/// tests can hold every variant this CPU has to the same definition.
fn usage_or_error_keys_using(finder: Option<&QuotePairFinder>, json: &[u8]) -> (bool, bool) {
    let (mut usage, mut error) = (false, false);
    for_each_quoted_five_letter_word(finder, json, |at| {
        let word = &json[at..at + 7];
        let value = || json.get(value_position(json, at + 7)?).copied();
        if word == b"\"usage\"" {
            usage |= value() == Some(b'{');
        } else if word == b"\"error\"" {
            error |= value().is_some_and(|b| b != b'n');
        }
    });
    (usage, error)
}

/// Calls `on_word` with the position of every `"` that has another `"` six bytes on.
fn for_each_quoted_five_letter_word(
    finder: Option<&QuotePairFinder>,
    json: &[u8],
    mut on_word: impl FnMut(usize),
) {
    let mut pos = 0;
    if let Some(finder) = finder {
        while json.len() - pos >= finder.min_haystack_len() {
            let Some(found) = finder.find_prefilter(&json[pos..]) else {
                return;
            };
            on_word(pos + found);
            pos += found + 1;
        }
    }
    // The tail too short for a vector, or all of it without one.
    for at in pos..json.len().saturating_sub(6) {
        if json[at] == b'"' && json[at + 6] == b'"' {
            on_word(at);
        }
    }
}

/// The vector search for a `"` with another `"` six bytes on, made once for this CPU:
/// memchr's packed-pair search, the prefilter its `memmem` uses. `None` where there is
/// none (CPUs other than x86-64 and AArch64), and the byte loop does it all.
fn quote_pair_finder() -> Option<&'static QuotePairFinder> {
    static FINDER: OnceLock<Option<QuotePairFinder>> = OnceLock::new();
    FINDER.get_or_init(QuotePairFinder::best).as_ref()
}

/// The two quotes of a quoted five-letter word, as memchr's pair of needle offsets.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn quote_pair() -> Option<(&'static [u8], memchr::arch::all::packedpair::Pair)> {
    let needle = b"\"usage\"";
    Some((
        needle,
        memchr::arch::all::packedpair::Pair::with_indices(needle, 0, 6)?,
    ))
}

/// x86-64: AVX2 where the CPU has it, else SSE2 (every x86-64 CPU has SSE2).
#[cfg(target_arch = "x86_64")]
enum QuotePairFinder {
    Avx2(memchr::arch::x86_64::avx2::packedpair::Finder),
    Sse2(memchr::arch::x86_64::sse2::packedpair::Finder),
}

#[cfg(target_arch = "x86_64")]
impl QuotePairFinder {
    fn best() -> Option<Self> {
        Self::avx2().or_else(Self::sse2)
    }

    fn avx2() -> Option<Self> {
        let (needle, pair) = quote_pair()?;
        memchr::arch::x86_64::avx2::packedpair::Finder::with_pair(needle, pair).map(Self::Avx2)
    }

    fn sse2() -> Option<Self> {
        let (needle, pair) = quote_pair()?;
        memchr::arch::x86_64::sse2::packedpair::Finder::with_pair(needle, pair).map(Self::Sse2)
    }

    fn min_haystack_len(&self) -> usize {
        match self {
            Self::Avx2(f) => f.min_haystack_len(),
            Self::Sse2(f) => f.min_haystack_len(),
        }
    }

    fn find_prefilter(&self, haystack: &[u8]) -> Option<usize> {
        match self {
            Self::Avx2(f) => f.find_prefilter(haystack),
            Self::Sse2(f) => f.find_prefilter(haystack),
        }
    }
}

/// AArch64: NEON, which every AArch64 CPU has.
#[cfg(target_arch = "aarch64")]
struct QuotePairFinder(memchr::arch::aarch64::neon::packedpair::Finder);

#[cfg(target_arch = "aarch64")]
impl QuotePairFinder {
    fn best() -> Option<Self> {
        let (needle, pair) = quote_pair()?;
        memchr::arch::aarch64::neon::packedpair::Finder::with_pair(needle, pair).map(Self)
    }

    fn min_haystack_len(&self) -> usize {
        self.0.min_haystack_len()
    }

    fn find_prefilter(&self, haystack: &[u8]) -> Option<usize> {
        self.0.find_prefilter(haystack)
    }
}

/// Other CPUs: no vector search; the byte loop does it all.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
enum QuotePairFinder {}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
impl QuotePairFinder {
    fn best() -> Option<Self> {
        None
    }
    fn min_haystack_len(&self) -> usize {
        match *self {}
    }
    fn find_prefilter(&self, _: &[u8]) -> Option<usize> {
        match *self {}
    }
}

/// Where the value of a key whose closing quote ends just before `after_key` starts, if that
/// quoted word is a key (followed by `:`).
fn value_position(json: &[u8], after_key: usize) -> Option<usize> {
    let colon = skip_whitespace(json, after_key);
    (json.get(colon) == Some(&b':')).then(|| skip_whitespace(json, colon + 1))
}

/// The raw (still escaped) bytes of the first string value of `key`.
fn string_value<'a>(json: &'a [u8], key: &Finder<'static>) -> Option<&'a [u8]> {
    key_values(json, key).find_map(|at| string_at(json, at))
}

fn string_value_len(json: &[u8], key: &Finder<'static>) -> Option<usize> {
    string_value(json, key).map(<[u8]>::len)
}

/// The escaped contents of the JSON string starting at `at`, if one starts and ends there.
fn string_at(json: &[u8], at: usize) -> Option<&[u8]> {
    if json.get(at) != Some(&b'"') {
        return None;
    }
    let start = at + 1;
    let mut pos = start;
    loop {
        pos += memchr::memchr2(b'"', b'\\', json.get(pos..)?)?;
        if json[pos] == b'"' {
            return Some(&json[start..pos]);
        }
        pos += 2; // skip the escaped character
    }
}

fn skip_whitespace(json: &[u8], mut at: usize) -> usize {
    while json.get(at).is_some_and(|b| b.is_ascii_whitespace()) {
        at += 1;
    }
    at
}

/// Holds back incomplete events and cuts the injected usage chunk out of the forwarded bytes.
#[derive(Debug, Default)]
struct Stripper {
    /// Received but not yet forwarded bytes, starting at stream offset `held_start`.
    held: Vec<u8>,
    held_start: u64,
    /// Stream ranges to leave out of the next release.
    drops: Vec<Range<u64>>,
    /// A dropped event ended in a `\r` that ended its chunk: a `\n` here is part of that event.
    lone_lf_to_drop: Option<u64>,
    /// Reused output buffer for [`Forward::Replace`].
    out: Vec<u8>,
}

impl Stripper {
    fn begin_chunk(&mut self, chunk: &[u8], chunk_start: u64) {
        if chunk.is_empty() {
            return; // an empty chunk must not consume the pending `\n` check
        }
        if self.lone_lf_to_drop.take() == Some(chunk_start) && chunk[0] == b'\n' {
            self.drops.push(chunk_start..chunk_start + 1);
        }
    }

    fn drop_event(&mut self, event: &SseEvent<'_>, chunk: &[u8], chunk_start: u64) {
        self.drops.push(event.start_offset..event.end_offset);
        let chunk_end = chunk_start + chunk.len() as u64;
        if event.end_offset == chunk_end && chunk.last() == Some(&b'\r') {
            self.lone_lf_to_drop = Some(chunk_end);
        }
    }

    /// Forwards every byte before `boundary` (where the parser is between events) except the
    /// dropped ranges, and holds the rest.
    fn release(&mut self, chunk: &[u8], chunk_start: u64, boundary: u64) -> Forward<'_> {
        let chunk_end = chunk_start + chunk.len() as u64;
        if self.held.is_empty() && self.drops.is_empty() && boundary == chunk_end {
            self.held_start = chunk_end;
            return Forward::AsIs;
        }
        self.held.extend_from_slice(chunk);
        self.out.clear();
        let index = |offset: u64| (offset - self.held_start) as usize;
        let mut cursor = self.held_start;
        for dropped in self.drops.drain(..) {
            self.out
                .extend_from_slice(&self.held[index(cursor)..index(dropped.start)]);
            cursor = dropped.end;
        }
        self.out
            .extend_from_slice(&self.held[index(cursor)..index(boundary)]);
        self.held.drain(..index(boundary));
        self.held_start = boundary;
        Forward::Replace(&self.out)
    }

    fn take_held(&mut self) -> Vec<u8> {
        self.held_start += self.held.len() as u64;
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");
        std::fs::read(format!("{dir}{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn fixture_names(extension: &str) -> Vec<String> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.ends_with(extension))
            .collect();
        names.sort();
        names
    }

    /// The endpoint a recorded stream was served on, from its file name.
    fn endpoint_of(name: &str) -> Endpoint {
        if name.starts_with("anthropic-") {
            Endpoint::Messages
        } else if name.starts_with("openai-responses-") {
            Endpoint::Responses
        } else if name.starts_with("openai-completions-") {
            Endpoint::Completions
        } else if name.starts_with("openai-embeddings") {
            Endpoint::Embeddings
        } else {
            Endpoint::ChatCompletions
        }
    }

    fn usage(input: u64, cache_read: u64, output: u64, reasoning: u64) -> Usage {
        Usage {
            input_tokens: input,
            cache_read_tokens: cache_read,
            output_tokens: output,
            reasoning_tokens: reasoning,
            ..Usage::default()
        }
    }

    // ----- non-streaming bodies -----

    #[test]
    fn non_streaming_fixture_usage() {
        let cases = [
            // prompt 1220 of which cached 1152
            (
                "openai-chat-nonstream.json",
                Endpoint::ChatCompletions,
                Some(usage(68, 1152, 100, 0)),
            ),
            (
                "openai-chat-nonstream-reasoning.json",
                Endpoint::ChatCompletions,
                Some(usage(11, 0, 228, 192)),
            ),
            (
                "openai-completions-legacy.json",
                Endpoint::Completions,
                Some(usage(8, 0, 16, 0)),
            ),
            (
                "openai-embeddings.json",
                Endpoint::Embeddings,
                Some(usage(8, 0, 0, 0)),
            ),
            // input 1515 of which cached 1390
            (
                "openai-responses-nonstream.json",
                Endpoint::Responses,
                Some(usage(125, 1390, 8, 0)),
            ),
            (
                "openai-responses-nonstream-reasoning.json",
                Endpoint::Responses,
                Some(usage(94, 0, 85, 63)),
            ),
            (
                "openai-responses-nonstream-cache-write.json",
                Endpoint::Responses,
                Some(Usage {
                    cache_write_tokens: 1217,
                    ..usage(3, 0, 100, 54)
                }),
            ),
            (
                "anthropic-messages-nonstream.json",
                Endpoint::Messages,
                Some(usage(11, 2055, 100, 0)),
            ),
            (
                "anthropic-messages-nonstream-cache-write-1h.json",
                Endpoint::Messages,
                Some(Usage {
                    cache_write_tokens: 14,
                    cache_write_1h_tokens: 2056,
                    ..usage(3, 0, 459, 0)
                }),
            ),
            (
                "anthropic-messages-nonstream.json",
                Endpoint::CountTokens,
                None,
            ),
        ];
        for (name, endpoint, want) in cases {
            assert_eq!(from_json_body(endpoint, &fixture(name)), want, "{name}");
        }
        let total = from_json_body(
            Endpoint::Messages,
            &fixture("anthropic-messages-nonstream-cache-write-1h.json"),
        );
        assert_eq!(total.map(|u| u.total_input()), Some(3 + 2070));
    }

    #[test]
    fn error_bodies_have_no_usage() {
        for name in fixture_names(".json")
            .iter()
            .filter(|n| n.contains("-error-") && !n.ends_with(".request.json"))
        {
            for endpoint in [
                Endpoint::ChatCompletions,
                Endpoint::Responses,
                Endpoint::Messages,
            ] {
                assert_eq!(from_json_body(endpoint, &fixture(name)), None, "{name}");
            }
        }
    }

    #[test]
    fn lenient_numbers_and_details() {
        let body = br#"{"usage":{"prompt_tokens":12.0,"completion_tokens":"7","queue_time":0.004,
            "prompt_tokens_details":null,"completion_tokens_details":{"reasoning_tokens":-3},
            "total_tokens":[1],"cost":{"x":1}}}"#;
        assert_eq!(
            from_json_body(Endpoint::ChatCompletions, body),
            Some(usage(12, 0, 7, 0))
        );
        let details_as_junk = br#"{"usage":{"prompt_tokens":5,"prompt_tokens_details":[1,2],"completion_tokens":true}}"#;
        assert_eq!(
            from_json_body(Endpoint::ChatCompletions, details_as_junk),
            Some(usage(5, 0, 0, 0))
        );
        let huge = br#"{"usage":{"prompt_tokens":1e300,"completion_tokens":18446744073709551615}}"#;
        assert_eq!(
            from_json_body(Endpoint::ChatCompletions, huge),
            Some(usage(u64::MAX, 0, u64::MAX, 0))
        );
    }

    #[test]
    fn subsets_are_clamped_to_the_reported_total() {
        let chat =
            br#"{"usage":{"prompt_tokens":10,"prompt_tokens_details":{"cached_tokens":50}}}"#;
        assert_eq!(
            from_json_body(Endpoint::ChatCompletions, chat),
            Some(usage(0, 10, 0, 0))
        );
        let responses = br#"{"usage":{"input_tokens":10,"input_tokens_details":{"cached_tokens":6,"cache_write_tokens":9}}}"#;
        let want = Usage {
            cache_write_tokens: 4,
            ..usage(0, 6, 0, 0)
        };
        assert_eq!(from_json_body(Endpoint::Responses, responses), Some(want));
    }

    #[test]
    fn deepseek_cache_hit_used_when_cached_tokens_absent() {
        let body = br#"{"usage":{"prompt_tokens":100,"completion_tokens":5,"prompt_cache_hit_tokens":64,"prompt_cache_miss_tokens":36}}"#;
        assert_eq!(
            from_json_body(Endpoint::ChatCompletions, body),
            Some(usage(36, 64, 5, 0))
        );
    }

    #[test]
    fn anthropic_cache_creation_without_split_is_all_five_minute() {
        let body =
            br#"{"usage":{"input_tokens":3,"cache_creation_input_tokens":40,"output_tokens":1}}"#;
        let want = Usage {
            cache_write_tokens: 40,
            ..usage(3, 0, 1, 0)
        };
        assert_eq!(from_json_body(Endpoint::Messages, body), Some(want));
    }

    #[test]
    fn missing_null_or_empty_usage_is_none() {
        for body in [
            &br#"{"id":"x"}"#[..],
            br#"{"usage":null}"#,
            br#"{"usage":{}}"#,
            br#"{"usage":3}"#,
            b"[]",
            b"null",
        ] {
            assert_eq!(
                from_json_body(Endpoint::ChatCompletions, body),
                None,
                "{body:?}"
            );
        }
    }

    /// A tiny deterministic generator, so the garbage tests are reproducible without a crate.
    fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 56) as u8
            })
            .collect()
    }

    const ALL_ENDPOINTS: [Endpoint; 6] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Responses,
        Endpoint::Messages,
        Endpoint::CountTokens,
    ];

    #[test]
    fn truncated_mutated_and_garbage_bodies_never_panic() {
        for name in fixture_names(".json") {
            let body = fixture(&name);
            for cut in 0..body.len() {
                for endpoint in ALL_ENDPOINTS {
                    let _ = from_json_body(endpoint, &body[..cut]);
                }
            }
            for (at, noise) in (0..body.len())
                .step_by(3)
                .zip(pseudo_random_bytes(7, body.len()))
            {
                let mut mutated = body.clone();
                mutated[at] = noise;
                let _ = from_json_body(endpoint_of(&name), &mutated);
            }
        }
        for seed in 0..500 {
            let garbage = pseudo_random_bytes(seed, (seed as usize * 7) % 300);
            for endpoint in ALL_ENDPOINTS {
                let _ = from_json_body(endpoint, &garbage);
            }
        }
    }

    // ----- streaming -----

    /// Everything a run of the meter produces, for comparing runs with different chunkings.
    #[derive(Debug, PartialEq, Eq)]
    struct Run {
        forwarded: Vec<u8>,
        usage: Option<Usage>,
        complete: bool,
        terminal: bool,
        error: bool,
        estimate: u64,
        truncated: bool,
    }

    fn run(endpoint: Endpoint, strip: bool, chunks: &[&[u8]]) -> Run {
        let mut meter = StreamMeter::new(endpoint, strip);
        let mut forwarded = Vec::new();
        for chunk in chunks {
            match meter.push(chunk) {
                Forward::AsIs => forwarded.extend_from_slice(chunk),
                Forward::Replace(bytes) => forwarded.extend_from_slice(bytes),
            }
        }
        forwarded.extend(meter.finish());
        Run {
            forwarded,
            usage: meter.usage(),
            complete: meter.usage_complete(),
            terminal: meter.saw_terminal(),
            error: meter.saw_error(),
            estimate: meter.output_estimate(),
            truncated: meter.truncated(),
        }
    }

    fn run_whole(endpoint: Endpoint, strip: bool, stream: &[u8]) -> Run {
        run(endpoint, strip, &[stream])
    }

    /// Expected outcome for one recorded stream.
    struct Expect {
        usage: Option<Usage>,
        complete: bool,
        terminal: bool,
        error: bool,
    }

    fn done(usage: Usage) -> Expect {
        Expect {
            usage: Some(usage),
            complete: true,
            terminal: true,
            error: false,
        }
    }

    fn no_usage(terminal: bool) -> Expect {
        Expect {
            usage: None,
            complete: false,
            terminal,
            error: false,
        }
    }

    fn expected_for(name: &str) -> Expect {
        match name {
            "anthropic-messages-stream-2026.sse" => done(usage(10, 0, 4, 0)),
            "anthropic-messages-stream-thinking.sse" => done(usage(46, 0, 133, 0)),
            "anthropic-messages-stream-tool-use-2026.sse" => done(usage(543, 0, 40, 0)),
            "anthropic-messages-stream-tool-use.sse" => done(usage(514, 0, 168, 0)),
            "anthropic-messages-stream.sse" => done(usage(11, 1031, 100, 0)),
            // Input known from message_start; output 1 is only the provisional count.
            "anthropic-messages-stream-error-midstream.sse" => Expect {
                usage: Some(usage(11, 1031, 1, 0)),
                complete: false,
                terminal: false,
                error: true,
            },
            "anthropic-messages-stream-error-overloaded.sse" => Expect {
                usage: None,
                complete: false,
                terminal: false,
                error: true,
            },
            "azure-openai-chat-stream-content-filter.sse" => done(usage(12, 0, 24, 0)),
            "deepseek-chat-stream-usage-on-last-chunk.sse" => done(usage(12, 0, 89, 0)),
            // Gemini's `usageMetadata` is not an OpenAI usage object and it sends no [DONE].
            "gemini-stream-crlf.sse" => no_usage(false),
            // x_groq.usage duplicates usage: counted once.
            "groq-chat-stream-x-groq-usage.sse" => done(usage(304, 0, 49, 23)),
            // prompt 1420 of which cached 1280
            "openai-chat-stream-include-usage.sse" => done(usage(140, 1280, 100, 0)),
            "openai-chat-stream-n2.sse" => done(usage(13, 0, 43, 0)),
            "openai-chat-stream-no-usage.sse" => no_usage(true),
            "openai-chat-stream-tool-calls.sse" => done(usage(364, 0, 40, 0)),
            "openai-completions-legacy-stream.sse" => no_usage(true),
            "openai-responses-stream-function-call.sse" => done(usage(58, 0, 23, 0)),
            "openai-responses-stream-reasoning.sse" => done(usage(20, 0, 166, 128)),
            "openai-responses-stream.sse" => done(usage(125, 1390, 8, 0)),
            other => panic!("no expectation for new fixture {other}"),
        }
    }

    #[test]
    fn every_stream_fixture_meters_to_the_recorded_usage() {
        let names = fixture_names(".sse");
        assert!(names.len() >= 19, "fixtures missing: {names:?}");
        for name in names {
            let stream = fixture(&name);
            let want = expected_for(&name);
            let got = run_whole(endpoint_of(&name), false, &stream);
            assert_eq!(got.usage, want.usage, "{name}");
            assert_eq!(got.complete, want.complete, "{name} usage_complete");
            assert_eq!(got.terminal, want.terminal, "{name} saw_terminal");
            assert_eq!(got.error, want.error, "{name} saw_error");
            assert!(!got.truncated, "{name}");
            assert_eq!(
                got.forwarded, stream,
                "{name}: observing must not change bytes"
            );
        }
    }

    /// Every chunking gives the same usage, flags and forwarded bytes as one big chunk. Every
    /// two-way split runs in strip mode only: it observes exactly like observe-only mode and
    /// also exercises holding and releasing (observe-only always forwards chunks as they are).
    #[test]
    fn every_stream_fixture_is_chunking_independent() {
        for name in fixture_names(".sse") {
            let stream = fixture(&name);
            let endpoint = endpoint_of(&name);
            let whole = run_whole(endpoint, true, &stream);
            for cut in 0..=stream.len() {
                let split = run(endpoint, true, &[&stream[..cut], &stream[cut..]]);
                assert_eq!(split, whole, "{name} cut at {cut}");
            }
            for strip in [false, true] {
                let whole = run_whole(endpoint, strip, &stream);
                let bytes: Vec<&[u8]> = stream.chunks(1).collect();
                assert_eq!(
                    run(endpoint, strip, &bytes),
                    whole,
                    "{name} strip={strip} 1-byte chunks"
                );
                let step = stream.len() / 23 + 1;
                for a in (0..stream.len()).step_by(step) {
                    for b in (a..=stream.len()).step_by(step + 5) {
                        let parts = [&stream[..a], &stream[a..b], &stream[b..]];
                        assert_eq!(
                            run(endpoint, strip, &parts),
                            whole,
                            "{name} strip={strip} cuts {a},{b}"
                        );
                    }
                }
            }
        }
    }

    /// Independent oracle for stripping: split the text on blank lines and remove the blocks
    /// that carry both an empty choices array and a usage object.
    fn without_usage_only_blocks(stream: &[u8], separator: &str) -> (Vec<u8>, usize) {
        let text = std::str::from_utf8(stream).unwrap();
        let blocks: Vec<&str> = text.split_inclusive(&separator.repeat(2)).collect();
        let kept: Vec<&str> = blocks
            .iter()
            .copied()
            .filter(|b| !(b.contains(r#""choices":[]"#) && b.contains(r#""usage":{"#)))
            .collect();
        (kept.concat().into_bytes(), blocks.len() - kept.len())
    }

    #[test]
    fn strip_removes_exactly_the_usage_only_chunk() {
        let stream = fixture("openai-chat-stream-include-usage.sse");
        let (want, removed) = without_usage_only_blocks(&stream, "\n");
        assert_eq!(removed, 1);
        let got = run_whole(Endpoint::ChatCompletions, true, &stream);
        assert_eq!(
            String::from_utf8(got.forwarded).unwrap(),
            String::from_utf8(want).unwrap()
        );
        assert_eq!(
            got.usage,
            Some(usage(140, 1280, 100, 0)),
            "the stripped chunk is still metered"
        );
        assert!(got.terminal);
    }

    #[test]
    fn strip_keeps_azure_first_chunk_with_empty_choices() {
        let stream = fixture("azure-openai-chat-stream-content-filter.sse");
        let got = run_whole(Endpoint::ChatCompletions, true, &stream).forwarded;
        let first_chunk = br#"data: {"choices":[],"created":0,"id":"","model":"","object":"""#;
        assert!(got.starts_with(first_chunk));
        assert_eq!(got, without_usage_only_blocks(&stream, "\n").0);
        assert!(
            !String::from_utf8(got)
                .unwrap()
                .contains("latency_checkpoint"),
            "usage chunk removed"
        );
    }

    #[test]
    fn strip_matches_oracle_on_every_chat_fixture() {
        for name in fixture_names(".sse") {
            let endpoint = endpoint_of(&name);
            if endpoint != Endpoint::ChatCompletions || name.starts_with("gemini") {
                continue;
            }
            let stream = fixture(&name);
            let (want, removed) = without_usage_only_blocks(&stream, "\n");
            // DeepSeek and Groq put usage on a chunk that still has choices: nothing to strip.
            let expect_removed = usize::from(
                !(name.starts_with("deepseek")
                    || name.starts_with("groq")
                    || name.contains("no-usage")),
            );
            assert_eq!(removed, expect_removed, "{name}");
            assert_eq!(run_whole(endpoint, true, &stream).forwarded, want, "{name}");
        }
    }

    fn with_line_ending(stream: &[u8], ending: &str) -> Vec<u8> {
        String::from_utf8(stream.to_vec())
            .unwrap()
            .replace('\n', ending)
            .into_bytes()
    }

    /// CRLF and CR-only framing, split everywhere — including between the `\r` and `\n` that
    /// end the dropped chunk — strips the same event and nothing else.
    #[test]
    fn strip_with_crlf_and_cr_framing_at_every_split() {
        let lf = fixture("openai-chat-stream-tool-calls.sse");
        for ending in ["\r\n", "\r"] {
            let stream = with_line_ending(&lf, ending);
            let (want, removed) = without_usage_only_blocks(&stream, ending);
            assert_eq!(removed, 1);
            for cut in 0..=stream.len() {
                let got = run(
                    Endpoint::ChatCompletions,
                    true,
                    &[&stream[..cut], &stream[cut..]],
                );
                assert_eq!(got.forwarded, want, "ending {ending:?} cut at {cut}");
                assert_eq!(got.usage, Some(usage(364, 0, 40, 0)));
                assert!(got.terminal && !got.truncated);
            }
        }
    }

    #[test]
    fn gemini_crlf_stream_is_framed_and_forwarded_untouched() {
        let stream = fixture("gemini-stream-crlf.sse");
        for strip in [false, true] {
            let got = run_whole(Endpoint::ChatCompletions, strip, &stream);
            assert_eq!(got.forwarded, stream);
            assert_eq!(got.estimate, 3, "three chunks");
            assert!(!got.truncated);
        }
    }

    #[test]
    fn strip_keeps_comments_bom_and_multiline_data() {
        let usage_chunk = "data: {\"choices\":[],\ndata: \"usage\" : {\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n";
        let stream = format!(
            "\u{feff}: OPENROUTER PROCESSING\n\ndata: {{\"choices\":[{{\"delta\":{{\"content\":\"hi\"}}}}]}}\n\n\
             : keep-alive\n{usage_chunk}: after\n\ndata: [DONE]\n\n"
        );
        let want = stream.replace(usage_chunk, "");
        for cut in 0..=stream.len() {
            let got = run(
                Endpoint::ChatCompletions,
                true,
                &[&stream.as_bytes()[..cut], &stream.as_bytes()[cut..]],
            );
            assert_eq!(
                String::from_utf8(got.forwarded).unwrap(),
                want,
                "cut at {cut}"
            );
            assert_eq!(got.usage, Some(usage(5, 0, 2, 0)));
            assert_eq!(got.estimate, 1);
        }
    }

    #[test]
    fn truncated_usage_chunk_is_flagged_not_trusted_and_released() {
        let stream = fixture("openai-chat-stream-include-usage.sse");
        let text = String::from_utf8(stream.clone()).unwrap();
        let usage_start = text
            .find(r#"{"id""#)
            .map(|_| text.rfind("data: {").unwrap())
            .unwrap();
        let cut = text[usage_start..].find("\n\n").unwrap() + usage_start + 1; // keep one \n
        for strip in [false, true] {
            let got = run_whole(Endpoint::ChatCompletions, strip, &stream[..cut]);
            assert!(got.truncated);
            assert_eq!(got.usage, None);
            assert!(!got.complete && !got.terminal);
            assert_eq!(
                got.forwarded,
                &stream[..cut],
                "held bytes come out at finish"
            );
        }
    }

    #[test]
    fn strip_holds_partial_events_until_complete() {
        let mut meter = StreamMeter::new(Endpoint::ChatCompletions, true);
        assert_eq!(
            meter.push(b"data: {\"choices\":[]}\n\nda"),
            Forward::Replace(b"data: {\"choices\":[]}\n\n")
        );
        assert_eq!(meter.push(b"ta: 1\n"), Forward::Replace(b""));
        assert_eq!(meter.push(b"\n"), Forward::Replace(b"data: 1\n\n"));
        assert_eq!(meter.push(b"data: [DONE]\n\n"), Forward::AsIs);
        assert_eq!(meter.finish(), b"");
    }

    #[test]
    fn anthropic_message_delta_overrides_per_field_never_sums() {
        let stream = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\
            \"cache_creation_input_tokens\":30,\"cache_read_input_tokens\":5,\"cache_creation\":{\"ephemeral_5m_input_tokens\":10,\
            \"ephemeral_1h_input_tokens\":20},\"output_tokens\":2}}}\n\n\
            event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":10,\"output_tokens\":50}}\n\n";
        let got = run_whole(Endpoint::Messages, false, stream.as_bytes());
        let want = Usage {
            cache_write_tokens: 10,
            cache_write_1h_tokens: 20,
            ..usage(10, 5, 50, 0)
        };
        assert_eq!(got.usage, Some(want));
        assert!(got.complete && !got.terminal);
    }

    #[test]
    fn anthropic_midstream_error_keeps_input_and_estimates_output() {
        let got = run_whole(
            Endpoint::Messages,
            false,
            &fixture("anthropic-messages-stream-error-midstream.sse"),
        );
        // Deltas "A" and " **system** is an organized collection of interconn": 52 text bytes.
        assert_eq!(got.estimate, 13);
        assert!(!got.complete);
    }

    #[test]
    fn estimates_for_streams_without_usage() {
        // 24 data chunks: role chunk + 22 content chunks + finish chunk.
        assert_eq!(
            run_whole(
                Endpoint::ChatCompletions,
                false,
                &fixture("openai-chat-stream-no-usage.sse")
            )
            .estimate,
            24
        );
        // 7 output_text deltas for 8 reported output tokens.
        assert_eq!(
            run_whole(
                Endpoint::Responses,
                false,
                &fixture("openai-responses-stream.sse")
            )
            .estimate,
            7
        );
        let anthropic = run_whole(
            Endpoint::Messages,
            false,
            &fixture("anthropic-messages-stream.sse"),
        );
        assert!(
            (60..=140).contains(&anthropic.estimate),
            "reported 100, estimated {}",
            anthropic.estimate
        );
    }

    #[test]
    fn chat_error_chunk_and_events_without_names() {
        let error = b"data: {\"error\": {\"message\":\"upstream died\",\"code\":502}}\n\n";
        let got = run_whole(Endpoint::ChatCompletions, true, error);
        assert!(got.error && got.usage.is_none());
        assert_eq!(got.forwarded, error);
        let null_error = b"data: {\"choices\":[{\"delta\":{}}],\"error\":null}\n\n";
        assert!(!run_whole(Endpoint::ChatCompletions, false, null_error).error);
        // An Anthropic-compatible server that omits `event:` lines is classified by data.type.
        let nameless = b"data: {\"type\": \"message_delta\", \"usage\": {\"output_tokens\": 9}}\n\ndata: {\"type\":\"message_stop\"}\n\n";
        let got = run_whole(Endpoint::Messages, false, nameless);
        assert_eq!(got.usage.map(|u| u.output_tokens), Some(9));
        assert!(got.complete && got.terminal);
    }

    #[test]
    fn empty_usage_object_does_not_erase_reported_usage() {
        let stream =
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n\
            data: {\"choices\":[],\"usage\":{}}\n\ndata: [DONE]\n\n";
        let got = run_whole(Endpoint::ChatCompletions, true, stream);
        assert_eq!(got.usage, Some(usage(3, 0, 4, 0)));
        assert_eq!(
            got.forwarded, b"data: [DONE]\n\n",
            "both usage-only chunks are stripped"
        );
    }

    #[test]
    fn responses_terminal_variants() {
        let incomplete = b"event: response.incomplete\ndata: {\"type\":\"response.incomplete\",\"response\":{\"usage\":{\"input_tokens\":4,\"output_tokens\":16}}}\n\n";
        let got = run_whole(Endpoint::Responses, false, incomplete);
        assert_eq!(got.usage, Some(usage(4, 0, 16, 0)));
        assert!(got.complete && got.terminal && !got.error);
        let failed = b"event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"usage\":null,\"error\":{}}}\n\n";
        let got = run_whole(Endpoint::Responses, false, failed);
        assert!(got.terminal && got.error && !got.complete && got.usage.is_none());
        let error = b"event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\"}\n\n";
        let got = run_whole(Endpoint::Responses, false, error);
        assert!(got.error && !got.terminal);
    }

    #[test]
    fn count_tokens_is_never_metered() {
        let stream = fixture("anthropic-messages-stream.sse");
        let got = run_whole(Endpoint::CountTokens, true, &stream);
        assert_eq!(got.usage, None);
        assert_eq!(got.forwarded, stream);
    }

    /// The plain definition `usage_or_error_keys` must agree with: every position, no vectors.
    fn usage_or_error_keys_by_definition(json: &[u8]) -> (bool, bool) {
        let value_at = |key: &[u8], test: &dyn Fn(u8) -> bool| {
            (0..json.len()).any(|at| {
                json[at..].starts_with(key)
                    && value_position(json, at + key.len())
                        .and_then(|v| json.get(v))
                        .is_some_and(|&b| test(b))
            })
        };
        (
            value_at(b"\"usage\"", &|b| b == b'{'),
            value_at(b"\"error\"", &|b| b != b'n'),
        )
    }

    /// Every way this CPU can run the key check: each vector search it has, and the byte
    /// loop alone (what CPUs without one use).
    fn key_checks() -> Vec<(&'static str, Option<QuotePairFinder>)> {
        let mut checks = vec![("byte loop", None)];
        #[cfg(target_arch = "x86_64")]
        {
            checks.push(("sse2", QuotePairFinder::sse2()));
            if let Some(avx2) = QuotePairFinder::avx2() {
                checks.push(("avx2", Some(avx2)));
            }
        }
        #[cfg(target_arch = "aarch64")]
        checks.push(("neon", QuotePairFinder::best()));
        checks
    }

    /// A vector search that could not be made would run the byte loop under its name.
    #[test]
    fn every_key_check_this_cpu_has_is_exercised() {
        for (check, finder) in key_checks().iter().skip(1) {
            assert!(finder.is_some(), "{check} could not be made");
        }
    }

    #[test]
    fn usage_and_error_keys_are_found_at_every_offset() {
        let keys: [&[u8]; 8] = [
            b"\"usage\":{\"x\":1}",
            b"\"usage\" : {}",
            b"\"usage\":null",
            b"\"usage\"",
            b"\"error\":{}",
            b"\"error\": \"boom\"",
            b"\"error\":null",
            b"\"delta\":\"usage\",\"error\"",
        ];
        // Every length around the vector widths (16 and 32 bytes) and every offset in it, so
        // a key can sit in a vector, across two, or in the too-short tail.
        for (check, finder) in key_checks() {
            for key in keys {
                for len in key.len()..80 {
                    for at in 0..=len - key.len() {
                        let mut json = vec![b'"'; len];
                        json.iter_mut().step_by(3).for_each(|b| *b = b'a');
                        json[at..at + key.len()].copy_from_slice(key);
                        assert_eq!(
                            usage_or_error_keys_using(finder.as_ref(), &json),
                            usage_or_error_keys_by_definition(&json),
                            "{check}: {}",
                            String::from_utf8_lossy(&json)
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn usage_and_error_keys_agree_with_the_definition_on_recorded_and_random_chunks() {
        let mut payloads: Vec<Vec<u8>> = Vec::new();
        for name in fixture_names(".sse") {
            let stream = fixture(&name);
            let mut parser = SseParser::new();
            parser.push(&stream, |event| payloads.push(event.data.to_vec()));
        }
        for seed in 0..400u64 {
            let mut json = pseudo_random_bytes(seed, (seed as usize * 7) % 300);
            for (i, piece) in [&b"\"usage\":{"[..], b"\"error\": 1", b"\"\"\"\"\"\""]
                .iter()
                .enumerate()
            {
                let at = (seed as usize * (i + 5) * 17) % (json.len() + 1);
                json.splice(at..at, piece.iter().copied());
            }
            payloads.push(json);
        }
        let mut found = (0, 0);
        for json in &payloads {
            let want = usage_or_error_keys_by_definition(json);
            for (check, finder) in key_checks() {
                assert_eq!(
                    usage_or_error_keys_using(finder.as_ref(), json),
                    want,
                    "{check}"
                );
            }
            found.0 += usize::from(want.0);
            found.1 += usize::from(want.1);
        }
        assert!(
            found.0 > 10 && found.1 > 10,
            "the inputs reach both keys: {found:?}"
        );
    }

    #[test]
    fn garbage_streams_never_panic_and_forward_every_byte() {
        for seed in 0..300u64 {
            let mut stream = pseudo_random_bytes(seed, 64 + (seed as usize * 37) % 2000);
            // Salt with framing and key bytes so the interesting paths are reached.
            for (i, piece) in [
                &b"\n\n"[..],
                b"data: {\"usage\":{",
                b"\r",
                b"\"choices\":[]",
                b"event: error\n",
            ]
            .iter()
            .enumerate()
            {
                let at = (seed as usize * (i + 3) * 31) % stream.len();
                stream.splice(at..at, piece.iter().copied());
            }
            let cut = (seed as usize * 13) % stream.len();
            for endpoint in ALL_ENDPOINTS {
                let got = run(endpoint, true, &[&stream[..cut], &stream[cut..]]);
                let kept = got.forwarded.len();
                assert!(kept <= stream.len());
                let _ = run(endpoint, false, &[&stream]);
            }
        }
    }
}
