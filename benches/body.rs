//! Request bodies: reading the top-level members and rewriting what Tollgate changes
//! (`_tollgate` metadata stripped, `include_usage` added), on a 1 MiB prompt and on a
//! typical small chat request. `cargo bench --bench body`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tollgate::body::{Edits, RequestBody};

/// A chat request of about `prompt_bytes`, the `_tollgate` member last (the parser must
/// walk the whole prompt to find it). The prompt has escapes and non-ASCII text.
fn chat_body(prompt_bytes: usize) -> Vec<u8> {
    let line = "Summarise the \\\"quarterly\\\" report: revenue €1.2M, costs ↑ 3%.\\n";
    let prompt = line.repeat(prompt_bytes / line.len() + 1);
    format!(
        r#"{{"model":"gpt-4o","messages":[{{"role":"system","content":"You are terse."}},{{"role":"user","content":"{prompt}"}}],"max_tokens":512,"temperature":0.2,"stream":true,"_tollgate":{{"customer":"acme","feature":"search","prompt_key":"summary","version":"v3","tags":["batch","eu"]}}}}"#
    )
    .into_bytes()
}

fn edits() -> Edits {
    Edits {
        strip_metadata: true,
        include_usage: true,
        ..Edits::default()
    }
}

fn bodies(c: &mut Criterion) {
    for (label, body) in [("1MiB", chat_body(1 << 20)), ("small", chat_body(200))] {
        let mut group = c.benchmark_group(format!("body/{label}"));
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function("parse", |b| {
            b.iter(|| {
                let parsed = RequestBody::parse(black_box(&body)).expect("valid body");
                black_box((
                    parsed.model().ok().flatten().map(|m| m.len()),
                    parsed.stream(),
                ))
            })
        });
        group.bench_function("parse_metadata_rewrite", |b| {
            let edits = edits();
            b.iter(|| {
                let parsed = RequestBody::parse(black_box(&body)).expect("valid body");
                let meta = parsed.tollgate_metadata().expect("metadata");
                let out = parsed.rewrite(&edits);
                black_box((meta, out.len()))
            })
        });
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bodies
}
criterion_main!(benches);
