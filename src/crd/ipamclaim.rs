//! The Kubernetes Network Plumbing Working Group's `IPAMClaim` (`k8s.cni.cncf.io/v1alpha1`):
//! a persistent address for one interface of a KubeVirt VM on a secondary network.
//! kubevirt/ipam-extensions creates one per VM and network (`<vm>.<network>`) for NADs whose
//! config says `"allowPersistentIPs": true`, and names it in the virt-launcher pod's
//! network-selection element (`ipam-claim-reference`). VirtNet gives the interface the claim's
//! address and writes it back to the claim's status. Its CRD comes from the claim's project (or
//! the chart's `ipamClaims.installCRD`), so `virtnet crdgen` does not generate it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The kind an Endpoint holding a claim's address names as its owner (`spec.ownerKind`).
pub const IPAM_CLAIM_KIND: &str = "IPAMClaim";

/// Which network and interface the claim is for.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "k8s.cni.cncf.io",
    version = "v1alpha1",
    kind = "IPAMClaim",
    root = "IpamClaim",
    plural = "ipamclaims",
    namespaced,
    status = "IpamClaimStatus",
    derive = "PartialEq",
    derive = "Default"
)]
pub struct IpamClaimSpec {
    /// The network's name (the NAD config's `name`).
    pub network: String,
    /// The pod interface, when the claim names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
}

/// The claim's addresses and who uses them.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IpamClaimStatus {
    /// The addresses held for the claim, with prefix length, e.g. `10.6.153.120/16`.
    #[serde(default)]
    pub ips: Vec<String>,
    /// The pod that last got the addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_pod: Option<IpamClaimOwnerPod>,
    /// `IPsAllocated` among them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A pod named by a claim's status.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct IpamClaimOwnerPod {
    pub name: String,
}
