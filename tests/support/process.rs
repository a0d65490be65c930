//! The real `sluice` binary as a child process: run to completion with a deadline, or spawned and
//! driven (signals, log lines, addresses). Every wait is bounded, and a spawned child is killed
//! and reaped when its guard drops, whatever path the test takes.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Path of the `sluice` binary cargo built for these tests.
pub const SLUICE_BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// What a finished command printed and how it exited.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// A `sluice` command with no inherited `SLUICE_*` settings, run from `cwd`.
pub fn sluice_command(args: &[&str], envs: &[(&str, &str)], cwd: &Path) -> Command {
    binary_command(Path::new(SLUICE_BIN), args, envs, cwd)
}

/// [`sluice_command`] for another build of the binary (e.g. the release one).
pub fn binary_command(binary: &Path, args: &[&str], envs: &[(&str, &str)], cwd: &Path) -> Command {
    let mut command = Command::new(binary);
    command.args(args).current_dir(cwd);
    for name in ["SLUICE_CONFIG", "SLUICE_LOG", "SLUICE_LOG_FORMAT"] {
        command.env_remove(name);
    }
    command.envs(envs.iter().copied());
    command
}

/// Runs `sluice args...` to completion; kills it and panics if it takes longer than `within`.
pub fn run_sluice(args: &[&str], envs: &[(&str, &str)], cwd: &Path, within: Duration) -> Finished {
    let mut child = sluice_command(args, envs, cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the sluice binary starts");
    let stdout = drain_to_string(child.stdout.take().unwrap());
    let stderr = drain_to_string(child.stderr.take().unwrap());
    // Bounded by a count of 20 ms polls: this runs outside any async runtime.
    let polls = within.as_millis() / 20 + 1;
    let mut polled = 0;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        polled += 1;
        if polled > polls {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`sluice {}` did not finish within {within:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = stdout.join().unwrap();
    let stderr = stderr.join().unwrap();
    Finished { status, stdout, stderr }
}

fn drain_to_string(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// A spawned `sluice` (normally `run`), killed and reaped on drop. Its stderr is collected line
/// by line as it is written, so tests can wait for a log line while it runs.
pub struct SluiceProcess {
    child: Option<Child>,
    stderr: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl SluiceProcess {
    pub fn spawn(args: &[&str], envs: &[(&str, &str)], cwd: &Path) -> Self {
        Self::spawn_binary(Path::new(SLUICE_BIN), args, envs, cwd)
    }

    /// [`SluiceProcess::spawn`] of another build of the binary.
    pub fn spawn_binary(binary: &Path, args: &[&str], envs: &[(&str, &str)], cwd: &Path) -> Self {
        let mut child = binary_command(binary, args, envs, cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the sluice binary starts");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { return };
                lines.lock().unwrap().push(line);
            }
        });
        Self { child: Some(child), stderr, reader: Some(reader) }
    }

    /// `sluice run -c config` with `SLUICE_LOG=info` plus `envs`.
    pub fn run(config: &Path, envs: &[(&str, &str)]) -> Self {
        let mut all = vec![("SLUICE_LOG", "info")];
        all.extend_from_slice(envs);
        let cwd = config.parent().unwrap();
        Self::spawn(&["run", "-c", config.to_str().unwrap()], &all, cwd)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends a signal by name (`TERM`, `INT`, `HUP`) with `kill -<sig> <pid>`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("the kill command runs");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    /// The stderr lines written so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr_lines().join("\n")
    }

    /// Waits (asynchronously, so in-process servers keep running) for the first stderr line that
    /// satisfies `wanted`, or for the process to exit, or for `within` to pass.
    pub async fn wait_for_line(&mut self, within: Duration, wanted: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(line) = self.stderr_lines().into_iter().find(|line| wanted(line)) {
                return Some(line);
            }
            let exited = self.child.as_mut().unwrap().try_wait().unwrap().is_some();
            if exited || tokio::time::Instant::now() >= deadline {
                // One last look: the reader may have caught up with the final lines.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return self.stderr_lines().into_iter().find(|line| wanted(line));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The proxy and admin addresses from the "sluice is serving." log line (pretty or JSON).
    pub async fn addresses(&mut self, within: Duration) -> (SocketAddr, SocketAddr) {
        let line = self.wait_for_line(within, |line| line.contains("sluice is serving")).await;
        let Some(line) = line else {
            panic!("sluice did not log that it is serving; stderr:\n{}", self.stderr_text());
        };
        let field = |name: &str| -> SocketAddr {
            if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) {
                let value = json.get(name).or_else(|| json.get("fields").and_then(|f| f.get(name)));
                if let Some(text) = value.and_then(|v| v.as_str()) {
                    return text.parse().unwrap();
                }
            }
            let start = line.find(&format!("{name}=")).unwrap_or_else(|| panic!("no {name}= in {line}"));
            let rest = &line[start + name.len() + 1..];
            let end = rest.find(|c: char| c.is_whitespace()).unwrap_or(rest.len());
            rest[..end].trim_matches('"').parse().unwrap()
        };
        (field("proxy"), field("admin"))
    }

    /// Waits for the process to exit, up to `within`; `None` if it is still running.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                if let Some(reader) = self.reader.take() {
                    // The pipe closes with the process, so the reader is about to finish.
                    let _ = tokio::task::spawn_blocking(move || reader.join()).await;
                }
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for SluiceProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
