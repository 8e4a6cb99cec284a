//! The Kubernetes Network Plumbing Working Group's `NetworkAttachmentDefinition`
//! (`k8s.cni.cncf.io/v1`), which Multus reads: VirtNet renders them from Networks and reads them
//! to validate. Its CRD comes with Multus, so `virtnet crdgen` does not generate it.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A CNI configuration (a single plugin config or a conflist) as JSON text.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "k8s.cni.cncf.io",
    version = "v1",
    kind = "NetworkAttachmentDefinition",
    // The CRD Multus installs spells its plural with dashes.
    plural = "network-attachment-definitions",
    namespaced,
    derive = "PartialEq",
    derive = "Default"
)]
pub struct NetworkAttachmentDefinitionSpec {
    /// The CNI configuration as JSON text. Absent means a config file on the node of the same
    /// name as the NAD (Multus's convention), which VirtNet never renders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
}
