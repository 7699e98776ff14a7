//! The `cyan` binary: CLI, tracing, runtime and signal wiring. Everything
//! reusable lives in the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use cyan::config::Config;
use cyan::server::Server;

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
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // CYAN_LOG takes tracing's filter syntax, e.g. "info,cyan::proxy=debug".
    let filter = EnvFilter::try_from_env("CYAN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
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
        Command::Run { config } => {
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
            rt.block_on(run(cfg, Some(config)))
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
    }
}

fn runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all().thread_name("cyan-worker");
    if let Some(n) = threads {
        b.worker_threads(n);
    }
    b.build()
}

async fn run(cfg: Config, path: Option<PathBuf>) -> ExitCode {
    let server = match Server::start(&cfg).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("cyan: {e}");
            return ExitCode::from(1);
        }
    };
    for l in &cfg.listeners {
        if let Some(addr) = server.local_addr(&l.name) {
            tracing::info!(listener = %l.name, %addr, tls = l.tls.is_some(), "listening");
        }
    }
    tracing::info!(
        version = cyan::VERSION,
        services = cfg.services.len(),
        "cyan is serving"
    );
    wait_for_signals(&server, path.as_deref(), &cfg).await;
    tracing::info!("draining");
    let report = server.shutdown().await;
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

/// Returns when SIGTERM or SIGINT arrives; handles SIGHUP reloads meanwhile.
async fn wait_for_signals(server: &Server, path: Option<&Path>, initial: &Config) {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        _ => {
            tracing::error!("cannot install signal handlers; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => match path {
                Some(p) => reload(server, p, initial),
                None => tracing::info!("SIGHUP ignored: no config file"),
            },
        }
    }
}

fn reload(server: &Server, path: &Path, initial: &Config) {
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload rejected; the live table is unchanged");
            return;
        }
    };
    for (old, new) in initial.listeners.iter().zip(&cfg.listeners) {
        if old.listen != new.listen || old.name != new.name {
            tracing::warn!(listener = %old.name, "listener addresses change only on restart");
        }
    }
    // Certificates first: a bad certificate rejects the whole reload.
    let mut stores = Vec::new();
    for l in &cfg.listeners {
        if let (Some(t), Some((_, resolver))) = (
            &l.tls,
            server.tls_resolvers.iter().find(|(n, _)| n == &l.name),
        ) {
            match cyan::tls::CertStore::load(t) {
                Ok(s) => stores.push((resolver.clone(), s)),
                Err(e) => {
                    tracing::error!(listener = %l.name, error = %e, "reload rejected; the live table is unchanged");
                    return;
                }
            }
        }
    }
    match server.table.replace_config(&cfg) {
        Ok(applied) => {
            for (resolver, store) in stores {
                resolver.store.store(std::sync::Arc::new(store));
            }
            tracing::info!(?applied, "config reloaded");
        }
        Err(e) => tracing::error!(error = %e, "reload rejected; the live table is unchanged"),
    }
}

async fn demo(listen: SocketAddr) -> ExitCode {
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
    let cfg = match cyan::demo::demo_config(listen, &blue, &green) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cyan demo: {e}");
            return ExitCode::from(1);
        }
    };
    let server = match Server::start(&cfg).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cyan demo: {e}\n(another program may hold the port: try `cyan demo --listen 127.0.0.1:18080`)");
            return ExitCode::from(1);
        }
    };
    let addr = server.local_addr("demo").unwrap_or(listen);
    println!("{}", cyan::demo::banner(addr));
    wait_for_signals(&server, None, &cfg).await;
    let report = server.shutdown().await;
    stop.cancel();
    tracing::info!(
        elapsed_ms = report.elapsed.as_millis() as u64,
        "demo stopped"
    );
    ExitCode::SUCCESS
}
