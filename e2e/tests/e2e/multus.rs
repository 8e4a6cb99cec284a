//! VirtNet through Multus, on a cluster of its own in Multus mode: Multus (thin plugin) is every
//! node's default CNI, delegating to the default conflist, and every node has a second NIC
//! `ens224` on a second underlay (10.7.0.0/16, the router on both). With the examples of
//! `examples/multus/`, in sequence:
//! - a NAD as the default network: pods whose default network is NetworkAttachmentDefinition kube-system/macvlan-conf
//!   get addresses from the IPPool their annotation names and ping the gateway and each other;
//! - two NICs: pods with eth0 (node default) and net1 (kube-system/macvlan-ens224) get one address
//!   per NIC from that NIC's Subnet, the Endpoint lists both, and on the wire traffic to each
//!   NIC's peers leaves by that NIC while the default route stays on eth0; replies to requests
//!   that came in on net1 leave by net1 even towards a peer of eth0's network;
//! - deleting the pods returns every address and leaves no host veth behind.
//!
//! And beside another primary CNI, as most Multus users run it: on a cluster whose default
//! network stays the bootstrap one (macvlan + host-local, the reference plugins; VirtNet writes
//! no conflist), pods keep eth0 from it and get net1 from VirtNet through a NAD: only net1 is
//! VirtNet's (recorded with its network and NAD), both NICs carry traffic, and deleting the pods
//! gives VirtNet's addresses back. There too, a `Network` renders its NAD: owned by it, with
//! virtnet-coordinator last, re-rendered when the Network changes; a deleted or hand-edited NAD
//! is put back, a same-name NAD VirtNet does not own is left alone (the Network says so); pods
//! with net1 and net2 from two rendered NADs bound to two Subnets get an address from each,
//! listed by Multus, reachable from the other node, with the default route left on the
//! primary's eth0; deleting the Network deletes its NAD, and each node's agent puts a
//! MasterMissing Event on a Network (not on the NAD it renders) whose master
//! interface the node lacks.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;
use virtnet_e2e::{
    cluster::{Cluster, POD_RANGE_FIRST, POD_RANGE_LAST, VirtnetOptions},
    command,
    topology::{GATEWAY_V4, SECOND_GATEWAY_V4},
};

use crate::support::{own_virtnet_cluster, run_on_own_cluster};
use crate::{
    ipam::kubectl_json,
    support::{
        Suite, create_namespace, delete_namespace, node_name, ping_from_pod,
        pod_interface_addresses, pod_ip, pod_name, wait_for_ready_pods,
    },
};

const NAMESPACE: &str = "multus";
/// IPPools of the example Subnet (3), subnet-test (2) and subnet-ens224 (1).
const POOLS: usize = 6;
const TIMEOUT: Duration = Duration::from_secs(90);
/// Echo requests per traffic check: far above the few ARP/ND packets a link sends on its own.
const PINGS: u64 = 20;
/// An address beyond every underlay, so only a default route can carry it.
const OFF_SUBNET: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

pub fn multus_nads_give_pool_addresses_and_a_second_nic_its_own_network(
    suite: &Suite,
) -> anyhow::Result<()> {
    let virtnet = VirtnetOptions {
        multus: true,
        ..VirtnetOptions::from_workspace()
    };
    let examples = virtnet.repo.join("examples");
    run_on_own_cluster(suite, own_virtnet_cluster('m', virtnet), async |cluster| {
        scenarios(cluster, &examples).await
    })
}

pub fn virtnet_beside_another_primary_cni_serves_only_the_nads_extra_nics(
    suite: &Suite,
) -> anyhow::Result<()> {
    let virtnet = VirtnetOptions {
        multus: true,
        default_cni: false,
        ..VirtnetOptions::from_workspace()
    };
    let examples = virtnet.repo.join("examples");
    run_on_own_cluster(suite, own_virtnet_cluster('p', virtnet), async |cluster| {
        beside_another_primary(cluster, &examples).await
    })
}

