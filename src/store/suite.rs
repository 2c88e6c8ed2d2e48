//! One behaviour suite for every store implementation. Scopes get a per-run prefix so
//! runs can share a Redis.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::memory::Clock;
use super::*;

#[path = "../../tests/common/midnight.rs"]
mod midnight;
pub use midnight::clear_of_midnight;

static RUN: AtomicU64 = AtomicU64::new(0);

fn scope(name: &str) -> String {
    let pid = std::process::id();
    let n = RUN.fetch_add(1, Ordering::Relaxed);
    format!("test{pid}x{n}:{name}")
}

pub fn request(id: &str, scope: &str, cap: u64, fixed: u64) -> ReserveRequest {
    ReserveRequest {
        request_id: id.to_string(),
        scopes: vec![ScopeCheck {
            scope: scope.to_string(),
            budgets: vec![BudgetCheck {
                period: Period::Monthly,
                cap_nano: cap,
                enforcement: Enforcement::Block,
            }],
            ..ScopeCheck::default()
        }],
        fixed_nano: fixed,
        per_output_nano: 0,
        max_output_tokens: 0,
        min_output_tokens: 0,
        tokens: 1,
        requests: 1,
        lease_ms: 60_000,
    }
}

fn settlement(id: &str, scopes: &[&str], cost: u64) -> Settlement {
    Settlement {
        unused_steps: None,
        rpm_only: 0,
        request_id: id.to_string(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        cost_nano: cost,
        tokens: 1,
    }
}

fn admitted(d: &Result<Decision, StoreError>) -> bool {
    matches!(d, Ok(Decision::Admitted { .. }))
}

fn fixed_clock() -> Clock {
    Arc::new(|| 1_795_435_200_000)
}

/// Runs every behaviour test against stores made by `make`.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn(Clock) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    cap_admits_exactly_the_affordable_requests(make(fixed_clock()).await).await;
    all_or_nothing_across_scopes(make(fixed_clock()).await).await;
    settlement_releases_and_adds_actual_cost_once(make(fixed_clock()).await).await;
    clamp_lowers_output_to_what_fits(make(fixed_clock()).await).await;
    shadow_never_refuses_but_reports(make(fixed_clock()).await).await;
    rate_limits_refuse_with_a_retry(make(fixed_clock()).await).await;
    absurd_settled_tokens_keep_the_tpm_limit_shut(make(fixed_clock()).await).await;
    catalog_writes_bump_the_version_and_read_back(make(fixed_clock()).await).await;
}

async fn catalog_writes_bump_the_version_and_read_back(store: Arc<dyn Store>) {
    let id = scope("doc");
    let find = |docs: &crate::catalog::CatalogDocs| {
        docs.docs
            .iter()
            .find(|(k, i, _)| k == "team" && *i == id)
            .map(|(_, _, d)| d.clone())
    };
    let v0 = store.catalog_version().await.expect("version");
    assert!(store
        .catalog_write("team", &id, Some("{\"a\":1}"), false)
        .await
        .expect("write"));
    assert!(
        !store
            .catalog_write("team", &id, Some("{\"a\":2}"), true)
            .await
            .expect("write"),
        "only_if_absent keeps the first document"
    );
    let docs = store.catalog_load().await.expect("load");
    assert_eq!(find(&docs).as_deref(), Some("{\"a\":1}"));
    assert_eq!(docs.version, v0 + 1, "the refused write changed nothing");
    assert!(store
        .catalog_write("team", &id, None, false)
        .await
        .expect("delete"));
    assert!(!store
        .catalog_write("team", &id, None, false)
        .await
        .expect("delete"));
    let docs = store.catalog_load().await.expect("load");
    assert_eq!(find(&docs), None);
    assert_eq!(docs.version, v0 + 2);
}

