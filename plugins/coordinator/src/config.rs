//! The coordinator's keys, at the top level of its plugin config.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use virtnet_cni::agent_api::CoordinatorResponse;
use virtnet_cni::env::check_interface_name;
use virtnet_cni::logging::LogSettings;
use virtnet_cni::trusted::TrustedPath;
use virtnet_cni::{CniError, NetworkConfig};

/// 253, 254 and 255 are the kernel's `default`, `main` and `local` tables and 0 is "unspecified",
/// so none of them may hold the coordinator's host routes.
const FIRST_TABLE_ABOVE_RESERVED: u32 = 256;
const LAST_TABLE_BELOW_RESERVED: u32 = 252;
const MAX_HOST_RULE_TABLE: u32 = 1 << 31;
/// IPv4's minimum reassembly size; a smaller MTU breaks IPv4 itself.
const MIN_MTU: u32 = 576;
const MAX_MTU: u32 = 65_535;
/// Where the node agent listens (virtnet-ipam's default too).
pub use virtnet_cni::trusted::DEFAULT_AGENT_SOCKET;
/// The agent answers from its caches; a slow answer only delays the pod, so give up early and
/// wire what the config says.
pub const DEFAULT_AGENT_TIMEOUT_MS: u64 = 2_000;
const MAX_AGENT_TIMEOUT_MS: u64 = 30_000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// Decide from the pod's interfaces (the default).
    #[default]
    Auto,
    /// The pod's first interface is an underlay (macvlan) interface: add the host veth.
    Underlay,
    /// Pass prevResult through and change nothing.
    Disabled,
}

impl Mode {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "auto" => Some(Self::Auto),
            "underlay" => Some(Self::Underlay),
            "disabled" => Some(Self::Disabled),
            _ => None,
        }
    }
}

/// The KubeVirt network binding of a virt-launcher pod, from `kubevirtBinding` or the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubevirtBinding {
    /// passt: the pod keeps its address, MAC and default route; the coordinator works as usual.
    Passt,
    /// bridge: the pod's MAC moves into the VM, which macvlan cannot carry; refused.
    Bridge,
    /// Any other binding the agent reports (masquerade, a binding plugin): the pod interface
    /// keeps its MAC, so the coordinator works as usual.
    Other,
}

impl KubevirtBinding {
    /// The config key's values.
    fn parse(name: &str) -> Option<Self> {
        match name {
            "passt" => Some(Self::Passt),
            "bridge" => Some(Self::Bridge),
            _ => None,
        }
    }

