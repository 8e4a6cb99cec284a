//! The network config the runtime passes on stdin: the standard CNI keys, typed, and the
//! plugin's own keys left for the plugin to read with a [`FieldReader`].

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::CniError;
use crate::fields::{FieldReader, describe};
use crate::result::CniResult;
use crate::trusted::TrustedDirs;
use crate::version::{CniVersion, supported_list};

/// An attachment the runtime still uses, listed in a GC request's `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfig {
    pub cni_version: CniVersion,
    /// The network name; absent when a plugin is run by hand outside a conflist.
    pub name: Option<String>,
    /// `type`: the plugin binary the runtime ran.
    pub plugin_type: String,
    /// `prevResult` as received; [`prev_result`](Self::prev_result) parses it. Kept raw so a
    /// plugin that does not read it never fails on it.
    pub prev_result: Option<Value>,
    pub runtime_config: Option<Map<String, Value>>,
    pub args: Option<Map<String, Value>>,
    pub ipam: Option<Map<String, Value>>,
    /// GC only: `cni.dev/valid-attachments`.
    pub valid_attachments: Option<Vec<GcAttachment>>,
    /// Every key that is not a standard CNI key: the plugin's own settings.
    pub plugin_keys: Map<String, Value>,
    /// Where this config may put host paths (the agent socket, log files): the built-in
    /// directories, plus the runtime environment's (set by the skel).
    pub trusted_dirs: TrustedDirs,
    /// Whether a plugin's reader refuses keys it does not know (see [`UnknownKeys`]).
    pub unknown_keys: UnknownKeys,
}

/// What a plugin does with a key it does not know.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UnknownKeys {
    /// Refuse the config, naming the key: a typo must not be silently ignored.
    #[default]
    Refuse,
    /// Ignore it: a teardown must not fail forever because a newer VirtNet wrote a key this
    /// version does not know (the skel warns instead).
    Ignore,
}

impl NetworkConfig {
    /// Parses stdin. Unreadable input is code 6, an unsupported `cniVersion` code 1, a
    /// malformed standard key code 7.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        if stdin.iter().all(u8::is_ascii_whitespace) {
            return Err(CniError::decode_failure(
                "stdin is empty; the container runtime must pass the network config as a JSON \
                 object on stdin",
            ));
        }
        let document: Value = serde_json::from_slice(stdin).map_err(|error| {
            CniError::decode_failure("the network config on stdin is not valid JSON")
                .with_details(error.to_string())
        })?;
        let fields = document.as_object().ok_or_else(|| {
            CniError::decode_failure(format!(
                "the network config on stdin must be a JSON object such as {{\"cniVersion\": \
                 \"0.3.1\", \"type\": ...}}; got {}",
                describe(&document)
            ))
        })?;

        let mut reader = FieldReader::new("", fields);
        let cni_version = match reader.string("cniVersion", "a version string such as \"0.3.1\"")? {
            Some(declared) => CniVersion::from_declared(declared)?,
            // The spec reads a missing cniVersion as 0.1.0, which no VirtNet plugin speaks.
            None => {
                return Err(CniError::incompatible_version(format!(
                    "the network config has no cniVersion; set \"cniVersion\" to one of {}",
                    supported_list()
                )));
            }
        };
        let object = "a JSON object";
        Ok(Self {
            cni_version,
            name: reader.string("name", "a string")?.map(str::to_owned),
            plugin_type: reader
                .require(
                    "type",
                    "the plugin's binary name, e.g. \"virtnet-coordinator\"",
                    |value| value.as_str().filter(|name| !name.is_empty()),
                )?
                .to_owned(),
            prev_result: reader.raw("prevResult").cloned(),
            runtime_config: reader
                .get("runtimeConfig", object, Value::as_object)?
                .cloned(),
            args: reader.get("args", object, Value::as_object)?.cloned(),
            ipam: reader.get("ipam", object, Value::as_object)?.cloned(),
            valid_attachments: reader.objects(
                "cni.dev/valid-attachments",
                "an attachment such as {\"containerID\": \"...\", \"ifname\": \"eth0\"}",
                GcAttachment::read,
            )?,
            plugin_keys: {
                // Standard keys VirtNet's plugins do not use; read so they are not taken for
                // plugin keys.
                for standard in ["capabilities", "dns", "ipMasq"] {
                    reader.raw(standard);
                }
                reader.into_unread()
            },
            trusted_dirs: TrustedDirs::default(),
            unknown_keys: UnknownKeys::Refuse,
        })
    }

    /// The parsed `prevResult`, if the config has one.
    pub fn prev_result(&self) -> Result<Option<CniResult>, CniError> {
        self.prev_result
            .as_ref()
            .map(|value| CniResult::parse("prevResult", value))
            .transpose()
    }

    /// A reader over the plugin's own top-level keys; call [`FieldReader::finish`] once every
    /// setting is read to reject unknown keys.
    pub fn plugin_fields(&self) -> FieldReader<'_> {
        self.section_fields("", &self.plugin_keys)
    }

    /// A reader over one of the config's objects (e.g. `ipam`), honouring
    /// [`unknown_keys`](Self::unknown_keys).
    pub fn section_fields<'a>(
        &self,
        path: &str,
        fields: &'a Map<String, Value>,
    ) -> FieldReader<'a> {
        let reader = FieldReader::new(path, fields);
        match self.unknown_keys {
            UnknownKeys::Refuse => reader,
            UnknownKeys::Ignore => reader.ignoring_unknown_keys(),
        }
    }

    /// The same config, read again with unknown keys ignored.
    pub fn ignoring_unknown_keys(&self) -> Self {
        Self {
            unknown_keys: UnknownKeys::Ignore,
            ..self.clone()
        }
    }
}