/// A Deployment `name` (also its pods' `app` label) of `replicas` pods, one per node, whose
/// extra NICs are `networks` (the `k8s.v1.cni.cncf.io/networks` value).
fn extra_nics_deployment(name: &str, replicas: usize, networks: &str) -> Value {
    serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {
                    "labels": {"app": name},
                    "annotations": {"k8s.v1.cni.cncf.io/networks": networks},
                },
                "spec": {
                    "topologySpreadConstraints": [{
                        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                        "whenUnsatisfiable": "DoNotSchedule",
                        "labelSelector": {"matchLabels": {"app": name}},
                    }],
                    "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}],
                },
            },
        },
    })
}

async fn beside_another_primary(cluster: &Cluster, examples: &Path) -> anyhow::Result<()> {
    let file = |name: &str| examples.join(name).to_string_lossy().into_owned();
    for manifest in [
        "multus/subnets.yaml",
        "multus/network-attachment-definitions.yaml",
    ] {
        cluster.kubectl(&["apply", "-f", &file(manifest)])?;
    }
    create_namespace(cluster, NAMESPACE).await?;
    kubectl_manifest(
        cluster,
        "apply",
        &extra_nics_deployment("extra-nic", 2, "kube-system/macvlan-ens224@net1"),
    )?;
    let pods = wait_for_ready_pods(cluster, NAMESPACE, "app=extra-nic", 2).await?;
    let primary = POD_RANGE_FIRST..=POD_RANGE_LAST;
    let held = allocations(cluster)?;
    let mut second = Vec::new();
    for pod in &pods {
        let eth0 = pod_ip(pod)?;
        ensure!(
            matches!(eth0, IpAddr::V4(v4) if primary.contains(&v4)),
            "pod {} has eth0 {eth0}, not an address of the primary CNI's range",
            pod_name(pod)
        );
        let records = held_by(&held, pod);
        ensure!(
            records.len() == 1
                && records[0].0 == "net1"
                && records[0].1.starts_with("subnet-ens224-"),
            "the pools record {records:?} for pod {}, not only its net1 in subnet-ens224",
            pod_name(pod)
        );
        let net1 = records[0].2;
        ensure!(
            pod_interface_addresses(cluster, pod, "net1")?.contains(&net1),
            "net1 of pod {} lacks {net1}",
            pod_name(pod)
        );
        let endpoint = kubectl_json(
            cluster,
            &[
                "get",
                "endpoints.virtnet.io",
                "-n",
                NAMESPACE,
                pod_name(pod),
            ],
        )?;
        let interfaces = &endpoint["spec"]["interfaces"];
        ensure!(
            interfaces.as_array().map(Vec::len) == Some(1)
                && interfaces[0]["network"] == "macvlan-ens224"
                && interfaces[0]["networkAttachment"] == "kube-system/macvlan-ens224",
            "the Endpoint of pod {} records {interfaces}",
            pod_name(pod)
        );
        ping_from_pod(cluster, pod, GATEWAY_V4.into())?;
        ping_from_pod(cluster, pod, SECOND_GATEWAY_V4.into())?;
        second.push(net1);
    }
    ping_from_pod(cluster, &pods[0], second[1])?;
    ping_from_pod(cluster, &pods[1], second[0])?;
    ping_from_pod(cluster, &pods[0], pod_ip(&pods[1])?)?;
    cluster.kubectl(&[
        "delete",
        "deployment",
        "extra-nic",
        "-n",
        NAMESPACE,
        "--wait",
    ])?;

    network_renders_its_nad(cluster).await?;

    delete_namespace(cluster, NAMESPACE).await?;
    wait_until_every_address_is_back(cluster).await
}

/// Waits until no pool records an allocation.
async fn wait_until_every_address_is_back(cluster: &Cluster) -> anyhow::Result<()> {
    cluster
        .wait_for("every address back in its pool", TIMEOUT, || async {
            let held = allocations(cluster).map_err(|error| error.to_string())?;
            if held.is_empty() {
                Ok(())
            } else {
                Err(format!("still allocated: {held:?}"))
            }
        })
        .await?;
    Ok(())
}

