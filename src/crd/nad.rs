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
}
