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
//! Needs root and the cluster tools (`make tools`) and the built binaries (`cargo build
//! --workspace --bins`); skipped with a message otherwise. The cluster is named after
//! `VIRTNET_E2E_CLUSTER` (default `e2e`), first 7 characters plus `b`.

use std::error::Error;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use serde_json::{Value, json};
use virtnet_cni::trusted::TRUSTED_DIRS_ENV;
use virtnet_e2e::cluster::{
    Cluster, ClusterOptions, DEFAULT_STATE_PARENT, VirtnetOptions, apiserver_url, default_bin_dir,
    is_pod_ready,
};
use virtnet_e2e::netns::{named_netns_path, run_in_netns};

const WARMUP: usize = 5;
const ROUNDS: usize = 100;
const BURST: usize = 200;
const BURST_TIMEOUT: Duration = Duration::from_secs(600);

type Fallible<T> = Result<T, Box<dyn Error>>;

fn main() -> Fallible<()> {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("agent bench skipped: needs root (network namespaces); run `make bench` as root");
        return Ok(());
    }
    let name: String = std::env::var("VIRTNET_E2E_CLUSTER")
        .unwrap_or_else(|_| "e2e".to_owned())
        .chars()
        .take(7)
        .chain(['b'])
        .collect();
    let probe = ClusterOptions::new(name.clone(), env!("CARGO_BIN_EXE_virtnet-e2e"));
    if let Some(missing) = probe.missing_prerequisite() {
        eprintln!("agent bench skipped: {missing}; run `make tools`");
        return Ok(());
    }
    if let Some(missing) = VirtnetOptions::from_workspace().missing() {
        eprintln!(
            "agent bench skipped: {} is not built; run `cargo build --workspace --bins`",
            missing.display()
        );
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let mut report = Vec::new();
    for group_commit in [true, false] {
        let mut options = ClusterOptions::new(name.clone(), env!("CARGO_BIN_EXE_virtnet-e2e"));
        let mut virtnet = VirtnetOptions::from_workspace();
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
    prepare(cluster).await?;
    let mut lines = Vec::new();
    if group_commit {
        lines.extend(add_latency(cluster).await?);
    }
    let before = commit_counters(cluster)?;
    let burst = burst(cluster).await?;
    let after = commit_counters(cluster)?;
    let mode = if group_commit { "on " } else { "off" };
    let commits = after.commits - before.commits;
    lines.push(format!(
        "{BURST} pods at once, group commit {mode}: all Ready after {:.1} s; {:.0} ADDs in {commits:.0} \
         commits ({:.1} per commit), {:.0} conflicting pool writes",
        burst.as_secs_f64(),
        after.adds - before.adds,
        (after.adds - before.adds) / commits.max(1.0),
        after.conflicts - before.conflicts,
    ));
    Ok(lines)
}

fn apply(cluster: &Cluster, manifest: &Value) -> Fallible<()> {
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), manifest.to_string())?;
    cluster.kubectl(&["apply", "-f", &file.path().to_string_lossy()])?;
    Ok(())
}

/// A 250-address Subnet in 3 pools, the default of namespace `bench`, and the example Subnet,
/// which the nodes' conflist names.
async fn prepare(cluster: &Cluster) -> Fallible<()> {
    let example = VirtnetOptions::from_workspace()
        .repo
        .join("examples/statefulset/subnet.yaml");
    cluster.kubectl(&["apply", "-f", &example.to_string_lossy()])?;
    apply(
        cluster,
        &json!({
            "apiVersion": "virtnet.io/v1alpha1", "kind": "Subnet", "metadata": {"name": "bench"},
            "spec": {"subnet": "10.6.0.0/16", "gateway": "10.6.0.1",
                     "ips": ["10.6.160.1-10.6.160.250"], "replicas": 3},
        }),
    )?;
    apply(
        cluster,
        &json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "bench", "annotations": {"ipam.virtnet.io/default-subnet": "bench"}},
        }),
    )?;
    cluster
        .wait_for(
            "the bench Subnet's 3 IPPools",
            Duration::from_secs(90),
            || async {
                let pools = cluster
                    .kubectl(&["get", "ippools.virtnet.io", "-o", "name"])
                    .map_err(|error| error.to_string())?;
                let count = pools
                    .lines()
                    .filter(|line| line.contains("/bench-"))
                    .count();
                if count == 3 {
                    Ok(())
                } else {
                    Err(format!("{count} pools"))
                }
            },
        )
        .await?;
    Ok(())
}

