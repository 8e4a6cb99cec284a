//! Contention (`make bench`): 1000 ADDs into exactly 1000 addresses, spread over the nodes of a
//! VirtNet cluster (3, then 10), for virtnet-ipam (through each node's agent and the apiserver),
//! whereabouts (the Kubernetes-backed peer: one cluster-wide lock) and host-local (each node its
//! share of the range in files: the floor of any IPAM without an API server), measured in the
//! same run. Then a DEL of every container, and what each left allocated.
//!
//! The ADDs are the plugin binaries run as a runtime runs them, [`IN_FLIGHT_PER_NODE`] at a time
//! from each node's netns, for 1000 host-network pods bound to the nodes beforehand (the agent
//! and whereabouts look the pod up; a host-network pod gets no CNI call from the kubelet
//! stand-in, so only this bench allocates for it). Creating 1000 pods through a Deployment would
//! time the ReplicaSet controller's rate limit instead of the IPAM.
//!
//! Each phase is capped at [`PHASE_CAP`]: what has not finished by then is killed and reported as
//! unfinished, never waited for. The node counts are `VIRTNET_BENCH_NODES` (e.g. `3`), default
//! `3,10`; the cluster is named after `VIRTNET_E2E_CLUSTER`, first 7 characters plus `c`.
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use virtnet_e2e::bench::{
    self, ApiWrites, CommitCounters, Fallible, NAMESPACE, NETWORK, Netns, Plugin, Writes,
    bench_subnet, commit_counters, nth_address, percentile, result_addresses, virtnet_build,
};
use virtnet_e2e::cluster::{Cluster, ClusterOptions, is_pod_ready};
use virtnet_e2e::netns::run_in_netns;

const PODS: usize = 1000;
/// ADDs (or DELs) one node's runtime has running at once.
const IN_FLIGHT_PER_NODE: usize = 8;
const PHASE_CAP: Duration = Duration::from_secs(300);
const PODS_READY_TIMEOUT: Duration = Duration::from_secs(600);
/// Where each IPAM's 1000 addresses start (10.6.0.0/16): apart, so no result is mistaken for
/// another plugin's.
const VIRTNET_FIRST: Ipv4Addr = Ipv4Addr::new(10, 6, 160, 1);
const HOST_LOCAL_FIRST: Ipv4Addr = Ipv4Addr::new(10, 6, 180, 1);
const WHEREABOUTS_FIRST: Ipv4Addr = Ipv4Addr::new(10, 6, 200, 1);
/// How long the apiserver's background lease writes (node heartbeats, leader elections) are
/// counted before whereabouts runs, to tell its lock's lease writes from theirs.
const QUIET: Duration = Duration::from_secs(15);
const LABEL: &str = "app=contention";

fn main() -> Fallible<()> {
    let harness = env!("CARGO_BIN_EXE_virtnet-e2e");
    if let Some(reason) = bench::missing_prerequisite(Path::new(harness)) {
        eprintln!("contention bench skipped: {reason}");
        return Ok(());
    }
    let node_counts: Vec<usize> = std::env::var("VIRTNET_BENCH_NODES")
        .unwrap_or_else(|_| "3,10".to_owned())
        .split(',')
        .map(|count| count.trim().parse())
        .collect::<Result<_, _>>()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let mut report = Vec::new();
    for nodes in node_counts {
        let mut options = ClusterOptions::new(bench::cluster_name('c'), harness);
        options.nodes = nodes;
        options.virtnet = Some(virtnet_build());
        let cluster = runtime.block_on(Cluster::up(options))?;
        let measured = runtime.block_on(measure(&cluster));
        if measured.is_err() {
            eprintln!("{}", cluster.dump_logs());
        }
        cluster.down()?;
        report.extend(measured?);
    }
    println!(
        "\ncontention bench ({PODS} ADDs into {PODS} addresses, {IN_FLIGHT_PER_NODE} in flight per \
         node, each phase capped at {} s)",
        PHASE_CAP.as_secs()
    );
    for line in report {
        println!("  {line}");
    }
    Ok(())
}