    /// A binding as KubeVirt names it (what the agent reports).
    fn from_kubevirt(name: &str) -> Self {
        Self::parse(name).unwrap_or(Self::Other)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorConfig {
    /// The CNI network's `name`: it labels each host veth (see [`crate::plan::host_veth_alias`])
    /// so that GC of one network never deletes another's. Absent only when the plugin is run by
    /// hand outside a conflist.
    pub network: Option<String>,
    pub mode: Mode,
    /// Service CIDRs the pod reaches through the host (kube-proxy runs there).
    pub service_cidrs: Vec<IpNet>,
    /// The pod interface that carries the default route; the first interface when unset.
    pub pod_default_route_nic: Option<String>,
    pub detect_ip_conflict: bool,
    pub detect_gateway: bool,
    /// The host-side veth MTU; inherited from the pod interface when unset.
    pub veth_host_mtu: Option<u32>,
    /// Set for a KubeVirt virt-launcher pod (by the agent or the NAD).
    pub kubevirt_binding: Option<KubevirtBinding>,
    /// The addresses the agent says VirtNet allocated to this interface (`None`: not asked, or
    /// an agent that does not say); node routes go only to these.
    pub allocated: Option<Vec<IpAddr>>,
    /// The node agent, asked for the Service CIDRs and the pod's own choices.
    pub agent_socket: TrustedPath,
    pub agent_timeout: Duration,
    pub logging: LogSettings,
}

impl CoordinatorConfig {
    pub fn from_network(network: &NetworkConfig) -> Result<Self, CniError> {
        let mut fields = network.plugin_fields();
        let mode = fields
            .get(
                "mode",
                "one of \"auto\", \"underlay\", \"disabled\"",
                |value| value.as_str().and_then(Mode::parse),
            )?
            .unwrap_or_default();
        let service_cidrs = fields
            .list(
                "serviceCIDRs",
                "a CIDR with no host bits, e.g. \"10.96.0.0/12\"",
                |value| {
                    value
                        .as_str()?
                        .parse::<IpNet>()
                        .ok()
                        .filter(|cidr| cidr.trunc() == *cidr)
                },
            )?
            .unwrap_or_default();
        // Host routes to pods live in the main table and die with the host veth, so no host
        // `ip rule` is ever needed; the older key is still validated, for drop-in migration.
        fields.get(
            "hostRuleTable",
            "a routing table number in 1..=252 or 256..=2147483648, e.g. 500 (0 and 253-255 \
                 are reserved by the kernel)",
            |value| {
                let table = u32::try_from(value.as_u64()?).ok()?;
                let allowed = (1..=LAST_TABLE_BELOW_RESERVED).contains(&table)
                    || (FIRST_TABLE_ABOVE_RESERVED..=MAX_HOST_RULE_TABLE).contains(&table);
                allowed.then_some(table)
            },
        )?;
        let pod_default_route_nic = fields
            .get(
                "podDefaultRouteNIC",
                "an interface name such as \"eth0\" (at most 15 characters, no '/', ':' or spaces)",
                |value| {
                    value
                        .as_str()
                        .filter(|name| check_interface_name(name).is_ok())
                },
            )?
            .map(str::to_owned);
        let detect_ip_conflict = fields.bool("detectIPConflict")?.unwrap_or(false);
        let detect_gateway = fields.bool("detectGateway")?.unwrap_or(false);
        let veth_host_mtu = fields.get(
            "vethHostMTU",
            "a whole number in 576..=65535, e.g. 1500",
            |value| {
                u32::try_from(value.as_u64()?)
                    .ok()
                    .filter(|mtu| (MIN_MTU..=MAX_MTU).contains(mtu))
            },
        )?;
        let kubevirt_binding =
            fields.get("kubevirtBinding", "one of \"passt\", \"bridge\"", |value| {
                value.as_str().and_then(KubevirtBinding::parse)
            })?;
        // The older name for the agent socket is accepted for drop-in migration.
        let socket_key = fields.either("agent_socket", "coordinator_unix_socket_path")?;
        let agent_socket = network
            .trusted_dirs
            .read_path(&mut fields, socket_key, DEFAULT_AGENT_SOCKET)?
            .unwrap_or_else(TrustedPath::default_agent_socket);
        let agent_timeout_ms = fields
            .get(
                "agent_timeout_ms",
                "a whole number of milliseconds in 1..=30000, e.g. 2000",
                |value| {
                    value
                        .as_u64()
                        .filter(|ms| (1..=MAX_AGENT_TIMEOUT_MS).contains(ms))
                },
            )?
            .unwrap_or(DEFAULT_AGENT_TIMEOUT_MS);
        let logging = LogSettings::read(&mut fields, &network.trusted_dirs)?;
        fields.finish()?;
        Ok(Self {
            network: network.name.clone(),
            mode,
            service_cidrs,
            pod_default_route_nic,
            detect_ip_conflict,
            detect_gateway,
            veth_host_mtu,
            kubevirt_binding,
            allocated: None,
            agent_socket,
            agent_timeout: Duration::from_millis(agent_timeout_ms),
            logging,
        })
    }

    /// Whether ADD needs the agent: for the pod's own choices (when the pod is known) or for
    /// the Service CIDRs (when the config has none).
    pub fn needs_agent(&self, pod_known: bool) -> bool {
        pod_known || self.service_cidrs.is_empty()
    }

    /// The config for one ADD, with what the agent said: the config's Service CIDRs win (the
    /// operator set them), the pod's annotation wins over `podDefaultRouteNIC`, and the binding
    /// the agent read from the VM wins over `kubevirtBinding`.
    pub fn with_agent_answer(&self, answer: CoordinatorResponse) -> Self {
        let mut config = self.clone();
        if config.service_cidrs.is_empty() {
            config.service_cidrs = answer.service_cidrs;
        }
        if let Some(nic) = answer.default_route_nic {
            config.pod_default_route_nic = Some(nic);
        }
        if let Some(binding) = answer.kubevirt_binding {
            config.kubevirt_binding = Some(KubevirtBinding::from_kubevirt(&binding));
        }
        config.allocated = answer.allocated;
        config
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use virtnet_cni::ErrorCode;
    use virtnet_cni::logging::LogLevel;

    use super::*;

    fn parse(keys: Value) -> Result<CoordinatorConfig, CniError> {
        let mut config =
            json!({"cniVersion": "0.3.1", "name": "macvlan", "type": "virtnet-coordinator"});
        if let (Some(config), Value::Object(keys)) = (config.as_object_mut(), keys) {
            config.extend(keys);
        }
        CoordinatorConfig::from_network(&NetworkConfig::parse(config.to_string().as_bytes())?)
    }

    #[test]
    fn readme_config_gets_the_defaults() -> Result<(), CniError> {
        assert_eq!(
            parse(json!({}))?,
            CoordinatorConfig {
                network: Some("macvlan".to_owned()),
                mode: Mode::Auto,
                service_cidrs: Vec::new(),
                pod_default_route_nic: None,
                detect_ip_conflict: false,
                detect_gateway: false,
                veth_host_mtu: None,
                kubevirt_binding: None,
                allocated: None,
                agent_socket: TrustedPath::default_agent_socket(),
                agent_timeout: Duration::from_millis(DEFAULT_AGENT_TIMEOUT_MS),
                logging: LogSettings::default(),
            }
        );
        Ok(())
    }

    #[test]
    fn agent_answer_fills_in_what_the_config_leaves_open() -> Result<(), Box<dyn std::error::Error>>
    {
        let answer = CoordinatorResponse {
            service_cidrs: vec!["10.96.0.0/16".parse()?],
            default_route_nic: Some("net1".into()),
            kubevirt_binding: Some("masquerade".into()),
            migration_target: false,
            allocated: Some(vec!["10.6.153.101".parse()?]),
        };
        let bare = parse(json!({}))?;
        assert!(bare.needs_agent(false) && bare.needs_agent(true));
        let merged = bare.with_agent_answer(answer.clone());
        assert_eq!(merged.service_cidrs, answer.service_cidrs);
        assert_eq!(merged.pod_default_route_nic.as_deref(), Some("net1"));
        assert_eq!(merged.kubevirt_binding, Some(KubevirtBinding::Other));
        assert_eq!(merged.allocated, answer.allocated);

        let set = parse(json!({
            "serviceCIDRs": ["10.100.0.0/16"],
            "podDefaultRouteNIC": "eth0",
            "kubevirtBinding": "passt",
        }))?;
        assert!(!set.needs_agent(false), "nothing to ask for an unknown pod");
        let merged = set.with_agent_answer(CoordinatorResponse {
            kubevirt_binding: Some("bridge".into()),
            ..answer
        });
        assert_eq!(merged.service_cidrs, ["10.100.0.0/16".parse::<IpNet>()?]);
        assert_eq!(merged.pod_default_route_nic.as_deref(), Some("net1"));
        assert_eq!(merged.kubevirt_binding, Some(KubevirtBinding::Bridge));
        let unchanged = set.with_agent_answer(CoordinatorResponse::default());
        assert_eq!(unchanged, set);
        Ok(())
    }

    #[test]
    fn reads_every_key() -> Result<(), Box<dyn std::error::Error>> {
        let config = parse(json!({
            "mode": "underlay",
            "serviceCIDRs": ["10.96.0.0/12", "fd00:96::/108"],
            "hostRuleTable": 256,
            "podDefaultRouteNIC": "net1",
            "detectIPConflict": true,
            "detectGateway": true,
            "vethHostMTU": 9000,
            "kubevirtBinding": "passt",
            "coordinator_unix_socket_path": "/var/run/virtnet/virtnet.sock",
            "log_level": "trace",
            "log_output_file_path": "/var/log/virtnet/virtnet-coordinator.log",
        }))?;
        assert_eq!(config.mode, Mode::Underlay);
        assert_eq!(
            config.service_cidrs,
            ["10.96.0.0/12".parse::<IpNet>()?, "fd00:96::/108".parse()?]
        );
        assert_eq!(config.kubevirt_binding, Some(KubevirtBinding::Passt));
        assert_eq!(config.pod_default_route_nic.as_deref(), Some("net1"));
        assert!(config.detect_ip_conflict && config.detect_gateway);
        assert_eq!(config.veth_host_mtu, Some(9000));
        assert_eq!(
            config.agent_socket.as_path(),
            std::path::Path::new("/var/run/virtnet/virtnet.sock")
        );
        assert_eq!(config.logging.level, LogLevel::Trace);
        Ok(())
    }

    #[test]
    fn host_rule_table_bounds() -> Result<(), CniError> {
        for table in [1_u32, 252, 256, 500, 1 << 31] {
            parse(json!({"hostRuleTable": table}))?;
        }
        for table in [
            json!(0),
            json!(253),
            json!(254),
            json!(255),
            json!((1_u64 << 31) + 1),
            json!(-1),
            json!("500"),
        ] {
            let error =
                parse(json!({"hostRuleTable": table})).expect_err("reserved or out of range");
            assert_eq!(error.code, ErrorCode::INVALID_NETWORK_CONFIG);
            assert!(
                error
                    .msg
                    .starts_with("hostRuleTable must be a routing table number"),
                "{}",
                error.msg
            );
        }
        Ok(())
    }

    #[test]
    fn rejects_bad_values_naming_the_key() {
        for (keys, needle) in [
            (
                json!({"mode": "overlay"}),
                "mode must be one of \"auto\", \"underlay\", \"disabled\"; got \"overlay\"",
            ),
            (
                json!({"serviceCIDRs": ["10.96.0.1/12"]}),
                "serviceCIDRs[0] must be a CIDR with no host bits",
            ),
            (
                json!({"serviceCIDRs": "10.96.0.0/12"}),
                "serviceCIDRs must be a list",
            ),
            (
                json!({"podDefaultRouteNIC": "eth0:1"}),
                "podDefaultRouteNIC must be an interface name",
            ),
            (
                json!({"detectIPConflict": "true"}),
                "detectIPConflict must be true or false; got \"true\"",
            ),
            (
                json!({"vethHostMTU": 100}),
                "vethHostMTU must be a whole number in 576..=65535",
            ),
            (
                json!({"agent_socket": "agent.sock"}),
                "agent_socket must be an absolute path",
            ),
            (
                json!({"agent_timeout_ms": 0}),
                "agent_timeout_ms must be a whole number of milliseconds",
            ),
            (
                json!({"hostRuleTabel": 500}),
                "unknown field \"hostRuleTabel\"",
            ),
        ] {
            let error = parse(keys).expect_err("bad value");
            assert_eq!(error.code, ErrorCode::INVALID_NETWORK_CONFIG);
            assert!(error.msg.contains(needle), "{}", error.msg);
        }
    }
}
