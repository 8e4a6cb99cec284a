//! The Node object: registered (or adopted) at start, then kept Ready the way a kubelet does,
//! with a Lease renewed every 10 s and a status heartbeat every 40 s.
use std::{collections::BTreeMap, convert::Infallible, net::IpAddr, time::Duration};

use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo},
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PostParams},
};
use serde_json::json;
use tracing::{info, warn};

use super::{backoff::Backoff, report::patch_params};

/// The version the stand-in reports, matching the control plane the harness builds.
pub const KUBELET_VERSION: &str = "v1.34.4";
const LEASE_NAMESPACE: &str = "kube-node-lease";
/// The kubelet's defaults: a 40 s lease renewed every quarter of it.
const LEASE_DURATION_SECONDS: i32 = 40;
const LEASE_RENEW_INTERVAL: Duration = Duration::from_secs(10);
/// Status heartbeats every 4 lease renewals (40 s), within the node monitor grace period.
const RENEWALS_PER_STATUS_HEARTBEAT: u32 = 4;
/// What the node claims to have; the scheduler needs room for the 200-pod benchmark.
const CAPACITY: [(&str, &str); 3] = [("cpu", "8"), ("memory", "16Gi"), ("pods", "250")];

/// The node this stand-in plays.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub name: String,
    pub ip: IpAddr,
}

/// A node that exists in the API, with what its heartbeats repeat.
#[derive(Debug, Clone)]
pub struct RegisteredNode {
    identity: NodeIdentity,
    uid: String,
    ready_since: Timestamp,
    system_info: NodeSystemInfo,
}

/// Creates the Node (or adopts an existing one) and reports it Ready, retrying until the
/// apiserver accepts it: a kubelet started before its control plane waits for it.
pub async fn register(client: &Client, identity: &NodeIdentity) -> RegisteredNode {
    let system_info = system_info().await;
    let mut backoff = Backoff::default();
    loop {
        match try_register(client, identity, &system_info).await {
            Ok(node) => return node,
            Err(error) => {
                let delay = backoff.next_delay();
                warn!(node = identity.name, %error, retry_in = ?delay, "cannot register the node; is the apiserver up?");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn try_register(
    client: &Client,
    identity: &NodeIdentity,
    system_info: &NodeSystemInfo,
) -> Result<RegisteredNode, kube::Error> {
    let api: Api<Node> = Api::all(client.clone());
    let wanted = node_object(identity);
    let node = match api.create(&PostParams::default(), &wanted).await {
        Ok(node) => {
            info!(node = identity.name, "node registered");
            node
        }
        Err(kube::Error::Api(status)) if status.is_already_exists() => {
            info!(node = identity.name, "adopting the existing node");
            let labels = json!({ "metadata": { "labels": wanted.metadata.labels } });
            api.patch(&identity.name, &patch_params(), &Patch::Merge(&labels))
                .await?
        }
        Err(error) => return Err(error),
    };
    let registered = RegisteredNode {
        identity: identity.clone(),
        uid: node.metadata.uid.unwrap_or_default(),
        ready_since: Timestamp::now(),
        system_info: system_info.clone(),
    };
    report_status(client, &registered).await?;
    Ok(registered)
}

/// Renews the lease and the status heartbeat forever; failures are logged and retried on the
/// next tick, as the kubelet does.
pub async fn keep_alive(client: &Client, node: &RegisteredNode) -> Infallible {
    let mut ticker = tokio::time::interval(LEASE_RENEW_INTERVAL);
    let mut renewals: u32 = 0;
    loop {
        ticker.tick().await;
        if let Err(error) = renew_lease(client, node).await {
            warn!(node = node.identity.name, %error, "cannot renew the node lease");
        }
        renewals = renewals.wrapping_add(1);
        if renewals.is_multiple_of(RENEWALS_PER_STATUS_HEARTBEAT)
            && let Err(error) = report_status(client, node).await
        {
            warn!(node = node.identity.name, %error, "cannot update the node status");
        }
    }
}

async fn renew_lease(client: &Client, node: &RegisteredNode) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let lease = lease_object(node, Timestamp::now());
    match api
        .patch(&node.identity.name, &patch_params(), &Patch::Merge(&lease))
        .await
    {
        Err(kube::Error::Api(status)) if status.is_not_found() => {
            api.create(&PostParams::default(), &lease).await.map(drop)
        }
        renewed => renewed.map(drop),
    }
}

async fn report_status(client: &Client, node: &RegisteredNode) -> Result<(), kube::Error> {
    let api: Api<Node> = Api::all(client.clone());
    let status = json!({ "status": node_status(node, Timestamp::now()) });
    api.patch_status(&node.identity.name, &patch_params(), &Patch::Merge(&status))
        .await
        .map(drop)
}

fn node_object(identity: &NodeIdentity) -> Node {
    let labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_owned(), identity.name.clone()),
        ("kubernetes.io/os".to_owned(), "linux".to_owned()),
        ("kubernetes.io/arch".to_owned(), go_arch().to_owned()),
    ]);
    Node {
        metadata: ObjectMeta {
            name: Some(identity.name.clone()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        ..Node::default()
    }
}

fn node_status(node: &RegisteredNode, now: Timestamp) -> NodeStatus {
    let condition =
        |condition_type: &str, status: &str, reason: &str, message: &str| NodeCondition {
            type_: condition_type.to_owned(),
            status: status.to_owned(),
            reason: Some(reason.to_owned()),
            message: Some(message.to_owned()),
            last_heartbeat_time: Some(Time(now)),
            last_transition_time: Some(Time(node.ready_since)),
        };
    let resources: BTreeMap<String, Quantity> = CAPACITY
        .iter()
        .map(|(name, amount)| ((*name).to_owned(), Quantity((*amount).to_owned())))
        .collect();
    NodeStatus {
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".to_owned(),
                address: node.identity.ip.to_string(),
            },
            NodeAddress {
                type_: "Hostname".to_owned(),
                address: node.identity.name.clone(),
            },
        ]),
        conditions: Some(vec![
            condition(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
            ),
            condition(
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "kubelet has no disk pressure",
            ),
            condition(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "kubelet has sufficient PID available",
            ),
            condition(
                "Ready",
                "True",
                "KubeletReady",
                "kubelet is posting ready status",
            ),
        ]),
        capacity: Some(resources.clone()),
        allocatable: Some(resources),
        node_info: Some(node.system_info.clone()),
        ..NodeStatus::default()
    }
}