async fn cap_admits_exactly_the_affordable_requests(store: Arc<dyn Store>) {
    let s = scope("cap");
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = store.clone();
            let req = request(&format!("r{i}"), &s, 1_000, 70);
            tokio::spawn(async move { admitted(&store.reserve(&req).await) })
        })
        .collect();
    let mut n = 0;
    for t in tasks {
        n += usize::from(t.await.unwrap_or(false));
    }
    assert_eq!(n, 14, "1000 / 70 = 14 affordable reservations");
    match store.reserve(&request("late", &s, 1_000, 70)).await {
        Ok(Decision::Refused(r)) => {
            assert_eq!(r.kind, LimitKind::Budget(Period::Monthly));
            assert_eq!(r.remaining, 20);
            assert!(r.retry_after_ms > 0, "retry at the next period");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn all_or_nothing_across_scopes(store: Arc<dyn Store>) {
    let (a, b) = (scope("a"), scope("b"));
    let mut req = request("both", &a, 1_000, 600);
    req.scopes.push(request("x", &b, 500, 0).scopes.remove(0));
    assert!(matches!(store.reserve(&req).await, Ok(Decision::Refused(ref r)) if r.scope == b));
    // Nothing was held in `a` by the refused request.
    assert!(admitted(
        &store.reserve(&request("a-only", &a, 1_000, 1_000)).await
    ));
}

async fn settlement_releases_and_adds_actual_cost_once(store: Arc<dyn Store>) {
    let s = scope("settle");
    assert!(admitted(
        &store.reserve(&request("r1", &s, 1_000, 800)).await
    ));
    assert!(!admitted(
        &store.reserve(&request("r2", &s, 1_000, 300)).await
    ));
    store
        .settle(&settlement("r1", &[&s], 100))
        .await
        .expect("settle");
    store
        .settle(&settlement("r1", &[&s], 100))
        .await
        .expect("settle again");
    assert_eq!(
        store.spent(&s, Period::Monthly).await.expect("spent"),
        100,
        "counted once"
    );
    assert!(admitted(
        &store.reserve(&request("r3", &s, 1_000, 900)).await
    ));
    assert!(
        !admitted(&store.reserve(&request("r4", &s, 1_000, 1)).await),
        "cap reached"
    );
}

async fn clamp_lowers_output_to_what_fits(store: Arc<dyn Store>) {
    let s = scope("clamp");
    let mut req = request("c1", &s, 1_000, 100);
    req.scopes[0].budgets[0].enforcement = Enforcement::Clamp;
    req.per_output_nano = 10;
    req.max_output_tokens = 200;
    req.min_output_tokens = 1;
    match store.reserve(&req).await {
        Ok(Decision::Admitted {
            output_tokens,
            reserved_nano,
            ..
        }) => {
            assert_eq!((output_tokens, reserved_nano), (90, 1_000));
        }
        other => panic!("expected a clamped admission, got {other:?}"),
    }
    req.request_id = "c2".into();
    assert!(
        !admitted(&store.reserve(&req).await),
        "nothing left, not even the minimum"
    );
}

async fn shadow_never_refuses_but_reports(store: Arc<dyn Store>) {
    let s = scope("shadow");
    let mut req = request("s1", &s, 100, 500);
    req.scopes[0].budgets[0].enforcement = Enforcement::Shadow;
    match store.reserve(&req).await {
        Ok(Decision::Admitted {
            shadow_refusals, ..
        }) => assert_eq!(shadow_refusals.len(), 1),
        other => panic!("expected admission, got {other:?}"),
    }
}

async fn rate_limits_refuse_with_a_retry(store: Arc<dyn Store>) {
    let s = scope("rpm");
    let with = |id: &str, f: &dyn Fn(&mut ScopeCheck)| {
        let mut r = request(id, &s, u64::MAX, 0);
        f(&mut r.scopes[0]);
        r
    };
    for i in 0..3 {
        assert!(admitted(
            &store
                .reserve(&with(&format!("p{i}"), &|c| c.rpm = Some(3)))
                .await
        ));
    }
    match store.reserve(&with("p3", &|c| c.rpm = Some(3))).await {
        Ok(Decision::Refused(r)) => {
            assert_eq!(r.kind, LimitKind::RequestsPerMinute);
            assert!(r.retry_after_ms > 0 && r.retry_after_ms <= 20_000, "{r:?}");
        }
        other => panic!("expected an rpm refusal, got {other:?}"),
    }

    let c = scope("conc");
    let conc = |id: &str| {
        let mut r = request(id, &c, u64::MAX, 0);
        r.scopes[0].concurrency = Some(2);
        r
    };
    assert!(admitted(&store.reserve(&conc("k1")).await));
    assert!(admitted(&store.reserve(&conc("k2")).await));
    assert!(
        matches!(store.reserve(&conc("k3")).await, Ok(Decision::Refused(ref r)) if r.kind == LimitKind::Concurrency)
    );
    store
        .settle(&settlement("k1", &[&c], 0))
        .await
        .expect("settle");
    assert!(
        admitted(&store.reserve(&conc("k4")).await),
        "a settled request frees its slot"
    );

    let t = scope("tpm");
    let tpm = |id: &str| {
        let mut r = request(id, &t, u64::MAX, 0);
        r.scopes[0].tpm = Some(1_000);
        r.tokens = 400;
        r
    };
    assert!(admitted(&store.reserve(&tpm("t1")).await));
    assert!(admitted(&store.reserve(&tpm("t2")).await));
    assert!(
        matches!(store.reserve(&tpm("t3")).await, Ok(Decision::Refused(ref r)) if r.kind == LimitKind::TokensPerMinute)
    );
}

/// A provider's token count is trusted for the TPM clock, but no count overflows it.
async fn absurd_settled_tokens_keep_the_tpm_limit_shut(store: Arc<dyn Store>) {
    let t = scope("tpm-absurd");
    let mut r = request("a1", &t, u64::MAX, 0);
    r.scopes[0].tpm = Some(1);
    assert!(admitted(&store.reserve(&r).await));
    let mut s = settlement("a1", &[&t], 0);
    s.tokens = u64::MAX / 2;
    store.settle(&s).await.expect("settle");
    r.request_id = "a2".into();
    match store.reserve(&r).await {
        Ok(Decision::Refused(x)) => {
            assert_eq!(x.kind, LimitKind::TokensPerMinute);
            assert!(x.retry_after_ms > 365 * 86_400_000, "{x:?}");
        }
        other => panic!("expected a tpm refusal, got {other:?}"),
    }
}
