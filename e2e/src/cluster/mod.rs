//! A whole cluster made of real parts: the emulated network, etcd and the Kubernetes control
//! plane in the control-plane namespace, kube-proxy and the kubelet stand-in in every node
//! namespace, and the loopback forwarder that lets the root namespace reach the apiserver.
//!
//! [`Cluster::up`] starts from a clean slate (it first tears down whatever a crashed run with the
//! same name left) and a [`Cluster`] tears everything down when dropped, unless it was told to
//! [`Cluster::leave_running`] (the sandbox).
mod components;
mod layout;
mod multus;
mod node_cni;
mod real_node;
mod teardown;
mod virtnet;

use std::{
    collections::BTreeSet,
    fs,
    future::Future,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::{
    Api, Client, Config,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
};

use self::components::Binaries;
pub use self::{
    components::apiserver_url,
    layout::{DEFAULT_STATE_PARENT, Layout},
    node_cni::{NodeDirs, POD_RANGE_FIRST, POD_RANGE_LAST},
    real_node::TestImages,
    teardown::teardown,
    virtnet::{
        EXAMPLE_SUBNET, HelmInstall, NAMESPACE as VIRTNET_NAMESPACE, RELEASE as VIRTNET_RELEASE,
        VIRTNET_CONFLIST, VirtnetOptions,
    },
};
use crate::{
    command::{self, CommandError},
    kubeconfig::{self, KubeconfigError},
    naming::{ClusterNames, InvalidClusterName, pod_netns_name},
    pki::{CertAndKey, CertificateAuthority, ClientIdentity, PkiError, ServiceAccountKey},
    process::{Daemon, ProcessError},
    topology::{CONTROL_PLANE_IP, Topology, node_ip},
};

/// Where `e2e/tools/install` links the third-party binaries: `$VIRTNET_E2E_CACHE/bin`, the same
/// variable the install script reads, or /var/cache/virtnet-e2e/bin.
pub fn default_bin_dir() -> PathBuf {
    std::env::var_os("VIRTNET_E2E_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/virtnet-e2e"), PathBuf::from)
        .join("bin")
}
pub const DEFAULT_NODES: usize = 3;
/// Enough for any test; more would only split the pod range into slivers on a 2-core machine.
pub const MAX_NODES: usize = 16;

/// How long each start-up phase may take before `up` gives up and points at the logs.
const APISERVER_READY_TIMEOUT: Duration = Duration::from_secs(90);
const NODES_READY_TIMEOUT: Duration = Duration::from_secs(90);
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How many trailing lines of each component log [`Cluster::dump_logs`] shows.
pub const LOG_TAIL_LINES: usize = 60;

/// The first address of the Service range, which the apiserver gives the `kubernetes` Service.
const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);

/// Binaries `up` cannot do without.
const REQUIRED_BINARIES: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kube-proxy",
    "kubectl",
    "macvlan",
    "host-local",
];

/// The cluster could not be brought up, used or torn down.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    InvalidName(#[from] InvalidClusterName),
    #[error("{nodes} nodes requested: a cluster has 1 to {MAX_NODES} nodes")]
    NodeCount { nodes: usize },
    #[error("{path} is missing: run e2e/tools/install to build the cluster's third-party binaries")]
    MissingBinary { path: PathBuf },
    #[error("VirtNet's image {path} is missing: build it with `make image`")]
    MissingImage { path: PathBuf },
    #[error(
        "VirtNet installed with helm runs as pods, which only real nodes run: set `real_nodes`"
    )]
    HelmNeedsRealNodes,
    #[error("the harness binary {path} is missing: build it with `cargo build -p virtnet-e2e`")]
    MissingHarness { path: PathBuf },
    #[error("cannot create {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Kubeconfig(#[from] KubeconfigError),
    #[error(transparent)]
    NodeDir(#[from] node_cni::NodeDirError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("cannot use the admin kubeconfig {path}: {source}")]
    ClientConfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("Kubernetes API call failed: {0}")]
    Api(#[from] kube::Error),
    #[error(
        "timed out after {waited:?} waiting for {what} (last observation: {last}); \
         component logs are in {logs}"
    )]
    Timeout {
        what: String,
        waited: Duration,
        last: String,
        logs: PathBuf,
    },
    #[error("{source}\n\ncomponent logs (the cluster has been torn down):\n{logs}")]
    StartFailed {
        source: Box<ClusterError>,
        logs: String,
    },
    #[error("no component {name} was started in this cluster (known: {known})")]
    UnknownComponent { name: String, known: String },
    #[error("pod {pod} has no UID yet: wait until the apiserver has created it")]
    PodWithoutUid { pod: String },
    #[error(
        "teardown of cluster {cluster} left: {leftovers} (run `virtnet-e2e down --name {cluster}` \
         again, or remove them by hand)"
    )]
    Teardown { cluster: String, leftovers: String },
}

