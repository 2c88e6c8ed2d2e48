//! The usage API's queries: parsed from the URL, answered from the ledger's daily
//! rollups (never from raw records), rendered as JSON or CSV.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::ledger::{DaySource, Dims, Totals};
use crate::pricing::format_usd;
use crate::store::{civil_from_days, days_from_civil};

/// Longest date range a query may span.
pub const MAX_RANGE_DAYS: u64 = 3_660;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Customer,
    Feature,
    Model,
    Provider,
    Team,
    Key,
    PromptKey,
    Version,
    Tag,
    Day,
    Month,
}

impl GroupBy {
    fn parse(s: &str) -> Option<GroupBy> {
        Some(match s {
            "customer" => GroupBy::Customer,
            "feature" => GroupBy::Feature,
            "model" => GroupBy::Model,
            "provider" => GroupBy::Provider,
            "team" => GroupBy::Team,
            "key" => GroupBy::Key,
            "prompt_key" | "prompt" => GroupBy::PromptKey,
            "version" => GroupBy::Version,
            "tag" => GroupBy::Tag,
            "day" => GroupBy::Day,
            "month" => GroupBy::Month,
            _ => return None,
        })
    }

    /// The group keys a row falls in (a row with several tags is in each tag's group).
    fn keys(self, day: u64, d: &Dims) -> Vec<String> {
        let opt = |v: &Option<String>| vec![v.clone().unwrap_or_else(|| "(none)".into())];
        match self {
            GroupBy::Customer => opt(&d.customer),
            GroupBy::Feature => opt(&d.feature),
            GroupBy::Model => vec![d.model.clone()],
            GroupBy::Provider => vec![d.provider.clone()],
            GroupBy::Team => opt(&d.team),
            GroupBy::Key => opt(&d.key_id),
            GroupBy::PromptKey => opt(&d.prompt_key),
            GroupBy::Version => opt(&d.prompt_version),
            GroupBy::Tag if d.tags.is_empty() => vec!["(none)".into()],
            GroupBy::Tag => d.tags.clone(),
            GroupBy::Day => vec![format_day(day)],
            GroupBy::Month => vec![format_day(day)[..7].to_string()],
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct Filters {
    pub customer: Option<String>,
    pub feature: Option<String>,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub team: Option<String>,
    pub key: Option<String>,
    pub prompt_key: Option<String>,
    pub version: Option<String>,
    pub tag: Option<String>,
}

impl Filters {
    fn matches(&self, d: &Dims) -> bool {
        let eq = |want: &Option<String>, have: Option<&String>| {
            want.as_ref().is_none_or(|w| have == Some(w))
        };
        eq(&self.customer, d.customer.as_ref())
            && eq(&self.feature, d.feature.as_ref())
            && eq(&self.model, Some(&d.model))
            && eq(&self.provider, Some(&d.provider))
            && eq(&self.team, d.team.as_ref())
            && eq(&self.key, d.key_id.as_ref())
            && eq(&self.prompt_key, d.prompt_key.as_ref())
            && eq(&self.version, d.prompt_version.as_ref())
            && self.tag.as_ref().is_none_or(|t| d.tags.contains(t))
    }
}

#[derive(Debug, Clone)]
pub struct Query {
    pub filters: Filters,
    pub start_day: u64,
    pub end_day: u64,
    pub group_by: Option<GroupBy>,
    pub csv: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct QueryError {
    pub field: String,
    pub reason: String,
}

fn bad(field: &str, reason: impl Into<String>) -> QueryError {
    QueryError {
        field: field.into(),
        reason: reason.into(),
    }
}

pub fn format_day(day: u64) -> String {
    let (y, m, d) = civil_from_days(day as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM-DD` (a longer ISO timestamp is cut to its date) → day number.
pub fn parse_day(s: &str) -> Option<u64> {
    let date = s.get(..10)?;
    let mut parts = date.split('-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: u32 = parts.next()?.parse().ok()?;
    let d: u32 = parts.next()?.parse().ok()?;
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let day = days_from_civil(y, m, d);
    // Reject dates like 02-30 that roll into the next month.
    (civil_from_days(day) == (y, m, d)).then_some(day as u64)
}

/// Decodes `a=b&c=d%20e` into pairs.
pub fn query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Query {
    /// Parses the URL query of `/v1/usage`. `today` is the current day number.
    pub fn parse(q: &str, today: u64) -> Result<Query, QueryError> {
        let mut f = Filters::default();
        let (mut start, mut end, mut group_by, mut csv) = (None, None, None, false);
        for (k, v) in query_pairs(q) {
            let slot = match k.as_str() {
                "customer" => &mut f.customer,
                "feature" => &mut f.feature,
                "model" => &mut f.model,
                "provider" => &mut f.provider,
                "team" => &mut f.team,
                "key" => &mut f.key,
                "prompt_key" => &mut f.prompt_key,
                "version" => &mut f.version,
                "tag" => &mut f.tag,
                "start" => {
                    start = Some(parse_day(&v).ok_or_else(|| {
                        bad("start", format!("{v:?} is not a date (YYYY-MM-DD)"))
                    })?);
                    continue;
                }
                "end" => {
                    end =
                        Some(parse_day(&v).ok_or_else(|| {
                            bad("end", format!("{v:?} is not a date (YYYY-MM-DD)"))
                        })?);
                    continue;
                }
                "group_by" => {
                    group_by = Some(GroupBy::parse(&v).ok_or_else(|| {
                        bad("group_by", format!("{v:?} is not one of customer, feature, model, provider, team, key, prompt_key, version, tag, day, month"))
                    })?);
                    continue;
                }
                "format" => {
                    csv = match v.as_str() {
                        "csv" => true,
                        "json" => false,
                        _ => return Err(bad("format", "json or csv")),
                    };
                    continue;
                }
                _ => return Err(bad(&k, "unknown parameter")),
            };
            *slot = Some(v);
        }
        let (y, m, _) = civil_from_days(today as i64);
        let start_day = start.unwrap_or(days_from_civil(y, m, 1) as u64);
        let end_day = end.unwrap_or(today);
        if start_day > end_day {
            return Err(bad("start", "after end"));
        }
        if end_day - start_day >= MAX_RANGE_DAYS {
            return Err(bad(
                "end",
                format!("the range may span at most {MAX_RANGE_DAYS} days"),
            ));
        }
        Ok(Query {
            filters: f,
            start_day,
            end_day,
            group_by,
            csv,
        })
    }
}

/// Totals and per-group totals of a query.
pub struct Answer {
    pub total: Totals,
    pub groups: BTreeMap<String, Totals>,
    pub by: BTreeMap<&'static str, BTreeMap<String, Totals>>,
}

const BREAKDOWNS: [(&str, GroupBy); 4] = [
    ("by_model", GroupBy::Model),
    ("by_feature", GroupBy::Feature),
    ("by_customer", GroupBy::Customer),
    ("by_provider", GroupBy::Provider),
];

pub fn answer(ledger: &impl DaySource, q: &Query) -> Answer {
    let mut a = Answer {
        total: Totals::default(),
        groups: BTreeMap::new(),
        by: BTreeMap::new(),
    };
    ledger.with_days(q.start_day, q.end_day, |days| {
        for (day, rows) in days {
            for (dims, t) in rows.iter().filter(|(d, _)| q.filters.matches(d)) {
                a.total.add(t);
                if let Some(g) = q.group_by {
                    for key in g.keys(day, dims) {
                        a.groups.entry(key).or_default().add(t);
                    }
                }
                for (name, g) in BREAKDOWNS {
                    for key in g.keys(day, dims) {
                        a.by.entry(name).or_default().entry(key).or_default().add(t);
                    }
                }
            }
        }
    });
    a
}

fn totals_json(t: &Totals) -> Value {
    json!({
        "cost": format_usd(t.cost_nano),
        "cost_nano": t.cost_nano,
        "requests": t.requests,
        "tokens_in": t.tokens_in(),
        "tokens_out": t.output_tokens,
        "errors": t.errors,
        "estimated": t.estimated,
        "avg_cost_per_request": format_usd(t.cost_nano.checked_div(t.requests).unwrap_or(0)),
    })
}

fn breakdown_json(m: &BTreeMap<String, Totals>) -> Value {
    Value::Array(
        m.iter()
            .map(|(k, t)| {
                let mut v = totals_json(t);
                v["key"] = json!(k);
                v
            })
            .collect(),
    )
}

pub fn to_json(q: &Query, a: &Answer) -> Value {
    let t = &a.total;
    let mut v = json!({
        "start": format_day(q.start_day),
        "end": format_day(q.end_day),
        "total_cost": format_usd(t.cost_nano),
        "total_cost_nano": t.cost_nano,
        "total_requests": t.requests,
        "tokens": {
            "input": t.input_tokens,
            "cache_read": t.cache_read_tokens,
            "cache_write": t.cache_write_tokens,
            "cache_write_1h": t.cache_write_1h_tokens,
            "output": t.output_tokens,
            "reasoning": t.reasoning_tokens,
            "total_in": t.tokens_in(),
        },
        "errors": t.errors,
        "estimated": t.estimated,
    });
    for (name, m) in &a.by {
        v[*name] = breakdown_json(m);
    }
    for (name, _) in BREAKDOWNS {
        if v.get(name).is_none() {
            v[name] = json!([]);
        }
    }
    if q.group_by.is_some() {
        v["groups"] = breakdown_json(&a.groups);
    }
    v
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// CSV with a header line; one row per group (per day when no `group_by`).
pub fn to_csv(q: &Query, ledger: &impl DaySource) -> String {
    let mut q = q.clone();
    let group = q.group_by.get_or_insert(GroupBy::Day);
    let name = format!("{group:?}").to_lowercase();
    let a = answer(ledger, &q);
    let mut out =
        format!("{name},requests,cost_usd,cost_nano_usd,tokens_in,tokens_out,errors,estimated\n");
    for (k, t) in &a.groups {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{}\n",
            csv_field(k),
            t.requests,
            format_usd(t.cost_nano),
            t.cost_nano,
            t.tokens_in(),
            t.output_tokens,
            t.errors,
            t.estimated
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TODAY: u64 = 20_780; // 2026-11-23

    #[test]
    fn parses_filters_dates_and_group_by() {
        let q = Query::parse("customer=acme%20corp&start=2026-11-01&end=2026-11-23T10:00:00Z&group_by=day&format=csv", TODAY)
            .expect("valid");
        assert_eq!(q.filters.customer.as_deref(), Some("acme corp"));
        assert_eq!(
            (format_day(q.start_day), format_day(q.end_day)),
            ("2026-11-01".into(), "2026-11-23".into())
        );
        assert_eq!(q.group_by, Some(GroupBy::Day));
        assert!(q.csv);
        let q = Query::parse("", TODAY).expect("defaults");
        assert_eq!(
            format_day(q.start_day),
            "2026-11-01",
            "month to date by default"
        );
    }

    #[test]
    fn bad_queries_name_the_field() {
        let field = |q: &str| Query::parse(q, TODAY).map(|_| ()).map_err(|e| e.field);
        assert_eq!(field("start=yesterday"), Err("start".into()));
        assert_eq!(field("start=2026-02-30"), Err("start".into()));
        assert_eq!(field("group_by=colour"), Err("group_by".into()));
        assert_eq!(
            field("start=2026-11-05&end=2026-11-01"),
            Err("start".into())
        );
        assert_eq!(field("start=1990-01-01&end=2026-01-01"), Err("end".into()));
        assert_eq!(field("format=xml"), Err("format".into()));
        assert_eq!(field("colour=red"), Err("colour".into()));
    }

    #[test]
    fn csv_quotes_what_needs_quoting() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }

    #[test]
    fn percent_decoding_is_total() {
        assert_eq!(percent_decode("a%2Cb+c%"), "a,b c%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
