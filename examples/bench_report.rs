//! `bench_report`: turns `bench_load run` results into tables, ratios and target verdicts.
//!
//! ```text
//! bench_report runs RESULTS.jsonl [--meta META.json] [--criterion DIR] [--json OUT.json]
//! bench_report criterion DIR
//! ```
//!
//! `runs` prints Markdown: one table per scenario (medians over repetitions, with the
//! min–max spread), the ratios of every target to the bare proxy (`bare-A`) and to the
//! mock hit directly (`mock`), paired within each repetition, and the verdict on each
//! performance target. `criterion` lists Criterion's results (median time and throughput).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

fn usage() -> ! {
    eprintln!(
        "usage:
  bench_report runs RESULTS.jsonl [--meta META.json] [--criterion DIR] [--json OUT.json]
  bench_report criterion DIR"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("runs") if args.len() >= 2 => runs(&args[1..]),
        Some("criterion") if args.len() == 2 => {
            let results = criterion_results(Path::new(&args[1]));
            print!("{}", criterion_table(&results));
        }
        _ => usage(),
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

/// Median with the smallest and largest value.
#[derive(Clone, Copy, Debug)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

fn spread(mut values: Vec<f64>) -> Option<Spread> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: values[0],
        max: values[n - 1],
        n,
    })
}

impl Spread {
    fn json(&self) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max, "n": self.n})
    }
}

