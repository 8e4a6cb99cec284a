//! Plugin logging: to stderr or to a file, never to stdout, which carries the CNI result.

use std::path::PathBuf;
use std::sync::Mutex;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

use crate::error::CniError;
use crate::fields::FieldReader;
use crate::trusted::{TrustedDirs, TrustedPath};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    const ALL: [(&'static str, Self); 5] = [
        ("error", Self::Error),
        ("warn", Self::Warn),
        ("info", Self::Info),
        ("debug", Self::Debug),
        ("trace", Self::Trace),
    ];

    /// Case-insensitive, so `"Debug"`-style values of older configs keep working.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|(known, _)| known.eq_ignore_ascii_case(name))
            .map(|(_, level)| level)
    }

    fn filter(self) -> LevelFilter {
        match self {
            Self::Error => LevelFilter::ERROR,
            Self::Warn => LevelFilter::WARN,
            Self::Info => LevelFilter::INFO,
            Self::Debug => LevelFilter::DEBUG,
            Self::Trace => LevelFilter::TRACE,
        }
    }
}

/// Where a plugin logs and how much. Defaults to `info` on stderr, which the container runtime
/// forwards to its own log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogSettings {
    pub level: LogLevel,
    /// Append to this file instead of stderr.
    pub file: Option<TrustedPath>,
}

impl LogSettings {
    /// Reads `log_level` and `log_file` (or the older key `log_output_file_path`) from a plugin's
    /// config object; the file must lie under one of `trusted`.
    pub fn read(fields: &mut FieldReader<'_>, trusted: &TrustedDirs) -> Result<Self, CniError> {
        let level = fields
            .get(
                "log_level",
                "one of \"error\", \"warn\", \"info\", \"debug\", \"trace\"",
                |value| value.as_str().and_then(LogLevel::parse),
            )?
            .unwrap_or_default();
        let file_key = fields.either("log_file", "log_output_file_path")?;
        let file = trusted.read_path(fields, file_key, "/var/log/virtnet/virtnet-ipam.log")?;
        Ok(Self { level, file })
    }

    /// Installs the process-wide logger. Call once, after the config is validated.
    ///
    /// A log file that cannot be opened does not fail the CNI operation: losing logs is better
    /// than failing a pod, so logging falls back to stderr and says why.
    pub fn install(&self) {
        let (writer, open_failure) = match self.file.as_ref().map(open_log_file) {
            None => (BoxMakeWriter::new(std::io::stderr), None),
            Some(Ok(file)) => (BoxMakeWriter::new(Mutex::new(file)), None),
            Some(Err(failure)) => (BoxMakeWriter::new(std::io::stderr), Some(failure)),
        };
        let installed = tracing_subscriber::fmt()
            .with_max_level(self.level.filter())
            .with_ansi(false)
            .with_target(false)
            .with_writer(writer)
            // Its own write failures would be reported with `eprintln!`, which panics when
            // stderr is a closed pipe; a plugin must not die over a log line.
            .log_internal_errors(false)
            .try_init();
        // Installing twice only happens in tests that run plugins in-process; the first
        // subscriber stays, which is harmless.
        if installed.is_ok()
            && let Some((path, error)) = open_failure
        {
            tracing::warn!(
                "cannot open log file {}: {error}; logging to stderr instead",
                path.display()
            );
        }
    }
}

fn open_log_file(path: &TrustedPath) -> Result<std::fs::File, (PathBuf, std::io::Error)> {
    path.open_append()
        .map_err(|error| (path.as_path().to_path_buf(), error))
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, Value, json};

    use super::*;

    fn read(value: Value) -> Result<LogSettings, CniError> {
        let fields: Map<String, Value> = match value {
            Value::Object(map) => map,
            other => panic!("fixture must be an object, got {other}"),
        };
        let mut reader = FieldReader::new("ipam", &fields);
        let settings = LogSettings::read(&mut reader, &TrustedDirs::default())?;
        reader.finish()?;
        Ok(settings)
    }

    #[test]
    fn defaults_to_info_on_stderr() -> Result<(), CniError> {
        assert_eq!(read(json!({}))?, LogSettings::default());
        assert_eq!(LogSettings::default().level, LogLevel::Info);
        Ok(())
    }

    #[test]
    fn reads_level_and_either_file_key() -> Result<(), CniError> {
        let settings = read(json!({"log_level": "DEBUG", "log_file": "/var/log/virtnet/x.log"}))?;
        assert_eq!(settings.level, LogLevel::Debug);
        let file = settings.file.as_ref().map(TrustedPath::as_path);
        assert_eq!(file, Some(std::path::Path::new("/var/log/virtnet/x.log")));
        Ok(())
    }

    #[test]
    fn a_log_file_outside_the_trusted_directories_is_refused() {
        for path in [
            "/etc/cron.d/x",
            "/var/log/virtnet/../../../etc/shadow",
            "/tmp/y.log",
        ] {
            let error = read(json!({"log_file": path})).expect_err(path);
            assert!(
                error
                    .msg
                    .starts_with("ipam.log_file must be an absolute path under one of the node's trusted directories /var/run/virtnet, /run/virtnet, /var/log/virtnet"),
                "{}",
                error.msg
            );
        }
    }

    #[test]
    fn reads_the_older_file_key() -> Result<(), CniError> {
        let settings = read(json!({"log_output_file_path": "/var/log/virtnet/old.log"}))?;
        assert!(settings.file.is_some());
        Ok(())
    }

    #[test]
    fn rejects_unknown_levels_and_relative_files() {
        let error = read(json!({"log_level": "verbose"})).expect_err("bad level");
        assert!(
            error
                .msg
                .starts_with("ipam.log_level must be one of \"error\""),
            "{}",
            error.msg
        );
        let error = read(json!({"log_file": "x.log"})).expect_err("relative path");
        assert!(
            error
                .msg
                .starts_with("ipam.log_file must be an absolute path under one of"),
            "{}",
            error.msg
        );
    }
}
