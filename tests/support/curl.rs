//! The real `curl` binary as a client, the way an SRE would poke sluice. Runs on the blocking
//! pool so the in-process sluice keeps serving; every run is capped by `--max-time`.

use std::process::Command;

/// What one curl run printed.
#[derive(Debug)]
pub struct CurlOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CurlOutput {
    /// With `-w '\n%{http_code} %{http_version}'` appended by [`curl_status`]: the body before
    /// the last line, and the code and version on it.
    pub fn split_status(&self) -> (&str, u16, String) {
        let (body, last) = self.stdout.rsplit_once('\n').unwrap_or(("", self.stdout.as_str()));
        let mut parts = last.split_whitespace();
        let code = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
        let version = parts.next().unwrap_or_default().to_string();
        (body, code, version)
    }
}

/// Runs `curl -sS --max-time 20 ARGS...` with no proxy settings from the environment except
/// those in `env`.
pub async fn curl(args: &[&str], env: &[(&str, &str)]) -> CurlOutput {
    let args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    tokio::task::spawn_blocking(move || {
        let mut command = Command::new("curl");
        command.args(["-sS", "--max-time", "20"]).args(&args);
        for name in
            ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"]
        {
            command.env_remove(name);
        }
        for (key, value) in &env {
            command.env(key, value);
        }
        let output = command.output().expect("the `curl` binary is needed by these tests (apt-get install curl)");
        CurlOutput {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    })
    .await
    .expect("curl task")
}

/// [`curl`] with `-w '\n%{http_code} %{http_version}'` appended, for [`CurlOutput::split_status`].
pub async fn curl_status(args: &[&str], env: &[(&str, &str)]) -> CurlOutput {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["-w", "\n%{http_code} %{http_version}"]);
    curl(&all, env).await
}