fn fmt_time_us(us: f64) -> String {
    if us < 10.0 {
        format!("{us:.2} µs")
    } else if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

fn fmt_num(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn fmt_spread(s: Option<Spread>, f: impl Fn(f64) -> String) -> String {
    match s {
        None => "–".into(),
        Some(s) if s.n == 1 => f(s.median),
        Some(s) => format!("{} ({}–{})", f(s.median), f(s.min), f(s.max)),
    }
}

fn fmt_ratio(s: Option<Spread>) -> String {
    fmt_spread(s, |x| format!("{x:.2}×"))
}

fn fmt_delta(s: Option<Spread>) -> String {
    fmt_spread(s, |x| format!("{x:+.0} µs"))
}

// ---------------------------------------------------------------------------------------------
// Runs
// ---------------------------------------------------------------------------------------------

const TARGET_ORDER: [&str; 7] = [
    "mock",
    "bare-A",
    "bare-B",
    "tollgate-memory",
    "tollgate-redis",
    "tollgate-sliced",
    "litellm",
];
const BARE: &str = "bare-A";
const MOCK: &str = "mock";

fn describe_target(t: &str) -> &str {
    match t {
        "mock" => "mock, direct",
        "bare-A" => "bare proxy A",
        "bare-B" => "bare proxy B (A/A)",
        "tollgate-memory" => "Tollgate, embedded store",
        "tollgate-redis" => "Tollgate, Redis store",
        "tollgate-sliced" => "Tollgate, Redis store, budget slices",
        "litellm" => "LiteLLM proxy",
        other => other,
    }
}

struct Runs {
    all: Vec<Value>,
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_f64()
}

impl Runs {
    fn scenarios(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in &self.all {
            let s = r["scenario"].as_str().unwrap_or_default().to_string();
            if !out.contains(&s) {
                out.push(s);
            }
        }
        out
    }

    fn targets(&self, scenario: &str) -> Vec<String> {
        let mut present: Vec<String> = Vec::new();
        for r in self.of(scenario, None) {
            let t = r["label"].as_str().unwrap_or_default().to_string();
            if !present.contains(&t) {
                present.push(t);
            }
        }
        let rank = |t: &String| {
            TARGET_ORDER
                .iter()
                .position(|x| x == t)
                .unwrap_or(TARGET_ORDER.len())
        };
        present.sort_by_key(|t| (rank(t), t.clone()));
        present
    }

    fn of<'a>(
        &'a self,
        scenario: &'a str,
        target: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Value> {
        self.all
            .iter()
            .filter(move |r| r["scenario"] == scenario && target.is_none_or(|t| r["label"] == t))
    }

    fn metric(
        &self,
        scenario: &str,
        target: &str,
        f: impl Fn(&Value) -> Option<f64>,
    ) -> Option<Spread> {
        spread(self.of(scenario, Some(target)).filter_map(f).collect())
    }

    fn max_metric(
        &self,
        scenario: &str,
        target: &str,
        f: impl Fn(&Value) -> Option<f64>,
    ) -> Option<f64> {
        self.of(scenario, Some(target))
            .filter_map(f)
            .fold(None, |m, x| Some(m.map_or(x, |m: f64| m.max(x))))
    }

    /// `f(target_run, reference_run)` for every repetition that has both, summarised.
    fn paired(
        &self,
        scenario: &str,
        target: &str,
        reference: &str,
        f: impl Fn(&Value, &Value) -> Option<f64>,
    ) -> Option<Spread> {
        let values = self
            .of(scenario, Some(target))
            .filter_map(|t| {
                let r = self
                    .of(scenario, Some(reference))
                    .find(|r| r["rep"] == t["rep"])?;
                f(t, r)
            })
            .collect();
        spread(values)
    }
}

fn gateway_cpu(r: &Value) -> Option<f64> {
    num(r, &["procs", "gateway", "cpu_us_per_req"]).filter(|x| *x > 0.0)
}

fn redis_cpu(r: &Value) -> Option<f64> {
    num(r, &["procs", "redis", "cpu_us_per_req"])
}

fn gateway_plus_redis_cpu(r: &Value) -> Option<f64> {
    Some(gateway_cpu(r)? + redis_cpu(r).unwrap_or(0.0))
}

fn throughput(r: &Value) -> Option<f64> {
    num(r, &["throughput"]).filter(|x| *x > 0.0)
}

fn p50(r: &Value) -> Option<f64> {
    num(r, &["latency_us", "p50"])
}

/// Requests per CPU-second of the target relative to the reference (higher is better).
fn per_core_ratio(t: &Value, r: &Value) -> Option<f64> {
    Some(gateway_cpu(r)? / gateway_cpu(t)?)
}

fn describe_scenario(runs: &Runs, scenario: &str) -> String {
    let Some(r) = runs.of(scenario, None).next() else {
        return String::new();
    };
    let kind = if r["stream"].as_bool().unwrap_or(false) {
        "streaming"
    } else {
        "non-streaming"
    };
    let conns = r["connections"].as_u64().unwrap_or(0);
    let rate = r["rate"].as_f64().unwrap_or(0.0);
    let load = if rate > 0.0 {
        format!("paced at {rate:.0} req/s over {conns} connections")
    } else {
        format!("{conns} connections, closed loop")
    };
    let reps = runs
        .of(scenario, None)
        .filter_map(|r| r["rep"].as_u64())
        .max()
        .unwrap_or(0);
    format!(
        "{kind}, {load}; {} s measured after {} s warm-up, {reps} repetitions",
        r["duration_s"], r["warmup_s"]
    )
}

fn scenario_tables(
    runs: &Runs,
    scenario: &str,
    out: &mut String,
    summary: &mut serde_json::Map<String, Value>,
) {
    let targets = runs.targets(scenario);
    out.push_str(&format!(
        "### {scenario}\n\n{}\n\n",
        describe_scenario(runs, scenario)
    ));
    out.push_str("| target | req/s | P50 | P99 | P99.9 | P99 TTFB | gateway CPU/req | req per core-s | peak RSS | store CPU/req | in flight | other load |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let mut scen = serde_json::Map::new();
    for t in &targets {
        let tp = runs.metric(scenario, t, throughput);
        let lat = |q: &'static str| runs.metric(scenario, t, move |r| num(r, &["latency_us", q]));
        let ttfb99 = runs.metric(scenario, t, |r| num(r, &["ttfb_us", "p99"]));
        let cpu = runs.metric(scenario, t, gateway_cpu);
        let per_core = runs.metric(scenario, t, |r| gateway_cpu(r).map(|c| 1e6 / c));
        let hwm = runs.max_metric(scenario, t, |r| num(r, &["procs", "gateway", "hwm_kib"]));
        let store_cpu = runs.metric(scenario, t, redis_cpu);
        let in_flight = runs.metric(scenario, t, |r| num(r, &["in_flight", "mean"]));
        let other = runs.metric(scenario, t, |r| {
            Some(num(r, &["other_cpu_s"])? / num(r, &["duration_s"])?)
        });
        let failures: f64 = runs
            .of(scenario, Some(t))
            .map(|r| {
                num(r, &["errors"]).unwrap_or(0.0)
                    + num(r, &["incomplete"]).unwrap_or(0.0)
                    + r["statuses"]
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .filter(|(k, _)| !k.starts_with('2'))
                                .filter_map(|(_, v)| v.as_f64())
                                .sum::<f64>()
                        })
                        .unwrap_or(0.0)
            })
            .sum();
        let completed: f64 = runs
            .of(scenario, Some(t))
            .filter_map(|r| num(r, &["ok"]))
            .sum();
        let name = if completed == 0.0 {
            format!(
                "{} ⚠ no response completed within the window",
                describe_target(t)
            )
        } else if failures > 0.0 {
            format!("{} ⚠ {failures:.0} failed", describe_target(t))
        } else {
            describe_target(t).to_string()
        };
        out.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            fmt_spread(tp, fmt_num),
            fmt_spread(lat("p50"), fmt_time_us),
            fmt_spread(lat("p99"), fmt_time_us),
            fmt_spread(lat("p999"), fmt_time_us),
            fmt_spread(ttfb99, fmt_time_us),
            fmt_spread(cpu, fmt_time_us),
            fmt_spread(per_core, fmt_num),
            hwm.map_or("–".into(), |k| format!("{:.1} MiB", k / 1024.0)),
            fmt_spread(store_cpu, fmt_time_us),
            fmt_spread(in_flight, |x| format!("{x:.0}")),
            fmt_spread(other, |x| format!("{x:.2} CPU")),
        ));
        let js = |s: Option<Spread>| s.map_or(Value::Null, |s| s.json());
        scen.insert(
            t.clone(),
            json!({
                "throughput": js(tp),
                "p50_us": js(lat("p50")),
                "p99_us": js(lat("p99")),
                "p999_us": js(lat("p999")),
                "ttfb_p99_us": js(ttfb99),
                "gateway_cpu_us_per_req": js(cpu),
                "req_per_core_s": js(per_core),
                "peak_rss_kib": hwm,
                "redis_cpu_us_per_req": js(store_cpu),
                "in_flight_mean": js(in_flight),
                "other_load_cpus": js(other),
                "irq_cpus": js(runs.metric(scenario, t, |r| {
                    Some(num(r, &["irq_cpu_s"])? / num(r, &["duration_s"])?)
                })),
                "failures": failures,
                "ratio_vs_bare": {
                    "per_core": js(runs.paired(scenario, t, BARE, per_core_ratio)),
                    "throughput": js(runs.paired(scenario, t, BARE, |a, b| Some(throughput(a)? / throughput(b)?))),
                    "p50_added_us": js(runs.paired(scenario, t, BARE, |a, b| Some(p50(a)? - p50(b)?))),
                },
                "ratio_vs_mock": {
                    "throughput": js(runs.paired(scenario, t, MOCK, |a, b| Some(throughput(a)? / throughput(b)?))),
                    "p50_added_us": js(runs.paired(scenario, t, MOCK, |a, b| Some(p50(a)? - p50(b)?))),
                },
            }),
        );
    }
    out.push('\n');
    let compared: Vec<&String> = targets
        .iter()
        .filter(|t| *t != MOCK && *t != BARE)
        .collect();
    if !compared.is_empty() && targets.iter().any(|t| t == BARE) {
        out.push_str("| ratios (paired per repetition) | req per core-s vs bare | req/s vs bare | req/s vs direct | added P50 vs bare | added P50 vs direct |\n");
        out.push_str("|---|---|---|---|---|---|\n");
        for t in compared {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                describe_target(t),
                fmt_ratio(runs.paired(scenario, t, BARE, per_core_ratio)),
                fmt_ratio(runs.paired(scenario, t, BARE, |a, b| Some(
                    throughput(a)? / throughput(b)?
                ))),
                fmt_ratio(runs.paired(scenario, t, MOCK, |a, b| Some(
                    throughput(a)? / throughput(b)?
                ))),
                fmt_delta(runs.paired(scenario, t, BARE, |a, b| Some(p50(a)? - p50(b)?))),
                fmt_delta(runs.paired(scenario, t, MOCK, |a, b| Some(p50(a)? - p50(b)?))),
            ));
        }
        out.push('\n');
    }
    summary.insert(scenario.to_string(), Value::Object(scen));
}

