//! The `cyan` binary: CLI, tracing, runtime and signal wiring. Everything
//! reusable lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use cyan::app::App;
use cyan::config::Config;
use cyan::control::Controller;
use cyan::ctl::{Options, Target, Verb};

/// mimalloc, not glibc's malloc. A proxied request makes about a dozen
/// short-lived allocations (header maps, buffers, the boxed request
/// future); glibc's malloc and free were ~4k instructions of each request
/// (callgrind), and its heap-top trimming could give back and take again
/// 132 KiB around one request's box, a `brk` pair every 8 requests
/// (`strace -c`, 3,741 `brk` in 20,000 requests).
///
/// Called through [`Alloc`], not `mimalloc::MiMalloc`: that one asks for
/// every block through `mi_malloc_aligned`, whose fast path only serves
/// blocks up to 1 KiB; a larger one (the request's future, a header map's
/// entries, read buffers: about four per request) went through an
/// over-allocating aligned path, ~250 instructions more each (callgrind).
#[global_allocator]
static GLOBAL: Alloc = Alloc;

/// mimalloc with the plain entry points for the alignments they already
/// give (every block of 16 bytes or more is 16-aligned, smaller ones are
/// aligned to their size), and the aligned ones for the rest: the rule
/// std's own `System` allocator follows on top of `malloc`.
struct Alloc;

/// The alignment mimalloc's plain `mi_malloc` guarantees (`MI_MAX_ALIGN_SIZE`).
const PLAIN_ALIGN: usize = 16;

impl Alloc {
    #[inline]
    fn plain(align: usize, size: usize) -> bool {
        align <= PLAIN_ALIGN && align <= size
    }
}

// SAFETY: every call passes the caller's layout on to mimalloc, through an
// entry point that returns memory of at least that size and alignment (the
// aligned ones for any alignment the plain ones do not guarantee), or null;
// memory from either family is freed and reallocated by mimalloc.
unsafe impl std::alloc::GlobalAlloc for Alloc {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if Alloc::plain(layout.align(), layout.size()) {
            libmimalloc_sys::mi_malloc(layout.size()).cast()
        } else {
            libmimalloc_sys::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if Alloc::plain(layout.align(), layout.size()) {
            libmimalloc_sys::mi_zalloc(layout.size()).cast()
        } else {
            libmimalloc_sys::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        libmimalloc_sys::mi_free(ptr.cast());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        if Alloc::plain(layout.align(), new_size) {
            libmimalloc_sys::mi_realloc(ptr.cast(), new_size).cast()
        } else {
            libmimalloc_sys::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
        }
    }
}

/// cyan — blue/green traffic-switching reverse proxy for API-gateway upgrades.
#[derive(Debug, Parser)]
#[command(name = "cyan", version, about, long_about = None)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy. SIGHUP re-reads the config (the live split and
    /// endpoint states are kept); SIGTERM/SIGINT drain and exit 0.
    Run {
        /// Config file (TOML); see config/cyan.example.toml.
        #[arg(long, short)]
        config: PathBuf,
        /// Ignore the persisted state file and start from the config's
        /// values (the file is overwritten on the next change).
        #[arg(long)]
        fresh_state: bool,
        /// Take the listening sockets over from the cyan running with this
        /// config (via `[runtime] upgrade_socket`); it drains and exits once
        /// this one serves. No connection is refused in between.
        /// `--upgrade` (= `--upgrade=required`) fails, nothing changed, when
        /// no cyan answers; `--upgrade=auto` then starts normally (only when
        /// the socket file is missing or nothing listens on it; any other
        /// failure still exits 1). `auto` is for the systemd template unit
        /// deploy/systemd/cyan@.service.
        #[arg(
            long,
            value_enum,
            value_name = "MODE",
            num_args = 0..=1,
            require_equals = true,
            default_missing_value = "required"
        )]
        upgrade: Option<UpgradeMode>,
    },
    /// Validate a config file: exit 0, or 1 with every problem listed by key.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start two built-in demo backend pools (blue, green) and the proxy in
    /// front of them. Nothing else needs to be installed.
    Demo {
        /// Where the proxy listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Operate a running cyan over its admin API. Exit codes: 0 ok,
    /// 1 error, 2 usage, 3 conflict (stale --if-generation, nothing changed).
    Ctl(CtlArgs),
    /// A backend for fault-injection tests (see `cyan::demo::start_test_backend`):
    /// prints `listening <addr>`, then `recv <id>` / `done <id>` per request
    /// carrying `x-test-id`; exits when its stdin closes.
    #[command(hide = true)]
    TestBackend {
        #[arg(long, default_value = "green")]
        color: String,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Holds every answer's head back this many milliseconds.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
}

/// How `cyan run --upgrade` finds its sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum UpgradeMode {
    /// From the running cyan, or not at all (exit 1, nothing changed).
    Required,
    /// From the running cyan if one answers, else bound anew.
    Auto,
}

