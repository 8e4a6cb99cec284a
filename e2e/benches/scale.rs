//! One large Subnet on a real VirtNet cluster (`make bench`), each figure against a baseline
//! measured in the same run:
//! (a) a /16 (65 534 addresses, split into pools of at most 2048) filled to 90 % by 10 000 pods
//!     with 5 or 6 interfaces each (their Endpoints and pool records written through the API, as
//!     the agents write them): the single-ADD latency of `virtnet-ipam` there, and in an IPv6
//!     Subnet of 2^32 addresses, vs in an empty /24;
//! (b) the resident memory of the controller and of an agent with those 10 000 Endpoints, vs
//!     the same processes before any was written;
//! (c) the controller's time from a restart until it has reconciled every Endpoint, vs its time
//!     from a restart to its first reconcile of the empty cluster.
//!
//! The pods are bound to a node object no kubelet serves (`parked`), tolerate its taints and stay
//! Pending: the controller keeps a live pod's addresses, so nothing is released while the bench
//! runs. Needs root, the cluster tools (`make tools`) and the release build (`make bench` builds
//! it); skipped with a message otherwise. The cluster is named after `VIRTNET_E2E_CLUSTER`
//! (default `e2e`), first 7 characters plus `s`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use virtnet_e2e::bench::{
    self, Fallible, Netns, Plugin, apply, percentile, time_adds, virtnet_build,
};
use virtnet_e2e::cluster::{Cluster, ClusterOptions, is_pod_ready, sample_sum};

const NAMESPACE: &str = "scale";
const PARKED_NODE: &str = "parked";
const PODS: usize = 10_000;
/// The /16 and its share filled: 90 % of 65 534.
const FILL_SUBNET: &str = "fill";
const FILL_ADDRESSES: usize = 65_534 * 9 / 10;
const SMALL_SUBNET: &str = "small";
const WIDE_V6_SUBNET: &str = "wide6";
/// Requests in flight while the bench writes its objects.
const WRITERS: usize = 32;
const WARMUP: usize = 5;
const ROUNDS: usize = 100;
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(600);