struct Verdict {
    target: String,
    status: &'static str,
    detail: String,
}

fn check_ratio(
    runs: &Runs,
    name: &str,
    target: &str,
    reference: &str,
    prefix: &str,
    bound: f64,
    f: impl Fn(&Value, &Value) -> Option<f64> + Copy,
) -> Verdict {
    let mut parts = Vec::new();
    let mut worst: Option<f64> = None;
    for s in runs.scenarios().iter().filter(|s| s.starts_with(prefix)) {
        if let Some(r) = runs.paired(s, target, reference, f) {
            parts.push(format!("{s} {:.2}×", r.median));
            worst = Some(worst.map_or(r.median, |w: f64| w.min(r.median)));
        }
    }
    let (status, tail) = match worst {
        None => ("NOT RUN", String::new()),
        Some(w) if w >= bound => ("MET", String::new()),
        Some(w) => (
            "MISSED",
            format!(
                "; worst is {:.0}% short of {bound:.2}×",
                (1.0 - w / bound) * 100.0
            ),
        ),
    };
    Verdict {
        target: name.to_string(),
        status,
        detail: format!("{}{tail}", parts.join(", ")),
    }
}

/// Requests per core against the bare proxy's (0.70×) for a Redis-backed target:
/// non-streaming, streaming, and counting Redis's CPU too.
fn redis_verdict(runs: &Runs, target: &str, what: &str) -> Verdict {
    let mut verdict = check_ratio(
        runs,
        &format!("{what}: requests per core ≥ 0.70× bare proxy (gateway CPU)"),
        target,
        BARE,
        "json-c",
        0.70,
        per_core_ratio,
    );
    let stream = check_ratio(runs, "", target, BARE, "sse-c", 0.70, per_core_ratio);
    if stream.status == "MISSED" {
        verdict.status = "MISSED";
    }
    if !stream.detail.is_empty() {
        verdict.detail = format!("{}; streaming: {}", verdict.detail, stream.detail);
    }
    let with_redis = check_ratio(runs, "", target, BARE, "json-c", 0.70, |a, b| {
        Some(gateway_cpu(b)? / gateway_plus_redis_cpu(a)?)
    });
    if !with_redis.detail.is_empty() {
        verdict.detail = format!(
            "{}; counting Redis's CPU too: {}",
            verdict.detail, with_redis.detail
        );
    }
    verdict
}

