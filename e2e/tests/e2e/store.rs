//! The store layer's guards on the real apiserver, on a VirtNet cluster of its own:
//! - letting an Endpoint go keeps another controller's finalizer (the Endpoint stays Terminating
//!   until that controller removes its own);
//! - sandboxes of the same pod racing each other — many concurrent DEL(old)/ADD(new) pairs sent
//!   straight to the agent's socket — end with every pod holding one record, its Endpoint naming
//!   the new sandbox, and no address twice;
//! - replays: ADD replayed for the same sandbox answers the same address, DEL replayed and DEL of
//!   a sandbox the agent never saw change nothing, CHECK after DEL fails;
//! - GC and CHECK are per network: a GC for one network never frees another network's
//!   addresses, and never those of a pod the API server still shows running on the node;
//! - a Multus network-selection element's `ips` is a static request (honoured; taken or outside
//!   the Subnets: a CNI error that says so);
//! - an interface whose element names an IPAMClaim, on a NAD that allows persistent addresses,
//!   gets the claim's address, written to the claim's status; a second pod of the claim on
//!   another node (a live migration's target) holds it at the same time; the source's DEL keeps
//!   it; deleting the claim (once its pods are gone) frees it;
//! - a stale cache never hands out an address twice: with one agent's view of the apiserver
//!   held 3 s behind (a delaying proxy), an address its pod held is released through the API and
//!   claimed by another node's agent; the first pod's new sandbox must not get it too.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail, ensure};
use http::{Method, StatusCode};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use serde_json::{Value, json};
use virtnet_cni::agent_api::{
    ALLOCATE_PATH, AllocateRequest, AllocateResponse, CHECK_PATH, CheckRequest, GC_PATH, PodRef,
    RELEASE_PATH, ReleaseRequest,
};
use virtnet_cni::trusted::TrustedDirs;
use virtnet_e2e::{
    cluster::{Cluster, VirtnetOptions},
    delay::Faults,
};

use crate::ipam::{apply_example_subnet, kubectl_json, pool_records};
use crate::support::{
    Suite, create_namespace, install_crd, own_virtnet_cluster, run_on_own_cluster,
    wait_for_ready_pods,
};

const NAMESPACE: &str = "e2e-store";
/// Pods whose sandboxes race (each pair is one DEL and one ADD at once).
const RACING_PODS: usize = 40;
const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The controller releases a deleted claim's address once its pods are gone: at the latest
/// when the orphan grace of the claim's Endpoint ends, or at the next sweep.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(150);
/// One agent request; the racing pairs all go at once on a 2-core machine.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const FOREIGN_FINALIZER: &str = "backup.example.com/protect";
/// The network name of the nodes' default conflist: what the runtime's calls carry.
const NETWORK: &str = "macvlan";

pub fn store_guards_keep_foreign_finalizers_and_racing_sandboxes_apart(
    suite: &Suite,
) -> anyhow::Result<()> {
    let virtnet = VirtnetOptions::from_workspace();
    let example_subnet = virtnet.repo.join("examples/statefulset/subnet.yaml");
    run_on_own_cluster(suite, own_virtnet_cluster('s', virtnet), async |cluster| {
        apply_example_subnet(cluster, &example_subnet.to_string_lossy()).await?;
        create_namespace(cluster, NAMESPACE).await?;
        foreign_finalizer_is_kept(cluster).await?;
        racing_sandboxes(cluster).await?;
        replays(cluster).await?;
        per_network_gc(cluster).await?;
        static_ips_from_the_network_selection(cluster).await?;
        ipam_claims(cluster).await?;
        stale_cache(cluster).await
    })
}