/// Applies `manifest` (JSON) with kubectl; `verb` is `apply` or `create`.
fn kubectl_manifest(cluster: &Cluster, verb: &str, manifest: &Value) -> anyhow::Result<()> {
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), manifest.to_string())?;
    cluster.kubectl(&[verb, "-n", NAMESPACE, "-f", &file.path().to_string_lossy()])?;
    Ok(())
}

/// The NAD `name` of the test namespace: its uid and parsed config; `None` while it is missing.
fn rendered_nad(cluster: &Cluster, name: &str) -> Result<Option<(String, Value)>, String> {
    let listed = kubectl_json(
        cluster,
        &["get", "network-attachment-definitions", "-n", NAMESPACE],
    )
    .map_err(|error| error.to_string())?;
    let Some(nad) = listed["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|nad| nad["metadata"]["name"] == name)
    else {
        return Ok(None);
    };
    let config: Value = serde_json::from_str(nad["spec"]["config"].as_str().unwrap_or_default())
        .map_err(|error| format!("NAD {name}: config is not JSON: {error}"))?;
    let uid = nad["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    Ok(Some((uid, config)))
}

/// Whether `config` is the chain a Network on `master` renders.
fn is_rendered_chain(config: &Value, master: &str) -> bool {
    let plugins = config["plugins"].as_array().cloned().unwrap_or_default();
    plugins.len() == 2
        && plugins[0]["type"] == "macvlan"
        && plugins[0]["master"] == master
        && plugins[0]["ipam"]["type"] == "virtnet-ipam"
        && plugins[1]["type"] == "virtnet-coordinator"
}

/// A Network `name` on node interface `master` with Subnet `subnet`.
fn network(name: &str, master: &str, subnet: &str) -> Value {
    serde_json::json!({
        "apiVersion": "virtnet.io/v1alpha1", "kind": "Network",
        "metadata": {"name": name},
        "spec": {"master": master, "subnets": {"ipv4": subnet}},
    })
}

/// Waits until NAD `name` is rendered on `master` (with another uid than `not_uid`); its uid.
async fn wait_rendered(
    cluster: &Cluster,
    what: &str,
    name: &str,
    master: &str,
    not_uid: Option<&str>,
) -> anyhow::Result<String> {
    Ok(cluster
        .wait_for(what, TIMEOUT, || async {
            match rendered_nad(cluster, name)? {
                Some((uid, config))
                    if is_rendered_chain(&config, master) && Some(uid.as_str()) != not_uid =>
                {
                    Ok(uid)
                }
                found => Err(format!("NAD {name}: {found:?}")),
            }
        })
        .await?)
}

async fn network_renders_its_nad(cluster: &Cluster) -> anyhow::Result<()> {
    kubectl_manifest(
        cluster,
        "apply",
        &network("lan2", "ens192", "subnet-ens224"),
    )?;
    let first = wait_rendered(cluster, "Network lan2's NAD", "lan2", "ens192", None).await?;
    let nad = kubectl_json(
        cluster,
        &[
            "get",
            "network-attachment-definitions",
            "lan2",
            "-n",
            NAMESPACE,
        ],
    )?;
    let owners = &nad["metadata"]["ownerReferences"];
    ensure!(
        owners[0]["kind"] == "Network" && owners[0]["controller"] == true,
        "the rendered NAD's owners: {owners}"
    );
    // Editing the Network re-renders its NAD.
    kubectl_manifest(
        cluster,
        "apply",
        &network("lan2", "ens224", "subnet-ens224"),
    )?;
    wait_rendered(
        cluster,
        "the NAD re-rendered on the new master",
        "lan2",
        "ens224",
        None,
    )
    .await?;

    cluster.kubectl(&[
        "delete",
        "network-attachment-definitions",
        "lan2",
        "-n",
        NAMESPACE,
    ])?;
    wait_rendered(
        cluster,
        "the deleted NAD put back",
        "lan2",
        "ens224",
        Some(&first),
    )
    .await?;
    cluster.kubectl(&[
        "patch", "network-attachment-definitions", "lan2", "-n", NAMESPACE, "--type=merge",
        "-p", r#"{"spec":{"config":"{\"cniVersion\":\"1.0.0\",\"name\":\"lan2\",\"plugins\":[{\"type\":\"bridge\"}]}"}}"#,
    ])?;
    wait_rendered(
        cluster,
        "the hand-edited NAD put back",
        "lan2",
        "ens224",
        None,
    )
    .await?;

    // Pods whose default network is the other CNI, with net1 and net2 from two rendered NADs
    // bound to two Subnets.
    kubectl_manifest(cluster, "apply", &network("lan1", "ens192", "subnet-test"))?;
    wait_rendered(cluster, "Network lan1's NAD", "lan1", "ens192", None).await?;
    let deployment = extra_nics_deployment(
        "rendered",
        2,
        &format!("{NAMESPACE}/lan2@net1, {NAMESPACE}/lan1@net2"),
    );
    kubectl_manifest(cluster, "apply", &deployment)?;
    let pods = wait_for_ready_pods(cluster, NAMESPACE, "app=rendered", 2).await?;
    let held = allocations(cluster)?;
    let mut addresses = Vec::new();
    for pod in &pods {
        let records = held_by(&held, pod);
        let pools: Vec<(&str, &str)> = records
            .iter()
            .map(|(interface, pool, _)| (interface.as_str(), pool.as_str()))
            .collect();
        ensure!(
            pools.len() == 2
                && pools[0].0 == "net1"
                && pools[0].1.starts_with("subnet-ens224-")
                && pools[1].0 == "net2"
                && pools[1].1.starts_with("subnet-test-"),
            "pod {} holds {records:?}, not net1 from subnet-ens224 and net2 from subnet-test",
            pod_name(pod)
        );
        for (interface, _, address) in &records {
            ensure!(
                pod_interface_addresses(cluster, pod, interface)?.contains(address),
                "{interface} of pod {} lacks {address}",
                pod_name(pod)
            );
        }
        let listed = network_status(pod)?;
        for (network, interface) in [("lan2", "net1"), ("lan1", "net2")] {
            let name = format!("{NAMESPACE}/{network}");
            ensure!(
                listed.contains(&(name.clone(), interface.to_owned())),
                "Multus's network-status of pod {} lacks {name} as {interface}: {listed:?}",
                pod_name(pod)
            );
        }
        // The coordinator left the primary's default route alone.
        let route =
            cluster.exec_in_pod_netns(pod, &["ip", "route", "get", &OFF_SUBNET.to_string()])?;
        ensure!(
            route.contains("dev eth0"),
            "pod {}'s default route moved off the primary's eth0: {route}",
            pod_name(pod)
        );
        addresses.push(
            records
                .iter()
                .map(|(_, _, address)| *address)
                .collect::<Vec<_>>(),
        );
    }
    for address in &addresses[1] {
        ping_from_pod(cluster, &pods[0], *address)?;
    }
    ping_from_pod(cluster, &pods[0], pod_ip(&pods[1])?)?;
    cluster.kubectl(&[
        "delete",
        "deployment",
        "rendered",
        "-n",
        NAMESPACE,
        "--wait",
    ])?;

    // A same-name NAD VirtNet does not own stays as it is.
    let foreign_config = r#"{"cniVersion":"1.0.0","name":"taken","plugins":[{"type":"bridge"}]}"#;
    kubectl_manifest(
        cluster,
        "create",
        &serde_json::json!({
            "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": "taken"}, "spec": {"config": foreign_config},
        }),
    )?;
    kubectl_manifest(
        cluster,
        "apply",
        &network("taken", "ens224", "subnet-ens224"),
    )?;
    cluster
        .wait_for(
            "Network taken to report the NAD it does not own",
            TIMEOUT,
            || async {
                let network = kubectl_json(
                    cluster,
                    &["get", "networks.virtnet.io", "taken", "-n", NAMESPACE],
                )
                .map_err(|error| error.to_string())?;
                let reasons: Vec<&str> = network["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|condition| condition["reason"].as_str())
                    .collect();
                if reasons.contains(&"NetworkAttachmentDefinitionNotOwned") {
                    Ok(())
                } else {
                    Err(format!("conditions: {reasons:?}"))
                }
            },
        )
        .await?;
    let kept = kubectl_json(
        cluster,
        &[
            "get",
            "network-attachment-definitions",
            "taken",
            "-n",
            NAMESPACE,
        ],
    )?;
    ensure!(
        kept["spec"]["config"] == foreign_config,
        "the foreign NAD was overwritten: {}",
        kept["spec"]["config"]
    );

    // Every node's agent says when it lacks a Network's master interface.
    kubectl_manifest(
        cluster,
        "apply",
        &network("nomaster", "ens999", "subnet-ens224"),
    )?;
    // The Network gets one from every node; the NAD it renders (which uses VirtNet's plugins,
    // as a hand-written one would) none: one problem, one Event per node.
    let nodes = cluster.node_names().len();
    let master_missing = |kind: &'static str| async move {
        let events = kubectl_json(cluster, &["get", "events", "-n", NAMESPACE])
            .map_err(|error| error.to_string())?;
        Ok::<Vec<String>, String>(
            events["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|event| {
                    event["reason"] == "MasterMissing"
                        && event["involvedObject"]["kind"] == kind
                        && event["involvedObject"]["name"] == "nomaster"
                })
                .filter_map(|event| Some(event["message"].as_str()?.to_owned()))
                .collect(),
        )
    };
    cluster
        .wait_for(
            "a MasterMissing Event on the Network from every node",
            TIMEOUT,
            || async {
                let notes = master_missing("Network").await?;
                if notes.len() == nodes && notes.iter().all(|note| note.contains("ens999")) {
                    Ok(())
                } else {
                    Err(format!("{notes:?}"))
                }
            },
        )
        .await?;
    let on_the_nad = master_missing("NetworkAttachmentDefinition")
        .await
        .map_err(anyhow::Error::msg)?;
    ensure!(
        on_the_nad.is_empty(),
        "the NAD a Network renders got MasterMissing Events of its own: {on_the_nad:?}"
    );

    cluster.kubectl(&["delete", "networks.virtnet.io", "lan2", "-n", NAMESPACE])?;
    cluster
        .wait_for("Network lan2's NAD deleted with it", TIMEOUT, || async {
            match rendered_nad(cluster, "lan2")? {
                None => Ok(()),
                Some(_) => Err("still there".to_owned()),
            }
        })
        .await?;
    Ok(())
}

