//! Metrics: one struct registered into a registry it owns (no process-global
//! statics). Labels are bounded: service, color, endpoint, code class, kind,
//! listener — never path, host, client or request id.
//!
//! The request path never looks a label up: [`PoolMetrics`] holds handles
//! resolved once per (service, color) when a table is built and shared by
//! every later table. Neither does a table change: the gauges it publishes
//! ([`ServiceGauges`], [`PoolMetrics::stable`], an endpoint's `up`) are
//! handles resolved with the service or endpoint, so a split change is a
//! few atomic stores, not a label lookup (and an address formatted) per
//! endpoint.

use std::sync::Arc;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::Color;

/// Upstream error kinds, the `kind` label of `cyan_upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Connect = 0,
    Timeout = 1,
    Reset = 2,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 3] = [ErrorKind::Connect, ErrorKind::Timeout, ErrorKind::Reset];
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
        }
    }
}

/// All of cyan's metric families.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    in_flight: IntGaugeVec,
    upstream_errors: IntCounterVec,
    retries: IntCounterVec,
    pub candidate_share: GaugeVec,
    pub stable_color: IntGaugeVec,
    pub endpoint_up: IntGaugeVec,
    pub table_generation: IntGauge,
    pub connections_open: IntGaugeVec,
    pub tls_handshake_errors: IntCounterVec,
    pub rejected_requests: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub state_write_errors: IntCounter,
    pub rollbacks: IntCounterVec,
    pub rollbacks_held: IntCounterVec,
    pub rollout_step: IntGaugeVec,
    pub health_checks: IntCounterVec,
    pub tls_cert_not_after: IntGaugeVec,
    pub access_log_dropped: IntCounter,
}

/// Request-path handles for one (service, color).
#[derive(Debug)]
pub struct PoolMetrics {
    /// By status class: index `status / 100 - 1` (1xx..5xx).
    pub requests: [IntCounter; 5],
    pub duration: Histogram,
    pub in_flight: IntGauge,
    /// By [`ErrorKind`] as index.
    pub upstream_errors: [IntCounter; 3],
    pub retries: IntCounter,
    /// `cyan_stable_color_info{service, color}`: 1 while this color is stable.
    pub stable: IntGauge,
    /// Sliding window of outcomes for the rollback analysis.
    pub window: crate::stats::Window,
}

/// A service's table-level gauges, resolved once with the service and
/// shared by every later table.
#[derive(Debug)]
pub struct ServiceGauges {
    /// `cyan_candidate_share_ratio{service}`.
    pub candidate_share: prometheus::Gauge,
    /// `cyan_rollout_step{service}`.
    pub rollout_step: IntGauge,
}

impl PoolMetrics {
    /// Counts a finished request by its status.
    #[inline]
    pub fn count_status(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.requests[class].inc();
    }

    #[inline]
    pub fn count_error(&self, kind: ErrorKind) {
        self.upstream_errors[kind as usize].inc();
    }
}

