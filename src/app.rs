//! A whole cyan instance, assembled in one place so the binary and the
//! end-to-end tests start it the same way:
//!
//! state dir (audit + state file) → table (config, then persisted state on
//! top) → listeners → controller → admin API.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use crate::admin::{self, AdminServer};
use crate::config::Config;
use crate::control::Controller;
use crate::metrics::Metrics;
use crate::server::{DrainReport, Server};
use crate::state::{restore, StateStore};
use crate::table::{RoutingTable, Table};
use crate::upgrade::Inherited;

/// A running instance.
#[derive(Debug)]
pub struct App {
    pub server: Server,
    pub controller: Arc<Controller>,
    pub admin: Option<AdminServer>,
    /// The metrics/health listener's address, when configured.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// `/readyz`: true once serving, false from the start of the drain.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// Stops the metrics listener after the drain (it answers 503 meanwhile).
    metrics_stop: tokio_util::sync::CancellationToken,
    /// Cancelled when a successor has taken the sockets over and is ready:
    /// time to drain and exit.
    pub upgraded: tokio_util::sync::CancellationToken,
    handed_over: Arc<std::sync::atomic::AtomicBool>,
}

impl App {
    /// Starts everything `config` describes. `fresh` ignores a persisted
    /// state file (`cyan run --fresh-state`).
    pub async fn start(
        config: Config,
        config_path: Option<PathBuf>,
        fresh: bool,
    ) -> Result<App, String> {
        App::start_inheriting(config, config_path, fresh, Inherited::default()).await
    }

