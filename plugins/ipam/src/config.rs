//! The `ipam` section of the network config.

use std::time::Duration;

use serde_json::Value;
use virtnet_cni::fields::FieldReader;
use virtnet_cni::logging::LogSettings;
use virtnet_cni::trusted::TrustedPath;
use virtnet_cni::{CniError, NetworkConfig};

use crate::PLUGIN_NAME;
use crate::agent::AgentEndpoint;
use crate::error::IpamPluginError;

pub use virtnet_cni::trusted::DEFAULT_AGENT_SOCKET;
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Two minutes: kubelet's own CNI deadline is longer, but a plugin stuck this long is broken.
pub const MAX_TIMEOUT_MS: u64 = 120_000;

/// Kubernetes object names (DNS-1123 subdomains) can be 253 characters long.
const MAX_SUBNET_NAME_LEN: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpamConfig {
    /// Subnets to allocate from, one address from each (e.g. one IPv4 and one IPv6 Subnet).
    pub subnets: Vec<String>,
    pub agent: AgentEndpoint,
    pub logging: LogSettings,
}

impl IpamConfig {
    /// Reads and validates the `ipam` section. Keys:
    ///
    /// - `type`: must be `virtnet-ipam`;
    /// - `default_subnet` (a Subnet name, as older configs name it) or `default_subnets` (a list of them);
    /// - `agent_socket` (older name `ipam_unix_socket_path`), default [`DEFAULT_AGENT_SOCKET`];
    /// - `timeout_ms`, 1..=[`MAX_TIMEOUT_MS`], default [`DEFAULT_TIMEOUT_MS`];
    /// - `log_level`, `log_file` (older name `log_output_file_path`).
    pub fn from_network(network: &NetworkConfig) -> Result<Self, CniError> {
        let section = network
            .ipam
            .as_ref()
            .ok_or(IpamPluginError::MissingIpamSection)?;
        let mut fields = network.section_fields("ipam", section);

        let plugin_type = fields.require("type", "\"virtnet-ipam\"", Value::as_str)?;
        if plugin_type != PLUGIN_NAME {
            return Err(IpamPluginError::WrongType {
                found: plugin_type.to_owned(),
            }
            .into());
        }
        let subnets = read_subnets(&mut fields)?;

        let socket_key = fields.either("agent_socket", "ipam_unix_socket_path")?;
        let socket = network
            .trusted_dirs
            .read_path(&mut fields, socket_key, DEFAULT_AGENT_SOCKET)?
            .unwrap_or_else(TrustedPath::default_agent_socket);
        let timeout_ms = fields
            .get(
                "timeout_ms",
                "a whole number of milliseconds in 1..=120000, e.g. 10000",
                |value| {
                    value
                        .as_u64()
                        .filter(|ms| (1..=MAX_TIMEOUT_MS).contains(ms))
                },
            )?
            .unwrap_or(DEFAULT_TIMEOUT_MS);
        let logging = LogSettings::read(&mut fields, &network.trusted_dirs)?;
        fields.finish()?;

        Ok(Self {
            subnets,
            agent: AgentEndpoint {
                socket,
                timeout: Duration::from_millis(timeout_ms),
            },
            logging,
        })
    }
}

fn read_subnets(fields: &mut FieldReader<'_>) -> Result<Vec<String>, CniError> {
    let single = fields.get(
        "default_subnet",
        "a string naming a Subnet, e.g. \"default_subnet\": \"subnet\" (lowercase letters, digits, \
         '-' and '.')",
        subnet_name,
    )?;
    let list = fields.list(
        "default_subnets",
        "a Subnet name such as \"subnet-v4\" (lowercase letters, digits, '-' and '.')",
        subnet_name,
    )?;
    let names = match (single, list) {
        (Some(_), Some(_)) => return Err(IpamPluginError::BothSubnetKeys.into()),
        (None, None) => return Err(IpamPluginError::NoSubnet.into()),
        (Some(name), None) => vec![name],
        (None, Some(names)) if names.is_empty() => {
            return Err(IpamPluginError::EmptySubnetList.into());
        }
        (None, Some(names)) => names,
    };
    let mut subnets: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        if subnets.iter().any(|known| known == name) {
            return Err(IpamPluginError::DuplicateSubnet {
                name: name.to_owned(),
            }
            .into());
        }
        subnets.push(name.to_owned());
    }
    Ok(subnets)
}