/// One pod's container: what every plugin's ADD and DEL of it is given.
#[derive(Clone)]
struct Job {
    /// 0-based index of the node it runs on.
    node: usize,
    container: String,
    pod_args: String,
}

async fn measure(cluster: &Cluster) -> Fallible<Vec<String>> {
    let nodes = cluster.node_names();
    let last = |first| nth_address(first, PODS - 1);
    bench_subnet(cluster, &format!("{VIRTNET_FIRST}-{}", last(VIRTNET_FIRST))).await?;
    let jobs = create_pods(cluster, &nodes).await?;
    let mut results = Vec::new();

    // Each node's range exactly its share of the pods: 1000 addresses in all, as for the others.
    let data = tempfile::tempdir()?;
    let mut first = HOST_LOCAL_FIRST;
    let host_local: Vec<Plugin> = (0..nodes.len())
        .map(|node| {
            let share = jobs.iter().filter(|job| job.node == node).count();
            let plugin = Plugin::host_local(
                &data.path().join(&nodes[node]),
                first,
                nth_address(first, share - 1),
            );
            first = nth_address(first, share);
            plugin
        })
        .collect();
    let mut measured = run(cluster, "host-local", &host_local, &jobs).await?;
    measured.left = host_local_files(data.path())?;
    results.push(measured);

    let virtnet: Vec<Plugin> = nodes
        .iter()
        .map(|node| Plugin::virtnet_ipam(cluster, node))
        .collect();
    let commits = commit_counters(cluster)?;
    let mut measured = run(cluster, "virtnet-ipam", &virtnet, &jobs).await?;
    measured.commits = Some(commit_counters(cluster)?.since(commits));
    measured.left = bench::virtnet_records(cluster)?;
    results.push(measured);

    let range = json!({"range": bench::BENCH_CIDR, "range_start": WHEREABOUTS_FIRST,
                       "range_end": last(WHEREABOUTS_FIRST)});
    match Plugin::whereabouts(cluster, range).await {
        Ok(plugin) => {
            let quiet = ApiWrites::read(cluster).await?;
            tokio::time::sleep(QUIET).await;
            let background = ApiWrites::read(cluster)
                .await?
                .since(&quiet, "coordination.k8s.io", Some("leases"))
                .get("leases")
                .map_or(0.0, |leases| leases.total);
            let plugins = vec![plugin; nodes.len()];
            let mut measured = run(cluster, "whereabouts", &plugins, &jobs).await?;
            measured.left = whereabouts_allocations(cluster)?;
            // Its lock is a Lease: what the cluster writes to leases anyway is not whereabouts'.
            if let Some(leases) = measured.writes.get_mut("leases") {
                leases.total -= background / QUIET.as_secs_f64() * measured.add.wall.as_secs_f64();
            }
            results.push(measured);
        }
        Err(reason) => eprintln!("whereabouts left out: {reason}"),
    }
    Ok(report(nodes.len(), &results))
}

/// `PODS` host-network pods bound round-robin to `nodes`, created at once and Ready.
async fn create_pods(cluster: &Cluster, nodes: &[String]) -> Fallible<Vec<Job>> {
    let api: Api<Pod> = Api::namespaced(cluster.client(), NAMESPACE);
    futures::stream::iter(0..PODS)
        .map(|index| {
            let api = api.clone();
            let pod = json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("contention-{index:04}"), "namespace": NAMESPACE,
                             "labels": {"app": "contention"}},
                "spec": {"hostNetwork": true, "nodeName": nodes[index % nodes.len()],
                         "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]},
            });
            async move {
                let pod: Pod = serde_json::from_value(pod)?;
                api.create(&PostParams::default(), &pod).await?;
                Fallible::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    let pods = cluster
        .wait_for(
            &format!("{PODS} contention pods Ready"),
            PODS_READY_TIMEOUT,
            || async {
                let pods = api
                    .list(&ListParams::default().labels(LABEL))
                    .await
                    .map_err(|error| error.to_string())?
                    .items;
                let ready = pods.iter().filter(|pod| is_pod_ready(pod)).count();
                if ready == PODS {
                    Ok(pods)
                } else {
                    Err(format!("{ready} Ready"))
                }
            },
        )
        .await?;
    let node_index: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(index, name)| (name.as_str(), index))
        .collect();
    Ok(pods
        .iter()
        .enumerate()
        .map(|(index, pod)| Job {
            node: pod
                .spec
                .as_ref()
                .and_then(|spec| spec.node_name.as_deref())
                .and_then(|name| node_index.get(name).copied())
                .unwrap_or_default(),
            container: format!("contention{index:054}"),
            pod_args: bench::pod_args(pod),
        })
        .collect())
}

