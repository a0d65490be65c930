//! The `sluice` command: `run`, `check`, `probe`, `inject` and `ca init`, a thin CLI over the library.
//!
//! `run` reads and validates the config once (`config::Loaded`), before the runtime exists,
//! because `runtime.worker_threads` decides the runtime's kind; `app` then runs on that same
//! reading of the file. `inject` is `webhook`'s.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Every request allocates (header maps, bodies, boxed futures). mimalloc's free lists cost less
/// CPU per request than glibc malloc on sluice's single-threaded runtime; built with `no_thp`,
/// so it does not back the heap with transparent huge pages (that cost 8 MiB of idle RSS), and
/// as mimalloc v2, whose aligned allocation (Rust's only entry point) has the shorter fast path.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "sluice", version, about = "A rate-limit-aware egress proxy for CRM vendor APIs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// Config file (YAML).
        #[arg(short, long, env = "SLUICE_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file: exit 0, or non-zero naming each bad key and its line.
    Check {
        #[arg(short, long, env = "SLUICE_CONFIG")]
        config: PathBuf,
    },
    /// Find an upstream's real rate limits by ramping safe requests until it refuses, and write
    /// the quotas for them. Exits 0 when it found the limit, 3 when the budget ran out first, 4
    /// when --max-rate or --duration ended it first, 1 on an error.
    Probe(Box<sluice::probe::ProbeArgs>),
    /// Serve the Kubernetes admission webhook that injects the sluice sidecar into pods.
    Inject(Box<sluice::webhook::InjectArgs>),
    /// Manage the interception CA.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Write a new CA to DIR/ca.crt and DIR/ca.key (PEM; the key readable by its owner only).
    Init {
        #[arg(long)]
        out: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(config),
        Command::Check { config } => match sluice::app::check(&config) {
            Ok(notes) => {
                for note in notes {
                    println!("{note}");
                }
                println!("{}: OK", config.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("{error}");
                ExitCode::from(1)
            }
        },
        Command::Ca { command: CaCommand::Init { out, force } } => ca_init(&out, force),
        Command::Probe(args) => sluice::probe::main(*args),
        Command::Inject(args) => sluice::webhook::main(*args),
    }
}

fn run(config_path: PathBuf) -> ExitCode {
    sluice::telemetry::init_logging();
    // The config decides the runtime's size, so it is read (once: `app` runs on the same
    // parsed file) before the runtime exists.
    let loaded = match sluice::config::Loaded::read(&config_path) {
        Ok(loaded) => loaded,
        Err(error) => {
            tracing::error!(%error, "Cannot start: invalid config.");
            eprintln!("{error}");
            return ExitCode::from(1);
        }
    };
    let worker_threads = loaded.config.process.worker_threads;
    // One worker is the sidecar's setting: the single-threaded scheduler skips work stealing and
    // cross-thread wake-ups, measurably less CPU per request (BENCHMARKS.md).
    let mut builder = if worker_threads == Some(1) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().thread_name("sluice-worker");
    if let Some(threads) = worker_threads.filter(|threads| *threads > 1) {
        builder.worker_threads(threads);
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(sluice::app::run(loaded)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "Cannot start.");
            eprintln!("{error}");
            ExitCode::from(1)
        }
    }
}

fn ca_init(dir: &std::path::Path, force: bool) -> ExitCode {
    let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
    if force {
        let _ = std::fs::remove_file(&cert_path);
        let _ = std::fs::remove_file(&key_path);
    } else if cert_path.exists() || key_path.exists() {
        eprintln!("{} or {} already exists; pass --force to replace them", cert_path.display(), key_path.display());
        return ExitCode::from(1);
    }
    let written = sluice::tls::ca::generate_ca_pem().map_err(|error| error.to_string()).and_then(|(cert, key)| {
        sluice::tls::ca::write_ca_files(&cert_path, &key_path, &cert, &key).map_err(|error| error.to_string())
    });
    match written {
        Ok(()) => {
            println!("wrote {} and {}", cert_path.display(), key_path.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("cannot write the CA: {error}");
            ExitCode::from(1)
        }
    }
}
