//! `Endpoint`: the addresses one workload instance holds (`kubectl get vep`).
//!
//! The agent creates an Endpoint when it allocates, named after the pod (or, for a sticky
//! KubeVirt VM, after the VirtualMachine, so the address survives virt-launcher pod changes),
//! carrying the finalizer [`FINALIZER_ENDPOINT`](super::FINALIZER_ENDPOINT) and an ownerReference
//! that sets how long the addresses live. The controller returns the addresses to their pools and
//! removes the finalizer when the Endpoint is deleted.
//!
//! Why the record is in spec rather than status: the allocation is the authoritative record of
//! which address a workload owns, not an observation the controller could rebuild from elsewhere,
//! and it must exist from the moment the object does. In spec it is written by the one create that
//! also sets the finalizer; in status it would need a second write, leaving a window in which a
//! crash strands an Endpoint without addresses (and tools that back up and restore objects drop
//! status). The agent is the writer of the spec: it refreshes `node`, `podUID` and `containerID`
//! when a sticky workload's new pod takes over the addresses. The controller reports its checks in
//! `status.conditions`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
// The KubeSchema derive brings `Rule` and `ListMerge` into scope for `#[x_kube]` expressions.
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::rules;

/// The addresses one workload instance holds, and who holds them (namespaced; `kubectl get
/// vep`). Written by the VirtNet agent when it allocates.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "virtnet.io",
    version = "v1alpha1",
    kind = "Endpoint",
    namespaced,
    status = "EndpointStatus",
    // Not `endpoint`: `kubectl get endpoint` must keep meaning core/v1 Endpoints.
    shortname = "vep",
    category = "virtnet",
    derive = "PartialEq",
    doc = "The addresses one workload instance holds, and who holds them.",
    printcolumn(
        name = "INTERFACE",
        type_ = "string",
        json_path = ".spec.interfaces[0].interface",
        description = "First interface"
    ),
    printcolumn(
        name = "IPV4POOL",
        type_ = "string",
        json_path = ".spec.interfaces[0].ipv4Pool",
        description = "IPPool of the first interface's IPv4 address"
    ),
    printcolumn(
        name = "IPV4",
        type_ = "string",
        json_path = ".spec.interfaces[0].ipv4",
        description = "First interface's IPv4 address"
    ),
    printcolumn(name = "OWNER-KIND", type_ = "string", json_path = ".spec.ownerKind", description = "Owner kind"),
    printcolumn(name = "OWNER-NAME", type_ = "string", json_path = ".spec.ownerName", description = "Owner name"),
    printcolumn(name = "NODE", type_ = "string", json_path = ".spec.node", description = "Node of the current pod")
)]
#[cfg_attr(test, kube(cel))]
#[allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) of #[kube] repeats `type_ = ...`; they are separate columns"
)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSpec {
    /// One entry per interface of the workload that VirtNet addressed.
    #[x_kube(validation = Rule::new("self.size() > 0").message("must list at least one interface"))]
    #[schemars(length(max = 16))]
    pub interfaces: Vec<EndpointInterface>,

    /// Kind of the workload that owns the addresses, e.g. `StatefulSet`, `VirtualMachine`,
    /// `ReplicaSet`, `Pod`.
    pub owner_kind: String,

    /// Name of that workload.
    pub owner_name: String,

    /// Node of the pod currently using the addresses.
    pub node: String,

    /// UID of the pod currently using the addresses.
    #[serde(rename = "podUID")]
    pub pod_uid: String,

    /// Container (sandbox) ID given by the runtime to the CNI call that allocated.
    #[serde(rename = "containerID")]
    pub container_id: String,

    /// The addresses outlive the pod: a StatefulSet replica or KubeVirt VM keeps them across
    /// restarts until the owner is deleted. Otherwise they are released with the pod.
    #[serde(default)]
    pub sticky: bool,
}

/// The addresses of one interface.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.ipv4) || has(self.ipv6)").message("an interface needs an ipv4 or ipv6 address"))]
#[serde(rename_all = "camelCase")]
pub struct EndpointInterface {
    /// Interface name inside the workload, e.g. `eth0`.
    pub interface: String,

    /// IPPool the IPv4 address came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_pool: Option<String>,

    /// IPv4 address with prefix length, e.g. `10.6.153.101/16`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::interface_address(4))]
    #[schemars(length(max = rules::MAX_CIDR_LEN))]
    pub ipv4: Option<String>,

    /// IPv4 gateway given to the interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::address_of_family(4))]
    #[schemars(length(max = rules::MAX_IP_LEN))]
    pub ipv4_gateway: Option<String>,

