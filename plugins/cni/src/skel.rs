//! The plugin entry point: environment and stdin in, one JSON document on stdout, an exit code.
//!
//! Order of work, so nothing happens before everything is validated:
//! 1. parse the `CNI_*` environment (VERSION is answered here, without reading the config);
//! 2. parse the network config and check the command exists in its `cniVersion`;
//! 3. let the plugin parse and validate its own settings;
//! 4. install logging (the only side effect so far), then dispatch to the plugin.
//!
//! Any error becomes the spec's error JSON on stdout and exit code 1. Logs go to stderr or a
//! file, never stdout.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;
use serde_json::Value;

use crate::config::NetworkConfig;
use crate::env::{Attachment, Command, Detachment, Inputs, Request};
use crate::error::{CniError, ErrorCode};
use crate::logging::LogSettings;
use crate::result::CniResult;
use crate::version::{CniVersion, VersionReply};

/// A CNI plugin. VERSION is handled by the skel; every other command lands here after the
/// environment, the network config and [`Plugin::Config`] are validated.
pub trait Plugin {
    /// The binary name, e.g. `virtnet-ipam`; it labels every log line.
    const NAME: &'static str;

    /// The plugin's own settings, validated.
    type Config;

    /// Reads and validates the plugin's settings from the network config, for every command
    /// alike. Must not have side effects.
    fn parse_config(&self, network: &NetworkConfig) -> Result<Self::Config, CniError>;