/// What [`Cluster::up`] builds.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// 1 to 8 lowercase letters or digits; prefixes every namespace (see [`ClusterNames`]).
    pub name: String,
    pub nodes: usize,
    /// Defaults to `/tmp/virtnet-e2e/<name>`.
    pub state_dir: Option<PathBuf>,
    /// Where etcd, the Kubernetes binaries and the CNI plugins are.
    pub bin_dir: PathBuf,
    /// The `virtnet-e2e` executable, which serves as forwarder and kubelet stand-in.
    pub harness_binary: PathBuf,
    /// Run VirtNet (controller, agents, plugins, the default conflist as every node's default
    /// network); `None` keeps the bootstrap network (macvlan + host-local).
    pub virtnet: Option<VirtnetOptions>,
    /// Every node a real one (kubelet + containerd + runc, see `real_node`) instead of the
    /// kubelet stand-in.
    pub real_nodes: bool,
}

impl ClusterOptions {
    /// Defaults for everything but the name and the harness binary.
    pub fn new(name: impl Into<String>, harness_binary: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            nodes: DEFAULT_NODES,
            state_dir: None,
            bin_dir: default_bin_dir(),
            harness_binary: harness_binary.into(),
            virtnet: None,
            real_nodes: false,
        }
    }

    /// Names the first missing prerequisite, if any, so callers can skip instead of failing.
    pub fn missing_prerequisite(&self) -> Option<ClusterError> {
        if !self.harness_binary.is_file() {
            return Some(ClusterError::MissingHarness {
                path: self.harness_binary.clone(),
            });
        }
        REQUIRED_BINARIES
            .iter()
            .map(|name| self.bin_dir.join(name))
            .find(|path| !path.is_file())
            .or_else(|| self.virtnet.as_ref().and_then(VirtnetOptions::missing))
            .or_else(|| {
                let multus = self.bin_dir.join("multus");
                let needed = self.virtnet.as_ref().is_some_and(|virtnet| virtnet.multus);
                (needed && !multus.is_file()).then_some(multus)
            })
            .or_else(|| {
                self.real_nodes
                    .then(|| real_node::missing_binary(&self.bin_dir))
                    .flatten()
            })
            .map(|path| ClusterError::MissingBinary { path })
            .or_else(|| {
                let helm = self.virtnet.as_ref()?.helm.as_ref()?;
                if !self.real_nodes {
                    Some(ClusterError::HelmNeedsRealNodes)
                } else if !helm.image_archive.is_file() {
                    Some(ClusterError::MissingImage {
                        path: helm.image_archive.clone(),
                    })
                } else {
                    None
                }
            })
    }
}

/// The PKI files the control plane needs beyond per-identity kubeconfigs.
struct ControlPlanePki {
    ca: CertificateAuthority,
    apiserver: CertAndKey,
    service_account: ServiceAccountKey,
    front_proxy_ca: CertificateAuthority,
    front_proxy_client: CertAndKey,
    /// What the apiserver presents to kubelets (exec, logs, port-forward).
    kubelet_client: CertAndKey,
}

/// A running cluster. Dropping it tears it down.
pub struct Cluster {
    guard: TeardownGuard,
    nodes: usize,
    bins: Binaries,
    client: Client,
}

impl Cluster {
    /// Brings a cluster up and waits until the apiserver is ready, the default ServiceAccount
    /// exists and every node is Ready. On error everything started so far is torn down.
    pub async fn up(options: ClusterOptions) -> Result<Self, ClusterError> {
        let names = ClusterNames::new(&options.name)?;
        if !(1..=MAX_NODES).contains(&options.nodes) {
            return Err(ClusterError::NodeCount {
                nodes: options.nodes,
            });
        }
        if let Some(missing) = options.missing_prerequisite() {
            return Err(missing);
        }
        let layout = Layout::for_cluster(options.state_dir.as_deref(), names.cluster());
        teardown(&names, &layout)?;
        let started = Instant::now();

        let mut starting = StartingCluster {
            guard: TeardownGuard {
                names,
                layout,
                children: Vec::new(),
                daemons: Vec::new(),
                armed: true,
            },
            nodes: options.nodes,
            bins: Binaries {
                dir: options.bin_dir,
            },
            harness_binary: options.harness_binary,
            virtnet: options.virtnet,
            real_nodes: options.real_nodes,
        };
        let client = match starting.start().await {
            Ok(client) => client,
            Err(error) => {
                // The state directory goes with the teardown; keep what explains the failure.
                return Err(ClusterError::StartFailed {
                    source: Box::new(error),
                    logs: dump_logs(&starting.guard.layout.logs, LOG_TAIL_LINES),
                });
            }
        };
        tracing::info!(
            cluster = starting.guard.names.cluster(),
            elapsed = ?started.elapsed(),
            "cluster is up"
        );
        Ok(Cluster {
            guard: starting.guard,
            nodes: starting.nodes,
            bins: starting.bins,
            client,
        })
    }

