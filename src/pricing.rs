//! Model prices and the exact cost of a request.
//!
//! Money is integer nano-USD (1 USD = 1_000_000_000 nano-USD) everywhere. Prices are
//! configured in the unit providers publish, USD per million tokens, and stored as integer
//! nano-USD per million tokens, so a price like `0.075` is held exactly. The one and only
//! rounding in the books happens in [`cost_nano_usd`], once per request.

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::usage::Usage;

/// nano-USD in one USD; also the scale of a price in nano-USD per million tokens.
pub const NANO_PER_USD: u64 = 1_000_000_000;

/// Prices are per million tokens; costs are summed in "nano-USD × tokens / Mtok" and
/// divided by this once at the end.
const TOKENS_PER_PRICE_UNIT: u128 = 1_000_000;

/// nano-USD resolution: a tenth of a nano-USD cannot be stored, so more digits are refused
/// rather than silently rounded.
const MAX_DECIMALS: usize = 9;

/// An f64 keeps any decimal of up to 15 significant digits exactly (DBL_DIG); beyond that the
/// YAML text may already have lost digits before we see it.
const MAX_EXACT_FLOAT_DIGITS: usize = 15;

/// Why a money amount or price could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    #[error("amount {0:?} is negative")]
    Negative(String),
    #[error("amount {0:?} has more than 9 decimal places (finer than one nano-USD)")]
    TooPrecise(String),
    #[error("amount {0:?} has too many significant digits to be read exactly from a YAML number; quote it")]
    InexactFloat(String),
    #[error("amount {0:?} is too large")]
    Overflow(String),
    #[error("{0:?} is not a plain decimal amount like 0.05 or 12")]
    Invalid(String),
}

/// List price of one model. Every field is nano-USD per million tokens
/// (`2.5` USD/Mtok in YAML is stored as `2_500_000_000`).
///
/// Optional cache prices fall back as described on [`cost_nano_usd`].
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
// A misspelt key (`cache_reads:`) would otherwise silently bill at the fallback price.
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// Uncached input tokens.
    #[serde(deserialize_with = "price")]
    pub input: u64,
    /// Output tokens, reasoning included.
    #[serde(deserialize_with = "price")]
    pub output: u64,
    /// OpenAI's name for the cache-read price.
    #[serde(default, deserialize_with = "optional_price")]
    pub cached_input: Option<u64>,
    /// Anthropic's name for the cache-read price; wins over `cached_input`.
    #[serde(default, deserialize_with = "optional_price")]
    pub cache_read: Option<u64>,
    /// Writes to the default (short-lived) prompt cache.
    #[serde(default, deserialize_with = "optional_price")]
    pub cache_write: Option<u64>,
    /// Writes to Anthropic's 1-hour prompt cache.
    #[serde(default, deserialize_with = "optional_price")]
    pub cache_write_1h: Option<u64>,
}

impl ModelPrice {
    fn cache_read_rate(&self) -> u64 {
        self.cache_read.or(self.cached_input).unwrap_or(self.input)
    }

    fn cache_write_rate(&self) -> u64 {
        self.cache_write.unwrap_or(self.input)
    }

    fn cache_write_1h_rate(&self) -> u64 {
        self.cache_write_1h
            .unwrap_or_else(|| self.cache_write_rate())
    }
}

/// Exact cost of `usage` at `price`, in nano-USD, saturating at `u64::MAX`.
///
/// Each bucket of [`Usage`] is multiplied by its price in u128, the products are summed, and
/// the sum is divided by one million exactly once, rounding half up. That division is the
/// only rounding in the books. A price with at most 3 decimals in USD/Mtok (every price in
/// conf/prices.yaml when this was written) is a whole number of nano-USD per token, so for
/// such prices nothing is ever actually rounded.
///
/// Price used per bucket: cache reads use `cache_read`, else `cached_input`, else `input`;
/// cache writes use `cache_write`, else `input`; 1-hour cache writes use `cache_write_1h`,
/// else `cache_write`, else `input`. Reasoning tokens are already inside `output_tokens`
/// and are not added again.
pub fn cost_nano_usd(price: &ModelPrice, usage: &Usage) -> u64 {
    let billed = [
        (usage.input_tokens, price.input),
        (usage.cache_read_tokens, price.cache_read_rate()),
        (usage.cache_write_tokens, price.cache_write_rate()),
        (usage.cache_write_1h_tokens, price.cache_write_1h_rate()),
        (usage.output_tokens, price.output),
    ];
    let nano_usd_tokens_per_mtok = billed
        .iter()
        .map(|&(tokens, rate)| u128::from(tokens) * u128::from(rate))
        .fold(0u128, u128::saturating_add);
    let nano_usd = divide_round_half_up(nano_usd_tokens_per_mtok, TOKENS_PER_PRICE_UNIT);
    u64::try_from(nano_usd).unwrap_or(u64::MAX)
}

