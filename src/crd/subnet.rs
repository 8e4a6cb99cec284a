//! `Subnet`: an L3 network, the addresses of it VirtNet may hand out, and what a workload gets
//! with an address (gateway, routes, DNS, VLAN). The controller splits it into
//! [`IpPool`](super::IpPool) shards.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
// The KubeSchema derive brings `Rule` and `ListMerge` into scope for `#[x_kube]` expressions.
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::rules;

/// Desired state of a Subnet (cluster scoped; `kubectl get sb`).
///
/// The addresses handed out are `ips` minus `excludeIPs`, the gateway, and the network and
/// (IPv4) broadcast addresses.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "virtnet.io",
    version = "v1alpha1",
    kind = "Subnet",
    status = "SubnetStatus",
    shortname = "sb",
    category = "virtnet",
    derive = "PartialEq",
    doc = "An underlay L3 network and the addresses of it that VirtNet hands out.",
    // GATEWAY shows the effective gateway from status: spec.gateway may be omitted (it then
    // defaults), and `kubectl get` should show what workloads are actually given.
    printcolumn(name = "GATEWAY", type_ = "string", json_path = ".status.gateway", description = "Effective gateway"),
    printcolumn(name = "SUBNET", type_ = "string", json_path = ".spec.subnet", description = "Network CIDR"),
    printcolumn(name = "REPLICAS", type_ = "integer", json_path = ".spec.replicas", description = "IPPool shards"),
    printcolumn(
        name = "TOTAL-IP-COUNT",
        type_ = "integer",
        json_path = ".status.totalIPCount",
        description = "Addresses available for allocation"
    )
)]
#[cfg_attr(test, kube(cel))]
#[allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) of #[kube] repeats `type_ = ...`; they are separate columns"
)]
#[x_kube(validation = rules::address_inside("gateway", "subnet"))]
#[x_kube(validation = rules::entries_inside("ips", "subnet"))]
#[x_kube(validation = rules::entries_inside("excludeIPs", "subnet"))]
#[serde(rename_all = "camelCase")]
pub struct SubnetSpec {
    /// The network in CIDR notation, e.g. `10.6.0.0/16`. Immutable.
    #[x_kube(validation = rules::cidr())]
    #[x_kube(validation = rules::network_address())]
    #[x_kube(validation = rules::immutable("create a new Subnet for a different network"))]
    #[schemars(length(max = rules::MAX_CIDR_LEN))]
    pub subnet: String,

    /// Default gateway given to workloads. Defaults to the first usable address of `subnet`
    /// (`10.6.0.1` for `10.6.0.0/16`); the effective value is reported in `status.gateway`.
    /// Never allocated to a workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::ip())]
    #[schemars(length(max = rules::MAX_IP_LEN))]
    pub gateway: Option<String>,

    /// Allocatable addresses: single IPs (`10.6.153.1`) or inclusive ranges
    /// (`10.6.153.100-10.6.153.255`). Empty means every usable address of `subnet`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "rules::ip_range_list")]
    pub ips: Vec<String>,

    /// Addresses never allocated, in the same format as `ips`.
    #[serde(rename = "excludeIPs", default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "rules::ip_range_list")]
    pub exclude_ips: Vec<String>,

    /// Extra routes given to workloads, besides the default route via the gateway.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub routes: Vec<Route>,

    /// DNS settings given to workloads through the CNI result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,

    /// 802.1Q VLAN ID of the network; 0 or absent means untagged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::vlan_id())]
    pub vlan: Option<u16>,

    /// How many IPPool shards the addresses are split into. More shards mean fewer conflicting
    /// writes when many nodes allocate at once. A large Subnet gets more (at most 2048
    /// addresses per pool, up to 64 pools from size alone), so no pool nears etcd's size limit.
    #[serde(default = "default_replicas")]
    #[x_kube(validation = rules::within(1, 1024, "the number of IPPool shards"))]
    pub replicas: u16,