async fn scenarios(cluster: &Cluster, examples: &Path) -> anyhow::Result<()> {
    let file = |name: &str| examples.join(name).to_string_lossy().into_owned();
    // The example Subnet too: the node default conflist names it.
    for manifest in [
        "statefulset/subnet.yaml",
        "multus/subnets.yaml",
        "multus/network-attachment-definitions.yaml",
    ] {
        cluster.kubectl(&["apply", "-f", &file(manifest)])?;
    }
    cluster
        .wait_for(&format!("{POOLS} IPPools"), TIMEOUT, || async {
            let pools = cluster
                .kubectl(&["get", "ippools.virtnet.io", "-o", "name"])
                .map_err(|error| error.to_string())?;
            if pools.lines().count() == POOLS {
                Ok(())
            } else {
                Err(format!("pools: {pools:?}"))
            }
        })
        .await?;
    create_namespace(cluster, NAMESPACE).await?;

    nad_as_default_network(cluster, &file("multus/deployment.yaml")).await?;
    two_nics(cluster, &file("multus/two-nics.yaml")).await?;

    delete_namespace(cluster, NAMESPACE).await?;
    wait_until_every_address_is_back(cluster).await?;
    for node in 1..=cluster.node_names().len() {
        let links = ip_json(&cluster.names().node_netns(node), &["link", "show"])?;
        let veths: Vec<&str> = links
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|link| link["ifname"].as_str())
            .filter(|name| name.starts_with("vnc"))
            .collect();
        ensure!(veths.is_empty(), "node {node} kept host veths {veths:?}");
    }
    Ok(())
}