fn verdicts(runs: &Runs, criterion: &[CriterionResult]) -> Vec<Verdict> {
    let mut v = vec![
        check_ratio(
            runs,
            "embedded store: requests per core ≥ 0.90× bare proxy (non-streaming)",
            "tollgate-memory",
            BARE,
            "json-c",
            0.90,
            per_core_ratio,
        ),
        check_ratio(
            runs,
            "embedded store: streams per core ≥ 0.85× bare proxy",
            "tollgate-memory",
            BARE,
            "sse-c",
            0.85,
            per_core_ratio,
        ),
    ];
    let added = runs.paired("json-200rps", "tollgate-memory", BARE, |a, b| {
        Some(p50(a)? - p50(b)?)
    });
    v.push(Verdict {
        target: "added P50 latency over bare proxy ≤ 50 µs at 200 req/s".into(),
        status: match added {
            None => "NOT RUN",
            Some(a) if a.median <= 50.0 => "MET",
            Some(_) => "MISSED",
        },
        detail: added.map_or(String::new(), |a| {
            format!("{:+.0} µs (spread {:+.0}–{:+.0})", a.median, a.min, a.max)
        }),
    });
    v.push(redis_verdict(runs, "tollgate-redis", "Redis store"));
    v.push(redis_verdict(
        runs,
        "tollgate-sliced",
        "Redis store with budget slices",
    ));
    let mut rss_parts = Vec::new();
    let mut rss_worst: Option<f64> = None;
    for t in ["tollgate-memory", "tollgate-redis"] {
        if let Some(k) = runs.max_metric("open-streams", t, |r| {
            num(r, &["procs", "gateway", "hwm_kib"])
        }) {
            rss_parts.push(format!("{t} {:.1} MiB", k / 1024.0));
            rss_worst = Some(rss_worst.map_or(k, |w: f64| w.max(k)));
        }
    }
    let streams = runs
        .of("open-streams", Some("tollgate-memory"))
        .filter_map(|r| num(r, &["in_flight", "mean"]))
        .fold(0.0f64, f64::max);
    v.push(Verdict {
        target: "peak RSS < 100 MiB with 1,000 concurrent open streams".into(),
        status: match rss_worst {
            None => "NOT RUN",
            Some(k) if k < 100.0 * 1024.0 => "MET",
            Some(_) => "MISSED",
        },
        detail: if rss_parts.is_empty() {
            String::new()
        } else {
            format!(
                "{} ({streams:.0} streams open on average)",
                rss_parts.join(", ")
            )
        },
    });
    v.push(check_ratio(
        runs,
        "≥ 100× LiteLLM's requests per CPU-second",
        "tollgate-memory",
        "litellm",
        "",
        100.0,
        per_core_ratio,
    ));
    let sse: Vec<&CriterionResult> = criterion
        .iter()
        .filter(|c| {
            c.id.ends_with("/4096")
                && (c.id.starts_with("sse_parser") || c.id.starts_with("stream_meter"))
        })
        .collect();
    let worst = sse
        .iter()
        .filter_map(|c| c.bytes_per_s)
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.min(x))));
    v.push(Verdict {
        target: "SSE parser and meter ≥ 1 GB/s on 4 KiB chunks".into(),
        status: match worst {
            None => "NOT RUN",
            Some(b) if b >= 1e9 => "MET",
            Some(_) => "MISSED",
        },
        detail: sse
            .iter()
            .filter_map(|c| Some(format!("{} {:.2} GB/s", c.id, c.bytes_per_s? / 1e9)))
            .collect::<Vec<_>>()
            .join(", "),
    });
    v
}