/// A Subnet is a Kubernetes object, so its name is a DNS-1123 subdomain.
fn subnet_name(value: &Value) -> Option<&str> {
    let name = value.as_str()?;
    let label_ok = |label: &str| {
        let edges_ok =
            |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        edges_ok(label.chars().next())
            && edges_ok(label.chars().last())
            && label
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    (name.len() <= MAX_SUBNET_NAME_LEN && name.split('.').all(label_ok)).then_some(name)
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use virtnet_cni::ErrorCode;
    use virtnet_cni::logging::LogLevel;

    use super::*;
    use std::path::Path;

    fn parse(ipam: Value) -> Result<IpamConfig, CniError> {
        let config =
            json!({"cniVersion": "0.3.1", "name": "macvlan", "type": "macvlan", "ipam": ipam});
        IpamConfig::from_network(&NetworkConfig::parse(config.to_string().as_bytes())?)
    }

    fn rejected(ipam: Value) -> CniError {
        parse(ipam).expect_err("config must be rejected")
    }

    #[test]
    fn minimal_config_gets_the_defaults() -> Result<(), CniError> {
        let config = parse(json!({"type": "virtnet-ipam", "default_subnet": "subnet"}))?;
        assert_eq!(
            config,
            IpamConfig {
                subnets: vec!["subnet".into()],
                agent: AgentEndpoint {
                    socket: TrustedPath::default_agent_socket(),
                    timeout: Duration::from_secs(10),
                },
                logging: LogSettings::default(),
            }
        );
        Ok(())
    }

    #[test]
    fn reads_every_field_including_legacy_aliases() -> Result<(), CniError> {
        let config = parse(json!({
            "type": "virtnet-ipam",
            "default_subnets": ["subnet-v4", "subnet.v6"],
            "ipam_unix_socket_path": "/run/virtnet/virtnet.sock",
            "timeout_ms": 120000,
            "log_level": "debug",
            "log_output_file_path": "/var/log/virtnet/virtnet-ipam.log",
        }))?;
        assert_eq!(config.subnets, ["subnet-v4", "subnet.v6"]);
        assert_eq!(
            config.agent.socket.as_path(),
            Path::new("/run/virtnet/virtnet.sock")
        );
        assert_eq!(config.agent.timeout, Duration::from_secs(120));
        assert_eq!(config.logging.level, LogLevel::Debug);
        assert_eq!(
            config.logging.file.as_ref().map(TrustedPath::as_path),
            Some(Path::new("/var/log/virtnet/virtnet-ipam.log"))
        );
        Ok(())
    }

    #[test]
    fn subnet_rules() {
        for (ipam, needle) in [
            (json!({"type": "virtnet-ipam"}), "names no Subnet"),
            (
                json!({"type": "virtnet-ipam", "default_subnet": "a", "default_subnets": ["b"]}),
                "keep only one",
            ),
            (
                json!({"type": "virtnet-ipam", "default_subnets": []}),
                "is empty",
            ),
            (
                json!({"type": "virtnet-ipam", "default_subnets": ["a", "a"]}),
                "lists \"a\" more than once",
            ),
            (
                json!({"type": "virtnet-ipam", "default_subnet": "Subnet_1"}),
                "ipam.default_subnet must be a string naming a Subnet",
            ),
            (
                json!({"type": "virtnet-ipam", "default_subnet": "-a"}),
                "ipam.default_subnet must be",
            ),
            (
                json!({"type": "virtnet-ipam", "default_subnet": "a..b"}),
                "ipam.default_subnet must be",
            ),
            (
                json!({"type": "virtnet-ipam", "default_subnets": ["ok", "NotOk"]}),
                "ipam.default_subnets[1] must be a Subnet name",
            ),
        ] {
            let error = rejected(ipam);
            assert_eq!(error.code, ErrorCode::INVALID_NETWORK_CONFIG);
            assert!(error.msg.contains(needle), "{}", error.msg);
        }
    }

    #[test]
    fn subnet_names_follow_kubernetes_rules() {
        for good in ["subnet", "a", "sub-net.v4", "0abc", &"a".repeat(253)] {
            assert!(subnet_name(&json!(good)).is_some(), "{good}");
        }
        for bad in ["", "Sub", "a_b", "a-", ".a", "a.", &"a".repeat(254)] {
            assert!(subnet_name(&json!(bad)).is_none(), "{bad}");
        }
    }

    #[test]
    fn timeout_and_socket_limits() {
        for (ipam, needle) in [
            (
                json!({"type": "virtnet-ipam", "default_subnet": "s", "timeout_ms": 0}),
                "ipam.timeout_ms must be a whole number of milliseconds in 1..=120000",
            ),
            (
                json!({"type": "virtnet-ipam", "default_subnet": "s", "timeout_ms": 120001}),
                "got the number 120001",
            ),
            (
                json!({"type": "virtnet-ipam", "default_subnet": "s", "timeout_ms": 1.5}),
                "ipam.timeout_ms must be",
            ),
            (
                json!({"type": "virtnet-ipam", "default_subnet": "s", "agent_socket": "agent.sock"}),
                "ipam.agent_socket must be an absolute path",
            ),
            (
                json!({"type": "virtnet-ipam", "default_subnet": "s", "agent_socket": "/a", "ipam_unix_socket_path": "/b"}),
                "keep only agent_socket",
            ),
        ] {
            let error = rejected(ipam);
            assert_eq!(error.code, ErrorCode::INVALID_NETWORK_CONFIG);
            assert!(error.msg.contains(needle), "{}", error.msg);
        }
    }
}