fn lease_object(node: &RegisteredNode, now: Timestamp) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(node.identity.name.clone()),
            namespace: Some(LEASE_NAMESPACE.to_owned()),
            // As the kubelet does: the lease goes away with its node.
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".to_owned(),
                kind: "Node".to_owned(),
                name: node.identity.name.clone(),
                uid: node.uid.clone(),
                ..OwnerReference::default()
            }]),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.identity.name.clone()),
            lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
            renew_time: Some(MicroTime(now)),
            ..LeaseSpec::default()
        }),
    }
}

/// What the node reports about its machine; the kernel facts are real, the rest names the
/// stand-in so nobody mistakes it for a real kubelet.
async fn system_info() -> NodeSystemInfo {
    let read_trimmed = |path: &'static str| async move {
        tokio::fs::read_to_string(path)
            .await
            .map(|text| text.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned())
    };
    let boot_id = read_trimmed("/proc/sys/kernel/random/boot_id").await;
    NodeSystemInfo {
        architecture: go_arch().to_owned(),
        boot_id,
        container_runtime_version: "containerd://virtnet-e2e".to_owned(),
        kernel_version: read_trimmed("/proc/sys/kernel/osrelease").await,
        kube_proxy_version: String::new(),
        kubelet_version: KUBELET_VERSION.to_owned(),
        machine_id: String::new(),
        operating_system: "linux".to_owned(),
        os_image: "VirtNet e2e kubelet stand-in".to_owned(),
        system_uuid: String::new(),
        ..NodeSystemInfo::default()
    }
}

/// Kubernetes names architectures as Go does.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registered() -> RegisteredNode {
        RegisteredNode {
            identity: NodeIdentity {
                name: "e2e-node1".to_owned(),
                ip: "10.6.1.1".parse().expect("valid IP"),
            },
            uid: "node-uid".to_owned(),
            ready_since: Timestamp::from_second(1_000).expect("valid time"),
            system_info: NodeSystemInfo {
                kubelet_version: KUBELET_VERSION.to_owned(),
                ..NodeSystemInfo::default()
            },
        }
    }

    #[test]
    fn the_node_is_labelled_like_a_kubelet_registers_it() {
        let node = node_object(&registered().identity);
        let labels = node.metadata.labels.expect("labels");
        assert_eq!(labels["kubernetes.io/hostname"], "e2e-node1");
        assert_eq!(labels["kubernetes.io/os"], "linux");
    }

    #[test]
    fn the_status_is_ready_with_addresses_and_capacity() {
        let now = Timestamp::from_second(2_000).expect("valid time");
        let status = serde_json::to_value(node_status(&registered(), now)).expect("json");
        assert_eq!(
            status["addresses"],
            json!([{"type": "InternalIP", "address": "10.6.1.1"},
                   {"type": "Hostname", "address": "e2e-node1"}])
        );
        let conditions = status["conditions"].as_array().expect("conditions");
        let ready = conditions
            .iter()
            .find(|condition| condition["type"] == "Ready")
            .expect("Ready");
        assert_eq!(ready["status"], "True");
        assert_eq!(ready["lastHeartbeatTime"], json!(Time(now)));
        assert_eq!(
            ready["lastTransitionTime"],
            json!(Time(registered().ready_since))
        );
        let pressures = conditions
            .iter()
            .filter(|condition| condition["status"] == "False");
        assert_eq!(pressures.count(), 3);
        assert_eq!(
            status["allocatable"],
            json!({"cpu": "8", "memory": "16Gi", "pods": "250"})
        );
        assert_eq!(status["nodeInfo"]["kubeletVersion"], "v1.34.4");
    }

    #[test]
    fn the_lease_is_owned_by_the_node_and_held_for_40_seconds() {
        let lease = lease_object(&registered(), Timestamp::now());
        let owner = &lease.metadata.owner_references.expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("Node", "node-uid")
        );
        let spec = lease.spec.expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("e2e-node1"));
        assert_eq!(spec.lease_duration_seconds, Some(40));
    }
}
