//! Each agent checks that its node has the interface every `Network`, and every NAD that uses
//! VirtNet's plugins, hangs pods off (`master`, or a Network's VLAN interface), and puts a
//! Warning Event `MasterMissing` on the object whose interface it lacks: otherwise the first
//! sign is a pod stuck in ContainerCreating with the main plugin's "Link not found" in the
//! kubelet's log.

use std::collections::BTreeSet;
use std::fmt::Debug;

use futures::StreamExt;
use kube::api::ListParams;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::crd::{Network, NetworkAttachmentDefinition};
use crate::observability::Health;
use crate::store::is_not_found;

/// The interface `needed` names that this node lacks, if any.
pub fn missing(needed: Option<String>, present: impl Fn(&str) -> bool) -> Option<String> {
    needed.filter(|interface| !present(interface))
}

/// Whether this network namespace (the node's: the agent runs on the host network) has an
/// interface `name`.
fn interface_exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// Checks the Networks, and the NADs when their CRD is installed (Multus mode), until the
/// watches end.
pub async fn watch(client: Client, node: String, health: Health) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "virtnet-agent".to_owned(),
            instance: Some(node.clone()),
        },
    );
    let nads = Api::<NetworkAttachmentDefinition>::all(client.clone());
    let with_nads = match nads.list(&ListParams::default().limit(1)).await {
        Err(kube::Error::Api(status)) if status.code == 404 => {
            info!(
                "no NetworkAttachmentDefinition CRD: only Networks' master interfaces are checked"
            );
            false
        }
        _ => true,
    };
    let networks = watch_kind(
        Api::<Network>::all(client),
        "Networks",
        |network: &Network| Some(network.spec.master_interface()),
        &node,
        &health,
        &recorder,
    );
    if with_nads {
        let nads = watch_kind(
            nads,
            "NetworkAttachmentDefinitions",
            // A NAD a Network renders is checked as that Network: one Event per problem.
            |nad: &NetworkAttachmentDefinition| {
                (!nad.rendered_by_network())
                    .then(|| nad.virtnet_master())
                    .flatten()
            },
            &node,
            &health,
            &recorder,
        );
        tokio::join!(networks, nads);
    } else {
        networks.await;
    }
}

/// Reports, once per object generation, a master interface (`master_of`) this node lacks.
async fn watch_kind<K>(
    api: Api<K>,
    what: &'static str,
    master_of: impl Fn(&K) -> Option<String>,
    node: &str,
    health: &Health,
    recorder: &Recorder,
) where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + 'static,
{
    let mut reported: BTreeSet<(String, i64)> = BTreeSet::new();
    let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
    while let Some(event) = events.next().await {
        health.watch_event(what, event.is_ok());
        let object = match event {
            Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object)) => object,
            Ok(_) => continue,
            Err(error) => {
                if !matches!(&error, watcher::Error::InitialListFailed(source) if is_not_found(source))
                {
                    warn!(%error, watch = what, "watch failed; retrying with backoff");
                }
                continue;
            }
        };
        let Some(interface) = missing(master_of(&object), interface_exists) else {
            continue;
        };
        let key = (
            object.uid().unwrap_or_default(),
            object.meta().generation.unwrap_or_default(),
        );
        if !reported.insert(key) {
            continue;
        }
        let note = format!(
            "node {node} has no interface {interface}: pods on this network cannot start there; \
             create {interface} on the node, or keep the network's pods off it (its Subnets' \
             nodeSelector)"
        );
        warn!(object = %object.name_any(), %interface, "{note}");
        let event = Event {
            type_: EventType::Warning,
            reason: "MasterMissing".to_owned(),
            note: Some(note),
            action: "CheckNode".to_owned(),
            secondary: None,
        };
        if let Err(error) = recorder.publish(&event, &object.object_ref(&())).await {
            warn!(%error, "could not publish an Event on {what}");
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
        let needed = |spec| Some(network(spec).spec.master_interface());
        let plain = needed(json!({"master": "ens192", "subnets": {"ipv4": "s"}}));
        assert_eq!(missing(plain, node_has), None);
        let tagged = needed(json!({"master": "ens192", "vlanId": 100, "subnets": {"ipv4": "s"}}));
        assert_eq!(missing(tagged, node_has), None);
        let other_vlan = needed(json!({"master": "ens192", "vlanId": 7, "subnets": {"ipv4": "s"}}));
        assert_eq!(missing(other_vlan, node_has).as_deref(), Some("ens192.7"));
        let absent = needed(json!({"master": "ens224", "subnets": {"ipv4": "s"}}));
        assert_eq!(missing(absent, node_has).as_deref(), Some("ens224"));
        assert_eq!(missing(None, node_has), None, "a NAD of other plugins");
    }
}
