//! Budget admission and settlement in the embedded store (`MemoryStore::ephemeral`: the
//! same ledger as the gateway's, without the journal file). One request as the benchmark
//! gateway configures it: three scopes (customer, team, key), a daily budget on each and a
//! requests-per-minute limit on the key. `cargo bench --bench store`.
//!
//! Settlement is exactly once per request id, so the store remembers settled ids for 24
//! hours; the cost of a settlement is measured at several sizes of that memory.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tollgate::store::memory::{system_clock, Clock, MemoryStore};
use tollgate::store::{
    BudgetCheck, Decision, Enforcement, Period, ReserveRequest, ScopeCheck, Settlement, Store,
};

fn scope(name: &str, rpm: Option<u64>) -> ScopeCheck {
    ScopeCheck {
        scope: name.to_string(),
        budgets: vec![BudgetCheck {
            period: Period::Daily,
            cap_nano: 1_000_000 * 1_000_000_000,
            enforcement: Enforcement::Block,
        }],
        rpm,
        ..ScopeCheck::default()
    }
}

fn request(id: String) -> ReserveRequest {
    ReserveRequest {
        request_id: id,
        scopes: vec![
            scope("customer:bench-customer", None),
            scope("team:bench", None),
            scope("key:bench", Some(1_000_000_000)),
        ],
        fixed_nano: 2_850,
        per_output_nano: 600,
        max_output_tokens: 128,
        min_output_tokens: 1,
        tokens: 147,
        requests: 1,
        lease_ms: 600_000,
    }
}

/// A clock that moves `step_ms` forward on every reading. The store remembers settled
/// request ids for 24 hours, so with two readings per request it holds about
/// `24 h / (2 × step)` of them: the steady state of a gateway serving that many requests
/// a day.
fn stepping_clock(remembered: u64) -> Clock {
    let step = 86_400_000 / (2 * remembered.max(1));
    let now = Arc::new(AtomicU64::new(1_795_435_200_000));
    Arc::new(move || now.fetch_add(step, Ordering::Relaxed))
}

fn settle_of(req: ReserveRequest) -> Settlement {
    Settlement {
        unused_steps: None,
        rpm_only: 0,
        request_id: req.request_id,
        scopes: req.scopes.into_iter().map(|s| s.scope).collect(),
        cost_nano: 62_850,
        tokens: 119,
    }
}

fn store(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("memory_store/reserve_then_settle");
    let mut next_id = 0u64;
    for remembered in [1u64, 1_000, 10_000, 100_000] {
        let store = MemoryStore::ephemeral(stepping_clock(remembered));
        let one = |store: &MemoryStore, next_id: &mut u64| {
            *next_id += 1;
            let req = request(format!("tg-bench-{next_id}"));
            runtime.block_on(async {
                let decision = store.reserve(&req).await.expect("reserve");
                assert!(matches!(decision, Decision::Admitted { .. }));
                store
                    .settle(black_box(&settle_of(req)))
                    .await
                    .expect("settle");
            })
        };
        // Reach the steady state before measuring.
        for _ in 0..remembered {
            one(&store, &mut next_id);
        }
        group.bench_function(BenchmarkId::new("settled_ids", remembered), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    one(&store, &mut next_id);
                }
                start.elapsed()
            })
        });
    }
    group.finish();
    let mut group = c.benchmark_group("memory_store");
    let refusing = MemoryStore::ephemeral(system_clock());
    group.bench_function("reserve_refused", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    next_id += 1;
                    let mut req = request(format!("tg-bench-{next_id}"));
                    req.scopes[0].budgets[0].cap_nano = 0;
                    let decision = refusing.reserve(black_box(&req)).await.expect("reserve");
                    assert!(matches!(decision, Decision::Refused(_)));
                }
                start.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20)
        .measurement_time(Duration::from_secs(2));
    targets = store
}
criterion_main!(benches);
