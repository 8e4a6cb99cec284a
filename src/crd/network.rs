//! `Network`: one secondary network as users describe it (`kubectl get vnet`), from which the
//! controller renders the NetworkAttachmentDefinition of the same namespace and name that Multus
//! reads. Named after what users pick in a pod's `k8s.v1.cni.cncf.io/networks` annotation: a
//! network, not a CNI config; `virtnet.io` keeps it apart from other groups' `Network` kinds
//! (`kubectl get networks.virtnet.io`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
// The KubeSchema derive brings `Rule` and `ListMerge` into scope for `#[x_kube]` expressions.
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::rules;

/// Longest Linux interface name (IFNAMSIZ - 1).
const MAX_INTERFACE_NAME_LEN: u32 = 15;
/// Longest Kubernetes object name (a DNS-1123 subdomain).
const MAX_OBJECT_NAME_LEN: u32 = 253;

/// Desired state of a Network (namespaced; `kubectl get vnet`): the main plugin on the node's
/// underlay interface, the Subnets its addresses come from, and virtnet-coordinator's options.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "virtnet.io",
    version = "v1alpha1",
    kind = "Network",
    namespaced,
    status = "NetworkStatus",
    shortname = "vnet",
    category = "virtnet",
    derive = "PartialEq",
    doc = "A secondary network on a node interface, rendered into the NetworkAttachmentDefinition \
           of the same name that Multus reads.",
    printcolumn(
        name = "PLUGIN",
        type_ = "string",
        json_path = ".spec.plugin",
        description = "Main CNI plugin"
    ),
    printcolumn(
        name = "MASTER",
        type_ = "string",
        json_path = ".spec.master",
        description = "Node interface"
    ),
    printcolumn(
        name = "NAD",
        type_ = "string",
        json_path = ".status.networkAttachmentDefinition",
        description = "The NetworkAttachmentDefinition rendered from this Network"
    ),
    printcolumn(
        name = "READY",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the NetworkAttachmentDefinition matches the spec"
    ),
    printcolumn(
        name = "REASON",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Why (not) ready"
    )
)]
#[cfg_attr(test, kube(cel))]
#[allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) of #[kube] repeats `type_ = ...`; they are separate columns"
)]
#[x_kube(
    validation = Rule::new(
        "!has(self.mode) || (self.plugin == 'ipvlan' ? self.mode in ['l2', 'l3', 'l3s'] \
         : self.mode in ['bridge', 'private', 'vepa', 'passthru'])"
    )
    .message("mode must be bridge, private, vepa or passthru for macvlan, and l2, l3 or l3s for ipvlan")
    .field_path(".mode")
)]
#[x_kube(
    validation = Rule::new("has(self.subnets.ipv4) || has(self.subnets.ipv6)")
        .message("name at least one Subnet: subnets.ipv4, subnets.ipv6 or both")
        .field_path(".subnets")
)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSpec {
    /// CNI spec version of the rendered config. Default `1.0.0`.
    #[serde(default)]
    pub cni_version: CniVersion,

    /// The main plugin that moves an interface into the pod. Default `macvlan`.
    #[serde(default)]
    pub plugin: MainPlugin,

    /// The node interface the pod interfaces hang off, e.g. `ens192` (the same name on every
    /// node; the agent of a node lacking it reports so).
    #[schemars(length(min = 1, max = MAX_INTERFACE_NAME_LEN))]
    #[x_kube(validation = Rule::new("!self.contains('/') && !self.contains(':') && !self.contains(' ')")
        .message("must be an interface name such as ens192, without '/', ':' or spaces"))]
    pub master: String,

    /// macvlan: `bridge` (default), `private`, `vepa`, `passthru`; ipvlan: `l2` (default), `l3`,
    /// `l3s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub mode: Option<String>,

    /// MTU of the pod interface; the master's when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::within(576, 65535, "an MTU (576 is IPv4's minimum)"))]
    pub mtu: Option<u32>,

    /// 802.1Q VLAN: the plugin's master becomes the node's VLAN interface `<master>.<vlanId>`,
    /// which must exist on every node (VirtNet does not create it). 0 or absent means untagged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::vlan_id())]
    pub vlan_id: Option<u16>,

    /// The Subnets the pod interface's addresses come from, at most one per family.
    pub subnets: NetworkSubnets,

    /// virtnet-coordinator's options; it always runs last in the chain.
    #[serde(default)]
    pub coordinator: CoordinatorOptions,

    /// A pod interface whose network-selection element names an IPAMClaim
    /// (`ipam-claim-reference`) keeps the claim's address across pods (KubeVirt VMs).
    #[serde(rename = "allowPersistentIPs", default)]
    pub allow_persistent_ips: bool,
}

/// CNI spec versions VirtNet's plugins speak.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CniVersion {
    #[serde(rename = "0.3.1")]
    V0_3_1,
    #[serde(rename = "0.4.0")]
    V0_4_0,
    #[default]
    #[serde(rename = "1.0.0")]
    V1_0_0,
    #[serde(rename = "1.1.0")]
    V1_1_0,
}

impl CniVersion {
    /// The version as the config's `cniVersion` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_3_1 => "0.3.1",
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }
}

/// The main plugin of a Network.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MainPlugin {
    #[default]
    Macvlan,
    Ipvlan,
}