/// A real pod started by the kubelet gets its Endpoint; another controller adds its finalizer;
/// deleting the pod releases the address and lets VirtNet's finalizer go, never the other.
async fn foreign_finalizer_is_kept(cluster: &Cluster) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(cluster.client(), NAMESPACE);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "guarded", "labels": {"app": "guarded"}},
        "spec": {"containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]},
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    wait_for_ready_pods(cluster, NAMESPACE, "app=guarded", 1).await?;
    let endpoint = kubectl_json(
        cluster,
        &["get", "endpoints.virtnet.io", "-n", NAMESPACE, "guarded"],
    )?;
    let address = endpoint["spec"]["interfaces"][0]["ipv4"]
        .as_str()
        .and_then(|value| value.split('/').next())
        .context("the Endpoint records an IPv4 address")?
        .to_owned();
    cluster.kubectl(&[
        "patch",
        "endpoints.virtnet.io",
        "-n",
        NAMESPACE,
        "guarded",
        "--type=json",
        "-p",
        &json!([{"op": "add", "path": "/metadata/finalizers/-", "value": FOREIGN_FINALIZER}])
            .to_string(),
    ])?;
    pods.delete("guarded", &DeleteParams::default()).await?;
    let finalizers = cluster
        .wait_for(
            "the address released and VirtNet's finalizer gone",
            SETTLE_TIMEOUT,
            || async {
                let records = pool_records(cluster).map_err(|error| error.to_string())?;
                if records.iter().any(|(held, _)| *held == address) {
                    return Err(format!("{address} is still recorded"));
                }
                let endpoint = kubectl_json(
                    cluster,
                    &["get", "endpoints.virtnet.io", "-n", NAMESPACE, "guarded"],
                )
                .map_err(|error| {
                    format!("the Endpoint is gone with its foreign finalizer: {error}")
                })?;
                let finalizers = endpoint["metadata"]["finalizers"].clone();
                if finalizers == json!([FOREIGN_FINALIZER]) {
                    Ok(finalizers)
                } else {
                    Err(format!("finalizers: {finalizers}"))
                }
            },
        )
        .await?;
    ensure!(finalizers == json!([FOREIGN_FINALIZER]));
    // The other controller finishes: now the Endpoint goes.
    cluster.kubectl(&[
        "patch",
        "endpoints.virtnet.io",
        "-n",
        NAMESPACE,
        "guarded",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ])?;
    cluster
        .wait_for("the Endpoint deleted", SETTLE_TIMEOUT, || async {
            match cluster.kubectl(&["get", "endpoints.virtnet.io", "-n", NAMESPACE, "guarded"]) {
                Err(_) => Ok(()),
                Ok(found) => Err(found),
            }
        })
        .await?;
    Ok(())
}

/// Pods that no kubelet runs (no scheduler picks them up): their sandboxes are whatever this
/// test tells the agent of node 1.
async fn unscheduled_pods(
    cluster: &Cluster,
    prefix: &str,
    count: usize,
) -> anyhow::Result<Vec<PodRef>> {
    unscheduled_pods_in(cluster, NAMESPACE, prefix, count).await
}

async fn unscheduled_pods_in(
    cluster: &Cluster,
    namespace: &str,
    prefix: &str,
    count: usize,
) -> anyhow::Result<Vec<PodRef>> {
    let pods: Api<Pod> = Api::namespaced(cluster.client(), namespace);
    let mut refs = Vec::with_capacity(count);
    for index in 0..count {
        let name = format!("{prefix}-{index}");
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "schedulerName": "nobody",
                "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}],
            },
        }))?;
        let created = pods.create(&PostParams::default(), &pod).await?;
        refs.push(PodRef {
            namespace: namespace.to_owned(),
            name,
            uid: created.metadata.uid,
        });
    }
    Ok(refs)
}

/// The socket of the agent of node `index` (0: the first).
fn agent_socket_of(cluster: &Cluster, index: usize) -> anyhow::Result<PathBuf> {
    let node = cluster
        .node_names()
        .into_iter()
        .nth(index)
        .context("enough nodes")?;
    Ok(cluster
        .layout()
        .node_dirs(&node)
        .agent_run
        .join("agent.sock"))
}

fn agent_socket(cluster: &Cluster) -> anyhow::Result<PathBuf> {
    agent_socket_of(cluster, 0)
}

/// One request to the agent, as virtnet-ipam sends it; the status and the JSON answer.
async fn call(
    socket: &Path,
    path: &'static str,
    body: Value,
) -> anyhow::Result<(StatusCode, Value)> {
    // The test speaks for a node whose runtime trusts the node's own directory.
    let trusted = TrustedDirs::with_extra(socket.parent().and_then(Path::to_str))?;
    let socket = trusted
        .admit(socket)
        .ok_or_else(|| anyhow::anyhow!("{} is not a socket path", socket.display()))?;
    let (status, answer) = tokio::task::spawn_blocking(move || {
        virtnet_cni::agent_client::exchange(
            &socket,
            REQUEST_TIMEOUT,
            Method::POST,
            path,
            body.to_string().into_bytes(),
        )
    })
    .await??;
    let answer = serde_json::from_slice(&answer).unwrap_or(Value::Null);
    Ok((status, answer))
}

