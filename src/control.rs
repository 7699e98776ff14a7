//! Operations on a running proxy that the admin API and signals share:
//! applying operator changes and reloading the config.
//!
//! A reload re-reads the config file and changes the static parts (pools,
//! endpoints, timeouts, policies, TLS certificates) in one table swap while
//! the dynamic state (split, stable color, drained endpoints) is kept. An
//! invalid config, an unreadable file or a bad certificate rejects the
//! reload whole: the live table and certificates stay, the reasons are
//! returned, logged, counted (`cyan_config_reloads_total{result="failure"}`)
//! and audited.
//!
//! A certificate swap takes effect for every new full handshake at once; a
//! client resuming a TLS session made before the swap keeps that session's
//! identity until its ticket expires (standard TLS resumption).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::config::{Config, ConfigError};
use crate::server::Server;
use crate::state::StateStore;
use crate::table::{Origin, Table};
use crate::tls::{CertStore, SniResolver};

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to reload (the proxy was started without one)")]
    NoFile,
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("listener `{listener}`: {reason}")]
    Tls { listener: String, reason: String },
    #[error("{0}")]
    Table(String),
}

/// Why a rollout operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("service `{0}` has no [service.rollout] plan in the config")]
    NoPlan(String),
    #[error("preflight failed, no traffic moved: {0}")]
    Preflight(String),
    #[error("{0}")]
    Table(#[from] crate::table::TableError),
}

/// A rollout operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutOp {
    Start,
    Pause,
    Resume,
    Abort,
}

/// Shared control-plane state.
#[derive(Debug)]
pub struct Controller {
    pub table: Arc<Table>,
    pub store: Arc<StateStore>,
    config_path: Option<PathBuf>,
    config: Mutex<Config>,
    tls_resolvers: Vec<(String, Arc<SniResolver>)>,
}

impl Controller {
    pub fn new(
        server: &Server,
        store: Arc<StateStore>,
        config: Config,
        config_path: Option<PathBuf>,
    ) -> Controller {
        Controller {
            table: server.table.clone(),
            store,
            config_path,
            config: Mutex::new(config),
            tls_resolvers: server.tls_resolvers.clone(),
        }
    }

    /// The config as last loaded.
    pub fn config(&self) -> Config {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts, pauses, resumes or aborts a service's rollout. A start runs
    /// the plan's preflight requests against every candidate endpoint first;
    /// any failure refuses the start with the details and moves nothing.
    pub async fn rollout(
        &self,
        service: &str,
        op: RolloutOp,
        actor: &str,
        if_generation: Option<u64>,
        reason: Option<String>,
    ) -> Result<crate::table::Applied, RolloutError> {
        use crate::rollout::unix_ms;
        use crate::table::{Change, Command, TableError};
        let t = self.table.load();
        let svc = t
            .service(service)
            .ok_or_else(|| TableError::UnknownService(service.to_string()))?;
        let name = service.to_string();
        let cmd = match op {
            RolloutOp::Start => {
                let plan = svc
                    .config
                    .rollout
                    .clone()
                    .ok_or_else(|| RolloutError::NoPlan(name.clone()))?;
                let candidate = svc.pool(svc.split.candidate());
                let endpoints: Vec<_> = candidate.endpoints.iter().map(|e| e.addr).collect();
                drop(t);
                if let Err(failures) = crate::preflight::run(&plan.preflight, &endpoints).await {
                    self.table.note(
                        Origin::Rollout,
                        actor,
                        "rollout_preflight_failed",
                        Some(service),
                        Some(failures.clone()),
                    );
                    return Err(RolloutError::Preflight(failures));
                }
                Command::RolloutStart {
                    service: name,
                    steps: plan.steps,
                    at_ms: unix_ms(),
                }
            }
            RolloutOp::Pause => Command::RolloutPause {
                service: name,
                at_ms: unix_ms(),
            },
            RolloutOp::Resume => Command::RolloutResume {
                service: name,
                at_ms: unix_ms(),
            },
            RolloutOp::Abort => Command::RolloutAbort {
                service: name,
                reason: reason
                    .clone()
                    .unwrap_or_else(|| "aborted by an operator".into()),
            },
        };
        let change = Change::new(cmd, Origin::Operator, actor)
            .if_generation(if_generation)
            .reason(reason);
        Ok(self.table.apply(change)?)
    }

    /// Re-reads the config file and applies it; returns the new generation.
    pub fn reload(&self, actor: &str) -> Result<u64, ReloadError> {
        let result = self.try_reload(actor);
        let metrics = self.table.metrics();
        match &result {
            Ok(generation) => {
                metrics.config_reloads.with_label_values(&["success"]).inc();
                tracing::info!(actor, generation, "config reloaded");
            }
            Err(e) => {
                metrics.config_reloads.with_label_values(&["failure"]).inc();
                tracing::error!(actor, error = %e, "reload rejected; the live table is unchanged");
                self.table.note(
                    Origin::Config,
                    actor,
                    "reload_rejected",
                    None,
                    Some(e.to_string()),
                );
            }
        }
        result
    }

    fn try_reload(&self, actor: &str) -> Result<u64, ReloadError> {
        let path = self.config_path.as_ref().ok_or(ReloadError::NoFile)?;
        let new = Config::load(path)?;
        let mut current = self.config.lock().unwrap_or_else(|p| p.into_inner());
        for old in &current.listeners {
            match new.listeners.iter().find(|l| l.name == old.name) {
                Some(l) if l.listen == old.listen => {}
                _ => {
                    tracing::warn!(listener = %old.name, "listener names and addresses change only on restart")
                }
            }
        }
        // Certificates first: a bad one rejects the whole reload.
        let mut stores = Vec::new();
        for l in &new.listeners {
            if let (Some(t), Some((_, resolver))) = (
                &l.tls,
                self.tls_resolvers.iter().find(|(n, _)| n == &l.name),
            ) {
                let store = CertStore::load(t).map_err(|e| ReloadError::Tls {
                    listener: l.name.clone(),
                    reason: e.to_string(),
                })?;
                stores.push((resolver.clone(), store));
            }
        }
        let applied = self
            .table
            .replace_config(&new, actor)
            .map_err(ReloadError::Table)?;
        for (resolver, store) in stores {
            if let Some((name, _)) = self
                .tls_resolvers
                .iter()
                .find(|(_, r)| Arc::ptr_eq(r, &resolver))
            {
                self.table
                    .metrics()
                    .tls_cert_not_after
                    .with_label_values(&[name])
                    .set(store.not_after);
            }
            // Open connections keep their session; new handshakes see the
            // new certificate.
            resolver.store.store(Arc::new(store));
        }
        *current = new;
        Ok(match applied {
            crate::table::Applied::Changed { generation }
            | crate::table::Applied::NoChange { generation } => generation,
        })
    }
}
