//! Helpers for the extended tier (`tests/extended.rs`, run by
//! `tests/extended.sh`): the real `cyan` binary as a child process with its
//! descriptors, memory and CPU read from `/proc`, side runtimes that keep the
//! measuring client and the backends off the attackers' threads, a control
//! client recording every latency, and the `RESULT|...` rows the script
//! collects.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::Value;

use super::{empty, h1_client, http_get_once, Backend};

/// Scale factor for durations and counts (`CYAN_EXT_SCALE`, default 1.0).
pub fn scale() -> f64 {
    std::env::var("CYAN_EXT_SCALE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(1.0)
}

/// `n` scaled by [`scale`], at least `min`.
pub fn scaled(n: usize, min: usize) -> usize {
    ((n as f64 * scale()).round() as usize).max(min)
}

/// Whether the part `name` of a scenario should run: all do unless
/// `CYAN_EXT_ONLY` lists some (comma-separated; for developing one part).
pub fn part_enabled(name: &str) -> bool {
    match std::env::var("CYAN_EXT_ONLY") {
        Ok(v) if !v.trim().is_empty() => v.split(',').any(|p| p.trim() == name),
        _ => true,
    }
}

/// Raises this process's soft descriptor limit to `want` (capped at the hard
/// limit); returns the limit now in force. Children inherit it.
pub fn raise_nofile(want: u64) -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    let hard = lim.maximum.unwrap_or(u64::MAX);
    let target = want.min(hard);
    if lim.current.is_none_or(|c| c < target) {
        lim.current = Some(target);
        let _ = setrlimit(Resource::Nofile, lim);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// A loopback port free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}

// ---------------------------------------------------------------------------
// Results.
// ---------------------------------------------------------------------------

/// Rows of the results table. Each row is printed at once as
/// `RESULT|name|measured|target|PASS` (or `FAIL`); [`Report::finish`] fails
/// the test if any row failed, after every row was printed.
#[derive(Debug, Default)]
pub struct Report {
    failed: Vec<String>,
}

impl Report {
    pub fn row(&mut self, name: &str, measured: impl std::fmt::Display, target: &str, pass: bool) {
        let verdict = if pass { "PASS" } else { "FAIL" };
        let measured = measured.to_string().replace('|', "/");
        println!("RESULT|{name}|{measured}|{target}|{verdict}");
        if !pass {
            self.failed
                .push(format!("{name}: {measured} (target {target})"));
        }
    }

    pub fn finish(self) {
        assert!(self.failed.is_empty(), "failed: {:#?}", self.failed);
    }

    /// The `<scenario>: after` row every scenario ends with: cyan still
    /// running and serving, its descriptors back to the idle baseline.
    pub async fn after(&mut self, scenario: &str, cyan: &mut Cyan, baseline_fds: usize) {
        let fds = cyan
            .fds_settle(baseline_fds, 0, Duration::from_secs(15))
            .await;
        let alive = cyan.alive() && cyan.serves().await;
        self.row(
            &format!("{scenario}: after"),
            format!("alive {alive}, fds {fds} (baseline {baseline_fds})"),
            "alive, fds back to the idle baseline",
            alive && fds <= baseline_fds,
        );
    }

    /// The `<scenario>: shutdown` row: cyan exits 0 on SIGTERM.
    pub async fn shutdown(&mut self, scenario: &str, cyan: Cyan) {
        let clean = cyan.stop().await;
        self.row(
            &format!("{scenario}: shutdown"),
            format!("exit 0 on SIGTERM: {clean}"),
            "clean exit",
            clean,
        );
    }
}

// ---------------------------------------------------------------------------
// CPU placement.
// ---------------------------------------------------------------------------

/// CPUs this machine has.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `taskset` with `args`; whether it worked (util-linux may be absent).
fn taskset(args: &[&str]) -> bool {
    std::process::Command::new("taskset")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The calling thread's id, from "/proc/thread-self" (a link to
/// "<pid>/task/<tid>").
fn current_tid() -> Option<String> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str().map(str::to_owned)
}

/// Restricts the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> bool {
    current_tid().is_some_and(|tid| taskset(&["-p", "-c", &cpu.to_string(), &tid]))
}

/// Gives the calling thread real-time priority (SCHED_FIFO 1), so it runs
/// the moment it wakes, ahead of every ordinary thread on its CPU. Needs
/// root or CAP_SYS_NICE; whether it worked.
pub fn realtime_current_thread() -> bool {
    let Some(tid) = current_tid() else {
        return false;
    };
    std::process::Command::new("chrt")
        .args(["-f", "-p", "1", &tid])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Where a side runtime's threads run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Placement {
    /// Only on this CPU.
    pub cpu: Option<usize>,
    /// At real-time priority (see [`realtime_current_thread`]).
    pub realtime: bool,
}

/// Restricts every thread of this process to `cpus` (a taskset list, e.g.
/// "1" or "0-1"). Threads created later inherit the mask of their creator.
pub fn pin_process(cpus: &str) -> bool {
    taskset(&["-a", "-p", "-c", cpus, &std::process::id().to_string()])
}

/// Pins every thread of this process to `cpu` until dropped, when all CPUs
/// are given back (the next scenario runs unpinned, even after a panic).
/// `None` when pinning is not possible (one CPU, no taskset).
pub struct ProcessPin(());

impl ProcessPin {
    pub fn to(cpu: usize) -> Option<ProcessPin> {
        (cpus() > cpu && pin_process(&cpu.to_string())).then_some(ProcessPin(()))
    }
}

impl Drop for ProcessPin {
    fn drop(&mut self) {
        pin_process(&format!("0-{}", cpus() - 1));
    }
}

// ---------------------------------------------------------------------------
// Side runtimes.
// ---------------------------------------------------------------------------

/// A tokio runtime of its own (its own worker threads), so what runs on it is
/// not queued behind the test runtime's tasks. Shut down on drop without
/// blocking.
#[derive(Debug)]
pub struct SideRuntime(Option<tokio::runtime::Runtime>);

impl SideRuntime {
    pub fn new(name: &str, workers: usize) -> SideRuntime {
        SideRuntime::on_cpu(name, workers, None)
    }

    /// With `cpu`, every thread of the runtime runs on that CPU only.
    pub fn on_cpu(name: &str, workers: usize, cpu: Option<usize>) -> SideRuntime {
        SideRuntime::placed(
            name,
            workers,
            Placement {
                cpu,
                realtime: false,
            },
        )
    }

    /// A runtime whose threads run where `at` says.
    pub fn placed(name: &str, workers: usize, at: Placement) -> SideRuntime {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers).thread_name(name).enable_all();
        b.on_thread_start(move || {
            if let Some(cpu) = at.cpu {
                pin_current_thread(cpu);
            }
            if at.realtime {
                realtime_current_thread();
            }
        });
        SideRuntime(Some(b.build().expect("side runtime")))
    }

    /// Whether the runtime's worker threads run at real-time priority (asks
    /// one of them).
    pub async fn is_realtime(&self) -> bool {
        self.handle()
            .spawn(async {
                // Field 41 of a thread's stat is its scheduling policy; 1 is
                // SCHED_FIFO. The command name (field 2) may hold spaces.
                std::fs::read_to_string("/proc/thread-self/stat")
                    .ok()
                    .and_then(|s| {
                        let rest = &s[s.rfind(')')? + 2..];
                        rest.split(' ').nth(38).map(|p| p == "1")
                    })
                    .unwrap_or(false)
            })
            .await
            .unwrap_or(false)
    }

    pub fn handle(&self) -> tokio::runtime::Handle {
        self.0.as_ref().expect("runtime").handle().clone()
    }

    /// Starts a backend whose accept loop and connections run here.
    pub async fn backend(&self, color: &'static str) -> Backend {
        self.handle()
            .spawn(Backend::start(color))
            .await
            .expect("backend starts")
    }
}