/// One allocated address of an IPPool.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Allocation {
    pool: String,
    address: IpAddr,
    /// `namespace/name` of the Endpoint.
    endpoint: String,
    interface: String,
}

fn allocations(cluster: &Cluster) -> anyhow::Result<BTreeSet<Allocation>> {
    let pools = kubectl_json(cluster, &["get", "ippools.virtnet.io"])?;
    let mut held = BTreeSet::new();
    for pool in pools["items"].as_array().into_iter().flatten() {
        let name = pool["metadata"]["name"].as_str().unwrap_or_default();
        for (address, record) in pool["status"]["allocations"]
            .as_object()
            .into_iter()
            .flatten()
        {
            held.insert(Allocation {
                pool: name.to_owned(),
                address: address.parse()?,
                endpoint: record["endpoint"].as_str().unwrap_or_default().to_owned(),
                interface: record["interface"].as_str().unwrap_or_default().to_owned(),
            });
        }
    }
    Ok(held)
}

/// What the pools record for `pod`: (interface, pool, address), sorted by interface.
fn held_by(allocations: &BTreeSet<Allocation>, pod: &Pod) -> Vec<(String, String, IpAddr)> {
    let endpoint = format!("{NAMESPACE}/{}", pod_name(pod));
    let mut held: Vec<_> = allocations
        .iter()
        .filter(|allocation| allocation.endpoint == endpoint)
        .map(|allocation| {
            (
                allocation.interface.clone(),
                allocation.pool.clone(),
                allocation.address,
            )
        })
        .collect();
    held.sort();
    held
}