impl MainPlugin {
    /// The plugin's CNI `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Macvlan => "macvlan",
            Self::Ipvlan => "ipvlan",
        }
    }

    /// The mode when the Network names none.
    pub fn default_mode(self) -> &'static str {
        match self {
            Self::Macvlan => "bridge",
            Self::Ipvlan => "l2",
        }
    }
}

/// Subnet names per family.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct NetworkSubnets {
    /// An IPv4 Subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_OBJECT_NAME_LEN))]
    pub ipv4: Option<String>,
    /// An IPv6 Subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_OBJECT_NAME_LEN))]
    pub ipv6: Option<String>,
}

impl NetworkSpec {
    /// The node interface the main plugin hangs pod interfaces off: `master`, or its VLAN
    /// interface `<master>.<vlanId>`.
    pub fn master_interface(&self) -> String {
        match self.vlan_id {
            Some(vlan) if vlan != 0 => format!("{}.{vlan}", self.master),
            _ => self.master.clone(),
        }
    }
}

impl NetworkSubnets {
    /// The names, IPv4 first.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.ipv4.iter().chain(&self.ipv6).map(String::as_str)
    }
}

/// virtnet-coordinator's options (its config keys of the same names).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CoordinatorOptions {
    /// `auto` (default), `underlay` or `disabled` (passes the result through).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self in ['auto', 'underlay', 'disabled']")
        .message("must be auto, underlay or disabled"))]
    #[schemars(length(max = 8))]
    pub mode: Option<String>,
    /// The pod interface that carries the default route; the pod's first interface when unset.
    #[serde(
        rename = "podDefaultRouteNIC",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(min = 1, max = MAX_INTERFACE_NAME_LEN))]
    pub pod_default_route_nic: Option<String>,
    /// Refuse an address another host on the underlay already answers for.
    #[serde(rename = "detectIPConflict", default)]
    pub detect_ip_conflict: bool,
    /// Refuse when the gateway does not answer.
    #[serde(default)]
    pub detect_gateway: bool,
    /// MTU of the host side of the pod's veth; the pod interface's when unset.
    #[serde(
        rename = "vethHostMTU",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[x_kube(validation = rules::within(576, 65535, "an MTU (576 is IPv4's minimum)"))]
    pub veth_host_mtu: Option<u32>,
    /// KubeVirt binding of VMs on this network: `passt`, or `bridge` (which macvlan cannot carry,
    /// so the coordinator refuses it with a message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self in ['passt', 'bridge']").message("must be passt or bridge"))]
    #[schemars(length(max = 8))]
    pub kubevirt_binding: Option<String>,
}

/// Observed state of a Network, written by the controller.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkStatus {
    /// Name of the NetworkAttachmentDefinition (same namespace) rendered from this Network, once
    /// written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_attachment_definition: Option<String>,

    /// Standard conditions, keyed by `type`: `Ready` says whether the NetworkAttachmentDefinition
    /// matches the spec, and if not why (e.g. `NetworkAttachmentDefinitionNotOwned`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::crd::test_support::{assert_rejected, failures, object};

    fn base_spec() -> Value {
        json!({"master": "ens192", "subnets": {"ipv4": "subnet-test"}})
    }

    fn network(changes: Value) -> Network {
        object("Network", &base_spec(), &changes)
    }

    #[test]
    fn minimal_network_is_valid_and_defaults() {
        let network = network(json!({}));
        assert_eq!(failures(network.validate_cel()), Vec::<String>::new());
        assert_eq!(network.spec.plugin, MainPlugin::Macvlan);
        assert_eq!(network.spec.cni_version, CniVersion::V1_0_0);
        assert!(!network.spec.allow_persistent_ips);
    }

    #[test]
    fn valid_variants_pass() {
        for changes in [
            json!({"plugin": "ipvlan", "mode": "l3"}),
            json!({"mode": "passthru", "mtu": 9000, "vlanId": 100}),
            json!({"subnets": {"ipv6": "v6"}, "cniVersion": "0.3.1"}),
            json!({"coordinator": {"mode": "disabled", "kubevirtBinding": "passt"}}),
        ] {
            assert_eq!(
                failures(network(changes.clone()).validate_cel()),
                Vec::<String>::new(),
                "{changes}"
            );
        }
    }

    #[test]
    fn bad_values_are_rejected_with_what_to_write() {
        for (changes, expected) in [
            (json!({"mode": "l2"}), "spec.mode: mode must be bridge"),
            (
                json!({"plugin": "ipvlan", "mode": "bridge"}),
                "spec.mode: mode must be bridge",
            ),
            (json!({"subnets": {}}), "spec.subnets: name at least one"),
            (json!({"mtu": 100}), "spec.mtu: must be between 576"),
            (json!({"vlanId": 5000}), "spec.vlanId: must be between 0"),
            (
                json!({"master": "a/b"}),
                "spec.master: must be an interface",
            ),
            (
                json!({"coordinator": {"kubevirtBinding": "masquerade"}}),
                "spec.coordinator.kubevirtBinding: must be passt",
            ),
        ] {
            assert_rejected(network(changes.clone()).validate_cel(), expected, &changes);
        }
    }

    #[test]
    fn unknown_enum_values_do_not_deserialize() {
        for spec in [
            json!({"master": "x", "subnets": {"ipv4": "s"}, "plugin": "bridge"}),
            json!({"master": "x", "subnets": {"ipv4": "s"}, "cniVersion": "0.2.0"}),
        ] {
            assert!(
                serde_json::from_value::<NetworkSpec>(spec.clone()).is_err(),
                "{spec}"
            );
        }
    }
}