async fn wait_ready(cluster: &Cluster, selector: &str, count: usize) -> Fallible<()> {
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "bench");
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
        "metadata": {"name": name, "namespace": "bench"},
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

/// The agents' group-commit counters, summed over the nodes (from their `/metrics`).
#[derive(Default)]
struct CommitCounters {
    adds: f64,
    commits: f64,
    conflicts: f64,
}

fn commit_counters(cluster: &Cluster) -> Fallible<CommitCounters> {
    let mut counters = CommitCounters::default();
    for index in 1..=cluster.node_names().len() {
        let netns = named_netns_path(&cluster.names().node_netns(index));
        let text = run_in_netns(netns, || -> std::io::Result<String> {
            let mut stream = std::net::TcpStream::connect("127.0.0.1:9741")?;
            stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")?;
            let mut text = String::new();
            std::io::Read::read_to_string(&mut stream, &mut text)?;
            Ok(text)
        })??;
        let value = |series: &str| -> f64 {
            text.lines()
                .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
                .unwrap_or_default()
        };
        counters.adds += value("virtnet_ipam_commit_batch_size_sum ");
        counters.commits += value("virtnet_ipam_commit_batch_size_count ");
        counters.conflicts += value("virtnet_ipam_claim_conflicts_total ");
    }
    Ok(counters)
}

/// One plugin binary and what it is given.
#[derive(Clone)]
struct Plugin {
    binary: PathBuf,
    config: Value,
}

/// (a): ADD latency of virtnet-ipam and of host-local, ADD then DEL, for one host-network pod
/// (the kubelet stand-in runs no CNI for it, so only this bench allocates for it).
async fn add_latency(cluster: &Cluster) -> Fallible<Vec<String>> {
    let node = cluster.node_names().into_iter().next().ok_or("no nodes")?;
    apply(cluster, &deployment("probe", 1, true, Some(&node)))?;
    wait_ready(cluster, "app=probe", 1).await?;
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "bench");
    let probe = pods
        .list(&ListParams::default().labels("app=probe"))
        .await?
        .items
        .into_iter()
        .next()
        .ok_or("no probe pod")?;
    let pod_args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={};K8S_POD_UID={}",
        probe.metadata.name.unwrap_or_default(),
        probe.metadata.uid.unwrap_or_default()
    );
    let dirs = cluster.layout().node_dirs(&node);
    let host_local_data = tempfile::tempdir()?;
    let plugins = [
        (
            "virtnet-ipam",
            Plugin {
                binary: VirtnetOptions::from_workspace()
                    .binaries
                    .join("virtnet-ipam"),
                config: json!({
                    "cniVersion": "1.0.0", "name": "bench", "type": "macvlan",
                    "ipam": {"type": "virtnet-ipam", "default_subnet": "bench",
                             "agent_socket": dirs.agent_run.join("agent.sock")},
                }),
            },
        ),
        (
            "host-local",
            Plugin {
                binary: default_bin_dir().join("host-local"),
                config: json!({
                    "cniVersion": "1.0.0", "name": "bench", "type": "macvlan",
                    "ipam": {"type": "host-local", "dataDir": host_local_data.path(),
                             "ranges": [[{"subnet": "10.6.0.0/16", "rangeStart": "10.6.190.1",
                                          "rangeEnd": "10.6.190.250", "gateway": "10.6.0.1"}]]},
                }),
            },
        ),
    ];
    let mut plugins = plugins.to_vec();
    let mut lines = Vec::new();
    match whereabouts(cluster).await {
        Ok(plugin) => plugins.push(("whereabouts", plugin)),
        Err(reason) => lines.push(format!("whereabouts left out: {reason}")),
    }
    let netns = Netns {
        node: PathBuf::from("/var/run/netns").join(cluster.names().node_netns(1)),
        // IPAM plugins never enter CNI_NETNS, but host-local insists it is not their own.
        container: PathBuf::from("/var/run/netns").join(cluster.names().control_plane_netns()),
    };
    let mut medians = Vec::new();
    for (label, plugin) in &plugins {
        let mut samples = match time_adds(&netns, plugin, &pod_args) {
            Ok(samples) => samples,
            // The peer is optional; VirtNet's own figures and the floor are not.
            Err(error) if *label == "whereabouts" => {
                lines.push(format!("whereabouts left out: {error}"));
                continue;
            }
            Err(error) => return Err(error),
        };
        samples.sort_unstable();
        let p50 = samples[samples.len() / 2];
        let p99 = samples[(samples.len() - 1) * 99 / 100];
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

/// whereabouts with its CRDs installed and a kubeconfig that reaches the apiserver from a node's
/// netns, or why not.
async fn whereabouts(cluster: &Cluster) -> Fallible<Plugin> {
    let binary = default_bin_dir().join("whereabouts");
    if !binary.is_file() {
        return Err(format!("no {}; run `make tools`", binary.display()).into());
    }
    let cache = Command::new("go")
        .args(["env", "GOMODCACHE"])
        .output()
        .ok()
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
        .filter(|path| path.is_dir())
        .ok_or("no Go module cache (`go env GOMODCACHE`) with whereabouts' CRDs")?;
    let crds = std::fs::read_dir(cache.join("github.com/k8snetworkplumbingwg"))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("whereabouts@"))
        })
        .max()
        .map(|source| source.join("doc/crds"))
        .ok_or("whereabouts' sources are not in the Go module cache")?;
    for crd in ["ippools", "overlappingrangeipreservations"] {
        let file = crds.join(format!("whereabouts.cni.cncf.io_{crd}.yaml"));
        cluster.kubectl(&["apply", "-f", &file.to_string_lossy()])?;
    }
    cluster.kubectl(&[
        "wait",
        "--for",
        "condition=established",
        "--timeout=60s",
        "crd/ippools.whereabouts.cni.cncf.io",
        "crd/overlappingrangeipreservations.whereabouts.cni.cncf.io",
    ])?;
    // The admin identity, but the apiserver's address inside the cluster's network.
    let mut kubeconfig: Value =
        serde_json::from_str(&std::fs::read_to_string(cluster.kubeconfig())?)?;
    kubeconfig["clusters"][0]["cluster"]["server"] = json!(apiserver_url());
    let path = cluster.layout().root.join("bench-whereabouts.kubeconfig");
    std::fs::write(&path, kubeconfig.to_string())?;
    // whereabouts insists on its flat configuration file (its DaemonSet writes one per node).
    let flat = cluster.layout().root.join("bench-whereabouts.conf");
    std::fs::write(
        &flat,
        json!({"datastore": "kubernetes", "kubernetes": {"kubeconfig": path}}).to_string(),
    )?;
    Ok(Plugin {
        binary,
        config: json!({
            "cniVersion": "0.3.1", "name": "bench", "type": "macvlan",
            "ipam": {"type": "whereabouts", "range": "10.6.200.0/24",
                     "configuration_path": flat, "kubernetes": {"kubeconfig": path},
                     "log_level": "error"},
        }),
    })
}

