//! Running a plugin binary the way a container runtime does, and a fake node agent for it to
//! talk to, for integration tests (`features = ["testing"]`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::error::{ErrorCode, ErrorReply};
use crate::trusted::TRUSTED_DIRS_ENV;

/// What one plugin run printed and how it exited.
#[derive(Debug, Clone)]
pub struct PluginRun {
    /// `None` when the process was killed by a signal.
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `binary` with exactly `env` (nothing inherited) and `stdin`, as on a node whose runtime
/// trusts the temp dir (where the tests keep agent sockets and log files) unless `env` sets
/// [`TRUSTED_DIRS_ENV`] itself.
pub fn run_plugin(
    binary: impl AsRef<Path>,
    env: &[(&str, &str)],
    stdin: &str,
) -> std::io::Result<PluginRun> {
    let mut child = Command::new(binary.as_ref())
        .env_clear()
        .env(TRUSTED_DIRS_ENV, std::env::temp_dir())
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes())?;
    }
    let output = child.wait_with_output()?;
    Ok(PluginRun {
        exit_code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

impl PluginRun {
    /// Checks that the run failed the way the spec wants (non-zero exit, exactly one CNI error
    /// object on stdout) with `code`, and that the message contains every one of `needles`.
    pub fn expect_error(&self, code: ErrorCode, needles: &[&str]) -> Result<ErrorReply, String> {
        if self.exit_code == Some(0) {
            return Err(format!(
                "expected a failure, but the plugin exited 0 printing {:?}",
                self.stdout
            ));
        }
        let reply: ErrorReply = serde_json::from_str(&self.stdout).map_err(|error| {
            format!(
                "stdout is not a CNI error object ({error}): {:?}",
                self.stdout
            )
        })?;
        if reply.code != code {
            return Err(format!("expected error code {code}, got {reply:?}"));
        }
        if let Some(missing) = needles.iter().find(|needle| !reply.msg.contains(**needle)) {
            return Err(format!(
                "message {:?} does not contain {missing:?}",
                reply.msg
            ));
        }
        Ok(reply)
    }

    /// Checks that the run succeeded and printed exactly one JSON document, which it returns.
    pub fn expect_json(&self) -> Result<Value, String> {
        if self.exit_code != Some(0) {
            return Err(format!("expected success, got {self:?}"));
        }
        serde_json::from_str(&self.stdout).map_err(|error| {
            format!(
                "stdout is not one JSON document ({error}): {:?}",
                self.stdout
            )
        })
    }
}

/// A fake node agent's socket: a router served on `agent.sock` in a temp dir by a detached
/// runtime thread, until the test process ends. The directory goes when this is dropped.
pub struct FakeAgentSocket {
    _directory: tempfile::TempDir,
    pub path: PathBuf,
}

/// Serves `router` on a fresh unix socket, as the node agent serves the plugins.
pub fn serve_fake_agent(router: axum::Router) -> std::io::Result<FakeAgentSocket> {
    let directory = tempfile::tempdir()?;
    let path = directory.path().join("agent.sock");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = runtime.block_on(async { tokio::net::UnixListener::bind(&path) })?;
    std::thread::spawn(move || {
        runtime.block_on(async move { axum::serve(listener, router).await })
    });
    Ok(FakeAgentSocket {
        _directory: directory,
        path,
    })
}