fn runs(args: &[String]) {
    let mut files: Vec<PathBuf> = Vec::new();
    let mut meta = None;
    let mut criterion_dir = None;
    let mut json_out = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--meta" => meta = Some(it.next().unwrap_or_else(|| usage()).clone()),
            "--criterion" => criterion_dir = Some(it.next().unwrap_or_else(|| usage()).clone()),
            "--json" => json_out = Some(it.next().unwrap_or_else(|| usage()).clone()),
            f => files.push(PathBuf::from(f)),
        }
    }
    let mut all = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| {
            eprintln!("bench_report: {}: {e}", f.display());
            std::process::exit(1)
        });
        all.extend(
            text.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok()),
        );
    }
    let runs = Runs { all };
    let meta: Value = meta
        .and_then(|m| std::fs::read_to_string(m).ok())
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let criterion = criterion_dir
        .map(|d| criterion_results(Path::new(&d)))
        .unwrap_or_default();
    let mut out = String::new();
    if let Some(m) = meta.as_object() {
        out.push_str("Machine and run:\n\n");
        for (k, v) in m {
            let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
            out.push_str(&format!("- {k}: {v}\n"));
        }
        out.push('\n');
    }
    let mut summary = serde_json::Map::new();
    for s in runs.scenarios() {
        scenario_tables(&runs, &s, &mut out, &mut summary);
    }
    let verdicts = verdicts(&runs, &criterion);
    out.push_str("### Targets\n\n| target | status | measured (medians) |\n|---|---|---|\n");
    for v in &verdicts {
        out.push_str(&format!("| {} | {} | {} |\n", v.target, v.status, v.detail));
    }
    out.push('\n');
    if !criterion.is_empty() {
        out.push_str("### Micro-benchmarks (Criterion)\n\n");
        out.push_str(&criterion_table(&criterion));
    }
    print!("{out}");
    if let Some(path) = json_out {
        let doc = json!({
            "meta": meta,
            "scenarios": summary,
            "targets": verdicts.iter().map(|v| json!({"target": v.target, "status": v.status, "detail": v.detail})).collect::<Vec<_>>(),
            "criterion": criterion.iter().map(|c| json!({"id": c.id, "median_ns": c.median_ns, "bytes_per_s": c.bytes_per_s})).collect::<Vec<_>>(),
            "runs": runs.all,
        });
        let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("bench_report: {path}: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Criterion
// ---------------------------------------------------------------------------------------------

struct CriterionResult {
    id: String,
    median_ns: f64,
    bytes_per_s: Option<f64>,
}

/// Every `*/new/estimates.json` under DIR, with its `benchmark.json`.
fn criterion_results(dir: &Path) -> Vec<CriterionResult> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "new") {
                    found.push(p);
                } else if p.file_name().is_some_and(|n| n != "base" && n != "report") {
                    stack.push(p);
                }
            }
        }
    }
    let read = |p: PathBuf| -> Option<Value> {
        serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
    };
    let mut results: Vec<CriterionResult> = found
        .into_iter()
        .filter_map(|new| {
            let bench = read(new.join("benchmark.json"))?;
            let est = read(new.join("estimates.json"))?;
            let median_ns = num(&est, &["median", "point_estimate"])?;
            let bytes = bench["throughput"]["Bytes"].as_f64();
            Some(CriterionResult {
                id: bench["full_id"].as_str()?.to_string(),
                median_ns,
                bytes_per_s: bytes.map(|b| b / (median_ns / 1e9)),
            })
        })
        .collect();
    results.sort_by(|a, b| a.id.cmp(&b.id));
    results
}

fn criterion_table(results: &[CriterionResult]) -> String {
    let mut out = String::from("| benchmark | median time | throughput |\n|---|---|---|\n");
    let by_group: BTreeMap<&str, Vec<&CriterionResult>> =
        results.iter().fold(BTreeMap::new(), |mut m, r| {
            m.entry(r.id.as_str()).or_insert_with(Vec::new).push(r);
            m
        });
    for (id, rs) in by_group {
        for r in rs {
            let t = if r.median_ns < 1000.0 {
                format!("{:.1} ns", r.median_ns)
            } else {
                fmt_time_us(r.median_ns / 1000.0)
            };
            let tp = r.bytes_per_s.map_or("–".into(), |b| {
                if b >= 1e9 {
                    format!("{:.2} GB/s", b / 1e9)
                } else {
                    format!("{:.0} MB/s", b / 1e6)
                }
            });
            out.push_str(&format!("| {id} | {t} | {tp} |\n"));
        }
    }
    out.push('\n');
    out
}
