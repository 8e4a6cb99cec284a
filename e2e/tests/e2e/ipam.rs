//! VirtNet allocating for real pods: a cluster of its own running `virtnet controller`, an agent
//! per node and the default conflist (macvlan + virtnet-ipam + virtnet-coordinator) as the nodes'
//! default network. The example Subnet → a spread Deployment gets addresses from its pools, the
//! pools and Endpoints record exactly those, pods ping each other and the gateway, and deleting
//! the Deployment returns every address.
use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use anyhow::{Context, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use kube::{Api, api::DeleteParams};
use serde_json::Value;
use virtnet_e2e::{
    cluster::{Cluster, VirtnetOptions},
    topology::GATEWAY_V4,
};

use crate::support::{own_virtnet_cluster, run_on_own_cluster};
use crate::{
    pod_network::create_spread_deployment,
    support::{Suite, node_name, ping_from_pod, pod_ip, pod_name},
};

const NAMESPACE: &str = "ipam";
const RELEASE_TIMEOUT: Duration = Duration::from_secs(60);

pub fn virtnet_allocates_example_subnet_addresses_and_returns_them(
    suite: &Suite,
) -> anyhow::Result<()> {
    let virtnet = VirtnetOptions::from_workspace();
    let subnet = virtnet.repo.join("examples/statefulset/subnet.yaml");
    run_on_own_cluster(suite, own_virtnet_cluster('v', virtnet), async |cluster| {
        scenario(cluster, &subnet.to_string_lossy()).await
    })
}

pub fn kubectl_json(cluster: &Cluster, args: &[&str]) -> anyhow::Result<Value> {
    let mut args = args.to_vec();
    args.extend(["-o", "json"]);
    Ok(serde_json::from_str(&cluster.kubectl(&args)?)?)
}

/// Every (address, record) of every IPPool.
pub fn pool_records(cluster: &Cluster) -> anyhow::Result<Vec<(String, Value)>> {
    let pools = kubectl_json(cluster, &["get", "ippools.virtnet.io"])?;
    Ok(pools["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|pool| pool["status"]["allocations"].as_object())
        .flatten()
        .map(|(address, record)| (address.clone(), record.clone()))
        .collect())
}

/// Applies the example Subnet (`subnet` is its file) and waits for its 3 IPPools.
pub async fn apply_example_subnet(cluster: &Cluster, subnet: &str) -> anyhow::Result<()> {
    cluster.kubectl(&["apply", "-f", subnet])?;
    cluster
        .wait_for(
            "the example Subnet's 3 IPPools",
            RELEASE_TIMEOUT,
            || async {
                let pools = cluster
                    .kubectl(&["get", "ippools.virtnet.io", "-o", "name"])
                    .map_err(|error| error.to_string())?;
                if pools.lines().count() == 3 {
                    Ok(())
                } else {
                    Err(format!("pools: {pools:?}"))
                }
            },
        )
        .await?;
    Ok(())
}

async fn scenario(cluster: &Cluster, subnet: &str) -> anyhow::Result<()> {
    apply_example_subnet(cluster, subnet).await?;
    let pods = create_spread_deployment(cluster, NAMESPACE).await?;
    let example_range = "10.6.153.100".parse::<IpAddr>()?..="10.6.153.255".parse::<IpAddr>()?;
    let addresses: BTreeSet<IpAddr> = pods.iter().map(pod_ip).collect::<Result<_, _>>()?;
    let nodes: BTreeSet<&str> = pods.iter().filter_map(node_name).collect();
    ensure!(
        addresses.len() == pods.len() && nodes.len() == pods.len(),
        "expected distinct addresses on distinct nodes, got {addresses:?} on {nodes:?}"
    );
    ensure!(
        addresses
            .iter()
            .all(|address| example_range.contains(address)),
        "addresses {addresses:?} are not all in the example Subnet's range 10.6.153.100-255"
    );

    let records = pool_records(cluster)?;
    let endpoints = kubectl_json(cluster, &["get", "endpoints.virtnet.io", "-n", NAMESPACE])?;
    for pod in &pods {
        let address = pod_ip(pod)?.to_string();
        let holder = format!("{NAMESPACE}/{}", pod_name(pod));
        let held: Vec<&String> = records
            .iter()
            .filter(|(_, record)| record["endpoint"] == holder.as_str())
            .map(|(address, _)| address)
            .collect();
        ensure!(
            held == [&address],
            "{holder} holds {held:?} in the IPPools, not [{address}]"
        );
        let endpoint = endpoints["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|endpoint| endpoint["metadata"]["name"] == pod_name(pod))
            .with_context(|| format!("no Endpoint for {holder}"))?;
        ensure!(
            endpoint["spec"]["interfaces"][0]["ipv4"] == format!("{address}/16").as_str()
                && endpoint["spec"]["node"].as_str() == node_name(pod),
            "Endpoint of {holder} says {}",
            endpoint["spec"]
        );
    }

    for pod in &pods {
        ping_from_pod(cluster, pod, IpAddr::V4(GATEWAY_V4))?;
        for address in &addresses {
            ping_from_pod(cluster, pod, *address)?;
        }
    }

    let deployments: Api<Deployment> = Api::namespaced(cluster.client(), NAMESPACE);
    deployments
        .delete("pinger", &DeleteParams::default())
        .await
        .context("deleting the Deployment")?;
    cluster
        .wait_for(
            "every address back in its pool",
            RELEASE_TIMEOUT,
            || async {
                let records = pool_records(cluster).map_err(|error| error.to_string())?;
                if records.is_empty() {
                    Ok(())
                } else {
                    Err(format!("still allocated: {records:?}"))
                }
            },
        )
        .await?;
    Ok(())
}