impl GcAttachment {
    fn read(mut fields: FieldReader<'_>) -> Result<Self, CniError> {
        let mut text = |key| -> Result<String, CniError> {
            fields
                .require(key, "a non-empty string", |value| {
                    value.as_str().filter(|text| !text.is_empty())
                })
                .map(str::to_owned)
        };
        Ok(Self {
            container_id: text("containerID")?,
            ifname: text("ifname")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use serde_json::json;

    use super::*;
    use crate::error::ErrorCode;

    fn parse(value: Value) -> Result<NetworkConfig, CniError> {
        NetworkConfig::parse(value.to_string().as_bytes())
    }

    #[test]
    fn parses_standard_keys_and_keeps_plugin_keys() -> Result<(), Box<dyn Error>> {
        let config = parse(json!({
            "cniVersion": "1.1.0",
            "name": "macvlan",
            "type": "virtnet-coordinator",
            "mode": "auto",
            "runtimeConfig": {"ips": []},
            "args": {"cni": {"ips": ["10.0.0.5"]}},
            "capabilities": {"ips": true},
            "dns": {},
            "prevResult": {"ips": [{"address": "10.0.0.2/24"}]},
            "cni.dev/valid-attachments": [{"containerID": "abc", "ifname": "eth0"}],
        }))?;
        assert_eq!(config.cni_version, CniVersion::V1_1_0);
        assert_eq!(config.name.as_deref(), Some("macvlan"));
        assert_eq!(config.plugin_type, "virtnet-coordinator");
        assert_eq!(
            Value::Object(config.plugin_keys.clone()),
            json!({"mode": "auto"})
        );
        assert_eq!(
            config.valid_attachments,
            Some(vec![GcAttachment {
                container_id: "abc".into(),
                ifname: "eth0".into()
            }])
        );
        assert!(config.runtime_config.is_some() && config.args.is_some());
        assert_eq!(
            config.prev_result()?.map(|result| result.ips.len()),
            Some(1)
        );
        Ok(())
    }

    #[test]
    fn a_bad_prev_result_fails_only_when_read() -> Result<(), Box<dyn Error>> {
        let config =
            parse(json!({"cniVersion": "0.3.1", "type": "macvlan", "prevResult": {"ips": 1}}))?;
        assert!(config.prev_result().is_err());
        Ok(())
    }

    #[test]
    fn stdin_problems_are_decode_failures() {
        for (stdin, needle) in [
            ("", "stdin is empty"),
            ("  \n", "stdin is empty"),
            ("{\"cniVersion\":", "not valid JSON"),
            ("[1, 2]", "must be a JSON object such as"),
        ] {
            let error = NetworkConfig::parse(stdin.as_bytes()).expect_err("bad stdin");
            assert_eq!(error.code, ErrorCode::DECODE_FAILURE, "{stdin:?}");
            assert!(error.msg.contains(needle), "{stdin:?}: {}", error.msg);
        }
    }

    #[test]
    fn version_problems_are_code_1() {
        for (config, needle) in [
            (json!({"type": "x"}), "has no cniVersion"),
            (
                json!({"cniVersion": "0.2.0", "type": "x"}),
                "\"0.2.0\" is not supported",
            ),
        ] {
            let error = parse(config).expect_err("bad version");
            assert_eq!(error.code, ErrorCode::INCOMPATIBLE_VERSION);
            assert!(
                error.msg.contains(needle) && error.msg.contains("0.3.1, 0.4.0, 1.0.0, 1.1.0"),
                "{}",
                error.msg
            );
        }
    }

    #[test]
    fn malformed_standard_keys_are_code_7() {
        for (config, needle) in [
            (
                json!({"cniVersion": 1, "type": "x"}),
                "cniVersion must be a version string",
            ),
            (json!({"cniVersion": "1.0.0"}), "type is missing"),
            (
                json!({"cniVersion": "1.0.0", "type": ""}),
                "type must be the plugin's binary name",
            ),
            (
                json!({"cniVersion": "1.0.0", "type": "x", "ipam": "virtnet-ipam"}),
                "ipam must be a JSON object",
            ),
            (
                json!({"cniVersion": "1.1.0", "type": "x", "cni.dev/valid-attachments": [{"containerID": "a"}]}),
                "cni.dev/valid-attachments[0].ifname is missing",
            ),
        ] {
            let error = parse(config).expect_err("bad key");
            assert_eq!(error.code, ErrorCode::INVALID_NETWORK_CONFIG);
            assert!(error.msg.contains(needle), "{}", error.msg);
        }
    }
}
