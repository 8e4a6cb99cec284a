//! The agent's figures on a real VirtNet cluster (`make bench`), each against a baseline measured
//! in the same run:
//! (a) single ADD latency (p50/p99) of the real `virtnet-ipam` binary against the real agent and
//!     apiserver, vs host-local's ADD (a file lock and a file: the floor of any IPAM without an
//!     API server) and whereabouts' (the Kubernetes-backed peer: its CRDs come from the Go
//!     module cache `make tools` filled; left out with a message when they are not there), each
//!     run by this process from inside a node's netns, as a runtime would;
//! (b) 200 pods created at once across 3 nodes: time until all are Ready, with group commit on
//!     and off (a cluster each, the agents started with `VIRTNET_GROUP_COMMIT`).
//!
//! Needs root and the cluster tools (`make tools`) and the release build (`make bench` builds it);
//! skipped with a message otherwise. The cluster is named after `VIRTNET_E2E_CLUSTER` (default
//! `e2e`), first 7 characters plus `b`.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use serde_json::{Value, json};
use virtnet_e2e::bench::{
    self, Fallible, NAMESPACE, Netns, Plugin, apply, bench_subnet, commit_counters, percentile,
    time_adds, virtnet_build,
};
use virtnet_e2e::cluster::{Cluster, ClusterOptions, is_pod_ready};

const WARMUP: usize = 5;
const ROUNDS: usize = 100;
const BURST: usize = 200;
const BURST_TIMEOUT: Duration = Duration::from_secs(600);

fn main() -> Fallible<()> {
    let harness = env!("CARGO_BIN_EXE_virtnet-e2e");
    if let Some(reason) = bench::missing_prerequisite(Path::new(harness)) {
        eprintln!("agent bench skipped: {reason}");
        return Ok(());
    }
    let name = bench::cluster_name('b');
    let runtime = tokio::runtime::Runtime::new()?;
    let mut report = Vec::new();
    for group_commit in [true, false] {
        let mut options = ClusterOptions::new(name.clone(), harness);
        let mut virtnet = virtnet_build();
        virtnet
            .agent_env
            .push(("VIRTNET_GROUP_COMMIT".into(), group_commit.to_string()));
        options.virtnet = Some(virtnet);
        let cluster = runtime.block_on(Cluster::up(options))?;
        let measured = runtime.block_on(measure(&cluster, group_commit));
        if measured.is_err() {
            eprintln!("{}", cluster.dump_logs());
        }
        cluster.down()?;
        report.extend(measured?);
    }
    println!("\nagent bench ({ROUNDS} ADDs after {WARMUP} warm-up; {BURST}-pod burst on 3 nodes)");
    for line in report {
        println!("  {line}");
    }
    Ok(())
}

async fn measure(cluster: &Cluster, group_commit: bool) -> Fallible<Vec<String>> {
    bench_subnet(cluster, "10.6.160.1-10.6.160.250").await?;
    let mut lines = Vec::new();
    if group_commit {
        lines.extend(add_latency(cluster).await?);
    }
    let before = commit_counters(cluster)?;
    let burst = burst(cluster).await?;
    let counted = commit_counters(cluster)?.since(before);
    let mode = if group_commit { "on " } else { "off" };
    lines.push(format!(
        "{BURST} pods at once, group commit {mode}: all Ready after {:.1} s; {:.0} ADDs in {:.0} \
         commits ({:.1} per commit), {:.0} conflicting pool writes",
        burst.as_secs_f64(),
        counted.adds,
        counted.commits,
        counted.adds / counted.commits.max(1.0),
        counted.conflicts,
    ));
    Ok(lines)
}

async fn wait_ready(cluster: &Cluster, selector: &str, count: usize) -> Fallible<()> {
    let pods: Api<Pod> = Api::namespaced(cluster.client(), NAMESPACE);
    let params = ListParams::default().labels(selector);
    let started = Instant::now();
    loop {
        let ready = pods
            .list(&params)
            .await?
            .items
            .iter()
            .filter(|pod| is_pod_ready(pod))
            .count();
        if ready == count {
            return Ok(());
        }
        if started.elapsed() > BURST_TIMEOUT {
            return Err(format!("only {ready} of {count} pods {selector} Ready").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn deployment(name: &str, replicas: usize, host_network: bool, node: Option<&str>) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "hostNetwork": host_network,
                    "nodeName": node,
                    "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}],
                },
            },
        },
    })
}

/// (b): the time from creating a 200-replica Deployment until every pod is Ready.
async fn burst(cluster: &Cluster) -> Fallible<Duration> {
    let started = Instant::now();
    apply(cluster, &deployment("burst", BURST, false, None))?;
    wait_ready(cluster, "app=burst", BURST).await?;
    Ok(started.elapsed())
}

/// (a): ADD latency of virtnet-ipam and of host-local, ADD then DEL, for one host-network pod
/// (the kubelet stand-in runs no CNI for it, so only this bench allocates for it).
async fn add_latency(cluster: &Cluster) -> Fallible<Vec<String>> {
    let node = cluster.node_names().into_iter().next().ok_or("no nodes")?;
    apply(cluster, &deployment("probe", 1, true, Some(&node)))?;
    wait_ready(cluster, "app=probe", 1).await?;
    let pods: Api<Pod> = Api::namespaced(cluster.client(), NAMESPACE);
    let probe = pods
        .list(&ListParams::default().labels("app=probe"))
        .await?
        .items
        .into_iter()
        .next()
        .ok_or("no probe pod")?;
    let pod_args = bench::pod_args(&probe);
    let host_local_data = tempfile::tempdir()?;
    let mut plugins = vec![
        ("virtnet-ipam", Plugin::virtnet_ipam(cluster, &node)),
        (
            "host-local",
            Plugin::host_local(
                host_local_data.path(),
                "10.6.190.1".parse()?,
                "10.6.190.250".parse()?,
            ),
        ),
    ];
    let mut lines = Vec::new();
    match Plugin::whereabouts(cluster, json!({"range": "10.6.200.0/24"})).await {
        Ok(plugin) => plugins.push(("whereabouts", plugin)),
        Err(reason) => lines.push(format!("whereabouts left out: {reason}")),
    }
    let netns = Netns::of_node(cluster, 1);
    let mut medians = Vec::new();
    for (label, plugin) in &plugins {
        let mut samples = match time_adds(&netns, plugin, &pod_args, WARMUP, ROUNDS) {
            Ok(samples) => samples,
            // The peer is optional; VirtNet's own figures and the floor are not.
            Err(error) if *label == "whereabouts" => {
                lines.push(format!("whereabouts left out: {error}"));
                continue;
            }
            Err(error) => return Err(error),
        };
        samples.sort_unstable();
        let p50 = percentile(&samples, 50);
        let p99 = percentile(&samples, 99);
        medians.push((label, p50));
        lines.push(format!(
            "single ADD {label:<13} p50 {:>7.2} ms  p99 {:>7.2} ms",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        ));
    }
    if let Some(((_, virtnet), baselines)) = medians.split_first() {
        for (label, p50) in baselines {
            lines.push(format!(
                "single ADD p50 ratio virtnet-ipam / {label} = {:.2}",
                virtnet.as_secs_f64() / p50.as_secs_f64()
            ));
        }
    }
    Ok(lines)
}