    /// IPPool the IPv6 address came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_pool: Option<String>,

    /// IPv6 address with prefix length, e.g. `fd00:6::101/64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::interface_address(6))]
    #[schemars(length(max = rules::MAX_CIDR_LEN))]
    pub ipv6: Option<String>,

    /// IPv6 gateway given to the interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::address_of_family(6))]
    #[schemars(length(max = rules::MAX_IP_LEN))]
    pub ipv6_gateway: Option<String>,

    /// VLAN ID of the interface's Subnet, when tagged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::vlan_id())]
    pub vlan: Option<u16>,

    /// The CNI network the interface was attached through: the conflist's or the NAD config's
    /// `name`. GC and CHECK of one network only look at its own interfaces. Absent in records
    /// written before networks were recorded (GC then leaves the interface to the controller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub network: Option<String>,

    /// The NetworkAttachmentDefinition (`namespace/name`) of the pod's network-selection element
    /// for this interface, when the pod's Multus annotations name one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 317))]
    pub network_attachment: Option<String>,
}

/// Observed state of an Endpoint, written by the controller.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct EndpointStatus {
    /// Standard conditions, keyed by `type`: e.g. whether every address is recorded in its
    /// IPPool for this Endpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::crd::test_support::{assert_rejected, failures, object};

    /// `sample-ss-0` from the README's `kubectl get endpoints.virtnet.io`.
    fn statefulset_replica_spec() -> Value {
        json!({
            "interfaces": [{
                "interface": "eth0",
                "ipv4Pool": "subnet-fs95z",
                "ipv4": "10.6.153.104/16",
                "ipv4Gateway": "10.6.0.1",
            }],
            "ownerKind": "StatefulSet",
            "ownerName": "sample-ss",
            "node": "centos7",
            "podUID": "5b8a8e3c-3c1e-4f53-9d2e-0c6a1f0f7d10",
            "containerID": "2f1c9a7e5b3d",
            "sticky": true,
        })
    }

    fn endpoint(changes: Value) -> Endpoint {
        object("Endpoint", &statefulset_replica_spec(), &changes)
    }

    #[test]
    fn agent_written_endpoints_are_valid() {
        let dual_stack_two_nics = json!({"interfaces": [
            {"interface": "eth0", "ipv4Pool": "a", "ipv4": "10.6.153.104/16", "ipv6Pool": "b", "ipv6": "fd00:6::104/64", "ipv6Gateway": "fd00:6::1"},
            {"interface": "net1", "ipv4Pool": "c", "ipv4": "172.16.0.9/24", "vlan": 100},
        ]});
        for changes in [json!({}), dual_stack_two_nics] {
            assert_eq!(
                failures(endpoint(changes.clone()).validate_cel()),
                Vec::<String>::new(),
                "{changes}"
            );
        }
    }

    #[test]
    fn each_mistake_is_rejected_with_a_message_saying_what_to_fix() {
        let nic = |fields: Value| {
            let mut interface = json!({"interface": "eth0"});
            for (field, value) in fields.as_object().expect("fields are an object") {
                interface[field] = value.clone();
            }
            json!({"interfaces": [interface]})
        };
        let cases = [
            (
                json!({"interfaces": []}),
                "spec.interfaces: must list at least one interface",
            ),
            (
                nic(json!({})),
                "spec.interfaces[0]: an interface needs an ipv4 or ipv6 address",
            ),
            (
                nic(json!({"ipv4": "10.6.153.104"})),
                "spec.interfaces[0].ipv4: must be an IPv4 address with its subnet prefix",
            ),
            (
                nic(json!({"ipv4": "fd00:6::104/64"})),
                "spec.interfaces[0].ipv4: must be an IPv4 address with its subnet prefix",
            ),
            (
                nic(json!({"ipv6": "10.6.153.104/16"})),
                "spec.interfaces[0].ipv6: must be an IPv6 address with its subnet prefix",
            ),
            (
                nic(json!({"ipv4": "10.6.153.104/16", "ipv4Gateway": "fd00:6::1"})),
                "spec.interfaces[0].ipv4Gateway: must be an IPv4 address",
            ),
            (
                nic(json!({"ipv4": "10.6.153.104/16", "vlan": 4095})),
                "spec.interfaces[0].vlan: must be between 0 and 4094",
            ),
        ];
        for (changes, expected) in cases {
            assert_rejected(endpoint(changes.clone()).validate_cel(), expected, &changes);
        }
    }
}