fn add_request_in(pod: &PodRef, container: &str, subnet: &str) -> anyhow::Result<Value> {
    add_request_for(pod, container, subnet, NETWORK)
}

fn add_request_for(
    pod: &PodRef,
    container: &str,
    subnet: &str,
    network: &str,
) -> anyhow::Result<Value> {
    Ok(serde_json::to_value(AllocateRequest {
        container_id: container.to_owned(),
        ifname: "eth0".to_owned(),
        netns: format!("/var/run/netns/{container}"),
        pod: pod.clone(),
        default_subnets: vec![subnet.to_owned()],
        network: Some(network.to_owned()),
    })?)
}

fn del_request(pod: &PodRef, container: &str) -> anyhow::Result<Value> {
    Ok(serde_json::to_value(ReleaseRequest {
        container_id: container.to_owned(),
        ifname: "eth0".to_owned(),
        pod: Some(pod.clone()),
        network: Some(NETWORK.to_owned()),
    })?)
}

fn check_request(pod: &PodRef, container: &str, network: &str) -> anyhow::Result<Value> {
    Ok(serde_json::to_value(CheckRequest {
        container_id: container.to_owned(),
        ifname: "eth0".to_owned(),
        pod: Some(pod.clone()),
        network: Some(network.to_owned()),
    })?)
}

/// ADD, retried as the runtime retries it while the agent says "try again".
async fn add(socket: &Path, pod: &PodRef, container: &str) -> anyhow::Result<String> {
    add_to(socket, pod, container, NETWORK).await
}

