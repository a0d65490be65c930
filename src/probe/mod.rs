//! `sluice probe`: find a vendor's real limits, and how it signals them, by asking it.
//!
//! Published limits are often wrong for a given account or tier; header semantics differ
//! (rolling or fixed windows, `reset` as seconds or as a timestamp); the over-limit answer is
//! sometimes a 429, sometimes a 403 or a 503. Finding out by hand ends in notes an SRE turns into
//! `quotas:` and `limit_headers:`. The probe does it: safe requests, through the same client,
//! credential and egress guard as `run`, at a doubling rate until the vendor says no (or the
//! budget, the rate cap or the time runs out); then it waits out the vendor's pause, looks once
//! at how it recovers, and writes what it saw and the config for it.
//!
//! The room, from its leaf up: `sample` (what one exchange leaves), `send` (one request as `run`
//! would send it), `infer` (samples to findings, through the vendor profiles' own parsers),
//! `ramp` (when to send and when to stop, on an injectable clock), `report` (summary,
//! `probe.json`, `suggested.yaml`) and `plot` (the SVG). Nothing else in sluice imports it.

pub mod infer;
pub mod plot;
pub mod ramp;
pub mod report;
pub mod sample;
pub mod send;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};

use crate::config::{ConfigError, Loaded};
use crate::error::{ErrorKind, ProxyError};
use ramp::Progress as _;

/// `sluice probe`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeArgs {
    /// Config file (YAML): the upstream's target, credentials and TLS settings come from it.
    #[arg(short, long, env = "SLUICE_CONFIG")]
    pub config: PathBuf,
    /// The upstream to probe, by `name`.
    #[arg(long)]
    pub upstream: String,
    /// Path and query to request (default: the upstream's `probe_path`).
    #[arg(long)]
    pub path: Option<String>,
    /// HTTP method. GET by default; any other must be asked for here (TRACE and CONNECT never).
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// Most requests sent in all, the recovery request included.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub budget: u64,
    /// The rate (requests per second) the ramp stops at, after one whole step at it.
    #[arg(long, value_parser = parse_rate)]
    pub max_rate: Option<f64>,
    /// Longest the probe runs, the wait for the vendor's pause included.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Directory for summary.txt, probe.json, suggested.yaml and probe.svg (created if missing).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Percent of each vendor limit the suggested quota leaves to other callers of the account.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=90))]
    pub headroom: u8,
}

fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text.trim().parse().map_err(|_| format!("`{text}` is not a number"))?;
    if rate.is_finite() && (0.01..=100_000.0).contains(&rate) {
        Ok(rate)
    } else {
        Err("must be between 0.01 and 100000 requests per second".into())
    }
}

/// Why a probe could not run, or stopped short.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("no upstream `{name}` in the config (it has: {known})")]
    NoUpstream { name: String, known: String },
    #[error("no path to probe for upstream `{upstream}`: pass --path, or set upstreams[{index}].probe_path")]
    NoPath { upstream: String, index: usize },
    #[error("bad path `{path}`: {reason}")]
    BadPath { path: String, reason: String },
    #[error("bad --method `{method}`: {reason}")]
    BadMethod { method: String, reason: String },
    #[error(
        "upstream `{upstream}` has no address to probe: it needs a `target`, or an exact host (not only wildcards)"
    )]
    NoAddress { upstream: String },
    #[error("{}", unreachable_message(.0))]
    Unreachable(ProxyError),
    #[error(
        "authentication failed: the vendor answered {status} (body: {body}), which no vendor profile reads as an \
         over-limit answer. Check the upstream's `credentials` and the scopes of that token"
    )]
    Auth { status: StatusCode, body: String },
    #[error(
        "the vendor answered {status} for this path: pass --path (or set probe_path) to a path this account can read"
    )]
    NotFound { status: StatusCode },
    #[error("the vendor refused the probe request with {status} (body: {body})")]
    Refused { status: StatusCode, body: String },
    #[error(
        "the vendor failed with {status} (body: {body}) and asked for no pause: the probe stops rather than load it"
    )]
    VendorFailure { status: StatusCode, body: String },
    #[error("cannot write the report to {}: {source}", path.display())]
    Output { path: PathBuf, source: std::io::Error },
    #[error("internal error: {0}")]
    Internal(&'static str),
}