impl Drop for SideRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

// ---------------------------------------------------------------------------
// The cyan binary as a child process.
// ---------------------------------------------------------------------------

/// Ports for a cyan config: `public`, `tls` (a second listener when used)
/// and the metrics listener.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub public: u16,
    pub tls: u16,
    pub metrics: u16,
}

impl Ports {
    pub fn pick() -> Ports {
        Ports {
            public: free_port(),
            tls: free_port(),
            metrics: free_port(),
        }
    }
}

/// A running `cyan run --config ...` (the binary cargo built with this test).
/// Killed by its PID on drop if still running.
#[derive(Debug)]
pub struct Cyan {
    child: std::process::Child,
    pub dir: PathBuf,
    pub ports: Ports,
    pub public: SocketAddr,
    pub metrics: SocketAddr,
}

impl Cyan {
    /// Writes `config` to `dir/cyan.toml`, starts cyan on it (log in
    /// `dir/cyan.log`) and waits until its metrics and public listeners
    /// answer.
    pub async fn start(dir: &Path, ports: Ports, config: &str) -> Cyan {
        Cyan::start_on(dir, ports, config, None).await
    }

    /// [`Cyan::start`], with cyan's threads on `cpu` only (`taskset`).
    pub async fn start_on(dir: &Path, ports: Ports, config: &str, cpu: Option<usize>) -> Cyan {
        let path = dir.join("cyan.toml");
        std::fs::write(&path, config).expect("write config");
        let log = std::fs::File::create(dir.join("cyan.log")).expect("log file");
        let mut cmd = match cpu {
            Some(cpu) => {
                let mut c = std::process::Command::new("taskset");
                c.args(["-c", &cpu.to_string()])
                    .arg(crate::support::cyan_exe());
                c
            }
            None => std::process::Command::new(crate::support::cyan_exe()),
        };
        let child = cmd
            .arg("run")
            .arg("--config")
            .arg(&path)
            .arg("--fresh-state")
            .env("CYAN_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn cyan");
        // tests/extended.sh stops whatever is listed here and still runs
        // when it ends (should this process die without its destructors).
        if let Ok(list) = std::env::var("CYAN_EXT_PIDFILE") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(list)
            {
                let _ = writeln!(f, "{}", child.id());
            }
        }
        let mut cyan = Cyan {
            child,
            dir: dir.to_path_buf(),
            ports,
            public: SocketAddr::from(([127, 0, 0, 1], ports.public)),
            metrics: SocketAddr::from(([127, 0, 0, 1], ports.metrics)),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            assert!(
                cyan.alive(),
                "cyan exited at start: {}",
                std::fs::read_to_string(dir.join("cyan.log")).unwrap_or_default()
            );
            let ready = matches!(http_get_once(cyan.metrics, "/readyz").await, Ok((200, _)))
                && tokio::net::TcpStream::connect(cyan.public).await.is_ok();
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "cyan not ready within 15 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cyan
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Open descriptors of the process.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Resident set size in bytes.
    pub fn rss(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// CPU time (user + system) used so far.
    pub fn cpu(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Duration::from_millis((field(11) + field(12)) * 10) // USER_HZ = 100
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    /// One admin API call over the Unix socket.
    pub async fn admin(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), String> {
        let target = cyan::ctl::Target::Socket(self.admin_socket());
        cyan::ctl::call(&target, method, path, body).await
    }

    /// Sets the candidate share of service `gateway`; panics unless applied.
    pub async fn set_split(&self, percent: f64) {
        let (s, v) = self
            .admin(
                Method::PUT,
                "/v1/services/gateway/split",
                Some(serde_json::json!({ "candidate_percent": percent })),
            )
            .await
            .expect("admin answers");
        assert_eq!(s, 200, "split {percent}: {v}");
    }

    /// `/metrics` of the metrics listener.
    pub async fn scrape(&self) -> std::io::Result<String> {
        let (status, body) = http_get_once(self.metrics, "/metrics").await?;
        if status != 200 {
            return Err(std::io::Error::other(format!("/metrics answered {status}")));
        }
        Ok(body)
    }

    /// The sum of a metric's samples whose labels contain every `label="v"`.
    pub async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let text = self.scrape().await.unwrap_or_default();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter(|l| labels.iter().all(|lab| l.contains(lab)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// A plain GET through the public listener answers 200.
    pub async fn serves(&self) -> bool {
        matches!(http_get_once(self.public, "/").await, Ok((200, _)))
    }

    /// The descriptor count once nothing is connected: measured right after
    /// the start, before any request (no client or pooled upstream
    /// connection yet).
    pub async fn idle_fds(&self) -> usize {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.fds()
    }

    /// Waits (up to `within`) for the descriptor count to come back to at
    /// most `baseline + slack`; returns the last count seen.
    pub async fn fds_settle(&self, baseline: usize, slack: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let n = self.fds();
            if n <= baseline + slack || Instant::now() >= deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM by PID, then waits up to 10 s (SIGKILL after that). Returns
    /// whether it exited 0 on its own.
    pub async fn stop(mut self) -> bool {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).expect("pid");
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The end of cyan's log (for failure messages).
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("cyan.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Cyan {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `[runtime]`, `[metrics]`, `[admin]` and `[state]` sections of a cyan
/// config rooted in `dir`.
pub fn base_sections(dir: &Path, ports: Ports) -> String {
    format!(
        r#"
[runtime]
drain_timeout = "3s"
worker_threads = 2

[metrics]
listen = "127.0.0.1:{metrics}"

[admin]
socket = "{sock}"

[state]
dir = "{state}"
"#,
        metrics = ports.metrics,
        sock = dir.join("admin.sock").display(),
        state = dir.join("state").display(),
    )
}

/// A service `gateway` over one blue and one green backend.
pub fn gateway_service(percent: f64, blue: &Backend, green: &Backend, extra: &str) -> String {
    format!(
        r#"
[[service]]
name = "gateway"
candidate_percent = {percent}
{extra}
blue  = {{ endpoints = ["{blue}"] }}
green = {{ endpoints = ["{green}"] }}
"#,
        blue = blue.addr,
        green = green.addr,
    )
}

// ---------------------------------------------------------------------------
// Control traffic with latencies.
// ---------------------------------------------------------------------------

/// One control request: when it started, how long it took, whether it got a
/// 200 with its whole body.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    pub took: Duration,
    pub ok: bool,
}

/// Latency summary of a window of samples.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    pub n: usize,
    pub failed: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p99 {:.2} ms (p50 {:.2}, max {:.1}, n {}, failed {})",
            self.p99.as_secs_f64() * 1e3,
            self.p50.as_secs_f64() * 1e3,
            self.max.as_secs_f64() * 1e3,
            self.n,
            self.failed
        )
    }
}

/// A normal client: one keep-alive HTTP/1.1 connection doing `GET /` one
/// request after the other (a pause of `pace` between them) on a runtime of
/// its own, recording every latency.
#[derive(Debug)]
pub struct Control {
    samples: Arc<Mutex<Vec<Sample>>>,
    paused: Arc<AtomicBool>,
    /// The first few failures, described.
    failures: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    _rt: SideRuntime,
}

impl Control {
    pub fn start(proxy: SocketAddr, pace: Duration) -> Control {
        Control::start_on(proxy, pace, Placement::default())
    }

    /// Whether its thread runs at real-time priority.
    pub async fn is_realtime(&self) -> bool {
        self._rt.is_realtime().await
    }

    /// [`Control::start`], its thread placed by `at`.
    pub fn start_on(proxy: SocketAddr, pace: Duration, at: Placement) -> Control {
        let rt = SideRuntime::placed("control", 1, at);
        let samples = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let (s, st, fl, pa) = (
            samples.clone(),
            stop.clone(),
            failures.clone(),
            paused.clone(),
        );
        let task = rt.handle().spawn(async move {
            let client = h1_client();
            while !st.load(Ordering::SeqCst) {
                if pa.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                let req = http::Request::get(format!("http://{proxy}/"))
                    .body(empty())
                    .unwrap();
                let at = Instant::now();
                let outcome = tokio::time::timeout(Duration::from_secs(5), async {
                    let r = client.request(req).await.map_err(|e| format!("{e:?}"))?;
                    let status = r.status();
                    let body = http_body_util::BodyExt::collect(r.into_body())
                        .await
                        .map_err(|e| format!("body: {e:?}"))?
                        .to_bytes();
                    if status == 200 {
                        Ok(())
                    } else {
                        Err(format!(
                            "{status}: {}",
                            String::from_utf8_lossy(&body).trim()
                        ))
                    }
                })
                .await
                .unwrap_or_else(|_| Err("no answer within 5 s".into()));
                let took = at.elapsed();
                let ok = outcome.is_ok();
                if let Err(e) = outcome {
                    let mut f = fl.lock().unwrap();
                    if f.len() < 5 {
                        f.push(format!("after {took:?}: {e}"));
                    }
                }
                s.lock().unwrap().push(Sample { at, took, ok });
                tokio::time::sleep(pace).await;
            }
        });
        Control {
            samples,
            paused,
            failures,
            stop,
            task,
            _rt: rt,
        }
    }

    /// Latencies of the requests started in `[from, to)`.
    pub fn window(&self, from: Instant, to: Instant) -> Latency {
        self.windows(&[(from, to)])
    }

    /// Latencies of the requests started in any of the `[from, to)` spans,
    /// taken together.
    pub fn windows(&self, spans: &[(Instant, Instant)]) -> Latency {
        let within = |s: &Sample| spans.iter().any(|&(from, to)| s.at >= from && s.at < to);
        let all = self.samples.lock().unwrap();
        let mut took: Vec<Duration> = all.iter().filter(|s| within(s)).map(|s| s.took).collect();
        let failed = all.iter().filter(|s| within(s) && !s.ok).count();
        took.sort();
        let pick = |q: f64| -> Duration {
            if took.is_empty() {
                return Duration::ZERO;
            }
            let i = ((took.len() as f64 * q).ceil() as usize).clamp(1, took.len()) - 1;
            took[i]
        };
        Latency {
            n: took.len(),
            failed,
            p50: pick(0.50),
            p99: pick(0.99),
            max: took.last().copied().unwrap_or_default(),
        }
    }

    /// Requests started in `[from, to)` slower than `over`: (start offset
    /// from `from`, duration), for diagnosis.
    pub fn slow(&self, from: Instant, to: Instant, over: Duration) -> Vec<(Duration, Duration)> {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.at >= from && s.at < to && s.took > over)
            .map(|s| (s.at - from, s.took))
            .collect()
    }

    /// Stops (or resumes) sending; its keep-alive connection stays until
    /// the proxy closes it.
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    /// The first few failures seen, described.
    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    pub async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
    }
}

// ---------------------------------------------------------------------------
// A cheap bulk backend.
// ---------------------------------------------------------------------------

/// A backend answering `/big/<n>` with `n` bytes made of one shared 64 KiB
/// chunk (no per-byte work, unlike [`Backend`]'s `/big/`), on `rt`. For
/// attacks that make the proxy pull a lot of data; any other path reads the
/// request body to its end and answers empty (a sink for slow uploads). Its sockets use an
/// Ethernet-sized MSS and a 64 KiB send buffer, as a backend across a
/// network would: over loopback's 64 KiB MSS the kernel buffers megabytes
/// per connection, which only measures the loopback.
pub async fn bulk_backend(rt: &SideRuntime) -> SocketAddr {
    use http_body_util::Either;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.set_tcp_mss(1460).expect("mss");
    sock.set_reuse_address(true).expect("reuse");
    sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind bulk backend");
    sock.listen(4096).expect("listen");
    sock.set_nonblocking(true).expect("nonblocking");
    let std_listener = std::net::TcpListener::from(sock);
    let addr = std_listener.local_addr().expect("addr");
    let listener = {
        let _guard = rt.handle().enter();
        tokio::net::TcpListener::from_std(std_listener).expect("listener")
    };
    let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
    rt.handle().spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = socket2::SockRef::from(&stream).set_send_buffer_size(64 * 1024);
            let chunk = chunk.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let chunk = chunk.clone();
                    async move {
                        // Anything else than /big/: the request body is read
                        // to its end before the (empty) answer.
                        if !req.uri().path().starts_with("/big/") {
                            let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                            let empty = http_body_util::Empty::<bytes::Bytes>::new();
                            return Ok(http::Response::new(Either::Left(empty)));
                        }
                        let n: u64 = req
                            .uri()
                            .path()
                            .strip_prefix("/big/")
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(0);
                        let full = n / chunk.len() as u64;
                        let rest = (n % chunk.len() as u64) as usize;
                        let frames = (0..full)
                            .map(move |_| chunk.clone())
                            .chain((rest > 0).then(|| bytes::Bytes::from(vec![b'x'; rest])))
                            .map(|c| Ok::<_, std::convert::Infallible>(http_body::Frame::data(c)));
                        let body =
                            http_body_util::StreamBody::new(futures_util::stream::iter(frames));
                        let mut resp = http::Response::new(Either::Right(body));
                        resp.headers_mut()
                            .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(n));
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}
