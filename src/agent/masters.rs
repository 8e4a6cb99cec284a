//! Each agent checks that its node has the interface every `Network` hangs pods off (`master`,
//! or its VLAN interface) and puts a Warning Event `MasterMissing` on a Network whose interface
//! it lacks: otherwise the first sign is a pod stuck in ContainerCreating with the main plugin's
//! "Link not found" in the kubelet's log.

use std::collections::BTreeSet;

use futures::StreamExt;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use tracing::warn;

use crate::crd::Network;
use crate::observability::Health;

/// What a Network needs of this node that it lacks: its master interface's name.
pub fn missing_master(network: &Network, present: impl Fn(&str) -> bool) -> Option<String> {
    let interface = network.spec.master_interface();
    (!present(&interface)).then_some(interface)
}

/// Whether this network namespace (the node's: the agent runs on the host network) has an
/// interface `name`.
fn interface_exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// Watches the Networks and reports, once per Network generation, a master interface this
/// node lacks. Runs until the watch ends; failures only delay a report.
pub async fn watch(client: Client, node: String, health: Health) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "virtnet-agent".to_owned(),
            instance: Some(node.clone()),
        },
    );
    let mut reported: BTreeSet<(String, i64)> = BTreeSet::new();
    let mut events = std::pin::pin!(watcher(
        Api::<Network>::all(client),
        watcher::Config::default()
    ));
    while let Some(event) = events.next().await {
        health.watch_event("Networks", event.is_ok());
        let network = match event {
            Ok(watcher::Event::Apply(network) | watcher::Event::InitApply(network)) => network,
            Ok(_) => continue,
            Err(error) => {
                warn!(%error, watch = "Networks", "watch failed; retrying with backoff");
                continue;
            }
        };
        let Some(interface) = missing_master(&network, interface_exists) else {
            continue;
        };
        let key = (
            network.uid().unwrap_or_default(),
            network.metadata.generation.unwrap_or_default(),
        );
        if !reported.insert(key) {
            continue;
        }
        let note = format!(
            "node {node} has no interface {interface}: pods on this network cannot start there; \
             create {interface} on the node, or keep the network's pods off it (its Subnets' \
             nodeSelector)"
        );
        warn!(network = %network.name_any(), %interface, "{note}");
        let event = Event {
            type_: EventType::Warning,
            reason: "MasterMissing".to_owned(),
            note: Some(note),
            action: "CheckNode".to_owned(),
            secondary: None,
        };
        if let Err(error) = recorder.publish(&event, &network.object_ref(&())).await {
            warn!(%error, "could not publish an Event on the Network");
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_network_whose_master_or_vlan_interface_is_absent_is_reported() {
        let network = |spec: serde_json::Value| -> Network {
            serde_json::from_value(json!({
                "apiVersion": "virtnet.io/v1alpha1", "kind": "Network",
                "metadata": {"name": "lan", "namespace": "default"},
                "spec": spec,
            }))
            .expect("test Network deserializes")
        };
        let node_has = |name: &str| ["lo", "ens192", "ens192.100"].contains(&name);
        let plain = network(json!({"master": "ens192", "subnets": {"ipv4": "s"}}));
        assert_eq!(missing_master(&plain, node_has), None);
        let tagged = network(json!({"master": "ens192", "vlanId": 100, "subnets": {"ipv4": "s"}}));
        assert_eq!(missing_master(&tagged, node_has), None);
        let other_vlan =
            network(json!({"master": "ens192", "vlanId": 7, "subnets": {"ipv4": "s"}}));
        assert_eq!(
            missing_master(&other_vlan, node_has).as_deref(),
            Some("ens192.7")
        );
        let absent = network(json!({"master": "ens224", "subnets": {"ipv4": "s"}}));
        assert_eq!(missing_master(&absent, node_has).as_deref(), Some("ens224"));
    }
}
