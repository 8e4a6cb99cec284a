//! Pods created through the real apiserver, scheduled by the real scheduler and wired by the real
//! macvlan plugin, talk across nodes and to the underlay gateway.
use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use anyhow::{Context, ensure};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams},
};
use virtnet_e2e::{
    cluster::{Cluster, POD_RANGE_FIRST, POD_RANGE_LAST},
    topology::GATEWAY_V4,
};

use crate::support::{
    Suite, create_namespace, delete_namespace, node_name, ping_from_pod, pod_interface_addresses,
    pod_ip, pod_name, wait_for_ready_pods,
};

const REPLICAS: usize = 3;
const APP_LABEL: &str = "app=pinger";

/// A Deployment whose pods the scheduler must spread evenly over the nodes (pod counts per node
/// differ by at most one): with 3 replicas on 3 nodes that is one each.
fn spread_deployment() -> anyhow::Result<Deployment> {
    Ok(serde_json::from_value(serde_json::json!({
        "metadata": { "name": "pinger" },
        "spec": {
            "replicas": REPLICAS,
            "selector": { "matchLabels": { "app": "pinger" } },
            "template": {
                "metadata": { "labels": { "app": "pinger" } },
                "spec": {
                    "topologySpreadConstraints": [{
                        "maxSkew": 1,
                        "topologyKey": "kubernetes.io/hostname",
                        "whenUnsatisfiable": "DoNotSchedule",
                        "labelSelector": { "matchLabels": { "app": "pinger" } },
                    }],
                    // The kubelet stand-in runs no containers; the image is never pulled.
                    "containers": [{ "name": "main", "image": "registry.k8s.io/pause:3.10" }],
                    // The default grace period, not 0: with 0 the apiserver removes a pod at
                    // once, and the kubelet's CNI DEL would race whoever checks afterwards.
                },
            },
        },
    }))?)
}

pub async fn create_spread_deployment(
    cluster: &Cluster,
    namespace: &str,
) -> anyhow::Result<Vec<Pod>> {
    create_namespace(cluster, namespace).await?;
    let deployments: Api<Deployment> = Api::namespaced(cluster.client(), namespace);
    deployments
        .create(&PostParams::default(), &spread_deployment()?)
        .await
        .context("creating the Deployment")?;
    wait_for_ready_pods(cluster, namespace, APP_LABEL, REPLICAS).await
}

pub fn deployment_pods_ping_across_nodes_and_gateway(suite: &Suite) -> anyhow::Result<()> {
    let cluster = &suite.cluster;
    let namespace = "ping";
    let pods = suite.block_on(create_spread_deployment(cluster, namespace))?;

    let nodes: BTreeSet<&str> = pods.iter().filter_map(node_name).collect();
    ensure!(
        pods.iter().all(|pod| node_name(pod).is_some()),
        "every Ready pod must have been bound by the scheduler"
    );
    ensure!(
        nodes.len() >= 2,
        "the scheduler must spread the pods over at least two nodes, got {nodes:?}"
    );

    for pod in &pods {
        let ip = pod_ip(pod)?;
        let IpAddr::V4(ipv4) = ip else {
            anyhow::bail!("pod {} got {ip}, expected IPv4", pod_name(pod));
        };
        ensure!(
            (POD_RANGE_FIRST..=POD_RANGE_LAST).contains(&ipv4),
            "pod {} got {ip}, outside the pod range {POD_RANGE_FIRST}-{POD_RANGE_LAST}",
            pod_name(pod)
        );
        let on_eth0 = pod_interface_addresses(cluster, pod, "eth0")?;
        ensure!(
            on_eth0.contains(&ip),
            "pod {} reports podIP {ip} but eth0 in its netns has {on_eth0:?}",
            pod_name(pod)
        );
    }

    let first = &pods[0];
    let other_node = pods
        .iter()
        .find(|pod| node_name(pod) != node_name(first))
        .context("no pod on a second node")?;
    ping_from_pod(cluster, first, pod_ip(other_node)?)?;
    ping_from_pod(cluster, other_node, pod_ip(first)?)?;
    for pod in [first, other_node] {
        ping_from_pod(cluster, pod, GATEWAY_V4.into())?;
    }

    suite.block_on(delete_namespace(cluster, namespace))
}

pub fn deleting_a_deployment_removes_its_pods_and_their_netns(suite: &Suite) -> anyhow::Result<()> {
    let cluster = &suite.cluster;
    let namespace = "gc";
    let pods = suite.block_on(create_spread_deployment(cluster, namespace))?;
    let pod_netns: Vec<String> = pods
        .iter()
        .map(|pod| cluster.pod_netns(pod))
        .collect::<Result<_, _>>()?;
    for netns in &pod_netns {
        ensure!(
            netns_exists(netns),
            "{netns} should exist while its pod runs"
        );
    }

    suite.block_on(async {
        let deployments: Api<Deployment> = Api::namespaced(cluster.client(), namespace);
        // Background propagation: the garbage collector, not the client, removes the
        // ReplicaSet and then its pods.
        deployments
            .delete("pinger", &DeleteParams::background())
            .await
            .context("deleting the Deployment")?;
        let pods_api: Api<Pod> = Api::namespaced(cluster.client(), namespace);
        let list_params = ListParams::default().labels(APP_LABEL);
        cluster
            .wait_for(
                "the garbage collector and kubelets to remove every pod",
                Duration::from_secs(60),
                || async {
                    let remaining = pods_api
                        .list(&list_params)
                        .await
                        .map_err(|error| error.to_string())?;
                    match remaining.items.len() {
                        0 => Ok(()),
                        left => Err(format!("{left} pods left")),
                    }
                },
            )
            .await?;
        anyhow::Ok(())
    })?;

    let leftover: Vec<&String> = pod_netns
        .iter()
        .filter(|netns| netns_exists(netns))
        .collect();
    ensure!(
        leftover.is_empty(),
        "pod network namespaces left after their pods were deleted: {leftover:?}"
    );
    suite.block_on(delete_namespace(cluster, namespace))
}

fn netns_exists(netns: &str) -> bool {
    virtnet_e2e::netns::named_netns_path(netns).exists()
}
