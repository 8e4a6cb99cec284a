//! What the benches in `e2e/benches` share (`make bench`): the cluster they name and the build
//! they run, the Subnet and the peers they configure, the plugin binaries run as a runtime runs
//! them (from inside a node's netns, the configuration on stdin), and the counters they read from
//! the agents' and the apiserver's `/metrics`.
use std::{
    collections::BTreeMap,
    error::Error,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use virtnet_cni::trusted::TRUSTED_DIRS_ENV;

use crate::{
    cluster::{
        Cluster, ClusterOptions, DEFAULT_STATE_PARENT, VirtnetOptions, apiserver_url,
        default_bin_dir,
    },
    netns::{named_netns_path, run_in_netns},
};

pub type Fallible<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// The address range every bench Subnet and peer range lives in, and its gateway.
pub const BENCH_CIDR: &str = "10.6.0.0/16";
pub const BENCH_GATEWAY: &str = "10.6.0.1";
/// The CNI network name the benches' configurations carry (host-local keeps its files under it).
pub const NETWORK: &str = "bench";
/// The namespace whose pods default to Subnet [`NETWORK`].
pub const NAMESPACE: &str = "bench";

/// VirtNet's release build: figures of a debug build would say little about what users run.
pub fn virtnet_build() -> VirtnetOptions {
    VirtnetOptions::from_build("release")
}

/// A bench's cluster name: the first 7 characters of `VIRTNET_E2E_CLUSTER` (default `e2e`) plus
/// `suffix`, so that no bench takes a test's cluster or another bench's.
pub fn cluster_name(suffix: char) -> String {
    std::env::var("VIRTNET_E2E_CLUSTER")
        .unwrap_or_else(|_| "e2e".to_owned())
        .chars()
        .take(7)
        .chain([suffix])
        .collect()
}

/// Why a bench cannot run on this machine, if it cannot: it needs root (network namespaces),
/// the cluster tools and VirtNet's release build.
pub fn missing_prerequisite(harness_binary: &Path) -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root (network namespaces); run `make bench` as root".to_owned());
    }
    if let Some(missing) = ClusterOptions::new("bench", harness_binary).missing_prerequisite() {
        return Some(format!("{missing}; run `make tools`"));
    }
    virtnet_build().missing().map(|path| {
        format!(
            "{} is not built; run `make bench`, which builds it",
            path.display()
        )
    })
}

pub fn apply(cluster: &Cluster, manifest: &Value) -> Fallible<()> {
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), manifest.to_string())?;
    cluster.kubectl(&["apply", "-f", &file.path().to_string_lossy()])?;
    Ok(())
}

