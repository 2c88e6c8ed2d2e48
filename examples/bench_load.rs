//! `bench_load`: the benchmarks' load generator (`scripts/bench` drives it).
//!
//! Raw HTTP/1.1 keep-alive connections on tokio, a fixed number of them, for a fixed
//! time; 127.0.0.1 targets only. Latency, time to first body byte (the first SSE event of a
//! stream) and full-response time go into HdrHistograms (ns, 3 significant digits).
//!
//! ```text
//! bench_load run --target 127.0.0.1:PORT [--path /v1/chat/completions] [--method POST]
//!     [--header 'name: value']... [--body JSON | --body-file FILE] [--stream]
//!     [--connections 64] [--duration 5] [--warmup 1] [--rate 0] [--ramp 0] [--timeout 30]
//!     [--threads 1] [--watch NAME=PID[,PID…]]... [--clk-tck 100]
//!     [--label NAME] [--scenario NAME] [--rep N]
//! bench_load probe --target ADDR [--path P] [--method M] [--header H]... [--body B]
//! bench_load wait ADDR [--path /healthz] [--timeout 15]
//! bench_load free-ports N
//! bench_load idle PID[,PID…] [--timeout 60]
//! ```
//!
//! `run` prints one JSON object. Only responses that end inside the measurement window
//! (after `--warmup`, for `--duration` seconds) count; a response counts as ok when its
//! status is 2xx and, with `--stream`, `data: [DONE]` arrived. Closed loop by default (each
//! connection sends its next request when the previous response ends); `--rate R` paces
//! all connections together at R requests per second instead. `--ramp S` staggers the
//! connections' first requests over S seconds (so long streams do not move in lockstep).
//! The number of requests in flight is sampled every 50 ms during the window.
//!
//! Other load on the machine would distort the figures, so the CPU time of every other
//! process (all CPUs' user and system time from `/proc/stat`, minus the watched processes
//! and the load generator) is reported as `other_cpu_s`, and interrupt time (charged to
//! no process; on loopback mostly the network stack) as `irq_cpu_s`.
//!
//! `--watch NAME=PID[,PID…]` samples those processes (summed) over exactly the window: CPU time
//! (utime + stime from `/proc/PID/stat`), context switches of all their threads
//! (`/proc/PID/task/*/status`), and peak RSS (`VmHWM`, reset at the window's
//! start through `/proc/PID/clear_refs` when allowed, so the peak is this run's).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn usage() -> ! {
    eprintln!(
        "usage:
  bench_load run --target 127.0.0.1:PORT [--path P] [--method M] [--header 'k: v']...
      [--body JSON | --body-file FILE] [--stream] [--connections N] [--duration S]
      [--warmup S] [--rate R] [--ramp S] [--timeout S] [--threads N]
      [--watch NAME=PID[,PID]]...
      [--clk-tck N] [--label L] [--scenario S] [--rep N]
  bench_load probe --target ADDR [--path P] [--method M] [--header 'k: v']... [--body B]
  bench_load wait ADDR [--path P] [--timeout S]
  bench_load free-ports N
  bench_load idle PID[,PID] [--timeout S]"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        usage()
    };
    let code = match command.as_str() {
        "run" => run_command(Opts::parse(rest)),
        "probe" => probe_command(Opts::parse(rest)),
        "wait" => wait_command(rest),
        "free-ports" => free_ports(rest),
        "idle" => idle_command(rest),
        _ => usage(),
    };
    std::process::exit(code)
}

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Opts {
    target: SocketAddr,
    path: String,
    method: String,
    headers: Vec<String>,
    body: Vec<u8>,
    stream: bool,
    connections: usize,
    duration: f64,
    warmup: f64,
    rate: f64,
    /// Spread the connections' first requests evenly over this many seconds.
    ramp: f64,
    timeout: f64,
    threads: usize,
    /// Name and the processes counted under it (summed).
    watch: Vec<(String, Vec<u32>)>,
    clk_tck: f64,
    label: String,
    scenario: String,
    rep: u64,
}

fn loopback_only(addr: SocketAddr) -> SocketAddr {
    if !addr.ip().is_loopback() {
        eprintln!("bench_load: {addr} is not a loopback address; refusing");
        std::process::exit(2);
    }
    addr
}