async fn add_to(
    socket: &Path,
    pod: &PodRef,
    container: &str,
    network: &str,
) -> anyhow::Result<String> {
    for _ in 0..20 {
        let request = add_request_for(pod, container, "subnet", network)?;
        let (status, answer) = call(socket, ALLOCATE_PATH, request).await?;
        if status.is_success() {
            let response: AllocateResponse = serde_json::from_value(answer)?;
            let address = response.ips.first().context("an address")?.address.addr();
            return Ok(address.to_string());
        }
        if status != StatusCode::SERVICE_UNAVAILABLE {
            bail!("ADD {}/{container}: {status} {answer}", pod.name);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("ADD {}/{container} kept being refused", pod.name)
}

async fn del(socket: &Path, pod: &PodRef, container: &str) -> anyhow::Result<()> {
    for _ in 0..20 {
        let (status, answer) = call(socket, RELEASE_PATH, del_request(pod, container)?).await?;
        if status.is_success() {
            return Ok(());
        }
        if status != StatusCode::SERVICE_UNAVAILABLE {
            bail!("DEL {}/{container}: {status} {answer}", pod.name);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("DEL {}/{container} kept being refused", pod.name)
}

/// The pool records of `pod` (by Endpoint name), as (address, containerID).
fn records_of(records: &[(String, Value)], pod: &str) -> Vec<(String, String)> {
    let endpoint = format!("{NAMESPACE}/{pod}");
    records
        .iter()
        .filter(|(_, record)| record["endpoint"] == endpoint.as_str())
        .map(|(address, record)| {
            (
                address.clone(),
                record["containerID"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}

/// Every pod's first sandbox is added, then each pod's DEL(first) and ADD(second) go at once,
/// all pods together: the guarded Endpoint write and the sandbox in the pool record keep the
/// old sandbox's DEL from freeing what the new one holds.
async fn racing_sandboxes(cluster: &Cluster) -> anyhow::Result<()> {
    let socket = agent_socket(cluster)?;
    let pods = unscheduled_pods(cluster, "race", RACING_PODS).await?;
    let first =
        futures::future::try_join_all(pods.iter().map(|pod| add(&socket, pod, "first"))).await?;
    ensure!(
        first.iter().collect::<BTreeSet<_>>().len() == RACING_PODS,
        "first sandboxes got duplicate addresses: {first:?}"
    );
    let pairs = pods.iter().map(|pod| {
        let socket = socket.clone();
        async move {
            let (removed, added) =
                tokio::join!(del(&socket, pod, "first"), add(&socket, pod, "second"));
            removed?;
            added
        }
    });
    let second = futures::future::try_join_all(pairs).await?;
    let records = pool_records(cluster)?;
    let mut seen = BTreeSet::new();
    for (pod, address) in pods.iter().zip(&second) {
        let held = records_of(&records, &pod.name);
        ensure!(
            held == vec![(address.clone(), "second".to_owned())],
            "pod {}: answered {address}, pool records {held:?}",
            pod.name
        );
        ensure!(seen.insert(address.clone()), "{address} is held twice");
        let endpoint = kubectl_json(
            cluster,
            &["get", "endpoints.virtnet.io", "-n", NAMESPACE, &pod.name],
        )?;
        ensure!(
            endpoint["spec"]["containerID"] == "second"
                && endpoint["spec"]["interfaces"][0]["ipv4"]
                    .as_str()
                    .is_some_and(|recorded| recorded.starts_with(&format!("{address}/"))),
            "pod {}: Endpoint {}",
            pod.name,
            endpoint["spec"]
        );
    }
    Ok(())
}

/// Replayed and stray CNI calls for one pod.
async fn replays(cluster: &Cluster) -> anyhow::Result<()> {
    let socket = agent_socket(cluster)?;
    let pod = unscheduled_pods(cluster, "replay", 1).await?.remove(0);
    let address = add(&socket, &pod, "one").await?;
    ensure!(
        add(&socket, &pod, "one").await? == address,
        "a replayed ADD answers the same address"
    );
    // DEL of a sandbox the agent never saw (the runtime cleaning up a failed one): nothing goes.
    del(&socket, &pod, "unknown").await?;
    ensure!(
        records_of(&pool_records(cluster)?, &pod.name) == vec![(address.clone(), "one".to_owned())],
        "a DEL of another sandbox left the address alone"
    );
    del(&socket, &pod, "one").await?;
    del(&socket, &pod, "one").await?;
    ensure!(
        records_of(&pool_records(cluster)?, &pod.name).is_empty(),
        "DEL released the address, and the replayed DEL was harmless"
    );
    let (status, answer) = call(&socket, CHECK_PATH, check_request(&pod, "one", NETWORK)?).await?;
    ensure!(
        status == StatusCode::NOT_FOUND,
        "CHECK after DEL fails as not allocated: {status} {answer}"
    );
    Ok(())
}

const GC_NAMESPACE: &str = "e2e-gc";

/// A GC is for one network: "othernet" with nothing listed frees nobody else's addresses;
/// "netb" frees only netb's; the nodes' own network frees nothing of a pod the API server still
/// shows running on this node (and says so in an Event). CHECK answers per network.
async fn per_network_gc(cluster: &Cluster) -> anyhow::Result<()> {
    create_namespace(cluster, GC_NAMESPACE).await?;
    let socket = agent_socket(cluster)?;
    let node = cluster.node_names().into_iter().next().context("a node")?;
    let pods: Api<Pod> = Api::namespaced(cluster.client(), GC_NAMESPACE);
    let live: Pod = serde_json::from_value(json!({
        "metadata": {"name": "live", "labels": {"app": "live"}},
        "spec": {"nodeName": node,
                 "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]},
    }))?;
    pods.create(&PostParams::default(), &live).await?;
    wait_for_ready_pods(cluster, GC_NAMESPACE, "app=live", 1).await?;
    let [on_a, on_b] =
        <[PodRef; 2]>::try_from(unscheduled_pods_in(cluster, GC_NAMESPACE, "gc", 2).await?)
            .map_err(|_| anyhow::anyhow!("two pods"))?;
    add_to(&socket, &on_a, "sandbox-a", "neta").await?;
    add_to(&socket, &on_b, "sandbox-b", "netb").await?;
    let held = || -> anyhow::Result<BTreeSet<String>> {
        let endpoints: BTreeSet<String> = pool_records(cluster)?
            .into_iter()
            .filter_map(|(_, record)| record["endpoint"].as_str().map(str::to_owned))
            .filter(|endpoint| endpoint.starts_with(&format!("{GC_NAMESPACE}/")))
            .collect();
        Ok(endpoints)
    };
    let all: BTreeSet<String> = ["live", "gc-0", "gc-1"]
        .map(|name| format!("{GC_NAMESPACE}/{name}"))
        .into();
    ensure!(held()? == all, "every pod holds an address: {:?}", held()?);

    let gc = |network: &str| json!({"validAttachments": [], "network": network});
    for network in ["othernet", "netb", NETWORK] {
        let (status, answer) = call(&socket, GC_PATH, gc(network)).await?;
        ensure!(status.is_success(), "GC {network}: {status} {answer}");
        if network == "othernet" {
            ensure!(held()? == all, "GC of othernet freed {:?}", &all - &held()?);
        }
    }
    let left: BTreeSet<String> = ["live", "gc-0"]
        .map(|name| format!("{GC_NAMESPACE}/{name}"))
        .into();
    ensure!(
        held()? == left,
        "GC of netb frees only gc-1, GC of {NETWORK} keeps the running pod: held {:?}",
        held()?
    );
    cluster
        .wait_for(
            "the GarbageCollectionRefused Event",
            SETTLE_TIMEOUT,
            || async {
                let events = kubectl_json(
                    cluster,
                    &[
                        "get",
                        "events",
                        "-n",
                        GC_NAMESPACE,
                        "--field-selector",
                        "reason=GarbageCollectionRefused,involvedObject.name=live",
                    ],
                )
                .map_err(|error| error.to_string())?;
                match events["items"].as_array().map(Vec::len) {
                    Some(1..) => Ok(()),
                    _ => Err(format!("no Event yet: {events}")),
                }
            },
        )
        .await?;
    for (network, expected) in [("neta", StatusCode::OK), ("netb", StatusCode::NOT_FOUND)] {
        let (status, answer) = call(
            &socket,
            CHECK_PATH,
            check_request(&on_a, "sandbox-a", network)?,
        )
        .await?;
        ensure!(
            status == expected,
            "CHECK of gc-0 for {network}: {status} {answer}"
        );
    }
    Ok(())
}

const SELECTION_NAMESPACE: &str = "e2e-selection";
/// An address of the example Subnet no other scenario asks for.
const REQUESTED: &str = "10.6.153.250";

/// Pods (no kubelet runs them) whose Multus network-selection annotation is `networks`.
async fn selecting_pods(
    cluster: &Cluster,
    names: &[&str],
    networks: &Value,
) -> anyhow::Result<Vec<PodRef>> {
    let pods: Api<Pod> = Api::namespaced(cluster.client(), SELECTION_NAMESPACE);
    let mut refs = Vec::new();
    for name in names {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name,
                         "annotations": {"k8s.v1.cni.cncf.io/networks": networks.to_string()}},
            "spec": {"schedulerName": "nobody",
                     "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]},
        }))?;
        let created = pods.create(&PostParams::default(), &pod).await?;
        refs.push(PodRef {
            namespace: SELECTION_NAMESPACE.to_owned(),
            name: (*name).to_owned(),
            uid: created.metadata.uid,
        });
    }
    Ok(refs)
}

/// ADD of net1 of `pod` on network `network`, as Multus would run virtnet-ipam for it; the
/// answered address or the agent's refusal.
async fn add_net1(
    socket: &Path,
    pod: &PodRef,
    container: &str,
    network: &str,
) -> anyhow::Result<Result<String, (StatusCode, Value)>> {
    let request = serde_json::to_value(AllocateRequest {
        container_id: container.to_owned(),
        ifname: "net1".to_owned(),
        netns: format!("/var/run/netns/{container}"),
        pod: pod.clone(),
        default_subnets: vec!["subnet".to_owned()],
        network: Some(network.to_owned()),
    })?;
    for _ in 0..20 {
        let (status, answer) = call(socket, ALLOCATE_PATH, request.clone()).await?;
        if status.is_success() {
            let response: AllocateResponse = serde_json::from_value(answer)?;
            let address = response.ips.first().context("an address")?.address.addr();
            return Ok(Ok(address.to_string()));
        }
        if status != StatusCode::SERVICE_UNAVAILABLE {
            return Ok(Err((status, answer)));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("ADD {}/{container} kept being refused", pod.name)
}

/// The `ips` of the element for net1: honoured; asked again by another pod: taken; outside the
/// network's Subnets: refused.
async fn static_ips_from_the_network_selection(cluster: &Cluster) -> anyhow::Result<()> {
    create_namespace(cluster, SELECTION_NAMESPACE).await?;
    let socket = agent_socket(cluster)?;
    let asking = |address: &str| json!([{"name": "underlay", "interface": "net1", "ips": [format!("{address}/16")]}]);
    let first = selecting_pods(cluster, &["static-a"], &asking(REQUESTED)).await?;
    let given = add_net1(&socket, &first[0], "static-a", "underlay").await?;
    ensure!(
        given.as_deref().ok() == Some(REQUESTED),
        "the element's ips are honoured: {given:?}"
    );
    let second = selecting_pods(cluster, &["static-b"], &asking(REQUESTED)).await?;
    let Err((status, answer)) = add_net1(&socket, &second[0], "static-b", "underlay").await? else {
        bail!("{REQUESTED} was given twice");
    };
    ensure!(
        status == StatusCode::CONFLICT && answer.to_string().contains(REQUESTED),
        "a taken address is refused as a conflict naming it: {status} {answer}"
    );
    let outside = selecting_pods(cluster, &["static-c"], &asking("10.9.0.1")).await?;
    let Err((status, answer)) = add_net1(&socket, &outside[0], "static-c", "underlay").await?
    else {
        bail!("an address in no Subnet was given");
    };
    ensure!(
        !status.is_success() && answer.to_string().contains("10.9.0.1"),
        "an address outside the Subnets is refused, naming it: {status} {answer}"
    );
    Ok(())
}

const CLAIM: &str = "vm1.underlay";

/// An IPAMClaim's address through a pod's life, a migration and the claim's deletion.
async fn ipam_claims(cluster: &Cluster) -> anyhow::Result<()> {
    install_crd(
        cluster,
        "k8s.cni.cncf.io",
        "v1",
        "NetworkAttachmentDefinition",
        "network-attachment-definitions",
    )
    .await?;
    // The IPAMClaim CRD as the chart installs it (ipamClaims.installCRD).
    let chart = VirtnetOptions::from_workspace().repo.join("chart");
    let rendered = cluster.helm(&[
        "template",
        "virtnet",
        &chart.to_string_lossy(),
        "--set",
        "ipamClaims.installCRD=true",
        "-s",
        "templates/ipamclaims-crd.yaml",
    ])?;
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), rendered)?;
    cluster.kubectl(&["apply", "-f", &file.path().to_string_lossy()])?;
    cluster.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/ipamclaims.k8s.cni.cncf.io",
    ])?;
    let objects = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
         "metadata": {"name": "underlay", "namespace": SELECTION_NAMESPACE},
         "spec": {"config": json!({"cniVersion": "1.0.0", "name": "underlay",
                                   "allowPersistentIPs": true, "plugins": []}).to_string()}},
        {"apiVersion": "k8s.cni.cncf.io/v1alpha1", "kind": "IPAMClaim",
         "metadata": {"name": CLAIM, "namespace": SELECTION_NAMESPACE},
         "spec": {"network": "underlay"}},
    ]});
    std::fs::write(file.path(), objects.to_string())?;
    cluster.kubectl(&["apply", "-f", &file.path().to_string_lossy()])?;

    let claiming =
        json!([{"name": "underlay", "interface": "net1", "ipam-claim-reference": CLAIM}]);
    let pods = selecting_pods(
        cluster,
        &["virt-launcher-vm1-source", "virt-launcher-vm1-target"],
        &claiming,
    )
    .await?;
    let (source, target) = (&pods[0], &pods[1]);
    let first = add_net1(&agent_socket_of(cluster, 0)?, source, "source", "underlay")
        .await?
        .map_err(|(status, answer)| anyhow::anyhow!("ADD of the source: {status} {answer}"))?;
    let claim_status = || -> anyhow::Result<Value> {
        Ok(kubectl_json(
            cluster,
            &["get", "ipamclaims", "-n", SELECTION_NAMESPACE, CLAIM],
        )?["status"]
            .clone())
    };
    cluster
        .wait_for(
            "the claim to record the address",
            SETTLE_TIMEOUT,
            || async {
                let status = claim_status().map_err(|error| error.to_string())?;
                let recorded = status["ips"][0].as_str().unwrap_or_default().to_owned();
                if recorded.starts_with(&format!("{first}/"))
                    && status["ownerPod"]["name"] == source.name.as_str()
                    && status["conditions"][0]["reason"] == "SuccessfulAllocation"
                {
                    Ok(())
                } else {
                    Err(format!("status {status}"))
                }
            },
        )
        .await?;
    // The migration's target, on another node, while the source still runs: the same address.
    let second = add_net1(&agent_socket_of(cluster, 1)?, target, "target", "underlay")
        .await?
        .map_err(|(status, answer)| anyhow::anyhow!("ADD of the target: {status} {answer}"))?;
    ensure!(
        second == first,
        "the target got {second}, the claim holds {first}"
    );
    ensure!(
        claim_status()?["ownerPod"]["name"] == target.name.as_str(),
        "the claim's owner moves to the target: {}",
        claim_status()?
    );
    // The source's DEL keeps the claim's address.
    let release = serde_json::to_value(ReleaseRequest {
        container_id: "source".to_owned(),
        ifname: "net1".to_owned(),
        pod: Some(source.clone()),
        network: Some("underlay".to_owned()),
    })?;
    let (status, answer) = call(&agent_socket_of(cluster, 0)?, RELEASE_PATH, release).await?;
    ensure!(status.is_success(), "DEL of the source: {status} {answer}");
    let claimed_endpoint = format!("{SELECTION_NAMESPACE}/{CLAIM}");
    let holders = |records: Vec<(String, Value)>| -> Vec<String> {
        records
            .into_iter()
            .filter(|(address, _)| *address == first)
            .map(|(_, record)| record["endpoint"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    ensure!(
        holders(pool_records(cluster)?) == vec![claimed_endpoint.clone()],
        "after the source's DEL the claim still holds {first}"
    );
    // Pods gone, then the claim: the address goes back.
    let api: Api<Pod> = Api::namespaced(cluster.client(), SELECTION_NAMESPACE);
    for pod in &pods {
        api.delete(&pod.name, &DeleteParams::default()).await?;
    }
    cluster.kubectl(&["delete", "ipamclaims", "-n", SELECTION_NAMESPACE, CLAIM])?;
    cluster
        .wait_for("the claim's address released", RELEASE_TIMEOUT, || async {
            let held = holders(pool_records(cluster).map_err(|error| error.to_string())?);
            if held.is_empty() {
                Ok(())
            } else {
                Err(format!("{first} held by {held:?}"))
            }
        })
        .await?;
    Ok(())
}

const STALE_NAMESPACE: &str = "e2e-stale";
/// How far the first agent's view of the apiserver lags.
const STALE_DELAY: Duration = Duration::from_secs(3);

/// Node 1's agent decides on a cache 3 s behind: its pod's address X is released through the
/// API and node 2's agent claims it; an ADD for the pod's new sandbox right after must not
/// answer X (the held record is re-asserted by a guarded write, which fails on the stale view).
async fn stale_cache(cluster: &mut Cluster) -> anyhow::Result<()> {
    // A Subnet of two addresses, one pool: both nodes' agents allocate from the same pool.
    let subnet = json!({
        "apiVersion": "virtnet.io/v1alpha1", "kind": "Subnet",
        "metadata": {"name": "tiny"},
        "spec": {"subnet": "10.6.0.0/16", "gateway": "10.6.0.1",
                 "ips": ["10.6.200.10-10.6.200.11"], "replicas": 1},
    });
    let namespace = json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": STALE_NAMESPACE,
                     "annotations": {"ipam.virtnet.io/default-subnet": "tiny"}},
    });
    for manifest in [subnet, namespace] {
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), manifest.to_string())?;
        cluster.kubectl(&["apply", "-f", &file.path().to_string_lossy()])?;
    }
    cluster
        .wait_for("IPPool tiny-0", SETTLE_TIMEOUT, || async {
            cluster
                .kubectl(&["get", "ippools.virtnet.io", "tiny-0"])
                .map_err(|error| error.to_string())
        })
        .await?;
    // Pods the first node's kubelet runs: they are in that agent's pod cache, so its ADD
    // decides without a fresh read of the pod.
    let nodes = cluster.node_names();
    ensure!(nodes.len() >= 2, "the scenario needs two nodes");
    let first_node = &nodes[0];
    let pods: Api<Pod> = Api::namespaced(cluster.client(), STALE_NAMESPACE);
    for name in ["holder", "other"] {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": "stale"}},
            "spec": {"nodeName": first_node,
                     "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]},
        }))?;
        pods.create(&PostParams::default(), &pod).await?;
    }
    let running = wait_for_ready_pods(cluster, STALE_NAMESPACE, "app=stale", 2).await?;
    let holder = running
        .iter()
        .find(|pod| pod.metadata.name.as_deref() == Some("holder"))
        .context("the holder pod")?;
    let holder_ref = PodRef {
        namespace: STALE_NAMESPACE.to_owned(),
        name: "holder".to_owned(),
        uid: holder.metadata.uid.clone(),
    };
    let endpoint = kubectl_json(
        cluster,
        &[
            "get",
            "endpoints.virtnet.io",
            "-n",
            STALE_NAMESPACE,
            "holder",
        ],
    )?;
    let address = endpoint["spec"]["interfaces"][0]["ipv4"]
        .as_str()
        .and_then(|value| value.split('/').next())
        .context("the holder's Endpoint records its address")?
        .to_owned();
    let sandbox = endpoint["spec"]["containerID"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    let agent = format!("virtnet-agent-{first_node}");
    cluster.proxy_apiserver_for(
        &agent,
        std::path::Path::new(env!("CARGO_BIN_EXE_virtnet-e2e")),
        &Faults {
            delay: STALE_DELAY,
            lose_answers_while: None,
        },
    )?;
    let first = agent_socket_of(cluster, 0)?;
    let second = agent_socket_of(cluster, 1)?;
    // Serving again (its caches synced through the proxy) once CHECK of the holder succeeds.
    let check = check_request(&holder_ref, &sandbox, NETWORK)?;
    cluster
        .wait_for("the delayed agent to serve", SETTLE_TIMEOUT, || async {
            match call(&first, CHECK_PATH, check.clone()).await {
                Ok((status, _)) if status.is_success() => Ok(()),
                Ok((status, answer)) => Err(format!("{status} {answer}")),
                Err(error) => Err(error.to_string()),
            }
        })
        .await?;

    // X goes back to the pool (as a controller's release would), and the second node's agent,
    // whose view is current, takes it: the only free address.
    cluster.kubectl(&[
        "patch",
        "ippools.virtnet.io",
        "tiny-0",
        "--subresource=status",
        "--type=merge",
        "-p",
        &json!({"status": {"allocations": {&address: null}}}).to_string(),
    ])?;
    let thief = unscheduled_pods_in(cluster, STALE_NAMESPACE, "thief", 1)
        .await?
        .remove(0);
    let (status, answer) = call(
        &second,
        ALLOCATE_PATH,
        add_request_in(&thief, "thief", "tiny")?,
    )
    .await?;
    ensure!(
        status.is_success(),
        "the second agent claims the released address: {status} {answer}"
    );
    let taken: AllocateResponse = serde_json::from_value(answer)?;
    let taken = taken
        .ips
        .first()
        .context("an address")?
        .address
        .addr()
        .to_string();
    ensure!(
        taken == address,
        "the only free address was {address}, the second agent got {taken}"
    );

    // Within the first agent's lag: the holder's new sandbox.
    let (status, answer) = call(
        &first,
        ALLOCATE_PATH,
        add_request_in(&holder_ref, "holder-new", "tiny")?,
    )
    .await?;
    if status.is_success() {
        let response: AllocateResponse = serde_json::from_value(answer)?;
        let given = response
            .ips
            .first()
            .context("an address")?
            .address
            .addr()
            .to_string();
        ensure!(
            given != address,
            "{address} was handed out twice: to the thief and to the holder's new sandbox"
        );
    }
    let holders: Vec<String> = pool_records(cluster)?
        .into_iter()
        .filter(|(held, _)| *held == address)
        .map(|(_, record)| record["endpoint"].as_str().unwrap_or_default().to_owned())
        .collect();
    ensure!(
        holders == vec![format!("{STALE_NAMESPACE}/thief-0")],
        "{address} is recorded for {holders:?}"
    );
    Ok(())
}