    pub fn names(&self) -> &ClusterNames {
        &self.guard.names
    }

    /// The admin (system:masters) kubeconfig, which reaches the apiserver through the loopback
    /// forwarder.
    pub fn kubeconfig(&self) -> &Path {
        &self.guard.layout.admin_kubeconfig
    }

    pub fn layout(&self) -> &Layout {
        &self.guard.layout
    }

    /// An admin client.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The Kubernetes node names, in order.
    pub fn node_names(&self) -> Vec<String> {
        (1..=self.nodes).map(|i| self.names().node(i)).collect()
    }

    /// The Prometheus text a VirtNet process serves at `http://<address>/metrics` inside
    /// namespace `netns` (the controller's is the control plane's, `127.0.0.1:8080`; an agent's
    /// its node's, `127.0.0.1:9741`).
    pub fn metrics(&self, netns: &str, address: &str) -> Result<String, ClusterError> {
        Ok(command::run_stdout(
            Command::new("ip")
                .args(["netns", "exec", netns, "curl", "-sf"])
                .arg(format!("http://{address}/metrics")),
        )?)
    }

    /// The controller's /metrics (see [`Self::metrics`]).
    pub fn controller_metrics(&self) -> Result<String, ClusterError> {
        self.metrics(&self.names().control_plane_netns(), "127.0.0.1:8080")
    }

    /// The /metrics of the agent of node `index` (1-based, see [`Self::metrics`]).
    pub fn agent_metrics(&self, index: usize) -> Result<String, ClusterError> {
        self.metrics(&self.names().node_netns(index), "127.0.0.1:9741")
    }