/// Latency buckets in seconds: 0.5 ms to 30 s.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Registration only fails on duplicate or inconsistent descriptors, which
    // is a programming error in this module caught by its tests.
    r.register(Box::new(c.clone()))
        .expect("metric descriptors are unique");
    c
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new();
        let requests = reg(
            &r,
            IntCounterVec::new(
                Opts::new("cyan_requests_total", "Requests proxied, by status class."),
                &["service", "color", "code_class"],
            )
            .expect("valid"),
        );
        let duration = reg(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "cyan_request_duration_seconds",
                    "Time from request received to the response body's end.",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
                &["service", "color"],
            )
            .expect("valid"),
        );
        let in_flight = reg(
            &r,
            IntGaugeVec::new(
                Opts::new("cyan_requests_in_flight", "Requests currently proxied."),
                &["service", "color"],
            )
            .expect("valid"),
        );
        let upstream_errors = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "cyan_upstream_errors_total",
                    "Upstream failures by kind: connect, timeout, reset.",
                ),
                &["service", "color", "kind"],
            )
            .expect("valid"),
        );
        let retries = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "cyan_retries_total",
                    "Requests retried on another endpoint after a connect failure.",
                ),
                &["service", "color"],
            )
            .expect("valid"),
        );
        let candidate_share = reg(
            &r,
            GaugeVec::new(
                Opts::new(
                    "cyan_candidate_share_ratio",
                    "Configured share of the candidate color, 0 to 1.",
                ),
                &["service"],
            )
            .expect("valid"),
        );
        let stable_color = reg(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "cyan_stable_color_info",
                    "1 for each service's stable color.",
                ),
                &["service", "color"],
            )
            .expect("valid"),
        );
        let endpoint_up = reg(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "cyan_endpoint_up",
                    "1 when an endpoint may take traffic (healthy and not drained).",
                ),
                &["service", "color", "endpoint"],
            )
            .expect("valid"),
        );
        let table_generation = reg(
            &r,
            IntGauge::new(
                "cyan_table_generation",
                "Generation of the live routing table.",
            )
            .expect("valid"),
        );
        let connections_open = reg(
            &r,
            IntGaugeVec::new(
                Opts::new("cyan_connections_open", "Client connections open."),
                &["listener"],
            )
            .expect("valid"),
        );
        let tls_handshake_errors = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "cyan_tls_handshake_errors_total",
                    "TLS handshakes that failed or timed out.",
                ),
                &["listener"],
            )
            .expect("valid"),
        );
        let rejected_requests = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "cyan_rejected_requests_total",
                    "Requests cyan refused without an upstream (malformed, smuggling, no route, a body that stalled or broke off while read ahead), by status.",
                ),
                &["listener", "code"],
            )
            .expect("valid"),
        );
        let config_reloads = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "cyan_config_reloads_total",
                    "Config reloads by result: success, failure.",
                ),
                &["result"],
            )
            .expect("valid"),
        );
        for result in ["success", "failure"] {
            config_reloads.with_label_values(&[result]);
        }
        let state_write_errors = reg(
            &r,
            IntCounter::new(
                "cyan_state_write_errors_total",
                "Failed writes of the state file or the audit log.",
            )
            .expect("valid"),
        );
        let rollbacks = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "cyan_rollbacks_total",
                    "Automatic rollbacks by trigger: candidate_unhealthy, failure_ratio, relative_failures, latency.",
                ),
                &["service", "reason"],
            )
            .expect("valid"),
        );
        let rollbacks_held = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "cyan_rollbacks_held_total",
                    "Rollbacks not done because the stable color was failing too.",
                ),
                &["service"],
            )
            .expect("valid"),
        );
        let rollout_step = reg(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "cyan_rollout_step",
                    "Index of the live rollout step (from 0); -1 when no rollout runs.",
                ),
                &["service"],
            )
            .expect("valid"),
        );
        let health_checks = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "cyan_health_checks_total",
                    "Active health probes by result: success, failure.",
                ),
                &["service", "color", "endpoint", "result"],
            )
            .expect("valid"),
        );
        let tls_cert_not_after = reg(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "cyan_tls_cert_not_after_timestamp_seconds",
                    "Earliest notAfter (Unix seconds) among a TLS listener's certificates.",
                ),
                &["listener"],
            )
            .expect("valid"),
        );
        let access_log_dropped = reg(
            &r,
            IntCounter::new(
                "cyan_access_log_dropped_total",
                "Access log records dropped because the writer could not keep up.",
            )
            .expect("valid"),
        );
        let build_info = reg(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "cyan_build_info",
                    "Always 1; the version label says which build.",
                ),
                &["version"],
            )
            .expect("valid"),
        );
        build_info.with_label_values(&[crate::VERSION]).set(1);
        #[cfg(target_os = "linux")]
        {
            let _ = r.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        }
        Arc::new(Metrics {
            registry: r,
            requests,
            duration,
            in_flight,
            upstream_errors,
            retries,
            candidate_share,
            stable_color,
            endpoint_up,
            table_generation,
            connections_open,
            tls_handshake_errors,
            rejected_requests,
            config_reloads,
            state_write_errors,
            rollbacks,
            rollbacks_held,
            rollout_step,
            health_checks,
            tls_cert_not_after,
            access_log_dropped,
        })
    }

    /// Resolves the request-path handles of one (service, color); `bucket`
    /// is the analysis window's bucket length.
    pub fn pool(&self, service: &str, color: Color, bucket: std::time::Duration) -> PoolMetrics {
        let c = color.as_str();
        let class = |k: &str| self.requests.with_label_values(&[service, c, k]);
        let err = |k: ErrorKind| {
            self.upstream_errors
                .with_label_values(&[service, c, k.as_str()])
        };
        PoolMetrics {
            requests: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            duration: self.duration.with_label_values(&[service, c]),
            in_flight: self.in_flight.with_label_values(&[service, c]),
            upstream_errors: ErrorKind::ALL.map(err),
            retries: self.retries.with_label_values(&[service, c]),
            stable: self.stable_color.with_label_values(&[service, c]),
            window: crate::stats::Window::new(bucket),
        }
    }

    /// Resolves a service's table-level gauges.
    pub fn service_gauges(&self, service: &str) -> ServiceGauges {
        ServiceGauges {
            candidate_share: self.candidate_share.with_label_values(&[service]),
            rollout_step: self.rollout_step.with_label_values(&[service]),
        }
    }

    /// Resolves `cyan_endpoint_up{service, color, endpoint}`.
    pub fn endpoint_gauge(
        &self,
        service: &str,
        color: Color,
        addr: std::net::SocketAddr,
    ) -> IntGauge {
        self.endpoint_up
            .with_label_values(&[service, color.as_str(), &addr.to_string()])
    }

    /// The registry, for callers that add their own families.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Renders every family in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_feed_the_families() {
        let m = Metrics::new();
        let p = m.pool("gateway", Color::Green, std::time::Duration::from_secs(1));
        p.count_status(503);
        p.count_status(200);
        p.count_error(ErrorKind::Reset);
        p.duration.observe(0.002);
        let text = m.render();
        assert!(text.contains(
            "cyan_requests_total{code_class=\"5xx\",color=\"green\",service=\"gateway\"} 1"
        ));
        assert!(text.contains(
            "cyan_upstream_errors_total{color=\"green\",kind=\"reset\",service=\"gateway\"} 1"
        ));
        assert!(text.contains("cyan_build_info{version="));
        // A second resolution shares the same series.
        m.pool("gateway", Color::Green, std::time::Duration::from_secs(1))
            .count_status(200);
        assert!(m.render().contains(
            "cyan_requests_total{code_class=\"2xx\",color=\"green\",service=\"gateway\"} 2"
        ));
    }
}