    fn log_settings<'c>(&self, config: &'c Self::Config) -> &'c LogSettings;

    /// The result is printed in the config's `cniVersion` layout.
    fn add(
        &self,
        call: &Call<'_, Self::Config>,
        attachment: &Attachment,
    ) -> Result<CniResult, CniError>;

    fn del(&self, call: &Call<'_, Self::Config>, detachment: &Detachment) -> Result<(), CniError>;

    /// Only reached for configs of 0.4.0 or later, the first version with CHECK.
    fn check(&self, call: &Call<'_, Self::Config>, attachment: &Attachment)
    -> Result<(), CniError>;

    /// Only reached for configs of 1.1.0 or later.
    fn gc(&self, call: &Call<'_, Self::Config>) -> Result<(), CniError>;

    /// Only reached for configs of 1.1.0 or later. Failures should use
    /// [`ErrorCode::NOT_AVAILABLE`] or [`ErrorCode::LIMITED_CONNECTIVITY`].
    fn status(&self, call: &Call<'_, Self::Config>) -> Result<(), CniError>;
}

/// What every command gets besides its own environment.
#[derive(Debug)]
pub struct Call<'a, C> {
    pub network: &'a NetworkConfig,
    pub config: &'a C,
    /// `CNI_PATH`, for plugins that run delegates.
    pub cni_path: &'a [PathBuf],
}

/// What a plugin run prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Empty for successful DEL, CHECK, GC and STATUS.
    pub stdout: String,
    pub exit_code: u8,
}

impl Reply {
    const FAILURE_EXIT_CODE: u8 = 1;

    fn failure(error: &CniError, version: CniVersion) -> Self {
        // Encoding strings and a number cannot fail; the fallback only keeps this total.
        let stdout = serde_json::to_string(&error.reply(version))
            .map(|json| json + "\n")
            .unwrap_or_else(|_| {
                format!(
                    "{{\"code\":{},\"msg\":\"unencodable error\"}}\n",
                    error.code
                )
            });
        Self {
            stdout,
            exit_code: Self::FAILURE_EXIT_CODE,
        }
    }
}

/// Runs `plugin` as a CNI runtime invokes it: process environment, stdin, stdout.
pub fn run<P: Plugin>(plugin: &P) -> ExitCode {
    let mut stdin = Vec::new();
    let reply = match io::stdin().lock().read_to_end(&mut stdin) {
        Ok(_) => handle(plugin, std::env::vars_os(), &stdin),
        Err(error) => Reply::failure(
            &CniError::io_failure("cannot read the network config from stdin", &error),
            CniVersion::LATEST,
        ),
    };
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(reply.stdout.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => ExitCode::from(reply.exit_code),
        // Nobody can read a reply we could not write; the exit code is all that is left.
        Err(_) => ExitCode::FAILURE,
    }
}

/// One plugin invocation with the process I/O taken out: `vars` stands for the environment,
/// `stdin` for standard input.
pub fn handle<P, I, K, V>(plugin: &P, vars: I, stdin: &[u8]) -> Reply
where
    P: Plugin,
    I: IntoIterator<Item = (K, V)>,
    K: Into<OsString>,
    V: Into<OsString>,
{
    match execute(plugin, vars, stdin) {
        Ok(stdout) => Reply {
            stdout,
            exit_code: 0,
        },
        Err(error) => Reply::failure(&error, reply_version(stdin)),
    }
}

fn execute<P, I, K, V>(plugin: &P, vars: I, stdin: &[u8]) -> Result<String, CniError>
where
    P: Plugin,
    I: IntoIterator<Item = (K, V)>,
    K: Into<OsString>,
    V: Into<OsString>,
{
    let inputs = Inputs::from_vars(vars)?;
    if inputs.request == Request::Version {
        return version_reply();
    }
    let mut network = NetworkConfig::parse(stdin)?;
    network.trusted_dirs = inputs.trusted_dirs.clone();
    let command = inputs.command();
    check_command_exists_in(command, network.cni_version)?;
    // A teardown must not fail forever on a key this version does not know (a newer VirtNet
    // wrote the config): it is read again ignoring unknown keys, and the refusal is logged.
    let (network, config, ignored) = match plugin.parse_config(&network) {
        Ok(config) => (network, config, None),
        Err(refusal) if command.tolerates_unknown_keys() => {
            let lenient = network.ignoring_unknown_keys();
            let config = plugin.parse_config(&lenient)?;
            (lenient, config, Some(refusal))
        }
        Err(refusal) => return Err(refusal),
    };

    plugin.log_settings(&config).install();
    let (container, ifname) = match &inputs.request {
        Request::Add(attachment) | Request::Check(attachment) => {
            (attachment.container_id.as_str(), attachment.ifname.as_str())
        }
        Request::Del(detachment) => (detachment.container_id.as_str(), detachment.ifname.as_str()),
        Request::Version | Request::Gc | Request::Status => ("", ""),
    };
    // An error-level span is enabled whatever the log level, so even error lines say which
    // container they are about.
    let _span =
        tracing::error_span!("cni", plugin = P::NAME, %command, container, ifname).entered();
    tracing::debug!(cni_version = %network.cni_version, network = network.name.as_deref(), "validated the environment and the network config");
    if let Some(refusal) = ignored {
        tracing::warn!(
            "{command} goes on ignoring what it does not need: {}",
            refusal.msg
        );
    }

    let call = Call {
        network: &network,
        config: &config,
        cni_path: &inputs.cni_path,
    };
    let no_output = |()| String::new();
    let outcome = match &inputs.request {
        Request::Add(attachment) => plugin
            .add(&call, attachment)
            .and_then(|result| to_json(&result.versioned(network.cni_version))),
        Request::Del(detachment) => plugin.del(&call, detachment).map(no_output),
        Request::Check(attachment) => plugin.check(&call, attachment).map(no_output),
        Request::Gc => plugin.gc(&call).map(no_output),
        Request::Status => plugin.status(&call).map(no_output),
        // Answered above, before stdin was parsed.
        Request::Version => version_reply(),
    };
    match &outcome {
        Ok(_) => tracing::info!("{command} succeeded"),
        Err(error) if error.details.is_empty() => {
            tracing::error!(code = %error.code, "{command} failed: {}", error.msg)
        }
        Err(error) => {
            tracing::error!(code = %error.code, details = error.details, "{command} failed: {}", error.msg)
        }
    }
    outcome
}

/// CHECK arrived in 0.4.0, GC and STATUS in 1.1.0; a config of an older version cannot ask for
/// them (the reference skel rejects them the same way).
fn check_command_exists_in(command: Command, version: CniVersion) -> Result<(), CniError> {
    let introduced_in = match command {
        Command::Check => CniVersion::V0_4_0,
        Command::Gc | Command::Status => CniVersion::V1_1_0,
        Command::Add | Command::Del | Command::Version => return Ok(()),
    };
    if version >= introduced_in {
        return Ok(());
    }
    Err(CniError::incompatible_version(format!(
        "CNI_COMMAND={command} needs cniVersion {introduced_in} or later, but the network config \
         declares {version}"
    )))
}

fn version_reply() -> Result<String, CniError> {
    to_json(&VersionReply::default())
}

fn to_json(value: &impl Serialize) -> Result<String, CniError> {
    serde_json::to_string(value)
        .map(|json| json + "\n")
        .map_err(|error| {
            CniError::new(ErrorCode::IO_FAILURE, "cannot encode the reply as JSON")
                .with_details(error.to_string())
        })
}

/// The version an error reply is labelled with: the config's, when stdin has a supported one.
fn reply_version(stdin: &[u8]) -> CniVersion {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|document| {
            let declared = document.get("cniVersion")?.as_str()?;
            CniVersion::from_declared(declared).ok()
        })
        .unwrap_or(CniVersion::LATEST)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::error::Error;
    use std::net::Ipv4Addr;

    use ipnet::{IpNet, Ipv4Net};
    use serde_json::json;

    use super::*;
    use crate::error::ErrorReply;
    use crate::logging::LogLevel;
    use crate::result::IpConfig;

    /// Records which commands reached it; fails them when its config says `"fail": true`.
    #[derive(Default)]
    struct RecordingPlugin {
        calls: RefCell<Vec<Command>>,
    }

    struct RecordingConfig {
        fail: bool,
        logging: LogSettings,
    }

    impl RecordingPlugin {
        fn outcome(&self, command: Command, config: &RecordingConfig) -> Result<(), CniError> {
            self.calls.borrow_mut().push(command);
            if config.fail {
                Err(CniError::new(ErrorCode::TRY_AGAIN_LATER, "asked to fail"))
            } else {
                Ok(())
            }
        }
    }

    impl Plugin for RecordingPlugin {
        const NAME: &'static str = "recording";
        type Config = RecordingConfig;

        fn parse_config(&self, network: &NetworkConfig) -> Result<RecordingConfig, CniError> {
            let mut fields = network.plugin_fields();
            let fail = fields.bool("fail")?.unwrap_or(false);
            fields.finish()?;
            Ok(RecordingConfig {
                fail,
                logging: LogSettings {
                    level: LogLevel::Error,
                    file: None,
                },
            })
        }

        fn log_settings<'c>(&self, config: &'c RecordingConfig) -> &'c LogSettings {
            &config.logging
        }

        fn add(
            &self,
            call: &Call<'_, RecordingConfig>,
            _: &Attachment,
        ) -> Result<CniResult, CniError> {
            self.outcome(Command::Add, call.config)?;
            Ok(CniResult {
                ips: vec![IpConfig {
                    address: IpNet::from(Ipv4Net::new_assert(Ipv4Addr::new(10, 6, 153, 101), 16)),
                    gateway: None,
                    interface: None,
                }],
                ..CniResult::default()
            })
        }

        fn del(&self, call: &Call<'_, RecordingConfig>, _: &Detachment) -> Result<(), CniError> {
            self.outcome(Command::Del, call.config)
        }

        fn check(&self, call: &Call<'_, RecordingConfig>, _: &Attachment) -> Result<(), CniError> {
            self.outcome(Command::Check, call.config)
        }

        fn gc(&self, call: &Call<'_, RecordingConfig>) -> Result<(), CniError> {
            self.outcome(Command::Gc, call.config)
        }

        fn status(&self, call: &Call<'_, RecordingConfig>) -> Result<(), CniError> {
            self.outcome(Command::Status, call.config)
        }
    }

    fn env(command: &'static str) -> Vec<(&'static str, &'static str)> {
        vec![
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
        ]
    }

    fn config(version: &str, extra: Value) -> Vec<u8> {
        let mut config = json!({"cniVersion": version, "name": "net", "type": "recording"});
        if let (Some(config), Value::Object(extra)) = (config.as_object_mut(), extra) {
            config.extend(extra);
        }
        config.to_string().into_bytes()
    }

    fn error_of(reply: &Reply) -> Result<ErrorReply, Box<dyn Error>> {
        assert_eq!(reply.exit_code, 1, "{}", reply.stdout);
        Ok(serde_json::from_str(&reply.stdout)?)
    }

    #[test]
    fn version_is_answered_without_reading_stdin() -> Result<(), Box<dyn Error>> {
        let plugin = RecordingPlugin::default();
        let reply = handle(&plugin, [("CNI_COMMAND", "VERSION")], b"not json");
        assert_eq!(reply.exit_code, 0);
        assert_eq!(
            serde_json::from_str::<Value>(&reply.stdout)?,
            json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
        );
        assert!(plugin.calls.borrow().is_empty());
        Ok(())
    }

    #[test]
    fn add_prints_the_result_in_the_config_version() -> Result<(), Box<dyn Error>> {
        let reply = handle(
            &RecordingPlugin::default(),
            env("ADD"),
            &config("0.3.1", json!({})),
        );
        assert_eq!(reply.exit_code, 0);
        assert_eq!(
            serde_json::from_str::<Value>(&reply.stdout)?,
            json!({"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.6.153.101/16"}], "dns": {}})
        );
        Ok(())
    }

    #[test]
    fn del_check_gc_status_print_nothing_on_success() {
        let plugin = RecordingPlugin::default();
        for command in ["DEL", "CHECK", "GC", "STATUS"] {
            let reply = handle(&plugin, env(command), &config("1.1.0", json!({})));
            assert_eq!(
                reply,
                Reply {
                    stdout: String::new(),
                    exit_code: 0
                },
                "{command}"
            );
        }
        assert_eq!(
            *plugin.calls.borrow(),
            [Command::Del, Command::Check, Command::Gc, Command::Status]
        );
    }

    #[test]
    fn plugin_errors_are_printed_with_the_config_version() -> Result<(), Box<dyn Error>> {
        let reply = handle(
            &RecordingPlugin::default(),
            env("ADD"),
            &config("1.0.0", json!({"fail": true})),
        );
        let error = error_of(&reply)?;
        assert_eq!(
            (error.cni_version.as_str(), error.code, error.msg.as_str()),
            ("1.0.0", ErrorCode::TRY_AGAIN_LATER, "asked to fail")
        );
        Ok(())
    }

    #[test]
    fn invalid_plugin_config_never_reaches_the_plugin() -> Result<(), Box<dyn Error>> {
        let plugin = RecordingPlugin::default();
        let error = error_of(&handle(
            &plugin,
            env("ADD"),
            &config("0.4.0", json!({"fail": "yes"})),
        ))?;
        assert_eq!(error.code, ErrorCode::INVALID_NETWORK_CONFIG);
        assert_eq!(error.msg, "fail must be true or false; got \"yes\"");
        assert!(plugin.calls.borrow().is_empty());
        Ok(())
    }

    #[test]
    fn environment_errors_still_use_the_version_on_stdin() -> Result<(), Box<dyn Error>> {
        let error = error_of(&handle(
            &RecordingPlugin::default(),
            [("CNI_COMMAND", "ADD")],
            &config("0.3.1", json!({})),
        ))?;
        assert_eq!(
            (error.cni_version.as_str(), error.code),
            ("0.3.1", ErrorCode::INVALID_ENVIRONMENT)
        );
        let error = error_of(&handle(
            &RecordingPlugin::default(),
            [("CNI_COMMAND", "ADD")],
            b"garbage",
        ))?;
        assert_eq!(error.cni_version, "1.1.0");
        Ok(())
    }

    #[test]
    fn commands_newer_than_the_config_version_are_rejected() -> Result<(), Box<dyn Error>> {
        let plugin = RecordingPlugin::default();
        for (command, version, needle) in [
            (
                "CHECK",
                "0.3.1",
                "CNI_COMMAND=CHECK needs cniVersion 0.4.0 or later, but the network config declares 0.3.1",
            ),
            (
                "GC",
                "1.0.0",
                "CNI_COMMAND=GC needs cniVersion 1.1.0 or later",
            ),
            (
                "STATUS",
                "0.4.0",
                "CNI_COMMAND=STATUS needs cniVersion 1.1.0 or later",
            ),
        ] {
            let error = error_of(&handle(&plugin, env(command), &config(version, json!({}))))?;
            assert_eq!(error.code, ErrorCode::INCOMPATIBLE_VERSION);
            assert!(error.msg.starts_with(needle), "{}", error.msg);
        }
        assert!(plugin.calls.borrow().is_empty());
        Ok(())
    }
}
