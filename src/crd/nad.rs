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

impl NetworkAttachmentDefinition {
    /// The node interface this NAD's main plugin hangs pods off (`master` of its first plugin),
    /// when the NAD uses VirtNet's plugins; `None` for other NADs and unreadable configs.
    pub fn virtnet_master(&self) -> Option<String> {
        let config: serde_json::Value = serde_json::from_str(self.spec.config.as_deref()?).ok()?;
        let plugins: Vec<&serde_json::Value> = match config["plugins"].as_array() {
            Some(plugins) => plugins.iter().collect(),
            None => vec![&config],
        };
        let uses_virtnet = plugins.iter().any(|plugin| {
            plugin["type"] == "virtnet-coordinator" || plugin["ipam"]["type"] == "virtnet-ipam"
        });
        let master = plugins.first()?["master"].as_str()?;
        uses_virtnet.then(|| master.to_owned())
    }

    /// Whether a VirtNet `Network` renders this NAD (it is the NAD's controller owner).
    pub fn rendered_by_network(&self) -> bool {
        use kube::{Resource, ResourceExt};
        self.owner_references().iter().any(|owner| {
            owner.controller == Some(true)
                && owner.kind == super::Network::kind(&())
                && owner.api_version == super::Network::api_version(&())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_nads_using_virtnets_plugins_name_a_master_to_check() {
        let nad = |config: &str| {
            NetworkAttachmentDefinition::new(
                "n",
                NetworkAttachmentDefinitionSpec {
                    config: Some(config.to_owned()),
                },
            )
        };
        let virtnet = r#"{"plugins": [{"type": "macvlan", "master": "ens224",
            "ipam": {"type": "virtnet-ipam"}}, {"type": "virtnet-coordinator"}]}"#;
        assert_eq!(nad(virtnet).virtnet_master().as_deref(), Some("ens224"));
        let single = r#"{"type": "ipvlan", "master": "bond0", "ipam": {"type": "virtnet-ipam"}}"#;
        assert_eq!(nad(single).virtnet_master().as_deref(), Some("bond0"));
        let other = r#"{"type": "macvlan", "master": "ens224", "ipam": {"type": "host-local"}}"#;
        assert_eq!(nad(other).virtnet_master(), None);
        assert_eq!(nad("not json").virtnet_master(), None);
    }

    #[test]
    fn a_nad_whose_controller_is_a_network_is_rendered_by_it() {
        let owned_by = |api_version: &str, kind: &str| {
            let mut nad = NetworkAttachmentDefinition::new("n", Default::default());
            nad.metadata.owner_references = Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    api_version: api_version.to_owned(),
                    kind: kind.to_owned(),
                    name: "n".to_owned(),
                    uid: "u".to_owned(),
                    controller: Some(true),
                    ..Default::default()
                },
            ]);
            nad
        };
        assert!(owned_by("virtnet.io/v1alpha1", "Network").rendered_by_network());
        assert!(!owned_by("example.com/v1", "Network").rendered_by_network());
        assert!(!owned_by("virtnet.io/v1alpha1", "Subnet").rendered_by_network());
        let hand_written = NetworkAttachmentDefinition::new("n", Default::default());
        assert!(!hand_written.rendered_by_network());
    }
}
