//! Pricing: exact integer cost of one response, price lookup and the USD rendering used
//! in headers. `cargo bench --bench pricing`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tollgate::pricing::{cost_nano_usd, format_usd, PriceTable};
use tollgate::usage::Usage;

fn table() -> PriceTable {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/prices.yaml");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    tollgate::config::parse_yaml(&text, path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn pricing(c: &mut Criterion) {
    let prices = table();
    let sonnet = prices
        .lookup("claude-sonnet-4-5")
        .expect("claude-sonnet-4-5 is priced")
        .clone();
    let usage = Usage {
        input_tokens: 1_420,
        cache_read_tokens: 12_000,
        cache_write_tokens: 2_048,
        cache_write_1h_tokens: 1_024,
        output_tokens: 850,
        reasoning_tokens: 300,
    };
    let mut group = c.benchmark_group("pricing");
    group.bench_function("cost_nano_usd", |b| {
        b.iter(|| cost_nano_usd(black_box(&sonnet), black_box(&usage)))
    });
    group.bench_function("lookup_exact", |b| {
        b.iter(|| prices.lookup(black_box("gpt-4o-mini")).is_some())
    });
    group.bench_function("lookup_dated_prefixed", |b| {
        b.iter(|| {
            prices
                .lookup(black_box("openai/gpt-4o-2024-08-06"))
                .is_some()
        })
    });
    group.bench_function("cost_and_format_usd", |b| {
        b.iter(|| format_usd(cost_nano_usd(black_box(&sonnet), black_box(&usage))))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = pricing
}
criterion_main!(benches);
