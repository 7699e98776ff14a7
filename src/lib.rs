//! # cyan — a blue/green traffic-switching reverse proxy
//!
//! cyan is the front load balancer during an API-gateway upgrade. Each
//! *service* (matched by listener + Host + path prefix) has a **blue** and a
//! **green** pool of endpoints. A request is given a color by the service's
//! split (the candidate's share in basis points, 0..=10000), sticky on a key
//! when configured, optionally forced by an override header; then an endpoint
//! of that pool is picked (power of two choices on in-flight requests, among
//! endpoints that are neither down nor drained) and the request is streamed
//! through.
//!
//! ```text
//!                        data plane (every request)
//! client ─► server: permit before accept, PROXY header, TLS handshake in task,
//!           HTTP/1.1 + HTTP/2 on one port (preface sniff), idle watchdog;
//!           idle HTTP/1.1 keep-alive holds only its socket (keepalive)
//!           bodiless GET/HEAD whose head comes whole: cyan's own server
//!           (h1server), the headers kept as the head's lines
//!         ─► proxy::handle
//!              headers::check_request            reject smuggling / bad Host / CONNECT
//!                                                 (headers read through headers::Fields:
//!                                                 a map, or a head's lines)
//!              let table = table.snapshot();      ONE snapshot per request (the thread's
//!                                                 copy while no change was committed)
//!              let svc   = table.route(..)?;      listener + host + path
//!              let color = split::choose_color()  override > sticky bucket > draw
//!              let ep    = split::pick_endpoint() P2C on in-flight, eligible only
//!              upstream::Upstream::send           pooled h1/h2 connection, one retry
//!                                                 when nothing was sent; bodiless
//!                                                 GET/HEAD to plaintext h1 on
//!                                                 cyan's own client (h1client),
//!                                                 its head kept as lines
//!              body::RespBody                     streams back, records at the end
//!         ◄─ response, or ProxyError → 4xx/502/503/504 in one place (proxy::error_response)
//!
//!                        control plane (rare writes)
//! operators, rollouts, health ─► table::Table::apply(Change) ─► validate ─► new
//!   immutable RoutingTable (generation + 1) ─► ArcSwap::store
//! ```
//!
//! Rules that keep it simple and correct:
//!
//! 1. Everything a routing decision depends on lives in the
//!    [`table::RoutingTable`] snapshot. Live counters that must survive a swap
//!    (in-flight counts, idle connections, metric handles) hang off `Arc`s the
//!    snapshot shares with its successor.
//! 2. Only [`table::Table::apply`] (and the config builder it uses) stores a
//!    new table. Writers serialize on a mutex readers never touch.
//! 3. Normalize at build time: eligible endpoint lists, hash seeds, lowercase
//!    host patterns and metric handles are prepared when a table is built, so
//!    the per-request path does no validation, routing allocation, label
//!    lookup or locking.
//!
//! Module map (one responsibility each):
//!
//! | module | responsibility |
//! | --- | --- |
//! | [`config`] | raw TOML types → validated runtime config; every key documented |
//! | [`table`] | `RoutingTable`, `Table` (the ArcSwap), `Command`, `apply` |
//! | [`split`] | color and endpoint selection, stable hash; pure |
//! | [`headers`] | request validation and header hygiene (hop-by-hop, forwarding), over a map or a head's lines (`Fields`) |
//! | [`proxy`] | the per-request flow and the error → status mapping |
//! | [`upstream`] | per-endpoint connection pools (h1 / h2 / h2c, TLS), timeouts |
//! | [`h1client`] | cyan's own HTTP/1.1 client for bodiless GET/HEAD: strict framing, no task per connection; `RawHead`, a head kept as its lines |
//! | [`h1server`] | cyan's own HTTP/1.1 server path for bodiless GET/HEAD whose head comes whole |
//! | [`access_log`] | one JSON line per request, formatted by hand on a writer thread |
//! | [`body`] | request/response body types: idle timeout, end-of-request accounting |
//! | [`server`] | listeners, accept loop, limits, PROXY protocol, graceful drain |
//! | [`conns`] | the open client connections: woken by the drain, aborted at its deadline |
//! | [`keepalive`] | HTTP/1.1 between requests: hyper released, socket kept, bytes replayed |
//! | [`tls`] | rustls server and client configs, SNI certificate selection |
//! | [`metrics`] | metrics struct over its own registry |
//! | [`demo`] | built-in demo backends and the embedded demo config |
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations)]

pub mod access_log;
pub mod admin;
pub mod app;
pub mod body;
pub mod config;
pub mod conns;
pub mod control;
pub mod ctl;
pub mod demo;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod h1client;
pub mod h1server;
pub mod headers;
pub mod health;
pub mod keepalive;
pub mod metrics;
pub mod observe;
pub mod preflight;
pub mod proxy;
pub mod proxy_protocol;
pub mod rollout;
pub mod server;
pub mod split;
pub mod state;
pub mod stats;
pub mod table;
pub mod tls;
pub mod upgrade;
pub mod upstream;

/// The version string reported by `--version`, logs and `cyan_build_info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