/// How one CNI command went for one container.
enum Outcome {
    Done {
        elapsed: Duration,
        stdout: Vec<u8>,
    },
    Refused {
        message: String,
    },
    /// Not started, or killed, when the phase's cap was reached.
    Unfinished,
}

/// Every container's outcome of one phase, and how long the phase took.
struct Phase {
    outcomes: Vec<Outcome>,
    wall: Duration,
}

impl Phase {
    fn latencies(&self) -> Vec<Duration> {
        let mut latencies: Vec<Duration> = self
            .outcomes
            .iter()
            .filter_map(|outcome| match outcome {
                Outcome::Done { elapsed, .. } => Some(*elapsed),
                _ => None,
            })
            .collect();
        latencies.sort_unstable();
        latencies
    }

    fn refusals(&self) -> Vec<&str> {
        self.outcomes
            .iter()
            .filter_map(|outcome| match outcome {
                Outcome::Refused { message } => Some(message.as_str()),
                _ => None,
            })
            .collect()
    }

    fn unfinished(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|outcome| matches!(outcome, Outcome::Unfinished))
            .count()
    }

    fn summary(&self, command: &str) -> String {
        let latencies = self.latencies();
        let mut summary = format!(
            "{} {command}s in {:.1} s ({:.1}/s), p50 {:.0} ms, p99 {:.0} ms, {} failed",
            latencies.len(),
            self.wall.as_secs_f64(),
            latencies.len() as f64 / self.wall.as_secs_f64(),
            percentile(&latencies, 50).as_secs_f64() * 1e3,
            percentile(&latencies, 99).as_secs_f64() * 1e3,
            self.refusals().len(),
        );
        // By kind: the message up to its first path or parenthesis, which name the node or pool
        // (the first full message of each kind follows its count).
        let mut kinds: BTreeMap<String, (usize, String)> = BTreeMap::new();
        for refusal in self.refusals() {
            let message = cni_error(refusal);
            let kind = message.split(['/', '(']).next().unwrap_or_default().trim();
            kinds
                .entry(kind.to_owned())
                .or_insert((0, message.clone()))
                .0 += 1;
        }
        for (count, first) in kinds.values() {
            summary.push_str(&format!(" [{count}x: {first}]"));
        }
        if self.unfinished() > 0 {
            summary.push_str(&format!(
                "; did not finish in {} s: {} not done",
                PHASE_CAP.as_secs(),
                self.unfinished()
            ));
        }
        summary
    }
}

/// The `msg` of the CNI error a refusal's output starts with (the plugins' logs follow it), or
/// the start of the output when there is none.
fn cni_error(refusal: &str) -> String {
    let error = refusal.find('{').and_then(|start| {
        let mut values = serde_json::Deserializer::from_str(&refusal[start..]).into_iter::<Value>();
        values.next()?.ok()?["msg"].as_str().map(str::to_owned)
    });
    error.unwrap_or_else(|| refusal.chars().take(200).collect())
}

/// One plugin's ADD and DEL phases and what they cost.
struct Run {
    label: &'static str,
    add: Phase,
    del: Phase,
    /// The plugin's API writes during the ADD phase, by resource.
    writes: BTreeMap<String, Writes>,
    commits: Option<CommitCounters>,
    /// Addresses still allocated after every DEL.
    left: usize,
}