#[derive(Debug, clap::Args)]
struct CtlArgs {
    /// Admin Unix socket.
    #[arg(
        long,
        env = "CYAN_ADMIN_SOCKET",
        default_value = "/run/cyan/admin.sock",
        conflicts_with = "url"
    )]
    socket: PathBuf,
    /// TCP admin API base URL (http://127.0.0.1:9901) instead of the socket.
    #[arg(long, requires = "token_file")]
    url: Option<String>,
    /// File holding the bearer token for --url.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Why: recorded in the audit log.
    #[arg(long, global = true)]
    reason: Option<String>,
    /// Apply only if the live table is still at this generation (else exit 3).
    #[arg(long, global = true)]
    if_generation: Option<u64>,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    verb: CtlVerb,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum CtlVerb {
    /// What is live: generation, each service's split and endpoints.
    Status,
    /// Set the candidate's share of SERVICE to PERCENT (0..100, two decimals).
    Split { service: String, percent: f64 },
    /// The candidate takes 100% and becomes the stable color.
    Promote { service: String },
    /// The stable color takes 100%.
    Rollback { service: String },
    /// Stop sending new requests to an endpoint (in-flight ones finish).
    Drain { service: String, address: String },
    /// Let a drained endpoint take requests again.
    Undrain { service: String, address: String },
    /// The audit log: who changed what, when and why.
    Events {
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
    },
    /// Re-read the config file (the live split is kept).
    Reload,
    /// Drive SERVICE's progressive rollout (the plan is in its config).
    Rollout {
        #[arg(value_enum)]
        op: RolloutVerb,
        service: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RolloutVerb {
    /// Run the preflight checks, then start at the plan's first step.
    Start,
    /// Stop the hold timer; the share stays where it is.
    Pause,
    /// Continue the hold timer.
    Resume,
    /// End the rollout; the stable color takes 100%.
    Abort,
    /// Show the step, the hold and any rollback latch.
    Status,
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // CYAN_LOG takes tracing's filter syntax, e.g. "info,cyan::proxy=debug".
    // rustls warns on every handshake whose SNI is an IP address (common
    // from health checkers and load tools): errors only, unless asked.
    let filter =
        EnvFilter::try_from_env("CYAN_LOG").unwrap_or_else(|_| EnvFilter::new("info,rustls=error"));
    // Colours only on a terminal: under systemd (or any pipe) escape codes
    // would end up in the journal and the log files as bytes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let journal = stderr_is_journal();
    match format {
        LogFormat::Text => builder
            .map_event_format(|inner| JournalPriority { inner, journal })
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .map_event_format(|inner| JournalPriority { inner, journal })
            .init(),
    }
}

/// Whether stderr is systemd's journal stream: `JOURNAL_STREAM` names its
/// device and inode (systemd.exec(5)); a stderr redirected elsewhere by a
/// child of the service does not match.
fn stderr_is_journal() -> bool {
    let Some(want) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(st) = rustix::fs::fstat(std::io::stderr()) else {
        return false;
    };
    want.to_str() == Some(&format!("{}:{}", st.st_dev, st.st_ino))
}

/// Prefixes each log line with its syslog priority (`<3>` error, `<4>`
/// warning, `<6>` info, `<7>` debug) when stderr is the journal, which
/// reads the prefix as the entry's PRIORITY (sd-daemon(3)): `journalctl -p
/// warning -u cyan` then shows cyan's warnings and errors, not every line
/// at "info".
struct JournalPriority<F> {
    inner: F,
    journal: bool,
}

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for JournalPriority<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        if self.journal {
            let priority = match *event.metadata().level() {
                tracing::Level::ERROR => 3,
                tracing::Level::WARN => 4,
                tracing::Level::INFO => 6,
                _ => 7,
            };
            write!(writer, "<{priority}>")?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} listener(s), {} service(s))",
                    config.display(),
                    c.listeners.len(),
                    c.services.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        },
        Command::Ctl(args) => ctl(args),
        Command::Run {
            config,
            fresh_state,
            upgrade,
        } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(1);
                }
            };
            let rt = match runtime(cfg.runtime.worker_threads) {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            rt.block_on(run(cfg, config, fresh_state, upgrade))
        }
        Command::Demo { listen } => {
            let rt = match runtime(None) {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            rt.block_on(demo(listen))
        }
        Command::TestBackend {
            color,
            listen,
            delay_ms,
        } => {
            let rt = match runtime(None) {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            rt.block_on(test_backend(color, listen, delay_ms))
        }
    }
}

