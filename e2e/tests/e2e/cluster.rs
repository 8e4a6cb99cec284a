//! The cluster itself, as a person using the sandbox sees it.
use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::Node;
use virtnet_e2e::{cluster::is_ready, topology::node_ip};

use crate::support::Suite;

/// kubectl in the root namespace reaches the apiserver through the loopback forwarder with the
/// admin kubeconfig, and every node registered by its kubelet stand-in is Ready with its
/// underlay address as InternalIP.
pub fn kubectl_in_the_root_namespace_sees_every_node_ready(suite: &Suite) -> anyhow::Result<()> {
    let cluster = &suite.cluster;
    let json = cluster.kubectl(&["get", "nodes", "--output=json"])?;
    // kubectl prints a generic `kind: List`, not a NodeList.
    let mut list: serde_json::Value =
        serde_json::from_str(&json).context("parsing kubectl's output")?;
    let nodes: Vec<Node> =
        serde_json::from_value(list["items"].take()).context("parsing kubectl's node list")?;
    for (index, name) in cluster.node_names().iter().enumerate() {
        let node = nodes
            .iter()
            .find(|node| node.metadata.name.as_ref() == Some(name))
            .with_context(|| format!("node {name} is not registered"))?;
        ensure!(is_ready(node), "node {name} is not Ready");
        let internal_ips: Vec<&str> = node
            .status
            .iter()
            .flat_map(|status| status.addresses.iter().flatten())
            .filter(|address| address.type_ == "InternalIP")
            .map(|address| address.address.as_str())
            .collect();
        let expected = node_ip(index + 1).to_string();
        ensure!(
            internal_ips == [expected.as_str()],
            "node {name} reports InternalIP {internal_ips:?}, expected {expected}"
        );
    }
    Ok(())
}