impl Opts {
    fn parse(args: &[String]) -> Opts {
        let mut o = Opts {
            target: "127.0.0.1:0".parse().expect("literal"),
            path: "/v1/chat/completions".into(),
            method: String::new(),
            headers: Vec::new(),
            body: Vec::new(),
            stream: false,
            connections: 64,
            duration: 5.0,
            warmup: 1.0,
            rate: 0.0,
            ramp: 0.0,
            timeout: 30.0,
            threads: 1,
            watch: Vec::new(),
            clk_tck: 100.0,
            label: String::new(),
            scenario: String::new(),
            rep: 0,
        };
        let mut target = None;
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if flag == "--stream" {
                o.stream = true;
                continue;
            }
            let v = it.next().unwrap_or_else(|| usage());
            let num = || v.parse::<f64>().unwrap_or_else(|_| usage());
            match flag.as_str() {
                "--target" => target = Some(v.parse().unwrap_or_else(|_| usage())),
                "--path" => o.path = v.clone(),
                "--method" => o.method = v.clone(),
                "--header" => o.headers.push(v.clone()),
                "--body" => o.body = v.clone().into_bytes(),
                "--body-file" => {
                    o.body = std::fs::read(v).unwrap_or_else(|e| {
                        eprintln!("bench_load: {v}: {e}");
                        std::process::exit(2)
                    })
                }
                "--connections" => o.connections = (num() as usize).max(1),
                "--duration" => o.duration = num(),
                "--warmup" => o.warmup = num(),
                "--rate" => o.rate = num(),
                "--ramp" => o.ramp = num(),
                "--timeout" => o.timeout = num(),
                "--threads" => o.threads = (num() as usize).max(1),
                "--clk-tck" => o.clk_tck = num(),
                "--label" => o.label = v.clone(),
                "--scenario" => o.scenario = v.clone(),
                "--rep" => o.rep = num() as u64,
                "--watch" => {
                    let (name, pids) = v.split_once('=').unwrap_or_else(|| usage());
                    let pids = pids
                        .split(',')
                        .map(|p| p.trim().parse().unwrap_or_else(|_| usage()))
                        .collect();
                    o.watch.push((name.to_string(), pids));
                }
                _ => usage(),
            }
        }
        o.target = loopback_only(target.unwrap_or_else(|| usage()));
        if o.method.is_empty() {
            o.method = if o.body.is_empty() { "GET" } else { "POST" }.into();
        }
        if !(o.duration > 0.0
            && o.duration <= 600.0
            && (0.0..=120.0).contains(&o.warmup)
            && (0.0..=o.warmup).contains(&o.ramp))
        {
            eprintln!(
                "bench_load: --duration must be in (0, 600] s, --warmup in [0, 120] s and \
                 --ramp no longer than the warm-up"
            );
            std::process::exit(2);
        }
        o
    }

    fn request_bytes(&self) -> Vec<u8> {
        let mut r = format!(
            "{} {} HTTP/1.1\r\nhost: {}\r\n",
            self.method, self.path, self.target
        );
        for h in &self.headers {
            r.push_str(h);
            r.push_str("\r\n");
        }
        if !self.body.is_empty() || self.method == "POST" {
            r.push_str("content-type: application/json\r\n");
            r.push_str(&format!("content-length: {}\r\n", self.body.len()));
        }
        r.push_str("\r\n");
        let mut bytes = r.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 client side
// ---------------------------------------------------------------------------------------------

/// A read buffer: `data[start..end]` is unread.
struct ReadBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    fn new() -> ReadBuf {
        ReadBuf {
            data: vec![0; 64 * 1024],
            start: 0,
            end: 0,
        }
    }

    fn unread(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Reads more; false at end of stream.
    async fn fill(&mut self, stream: &mut TcpStream) -> io::Result<bool> {
        if self.end == self.data.len() {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                if self.data.len() >= 64 * 1024 * 1024 {
                    return Err(invalid("response line or head too large"));
                }
                self.data.resize(self.data.len() * 2, 0);
            }
        }
        let n = stream.read(&mut self.data[self.end..]).await?;
        self.end += n;
        Ok(n > 0)
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "connection closed mid-response",
    )
}

/// One response, read.
struct Outcome {
    status: u16,
    first_body: Option<Instant>,
    end: Instant,
    body_bytes: u64,
    /// `data: [DONE]` was seen in the body's last bytes.
    done: bool,
    /// The server will close (or closed) the connection.
    close: bool,
}