fn unreachable_message(error: &ProxyError) -> String {
    match &*error.kind {
        ErrorKind::EgressDenied { .. } => format!(
            "egress denied: {error}. The probe goes through sluice's egress guard as `run` does; if this address \
             really is the vendor's, name it as the upstream's `target`"
        ),
        _ => format!("cannot reach the vendor: {error}"),
    }
}

/// The method to send: GET unless asked; never one sluice refuses to forward.
pub fn probe_method(text: &str) -> Result<Method, ProbeError> {
    let method = Method::from_bytes(text.trim().to_ascii_uppercase().as_bytes())
        .map_err(|_| ProbeError::BadMethod { method: text.into(), reason: "not an HTTP method".into() })?;
    if matches!(method.as_str(), "TRACE" | "TRACK" | "CONNECT") {
        return Err(ProbeError::BadMethod {
            method: text.into(),
            reason: "sluice never forwards TRACE, TRACK or CONNECT".into(),
        });
    }
    Ok(method)
}

/// Writes progress lines to stderr.
struct Stderr;

impl ramp::Progress for Stderr {
    fn line(&mut self, text: &str) {
        let mut stderr = std::io::stderr().lock();
        let _ = writeln!(stderr, "probe: {text}");
    }
}

/// `sluice probe`: runs the probe and prints the report; the exit code says how it ended.
pub fn main(args: ProbeArgs) -> ExitCode {
    if std::env::var_os("SLUICE_LOG").is_some() {
        crate::telemetry::init_logging();
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(probe(args)) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("sluice probe: {error}");
            ExitCode::from(1)
        }
    }
}

/// The whole probe: load, send, infer, report. `Ok` holds the exit code.
pub async fn probe(args: ProbeArgs) -> Result<u8, ProbeError> {
    let loaded = Loaded::read(&args.config)?;
    let upstreams = &loaded.config.live.upstreams;
    let index = upstreams.iter().position(|upstream| *upstream.name == *args.upstream).ok_or_else(|| {
        ProbeError::NoUpstream {
            name: args.upstream.clone(),
            known: upstreams.iter().map(|u| u.name.to_string()).collect::<Vec<_>>().join(", "),
        }
    })?;
    let upstream = upstreams[index].clone();
    let path = match args.path.clone().or_else(|| upstream.probe_path.clone()) {
        Some(path) => path,
        None => return Err(ProbeError::NoPath { upstream: args.upstream.clone(), index }),
    };
    crate::config::check_probe_path(&path).map_err(|reason| ProbeError::BadPath { path: path.clone(), reason })?;
    let method = probe_method(&args.method)?;
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).map_err(|source| ProbeError::Output { path: dir.clone(), source })?;
    }
    let transport = Arc::new(send::UpstreamTransport::new(&loaded, index, &path, method.clone())?);
    let mut progress = Stderr;
    if !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS) {
        progress.line(&format!(
            "warning: {method} is not a safe method: each of up to {} requests may change data at the vendor",
            args.budget
        ));
    }
    let credential =
        transport.credential_header().map(|header| format!(", credential in `{header}`")).unwrap_or_default();
    progress.line(&format!(
        "{method} {} (upstream `{}`{credential}), budget {}, up to {}{}",
        transport.url(),
        args.upstream,
        args.budget,
        humantime::format_duration(args.duration),
        args.max_rate.map(|rate| format!(", at most {} rps", ramp::show_rate(rate))).unwrap_or_default()
    ));
    let plan = ramp::Plan { budget: args.budget, max_rate: args.max_rate, duration: args.duration };
    let run = ramp::run(transport.clone(), plan, ramp::TokioClock::new(), &mut progress).await?;
    let findings = infer::infer(&run.samples);
    let asked = report::Asked {
        upstream: args.upstream.clone(),
        method: method.to_string(),
        path: path.clone(),
        url: transport.url(),
        plan,
        headroom: args.headroom,
    };
    let report = report::Report::new(&asked, &run, findings);
    let svg = plot::svg(&run, &report.findings, &format!("sluice probe: `{}`, {method} {path}", args.upstream));
    let written = match &args.out {
        Some(dir) => {
            report::write_all(dir, &report, &svg).map_err(|source| ProbeError::Output { path: dir.clone(), source })?
        }
        None => Vec::new(),
    };
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(report::summary(&report, &written).as_bytes());
    progress.line(&format!("done: {} (exit {})", report.stopped.detail, report.exit_code));
    Ok(report.exit_code)
}
