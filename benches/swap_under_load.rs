//! Latency under load while the routing table is swapped every millisecond.
//!
//! `cargo bench --bench swap_under_load`
//!
//! The target in issue #6: "a table swap every millisecond ... moves p99
//! under load by < 5%". This runs the real proxy (`Server`, the same code
//! `cyan run` serves with) on a current-thread runtime pinned to CPU 0, as
//! `worker_threads = 1` does. Two demo backends and a fixed-rate HTTP/1.1
//! load generator run on CPU 1. A swapper task on the proxy's own runtime
//! (where the admin API's handler would run with one worker) applies a split
//! change through `Table::apply` every millisecond while swapping is on: the
//! build, validation and arc-swap of a new table generation, exactly what an
//! admin `set-split` costs minus the socket.
//!
//! **Design.** On the 2-vCPU VM this was written on, kernel threads take
//! CPU 0 for milliseconds at a time (`kdamond` ~1.1 ms every 510 ms,
//! `rcu_preempt` up to 3.4 ms; `perf sched timehist -C 0`), whatever runs
//! there. With the two modes in separate rounds of seconds, a round that
//! caught a few of those had a p99 of 1-1.5 ms instead of ~0.2 ms, in
//! either mode, and the ratio of the modes' p99 swung from 0.6x to 2.3x
//! between runs. So the modes are interleaved finely: time is cut into
//! 50 ms slots, each slot is swapping or quiet at random (a fixed seed), the
//! swapper follows the slots, and each request counts for the mode of the
//! slot it was scheduled in. The machine's stalls then land on both modes
//! alike.
//!
//! Latency is measured from each request's scheduled send time (an
//! open-loop schedule per connection, so a stall delays the requests queued
//! behind it and is counted, not hidden); sends are timed to the
//! microsecond by yielding in a loop for the last stretch, which keeps the
//! load generator's CPU busy. The report gives p50/p99/p99.9 per mode over
//! the whole run and per quarter of it, and the ratios swapping/quiet.
//!
//! Even interleaved, the pooled p99 is decided by the few slots a stall
//! hit (one 40 s run read 0.40x with a 90 % bootstrap interval of
//! 0.19-0.98x: it cannot tell a 5 % move from none). So the report also
//! gives the median over each mode's slots of the slot's own p99 (~250
//! requests, its 3rd-worst): a swap every millisecond would move the tail
//! of every swapping slot, a stall moves one slot. Both ratios come with a
//! 90 % interval from resampling the slots (200 bootstrap draws).
//!
//! Environment: `SWAP_BENCH_RATE` (requests/s, default 5000),
//! `SWAP_BENCH_CONNS` (16), `SWAP_BENCH_SECS` (40).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use cyan::config::Config;
use cyan::server::Server;
use cyan::table::{Command, Table};

/// Which 50 ms slots swap: a function of time both the swapper and the load
/// generator evaluate.
#[derive(Debug, Clone, Copy)]
struct Slots {
    t0: Instant,
}

impl Slots {
    const SLOT: Duration = Duration::from_millis(50);