/// The networks Multus reports in the pod's `k8s.v1.cni.cncf.io/network-status`, as
/// (network name, interface).
fn network_status(pod: &Pod) -> anyhow::Result<Vec<(String, String)>> {
    let status = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get("k8s.v1.cni.cncf.io/network-status"))
        .with_context(|| format!("pod {} has no network-status from Multus", pod_name(pod)))?;
    let networks: Value = serde_json::from_str(status)?;
    Ok(networks
        .as_array()
        .into_iter()
        .flatten()
        .map(|network| {
            let field = |key: &str| network[key].as_str().unwrap_or_default().to_owned();
            (field("name"), field("interface"))
        })
        .collect())
}

/// Multus: the NAD replaces the node's default network and the pool annotation picks the pool.
async fn nad_as_default_network(cluster: &Cluster, deployment: &str) -> anyhow::Result<()> {
    cluster.kubectl(&["apply", "-n", NAMESPACE, "-f", deployment])?;
    let pods = wait_for_ready_pods(cluster, NAMESPACE, "app=custom-ippool-deploy", 2).await?;
    let held = allocations(cluster)?;
    for pod in &pods {
        let address = pod_ip(pod)?;
        ensure!(
            held_by(&held, pod) == [("eth0".to_owned(), "subnet-test-1".to_owned(), address)],
            "pod {} has {address}; the pools record {:?} for it, not eth0 in subnet-test-1",
            pod_name(pod),
            held_by(&held, pod)
        );
        ensure!(
            pod_interface_addresses(cluster, pod, "eth0")?.contains(&address),
            "eth0 of pod {} lacks {address}",
            pod_name(pod)
        );
        let networks = network_status(pod)?;
        ensure!(
            networks == [("kube-system/macvlan-conf".to_owned(), "eth0".to_owned())],
            "pod {}: Multus reports networks {networks:?}, not kube-system/macvlan-conf on eth0",
            pod_name(pod)
        );
        ping_from_pod(cluster, pod, GATEWAY_V4.into())?;
    }
    ping_from_pod(cluster, &pods[0], pod_ip(&pods[1])?)?;
    ping_from_pod(cluster, &pods[1], pod_ip(&pods[0])?)?;
    Ok(())
}

/// A pod's two NICs and their addresses.
struct TwoNics<'a> {
    pod: &'a Pod,
    eth0: IpAddr,
    net1: IpAddr,
}