/// The ADD phase, then the DEL phase, of `plugins` (one per node) for every job; the API writes
/// counted are those to the groups only this plugin writes to.
async fn run(
    cluster: &Cluster,
    label: &'static str,
    plugins: &[Plugin],
    jobs: &[Job],
) -> Fallible<Run> {
    let before = ApiWrites::read(cluster).await?;
    let add = phase(cluster, plugins, jobs, "ADD")?;
    let after = ApiWrites::read(cluster).await?;
    let writes = match label {
        "virtnet-ipam" => after.since(&before, "virtnet.io", None),
        "whereabouts" => {
            let mut writes = after.since(&before, "whereabouts.cni.cncf.io", None);
            writes.extend(after.since(&before, "coordination.k8s.io", Some("leases")));
            writes
        }
        _ => BTreeMap::new(),
    };
    let del = phase(cluster, plugins, jobs, "DEL")?;
    Ok(Run {
        label,
        add,
        del,
        writes,
        commits: None,
        left: 0,
    })
}

/// Runs `command` for every job, each node's jobs from a thread in that node's netns with
/// `IN_FLIGHT_PER_NODE` children at a time, all nodes at once, until done or `PHASE_CAP`.
fn phase(cluster: &Cluster, plugins: &[Plugin], jobs: &[Job], command: &str) -> Fallible<Phase> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started + PHASE_CAP);
    let workers: Vec<_> = plugins
        .iter()
        .enumerate()
        .map(|(node, plugin)| {
            let netns = Netns::of_node(cluster, node + 1);
            let plugin = plugin.clone();
            let command = command.to_owned();
            let mine: Vec<(usize, Job)> = jobs
                .iter()
                .cloned()
                .enumerate()
                .filter(|(_, job)| job.node == node)
                .collect();
            std::thread::spawn(move || {
                run_in_netns(netns.node.clone(), move || {
                    // A runtime of this thread's own: the children must start in its netns.
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    Ok::<_, std::io::Error>(
                        runtime.block_on(
                            futures::stream::iter(mine)
                                .map(|(index, job)| {
                                    let (plugin, command, netns) = (&plugin, &command, &netns);
                                    async move {
                                        let outcome =
                                            run_one(plugin, command, &job, netns, deadline).await;
                                        (index, outcome)
                                    }
                                })
                                .buffer_unordered(IN_FLIGHT_PER_NODE)
                                .collect::<Vec<_>>(),
                        ),
                    )
                })
            })
        })
        .collect();
    let mut outcomes: Vec<Option<Outcome>> = (0..jobs.len()).map(|_| None).collect();
    for worker in workers {
        let done = worker.join().map_err(|_| "a node's worker panicked")???;
        for (index, outcome) in done {
            outcomes[index] = Some(outcome);
        }
    }
    Ok(Phase {
        outcomes: outcomes
            .into_iter()
            .map(|outcome| outcome.unwrap_or(Outcome::Unfinished))
            .collect(),
        wall: started.elapsed().min(PHASE_CAP),
    })
}

async fn run_one(
    plugin: &Plugin,
    command: &str,
    job: &Job,
    netns: &Netns,
    deadline: tokio::time::Instant,
) -> Outcome {
    if tokio::time::Instant::now() >= deadline {
        return Outcome::Unfinished;
    }
    let started = Instant::now();
    let mut child = tokio::process::Command::from(plugin.command(
        command,
        &job.container,
        &job.pod_args,
        &netns.container,
    ));
    // Past the cap the child is killed (dropped), not waited for.
    let child = child.kill_on_drop(true).spawn();
    let finished = async {
        let mut child = child?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(plugin.config.to_string().as_bytes())
                .await?;
        }
        child.wait_with_output().await
    };
    match tokio::time::timeout_at(deadline, finished).await {
        Err(_) => Outcome::Unfinished,
        Ok(Err(error)) => Outcome::Refused {
            message: format!("{}: {error}", plugin.binary.display()),
        },
        Ok(Ok(output)) => match plugin.outcome(command, output) {
            Ok(stdout) => Outcome::Done {
                elapsed: started.elapsed(),
                stdout,
            },
            Err(message) => Outcome::Refused { message },
        },
    }
}