    /// Like [`App::start`], on sockets handed over by a previous process
    /// (`cyan run --upgrade`).
    pub async fn start_inheriting(
        config: Config,
        config_path: Option<PathBuf>,
        fresh: bool,
        mut inherited: Inherited,
    ) -> Result<App, String> {
        let metrics = Metrics::new();
        let (store, state) = match &config.state_dir {
            Some(dir) => StateStore::open(dir, fresh).map_err(|e| e.to_string())?,
            None => {
                tracing::warn!("no [state] dir: changes are not persisted and a restart starts from the config");
                (StateStore::memory(), None)
            }
        };
        let mut table = RoutingTable::build(&config, &metrics, None, 1)?;
        if let Some(state) = &state {
            for note in restore(&mut table, state) {
                tracing::warn!("{note}");
            }
            tracing::info!(
                generation = table.generation,
                written_at = %state.written_at,
                "resumed from the state file: its split and endpoint states win over the config's initial values"
            );
        } else if fresh {
            tracing::warn!("--fresh-state: starting from the config; the state file is overwritten on the next change");
        }
        let store = Arc::new(store);
        if let Err(e) = store.persist(&table) {
            return Err(format!("cannot write the state file: {e}"));
        }
        let table = Arc::new(Table::from_table(table, metrics));
        table.set_sink(store.clone());
        let server = Server::start_with(&config, table, &mut inherited)
            .await
            .map_err(|e| e.to_string())?;
        let controller = Arc::new(Controller::new(&server, store, config.clone(), config_path));
        crate::health::spawn_supervisor(server.table.clone(), server.shutdown_token());
        crate::rollout::spawn_driver(server.table.clone(), server.shutdown_token());
        let admin = match &config.admin {
            Some(a) => Some(
                admin::start(
                    a,
                    controller.clone(),
                    server.shutdown_token(),
                    &mut inherited,
                )
                .await
                .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let metrics_stop = tokio_util::sync::CancellationToken::new();
        // Everything a successor would take over.
        let mut sockets: Vec<(String, OwnedFd)> = Vec::new();
        for (name, fd) in &server.listener_fds {
            if let Ok(fd) = fd.try_clone() {
                sockets.push((name.clone(), fd));
            }
        }
        let metrics_addr = match config.metrics_listen {
            Some(addr) => {
                let (local, fd) = crate::observe::start(
                    addr,
                    inherited.take("metrics"),
                    server.metrics.clone(),
                    ready.clone(),
                    metrics_stop.clone(),
                )
                .await
                .map_err(|e| format!("metrics listener {addr}: {e}"))?;
                sockets.push(("metrics".into(), fd));
                Some(local)
            }
            None => None,
        };
        let handed_over = admin
            .as_ref()
            .map(|a| a.handed_over.clone())
            .unwrap_or_default();
        if let Some(a) = &admin {
            for (name, fd) in &a.fds {
                if let Ok(fd) = fd.try_clone() {
                    sockets.push((name.clone(), fd));
                }
            }
        }
        let upgraded = tokio_util::sync::CancellationToken::new();
        if let Some(path) = &config.runtime.upgrade_socket {
            let listener = match inherited.take("upgrade") {
                Some(fd) => {
                    let l = std::os::unix::net::UnixListener::from(fd);
                    l.set_nonblocking(true)
                        .and_then(|_| tokio::net::UnixListener::from_std(l))
                        .map_err(|e| format!("upgrade socket {}: {e}", path.display()))?
                }
                None => admin::bind_unix(path).map_err(|e| e.to_string())?,
            };
            use std::os::fd::AsFd;
            if let Ok(fd) = listener.as_fd().try_clone_to_owned() {
                sockets.push(("upgrade".into(), fd));
            }
            spawn_hand_over(
                listener,
                sockets,
                upgraded.clone(),
                handed_over.clone(),
                ready.clone(),
                server.shutdown_token(),
            );
        }
        // Config loaded, listeners bound, state restored: ready.
        ready.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(App {
            server,
            controller,
            admin,
            metrics_addr,
            ready,
            metrics_stop,
            upgraded,
            handed_over,
        })
    }

    /// Drains and stops; the admin socket file is removed. Readiness flips
    /// first so load balancers stop sending new connections.
    pub async fn shutdown(self) -> DrainReport {
        self.ready.store(false, std::sync::atomic::Ordering::SeqCst);
        let table = self.server.table.clone();
        let report = self.server.shutdown().await;
        // A change the drivers were committing as the drain ended is
        // written before the process goes (a restart must find it).
        table.settle();
        self.metrics_stop.cancel();
        // After a hand-over the socket files are the successor's.
        if !self.handed_over.load(std::sync::atomic::Ordering::SeqCst) {
            if let Some(path) = self.admin.as_ref().and_then(|a| a.socket.as_ref()) {
                let _ = std::fs::remove_file(path);
            }
        }
        report
    }
}

/// Serves hand-over requests on the upgrade socket: each successor gets the
/// sockets; once one says READY this process stops being ready and
/// `upgraded` fires (the caller drains and exits). A drain (`draining`)
/// ends it too: its copies of the listening sockets must not keep them
/// listening, or new connections would wait unanswered instead of being
/// refused.
fn spawn_hand_over(
    listener: tokio::net::UnixListener,
    sockets: Vec<(String, OwnedFd)>,
    upgraded: tokio_util::sync::CancellationToken,
    handed_over: Arc<std::sync::atomic::AtomicBool>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    draining: tokio_util::sync::CancellationToken,
) {
    let sockets = Arc::new(sockets);
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "upgrade socket accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = upgraded.cancelled() => return,
                _ = draining.cancelled() => return,
            };
            let Ok(stream) = stream
                .into_std()
                .and_then(|s| s.set_nonblocking(false).map(|_| s))
            else {
                continue;
            };
            let sockets = sockets.clone();
            tracing::info!("a successor asks for the listening sockets");
            // Marked before READY can arrive: from then on the files are
            // shared, and only the successor may remove them.
            handed_over.store(true, std::sync::atomic::Ordering::SeqCst);
            let result = tokio::task::spawn_blocking(move || {
                use std::os::fd::AsFd;
                let borrowed: Vec<(String, std::os::fd::BorrowedFd<'_>)> = sockets
                    .iter()
                    .map(|(n, fd)| (n.clone(), fd.as_fd()))
                    .collect();
                crate::upgrade::hand_over(stream, &borrowed)
            })
            .await;
            match result {
                Ok(Ok(true)) => {
                    tracing::info!("the successor is ready: draining and exiting");
                    ready.store(false, std::sync::atomic::Ordering::SeqCst);
                    upgraded.cancel();
                    return;
                }
                Ok(Ok(false)) | Ok(Err(_)) | Err(_) => {
                    tracing::error!("the successor went away before it was ready; still serving");
                    handed_over.store(false, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }
    });
}
