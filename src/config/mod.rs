//! Configuration: the YAML file, its validation, and live reload.
//!
//! Raw and validated config are different types (`file::FileConfig` and [`Config`]): code on the
//! request path only ever sees a `Config`, so it never re-checks what validation already proved.
//! A `Config` is immutable; reload builds a new one and swaps it in whole (see `reload`).

mod file;
mod locate;
pub mod policy;
pub mod reload;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use file::{
    BreakerFile, FileConfig, InterceptFile, LimitsFile, ListenFile, OnFailure, OverLimit, RetryFile, StoreKind,
};
pub use policy::{Limits as UpstreamLimits, Quota, ScopeKey, Store, Window};
/// The file model's types, for modules that share them with validated config.
pub mod file_types {
    pub use super::file::{BatchFormat, ClientFile, CredentialMode, CredentialsFile};
}
pub use validate::{HostPattern, Scheme, Target, Upstream};

/// A validated configuration: what the proxy runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file as written (defaults filled in), for `GET /config` and reload diffs.
    pub file: FileConfig,
    pub listen: ListenFile,
    pub shutdown_grace: Duration,
    pub limits: LimitsFile,
    pub intercept: Option<InterceptFile>,
    pub worker_threads: Option<usize>,
    pub store: Store,
    pub upstreams: Vec<Arc<Upstream>>,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::from_yaml(&text).map_err(|error| error.in_file(path))
    }

    /// Parses and validates config text; errors name the key and, where known, the line.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let file: FileConfig = serde_yaml_ng::from_str(text).map_err(|error| {
            let line = error.location().map(|at| at.line());
            ConfigError::Invalid { path: None, problems: vec![Problem::parse(error.to_string(), line)] }
        })?;
        validate::validate(file).map_err(|mut problems| {
            for problem in &mut problems {
                problem.line = problem.line.or_else(|| locate::line_of(text, &problem.key));
            }
            ConfigError::Invalid { path: None, problems }
        })
    }

    /// The upstream with this name.
    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|upstream| &*upstream.name == name)
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}{}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default(), ProblemList(problems))]
    Invalid { path: Option<PathBuf>, problems: Vec<Problem> },
}

impl ConfigError {
    fn in_file(self, file: &Path) -> Self {
        match self {
            ConfigError::Invalid { problems, .. } => ConfigError::Invalid { path: Some(file.to_path_buf()), problems },
            other => other,
        }
    }

    /// Names the file, and the line of each problem's key in `text`: for refusals found after
    /// parsing (a CA file that doesn't load, say), which know only the key.
    pub fn located(self, file: &Path, text: &str) -> Self {
        match self {
            ConfigError::Invalid { mut problems, .. } => {
                for problem in &mut problems {
                    problem.line = problem.line.or_else(|| locate::line_of(text, &problem.key));
                }
                ConfigError::Invalid { path: Some(file.to_path_buf()), problems }
            }
            other => other,
        }
    }

    /// A refusal found after parsing (a CA file that doesn't load, say), for one key.
    pub fn at_key(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid { path: None, problems: vec![Problem::new(key, message)] }
    }
}

/// One thing wrong with a config: the key, the line when known, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub line: Option<usize>,
    pub message: String,
}

impl Problem {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self { key: key.into(), line: None, message: message.into() }
    }

    /// With the line of its key in `text`, when the key can be found there.
    pub fn located_in(mut self, text: &str) -> Self {
        self.line = self.line.or_else(|| locate::line_of(text, &self.key));
        self
    }

    /// A serde error already says the key path and line in its own words.
    fn parse(message: String, line: Option<usize>) -> Self {
        Self { key: String::new(), line, message }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            return f.write_str(&self.message);
        }
        match self.line {
            Some(line) => write!(f, "{} (line {line}): {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            [one] => write!(f, "{one}"),
            many => {
                write!(f, "{} problems", many.len())?;
                for problem in many {
                    write!(f, "\n  - {problem}")?;
                }
                Ok(())
            }
        }
    }
}
