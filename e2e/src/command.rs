//! Running the short-lived helper programs the harness drives (`ip`, `kubectl`, `ping`).
use std::process::{Command, Output};

/// A helper program could not be started or reported failure.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot start `{command}`: {source} (is the program installed and on PATH?)")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// Shows a command the way a person would type it, for error messages.
pub fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `command` to completion and returns its output, or an error carrying its stderr.
pub fn run(command: &mut Command) -> Result<Output, CommandError> {
    let output = command.output().map_err(|source| CommandError::Spawn {
        command: describe(command),
        source,
    })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(CommandError::Failed {
            command: describe(command),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Runs `command` and returns its stdout as text.
pub fn run_stdout(command: &mut Command) -> Result<String, CommandError> {
    run(command).map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
}