/// host-local's allocations left: one file per address under each node's data directory.
fn host_local_files(data: &Path) -> Fallible<usize> {
    let mut count = 0;
    for node in std::fs::read_dir(data)? {
        let network = node?.path().join(NETWORK);
        if network.is_dir() {
            count += std::fs::read_dir(network)?
                .filter_map(Result::ok)
                .filter(|file| file.file_name().to_string_lossy().parse::<IpAddr>().is_ok())
                .count();
        }
    }
    Ok(count)
}

/// whereabouts' allocations left: the entries of its IPPools.
fn whereabouts_allocations(cluster: &Cluster) -> Fallible<usize> {
    let pools: Value = serde_json::from_str(&cluster.kubectl(&[
        "get",
        "ippools.whereabouts.cni.cncf.io",
        "-A",
        "-o",
        "json",
    ])?)?;
    Ok(pools["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|pool| pool["spec"]["allocations"].as_object())
        .map(serde_json::Map::len)
        .sum())
}

fn report(nodes: usize, runs: &[Run]) -> Vec<String> {
    let mut lines = Vec::new();
    for run in runs {
        let addresses: Vec<IpAddr> = run
            .add
            .outcomes
            .iter()
            .filter_map(|outcome| match outcome {
                Outcome::Done { stdout, .. } => Some(result_addresses(stdout)),
                _ => None,
            })
            .flatten()
            .collect();
        let mut distinct = addresses.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let allocated = run.add.latencies().len().max(1) as f64;
        let writes = if run.label == "host-local" {
            "no API server".to_owned()
        } else {
            let total: f64 = run.writes.values().map(|writes| writes.total).sum();
            let conflicts: Vec<String> = run
                .writes
                .iter()
                .map(|(resource, writes)| format!("{resource} {:.0}", writes.conflicts))
                .collect();
            format!(
                "{:.2} API writes per allocation, answered 409: {}",
                total / allocated,
                conflicts.join(", ")
            )
        };
        lines.push(format!(
            "{nodes:>2} nodes {:<12} {}; {} addresses, {} duplicates; {writes}",
            run.label,
            run.add.summary("ADD"),
            addresses.len(),
            addresses.len() - distinct.len(),
        ));
        if let Some(commits) = run.commits {
            lines.push(format!(
                "{:<21} group commit: {:.0} ADDs in {:.0} commits, {:.0} conflicting pool writes",
                "", commits.adds, commits.commits, commits.conflicts
            ));
        }
        lines.push(format!(
            "{:<21} {}; {} addresses left allocated",
            "",
            run.del.summary("DEL"),
            run.left
        ));
    }
    let figure = |run: &Run| {
        let latencies = run.add.latencies();
        [
            run.add.wall.as_secs_f64(),
            latencies.len() as f64 / run.add.wall.as_secs_f64(),
            percentile(&latencies, 50).as_secs_f64(),
            percentile(&latencies, 99).as_secs_f64(),
        ]
    };
    if let Some(virtnet) = runs.iter().find(|run| run.label == "virtnet-ipam") {
        let ours = figure(virtnet);
        for baseline in runs.iter().filter(|run| run.label != "virtnet-ipam") {
            let theirs = figure(baseline);
            let ratio = |index: usize| ours[index] / theirs[index];
            lines.push(format!(
                "{nodes:>2} nodes virtnet-ipam / {}: wall {:.2}, allocations/s {:.2}, p50 {:.2}, \
                 p99 {:.2}",
                baseline.label,
                ratio(0),
                ratio(1),
                ratio(2),
                ratio(3)
            ));
        }
    }
    lines
}