    /// Runs kubectl as admin and returns its stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, ClusterError> {
        Ok(command::run_stdout(
            Command::new(self.bins.path("kubectl"))
                .arg("--kubeconfig")
                .arg(self.kubeconfig())
                .args(args),
        )?)
    }

    /// Runs helm as admin (e.g. `upgrade`, `uninstall`) and returns its stdout.
    pub fn helm(&self, args: &[&str]) -> Result<String, ClusterError> {
        Ok(command::run_stdout(
            Command::new(self.bins.path("helm"))
                .arg("--kubeconfig")
                .arg(self.kubeconfig())
                .args(args),
        )?)
    }

    /// Runs `program args...` in the first container of `pod` on a real node (`kubectl exec`)
    /// and returns its stdout.
    pub fn exec_in_pod(
        &self,
        pod: &Pod,
        program_and_args: &[&str],
    ) -> Result<String, ClusterError> {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let mut args = vec!["exec", "--namespace", namespace, name, "--"];
        args.extend_from_slice(program_and_args);
        self.kubectl(&args)
    }

    /// Imports OCI archives into the containerd of every (real) node.
    pub fn import_images(&self, archives: &[PathBuf]) -> Result<(), ClusterError> {
        for node in self.node_names() {
            real_node::import_images(&self.layout().node_dirs(&node), archives)?;
        }
        Ok(())
    }

    /// Names image `from` also `to` in every (real) node's containerd, as pushing the same
    /// image under a new tag would.
    pub fn tag_image(&self, from: &str, to: &str) -> Result<(), ClusterError> {
        for node in self.node_names() {
            real_node::tag_image(&self.layout().node_dirs(&node), from, to)?;
        }
        Ok(())
    }

    /// The network namespace the kubelet stand-in created for `pod`.
    pub fn pod_netns(&self, pod: &Pod) -> Result<String, ClusterError> {
        let uid = pod
            .metadata
            .uid
            .as_deref()
            .ok_or_else(|| ClusterError::PodWithoutUid {
                pod: pod.metadata.name.clone().unwrap_or_default(),
            })?;
        Ok(pod_netns_name(&self.names().pod_netns_prefix(), uid))
    }

    /// Runs `program args...` inside `pod`'s network namespace and returns its stdout.
    pub fn exec_in_pod_netns(
        &self,
        pod: &Pod,
        program_and_args: &[&str],
    ) -> Result<String, ClusterError> {
        let netns = self.pod_netns(pod)?;
        Ok(command::run_stdout(
            Command::new("ip")
                .args(["netns", "exec", &netns])
                .args(program_and_args),
        )?)
    }

    /// The last [`LOG_TAIL_LINES`] lines of every component log, for a failed test's report.
    pub fn dump_logs(&self) -> String {
        dump_logs(&self.layout().logs, LOG_TAIL_LINES)
    }

    /// Polls `observe` until it succeeds; see [`wait_for`].
    pub async fn wait_for<T, E, F, Fut>(
        &self,
        what: &str,
        timeout: Duration,
        observe: F,
    ) -> Result<T, ClusterError>
    where
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        wait_for(what, timeout, &self.layout().logs, observe).await
    }

    /// Kills component `name` (e.g. `virtnet-controller`, `kubelet-<node>`) with SIGKILL, as a
    /// crash or a lost node would, and reaps it: only reaping waits for every thread to exit, and
    /// with the last one its sockets close (/proc shows the group leader as a zombie while the
    /// others are still going). Succeeds when it is not running.
    pub fn stop_component(&mut self, name: &str) -> Result<(), ClusterError> {
        self.component(name)?;
        let killed = crate::process::stop_one(&self.guard.layout.pids, name);
        let children = &mut self.guard.children;
        if let Some(position) = children.iter().position(|child| Some(child.id()) == killed) {
            let _ = children.swap_remove(position).wait();
        }
        Ok(())
    }

    /// Starts component `name` again, as it was first started plus `env`.
    pub fn start_component(
        &mut self,
        name: &str,
        env: &[(&str, &str)],
    ) -> Result<(), ClusterError> {
        let daemon = self.component(name)?.with_env(env);
        self.guard.spawn(&daemon)
    }

    /// Starts a second instance of component `name`, known as `replica` from then on, as `name`
    /// was first started plus `args` (e.g. a standby controller with an identity and ports of
    /// its own). Does not wait for it to be ready.
    pub fn start_replica(
        &mut self,
        name: &str,
        replica: &str,
        args: &[&str],
    ) -> Result<(), ClusterError> {
        let daemon = Daemon {
            name: replica.to_owned(),
            ..self.component(name)?.clone()
        }
        .args(args);
        self.guard.start(&daemon)
    }

    /// Kills component `name` as a crash would and starts it again as it was first started.
    /// Does not wait for it to be ready.
    pub fn restart(&mut self, name: &str) -> Result<(), ClusterError> {
        self.stop_component(name)?;
        self.start_component(name, &[])
    }

    /// Restarts component `name` (one running in a node's namespace) behind a proxy that does
    /// `faults` to what the apiserver sends it ([`crate::delay`]): held for a while, its watch
    /// caches lag while its writes still arrive at once; dropped while a flag file exists, its
    /// writes are done but their answers lost. It gets a kubeconfig of its own, the same but for
    /// the server, the proxy on that namespace's loopback; `harness_binary` runs the proxy.
    /// Stays so for the rest of the cluster's life (a later restart keeps the proxy).
    pub fn proxy_apiserver_for(
        &mut self,
        name: &str,
        harness_binary: &Path,
        faults: &crate::delay::Faults,
    ) -> Result<(), ClusterError> {
        const PROXY: &str = "127.0.0.1:16443";
        let daemon = self.component(name)?.clone();
        let variable = "KUBECONFIG=";
        let kubeconfig = daemon
            .args
            .iter()
            .find_map(|arg| arg.to_str()?.strip_prefix(variable).map(PathBuf::from))
            .ok_or_else(|| ClusterError::UnknownComponent {
                name: format!("{name} with a KUBECONFIG"),
                known: String::new(),
            })?;
        let unreadable = |source| ClusterError::StateDir {
            path: kubeconfig.clone(),
            source,
        };
        let mut config: serde_json::Value =
            serde_json::from_slice(&fs::read(&kubeconfig).map_err(unreadable)?)
                .map_err(|error| unreadable(std::io::Error::other(error)))?;
        config["clusters"][0]["cluster"]["server"] = format!("https://{PROXY}").into();
        let delayed = self
            .guard
            .layout
            .pki
            .join(format!("{name}-delayed.kubeconfig"));
        fs::write(&delayed, config.to_string()).map_err(|source| ClusterError::StateDir {
            path: delayed.clone(),
            source,
        })?;
        let proxy = Daemon::new(
            format!("{name}-delay"),
            daemon.netns.clone(),
            harness_binary,
        )
        .args([
            "delay".to_owned(),
            "--listen".to_owned(),
            PROXY.to_owned(),
            "--upstream".to_owned(),
            components::apiserver_address().to_string(),
            "--delay-ms".to_owned(),
            faults.delay.as_millis().to_string(),
        ])
        .args(faults.lose_answers_while.iter().flat_map(|flag| {
            [
                "--lose-answers-while".to_owned(),
                flag.display().to_string(),
            ]
        }));
        let behind_proxy = Daemon {
            args: daemon
                .args
                .iter()
                .map(|arg| match arg.to_str() {
                    Some(value) if value.starts_with(variable) => {
                        format!("{variable}{}", delayed.display()).into()
                    }
                    _ => arg.clone(),
                })
                .collect(),
            ..daemon
        };
        self.stop_component(name)?;
        self.guard.start(&proxy)?;
        self.guard.spawn(&behind_proxy)?;
        if let Some(known) = self
            .guard
            .daemons
            .iter_mut()
            .find(|known| known.name == name)
        {
            *known = behind_proxy;
        }
        Ok(())
    }

    fn component(&self, name: &str) -> Result<&Daemon, ClusterError> {
        let daemons = &self.guard.daemons;
        daemons
            .iter()
            .find(|daemon| daemon.name == name)
            .ok_or_else(|| ClusterError::UnknownComponent {
                name: name.to_owned(),
                known: daemons
                    .iter()
                    .map(|daemon| daemon.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Tears the cluster down now, reporting anything that could not be removed.
    pub fn down(mut self) -> Result<(), ClusterError> {
        self.guard.teardown()
    }

    /// Keeps the cluster running after this value is gone; `virtnet-e2e down` removes it.
    pub fn leave_running(mut self) {
        self.guard.armed = false;
    }
}

/// Owns a cluster's teardown: runs it on drop unless disarmed.
struct TeardownGuard {
    names: ClusterNames,
    layout: Layout,
    /// The components this process started, kept only to reap them after teardown.
    children: Vec<Child>,
    /// How each component was first started, for [`Cluster::start_component`].
    daemons: Vec<Daemon>,
    /// False once torn down or handed over to `virtnet-e2e down`.
    armed: bool,
}

impl TeardownGuard {
    /// Starts `daemon` and keeps it, to reap it and to start it again.
    fn start(&mut self, daemon: &Daemon) -> Result<(), ClusterError> {
        self.spawn(daemon)?;
        self.daemons.push(daemon.clone());
        Ok(())
    }

    /// Starts `daemon`, keeping only the child, to reap it.
    fn spawn(&mut self, daemon: &Daemon) -> Result<(), ClusterError> {
        let child = daemon.start(&self.layout.logs, &self.layout.pids)?;
        self.children.push(child);
        Ok(())
    }

    fn teardown(&mut self) -> Result<(), ClusterError> {
        self.armed = false;
        let result = teardown(&self.names, &self.layout);
        // Teardown signalled every component's process group; reaping only collects their exit
        // status (and kills one whose pid file was lost), so none lingers as a zombie.
        for mut child in self.children.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        result
    }
}

impl Drop for TeardownGuard {
    fn drop(&mut self) {
        if self.armed
            && let Err(error) = self.teardown()
        {
            eprintln!("virtnet-e2e: {error}");
        }
    }
}

/// A cluster whose components are starting; its guard tears it down if start-up fails.
struct StartingCluster {
    guard: TeardownGuard,
    nodes: usize,
    bins: Binaries,
    harness_binary: PathBuf,
    virtnet: Option<VirtnetOptions>,
    real_nodes: bool,
}

impl StartingCluster {
    async fn start(&mut self) -> Result<Client, ClusterError> {
        for dir in [
            &self.guard.layout.pki,
            &self.guard.layout.logs,
            &self.guard.layout.pids,
            &self.guard.layout.nodes,
        ] {
            fs::create_dir_all(dir).map_err(|source| ClusterError::StateDir {
                path: dir.clone(),
                source,
            })?;
        }
        let pki = self.create_pki()?;
        let multus = self.virtnet.as_ref().is_some_and(|virtnet| virtnet.multus);
        Topology::new(self.guard.names.clone(), self.nodes)
            .with_second_underlay(multus)
            .create()?;
        self.start_api(&pki)?;
        let client = self.connect_admin(&pki).await?;
        wait_for(
            "the apiserver's /readyz",
            APISERVER_READY_TIMEOUT,
            &self.guard.layout.logs,
            || apiserver_ready(&client),
        )
        .await?;
        // Only now: kube-controller-manager exits if the RBAC roles it reads at start-up are not
        // bootstrapped yet, and the others would only fill their logs with retries.
        self.start_controllers(&pki)?;
        self.start_nodes(&pki)?;
        if self.real_nodes {
            self.import_test_images().await?;
        }
        // ServiceAccount admission rejects pods until kube-controller-manager created this.
        wait_for(
            "the default ServiceAccount",
            APISERVER_READY_TIMEOUT,
            &self.guard.layout.logs,
            || {
                let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
                async move {
                    match accounts.get_opt("default").await {
                        Ok(Some(_)) => Ok(()),
                        Ok(None) => Err(String::from("not created yet")),
                        Err(error) => Err(error.to_string()),
                    }
                }
            },
        )
        .await?;
        let expected: BTreeSet<String> =
            (1..=self.nodes).map(|i| self.guard.names.node(i)).collect();
        wait_for(
            &format!("{} Ready nodes", self.nodes),
            NODES_READY_TIMEOUT,
            &self.guard.layout.logs,
            || all_nodes_ready(&client, &expected),
        )
        .await?;
        if let Some(options) = self.virtnet.clone() {
            self.start_virtnet(&options, &pki, &client).await?;
        }
        Ok(client)
    }

    /// Installs and starts VirtNet, then waits until every agent serves its socket (it installs
    /// the plugins and the conflist first) and the controller answers the Subnet admission
    /// webhook; in Multus mode Multus then wraps each conflist.
    async fn start_virtnet(
        &mut self,
        options: &VirtnetOptions,
        pki: &ControlPlanePki,
        client: &Client,
    ) -> Result<(), ClusterError> {
        // Owned copies: the target outlives the `&mut self` of starting the daemons.
        let layout = self.guard.layout.clone();
        let bins = Binaries {
            dir: self.bins.dir.clone(),
        };
        let nodes: Vec<(String, String, NodeDirs)> = (1..=self.nodes)
            .map(|index| {
                let node = self.guard.names.node(index);
                let dirs = layout.node_dirs(&node);
                (node, self.guard.names.node_netns(index), dirs)
            })
            .collect();
        let sockets: Vec<PathBuf> = nodes
            .iter()
            .map(|(_, _, dirs)| dirs.agent_run.join("agent.sock"))
            .collect();
        let target = virtnet::Target {
            bin_dir: &bins.dir,
            kubectl: &bins.path("kubectl"),
            helm: &bins.path("helm"),
            admin_kubeconfig: &layout.admin_kubeconfig,
            state: &layout.root,
            logs: &layout.logs,
            pki_dir: &layout.pki,
            ca: &pki.ca,
            control_plane_netns: &self.guard.names.control_plane_netns(),
            nodes,
        };
        let multus = match &options.helm {
            Some(helm) => {
                virtnet::install_with_helm(options, helm, &target)?;
                None
            }
            None => {
                let installed = virtnet::install(options, &target)?;
                installed
                    .daemons
                    .iter()
                    .try_for_each(|daemon| self.start_daemon(daemon))?;
                installed.multus
            }
        };
        wait_for(
            "every virtnet agent to serve its socket",
            APISERVER_READY_TIMEOUT,
            &layout.logs,
            || {
                let missing: Vec<String> = sockets
                    .iter()
                    .filter(|socket| !socket.exists())
                    .map(|socket| socket.display().to_string())
                    .collect();
                async move {
                    if missing.is_empty() {
                        Ok(())
                    } else {
                        Err(format!("missing: {}", missing.join(", ")))
                    }
                }
            },
        )
        .await?;
        if let Some(multus) = &multus {
            for (node, _, dirs) in &target.nodes {
                multus.configure_node(&target, node, dirs, options.default_cni)?;
            }
        }
        // The webhook fails open: until the controller answers, Subnet writes go unchecked, and
        // tests expect them checked.
        wait_for(
            "the controller to answer the Subnet admission webhook",
            APISERVER_READY_TIMEOUT,
            &self.guard.layout.logs,
            || virtnet::webhook_answers(client),
        )
        .await
    }

    fn create_pki(&self) -> Result<ControlPlanePki, ClusterError> {
        let dir = &self.guard.layout.pki;
        let ca = CertificateAuthority::create(dir, "ca", "virtnet-e2e-ca")?;
        let apiserver = ca.issue_server(
            "apiserver",
            "kube-apiserver",
            vec![
                "127.0.0.1".into(),
                CONTROL_PLANE_IP.to_string(),
                KUBERNETES_SERVICE_IP.to_string(),
                "localhost".into(),
                "kubernetes".into(),
                "kubernetes.default".into(),
                "kubernetes.default.svc".into(),
                "kubernetes.default.svc.cluster.local".into(),
            ],
        )?;
        let service_account = ServiceAccountKey::create(dir)?;
        // Real kubelets accept any client certificate of the cluster CA (and allow it all).
        let kubelet_client = ca.issue_client(&ClientIdentity {
            file_stem: "apiserver-kubelet-client",
            user: "kube-apiserver-kubelet-client",
            groups: &["system:masters"],
        })?;
        // A CA of its own, as kubeadm does: client certificates of the cluster CA must not be
        // able to pose as the front proxy.
        let front_proxy_ca =
            CertificateAuthority::create(dir, "front-proxy-ca", "virtnet-e2e-front-proxy-ca")?;
        let front_proxy_client = front_proxy_ca.issue_client(&ClientIdentity {
            file_stem: components::FRONT_PROXY_CLIENT,
            user: components::FRONT_PROXY_CLIENT,
            groups: &[],
        })?;
        let server = components::apiserver_url();
        // The users the default RBAC policy already binds, as kubeadm sets them up.
        for user in [
            "system:kube-controller-manager",
            "system:kube-scheduler",
            "system:kube-proxy",
        ] {
            let component = user.trim_start_matches("system:");
            let client = ca.issue_client(&ClientIdentity {
                file_stem: component,
                user,
                groups: &[],
            })?;
            kubeconfig::write(
                &self.guard.layout.component_kubeconfig(component),
                &server,
                ca.cert_path(),
                user,
                &client,
            )?;
        }
        for index in 1..=self.nodes {
            // The kubelet's identity: the Node authorizer and NodeRestriction key on it.
            let node = self.guard.names.node(index);
            let user = format!("system:node:{node}");
            let client = ca.issue_client(&ClientIdentity {
                file_stem: &format!("kubelet-{node}"),
                user: &user,
                groups: &["system:nodes"],
            })?;
            kubeconfig::write(
                &self
                    .guard
                    .layout
                    .component_kubeconfig(&format!("kubelet-{node}")),
                &server,
                ca.cert_path(),
                &user,
                &client,
            )?;
        }
        Ok(ControlPlanePki {
            ca,
            apiserver,
            service_account,
            front_proxy_ca,
            front_proxy_client,
            kubelet_client,
        })
    }

    /// etcd, the apiserver and the loopback forwarder to it.
    fn start_api(&mut self, pki: &ControlPlanePki) -> Result<(), ClusterError> {
        let netns = self.guard.names.control_plane_netns();
        let daemons = [
            components::etcd(&self.guard.layout, &self.bins, &netns),
            components::apiserver(
                &self.bins,
                &netns,
                &components::ApiserverFiles {
                    ca_cert: pki.ca.cert_path(),
                    serving: &pki.apiserver,
                    service_account: &pki.service_account,
                    front_proxy_ca_cert: pki.front_proxy_ca.cert_path(),
                    front_proxy_client: &pki.front_proxy_client,
                    kubelet_client: &pki.kubelet_client,
                },
            ),
            components::forwarder(
                &self.harness_binary,
                &netns,
                &self.guard.layout.forwarder_address,
            ),
        ];
        daemons
            .iter()
            .try_for_each(|daemon| self.start_daemon(daemon))
    }

    fn start_controllers(&mut self, pki: &ControlPlanePki) -> Result<(), ClusterError> {
        let netns = self.guard.names.control_plane_netns();
        let daemons = [
            components::controller_manager(
                &self.bins,
                &netns,
                &self
                    .guard
                    .layout
                    .component_kubeconfig("kube-controller-manager"),
                pki.ca.cert_path(),
                &pki.service_account,
            ),
            components::scheduler(
                &self.bins,
                &netns,
                &self.guard.layout.component_kubeconfig("kube-scheduler"),
            ),
        ];
        daemons
            .iter()
            .try_for_each(|daemon| self.start_daemon(daemon))
    }

    fn start_nodes(&mut self, pki: &ControlPlanePki) -> Result<(), ClusterError> {
        let pod_netns_prefix = self.guard.names.pod_netns_prefix();
        let images = if self.real_nodes {
            Some(TestImages::installed(&self.bins.dir)?)
        } else {
            None
        };
        for index in 1..=self.nodes {
            let node = self.guard.names.node(index);
            let netns = self.guard.names.node_netns(index);
            let dirs = self.guard.layout.node_dirs(&node);
            dirs.prepare(&self.bins.dir, index, self.nodes)?;
            let kube_proxy = components::kube_proxy(
                &self.bins,
                &netns,
                &node,
                &self.guard.layout.component_kubeconfig("kube-proxy"),
            );
            let kubeconfig = self
                .guard
                .layout
                .component_kubeconfig(&format!("kubelet-{node}"));
            let kubelet = match &images {
                Some(images) => real_node::RealNode {
                    name: &node,
                    netns: &netns,
                    ip: node_ip(index),
                    dirs: &dirs,
                    kubeconfig: &kubeconfig,
                    ca_cert: pki.ca.cert_path(),
                    logs: &self.guard.layout.logs,
                }
                .prepare(&self.bins, images)?,
                None => components::kubelet(
                    &self.harness_binary,
                    &netns,
                    &node,
                    node_ip(index),
                    &kubeconfig,
                    &dirs,
                    &pod_netns_prefix,
                )
                // Plugins configured cluster-wide (a NetworkAttachmentDefinition) only know the
                // agent socket's production path.
                .args(self.virtnet.iter().map(|_| {
                    format!(
                        "--host-path={}:{}",
                        dirs.agent_run.display(),
                        virtnet::AGENT_RUN_HOST_PATH
                    )
                })),
            };
            self.start_daemon(&kube_proxy)?;
            self.start_daemon(&kubelet)?;
        }
        Ok(())
    }

    /// Waits for every real node's containerd and imports the test images into it.
    async fn import_test_images(&self) -> Result<(), ClusterError> {
        let archives = TestImages::archives(&self.bins.dir);
        for index in 1..=self.nodes {
            let dirs = self.guard.layout.node_dirs(&self.guard.names.node(index));
            let socket = real_node::containerd_socket(&dirs);
            wait_for(
                &format!("containerd of node {index} to serve {}", socket.display()),
                NODES_READY_TIMEOUT,
                &self.guard.layout.logs,
                || {
                    let serving = std::os::unix::net::UnixStream::connect(&socket).map(drop);
                    async move { serving }
                },
            )
            .await?;
            real_node::import_images(&dirs, &archives)?;
        }
        Ok(())
    }

    fn start_daemon(&mut self, daemon: &Daemon) -> Result<(), ClusterError> {
        self.guard.start(daemon)
    }

    /// Writes the admin kubeconfig for the forwarder's address and connects with it.
    async fn connect_admin(&self, pki: &ControlPlanePki) -> Result<Client, ClusterError> {
        let address_file = self.guard.layout.forwarder_address.clone();
        let address = wait_for(
            "the apiserver forwarder to listen",
            APISERVER_READY_TIMEOUT,
            &self.guard.layout.logs,
            || {
                let address_file = address_file.clone();
                async move {
                    match fs::read_to_string(&address_file) {
                        Ok(address) if !address.trim().is_empty() => Ok(address.trim().to_owned()),
                        Ok(_) => Err(format!("{} is still empty", address_file.display())),
                        Err(error) => Err(format!("{}: {error}", address_file.display())),
                    }
                }
            },
        )
        .await?;
        let admin = pki.ca.issue_client(&ClientIdentity {
            file_stem: "admin",
            user: "kubernetes-admin",
            groups: &["system:masters"],
        })?;
        let path = &self.guard.layout.admin_kubeconfig;
        kubeconfig::write(
            path,
            &format!("https://{address}"),
            pki.ca.cert_path(),
            "kubernetes-admin",
            &admin,
        )?;
        let config_error = |source| ClusterError::ClientConfig {
            path: path.clone(),
            source,
        };
        let kubeconfig = Kubeconfig::read_from(path).map_err(config_error)?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(config_error)?;
        Ok(Client::try_from(config)?)
    }
}

async fn apiserver_ready(client: &Client) -> Result<(), kube::Error> {
    let request = http::Request::get("/readyz")
        .body(Vec::new())
        .map_err(kube::Error::HttpError)?;
    client.request_text(request).await.map(drop)
}

async fn all_nodes_ready(client: &Client, expected: &BTreeSet<String>) -> Result<(), String> {
    let nodes: Api<Node> = Api::all(client.clone());
    let list = nodes
        .list(&ListParams::default())
        .await
        .map_err(|error| error.to_string())?;
    let ready: BTreeSet<String> = list
        .items
        .iter()
        .filter(|node| is_ready(node))
        .filter_map(|node| node.metadata.name.clone())
        .collect();
    if expected.is_subset(&ready) {
        Ok(())
    } else {
        let missing: Vec<_> = expected.difference(&ready).cloned().collect();
        Err(format!("not Ready yet: {}", missing.join(", ")))
    }
}

/// Whether a Pod reports condition Ready=True.
pub fn is_pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|condition| condition.type_ == "Ready" && condition.status == "True")
        })
}

