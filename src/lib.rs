//! sluice: a rate-limit-aware egress proxy sidecar for CRM vendor APIs.
//!
//! # Layout
//! Each module is a room with one job, and imports run downhill only: a room names the rooms
//! below it, never one above, so the module graph has no cycle (`tests/module_graph.rs` checks
//! it). Where a lower room needs something of a higher one, it states the need as a trait
//! (`route::RouteContext`, `upstream::Upstreams`, `limit::layer::LimitContext`) that the higher
//! one implements. `ARCHITECTURE.md` has the map and says which files a change touches. From the
//! leaves up:
//!
//! - leaves, importing nothing from sluice: [`vendor`] (what each vendor's rate-limit headers
//!   mean, and the names of its profiles), [`error`] (every failure on the request path, one
//!   bounded kind, and whose it is), [`controls`] (the caller's `Sluice-*` headers), [`kit`]
//!   (small shared tools), [`telemetry`] (logs, metrics);
//! - [`config`]: the YAML file, validation, the validated types (it names `vendor`'s profiles);
//! - what a request carries and the tools both sides use: [`request`] (the extension types
//!   layers pass on), [`consumer`] (who a request spends for), [`body`], [`tls`], [`security`];
//! - the rooms of the journey, each owning its layer; in the order a request meets them:
//!   [`observe`] (request ids, one log line, metrics), [`respond`] (the one place errors become
//!   responses), [`route`] (identity, destination, credentials), [`batch`] (single calls folded
//!   into bulk calls), [`oauth`] (brokered OAuth 2.0 tokens, a 401 renewed once), [`retry`], [`breaker`], [`limit`] (quotas), [`feedback`] (acting on the
//!   vendor's rate-limit signals), [`upstream`] (the pooled client to the vendor). Among
//!   themselves they import downhill too: `retry` and `limit` read `breaker`, `feedback` and
//!   `respond` read `limit`, `observe` and `batch` read `upstream`'s header hygiene;
//! - [`state`]: the current generation (one config and what is built from it), swapped whole on
//!   reload, and what outlives reloads;
//! - [`proxy`]: `proxy::stack` puts the layers in their order over a generation;
//! - [`listen`]: accepting connections, serving one with the stack it is given (its hyper
//!   service), CONNECT and tunnels, connection accounting;
//! - [`reload`]: turning SIGHUP, `POST /reload` and file changes into a new generation;
//! - [`admin`]: the SRE's door; [`probe`]: `sluice probe`, which finds a vendor's real limits
//!   through the upstream's client and writes the quotas;
//! - [`app`]: wiring, start-up and graceful shutdown;
//! - [`webhook`]: Kubernetes injection (`sluice inject`), a server of its own that shares
//!   `kit`'s stop signal.

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
pub mod oauth;
pub mod observe;
pub mod respond;
pub mod retry;
pub mod route;
pub mod upstream;

pub mod admin;
pub mod app;
pub mod listen;
pub mod probe;
pub mod proxy;
pub mod reload;
pub mod state;
pub mod webhook;