/// What to keep of a response body: its tail (for the `[DONE]` check) or all of it (probe).
struct BodySink {
    keep_all: bool,
    kept: Vec<u8>,
}

const TAIL: usize = 512;

impl BodySink {
    fn push(&mut self, data: &[u8]) {
        if self.keep_all {
            self.kept.extend_from_slice(data);
            return;
        }
        if data.len() >= TAIL {
            self.kept.clear();
            self.kept.extend_from_slice(&data[data.len() - TAIL..]);
        } else {
            let excess = (self.kept.len() + data.len()).saturating_sub(TAIL);
            self.kept.drain(..excess);
            self.kept.extend_from_slice(data);
        }
    }
}

fn header_value<'a>(head: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    head.split(|&b| b == b'\n').skip(1).find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = memchr::memchr(b':', line)?;
        line[..colon]
            .eq_ignore_ascii_case(name)
            .then(|| line[colon + 1..].trim_ascii())
    })
}

/// Sends `request` and reads one whole response. `head_out` receives the head (probe).
async fn exchange(
    stream: &mut TcpStream,
    buf: &mut ReadBuf,
    request: &[u8],
    sink: &mut BodySink,
    mut head_out: Option<&mut Vec<u8>>,
) -> io::Result<Outcome> {
    stream.write_all(request).await?;
    // Head (skipping any 1xx interim responses).
    let (status, close, length, chunked) = loop {
        let head_len = loop {
            if let Some(at) = memchr::memmem::find(buf.unread(), b"\r\n\r\n") {
                break at + 4;
            }
            if !buf.fill(stream).await? {
                return Err(eof());
            }
        };
        let head = &buf.unread()[..head_len];
        if head.len() < 12 || !head.starts_with(b"HTTP/1.") {
            return Err(invalid("not an HTTP/1.x response"));
        }
        let status: u16 = std::str::from_utf8(&head[9..12])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid("bad status line"))?;
        let close = header_value(head, b"connection")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"close"))
            || head.starts_with(b"HTTP/1.0");
        let chunked = header_value(head, b"transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"chunked"));
        let length = header_value(head, b"content-length")
            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok());
        if let Some(out) = head_out.as_mut() {
            out.extend_from_slice(head);
        }
        buf.consume(head_len);
        if (100..200).contains(&status) {
            continue;
        }
        break (status, close, length, chunked);
    };
    let mut first_body = None;
    let mut body_bytes = 0u64;
    let mut note = |data: &[u8], sink: &mut BodySink| {
        if !data.is_empty() {
            if first_body.is_none() {
                first_body = Some(Instant::now());
            }
            body_bytes += data.len() as u64;
            sink.push(data);
        }
    };
    let mut close = close;
    if status == 204 || status == 304 {
        // no body
    } else if chunked {
        loop {
            let line_end = loop {
                if let Some(at) = memchr::memmem::find(buf.unread(), b"\r\n") {
                    break at;
                }
                if !buf.fill(stream).await? {
                    return Err(eof());
                }
            };
            let line = &buf.unread()[..line_end];
            let hex = line.split(|&b| b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(hex)
                .ok()
                .and_then(|h| usize::from_str_radix(h.trim(), 16).ok())
                .ok_or_else(|| invalid("bad chunk size"))?;
            buf.consume(line_end + 2);
            if size == 0 {
                loop {
                    if let Some(at) = memchr::memmem::find(buf.unread(), b"\r\n") {
                        buf.consume(at + 2);
                        if at == 0 {
                            break;
                        }
                        continue;
                    }
                    if !buf.fill(stream).await? {
                        return Err(eof());
                    }
                }
                break;
            }
            let mut remaining = size;
            while remaining > 0 {
                if buf.unread().is_empty() && !buf.fill(stream).await? {
                    return Err(eof());
                }
                let take = remaining.min(buf.unread().len());
                note(&buf.unread()[..take], sink);
                buf.consume(take);
                remaining -= take;
            }
            while buf.unread().len() < 2 {
                if !buf.fill(stream).await? {
                    return Err(eof());
                }
            }
            if &buf.unread()[..2] != b"\r\n" {
                return Err(invalid("chunk not followed by CRLF"));
            }
            buf.consume(2);
        }
    } else if let Some(length) = length {
        let mut remaining = length as usize;
        while remaining > 0 {
            if buf.unread().is_empty() && !buf.fill(stream).await? {
                return Err(eof());
            }
            let take = remaining.min(buf.unread().len());
            note(&buf.unread()[..take], sink);
            buf.consume(take);
            remaining -= take;
        }
    } else {
        // Delimited by the end of the connection.
        loop {
            if !buf.unread().is_empty() {
                let n = buf.unread().len();
                note(&buf.unread()[..n], sink);
                buf.consume(n);
            }
            if !buf.fill(stream).await? {
                break;
            }
        }
        close = true;
    }
    let end = Instant::now();
    let done = memchr::memmem::find(&sink.kept, b"data: [DONE]").is_some();
    Ok(Outcome {
        status,
        first_body,
        end,
        body_bytes,
        done,
        close,
    })
}