/// Whether a Node reports condition Ready=True.
pub fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|condition| condition.type_ == "Ready" && condition.status == "True")
        })
}

/// The sum of the samples of `metrics` (Prometheus text) whose line starts with `series` (e.g.
/// `virtnet_ip_reclaims_total{`) and passes `keep`.
pub fn sample_sum(
    metrics: &str,
    series: &str,
    keep: impl Fn(&str) -> bool,
) -> Result<f64, std::num::ParseFloatError> {
    metrics
        .lines()
        .filter(|line| line.starts_with(series) && keep(line))
        .map(|line| line.rsplit(' ').next().unwrap_or_default().parse::<f64>())
        .sum()
}

/// Polls `observe` every 250 ms until it returns `Ok(value)`. An error means "not yet, because":
/// the last one is reported on timeout, together with where the component logs are.
pub async fn wait_for<T, E, F, Fut>(
    what: &str,
    timeout: Duration,
    logs: &Path,
    mut observe: F,
) -> Result<T, ClusterError>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let started = Instant::now();
    loop {
        let last = match observe().await {
            Ok(value) => {
                tracing::info!(what, elapsed = ?started.elapsed(), "done waiting");
                return Ok(value);
            }
            Err(error) => error.to_string(),
        };
        if started.elapsed() >= timeout {
            return Err(ClusterError::Timeout {
                what: what.to_owned(),
                waited: timeout,
                last,
                logs: logs.to_owned(),
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The last `lines` lines of every `*.log` in `log_dir`, each under a header naming the file.
pub fn dump_logs(log_dir: &Path, lines: usize) -> String {
    let mut logs: Vec<PathBuf> = fs::read_dir(log_dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
                .collect()
        })
        .unwrap_or_default();
    logs.sort();
    let mut report = String::new();
    for path in logs {
        let content = fs::read_to_string(&path).unwrap_or_default();
        let all: Vec<&str> = content.lines().collect();
        let tail = &all[all.len().saturating_sub(lines)..];
        report.push_str(&format!(
            "===== {} (last {} of {} lines) =====\n",
            path.display(),
            tail.len(),
            all.len()
        ));
        for line in tail {
            report.push_str(line);
            report.push('\n');
        }
    }
    report
}