/// The runtime for `threads` worker threads (`None`: one per core). One
/// thread gets tokio's current-thread scheduler: every task, the accept
/// loops included, runs on the thread that calls `block_on`, with no
/// work-stealing bookkeeping and no cross-thread wake-ups (measured: fewer
/// instructions per proxied request than a one-worker multi-thread runtime,
/// see benches/README.md "Profile").
fn runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    if threads == Some(1) {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
    }
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all().thread_name("cyan-worker");
    if let Some(n) = threads {
        b.worker_threads(n);
    }
    b.build()
}

async fn run(
    cfg: Config,
    path: PathBuf,
    fresh_state: bool,
    upgrade: Option<UpgradeMode>,
) -> ExitCode {
    use cyan::upgrade::Takeover;
    let signals = Signals::install();
    let (inherited, predecessor) = if let Some(mode) = upgrade {
        let Some(sock) = cfg.runtime.upgrade_socket.clone() else {
            eprintln!("cyan: --upgrade needs [runtime] upgrade_socket in the config");
            return ExitCode::from(1);
        };
        let asked = sock.clone();
        let answer = tokio::task::spawn_blocking(move || match mode {
            UpgradeMode::Required => cyan::upgrade::request(&sock)
                .map(|(inherited, stream)| Takeover::HandedOver(inherited, stream)),
            UpgradeMode::Auto => cyan::upgrade::request_if_running(&sock),
        })
        .await;
        match answer {
            Ok(Ok(Takeover::HandedOver(inherited, stream))) => {
                tracing::info!(
                    sockets = inherited.fds.len(),
                    "took the listening sockets over"
                );
                (inherited, Some(stream))
            }
            Ok(Ok(Takeover::NoPredecessor(why))) => {
                tracing::info!(
                    socket = %asked.display(),
                    reason = %why,
                    "--upgrade=auto: no cyan runs on the upgrade socket; starting normally"
                );
                (Default::default(), None)
            }
            Ok(Err(e)) => {
                eprintln!("cyan: upgrade failed, nothing changed: {e}");
                return ExitCode::from(1);
            }
            Err(e) => {
                eprintln!("cyan: upgrade failed: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        (Default::default(), None)
    };
    let app = match App::start_inheriting(cfg.clone(), Some(path), fresh_state, inherited).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("cyan: {e}");
            return ExitCode::from(1);
        }
    };
    for l in &cfg.listeners {
        if let Some(addr) = app.server.local_addr(&l.name) {
            tracing::info!(listener = %l.name, %addr, tls = l.tls.is_some(), "listening");
        }
    }
    if let Some(a) = &app.admin {
        if let Some(p) = &a.socket {
            tracing::info!(socket = %p.display(), "admin API on the Unix socket");
        }
        if let Some(addr) = a.tcp_addr {
            tracing::info!(%addr, "admin API on TCP (bearer tokens)");
        }
    }
    tracing::info!(
        version = cyan::VERSION,
        services = cfg.services.len(),
        "cyan is serving"
    );
    let status = if let Some(stream) = predecessor {
        if let Err(e) = cyan::upgrade::ready(stream) {
            tracing::warn!(error = %e, "could not tell the previous process we are ready; it keeps serving too");
        }
        "serving (took the sockets over from the previous process)"
    } else {
        "serving"
    };
    sd_notify(&format!("READY=1\nSTATUS={status}"));
    let why = tokio::select! {
        _ = wait_for_signals(signals, Some(&app.controller)) => "stop signal",
        _ = app.upgraded.cancelled() => {
            tracing::info!("handed over to the new process");
            "handed over to the new process"
        }
    };
    sd_notify(&format!("STOPPING=1\nSTATUS=draining ({why})"));
    tracing::info!("draining");
    let report = app.shutdown().await;
    if report.abandoned > 0 {
        tracing::warn!(
            abandoned = report.abandoned,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "drain deadline passed; remaining connections reset"
        );
    } else {
        tracing::info!(elapsed_ms = report.elapsed.as_millis() as u64, "drained");
    }
    ExitCode::SUCCESS
}

/// Reports to systemd (`Type=notify` units); nothing outside systemd.
fn sd_notify(state: &str) {
    if let Err(e) = cyan::upgrade::notify_systemd(state) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// SIGTERM, SIGINT and SIGHUP, caught from the moment this is built. `run`
/// builds it before anything is listening: a SIGHUP that arrived between
/// the admin socket coming up and the handlers being installed used to
/// take the default action and kill the process (a reload sent right after
/// start, as a test and a quick operator can).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Returns when SIGTERM or SIGINT arrives; SIGHUP reloads meanwhile.
async fn wait_for_signals(signals: std::io::Result<Signals>, controller: Option<&Controller>) {
    let Ok(Signals {
        mut term,
        mut int,
        mut hup,
    }) = signals
    else {
        tracing::error!("cannot install signal handlers; stopping on Ctrl-C only");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => match controller {
                // Errors are logged, counted and audited by reload itself.
                Some(c) => { let _ = c.reload("signal:SIGHUP"); }
                None => tracing::info!("SIGHUP ignored: no config file"),
            },
        }
    }
}

fn ctl(args: CtlArgs) -> ExitCode {
    let target = match (&args.url, &args.token_file) {
        (Some(url), Some(file)) => match std::fs::read_to_string(file) {
            Ok(t) => Target::Url {
                base: url.clone(),
                token: t.trim().to_string(),
            },
            Err(e) => {
                eprintln!("cyan ctl: cannot read {}: {e}", file.display());
                return ExitCode::from(1);
            }
        },
        _ => Target::Socket(args.socket.clone()),
    };
    let verb = match args.verb {
        CtlVerb::Status => Verb::Status,
        CtlVerb::Split { service, percent } => Verb::Split { service, percent },
        CtlVerb::Promote { service } => Verb::Promote { service },
        CtlVerb::Rollback { service } => Verb::Rollback { service },
        CtlVerb::Drain { service, address } => Verb::Drain {
            service,
            addr: address,
        },
        CtlVerb::Undrain { service, address } => Verb::Undrain {
            service,
            addr: address,
        },
        CtlVerb::Events { since } => Verb::Events { since },
        CtlVerb::Reload => Verb::Reload,
        CtlVerb::Rollout { op, service } => Verb::Rollout {
            op: format!("{op:?}").to_lowercase(),
            service,
        },
    };
    let opts = Options {
        reason: args.reason,
        if_generation: args.if_generation,
        json: matches!(args.output, Output::Json),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cyan ctl: {e}");
            return ExitCode::from(1);
        }
    };
    ExitCode::from(rt.block_on(cyan::ctl::run(&target, &verb, &opts)))
}