async fn connect(target: SocketAddr) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

// ---------------------------------------------------------------------------------------------
// run
// ---------------------------------------------------------------------------------------------

struct Stats {
    latency: Histogram<u64>,
    ttfb: Histogram<u64>,
    ok: u64,
    incomplete: u64,
    errors: u64,
    error_kinds: BTreeMap<String, u64>,
    statuses: BTreeMap<u16, u64>,
    body_bytes: u64,
}

fn histogram() -> Histogram<u64> {
    // 1 ns .. 120 s at 3 significant digits.
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("histogram bounds")
}

struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    fn contains(&self, t: Instant) -> bool {
        t >= self.start && t <= self.end
    }
}

async fn connection_loop(
    index: usize,
    opts: Arc<Opts>,
    request: Arc<Vec<u8>>,
    stats: Arc<Mutex<Stats>>,
    window: Arc<Window>,
    begin: Instant,
    in_flight: Arc<AtomicUsize>,
) {
    let timeout = Duration::from_secs_f64(opts.timeout);
    let interval =
        (opts.rate > 0.0).then(|| Duration::from_secs_f64(opts.connections as f64 / opts.rate));
    let offset = if opts.rate > 0.0 {
        index as f64 / opts.rate
    } else {
        opts.ramp * index as f64 / opts.connections as f64
    };
    let mut next = begin + Duration::from_secs_f64(offset);
    if interval.is_none() && offset > 0.0 {
        tokio::time::sleep_until(next.into()).await;
    }
    let mut conn: Option<TcpStream> = None;
    let mut buf = ReadBuf::new();
    let mut sink = BodySink {
        keep_all: false,
        kept: Vec::with_capacity(TAIL * 2),
    };
    let fail = |kind: String, stats: &Mutex<Stats>| {
        if window.contains(Instant::now()) {
            if let Ok(mut s) = stats.lock() {
                s.errors += 1;
                *s.error_kinds.entry(kind).or_default() += 1;
            }
        }
    };
    while Instant::now() < window.end {
        if let Some(interval) = interval {
            tokio::time::sleep_until(next.into()).await;
            let now = Instant::now();
            if now >= window.end {
                break;
            }
            next += interval;
            if next + interval < now {
                next = now; // far behind: drop the backlog rather than burst
            }
        }
        if conn.is_none() {
            match connect(opts.target).await {
                Ok(s) => {
                    conn = Some(s);
                    buf.clear();
                }
                Err(e) => {
                    fail(format!("connect: {}", e.kind()), &stats);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(stream) = conn.as_mut() else {
            continue;
        };
        sink.kept.clear();
        let t0 = Instant::now();
        in_flight.fetch_add(1, Ordering::Relaxed);
        let result = tokio::time::timeout(
            timeout,
            exchange(stream, &mut buf, &request, &mut sink, None),
        )
        .await;
        in_flight.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(Ok(out)) => {
                if out.close {
                    conn = None;
                }
                if !window.contains(out.end) {
                    continue;
                }
                let Ok(mut s) = stats.lock() else { continue };
                *s.statuses.entry(out.status).or_default() += 1;
                s.body_bytes += out.body_bytes;
                let good = (200..300).contains(&out.status);
                if good && opts.stream && !out.done {
                    s.incomplete += 1;
                } else if good {
                    s.ok += 1;
                    let lat = out.end.duration_since(t0).as_nanos() as u64;
                    s.latency.saturating_record(lat.max(1));
                    let first = out.first_body.unwrap_or(out.end);
                    s.ttfb
                        .saturating_record((first.duration_since(t0).as_nanos() as u64).max(1));
                }
            }
            Ok(Err(e)) => {
                conn = None;
                fail(format!("{}", e.kind()), &stats);
            }
            Err(_) => {
                conn = None;
                fail("timeout".into(), &stats);
            }
        }
    }
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32, clk_tck: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clk_tck)
}

/// Context switches (voluntary and not) of all of a process's threads: each is a thread
/// going to sleep or being put off the CPU, so at low load they show a process's wake-ups.
fn context_switches(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        // A thread that ended meanwhile is skipped (its switches drop out of the sum).
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            let n = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"));
            total += n.and_then(|n| n.trim().parse::<u64>().ok()).unwrap_or(0);
        }
    }
    Some(total)
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// CPU time of all CPUs since boot, in seconds: (user + nice + system, irq + softirq).
/// Guest time is inside user; steal (time the hypervisor gave to other machines) is not
/// this machine's load. Interrupt time is charged to no process: on loopback it is mostly
/// the network stack working for the processes under test.
fn machine_cpu_seconds(clk_tck: f64) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq
    let tasks = f.first()? + f.get(1)? + f.get(2)?;
    let irq = f.get(5)? + f.get(6)?;
    Some((tasks / clk_tck, irq / clk_tck))
}