/// The netns the plugins run in, and the one they are told is the container's.
#[derive(Clone)]
struct Netns {
    node: PathBuf,
    container: PathBuf,
}

/// Runs ADD (timed) then DEL (not timed) `WARMUP + ROUNDS` times, each with its own container
/// id, from a thread that entered the node's netns (so the children start there, as under a
/// runtime on that node).
fn time_adds(netns: &Netns, plugin: &Plugin, pod_args: &str) -> Fallible<Vec<Duration>> {
    let container = netns.container.clone();
    let binary = plugin.binary.clone();
    let config = plugin.config.to_string();
    let pod_args = pod_args.to_owned();
    let samples = run_in_netns(
        netns.node.clone(),
        move || -> std::io::Result<Vec<Duration>> {
            let mut samples = Vec::with_capacity(ROUNDS);
            for round in 0..WARMUP + ROUNDS {
                let id = format!("bench{round:059}");
                let started = Instant::now();
                run_plugin(&binary, "ADD", &id, &pod_args, &config, &container)?;
                let elapsed = started.elapsed();
                run_plugin(&binary, "DEL", &id, &pod_args, &config, &container)?;
                if round >= WARMUP {
                    samples.push(elapsed);
                }
            }
            Ok(samples)
        },
    )??;
    Ok(samples)
}

fn run_plugin(
    binary: &Path,
    command: &str,
    container: &str,
    pod_args: &str,
    config: &str,
    netns: &Path,
) -> std::io::Result<()> {
    let mut child = Command::new(binary)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", pod_args)
        .env("CNI_PATH", binary.parent().unwrap_or(Path::new("/")))
        // The nodes keep their agent sockets under the harness's state directory.
        .env(TRUSTED_DIRS_ENV, DEFAULT_STATE_PARENT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| std::io::Error::other(format!("{}: {error}", binary.display())))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(config.as_bytes())?;
    }
    let output = child.wait_with_output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "{} {command} failed: {}{}",
            binary.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )))
    }
}
