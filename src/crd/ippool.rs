//! `IPPool`: one shard of a [`Subnet`](super::Subnet), created and sized by the controller.
//!
//! The controller creates each pool with an ownerReference to its Subnet and the label
//! [`LABEL_SUBNET`](super::LABEL_SUBNET)` = <subnet name>`, and is the only writer of the spec.
//!
//! Agents allocate by adding one entry to `status.allocations`, a map keyed by address: the claim
//! is a small JSON merge patch of `status.allocations.<ip>` carrying the resourceVersion the agent
//! read, so a concurrent claim of the same pool fails with 409 Conflict and is retried, and no
//! writer rewrites (or races on) a blob of every record.
//!
//! The cost is that the whole object is stored and re-encoded on every claim, and must fit etcd's
//! request limit (1.5 MiB by default). An allocation takes about 260 bytes of status (records
//! name their sandbox, a 64-digit container ID, and their CNI network) plus about 120 bytes of
//! `managedFields` (the apiserver records every map key a patch set): measured against
//! kube-apiserver 1.34 at 229 bytes per allocation before the container ID and network were
//! kept, and modelled by the tests below. So a pool holds at most about 4 000 allocations, and
//! claims slow down as it fills (0.5 s per GET+PATCH at 3 000 allocations on a busy 2-core
//! machine): the controller should choose `replicas` so that each shard stays at a few thousand
//! addresses.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::rules;

/// Desired state of an IPPool shard (cluster scoped; `kubectl get ipp`), written by the
/// controller. Each pool is owned by its Subnet and labelled `ipam.virtnet.io/subnet=<subnet>`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "virtnet.io",
    version = "v1alpha1",
    kind = "IPPool",
    root = "IpPool",
    status = "IpPoolStatus",
    shortname = "ipp",
    category = "virtnet",
    derive = "PartialEq",
    doc = "A shard of a Subnet's addresses, and the record of which of them are allocated.",
    printcolumn(name = "GATEWAY", type_ = "string", json_path = ".spec.gateway", description = "Gateway"),
    // SUBNET prints the network (10.6.0.0/16), as VirtNet always has; the owning Subnet's name is
    // in spec.subnet and in the label.
    printcolumn(name = "SUBNET", type_ = "string", json_path = ".spec.cidr", description = "Network CIDR"),
    printcolumn(
        name = "ALLOCATED-IP-COUNT",
        type_ = "integer",
        json_path = ".status.allocatedIPCount",
        description = "Addresses allocated"
    ),
    printcolumn(
        name = "UNALLOCATED-IP-COUNT",
        type_ = "integer",
        json_path = ".status.unallocatedIPCount",
        description = "Addresses still free"
    ),
    printcolumn(
        name = "TOTAL-IP-COUNT",
        type_ = "integer",
        json_path = ".status.totalIPCount",
        description = "Addresses in this pool"
    )
)]
#[cfg_attr(test, kube(cel))]
#[allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) of #[kube] repeats `type_ = ...`; they are separate columns"
)]
#[x_kube(validation = rules::address_inside("gateway", "cidr"))]
#[x_kube(validation = rules::entries_inside("ips", "cidr"))]
#[serde(rename_all = "camelCase")]
pub struct IpPoolSpec {
    /// Name of the owning Subnet object.
    #[x_kube(validation = rules::immutable("a pool belongs to one Subnet for life"))]
    pub subnet: String,

    /// The Subnet's network, e.g. `10.6.0.0/16`; gives allocated addresses their prefix length.
    #[x_kube(validation = rules::cidr())]
    #[x_kube(validation = rules::network_address())]
    #[x_kube(validation = rules::immutable("a pool belongs to one network for life"))]
    #[schemars(length(max = rules::MAX_CIDR_LEN))]
    pub cidr: String,

    /// The Subnet's effective gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::ip())]
    #[schemars(length(max = rules::MAX_IP_LEN))]
    pub gateway: Option<String>,