/// Resets the peak RSS (VmHWM) to the current RSS; false when not allowed.
fn reset_peak_rss(pid: u32) -> bool {
    std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/clear_refs"))
        .and_then(|mut f| f.write_all(b"5"))
        .is_ok()
}

/// The sum over all processes; None if any cannot be read (e.g. it exited).
fn sum<T: std::iter::Sum<T>>(pids: &[u32], f: impl Fn(u32) -> Option<T>) -> Option<T> {
    pids.iter().map(|p| f(*p)).sum()
}

struct ProcSample {
    cpu_start: Option<f64>,
    cpu_end: Option<f64>,
    switches_start: Option<u64>,
    switches_end: Option<u64>,
    hwm_reset: bool,
    hwm_kib: Option<u64>,
    rss_kib: Option<u64>,
}

fn run_command(opts: Opts) -> i32 {
    let runtime = if opts.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(opts.threads)
            .enable_all()
            .build()
    }
    .expect("tokio runtime");
    let result = runtime.block_on(run(opts));
    // Connections still open are dropped with the runtime.
    runtime.shutdown_timeout(Duration::from_millis(100));
    println!("{result}");
    0
}

async fn run(opts: Opts) -> Value {
    let opts = Arc::new(opts);
    let request = Arc::new(opts.request_bytes());
    let begin = Instant::now() + Duration::from_millis(20);
    let window = Arc::new(Window {
        start: begin + Duration::from_secs_f64(opts.warmup),
        end: begin + Duration::from_secs_f64(opts.warmup + opts.duration),
    });
    let stats = Arc::new(Mutex::new(Stats {
        latency: histogram(),
        ttfb: histogram(),
        ok: 0,
        incomplete: 0,
        errors: 0,
        error_kinds: BTreeMap::new(),
        statuses: BTreeMap::new(),
        body_bytes: 0,
    }));
    let in_flight = Arc::new(AtomicUsize::new(0));
    // The sampler runs on its own thread so a busy runtime cannot delay it.
    let sampler = {
        let window = window.clone();
        let in_flight = in_flight.clone();
        let watch = opts.watch.clone();
        let clk = opts.clk_tck;
        std::thread::spawn(move || {
            let sleep_until = |t: Instant| {
                let now = Instant::now();
                if t > now {
                    std::thread::sleep(t - now);
                }
            };
            sleep_until(window.start);
            let busy_start = machine_cpu_seconds(clk);
            let own_start = cpu_seconds(std::process::id(), clk);
            let mut samples: Vec<ProcSample> = watch
                .iter()
                .map(|(_, pids)| ProcSample {
                    cpu_start: sum(pids, |p| cpu_seconds(p, clk)),
                    cpu_end: None,
                    switches_start: sum(pids, context_switches),
                    switches_end: None,
                    hwm_reset: pids.iter().all(|p| reset_peak_rss(*p)),
                    hwm_kib: None,
                    rss_kib: None,
                })
                .collect();
            let mut flight = Vec::new();
            while Instant::now() + Duration::from_millis(50) < window.end {
                std::thread::sleep(Duration::from_millis(50));
                flight.push(in_flight.load(Ordering::Relaxed) as f64);
            }
            sleep_until(window.end);
            let busy_end = machine_cpu_seconds(clk);
            for (s, (_, pids)) in samples.iter_mut().zip(&watch) {
                s.cpu_end = sum(pids, |p| cpu_seconds(p, clk));
                s.switches_end = sum(pids, context_switches);
                s.hwm_kib = sum(pids, |p| status_kib(p, "VmHWM"));
                s.rss_kib = sum(pids, |p| status_kib(p, "VmRSS"));
            }
            let own_end = cpu_seconds(std::process::id(), clk);
            let own = own_start.zip(own_end).map(|(a, b)| b - a);
            let watched: f64 = samples
                .iter()
                .filter_map(|s| s.cpu_start.zip(s.cpu_end).map(|(a, b)| b - a))
                .sum();
            let other = busy_start
                .zip(busy_end)
                .zip(own)
                .map(|((a, b), own)| ((b.0 - a.0 - own - watched).max(0.0), b.1 - a.1));
            (samples, own, other, flight)
        })
    };
    let tasks: Vec<_> = (0..opts.connections)
        .map(|i| {
            tokio::spawn(connection_loop(
                i,
                opts.clone(),
                request.clone(),
                stats.clone(),
                window.clone(),
                begin,
                in_flight.clone(),
            ))
        })
        .collect();
    tokio::time::sleep_until(window.end.into()).await;
    // Responses ending after the window do not count: give the in-flight ones a moment
    // to finish cleanly, then drop the rest.
    let grace = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < grace && tasks.iter().any(|t| !t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for t in &tasks {
        t.abort();
    }
    let (samples, load_cpu, other_cpu, flight) = sampler
        .join()
        .unwrap_or_else(|_| (Vec::new(), None, None, Vec::new()));
    let in_flight_summary = if flight.is_empty() {
        Value::Null
    } else {
        json!({
            "mean": flight.iter().sum::<f64>() / flight.len() as f64,
            "min": flight.iter().copied().fold(f64::INFINITY, f64::min),
            "max": flight.iter().copied().fold(0.0, f64::max),
        })
    };
    let s = stats.lock().map(|s| Stats {
        latency: s.latency.clone(),
        ttfb: s.ttfb.clone(),
        ok: s.ok,
        incomplete: s.incomplete,
        errors: s.errors,
        error_kinds: s.error_kinds.clone(),
        statuses: s.statuses.clone(),
        body_bytes: s.body_bytes,
    });
    let Ok(s) = s else {
        return json!({"error": "stats lock poisoned"});
    };
    let quantiles = |h: &Histogram<u64>| {
        let us = |v: u64| v as f64 / 1000.0;
        if h.is_empty() {
            return Value::Null;
        }
        json!({
            "p50": us(h.value_at_quantile(0.5)),
            "p90": us(h.value_at_quantile(0.9)),
            "p99": us(h.value_at_quantile(0.99)),
            "p999": us(h.value_at_quantile(0.999)),
            "max": us(h.max()),
            "mean": h.mean() / 1000.0,
        })
    };
    let mut procs = serde_json::Map::new();
    for (sample, (name, pids)) in samples.iter().zip(&opts.watch) {
        let cpu = sample.cpu_start.zip(sample.cpu_end).map(|(a, b)| b - a);
        let switches = sample
            .switches_start
            .zip(sample.switches_end)
            .map(|(a, b)| b.saturating_sub(a));
        procs.insert(
            name.clone(),
            json!({
                "pids": pids,
                "alive": sample.cpu_end.is_some(),
                "cpu_s": cpu,
                "cpu_us_per_req": cpu.filter(|_| s.ok > 0).map(|c| c * 1e6 / s.ok as f64),
                "switches_per_req": switches.filter(|_| s.ok > 0).map(|n| n as f64 / s.ok as f64),
                "hwm_kib": sample.hwm_kib,
                "hwm_reset": sample.hwm_reset,
                "rss_kib": sample.rss_kib,
            }),
        );
    }
    let statuses: serde_json::Map<String, Value> = s
        .statuses
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({
        "label": opts.label,
        "scenario": opts.scenario,
        "rep": opts.rep,
        "target": opts.target.to_string(),
        "path": opts.path,
        "stream": opts.stream,
        "connections": opts.connections,
        "rate": opts.rate,
        "warmup_s": opts.warmup,
        "duration_s": opts.duration,
        "ok": s.ok,
        "throughput": s.ok as f64 / opts.duration,
        "incomplete": s.incomplete,
        "errors": s.errors,
        "error_kinds": s.error_kinds,
        "statuses": statuses,
        "body_bytes": s.body_bytes,
        "latency_us": quantiles(&s.latency),
        "ttfb_us": quantiles(&s.ttfb),
        "procs": procs,
        "load_cpu_s": load_cpu,
        "other_cpu_s": other_cpu.map(|o| o.0),
        "irq_cpu_s": other_cpu.map(|o| o.1),
        "in_flight": in_flight_summary,
        "ramp_s": opts.ramp,
    })
}

// ---------------------------------------------------------------------------------------------
// probe, wait, free-ports
// ---------------------------------------------------------------------------------------------

/// One request; prints the head and the body, exit status 0 when 2xx.
fn probe_command(opts: Opts) -> i32 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let request = opts.request_bytes();
        let mut head = Vec::new();
        let mut sink = BodySink {
            keep_all: true,
            kept: Vec::new(),
        };
        let result = tokio::time::timeout(Duration::from_secs_f64(opts.timeout), async {
            let mut stream = connect(opts.target).await?;
            let mut buf = ReadBuf::new();
            exchange(&mut stream, &mut buf, &request, &mut sink, Some(&mut head)).await
        })
        .await;
        match result {
            Ok(Ok(out)) => {
                print!("{}", String::from_utf8_lossy(&head));
                println!("{}", String::from_utf8_lossy(&sink.kept));
                i32::from(!(200..300).contains(&out.status))
            }
            Ok(Err(e)) => {
                eprintln!("bench_load probe: {e}");
                1
            }
            Err(_) => {
                eprintln!("bench_load probe: timed out");
                1
            }
        }
    })
}

