//! The agent under load and at its limits, on a VirtNet cluster of its own (one cluster for all
//! three scenarios, in sequence):
//! - 200 pods created at once across 3 nodes get 200 distinct addresses, and on the wire every
//!   address answers ARP from exactly one MAC (arping from the router), 200 distinct MACs;
//! - a Subnet too small for its Deployment: the pod left over fails with a CNI error that says
//!   the pool is exhausted and what to do, gets an `IPPoolExhausted` Event, and nothing leaks
//!   (the pools record exactly the running pods, and nothing once they are deleted);
//! - dual-stack: a namespace whose default is a Subnet pair gives pods IPv4 + IPv6; they ping the
//!   gateway fd00:6::1 and each other over IPv6.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    process::Command,
    time::Duration,
};

use anyhow::{Context, ensure};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams},
};
use serde_json::json;
use virtnet_e2e::{
    cluster::{Cluster, VirtnetOptions},
    topology::{GATEWAY_V4, GATEWAY_V6},
};

use crate::support::{own_virtnet_cluster, run_on_own_cluster};
use crate::{
    ipam::{kubectl_json, pool_records},
    support::{
        Suite, is_pod_ready, node_name, ping_from_pod, pod_interface_addresses, pod_ip, pod_name,
    },
};

const BURST: usize = 200;
/// The burst may take a while on a busy 2-core machine: 200 sandboxes, each a netns, a macvlan
/// and three plugin runs.
const BURST_TIMEOUT: Duration = Duration::from_secs(240);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);
/// arping processes run at once against the router's NIC.
const ARPING_PARALLEL: usize = 25;

pub fn agent_allocates_exactly_under_burst_exhaustion_and_dual_stack(
    suite: &Suite,
) -> anyhow::Result<()> {
    let virtnet = VirtnetOptions::from_workspace();
    // The nodes' conflist names the example Subnet as its default, so it must exist (each
    // scenario's namespace picks another one).
    let example_subnet = virtnet.repo.join("examples/statefulset/subnet.yaml");
    run_on_own_cluster(suite, own_virtnet_cluster('a', virtnet), async |cluster| {
        cluster.kubectl(&["apply", "-f", &example_subnet.to_string_lossy()])?;
        burst(cluster).await?;
        exhaustion(cluster).await?;
        dual_stack(cluster).await
    })
}

/// Applies `manifest` (YAML or JSON) with kubectl.
pub(crate) fn apply(cluster: &Cluster, manifest: &serde_json::Value) -> anyhow::Result<()> {
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), manifest.to_string())?;
    cluster.kubectl(&["apply", "-f", &file.path().to_string_lossy()])?;
    Ok(())
}

pub(crate) fn subnet(
    name: &str,
    cidr: &str,
    gateway: &str,
    ips: &str,
    replicas: u16,
) -> serde_json::Value {
    json!({
        "apiVersion": "virtnet.io/v1alpha1", "kind": "Subnet",
        "metadata": {"name": name},
        "spec": {"subnet": cidr, "gateway": gateway, "ips": [ips], "replicas": replicas},
    })
}

/// A namespace whose pods default to `default_subnet` (the value of
/// `ipam.virtnet.io/default-subnet`).
pub(crate) fn namespace(name: &str, default_subnet: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "annotations": {"ipam.virtnet.io/default-subnet": default_subnet}},
    })
}

pub(crate) async fn create_deployment(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
    replicas: usize,
) -> anyhow::Result<()> {
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                // The kubelet stand-in runs no containers; the image is never pulled.
                "spec": {"containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]},
            },
        },
    }))?;
    Api::<Deployment>::namespaced(cluster.client(), namespace)
        .create(&PostParams::default(), &deployment)
        .await
        .with_context(|| format!("creating Deployment {namespace}/{name}"))?;
    Ok(())
}

pub(crate) async fn delete_deployment(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
) -> anyhow::Result<()> {
    Api::<Deployment>::namespaced(cluster.client(), namespace)
        .delete(name, &DeleteParams::foreground())
        .await
        .with_context(|| format!("deleting Deployment {namespace}/{name}"))?;
    Ok(())
}

async fn list_pods(cluster: &Cluster, namespace: &str) -> Result<Vec<Pod>, String> {
    Api::<Pod>::namespaced(cluster.client(), namespace)
        .list(&ListParams::default())
        .await
        .map(|list| list.items)
        .map_err(|error| error.to_string())
}

