//! A whole cyan instance, assembled in one place so the binary and the
//! end-to-end tests start it the same way:
//!
//! state dir (audit + state file) → table (config, then persisted state on
//! top) → listeners → controller → admin API.

use std::path::PathBuf;
use std::sync::Arc;

use crate::admin::{self, AdminServer};
use crate::config::Config;
use crate::control::Controller;
use crate::metrics::Metrics;
use crate::server::{DrainReport, Server};
use crate::state::{restore, StateStore};
use crate::table::{RoutingTable, Table};

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
}

impl App {
    /// Starts everything `config` describes. `fresh` ignores a persisted
    /// state file (`cyan run --fresh-state`).
    pub async fn start(
        config: Config,
        config_path: Option<PathBuf>,
        fresh: bool,
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
        let server = Server::start_with(&config, table)
            .await
            .map_err(|e| e.to_string())?;
        let controller = Arc::new(Controller::new(&server, store, config.clone(), config_path));
        crate::health::spawn_supervisor(server.table.clone(), server.shutdown_token());
        crate::rollout::spawn_driver(server.table.clone(), server.shutdown_token());
        let admin = match &config.admin {
            Some(a) => Some(
                admin::start(a, controller.clone(), server.shutdown_token())
                    .await
                    .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let metrics_stop = tokio_util::sync::CancellationToken::new();
        let metrics_addr = match config.metrics_listen {
            Some(addr) => Some(
                crate::observe::start(
                    addr,
                    server.metrics.clone(),
                    ready.clone(),
                    metrics_stop.clone(),
                )
                .await
                .map_err(|e| format!("metrics listener {addr}: {e}"))?,
            ),
            None => None,
        };
        // Config loaded, listeners bound, state restored: ready.
        ready.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(App {
            server,
            controller,
            admin,
            metrics_addr,
            ready,
            metrics_stop,
        })
    }

    /// Drains and stops; the admin socket file is removed. Readiness flips
    /// first so load balancers stop sending new connections.
    pub async fn shutdown(self) -> DrainReport {
        self.ready.store(false, std::sync::atomic::Ordering::SeqCst);
        let report = self.server.shutdown().await;
        self.metrics_stop.cancel();
        if let Some(path) = self.admin.as_ref().and_then(|a| a.socket.as_ref()) {
            let _ = std::fs::remove_file(path);
        }
        report
    }
}