/// Waits until ADDR accepts connections (and, with --path, answers GET PATH with 2xx).
fn wait_command(args: &[String]) -> i32 {
    let Some((addr, rest)) = args.split_first() else {
        usage()
    };
    let addr: SocketAddr = loopback_only(addr.parse().unwrap_or_else(|_| usage()));
    let mut path = None;
    let mut timeout = 15.0;
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let v = it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--path" => path = Some(v.clone()),
            "--timeout" => timeout = v.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    let deadline = Instant::now() + Duration::from_secs_f64(timeout);
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            let Some(path) = &path else { return 0 };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
            let mut answer = [0u8; 12];
            if s.write_all(req.as_bytes()).is_ok()
                && s.read_exact(&mut answer).is_ok()
                && answer.starts_with(b"HTTP/1.")
                && answer[9] == b'2'
            {
                return 0;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    1
}

/// Waits until the processes together use under 5% of a CPU over half a second (a
/// server still working off requests its clients gave up on), or the timeout passes.
/// Exit status 0 when idle, 1 on timeout or when a process cannot be read.
fn idle_command(args: &[String]) -> i32 {
    let Some((pids, rest)) = args.split_first() else {
        usage()
    };
    let pids: Vec<u32> = pids
        .split(',')
        .map(|p| p.trim().parse().unwrap_or_else(|_| usage()))
        .collect();
    let mut timeout = 60.0;
    let mut clk = 100.0;
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let v = it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--timeout" => timeout = v.parse().unwrap_or_else(|_| usage()),
            "--clk-tck" => clk = v.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    let deadline = Instant::now() + Duration::from_secs_f64(timeout);
    let period = Duration::from_millis(500);
    let Some(mut before) = sum(&pids, |p| cpu_seconds(p, clk)) else {
        return 1;
    };
    while Instant::now() < deadline {
        std::thread::sleep(period);
        let Some(now) = sum(&pids, |p| cpu_seconds(p, clk)) else {
            return 1;
        };
        if now - before < 0.05 * period.as_secs_f64() {
            return 0;
        }
        before = now;
    }
    1
}

/// Prints N currently free loopback ports (bound and released at once).
fn free_ports(args: &[String]) -> i32 {
    let n: usize = args
        .first()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| usage());
    let listeners: Vec<TcpListener> = (0..n)
        .filter_map(|_| TcpListener::bind("127.0.0.1:0").ok())
        .collect();
    let ports: Vec<String> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .map(|a| a.port().to_string())
        .collect();
    println!("{}", ports.join(" "));
    i32::from(ports.len() != n)
}