async fn two_nics(cluster: &Cluster, deployment: &str) -> anyhow::Result<()> {
    cluster.kubectl(&["apply", "-n", NAMESPACE, "-f", deployment])?;
    let pods = wait_for_ready_pods(cluster, NAMESPACE, "app=two-nics", 2).await?;
    let nodes: BTreeSet<&str> = pods.iter().filter_map(node_name).collect();
    ensure!(nodes.len() == 2, "two-nics pods share a node: {nodes:?}");
    let held = allocations(cluster)?;
    let endpoints = kubectl_json(cluster, &["get", "endpoints.virtnet.io", "-n", NAMESPACE])?;
    let mut nics = Vec::new();
    for pod in &pods {
        let records = held_by(&held, pod);
        let [(eth0_if, eth0_pool, eth0), (net1_if, net1_pool, net1)] = records.as_slice() else {
            anyhow::bail!(
                "pod {} holds {records:?}, not one address per NIC",
                pod_name(pod)
            );
        };
        ensure!(
            eth0_if == "eth0"
                && eth0_pool.starts_with("subnet-test-")
                && net1_if == "net1"
                && net1_pool == "subnet-ens224-0",
            "pod {}: eth0 must come from subnet-test and net1 from subnet-ens224, got {records:?}",
            pod_name(pod)
        );
        for (interface, address) in [("eth0", eth0), ("net1", net1)] {
            ensure!(
                pod_interface_addresses(cluster, pod, interface)?.contains(address),
                "{interface} of pod {} lacks {address}",
                pod_name(pod)
            );
        }
        let endpoint = endpoints["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|endpoint| endpoint["metadata"]["name"] == pod_name(pod))
            .with_context(|| format!("no Endpoint for pod {}", pod_name(pod)))?;
        let listed: Vec<(&str, &str)> = endpoint["spec"]["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|nic| {
                let field = |key: &str| nic[key].as_str().unwrap_or_default();
                (field("interface"), field("ipv4"))
            })
            .collect();
        let (eth0_cidr, net1_cidr) = (format!("{eth0}/16"), format!("{net1}/16"));
        ensure!(
            listed == [("eth0", eth0_cidr.as_str()), ("net1", net1_cidr.as_str())],
            "the Endpoint of pod {} lists {listed:?}",
            pod_name(pod)
        );
        let networks = network_status(pod)?;
        ensure!(
            networks
                .iter()
                .map(|(_, nic)| nic.as_str())
                .collect::<Vec<_>>()
                == ["eth0", "net1"]
                && networks[1].0 == "kube-system/macvlan-ens224",
            "pod {}: Multus reports {networks:?}",
            pod_name(pod)
        );
        nics.push(TwoNics {
            pod,
            eth0: *eth0,
            net1: *net1,
        });
    }
    let [a, b] = nics.as_slice() else {
        anyhow::bail!("expected two pods");
    };
    check_routes(cluster, a, b)?;
    check_traffic(cluster, a, b)?;
    ping_from_pod(cluster, b.pod, SECOND_GATEWAY_V4.into())?;
    Ok(())
}