/// `numerator / divisor` rounded half up, without the overflow `(n + d/2) / d` risks near
/// `u128::MAX`.
fn divide_round_half_up(numerator: u128, divisor: u128) -> u128 {
    let quotient = numerator / divisor;
    let remainder = numerator % divisor;
    // remainder < divisor <= 10^6 here, so doubling it cannot overflow.
    if remainder * 2 >= divisor {
        quotient + 1
    } else {
        quotient
    }
}

/// Renders nano-USD as a USD decimal with 6 to 9 decimals: trailing zeros are trimmed, but
/// never below micro-USD, so amounts line up in logs (`420_000` → `"0.000420"`).
pub fn format_usd(nano: u64) -> String {
    const MIN_DECIMALS: usize = 6;
    let mut out = String::with_capacity(30);
    crate::fastfmt::push_u64(&mut out, nano / NANO_PER_USD);
    out.push('.');
    let point = out.len();
    crate::fastfmt::push_padded(&mut out, nano % NANO_PER_USD, 9);
    let significant = out[point..].trim_end_matches('0').len().max(MIN_DECIMALS);
    out.truncate(point + significant);
    out
}

/// Reads a USD amount such as a `x-tollgate-max-cost: 0.05` cap into nano-USD.
///
/// Accepts `DIGITS` or `DIGITS.DIGITS` with at most 9 decimals, surrounding whitespace
/// ignored. Signs, exponents and anything finer than one nano-USD are refused, never rounded.
pub fn parse_usd(text: &str) -> Result<u64, PriceError> {
    parse_decimal_nano(text.trim())
}

/// Parses a plain decimal into units of 10^-9, exactly.
fn parse_decimal_nano(text: &str) -> Result<u64, PriceError> {
    let error = |make: fn(String) -> PriceError| make(text.to_owned());
    if text.starts_with('-') {
        return Err(error(PriceError::Negative));
    }
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let has_point = whole.len() < text.len();
    if !is_digits(whole) || (has_point && !is_digits(fraction)) {
        return Err(error(PriceError::Invalid));
    }
    if fraction.len() > MAX_DECIMALS {
        return Err(error(PriceError::TooPrecise));
    }
    let whole_nano = whole
        .parse::<u64>()
        .ok()
        .and_then(|units| units.checked_mul(NANO_PER_USD));
    let fraction_nano = fraction_to_nano(fraction);
    whole_nano
        .and_then(|nano| nano.checked_add(fraction_nano))
        .ok_or_else(|| error(PriceError::Overflow))
}

fn is_digits(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit())
}

/// `"075"` → 75_000_000. The caller guarantees at most 9 ASCII digits.
fn fraction_to_nano(fraction: &str) -> u64 {
    fraction
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(MAX_DECIMALS)
        .fold(0, |nano, digit| nano * 10 + u64::from(digit - b'0'))
}

/// serde_yaml hands `0.075` over as an f64. Its shortest round-trip decimal (what `Display`
/// prints) is the text that was written whenever that text had at most 15 significant
/// digits, so parsing that decimal recovers the configured price exactly, where
/// `(f * 1e9) as u64` would turn `1.001` into 1_000_999_999.
fn parse_float_nano(value: f64) -> Result<u64, PriceError> {
    let decimal = value.to_string();
    if !value.is_finite() {
        return Err(PriceError::Invalid(decimal));
    }
    let nano = parse_decimal_nano(&decimal)?;
    if significant_digits(&decimal) > MAX_EXACT_FLOAT_DIGITS {
        return Err(PriceError::InexactFloat(decimal));
    }
    Ok(nano)
}

fn significant_digits(decimal: &str) -> usize {
    let digits: String = decimal.chars().filter(char::is_ascii_digit).collect();
    digits.trim_start_matches('0').len()
}

/// A price read from YAML: a number (`2.5`, `3`) or a quoted decimal (`"0.075"`).
struct ExactPrice(u64);

impl<'de> Deserialize<'de> for ExactPrice {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(ExactPriceVisitor)
            .map(ExactPrice)
    }
}