async fn demo(listen: SocketAddr) -> ExitCode {
    let signals = Signals::install();
    let stop = CancellationToken::new();
    let any: SocketAddr = ([127, 0, 0, 1], 0).into();
    let mut blue = Vec::new();
    let mut green = Vec::new();
    for _ in 0..2 {
        match (
            cyan::demo::start_backend("blue", any, stop.clone()).await,
            cyan::demo::start_backend("green", any, stop.clone()).await,
        ) {
            (Ok(b), Ok(g)) => {
                blue.push(b);
                green.push(g);
            }
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("cyan demo: cannot start a demo backend: {e}");
                return ExitCode::from(1);
            }
        }
    }
    let socket = cyan::demo::demo_socket();
    let cfg = match cyan::demo::demo_config(listen, &socket, &blue, &green) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cyan demo: {e}");
            return ExitCode::from(1);
        }
    };
    let app = match App::start(cfg, None, false).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cyan demo: {e}\n(another program may hold the port: try `cyan demo --listen 127.0.0.1:18080`)");
            return ExitCode::from(1);
        }
    };
    let addr = app.server.local_addr("demo").unwrap_or(listen);
    println!("{}", cyan::demo::banner(addr, &socket, app.metrics_addr));
    wait_for_signals(signals, None).await;
    let report = app.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    stop.cancel();
    tracing::info!(
        elapsed_ms = report.elapsed.as_millis() as u64,
        "demo stopped"
    );
    ExitCode::SUCCESS
}

async fn test_backend(color: String, listen: SocketAddr, delay_ms: u64) -> ExitCode {
    use std::io::{Read, Write};
    let signals = Signals::install();
    // One write per line straight to the pipe (stdout is line-buffered): a
    // line reported is readable by the parent even after a SIGKILL.
    let seen: cyan::demo::SeenHook = std::sync::Arc::new(|line: &str| {
        let _ = writeln!(std::io::stdout().lock(), "{line}");
    });
    let stop = CancellationToken::new();
    let backend = cyan::demo::TestBackend {
        color: color.into(),
        delay: std::time::Duration::from_millis(delay_ms),
        seen: Some(seen),
    };
    let addr = match backend.start(listen, stop.clone()).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cyan test-backend: cannot listen on {listen}: {e}");
            return ExitCode::from(1);
        }
    };
    println!("listening {addr}");
    // The parent holds our stdin: when it goes away, so do we.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    tokio::select! {
        _ = rx => {}
        _ = wait_for_signals(signals, None) => {}
    }
    stop.cancel();
    ExitCode::SUCCESS
}