    /// Namespaces whose workloads use this Subnet when they do not name one. Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// Nodes this network reaches. Absent: all nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,

    /// Use this Subnet for workloads that neither name a Subnet nor match a `namespaceSelector`.
    /// Several defaults of one family must differ in their node or namespace selectors (the
    /// controller's admission webhook rejects a second default for the same pods).
    #[serde(default)]
    pub default: bool,
}

fn default_replicas() -> u16 {
    1
}

/// A route given to workloads on this Subnet.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("!isCIDR(self.dst) || !isIP(self.gw) || cidr(self.dst).ip().family() == ip(self.gw).family()")
        .message("dst and gw must be of the same IP family")
)]
pub struct Route {
    /// Destination CIDR, e.g. `192.168.0.0/16`.
    #[x_kube(validation = rules::cidr())]
    #[schemars(length(max = rules::MAX_CIDR_LEN))]
    pub dst: String,
    /// Next hop address.
    #[x_kube(validation = rules::ip())]
    #[schemars(length(max = rules::MAX_IP_LEN))]
    pub gw: String,
}

/// DNS settings, as in the CNI result's `dns`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Dns {
    /// Name server addresses (the resolver uses at most 3).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(server, isIP(server))").message("every name server must be an IP address"))]
    #[schemars(length(max = 3), inner(length(max = rules::MAX_IP_LEN)))]
    pub nameservers: Vec<String>,
    /// Local domain name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// Resolver options, e.g. `ndots:5`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// Observed state of a Subnet, written by the controller.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SubnetStatus {
    /// The gateway workloads are given: `spec.gateway`, or its default when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,

    /// Addresses available for allocation: `ips` minus `excludeIPs`, the gateway, and the network
    /// and (IPv4) broadcast addresses.
    #[serde(rename = "totalIPCount", default)]
    pub total_ip_count: i64,

    /// Addresses currently allocated, summed over the Subnet's IPPools.
    #[serde(rename = "allocatedIPCount", default)]
    pub allocated_ip_count: i64,

    /// Standard conditions (e.g. `Ready`), keyed by `type`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::crd::test_support::{assert_rejected, failures, object};

    /// The Subnet from VirtNet's README.
    fn readme_spec() -> Value {
        json!({
            "replicas": 3,
            "gateway": "10.6.0.1",
            "ips": ["10.6.153.100-10.6.153.255"],
            "subnet": "10.6.0.0/16",
        })
    }

    fn subnet(changes: Value) -> Subnet {
        object("Subnet", &readme_spec(), &changes)
    }

    #[test]
    fn readme_subnet_is_valid() {
        assert_eq!(
            failures(subnet(json!({})).validate_cel()),
            Vec::<String>::new()
        );
    }

    #[test]
    fn omitted_fields_take_their_defaults() {
        let minimal: Subnet = object("Subnet", &json!({"subnet": "10.6.0.0/16"}), &json!({}));
        assert_eq!(
            (
                minimal.spec.replicas,
                minimal.spec.default,
                minimal.spec.gateway.as_deref()
            ),
            (1, false, None)
        );
        assert_eq!(failures(minimal.validate_cel()), Vec::<String>::new());
    }

    #[test]
    fn fully_specified_subnets_are_valid() {
        let ipv4 = json!({
            "ips": ["10.6.152.255-10.6.153.0", "10.6.153.7-10.6.153.7", "10.6.160.1"],
            "excludeIPs": ["10.6.153.0"],
            "routes": [{"dst": "192.168.0.0/16", "gw": "10.6.0.254"}],
            "dns": {"nameservers": ["10.6.0.2"], "domain": "example.com", "search": ["example.com"], "options": ["ndots:2"]},
            "vlan": 4094,
            "replicas": 1024,
            "namespaceSelector": {"matchLabels": {"network": "underlay"}},
            "nodeSelector": {"matchExpressions": [{"key": "rack", "operator": "In", "values": ["a", "b"]}]},
            "default": true,
        });
        let ipv6 = json!({
            "subnet": "fd00:6::/64",
            "gateway": "fd00:6::1",
            "ips": ["fd00:6::100-fd00:6::1ff"],
            "routes": [{"dst": "fd00:7::/64", "gw": "fd00:6::fe"}],
        });
        for changes in [ipv4, ipv6] {
            assert_eq!(
                failures(subnet(changes.clone()).validate_cel()),
                Vec::<String>::new(),
                "{changes}"
            );
        }
    }

    #[test]
    fn each_mistake_is_rejected_with_a_message_saying_what_to_fix() {
        let cases = [
            (json!({"subnet": "10.6.0.0"}), "spec.subnet: must be a CIDR"),
            (
                json!({"subnet": "10.6.153.0/16"}),
                "spec.subnet: must be a network address",
            ),
            (
                json!({"gateway": "10.6.0.256"}),
                "spec.gateway: must be an IP address",
            ),
            (
                json!({"gateway": "10.7.0.1"}),
                "spec.gateway: gateway must be an address inside subnet",
            ),
            (
                json!({"ips": ["10.6.153.100 - 10.6.153.255"]}),
                "spec.ips[0]: must be one IP address",
            ),
            (
                json!({"ips": ["10.6.153.1", "10.6.153.1-10.6.153.2-10.6.153.3"]}),
                "spec.ips[1]: must be one IP address",
            ),
            (
                json!({"ips": ["10.6.153.255-10.6.153.100"]}),
                "spec.ips[0]: must not start after it ends",
            ),
            (
                json!({"ips": ["10.6.154.0-10.6.153.255"]}),
                "spec.ips[0]: must not start after it ends",
            ),
            (
                json!({"ips": ["10.6.153.100-10.7.0.1"]}),
                "spec.ips: every address and range end in ips must lie inside subnet",
            ),
            (
                json!({"ips": ["fd00:6::1"]}),
                "spec.ips: every address and range end in ips must lie inside subnet",
            ),
            (
                json!({"excludeIPs": ["10.7.0.1"]}),
                "spec.excludeIPs: every address and range end in excludeIPs",
            ),
            (
                json!({"excludeIPs": ["10.6.0.9-10.6.0.1"]}),
                "spec.excludeIPs[0]: must not start after it ends",
            ),
            (
                json!({"replicas": 0}),
                "spec.replicas: must be between 1 and 1024",
            ),
            (
                json!({"replicas": 1025}),
                "spec.replicas: must be between 1 and 1024",
            ),
            (
                json!({"vlan": 4095}),
                "spec.vlan: must be between 0 and 4094",
            ),
            (
                json!({"routes": [{"dst": "192.168.0.0", "gw": "10.6.0.1"}]}),
                "spec.routes[0].dst: must be a CIDR",
            ),
            (
                json!({"routes": [{"dst": "192.168.0.0/16", "gw": "router"}]}),
                "spec.routes[0].gw: must be an IP address",
            ),
            (
                json!({"routes": [{"dst": "fd00::/64", "gw": "10.6.0.1"}]}),
                "spec.routes[0]: dst and gw must be of the same IP family",
            ),
            (
                json!({"dns": {"nameservers": ["dns.example.com"]}}),
                "spec.dns.nameservers: every name server must be an IP",
            ),
        ];
        for (changes, expected) in cases {
            assert_rejected(subnet(changes.clone()).validate_cel(), expected, &changes);
        }
    }

    #[test]
    fn the_network_cannot_change_but_the_rest_can() {
        let old = subnet(json!({}));
        assert_eq!(
            failures(subnet(json!({"replicas": 5})).validate_cel_update(&old)),
            Vec::<String>::new()
        );
        let moved = json!({"subnet": "10.7.0.0/16", "gateway": "10.7.0.1", "ips": ["10.7.0.10"]});
        assert_rejected(
            subnet(moved.clone()).validate_cel_update(&old),
            "spec.subnet: is immutable",
            &moved,
        );
    }
}
