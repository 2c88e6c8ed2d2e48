//! The stream tap: SSE parsing and usage metering, bytes in, MB/s out.
//!
//! Input: a recorded stream from `tests/fixtures`, repeated back to back to about 1 MiB,
//! pushed in chunks of 1 byte (worst case), 64 bytes (about one small event per read) and
//! 4 KiB (a loaded connection's reads). `cargo bench --bench sse`.
//!
//! Also a non-streaming body's usage and served model (`json_usage`, one serde pass): a
//! recorded chat body and one with a 64 KiB completion.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tollgate::api::Endpoint;
use tollgate::sse::SseParser;
use tollgate::usage::{from_json_body_with_model, Forward, StreamMeter};

const TARGET_BYTES: usize = 1 << 20;
const CHUNKS: [usize; 3] = [1, 64, 4096];

fn fixture_stream(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let one = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut all = Vec::with_capacity(TARGET_BYTES + one.len());
    while all.len() < TARGET_BYTES {
        all.extend_from_slice(&one);
    }
    all
}

fn parser(c: &mut Criterion) {
    let stream = fixture_stream("openai-chat-stream-include-usage.sse");
    let mut group = c.benchmark_group("sse_parser/openai-chat");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    for chunk in CHUNKS {
        group.bench_with_input(BenchmarkId::from_parameter(chunk), &chunk, |b, &chunk| {
            b.iter(|| {
                let mut p = SseParser::new();
                let mut events = 0usize;
                for piece in stream.chunks(chunk) {
                    p.push(black_box(piece), |e| events += e.data.len().min(1));
                }
                black_box(events)
            })
        });
    }
    group.finish();
}

fn meter(c: &mut Criterion) {
    let cases = [
        (
            "openai-chat",
            "openai-chat-stream-include-usage.sse",
            Endpoint::ChatCompletions,
            false,
        ),
        // What Tollgate does when it added include_usage itself: hold back partial events
        // and remove the usage-only chunk.
        (
            "openai-chat-strip",
            "openai-chat-stream-include-usage.sse",
            Endpoint::ChatCompletions,
            true,
        ),
        (
            "anthropic",
            "anthropic-messages-stream.sse",
            Endpoint::Messages,
            false,
        ),
        (
            "openai-responses",
            "openai-responses-stream-reasoning.sse",
            Endpoint::Responses,
            false,
        ),
    ];
    for (label, file, endpoint, strip) in cases {
        let stream = fixture_stream(file);
        let mut group = c.benchmark_group(format!("stream_meter/{label}"));
        group.throughput(Throughput::Bytes(stream.len() as u64));
        for chunk in CHUNKS {
            group.bench_with_input(BenchmarkId::from_parameter(chunk), &chunk, |b, &chunk| {
                b.iter(|| {
                    let mut m = StreamMeter::new(endpoint, strip);
                    let mut forwarded = 0usize;
                    for piece in stream.chunks(chunk) {
                        forwarded += match m.push(black_box(piece)) {
                            Forward::AsIs => piece.len(),
                            Forward::Replace(bytes) => bytes.len(),
                        };
                    }
                    forwarded += m.finish().len();
                    black_box((forwarded, m.usage()))
                })
            });
        }
        group.finish();
    }
}

fn json_usage(c: &mut Criterion) {
    let path = format!(
        "{}/tests/fixtures/openai-chat-nonstream.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let recorded = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let line = "The quarterly report shows \\\"steady\\\" growth: revenue €1.2M, costs ↑ 3%.\\n";
    let long = format!(
        r#"{{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-2024-08-06","choices":[{{"index":0,"message":{{"role":"assistant","content":"{}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":40,"completion_tokens":16000,"total_tokens":16040}}}}"#,
        line.repeat(65_536 / line.len())
    )
    .into_bytes();
    for (label, body) in [("recorded", recorded), ("64KiB", long)] {
        let mut group = c.benchmark_group(format!("json_usage/{label}"));
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function("usage_and_model", |b| {
            b.iter(|| from_json_body_with_model(Endpoint::ChatCompletions, black_box(&body)))
        });
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = parser, meter, json_usage
}
criterion_main!(benches);