    /// The addresses this shard owns, as single IPs or inclusive `start-end` ranges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "rules::ip_range_list")]
    pub ips: Vec<String>,

    /// Set by the controller to retire the shard (scale-down, or addresses removed from the
    /// Subnet): agents stop allocating from it, and the controller deletes it once
    /// `status.allocations` is empty.
    #[serde(default)]
    pub draining: bool,
}

/// Observed state of an IPPool: its allocations and counters. Agents claim an address by adding
/// its entry to `allocations`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IpPoolStatus {
    /// Allocated addresses (the key, e.g. `10.6.153.101`) and who holds each.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub allocations: BTreeMap<String, IpAllocation>,

    /// Number of entries in `allocations`.
    #[serde(rename = "allocatedIPCount", default)]
    pub allocated_ip_count: i64,

    /// Addresses in `spec.ips` not yet allocated.
    #[serde(rename = "unallocatedIPCount", default)]
    pub unallocated_ip_count: i64,

    /// Addresses in `spec.ips`.
    #[serde(rename = "totalIPCount", default)]
    pub total_ip_count: i64,
}

/// Who holds one allocated address.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct IpAllocation {
    /// The Endpoint recording the allocation, as `namespace/name`.
    pub endpoint: String,
    /// The interface inside the workload, e.g. `eth0`.
    pub interface: String,
    /// UID of the pod using the address; checked before a release so that a newer pod reusing a
    /// sticky address is not cut off.
    #[serde(rename = "podUID")]
    pub pod_uid: String,
    /// Node of that pod.
    pub node: String,
    /// Container (sandbox) ID of the CNI call that claimed or last re-asserted the address: a
    /// DEL or GC of an older sandbox of the same pod releases only its own records, never the
    /// address a newer sandbox holds. Absent in records written before it was kept.
    #[serde(
        rename = "containerID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub container_id: Option<String>,
    /// The CNI network (conflist or NAD config `name`) the address was claimed through. Absent
    /// in records written before networks were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use serde_json::{Value, json};

    use super::*;
    use crate::crd::test_support::{assert_rejected, failures, object};

    /// A shard of the README's Subnet, as the controller writes it.
    fn shard_spec() -> Value {
        json!({
            "subnet": "subnet",
            "cidr": "10.6.0.0/16",
            "gateway": "10.6.0.1",
            "ips": ["10.6.153.100-10.6.153.151"],
        })
    }

    fn pool(changes: Value) -> IpPool {
        object("IPPool", &shard_spec(), &changes)
    }

    #[test]
    fn controller_written_shard_is_valid() {
        let shard = pool(json!({}));
        assert!(!shard.spec.draining);
        assert_eq!(failures(shard.validate_cel()), Vec::<String>::new());
    }

    #[test]
    fn each_mistake_is_rejected_with_a_message_saying_what_to_fix() {
        let cases = [
            (
                json!({"cidr": "10.6.0.1/16"}),
                "spec.cidr: must be a network address",
            ),
            (
                json!({"gateway": "10.7.0.1"}),
                "spec.gateway: gateway must be an address inside cidr",
            ),
            (
                json!({"ips": ["10.6.153.151-10.6.153.100"]}),
                "spec.ips[0]: must not start after it ends",
            ),
            (
                json!({"ips": ["10.7.0.0-10.7.0.9"]}),
                "spec.ips: every address and range end in ips must lie inside cidr",
            ),
        ];
        for (changes, expected) in cases {
            assert_rejected(pool(changes.clone()).validate_cel(), expected, &changes);
        }
    }

    #[test]
    fn a_pool_keeps_its_subnet_and_network() {
        let old = pool(json!({}));
        assert_eq!(
            failures(pool(json!({"draining": true})).validate_cel_update(&old)),
            Vec::<String>::new()
        );
        let moved = json!({"subnet": "other"});
        assert_rejected(
            pool(moved.clone()).validate_cel_update(&old),
            "spec.subnet: is immutable",
            &moved,
        );
    }

    /// A realistic record: a Deployment pod name, a UUID, a short node name.
    fn allocation(pod_number: u32) -> IpAllocation {
        IpAllocation {
            endpoint: format!("default/sample-78b779bcc7-{pod_number:05x}"),
            interface: "eth0".into(),
            pod_uid: format!("1b4e28ba-2fa1-11d2-883f-{pod_number:012x}"),
            node: "worker-01".into(),
            // A containerd sandbox ID: 64 hex digits.
            container_id: Some(format!("{pod_number:064x}")),
            network: Some("macvlan-underlay".into()),
        }
    }

    /// Records the storage trade-off of keeping allocations in a status map: a whole /16 does not
    /// fit one object, while a claim stays a few hundred bytes on the wire.
    #[test]
    fn allocation_map_and_claim_patch_sizes() {
        const ETCD_DEFAULT_MAX_REQUEST_BYTES: usize = 1536 * 1024;
        const ALLOCATIONS_IN_A_FULL_SLASH_16: u32 = 65_534;
        let network_base = u32::from(Ipv4Addr::new(10, 6, 0, 0));
        let addresses: Vec<String> = (1..=ALLOCATIONS_IN_A_FULL_SLASH_16)
            .map(|host| Ipv4Addr::from(network_base + host).to_string())
            .collect();
        let full_status = IpPoolStatus {
            allocations: (1..)
                .zip(&addresses)
                .map(|(host, address)| (address.clone(), allocation(host)))
                .collect(),
            allocated_ip_count: i64::from(ALLOCATIONS_IN_A_FULL_SLASH_16),
            unallocated_ip_count: 0,
            total_ip_count: i64::from(ALLOCATIONS_IN_A_FULL_SLASH_16),
        };
        // What the apiserver adds to metadata.managedFields for keys set by merge patches.
        let managed_fields = json!({"f:status": {"f:allocations": addresses
            .iter()
            .map(|address| (format!("f:{address}"), json!({".": {}, "f:containerID": {}, "f:endpoint": {}, "f:interface": {}, "f:network": {}, "f:node": {}, "f:podUID": {}})))
            .collect::<serde_json::Map<_, _>>()}});
        let status_bytes = serde_json::to_vec(&full_status)
            .expect("status serializes")
            .len();
        let managed_fields_bytes = serde_json::to_vec(&managed_fields)
            .expect("fields serialize")
            .len();
        let per_allocation = |bytes: usize| bytes / addresses.len();
        let stored_per_allocation = per_allocation(status_bytes + managed_fields_bytes);
        let allocations_within_etcd_limit = ETCD_DEFAULT_MAX_REQUEST_BYTES / stored_per_allocation;

        let claim = json!({
            "metadata": {"resourceVersion": "123456789"},
            "status": {
                "allocations": {"10.6.153.101": allocation(1)},
                "allocatedIPCount": 3,
                "unallocatedIPCount": 49,
            },
        });
        let claim_bytes = serde_json::to_vec(&claim).expect("patch serializes").len();

        println!(
            "IPPool status with {} allocations: {status_bytes} bytes ({} per allocation), plus \
             {managed_fields_bytes} bytes of managedFields: {stored_per_allocation} bytes stored per \
             allocation, so {allocations_within_etcd_limit} fit in etcd's default 1.5 MiB request limit; \
             one claim merge patch: {claim_bytes} bytes",
            addresses.len(),
            per_allocation(status_bytes),
        );
        assert!(
            (240..=280).contains(&per_allocation(status_bytes))
                && (340..=410).contains(&stored_per_allocation),
            "the IPPool docs quote about 260 bytes of status and 380 bytes stored per allocation"
        );
        assert!(
            status_bytes > ETCD_DEFAULT_MAX_REQUEST_BYTES,
            "a full /16 in one pool would fit etcd after all"
        );
        assert!(
            claim_bytes < 512,
            "a claim patch should stay small, measured {claim_bytes} bytes"
        );
    }
}