/// Waits until `namespace` has `count` pods of which `ready` are Ready.
pub(crate) async fn wait_for_pods(
    cluster: &Cluster,
    namespace: &str,
    count: usize,
    ready: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Pod>> {
    let what = format!("{ready} of {count} pods Ready in {namespace}");
    cluster
        .wait_for(&what, timeout, || async {
            let pods = list_pods(cluster, namespace).await?;
            let ready_now = pods.iter().filter(|pod| is_pod_ready(pod)).count();
            if pods.len() == count && ready_now == ready {
                Ok(pods)
            } else {
                Err(format!("{} pods, {ready_now} Ready", pods.len()))
            }
        })
        .await
        .map_err(Into::into)
}

/// The records the IPPools of `subnet` hold.
pub(crate) fn records_of(cluster: &Cluster, subnet: &str) -> anyhow::Result<usize> {
    let pools = kubectl_json(cluster, &["get", "ippools.virtnet.io"])?;
    Ok(pools["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|pool| pool["spec"]["subnet"] == subnet)
        .filter_map(|pool| pool["status"]["allocations"].as_object())
        .map(serde_json::Map::len)
        .sum())
}

async fn wait_until_released(cluster: &Cluster) -> anyhow::Result<()> {
    cluster
        .wait_for("every address back in its pool", SETTLE_TIMEOUT, || async {
            let records = pool_records(cluster).map_err(|error| error.to_string())?;
            if records.is_empty() {
                Ok(())
            } else {
                Err(format!("{} still allocated", records.len()))
            }
        })
        .await?;
    Ok(())
}

/// The MACs that answer ARP for `address` on the underlay, asked from the router: two requests
/// 0.2 s apart, every reply counted (a duplicate address answers each request twice).
fn arp_answerers(router: &str, address: IpAddr) -> std::io::Result<std::process::Child> {
    Command::new("ip")
        .args(["netns", "exec", router, "arping", "-i", "eth0", "-c", "2"])
        .args(["-W", "0.2", "-w", "1"])
        .arg(address.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
}

/// `aa:bb:..` of every "N bytes from <MAC> (<ip>): ..." line.
fn reply_macs(output: &str) -> BTreeSet<String> {
    output
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace().skip_while(|word| *word != "from");
            words.next()?;
            words.next().map(str::to_lowercase)
        })
        .collect()
}

/// Asks the underlay (from the router) who answers ARP for each of `addresses` (address → pod
/// name) and fails unless exactly one MAC answers each; returns how many distinct MACs answered.
pub(crate) fn ensure_each_answered_by_one_mac(
    cluster: &Cluster,
    addresses: &BTreeMap<IpAddr, &str>,
) -> anyhow::Result<usize> {
    let router = cluster.names().router_netns();
    let mut answers: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
    let targets: Vec<IpAddr> = addresses.keys().copied().collect();
    for chunk in targets.chunks(ARPING_PARALLEL) {
        let children: Vec<_> = chunk
            .iter()
            .map(|address| Ok((*address, arp_answerers(&router, *address)?)))
            .collect::<std::io::Result<_>>()
            .context("running arping in the router's namespace")?;
        for (address, child) in children {
            let output = child.wait_with_output()?;
            answers.insert(
                address,
                reply_macs(&String::from_utf8_lossy(&output.stdout)),
            );
        }
    }
    let wrong: Vec<String> = answers
        .iter()
        .filter(|(_, macs)| macs.len() != 1)
        .map(|(address, macs)| format!("{address} ({}): {macs:?}", addresses[address]))
        .collect();
    ensure!(
        wrong.is_empty(),
        "addresses not answered by exactly one MAC: {wrong:?}"
    );
    Ok(answers.values().flatten().collect::<BTreeSet<_>>().len())
}

async fn burst(cluster: &Cluster) -> anyhow::Result<()> {
    let ns = "burst";
    apply(
        cluster,
        &subnet(
            "burst",
            "10.6.0.0/16",
            "10.6.0.1",
            "10.6.160.1-10.6.160.250",
            3,
        ),
    )?;
    apply(cluster, &namespace(ns, "burst"))?;
    wait_for_pool_count(cluster, "burst", 3).await?;
    create_deployment(cluster, ns, "burst", BURST).await?;
    let pods = wait_for_pods(cluster, ns, BURST, BURST, BURST_TIMEOUT).await?;

    let addresses: BTreeMap<IpAddr, &str> = pods
        .iter()
        .map(|pod| Ok((pod_ip(pod)?, pod_name(pod))))
        .collect::<anyhow::Result<_>>()?;
    let nodes: BTreeSet<&str> = pods.iter().filter_map(node_name).collect();
    ensure!(
        addresses.len() == BURST,
        "{BURST} pods got {} distinct addresses",
        addresses.len()
    );
    ensure!(nodes.len() == 3, "the pods ran on {nodes:?}, not 3 nodes");
    let recorded = records_of(cluster, "burst")?;
    ensure!(
        recorded == BURST,
        "the pools record {recorded} addresses for {BURST} pods"
    );

    let macs = ensure_each_answered_by_one_mac(cluster, &addresses)?;
    ensure!(
        macs == BURST,
        "{BURST} addresses answered from {macs} distinct MACs"
    );

    delete_deployment(cluster, ns, "burst").await?;
    wait_until_released(cluster).await
}

pub(crate) async fn wait_for_pool_count(
    cluster: &Cluster,
    subnet: &str,
    count: usize,
) -> anyhow::Result<()> {
    cluster
        .wait_for(
            &format!("{count} IPPools of Subnet {subnet}"),
            SETTLE_TIMEOUT,
            || async {
                let pools = kubectl_json(cluster, &["get", "ippools.virtnet.io"])
                    .map_err(|error| error.to_string())?;
                let found = pools["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|pool| pool["spec"]["subnet"] == subnet)
                    .count();
                if found == count {
                    Ok(())
                } else {
                    Err(format!("{found} pools"))
                }
            },
        )
        .await?;
    Ok(())
}

/// The messages of `namespace`'s Events with `reason`.
fn event_messages(cluster: &Cluster, namespace: &str, reason: &str) -> anyhow::Result<Vec<String>> {
    let events = kubectl_json(cluster, &["get", "events", "-n", namespace])?;
    Ok(events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|event| event["reason"] == reason)
        .filter_map(|event| event["message"].as_str().map(str::to_owned))
        .collect())
}

async fn exhaustion(cluster: &Cluster) -> anyhow::Result<()> {
    let ns = "tiny";
    apply(
        cluster,
        &subnet(
            "tiny",
            "10.6.0.0/16",
            "10.6.0.1",
            "10.6.170.10-10.6.170.11",
            1,
        ),
    )?;
    apply(cluster, &namespace(ns, "tiny"))?;
    wait_for_pool_count(cluster, "tiny", 1).await?;
    create_deployment(cluster, ns, "tiny", 3).await?;
    wait_for_pods(cluster, ns, 3, 2, SETTLE_TIMEOUT).await?;
    let failure = cluster
        .wait_for(
            "the third pod's sandbox failure",
            SETTLE_TIMEOUT,
            || async {
                let messages = event_messages(cluster, ns, "FailedCreatePodSandBox")
                    .map_err(|error| error.to_string())?;
                messages
                    .into_iter()
                    .next()
                    .ok_or_else(|| "no event yet".to_owned())
            },
        )
        .await?;
    ensure!(
        failure.contains("no IPPool of subnet 10.6.0.0/16 has a free address")
            && failure.contains("add addresses to the Subnet's ips"),
        "the CNI error does not say the pool is exhausted and what to do: {failure}"
    );
    let reported = event_messages(cluster, ns, "IPPoolExhausted")?;
    ensure!(
        !reported.is_empty(),
        "the agent put no IPPoolExhausted Event on the pod"
    );
    // The failed ADDs (the runtime keeps retrying) leave nothing: the pool records the 2
    // running pods only, and they have the only Endpoints.
    let running = list_pods(cluster, ns)
        .await
        .map_err(anyhow::Error::msg)?
        .iter()
        .filter(|pod| is_pod_ready(pod))
        .count();
    let recorded = records_of(cluster, "tiny")?;
    let endpoints = kubectl_json(cluster, &["get", "endpoints.virtnet.io", "-n", ns])?;
    let endpoints = endpoints["items"].as_array().map_or(0, Vec::len);
    ensure!(
        (running, recorded, endpoints) == (2, 2, 2),
        "running pods, allocations and Endpoints differ: {running}, {recorded}, {endpoints}"
    );
    delete_deployment(cluster, ns, "tiny").await?;
    wait_until_released(cluster).await
}

async fn dual_stack(cluster: &Cluster) -> anyhow::Result<()> {
    let ns = "dual";
    apply(
        cluster,
        &subnet(
            "dual4",
            "10.6.0.0/16",
            "10.6.0.1",
            "10.6.180.10-10.6.180.50",
            1,
        ),
    )?;
    apply(
        cluster,
        &subnet(
            "dual6",
            "fd00:6::/64",
            "fd00:6::1",
            "fd00:6::180:10-fd00:6::180:50",
            1,
        ),
    )?;
    apply(
        cluster,
        &namespace(ns, r#"{"ipv4":"dual4","ipv6":"dual6"}"#),
    )?;
    wait_for_pool_count(cluster, "dual4", 1).await?;
    wait_for_pool_count(cluster, "dual6", 1).await?;
    create_deployment(cluster, ns, "dual", 2).await?;
    let pods = wait_for_pods(cluster, ns, 2, 2, SETTLE_TIMEOUT).await?;
    let mut ipv6 = Vec::new();
    for pod in &pods {
        let addresses = pod_interface_addresses(cluster, pod, "eth0")?;
        let v4 = addresses
            .iter()
            .find(|address| address.to_string().starts_with("10.6.180."));
        let v6 = addresses
            .iter()
            .find(|address| address.to_string().starts_with("fd00:6::180:"));
        let (Some(_), Some(v6)) = (v4, v6) else {
            anyhow::bail!(
                "pod {} has {addresses:?}, not one of each Subnet",
                pod_name(pod)
            );
        };
        ipv6.push(*v6);
    }
    for (pod, peer) in pods.iter().zip(ipv6.iter().rev()) {
        ping_from_pod(cluster, pod, IpAddr::V6(GATEWAY_V6))?;
        ping_from_pod(cluster, pod, *peer)?;
        ping_from_pod(cluster, pod, IpAddr::V4(GATEWAY_V4))?;
    }
    delete_deployment(cluster, ns, "dual").await?;
    wait_until_released(cluster).await
}