    /// Whether the slot holding `t` swaps (never before `t0`).
    fn swapping_at(&self, t: Instant) -> bool {
        let Some(since) = t.checked_duration_since(self.t0) else {
            return false;
        };
        let k = (since.as_nanos() / Self::SLOT.as_nanos()) as u64;
        // splitmix64 of the slot number: a fixed, well-mixed coin per slot.
        let mut z = k.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) & 1 == 1
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Pins the calling thread to `cpu` with taskset; whether it worked.
fn pin_current_thread(cpu: usize) -> bool {
    let Ok(link) = std::fs::read_link("/proc/thread-self") else {
        return false;
    };
    let Some(tid) = link.file_name().and_then(|t| t.to_str()) else {
        return false;
    };
    std::process::Command::new("taskset")
        .args(["-p", "-c", &cpu.to_string(), tid])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn config(blue: SocketAddr, green: SocketAddr) -> Config {
    // Production shape as in compare.sh: metrics and rollback windows on
    // (both are always collected), passive health on, 50/50, no sticky.
    let text = format!(
        r#"
[runtime]
worker_threads = 1
drain_timeout = "1s"

[[listener]]
name = "public"
listen = "127.0.0.1:0"

[[service]]
name = "bench"
path_prefix = "/"
candidate_percent = 50.0

[service.upstream]
max_idle_per_endpoint = 256

[service.blue]
endpoints = ["{blue}"]

[service.green]
endpoints = ["{green}"]
"#
    );
    Config::parse(&text).expect("bench config")
}

/// The proxy, on its own thread and current-thread runtime, with the
/// swapper task. Returns the proxy's address and the swap counter.
fn start_proxy(
    cfg: Config,
    cpu: Option<usize>,
    slots: Slots,
    stop: Arc<AtomicBool>,
) -> (SocketAddr, Arc<AtomicU64>, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let swaps = Arc::new(AtomicU64::new(0));
    let counter = swaps.clone();
    let handle = std::thread::Builder::new()
        .name("proxy".into())
        .spawn(move || {
            if let Some(cpu) = cpu {
                pin_current_thread(cpu);
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let server = Server::start(&cfg).await.expect("proxy starts");
                let addr = server.local_addr("public").expect("listener");
                tx.send(addr).expect("main thread waits");
                swapper(&server.table, slots, &stop, &counter).await;
                server.shutdown().await;
            });
        })
        .expect("proxy thread");
    let addr = rx.recv().expect("proxy address");
    (addr, swaps, handle)
}

/// Applies a split change every millisecond in swapping slots. The
/// split moves between 50.00 % and 50.01 %, so the routing mix stays what
/// it is and only the swap itself is measured.
async fn swapper(table: &Table, slots: Slots, stop: &AtomicBool, swaps: &AtomicU64) {
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        if !slots.swapping_at(Instant::now()) {
            continue;
        }
        n += 1;
        let change = Command::SetSplit {
            service: "bench".into(),
            candidate_bp: 5000 + (n % 2) as u16,
        };
        if table.apply(change.into()).is_ok() {
            swaps.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One keep-alive connection sending GETs on a fixed schedule from `start`
/// every `period`, until `end`. Latency in µs from each scheduled send.
async fn connection(
    proxy: SocketAddr,
    start: tokio::time::Instant,
    period: Duration,
    end: tokio::time::Instant,
) -> Result<Vec<(u32, Instant)>, String> {
    let tcp = tokio::net::TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let mut out = Vec::with_capacity(((end - start).as_secs_f64() / period.as_secs_f64()) as usize);
    let mut at = start;
    while at < end {
        wait_until(at).await;
        let req = http::Request::get("/")
            .header(http::header::HOST, "bench")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        tx.ready().await.map_err(|e| format!("ready: {e}"))?;
        let resp = tx
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        if resp.status() != http::StatusCode::OK {
            return Err(format!("status {}", resp.status()));
        }
        resp.into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?;
        let took = at.elapsed().as_micros().min(u32::MAX as u128) as u32;
        out.push((took, at.into_std()));
        at += period;
    }
    Ok(out)
}

/// Waits for `at` to the microsecond: tokio's timer fires on millisecond
/// ticks, which would add up to 1 ms to every measured latency, so the last
/// stretch yields in a loop (this thread is the load generator's own CPU).
async fn wait_until(at: tokio::time::Instant) {
    let coarse = at.checked_sub(Duration::from_micros(1500));
    if let Some(c) = coarse.filter(|c| *c > tokio::time::Instant::now()) {
        tokio::time::sleep_until(c).await;
    }
    while tokio::time::Instant::now() < at {
        tokio::task::yield_now().await;
    }
}

/// A fixed-rate run over `conns` connections for `secs`, their start times
/// spread over one period.
async fn load(proxy: SocketAddr, rate: u64, conns: u64, secs: u64) -> Vec<(u32, Instant)> {
    let period = Duration::from_secs_f64(conns as f64 / rate as f64);
    let t0 = tokio::time::Instant::now() + Duration::from_millis(20);
    let end = t0 + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..conns)
        .map(|i| {
            let start = t0 + period.mul_f64(i as f64 / conns as f64);
            tokio::spawn(connection(proxy, start, period, end))
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(v)) => all.extend(v),
            Ok(Err(e)) => panic!("load connection failed: {e}"),
            Err(e) => panic!("load task: {e}"),
        }
    }
    all
}

#[derive(Clone, Copy)]
struct Pcts {
    n: usize,
    p50: u32,
    p99: u32,
    p999: u32,
}

fn pcts(v: &mut [u32]) -> Pcts {
    v.sort_unstable();
    let at = |q: f64| quantile(v, q);
    Pcts {
        n: v.len(),
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
    }
}

fn show(p: Pcts) -> String {
    format!(
        "n {:>6}  p50 {:>5} us  p99 {:>5} us  p99.9 {:>6} us",
        p.n, p.p50, p.p99, p.p999
    )
}

fn main() {
    // `cargo bench` passes `--bench` (and any filter after `--`); `cargo
    // test --benches` does not, and a 40 s load run has no place there. A
    // filter that does not match this bench's name skips it, as criterion's
    // filters do.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("swap_under_load: skipped (run it with `cargo bench --bench swap_under_load`)");
        return;
    }
    if let Some(f) = args.iter().find(|a| !a.starts_with('-')) {
        if !"swap_under_load".contains(f.as_str()) {
            return;
        }
    }
    let rate = env_or("SWAP_BENCH_RATE", 5000);
    let conns = env_or("SWAP_BENCH_CONNS", 16).max(1);
    let secs = env_or("SWAP_BENCH_SECS", 40).max(4);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = cpus >= 2 && pin_current_thread(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("load runtime");
    let stop_backends = CancellationToken::new();
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let (blue, green) = rt.block_on(async {
        (
            cyan::demo::start_backend("blue", any, stop_backends.clone())
                .await
                .expect("blue backend"),
            cyan::demo::start_backend("green", any, stop_backends.clone())
                .await
                .expect("green backend"),
        )
    });
    // Warm-up (2 s) before the first slot: connections pooled, caches warm.
    let warm_up = Duration::from_secs(2);
    let slots = Slots {
        t0: Instant::now() + warm_up + Duration::from_millis(100),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (proxy, swaps, proxy_thread) = start_proxy(
        config(blue, green),
        pinned.then_some(0),
        slots,
        stop.clone(),
    );
    println!(
        "swap_under_load: {rate} req/s over {conns} keep-alive connections for {secs} s, 50 ms slots swapping or quiet at random; {}",
        if pinned {
            "proxy on CPU 0, load and backends on CPU 1"
        } else {
            "unpinned"
        }
    );
    rt.block_on(load(proxy, rate, conns, warm_up.as_secs()));
    let wait = slots.t0.saturating_duration_since(Instant::now());
    std::thread::sleep(wait);
    let started = Instant::now();
    let all = rt.block_on(load(proxy, rate, conns, secs));
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = proxy_thread.join();
    stop_backends.cancel();
    let swapping_time = {
        let n = (elapsed.as_millis() / Slots::SLOT.as_millis()) as u64;
        (0..n)
            .filter(|k| slots.swapping_at(slots.t0 + Slots::SLOT * (*k as u32) + Slots::SLOT / 2))
            .count() as f64
            * Slots::SLOT.as_secs_f64()
    };
    let per_s = swaps.load(Ordering::Relaxed) as f64 / swapping_time.max(1e-9);
    let ratio = |a: u32, b: u32| a as f64 / b.max(1) as f64;
    let split = |from: Instant, to: Instant| {
        let (mut q, mut s) = (Vec::new(), Vec::new());
        for &(took, at) in all.iter().filter(|(_, at)| *at >= from && *at < to) {
            if slots.swapping_at(at) {
                s.push(took);
            } else {
                q.push(took);
            }
        }
        (pcts(&mut q), pcts(&mut s))
    };
    let quarter = elapsed / 4;
    for i in 0..4u32 {
        let (q, s) = split(started + quarter * i, started + quarter * (i + 1));
        println!(
            "quarter {}  quiet    {}\n           swapping {}  p99 {:.3}x",
            i + 1,
            show(q),
            show(s),
            ratio(s.p99, q.p99)
        );
    }
    let (q, s) = split(started, started + elapsed + Duration::from_secs(1));
    println!("all        quiet    {}", show(q));
    println!("           swapping {}", show(s));
    println!(
        "swapping/quiet: p50 {:.3}x  p99 {:.3}x  p99.9 {:.3}x; {per_s:.0} swaps/s while swapping (target: p99 moves < 5 %)",
        ratio(s.p50, q.p50),
        ratio(s.p99, q.p99),
        ratio(s.p999, q.p999),
    );
    let by_slot = slot_latencies(&all, slots);
    let stats = SlotStats::of(&by_slot);
    let (lo, pooled_hi) = stats.interval(Estimate::Pooled);
    println!(
        "pooled p99 ratio {:.3}x, 90 % interval {lo:.3}-{pooled_hi:.3}x (bootstrap over {} slots)",
        stats.estimate(&stats.all(), Estimate::Pooled),
        by_slot.len()
    );
    let (lo, slot_hi) = stats.interval(Estimate::SlotMedian);
    println!(
        "median slot p99 ratio {:.3}x, 90 % interval {lo:.3}-{slot_hi:.3}x (each slot's own p99; a slot a kernel stall hit is one slot of many)",
        stats.estimate(&stats.all(), Estimate::SlotMedian)
    );
    if pooled_hi < 1.05 && slot_hi < 1.05 {
        println!("target (p99 moves < 5 %): met, both intervals end below 1.05x");
    } else {
        println!(
            "target (p99 moves < 5 %): not shown, an interval reaches 1.05x (a longer run, SWAP_BENCH_SECS, narrows them)"
        );
    }
}

/// Each measured slot's latencies and whether it swapped, in slot order.
fn slot_latencies(all: &[(u32, Instant)], slots: Slots) -> Vec<(bool, Vec<u32>)> {
    let mut by: std::collections::BTreeMap<u64, (bool, Vec<u32>)> = Default::default();
    for &(took, at) in all {
        let Some(since) = at.checked_duration_since(slots.t0) else {
            continue;
        };
        let k = (since.as_nanos() / Slots::SLOT.as_nanos()) as u64;
        by.entry(k)
            .or_insert_with(|| (slots.swapping_at(at), Vec::new()))
            .1
            .push(took);
    }
    by.into_values().filter(|(_, v)| !v.is_empty()).collect()
}

/// How the two modes' p99 are compared.
#[derive(Clone, Copy)]
enum Estimate {
    /// p99 over every request of a mode: the target's own words, but a few
    /// slots that met a kernel stall decide it.
    Pooled,
    /// The median over a mode's slots of each slot's p99: what a swap does
    /// to the tail of a typical 50 ms, a stall counting as one slot.
    SlotMedian,
}

/// Slot latencies with each slot's p99, for the estimates and their
/// bootstrap intervals (slots resampled with replacement, so the interval
/// shows how far the verdict would move on another run of the same length).
struct SlotStats<'a> {
    slots: &'a [(bool, Vec<u32>)],
    p99: Vec<u32>,
}

impl<'a> SlotStats<'a> {
    fn of(slots: &'a [(bool, Vec<u32>)]) -> SlotStats<'a> {
        let p99 = slots
            .iter()
            .map(|(_, v)| pcts(&mut v.clone()).p99)
            .collect();
        SlotStats { slots, p99 }
    }

    fn all(&self) -> Vec<usize> {
        (0..self.slots.len()).collect()
    }

    /// swapping / quiet for the slots `pick` (indexes, repeats allowed).
    fn estimate(&self, pick: &[usize], how: Estimate) -> f64 {
        let mut mode = [Vec::new(), Vec::new()];
        for &i in pick {
            let (swapping, v) = &self.slots[i];
            match how {
                Estimate::Pooled => mode[*swapping as usize].extend_from_slice(v),
                Estimate::SlotMedian => mode[*swapping as usize].push(self.p99[i]),
            }
        }
        let [mut quiet, mut swapping] = mode;
        let at = |v: &mut Vec<u32>| {
            let q = match how {
                Estimate::Pooled => 0.99,
                Estimate::SlotMedian => 0.5,
            };
            if v.is_empty() {
                return f64::NAN;
            }
            v.sort_unstable();
            quantile(v, q).max(1) as f64
        };
        at(&mut swapping) / at(&mut quiet)
    }

    /// The 5th and 95th percentiles of the estimate over 200 resamplings
    /// (NaN when the run has no slot of one of the modes).
    fn interval(&self, how: Estimate) -> (f64, f64) {
        let n = self.slots.len();
        if !(self.slots.iter().any(|(s, _)| *s) && self.slots.iter().any(|(s, _)| !*s)) {
            return (f64::NAN, f64::NAN);
        }
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut est: Vec<f64> = (0..200)
            .map(|_| {
                let pick: Vec<usize> = (0..n).map(|_| (next() % n as u64) as usize).collect();
                self.estimate(&pick, how)
            })
            .collect();
        // A resample that drew no slot of one mode has no ratio: NaN, and
        // sorted last; with hundreds of slots of each it does not happen.
        est.sort_by(|a, b| a.total_cmp(b));
        (est[10], est[189])
    }
}

/// The `q` quantile of the sorted `v`, 0 when empty.
fn quantile(v: &[u32], q: f64) -> u32 {
    v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0)
}
