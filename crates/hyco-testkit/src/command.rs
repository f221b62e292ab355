//! Commands run to completion with a deadline, and `hyco admin` against a relay.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// What a finished command said: exit code (-1 for a signal), stdout, stderr.
pub type Output = (i32, String, String);

/// A command that could not be run to completion.
#[derive(Debug)]
pub enum RunError {
    /// It could not be started.
    Start(PathBuf, std::io::Error),
    /// It did not finish in time (it was killed).
    Timeout(String, Duration),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Start(bin, e) => write!(f, "cannot run {}: {e}", bin.display()),
            RunError::Timeout(what, within) => write!(f, "{what} did not finish within {within:?}"),
        }
    }
}

impl std::error::Error for RunError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RunError::Start(_, e) => Some(e),
            RunError::Timeout(..) => None,
        }
    }
}

/// Runs a command to completion with a deadline; its exit code, stdout and stderr.
pub async fn try_run(
    bin: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    remove: &[&str],
    within: Duration,
) -> Result<Output, RunError> {
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    for v in remove {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(within, cmd.output())
        .await
        .map_err(|_| RunError::Timeout(format!("{} {args:?}", bin.display()), within))?
        .map_err(|e| RunError::Start(bin.to_owned(), e))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs a command to completion with a deadline; returns (status code, stdout, stderr).
/// Panics when it cannot be run or does not finish in time.
pub async fn run(
    bin: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    within: Duration,
) -> (i32, String, String) {
    try_run(bin, args, env, &[], within)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `hyco admin` against one relay: the binary, the relay's CA file and its root connection
/// string (passed in the environment, never on the command line).
#[derive(Debug, Clone)]
pub struct Admin {
    /// The `hyco` binary.
    pub bin: PathBuf,
    /// `HYCO_CA_FILE`.
    pub ca: PathBuf,
    /// `HYCO_CONNECTION_STRING`.
    pub root: String,
    /// Deadline of one command.
    pub within: Duration,
}

/// A `hyco admin` command that failed.
#[derive(Debug)]
pub enum AdminError {
    /// It could not be run to completion.
    Run(RunError),
    /// It exited with an error.
    Failed {
        /// The arguments after `admin`.
        args: Vec<String>,
        /// Its stderr, trimmed.
        stderr: String,
    },
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminError::Run(e) => e.fmt(f),
            AdminError::Failed { args, stderr } => write!(f, "hyco admin {args:?}: {stderr}"),
        }
    }
}

impl std::error::Error for AdminError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AdminError::Run(e) => Some(e),
            AdminError::Failed { .. } => None,
        }
    }
}

impl Admin {
    /// `hyco admin ARGS`: exit code, stdout, stderr.
    pub async fn output(&self, args: &[&str]) -> Result<Output, RunError> {
        let mut full = vec!["admin"];
        full.extend_from_slice(args);
        let ca = self.ca.to_string_lossy();
        let env = [
            ("HYCO_CA_FILE", ca.as_ref()),
            ("HYCO_CONNECTION_STRING", self.root.as_str()),
        ];
        try_run(
            &self.bin,
            &full,
            &env,
            &crate::proc::PROXY_VARS,
            self.within,
        )
        .await
    }

    /// `hyco admin ARGS` that must succeed: its stdout, trimmed.
    pub async fn ok(&self, args: &[&str]) -> Result<String, AdminError> {
        let (code, out, err) = self.output(args).await.map_err(AdminError::Run)?;
        if code != 0 {
            return Err(AdminError::Failed {
                args: args.iter().map(|s| (*s).to_owned()).collect(),
                stderr: err.trim().to_owned(),
            });
        }
        Ok(out.trim().to_owned())
    }
}