struct ExactPriceVisitor;

impl Visitor<'_> for ExactPriceVisitor {
    type Value = u64;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a non-negative price in USD per million tokens, like 2.5 or \"0.075\"")
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<u64, E> {
        value
            .checked_mul(NANO_PER_USD)
            .ok_or_else(|| E::custom(PriceError::Overflow(value.to_string())))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<u64, E> {
        match u64::try_from(value) {
            Ok(unsigned) => self.visit_u64(unsigned),
            Err(_) => Err(E::custom(PriceError::Negative(value.to_string()))),
        }
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<u64, E> {
        parse_float_nano(value).map_err(E::custom)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<u64, E> {
        parse_decimal_nano(value).map_err(E::custom)
    }
}

/// Deserialises a decimal USD amount (number or string) exactly into nano-USD.
pub fn usd_nano<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    price(deserializer)
}

fn price<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    ExactPrice::deserialize(deserializer).map(|price| price.0)
}

fn optional_price<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    Option::<ExactPrice>::deserialize(deserializer).map(|price| price.map(|price| price.0))
}

/// All configured prices plus the dated version that cost records carry, so a cost can
/// always be traced back to the table that produced it. Shaped like `conf/prices.yaml`.
#[derive(Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PriceTable {
    /// Date (or other label) of the price list, e.g. `"2026-11-23"`.
    pub version: String,
    models: HashMap<String, ModelPrice>,
}

impl PriceTable {
    #[cfg(test)]
    pub fn new(version: impl Into<String>, models: HashMap<String, ModelPrice>) -> Self {
        Self {
            version: version.into(),
            models,
        }
    }