/// `ip route get` in `a`: each peer by its own NIC, the default route on eth0, and net1's address
/// answering through net1's table.
fn check_routes(cluster: &Cluster, a: &TwoNics<'_>, b: &TwoNics<'_>) -> anyhow::Result<()> {
    let route_get = |args: &[&str]| -> anyhow::Result<String> {
        let mut command = vec!["ip", "route", "get"];
        command.extend_from_slice(args);
        Ok(cluster.exec_in_pod_netns(a.pod, &command)?)
    };
    let table_101 = format!("via {SECOND_GATEWAY_V4} dev net1 table 101");
    for (args, expected) in [
        (vec![b.eth0.to_string()], "dev eth0".to_owned()),
        (vec![b.net1.to_string()], "dev net1".to_owned()),
        (
            vec![OFF_SUBNET.to_string()],
            format!("via {GATEWAY_V4} dev eth0"),
        ),
        (
            vec![OFF_SUBNET.to_string(), "from".into(), a.net1.to_string()],
            table_101.clone(),
        ),
        (
            vec![GATEWAY_V4.to_string(), "from".into(), a.net1.to_string()],
            table_101,
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let route = route_get(&args)?;
        ensure!(
            route.contains(&expected),
            "in pod {}, `ip route get {}` says {route:?}, expected {expected:?}",
            pod_name(a.pod),
            args.join(" ")
        );
    }
    Ok(())
}

/// Packet counters of one pod NIC.
#[derive(Debug, Clone, Copy)]
struct Counters {
    tx: u64,
    rx: u64,
}

fn counters(cluster: &Cluster, pod: &Pod, nic: &str) -> anyhow::Result<Counters> {
    let netns = cluster.pod_netns(pod)?;
    let links = ip_json(&netns, &["-s", "link", "show", "dev", nic])?;
    let stats = &links[0]["stats64"];
    let packets = |direction: &str| {
        stats[direction]["packets"]
            .as_u64()
            .with_context(|| format!("no {direction} packet count for {nic} in {links}"))
    };
    Ok(Counters {
        tx: packets("tx")?,
        rx: packets("rx")?,
    })
}

/// Runs `ping` (`PINGS` echoes) and checks in pod `a` that both the requests and the replies
/// went through `expected` and (nearly) nothing through `other`.
fn through(
    cluster: &Cluster,
    a: &TwoNics<'_>,
    what: &str,
    ping: impl FnOnce() -> anyhow::Result<()>,
    expected: &str,
    other: &str,
) -> anyhow::Result<()> {
    let before = [
        counters(cluster, a.pod, expected)?,
        counters(cluster, a.pod, other)?,
    ];
    ping()?;
    let after = [
        counters(cluster, a.pod, expected)?,
        counters(cluster, a.pod, other)?,
    ];
    let delta = |index: usize| Counters {
        tx: after[index].tx - before[index].tx,
        rx: after[index].rx - before[index].rx,
    };
    let (on_expected, on_other) = (delta(0), delta(1));
    ensure!(
        on_expected.tx >= PINGS && on_expected.rx >= PINGS && on_other.tx < PINGS / 2,
        "{what}: {expected} of pod {} moved {on_expected:?} and {other} {on_other:?} packets; \
         all {PINGS} echoes and replies should go by {expected}",
        pod_name(a.pod)
    );
    Ok(())
}

fn check_traffic(cluster: &Cluster, a: &TwoNics<'_>, b: &TwoNics<'_>) -> anyhow::Result<()> {
    let count = PINGS.to_string();
    let ping_from_a = |target: IpAddr| {
        let target = target.to_string();
        let count = count.clone();
        move || -> anyhow::Result<()> {
            cluster.exec_in_pod_netns(
                a.pod,
                &[
                    "ping", "-q", "-c", &count, "-i", "0.05", "-w", "10", &target,
                ],
            )?;
            Ok(())
        }
    };
    through(
        cluster,
        a,
        "pod to a peer on net1's network",
        ping_from_a(b.net1),
        "net1",
        "eth0",
    )?;
    through(
        cluster,
        a,
        "pod to a peer on eth0's network",
        ping_from_a(b.eth0),
        "eth0",
        "net1",
    )?;
    // The router sits on both networks: it asks net1's address from its eth0-side address, so
    // only the policy rule sends the replies back by net1 (the main table would pick eth0).
    let router = cluster.names().router_netns();
    let (gateway, target) = (GATEWAY_V4.to_string(), a.net1.to_string());
    through(
        cluster,
        a,
        "replies to a peer of eth0's network asking net1's address",
        || {
            command::run(Command::new("ip").args([
                "netns", "exec", &router, "ping", "-q", "-c", &count, "-i", "0.05", "-w", "10",
                "-I", &gateway, &target,
            ]))?;
            Ok(())
        },
        "net1",
        "eth0",
    )
}

/// `ip -j <args>` inside network namespace `netns`.
fn ip_json(netns: &str, args: &[&str]) -> anyhow::Result<Value> {
    let output = command::run_stdout(Command::new("ip").arg("-j").arg("-n").arg(netns).args(args))?;
    Ok(serde_json::from_str(&output)?)
}
