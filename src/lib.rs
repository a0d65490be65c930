//! sluice: a rate-limit-aware egress proxy sidecar for CRM vendor APIs.
//!
//! # Layout
//! The modules form rooms whose imports only run downhill (`tests/module_graph.rs` checks it);
//! `ARCHITECTURE.md` has the map. From the leaves up:
//!
//! - leaves: [`vendor`] (what each vendor's rate-limit headers mean; below config, which names
//!   its profiles), [`config`] (the YAML file, validation, the validated types), [`error`] (every
//!   failure on the request path, one bounded kind), [`controls`], [`consumer`] and [`request`]
//!   (what a request carries between layers: the caller's controls, who it spends for), [`body`], [`kit`] (small shared tools), [`telemetry`] (logs,
//!   metrics), [`tls`], [`security`];
//! - the rooms of the journey, each owning its layer, in the order a request meets them:
//!   [`observe`] (request ids, one log line, metrics), [`respond`] (the one place errors become
//!   responses), [`route`] (identity, destination, credentials), [`batch`] (single calls folded
//!   into bulk calls), [`retry`], [`breaker`], [`limit`] (quotas), [`feedback`] (acting on the vendor's
//!   rate-limit signals), [`upstream`] (the pooled client to the vendor);
//! - [`state`]: the current generation (one config and what is built from it), swapped whole on
//!   reload, and what outlives reloads;
//! - [`proxy`]: `proxy::stack` puts the layers in their order;
//! - [`listen`]: accepting connections, serving one (its hyper service), CONNECT and tunnels;
//! - [`reload`]: turning SIGHUP, `POST /reload` and file changes into a new generation;
//! - [`admin`]: the SRE's door; [`webhook`]: Kubernetes injection;
//! - [`app`]: wiring, start-up and graceful shutdown.

pub mod body;
pub mod config;
pub mod consumer;
pub mod controls;
pub mod error;
pub mod kit;
pub mod request;
pub mod security;
pub mod telemetry;
pub mod tls;
pub mod vendor;

pub mod batch;
pub mod breaker;
pub mod feedback;
pub mod limit;
pub mod observe;
pub mod respond;
pub mod retry;
pub mod route;
pub mod upstream;

pub mod admin;
pub mod app;
pub mod listen;
pub mod proxy;
pub mod reload;
pub mod state;
pub mod webhook;