    /// Adds or replaces one model's price (inline prices in the main config win).
    pub fn insert(&mut self, model: String, price: ModelPrice) {
        self.models.insert(model, price);
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// Finds the price for a model name as a client or provider spelt it.
    ///
    /// Tries, in order, for the full name and then for the name with each leading
    /// `provider/` segment removed (`openai/gpt-4o` → `gpt-4o`): the exact name, then the
    /// name without a trailing snapshot date (`gpt-4o-2024-08-06` → `gpt-4o`,
    /// `claude-haiku-4-5-20251001` → `claude-haiku-4-5`). Exact names win, so a snapshot
    /// priced differently from its alias only needs its own row in the table.
    pub fn lookup(&self, model: &str) -> Option<&ModelPrice> {
        provider_suffixes(model).find_map(|name| {
            self.models
                .get(name)
                .or_else(|| strip_date_suffix(name).and_then(|alias| self.models.get(alias)))
        })
    }
}

/// `"a/b/c"` → `"a/b/c"`, `"b/c"`, `"c"`.
fn provider_suffixes(model: &str) -> impl Iterator<Item = &str> {
    let after_slashes = model
        .match_indices('/')
        .map(move |(at, _)| &model[at + 1..]);
    std::iter::once(model).chain(after_slashes)
}

/// Removes a trailing `-YYYYMMDD` or `-YYYY-MM-DD`; `None` when there is none.
fn strip_date_suffix(model: &str) -> Option<&str> {
    let (stem, last) = model.rsplit_once('-')?;
    if is_plausible_date(last) {
        return Some(stem).filter(|stem| !stem.is_empty());
    }
    let (stem, month) = stem.rsplit_once('-')?;
    let (stem, year) = stem.rsplit_once('-')?;
    let dashed_shape = year.len() == 4 && month.len() == 2 && last.len() == 2;
    let is_date = dashed_shape && is_plausible_date(&[year, month, last].concat());
    Some(stem).filter(|stem| is_date && !stem.is_empty())
}

/// Eight digits forming a calendar-ish date, so `-00000001` or a build number is not taken
/// for a snapshot date.
fn is_plausible_date(yyyymmdd: &str) -> bool {
    if yyyymmdd.len() != 8 || !is_digits(yyyymmdd) {
        return false;
    }
    let month: u32 = yyyymmdd[4..6].parse().unwrap_or(0);
    let day: u32 = yyyymmdd[6..8].parse().unwrap_or(0);
    (1..=12).contains(&month) && (1..=31).contains(&day)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// USD/Mtok → nano-USD/Mtok for readable test prices (whole thousandths only).
    const fn usd_per_mtok_thousandths(thousandths: u64) -> u64 {
        thousandths * 1_000_000
    }

    fn shipped_table() -> PriceTable {
        crate::config::parse_yaml::<PriceTable>(include_str!("../conf/prices.yaml"), "prices.yaml")
            .expect("conf/prices.yaml parses")
    }

    fn price_yaml(yaml: &str) -> Result<ModelPrice, serde_yaml::Error> {
        serde_yaml::from_str(yaml)
    }

    /// Reads `input: <value>` and returns the stored input price.
    fn input_price(value: &str) -> Result<u64, String> {
        price_yaml(&format!("{{ input: {value}, output: 0 }}"))
            .map(|price| price.input)
            .map_err(|error| error.to_string())
    }

    fn simple_price(input: u64, output: u64) -> ModelPrice {
        ModelPrice {
            input,
            output,
            cached_input: None,
            cache_read: None,
            cache_write: None,
            cache_write_1h: None,
        }
    }

    // ---- costs of real recorded usages (tests/fixtures) at shipped prices ----

    #[test]
    fn gpt_4o_chat_with_cached_prompt() {
        // openai-chat-nonstream.json: prompt 1220 of which 1152 cached, completion 100.
        let usage = Usage {
            input_tokens: 1220 - 1152,
            cache_read_tokens: 1152,
            output_tokens: 100,
            ..Usage::default()
        };
        let table = shipped_table();
        let price = table.lookup("gpt-4o-2024-08-06").expect("priced");
        // 68 × 2.5 + 1152 × 1.25 + 100 × 10 = 170 + 1440 + 1000 = 2610 USD·tok/Mtok
        // → 2610 / 10^6 USD = 0.002610 USD = 2_610_000 nano-USD.
        assert_eq!(cost_nano_usd(price, &usage), 2_610_000);
        assert_eq!(format_usd(cost_nano_usd(price, &usage)), "0.002610");
    }

    #[test]
    fn reasoning_tokens_are_not_billed_twice() {
        // openai-chat-nonstream-reasoning.json: gpt-5-nano, prompt 11, completion 228 of
        // which 192 reasoning.
        let usage = Usage {
            input_tokens: 11,
            output_tokens: 228,
            reasoning_tokens: 192,
            ..Usage::default()
        };
        let table = shipped_table();
        let price = table.lookup("gpt-5-nano-2025-08-07").expect("priced");
        // 11 × 0.05 + 228 × 0.4 = 0.55 + 91.2 = 91.75 → 91_750 nano-USD.
        assert_eq!(cost_nano_usd(price, &usage), 91_750);
    }

    #[test]
    fn claude_sonnet_4_cache_read() {
        // anthropic-messages-nonstream.json: input 11, cache read 2055, output 100.
        let usage = Usage {
            input_tokens: 11,
            cache_read_tokens: 2055,
            output_tokens: 100,
            ..Usage::default()
        };
        let table = shipped_table();
        let price = table.lookup("claude-sonnet-4-20250514").expect("priced");
        // 11 × 3 + 2055 × 0.3 + 100 × 15 = 33 + 616.5 + 1500 = 2149.5 → 2_149_500 nano-USD.
        assert_eq!(cost_nano_usd(price, &usage), 2_149_500);
    }

    #[test]
    fn claude_sonnet_4_five_minute_and_one_hour_cache_writes() {
        // anthropic-messages-nonstream-cache-write-1h.json: input 3, 5m writes 14,
        // 1h writes 2056, output 459.
        let usage = Usage {
            input_tokens: 3,
            cache_write_tokens: 14,
            cache_write_1h_tokens: 2056,
            output_tokens: 459,
            ..Usage::default()
        };
        let table = shipped_table();
        let price = table.lookup("claude-sonnet-4-20250514").expect("priced");
        // 3 × 3 + 14 × 3.75 + 2056 × 6 + 459 × 15 = 9 + 52.5 + 12336 + 6885 = 19282.5
        // → 19_282_500 nano-USD.
        assert_eq!(cost_nano_usd(price, &usage), 19_282_500);
    }

    #[test]
    fn openai_responses_cache_write() {
        // openai-responses-nonstream-cache-write.json: gpt-5.6-sol, input 1220 of which
        // 1217 cache writes, output 100 (54 reasoning).
        let usage = Usage {
            input_tokens: 3,
            cache_write_tokens: 1217,
            output_tokens: 100,
            reasoning_tokens: 54,
            ..Usage::default()
        };
        let table = shipped_table();
        let price = table.lookup("gpt-5.6-sol").expect("priced");
        // 3 × 4 + 1217 × 5 + 100 × 20 = 12 + 6085 + 2000 = 8097 → 8_097_000 nano-USD.
        assert_eq!(cost_nano_usd(price, &usage), 8_097_000);
    }

    #[test]
    fn zero_usage_costs_nothing() {
        let table = shipped_table();
        let price = table.lookup("claude-opus-4-6").expect("priced");
        assert_eq!(cost_nano_usd(price, &Usage::default()), 0);
    }

    // ---- price fallbacks ----

    #[test]
    fn cache_read_prefers_cache_read_then_cached_input_then_input() {
        let reads = Usage {
            cache_read_tokens: 1_000_000,
            ..Usage::default()
        };
        let mut price = simple_price(usd_per_mtok_thousandths(2_000), 0);
        // One million tokens cost exactly the per-Mtok price.
        assert_eq!(cost_nano_usd(&price, &reads), 2_000_000_000);
        price.cached_input = Some(usd_per_mtok_thousandths(500));
        assert_eq!(cost_nano_usd(&price, &reads), 500_000_000);
        price.cache_read = Some(usd_per_mtok_thousandths(300));
        assert_eq!(cost_nano_usd(&price, &reads), 300_000_000);
    }

    #[test]
    fn cache_writes_fall_back_to_short_write_then_input() {
        let short_writes = Usage {
            cache_write_tokens: 1_000_000,
            ..Usage::default()
        };
        let hour_writes = Usage {
            cache_write_1h_tokens: 1_000_000,
            ..Usage::default()
        };
        let mut price = simple_price(usd_per_mtok_thousandths(3_000), 0);
        assert_eq!(cost_nano_usd(&price, &short_writes), 3_000_000_000);
        assert_eq!(cost_nano_usd(&price, &hour_writes), 3_000_000_000);
        price.cache_write = Some(usd_per_mtok_thousandths(3_750));
        assert_eq!(cost_nano_usd(&price, &short_writes), 3_750_000_000);
        assert_eq!(cost_nano_usd(&price, &hour_writes), 3_750_000_000);
        price.cache_write_1h = Some(usd_per_mtok_thousandths(6_000));
        assert_eq!(cost_nano_usd(&price, &short_writes), 3_750_000_000);
        assert_eq!(cost_nano_usd(&price, &hour_writes), 6_000_000_000);
    }

    // ---- rounding and saturation ----

    #[test]
    fn rounds_half_up_exactly_at_half_a_nano() {
        let one_input_token = Usage {
            input_tokens: 1,
            ..Usage::default()
        };
        let cost_at =
            |nano_per_mtok| cost_nano_usd(&simple_price(nano_per_mtok, 0), &one_input_token);
        // 1 token × 500_000 nano/Mtok = 0.5 nano → 1.
        assert_eq!(cost_at(500_000), 1);
        // 0.499999 nano → 0.
        assert_eq!(cost_at(499_999), 0);
        // 1.5 nano → 2; 2.499999 → 2; 2.5 → 3.
        assert_eq!(cost_at(1_500_000), 2);
        assert_eq!(cost_at(2_499_999), 2);
        assert_eq!(cost_at(2_500_000), 3);
    }

    #[test]
    fn rounds_once_over_the_sum_not_per_bucket() {
        // 0.4 nano of input + 0.4 nano of output = 0.8 nano → 1; rounding each bucket
        // first would have given 0 + 0.
        let usage = Usage {
            input_tokens: 1,
            output_tokens: 1,
            ..Usage::default()
        };
        assert_eq!(cost_nano_usd(&simple_price(400_000, 400_000), &usage), 1);
    }

    #[test]
    fn saturates_at_u64_max() {
        let everything = Usage {
            input_tokens: u64::MAX,
            cache_read_tokens: u64::MAX,
            cache_write_tokens: u64::MAX,
            cache_write_1h_tokens: u64::MAX,
            output_tokens: u64::MAX,
            reasoning_tokens: u64::MAX,
        };
        let table = shipped_table();
        let gpt_4o = table.lookup("gpt-4o").expect("priced");
        assert_eq!(cost_nano_usd(gpt_4o, &everything), u64::MAX);
        // Every product is (2^64-1)^2; five of them overflow u128 and must saturate.
        let priciest = ModelPrice {
            input: u64::MAX,
            output: u64::MAX,
            cached_input: Some(u64::MAX),
            cache_read: Some(u64::MAX),
            cache_write: Some(u64::MAX),
            cache_write_1h: Some(u64::MAX),
        };
        assert_eq!(cost_nano_usd(&priciest, &everything), u64::MAX);
    }

    #[test]
    fn largest_cost_that_fits_is_exact() {
        // u64::MAX tokens at 1 USD/Mtok = (2^64-1) × 10^9 / 10^6 = (2^64-1) × 1000 nano:
        // too big. At 0.000001 USD/Mtok (1000 nano/Mtok): (2^64-1) × 1000 / 10^6
        // = 18_446_744_073_709_551.615 → 18_446_744_073_709_552 (half up).
        let usage = Usage {
            output_tokens: u64::MAX,
            ..Usage::default()
        };
        assert_eq!(
            cost_nano_usd(&simple_price(0, 1_000), &usage),
            18_446_744_073_709_552
        );
    }

    #[test]
    fn division_does_not_overflow_near_u128_max() {
        // u128::MAX = 340282366920938463463374607431768211455; ÷ 10^6 leaves remainder
        // 211455 < 500000, so it rounds down.
        assert_eq!(
            divide_round_half_up(u128::MAX, 1_000_000),
            u128::MAX / 1_000_000
        );
        assert_eq!(divide_round_half_up(1_500_000, 1_000_000), 2);
        assert_eq!(divide_round_half_up(1_499_999, 1_000_000), 1);
    }

    // ---- reading prices from YAML ----

    #[test]
    fn yaml_numbers_become_exact_nano_prices() {
        assert_eq!(input_price("0.075"), Ok(75_000_000));
        assert_eq!(input_price("2.5"), Ok(2_500_000_000));
        assert_eq!(input_price("3"), Ok(3_000_000_000));
        assert_eq!(input_price("3.0"), Ok(3_000_000_000));
        assert_eq!(input_price("0"), Ok(0));
        assert_eq!(input_price("18.75"), Ok(18_750_000_000));
        assert_eq!(input_price("0.000000001"), Ok(1));
        assert_eq!(input_price("12345.123456789"), Ok(12_345_123_456_789));
    }

    #[test]
    fn yaml_exponent_floats_are_exact() {
        // YAML 1.2 reads these as floats; Display prints 1e-7 as 0.0000001.
        assert_eq!(input_price("1e-7"), Ok(100));
        assert_eq!(input_price("2.5e0"), Ok(2_500_000_000));
        assert_eq!(input_price("1.5e3"), Ok(1_500_000_000_000));
    }

    #[test]
    fn float_artefacts_do_not_leak_into_prices() {
        // The f64 nearest 1.001 is 1.000999999999999889..., so scaling and truncating
        // loses a nano; the shortest decimal "1.001" does not.
        let naive = |value: f64| (value * 1e9) as u64;
        assert_eq!(naive(1.001), 1_000_999_999);
        assert_eq!(input_price("1.001"), Ok(1_001_000_000));
        assert_eq!(naive(1.000000007), 1_000_000_006);
        assert_eq!(input_price("1.000000007"), Ok(1_000_000_007));
        // 0.1 + 0.2 as an f64 is 0.30000000000000004: 17 decimals, refused, not rounded.
        let sum = format!("{}", 0.1_f64 + 0.2_f64);
        assert_eq!(sum, "0.30000000000000004");
        let refusal = input_price(&sum).expect_err("too precise");
        assert!(refusal.contains("more than 9 decimal places"), "{refusal}");
    }

    #[test]
    fn quoted_decimal_strings_are_accepted() {
        assert_eq!(input_price("\"0.075\""), Ok(75_000_000));
        assert_eq!(input_price("'2.5'"), Ok(2_500_000_000));
        // A quoted string keeps digits an f64 could not: 17 significant digits.
        assert_eq!(
            input_price("\"12345678.123456789\""),
            Ok(12_345_678_123_456_789)
        );
    }

    #[test]
    fn yaml_prices_reject_what_cannot_be_exact_or_sensible() {
        for bad in [
            "-1",
            "-0.5",
            "\"-0.5\"",
            "0.0000000001",
            "\"0.0000000001\"",
            ".nan",
            ".inf",
            "abc",
            "\"1e-7\"",
            "\"\"",
            "~",
            "true",
            "[1]",
            "18446744073709551615",
        ] {
            assert!(input_price(bad).is_err(), "{bad} should be rejected");
        }
        // 16 significant digits: the f64 may already differ from the text, so ask for quotes.
        let refusal = input_price("1234567.123456789").expect_err("inexact");
        assert!(refusal.contains("quote it"), "{refusal}");
    }

    #[test]
    fn model_price_requires_input_and_output_and_knows_its_keys() {
        assert!(price_yaml("{ input: 1 }").is_err());
        assert!(price_yaml("{ output: 1 }").is_err());
        assert!(price_yaml("{ input: 1, output: 2, cache_reads: 0.1 }").is_err());
        let price = price_yaml("{ input: 1, output: 2, cache_read: ~, cache_write: 1.25 }")
            .expect("valid price");
        assert_eq!(price.cache_read, None);
        assert_eq!(price.cached_input, None);
        assert_eq!(price.cache_write, Some(1_250_000_000));
        assert_eq!(price.cache_write_1h, None);
    }

    // ---- USD text for caps and logs ----

    #[test]
    fn format_usd_keeps_six_to_nine_decimals() {
        assert_eq!(format_usd(0), "0.000000");
        assert_eq!(format_usd(1), "0.000000001");
        assert_eq!(format_usd(420_000), "0.000420");
        assert_eq!(format_usd(420_500), "0.0004205");
        assert_eq!(format_usd(1_500_000_000), "1.500000");
        assert_eq!(format_usd(1_234_567_891), "1.234567891");
        assert_eq!(format_usd(u64::MAX), "18446744073.709551615");
    }

    #[test]
    fn parse_usd_reads_caps_exactly() {
        assert_eq!(parse_usd("0.05"), Ok(50_000_000));
        assert_eq!(parse_usd(" 0.05 "), Ok(50_000_000));
        assert_eq!(parse_usd("12"), Ok(12_000_000_000));
        assert_eq!(parse_usd("0"), Ok(0));
        assert_eq!(parse_usd("007.5"), Ok(7_500_000_000));
        assert_eq!(parse_usd("0.000000001"), Ok(1));
        assert_eq!(parse_usd("18446744073.709551615"), Ok(u64::MAX));
    }

    #[test]
    fn parse_usd_rejects_bad_amounts() {
        let negative = PriceError::Negative("-0.05".into());
        assert_eq!(parse_usd("-0.05"), Err(negative));
        let too_precise = PriceError::TooPrecise("0.0000000001".into());
        assert_eq!(parse_usd("0.0000000001"), Err(too_precise));
        let overflow = PriceError::Overflow("18446744073.709551616".into());
        assert_eq!(parse_usd("18446744073.709551616"), Err(overflow));
        assert!(matches!(
            parse_usd("99999999999999999999"),
            Err(PriceError::Overflow(_))
        ));
        for garbage in [
            "", " ", "abc", "1.", ".5", "1.2.3", "+1", "1e-3", "0x10", "1,5", "$1", "1 USD", "١",
        ] {
            assert!(
                matches!(parse_usd(garbage), Err(PriceError::Invalid(_))),
                "{garbage:?} should be invalid"
            );
        }
    }

    #[test]
    fn format_and_parse_round_trip() {
        for nano in [
            0,
            1,
            999,
            420_000,
            50_000_000,
            1_234_567_891,
            10_u64.pow(18),
            u64::MAX,
        ] {
            assert_eq!(parse_usd(&format_usd(nano)), Ok(nano));
        }
        for (text, canonical) in [
            ("0", "0.000000"),
            ("0.05", "0.050000"),
            ("0.000000001", "0.000000001"),
            ("1.234567891", "1.234567891"),
            ("123.4567890", "123.456789"),
        ] {
            assert_eq!(parse_usd(text).map(format_usd).as_deref(), Ok(canonical));
        }
    }

    // ---- lookup ----

    #[test]
    fn lookup_normalises_snapshots_and_provider_prefixes() {
        let table = shipped_table();
        let gpt_4o = table.lookup("gpt-4o");
        assert!(gpt_4o.is_some());
        // Dated snapshot not in the table: -YYYY-MM-DD stripped.
        assert_eq!(table.lookup("gpt-4o-2024-11-20"), gpt_4o);
        // Anthropic -YYYYMMDD.
        let haiku = table.lookup("claude-haiku-4-5");
        assert!(haiku.is_some());
        assert_eq!(table.lookup("claude-haiku-4-5-20991231"), haiku);
        // Provider prefixes, alone and with a date.
        assert_eq!(table.lookup("openai/gpt-4o"), gpt_4o);
        assert_eq!(table.lookup("openrouter/openai/gpt-4o-2024-11-20"), gpt_4o);
        assert_eq!(table.lookup("anthropic/claude-haiku-4-5-20251001"), haiku);
    }

    #[test]
    fn lookup_prefers_an_exact_dated_row_over_its_alias() {
        let models = HashMap::from([
            (
                "gpt-x".to_owned(),
                simple_price(2_500_000_000, 10_000_000_000),
            ),
            (
                "gpt-x-2024-05-13".to_owned(),
                simple_price(5_000_000_000, 15_000_000_000),
            ),
            ("vendor/model".to_owned(), simple_price(7, 7)),
        ]);
        let table = PriceTable::new("test", models);
        assert_eq!(
            table.lookup("gpt-x-2024-05-13").map(|p| p.input),
            Some(5_000_000_000)
        );
        assert_eq!(
            table.lookup("gpt-x-2024-08-06").map(|p| p.input),
            Some(2_500_000_000)
        );
        // A slash that is part of the configured name still matches exactly, and a
        // router prefix in front of it is stripped.
        assert_eq!(table.lookup("vendor/model").map(|p| p.input), Some(7));
        assert_eq!(
            table.lookup("router/vendor/model").map(|p| p.input),
            Some(7)
        );
    }

    #[test]
    fn lookup_only_strips_real_looking_dates() {
        let table = shipped_table();
        for unknown in [
            "gpt-4o-0613",        // MMDD snapshots are not stripped
            "gpt-4o-20241399",    // month 13
            "gpt-4o-2024-00-10",  // month 0
            "gpt-4o-2024-1-10",   // not zero-padded
            "gpt-4o-mini-latest", // not a date
            "-20240101",          // nothing left after stripping
            "gpt-4o/",            // empty model after the prefix
            "",
            "GPT-4O", // names are case-sensitive
        ] {
            assert_eq!(table.lookup(unknown), None, "{unknown:?}");
        }
    }

    #[test]
    fn strip_date_suffix_handles_both_shapes() {
        assert_eq!(strip_date_suffix("gpt-4o-2024-08-06"), Some("gpt-4o"));
        assert_eq!(
            strip_date_suffix("claude-haiku-4-5-20251001"),
            Some("claude-haiku-4-5")
        );
        assert_eq!(strip_date_suffix("gpt-4o"), None);
        assert_eq!(strip_date_suffix("2024-08-06"), None);
        assert_eq!(strip_date_suffix("x-2024-08-32"), None);
    }

    // ---- the shipped table ----

    #[test]
    fn shipped_table_matches_the_reference_tsv_row_for_row() {
        let table = shipped_table();
        assert_eq!(table.version, "2026-11-23");
        let tsv = include_str!("../tests/fixtures/prices.tsv");
        let mut lines = tsv.lines();
        let header: Vec<&str> = lines.next().expect("header").split('\t').collect();
        let column = |name: &str| header.iter().position(|&h| h == name).expect(name);
        let mut rows = 0;
        for line in lines.filter(|line| !line.trim().is_empty()) {
            let cells: Vec<&str> = line.split('\t').collect();
            let cell = |name: &str| cells.get(column(name)).copied().unwrap_or("").trim();
            let optional = |name: &str| {
                Some(cell(name))
                    .filter(|text| !text.is_empty())
                    .map(|text| parse_usd(text).expect(text))
            };
            let model = cell("model");
            let expected = ModelPrice {
                input: parse_usd(cell("input_usd_per_mtok")).expect("input"),
                output: parse_usd(cell("output_usd_per_mtok")).expect("output"),
                cached_input: optional("cached_input_usd_per_mtok"),
                cache_read: optional("cache_read_usd_per_mtok"),
                cache_write: optional("cache_write_usd_per_mtok"),
                cache_write_1h: optional("cache_write_1h_usd_per_mtok"),
            };
            assert_eq!(table.models.get(model), Some(&expected), "{model}");
            rows += 1;
        }
        assert_eq!(table.len(), rows, "the YAML has models the TSV does not");
        assert_eq!(rows, 37);
    }

    #[test]
    fn price_table_rejects_unknown_top_level_keys() {
        let yaml = "version: \"v1\"\nmodels: {}\nmodel: {}\n";
        assert!(crate::config::parse_yaml::<PriceTable>(yaml, "t").is_err());
        let table = crate::config::parse_yaml::<PriceTable>("version: \"v1\"\nmodels: {}\n", "t")
            .expect("valid");
        assert!(table.is_empty());
        assert_eq!(table.version, "v1");
    }
}