/// Subnet [`NETWORK`] holding `ips` in 3 IPPools, the default of namespace [`NAMESPACE`], and
/// the example Subnet, which the nodes' conflist names; waits until the 3 pools exist.
pub async fn bench_subnet(cluster: &Cluster, ips: &str) -> Fallible<()> {
    let example = virtnet_build()
        .repo
        .join("examples/statefulset/subnet.yaml");
    cluster.kubectl(&["apply", "-f", &example.to_string_lossy()])?;
    apply(
        cluster,
        &json!({
            "apiVersion": "virtnet.io/v1alpha1", "kind": "Subnet", "metadata": {"name": NETWORK},
            "spec": {"subnet": BENCH_CIDR, "gateway": BENCH_GATEWAY, "ips": [ips], "replicas": 3},
        }),
    )?;
    apply(
        cluster,
        &json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": NAMESPACE,
                         "annotations": {"ipam.virtnet.io/default-subnet": NETWORK}},
        }),
    )?;
    let prefix = format!("/{NETWORK}-");
    cluster
        .wait_for(
            "the bench Subnet's 3 IPPools",
            Duration::from_secs(90),
            || async {
                let pools = cluster
                    .kubectl(&["get", "ippools.virtnet.io", "-o", "name"])
                    .map_err(|error| error.to_string())?;
                let count = pools.lines().filter(|line| line.contains(&prefix)).count();
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

/// The addresses Subnet [`NETWORK`]'s IPPools record as allocated.
pub fn virtnet_records(cluster: &Cluster) -> Fallible<usize> {
    let pools: Value =
        serde_json::from_str(&cluster.kubectl(&["get", "ippools.virtnet.io", "-o", "json"])?)?;
    Ok(pools["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|pool| pool["spec"]["subnet"] == NETWORK)
        .filter_map(|pool| pool["status"]["allocations"].as_object())
        .map(serde_json::Map::len)
        .sum())
}

/// The `n`th address after `first`.
pub fn nth_address(first: Ipv4Addr, n: usize) -> Ipv4Addr {
    let offset = u32::try_from(n).expect("a bench range is far smaller than IPv4");
    Ipv4Addr::from(u32::from(first) + offset)
}

/// The netns a plugin runs in (a node's, as under that node's runtime), and the one it is told
/// is the container's: IPAM plugins never enter it, but host-local insists it is not their own.
#[derive(Clone)]
pub struct Netns {
    pub node: PathBuf,
    pub container: PathBuf,
}

impl Netns {
    /// Node `index` (1-based, as [`crate::naming::ClusterNames::node_netns`]).
    pub fn of_node(cluster: &Cluster, index: usize) -> Self {
        Self {
            node: named_netns_path(&cluster.names().node_netns(index)),
            container: named_netns_path(&cluster.names().control_plane_netns()),
        }
    }
}

/// One IPAM plugin binary and the network configuration it is given.
#[derive(Clone)]
pub struct Plugin {
    pub binary: PathBuf,
    pub config: Value,
}

impl Plugin {
    /// virtnet-ipam asking `node`'s agent for an address of the pod namespace's default Subnet.
    pub fn virtnet_ipam(cluster: &Cluster, node: &str) -> Self {
        let socket = cluster
            .layout()
            .node_dirs(node)
            .agent_run
            .join("agent.sock");
        Self {
            binary: virtnet_build().binaries.join("virtnet-ipam"),
            config: network(
                "1.0.0",
                json!({"type": "virtnet-ipam", "default_subnet": NETWORK, "agent_socket": socket}),
            ),
        }
    }

    /// host-local handing out `first..=last` from files under `data_dir`: a file lock and a file
    /// per address, the floor of any IPAM without an API server.
    pub fn host_local(data_dir: &Path, first: Ipv4Addr, last: Ipv4Addr) -> Self {
        Self {
            binary: default_bin_dir().join("host-local"),
            config: network(
                "1.0.0",
                json!({"type": "host-local", "dataDir": data_dir,
                       "ranges": [[{"subnet": BENCH_CIDR, "rangeStart": first, "rangeEnd": last,
                                    "gateway": BENCH_GATEWAY}]]}),
            ),
        }
    }

    /// whereabouts, the Kubernetes-backed peer, allocating from `range` (its `range`,
    /// `range_start`, `range_end` fields), with its CRDs installed and a kubeconfig that reaches
    /// the apiserver from a node's netns; or why it cannot run (its CRDs come from the Go module
    /// cache `make tools` filled).
    pub async fn whereabouts(cluster: &Cluster, range: Value) -> Fallible<Self> {
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
        let mut ipam = json!({"type": "whereabouts", "configuration_path": flat,
                              "kubernetes": {"kubeconfig": path}, "log_level": "error"});
        if let (Some(ipam), Value::Object(range)) = (ipam.as_object_mut(), range) {
            ipam.extend(range);
        }
        Ok(Self {
            binary,
            config: network("0.3.1", ipam),
        })
    }

    /// The command a runtime runs for CNI `command` on `container` (a 64-character id) of the pod
    /// `pod_args` names; the child starts in the calling thread's netns and reads the
    /// configuration from stdin.
    pub fn command(&self, command: &str, container: &str, pod_args: &str, netns: &Path) -> Command {
        let mut child = Command::new(&self.binary);
        child
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", pod_args)
            .env("CNI_PATH", self.binary.parent().unwrap_or(Path::new("/")))
            // The nodes keep their agent sockets under the harness's state directory.
            .env(TRUSTED_DIRS_ENV, DEFAULT_STATE_PARENT)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        child
    }

    /// The plugin's stdout if it succeeded, else what it said.
    pub fn outcome(&self, command: &str, output: Output) -> Result<Vec<u8>, String> {
        if output.status.success() {
            Ok(output.stdout)
        } else {
            Err(format!(
                "{} {command} failed ({}): {}{}",
                self.binary.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout).trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }

    /// Runs the plugin to completion from the calling thread: see [`Self::command`].
    pub fn run(
        &self,
        command: &str,
        container: &str,
        pod_args: &str,
        netns: &Path,
    ) -> std::io::Result<Vec<u8>> {
        let mut child = self
            .command(command, container, pod_args, netns)
            .spawn()
            .map_err(|error| {
                std::io::Error::other(format!("{}: {error}", self.binary.display()))
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(self.config.to_string().as_bytes())?;
        }
        self.outcome(command, child.wait_with_output()?)
            .map_err(std::io::Error::other)
    }
}

/// The `CNI_ARGS` a runtime passes for `pod`: virtnet-ipam's agent and whereabouts look the pod
/// up by them.
pub fn pod_args(pod: &Pod) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default(),
        pod.metadata.uid.as_deref().unwrap_or_default()
    )
}

/// A network configuration around `ipam`, named [`NETWORK`]; only the IPAM plugin runs, so the
/// main plugin's type only has to look real.
fn network(cni_version: &str, ipam: Value) -> Value {
    json!({"cniVersion": cni_version, "name": NETWORK, "type": "macvlan", "ipam": ipam})
}

/// The addresses of an ADD's result (`ips[].address`, CIDR notation).
pub fn result_addresses(stdout: &[u8]) -> Vec<IpAddr> {
    serde_json::from_slice::<Value>(stdout)
        .ok()
        .and_then(|result| result["ips"].as_array().cloned())
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .collect()
}

/// The value at `percent` of `sorted` (nearest rank, rounding down); zero when it is empty.
pub fn percentile(sorted: &[Duration], percent: usize) -> Duration {
    sorted
        .get(sorted.len().saturating_sub(1) * percent / 100)
        .copied()
        .unwrap_or_default()
}

/// The agents' group-commit counters, summed over the nodes (from their `/metrics`).
#[derive(Debug, Default, Clone, Copy)]
pub struct CommitCounters {
    pub adds: f64,
    pub commits: f64,
    pub conflicts: f64,
}

impl CommitCounters {
    pub fn since(self, before: Self) -> Self {
        Self {
            adds: self.adds - before.adds,
            commits: self.commits - before.commits,
            conflicts: self.conflicts - before.conflicts,
        }
    }
}

pub fn commit_counters(cluster: &Cluster) -> Fallible<CommitCounters> {
    let mut counters = CommitCounters::default();
    for index in 1..=cluster.node_names().len() {
        let netns = named_netns_path(&cluster.names().node_netns(index));
        let text = run_in_netns(netns, || -> std::io::Result<String> {
            let mut stream = std::net::TcpStream::connect("127.0.0.1:9741")?;
            stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")?;
            let mut text = String::new();
            stream.read_to_string(&mut text)?;
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

/// The writes the apiserver has answered so far (`apiserver_request_total`), by API group,
/// resource and status code: whatever the client, so a bench counts a plugin's writes by the
/// groups only it writes to.
#[derive(Debug, Default, Clone)]
pub struct ApiWrites(BTreeMap<(String, String, String), f64>);

const WRITE_VERBS: &[&str] = &["POST", "PUT", "PATCH", "APPLY", "DELETE"];

impl ApiWrites {
    pub async fn read(cluster: &Cluster) -> Fallible<Self> {
        let request = http::Request::get("/metrics").body(Vec::new())?;
        Ok(Self::parse(&cluster.client().request_text(request).await?))
    }

    /// The write series of the apiserver's `/metrics` text.
    fn parse(text: &str) -> Self {
        let mut writes = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.split_once("} ") else {
                continue;
            };
            let labels: BTreeMap<&str, &str> = labels
                .split(',')
                .filter_map(|label| {
                    let (key, value) = label.split_once('=')?;
                    Some((key, value.trim_matches('"')))
                })
                .collect();
            let label = |key: &str| labels.get(key).copied().unwrap_or_default().to_owned();
            if WRITE_VERBS.contains(&label("verb").as_str()) {
                let key = (label("group"), label("resource"), label("code"));
                *writes.entry(key).or_default() += value.trim().parse::<f64>().unwrap_or_default();
            }
        }
        Self(writes)
    }

    /// Writes since `before` to `group`, by resource (only `resource`, if given).
    pub fn since(
        &self,
        before: &Self,
        group: &str,
        resource: Option<&str>,
    ) -> BTreeMap<String, Writes> {
        let mut since = BTreeMap::<String, Writes>::new();
        for (sign, writes) in [(1.0, self), (-1.0, before)] {
            for ((g, r, code), value) in &writes.0 {
                if g == group && resource.is_none_or(|resource| r == resource) {
                    let counted = since.entry(r.clone()).or_default();
                    counted.total += sign * value;
                    if code == "409" {
                        counted.conflicts += sign * value;
                    }
                }
            }
        }
        since
    }
}

/// Writes to one resource, and how many of them the apiserver answered 409: a conflicting
/// update, or a create of a name that exists.
#[derive(Debug, Default, Clone, Copy)]
pub struct Writes {
    pub total: f64,
    pub conflicts: f64,
}

/// Runs ADD (timed) then DEL (not timed) `warmup + rounds` times, each with its own container
/// id, from a thread that entered the node's netns (so the children start there, as under a
/// runtime on that node); returns the `rounds` timed ADDs.
pub fn time_adds(
    netns: &Netns,
    plugin: &Plugin,
    pod_args: &str,
    warmup: usize,
    rounds: usize,
) -> Fallible<Vec<Duration>> {
    let (netns, plugin, pod_args) = (netns.clone(), plugin.clone(), pod_args.to_owned());
    let samples = crate::netns::run_in_netns(
        netns.node.clone(),
        move || -> std::io::Result<Vec<Duration>> {
            let mut samples = Vec::with_capacity(rounds);
            for round in 0..warmup + rounds {
                let id = format!("bench{round:059}");
                let started = Instant::now();
                plugin.run("ADD", &id, &pod_args, &netns.container)?;
                let elapsed = started.elapsed();
                plugin.run("DEL", &id, &pod_args, &netns.container)?;
                if round >= warmup {
                    samples.push(elapsed);
                }
            }
            Ok(samples)
        },
    )??;
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_counted_by_resource_with_their_conflicts() {
        let metrics = |pool_patches: u32| {
            format!(
                "# TYPE apiserver_request_total counter\n\
                 apiserver_request_total{{code=\"200\",component=\"apiserver\",group=\"virtnet.io\",resource=\"ippools\",scope=\"cluster\",subresource=\"status\",verb=\"PATCH\",version=\"v1alpha1\"}} {pool_patches}\n\
                 apiserver_request_total{{code=\"409\",component=\"apiserver\",group=\"virtnet.io\",resource=\"ippools\",scope=\"cluster\",subresource=\"status\",verb=\"PATCH\",version=\"v1alpha1\"}} 2\n\
                 apiserver_request_total{{code=\"200\",component=\"apiserver\",group=\"virtnet.io\",resource=\"ippools\",scope=\"cluster\",subresource=\"\",verb=\"LIST\",version=\"v1alpha1\"}} 500\n\
                 apiserver_request_total{{code=\"201\",component=\"apiserver\",group=\"\",resource=\"pods\",scope=\"namespace\",subresource=\"\",verb=\"POST\",version=\"v1\"}} 7\n"
            )
        };
        let before = ApiWrites::parse(&metrics(10));
        let after = ApiWrites::parse(&metrics(25));
        let since = after.since(&before, "virtnet.io", None);
        let pools = since["ippools"];
        // Reads (LIST) and other groups' writes are not counted; the 409s did not change.
        assert_eq!((pools.total, pools.conflicts), (15.0, 0.0));
        assert_eq!(since.len(), 1);
        let all = after.since(&ApiWrites::default(), "virtnet.io", Some("ippools"));
        assert_eq!(
            (all["ippools"].total, all["ippools"].conflicts),
            (27.0, 2.0)
        );
    }

    #[test]
    fn an_add_result_gives_its_addresses() {
        let result = br#"{"cniVersion":"1.0.0","ips":[{"address":"10.6.160.7/16","gateway":"10.6.0.1"},{"address":"fd00:6::7/64"}]}"#;
        let addresses: Vec<String> = result_addresses(result)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(addresses, ["10.6.160.7", "fd00:6::7"]);
        assert!(result_addresses(b"").is_empty());
    }

    #[test]
    fn ranges_and_percentiles() {
        let first = Ipv4Addr::new(10, 6, 160, 1);
        assert_eq!(nth_address(first, 999), Ipv4Addr::new(10, 6, 163, 232));
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 50), Duration::from_millis(50));
        assert_eq!(percentile(&samples, 99), Duration::from_millis(99));
        assert_eq!(percentile(&[], 99), Duration::ZERO);
    }
}