fn main() -> Fallible<()> {
    let harness = env!("CARGO_BIN_EXE_virtnet-e2e");
    if let Some(reason) = bench::missing_prerequisite(Path::new(harness)) {
        eprintln!("scale bench skipped: {reason}");
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let mut options = ClusterOptions::new(bench::cluster_name('s'), harness);
    options.virtnet = Some(virtnet_build());
    let mut cluster = runtime.block_on(Cluster::up(options))?;
    let measured = runtime.block_on(measure(&mut cluster));
    if measured.is_err() {
        eprintln!("{}", cluster.dump_logs());
    }
    cluster.down()?;
    println!(
        "\nscale bench (release build; {PODS} pods, {FILL_ADDRESSES} of 65534 addresses held)"
    );
    for line in measured? {
        println!("  {line}");
    }
    Ok(())
}

async fn measure(cluster: &mut Cluster) -> Fallible<Vec<String>> {
    let mut lines = Vec::new();
    subnets(cluster).await?;
    let probe = probe_pod(cluster).await?;
    let empty_restart = restart_until_reconciled(cluster, 0).await?;
    let memory_before = resident_memory(cluster)?;

    let started = Instant::now();
    let pods = parked_pods(cluster).await?;
    let created = started.elapsed();
    let started = Instant::now();
    fill(cluster, &pods).await?;
    lines.push(format!(
        "setup: {PODS} pods in {:.1} s, their Endpoints and {FILL_ADDRESSES} pool records in \
         {:.1} s",
        created.as_secs_f64(),
        started.elapsed().as_secs_f64()
    ));
    let memory_after = resident_memory(cluster)?;
    for ((component, before), (_, after)) in memory_before.iter().zip(&memory_after) {
        lines.push(format!(
            "{component} resident memory with {PODS} Endpoints: {:.1} MiB; before any: {:.1} \
             MiB; ratio {:.2}",
            mib(*after),
            mib(*before),
            *after as f64 / *before as f64
        ));
    }
    let full_restart = restart_until_reconciled(cluster, PODS).await?;
    lines.push(format!(
        "controller restart until all {PODS} Endpoints are reconciled: {:.1} s; on the empty \
         cluster, until its first reconcile: {:.1} s; ratio {:.1}",
        full_restart.as_secs_f64(),
        empty_restart.as_secs_f64(),
        full_restart.as_secs_f64() / empty_restart.as_secs_f64()
    ));

    let node = cluster.node_names().into_iter().next().ok_or("no nodes")?;
    let netns = Netns::of_node(cluster, 1);
    let pod_args = bench::pod_args(&probe);
    let mut medians = Vec::new();
    for (label, subnet) in [
        ("empty /24", SMALL_SUBNET),
        ("/16 at 90 %", FILL_SUBNET),
        ("IPv6, 2^32 addresses", WIDE_V6_SUBNET),
    ] {
        let mut plugin = Plugin::virtnet_ipam(cluster, &node);
        plugin.config["ipam"]["default_subnet"] = json!(subnet);
        let mut samples = time_adds(&netns, &plugin, &pod_args, WARMUP, ROUNDS)?;
        samples.sort_unstable();
        let (p50, p99) = (percentile(&samples, 50), percentile(&samples, 99));
        medians.push(p50);
        lines.push(format!(
            "single ADD in {label:<21} p50 {:>7.2} ms  p99 {:>7.2} ms  p50 ratio to the /24 {:.2}",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            p50.as_secs_f64() / medians[0].as_secs_f64()
        ));
    }
    Ok(lines)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The /16, an empty /24 and a wide IPv6 Subnet; waits until every pool of each exists.
async fn subnets(cluster: &Cluster) -> Fallible<()> {
    for (name, cidr, gateway, ips) in [
        (
            FILL_SUBNET,
            "10.8.0.0/16",
            "10.8.0.1",
            "10.8.0.2-10.8.255.254",
        ),
        (
            SMALL_SUBNET,
            "10.9.0.0/24",
            "10.9.0.1",
            "10.9.0.2-10.9.0.254",
        ),
        (
            WIDE_V6_SUBNET,
            "fd00:8::/64",
            "fd00:8::1",
            "fd00:8::2-fd00:8::1:0:1",
        ),
    ] {
        apply(
            cluster,
            &json!({
                "apiVersion": "virtnet.io/v1alpha1", "kind": "Subnet", "metadata": {"name": name},
                "spec": {"subnet": cidr, "gateway": gateway, "ips": [ips], "replicas": 1},
            }),
        )?;
    }
    apply(
        cluster,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
    )?;
    cluster
        .wait_for("every Subnet Ready", Duration::from_secs(120), || async {
            let subnets: Value = serde_json::from_str(
                &cluster
                    .kubectl(&["get", "subnets.virtnet.io", "-o", "json"])
                    .map_err(|error| error.to_string())?,
            )
            .map_err(|error| error.to_string())?;
            let ready = subnets["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|subnet| subnet["status"]["conditions"][0]["status"] == "True")
                .count();
            if ready == 3 {
                Ok(())
            } else {
                Err(format!("{ready} of 3 Ready"))
            }
        })
        .await?;
    Ok(())
}

/// A host-network pod on the first node, Ready: the pod the timed ADDs are for (the kubelet
/// stand-in runs no CNI for it, so only the bench allocates for it).
async fn probe_pod(cluster: &Cluster) -> Fallible<Pod> {
    let node = cluster.node_names().into_iter().next().ok_or("no nodes")?;
    let pods: Api<Pod> = Api::namespaced(cluster.client(), NAMESPACE);
    let probe: Pod = serde_json::from_value(json!({
        "metadata": {"name": "probe"},
        "spec": {"hostNetwork": true, "nodeName": node,
                 "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]},
    }))?;
    pods.create(&PostParams::default(), &probe).await?;
    Ok(cluster
        .wait_for("the probe pod Ready", Duration::from_secs(90), || async {
            match pods.get("probe").await {
                Ok(pod) if is_pod_ready(&pod) => Ok(pod),
                Ok(_) => Err("not Ready".to_owned()),
                Err(error) => Err(error.to_string()),
            }
        })
        .await?)
}

/// [`PODS`] Pending pods on the node no kubelet serves, created [`WRITERS`] at a time.
async fn parked_pods(cluster: &Cluster) -> Fallible<Vec<Pod>> {
    let node: Node = serde_json::from_value(json!({"metadata": {"name": PARKED_NODE}}))?;
    Api::<Node>::all(cluster.client())
        .create(&PostParams::default(), &node)
        .await?;
    let api: Api<Pod> = Api::namespaced(cluster.client(), NAMESPACE);
    let forever = |key: &str| json!({"key": key, "operator": "Exists", "effect": "NoExecute"});
    futures::stream::iter(0..PODS)
        .map(|index| {
            let api = api.clone();
            let pod = json!({
                "metadata": {"name": format!("parked-{index:05}")},
                "spec": {
                    "nodeName": PARKED_NODE,
                    "tolerations": [forever("node.kubernetes.io/unreachable"),
                                    forever("node.kubernetes.io/not-ready")],
                    "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}],
                },
            });
            async move {
                let pod: Pod = serde_json::from_value(pod)?;
                Ok::<Pod, Box<dyn std::error::Error + Send + Sync>>(
                    api.create(&PostParams::default(), &pod).await?,
                )
            }
        })
        .buffer_unordered(WRITERS)
        .try_collect()
        .await
        .map_err(|error| error.to_string().into())
}

/// [`FILL_ADDRESSES`] addresses of the /16's pools, in pool order, with each pool's name.
async fn fill_addresses(cluster: &Cluster) -> Fallible<Vec<(String, Ipv4Addr)>> {
    let pools: Value = serde_json::from_str(&cluster.kubectl(&[
        "get",
        "ippools.virtnet.io",
        "-l",
        &format!("ipam.virtnet.io/subnet={FILL_SUBNET}"),
        "-o",
        "json",
    ])?)?;
    let mut addresses = Vec::new();
    for pool in pools["items"].as_array().into_iter().flatten() {
        let name = pool["metadata"]["name"].as_str().unwrap_or_default();
        for range in pool["spec"]["ips"].as_array().into_iter().flatten() {
            let range = range.as_str().unwrap_or_default();
            let (first, last) = range.split_once('-').unwrap_or((range, range));
            let (first, last): (Ipv4Addr, Ipv4Addr) = (first.parse()?, last.parse()?);
            addresses.extend(
                (u32::from(first)..=u32::from(last)).map(|a| (name.to_owned(), Ipv4Addr::from(a))),
            );
        }
    }
    let total = addresses.len();
    if total < FILL_ADDRESSES {
        return Err(format!("the {FILL_SUBNET} pools offer {total} addresses").into());
    }
    // Every pool 90 % full, not the first ones entirely: spread the fill evenly.
    let stride = total as f64 / FILL_ADDRESSES as f64;
    Ok((0..FILL_ADDRESSES)
        .map(|n| addresses[(n as f64 * stride) as usize].clone())
        .collect())
}

/// Gives every parked pod 5 or 6 interfaces' addresses of the /16, [`FILL_ADDRESSES`] in all:
/// the pool records first (one write per pool), then the Endpoints, as the agents write them.
async fn fill(cluster: &Cluster, pods: &[Pod]) -> Fallible<()> {
    let addresses = fill_addresses(cluster).await?;
    let mut interfaces: Vec<Vec<(String, String, Ipv4Addr)>> = vec![Vec::new(); pods.len()];
    for (n, (pool, address)) in addresses.into_iter().enumerate() {
        let holder = n % pods.len();
        let interface = match interfaces[holder].len() {
            0 => "eth0".to_owned(),
            other => format!("net{other}"),
        };
        interfaces[holder].push((interface, pool, address));
    }
    let mut records: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
    let mut endpoints = Vec::with_capacity(pods.len());
    for (pod, interfaces) in pods.iter().zip(&interfaces) {
        let (name, uid) = (pod.name_any(), pod.uid().unwrap_or_default());
        let container = format!("{:064}", endpoints.len());
        for (interface, pool, address) in interfaces {
            records.entry(pool.clone()).or_default().insert(
                address.to_string(),
                json!({"endpoint": format!("{NAMESPACE}/{name}"), "interface": interface,
                       "podUID": uid, "containerID": container, "node": PARKED_NODE}),
            );
        }
        endpoints.push(json!({
            "apiVersion": "virtnet.io/v1alpha1", "kind": "Endpoint",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {
                "interfaces": interfaces.iter().map(|(interface, pool, address)| json!({
                    "interface": interface, "ipv4": format!("{address}/16"), "ipv4Pool": pool,
                })).collect::<Vec<_>>(),
                "ownerKind": "Pod", "ownerName": name, "node": PARKED_NODE,
                "podUID": uid, "containerID": container,
            },
        }));
    }
    let pools: Api<DynamicObject> = Api::all_with(cluster.client(), &virtnet_kind("IPPool"));
    for (pool, allocations) in records {
        let patch = json!({"status": {"allocations": allocations}});
        pools
            .patch_status(&pool, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    let api: Api<DynamicObject> =
        Api::namespaced_with(cluster.client(), NAMESPACE, &virtnet_kind("Endpoint"));
    futures::stream::iter(endpoints)
        .map(|endpoint| {
            let api = api.clone();
            async move {
                let endpoint: DynamicObject = serde_json::from_value(endpoint)?;
                api.create(&PostParams::default(), &endpoint).await?;
                Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
            }
        })
        .buffer_unordered(WRITERS)
        .try_collect::<Vec<()>>()
        .await
        .map_err(|error| error.to_string())?;
    Ok(())
}

/// VirtNet's `kind` (plural: lowercase plus s), for writes without its Rust types.
fn virtnet_kind(kind: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("virtnet.io", "v1alpha1", kind),
        &format!("{}s", kind.to_lowercase()),
    )
}

/// Restarts the controller and returns the time until it has reconciled `endpoints` Endpoints
/// (`virtnet_reconciles_total{controller="endpoint"}`), or until its first reconcile of any kind
/// when `endpoints` is 0.
async fn restart_until_reconciled(cluster: &mut Cluster, endpoints: usize) -> Fallible<Duration> {
    cluster.restart("virtnet-controller")?;
    let restarted = Instant::now();
    let wanted = endpoints.max(1) as f64;
    cluster
        .wait_for(
            &format!("the restarted controller to reconcile {endpoints} Endpoints"),
            RECONCILE_TIMEOUT,
            || async {
                let metrics = cluster
                    .controller_metrics()
                    .map_err(|error| error.to_string())?;
                let counted = sample_sum(&metrics, "virtnet_reconciles_total{", |line| {
                    endpoints == 0 || line.contains("controller=\"endpoint\"")
                })
                .map_err(|error| error.to_string())?;
                if counted >= wanted {
                    Ok(())
                } else {
                    Err(format!("{counted} reconciles"))
                }
            },
        )
        .await?;
    Ok(restarted.elapsed())
}

/// VmRSS of the controller and of the first node's agent, in bytes.
fn resident_memory(cluster: &Cluster) -> Fallible<Vec<(String, u64)>> {
    let node = cluster.node_names().into_iter().next().ok_or("no nodes")?;
    let mut sizes = Vec::new();
    for component in [
        "virtnet-controller".to_owned(),
        format!("virtnet-agent-{node}"),
    ] {
        let pid_file = cluster.layout().pids.join(format!("{component}.pid"));
        // A pid file holds the pid, then the process's start time.
        let recorded = std::fs::read_to_string(&pid_file)?;
        let pid = recorded.split_whitespace().next().unwrap_or_default();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("no VmRSS for {component}"))?;
        sizes.push((component, kib * 1024));
    }
    Ok(sizes)
}
