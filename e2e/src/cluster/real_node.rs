//! A real node: kubelet with containerd and runc (Debian's packages), as a user's node runs them,
//! in the node's network namespace and in a mount namespace of its own.
//!
//! Several real nodes share this machine, yet each must look like a machine of its own to the
//! chart: the agent's DaemonSet mounts /opt/cni/bin, /etc/cni/net.d and /var/run/virtnet by their
//! usual paths, and containerd runs the plugins from there. So each node's processes run in a
//! private mount namespace (propagation slave: nothing mounted there reaches the machine) where
//! those paths are the node's own directories:
//!
//! | in the node             | on the machine                                   |
//! |-------------------------|--------------------------------------------------|
//! | /etc                    | the machine's /etc with `<node>/etc.upper` laid over it (overlayfs) |
//! | /etc/cni/net.d          | `<node>/cni/net.d` ([`NodeDirs::cni_conf`])       |
//! | /opt, /opt/cni/bin      | `<node>/opt`, `<node>/cni/bin` ([`NodeDirs::cni_bin`]) |
//! | /run (= /var/run)       | `<node>/run` (containerd's socket and state, the agent's socket) |
//! | /var/lib, /var/lib/cni  | `<node>/var/lib` (containerd, kubelet), `<node>/cni/cache` |
//! | /var/log                | `<node>/var/log` (pod logs, /var/log/virtnet)     |
//!
//! The machine's own /opt/cni/bin, /etc/cni/net.d, /var/lib/cni and /var/log are never written.
//!
//! Kernel tunables: kubelet sets vm.overcommit_memory, vm.panic_on_oom, kernel.panic,
//! kernel.panic_on_oops and kernel.keys.root_max* machine-wide unless `protectKernelDefaults`,
//! with which it refuses to start when they differ. A test machine's kernel settings are not the
//! harness's to change, so kubelet runs with `protectKernelDefaults: true` and its mount namespace
//! shows it the values it checks (read-only files bind-mounted over those /proc/sys entries);
//! nothing is written to the kernel.
//!
//! Cgroups: no systemd, so the cgroupfs driver; no QoS cgroups and no node-allocatable
//! enforcement (`cgroupsPerQOS: false`, `enforceNodeAllocatable: []`), so pod containers get
//! containerd's default cgroup (`/k8s.io/<container>`, unique per container). The machine's
//! cgroup v1 hierarchy is accepted (`failCgroupV1: false`), swap too (`failSwapOn: false`).
//! The machine grants no CAP_SYS_RESOURCE, so containerd keeps pods' oom_score_adj at or above
//! its own (`restrict_oom_score_adj`): runc cannot lower it for the sandbox.
//!
//! Teardown: the node's processes (containerd, kubelet, the runc shims) are in its network
//! namespace; the pod containers are their descendants and are killed first (see `teardown`).
//! With the last process of its mount namespace gone, every mount the node made is gone too.
//!
//! Images are imported into the node's containerd (`ctr -n k8s.io images import`), never pulled:
//! the pod sandbox image and busybox, from `e2e/tools/install`, and VirtNet's from `make image`.
use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use super::{ClusterError, components::Binaries, node_cni::NodeDirs};
use crate::{command, process::Daemon};

/// What kubelet checks under /proc/sys (its `setupKernelTunables`) and the values it expects.
const KERNEL_DEFAULTS: &[(&str, &str)] = &[
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];
/// containerd's socket as the node sees it, and kubelet's runtime endpoint.
const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// Where in a node's directory containerd keeps one directory per running task (container).
const TASKS_DIR: &str = "run/containerd/io.containerd.runtime.v2.task/k8s.io";
/// The cgroup containerd's CRI puts containers in when kubelet names no parent.
const CONTAINERD_CGROUP: &str = "k8s.io";
/// The test images `e2e/tools/install` builds (archives in the bin directory, the version in
/// `virtnet-e2e-images.version`).
const TEST_IMAGE_ARCHIVES: &[&str] = &["virtnet-e2e-busybox.oci.tar", "virtnet-e2e-pause.oci.tar"];
const TEST_IMAGES_VERSION: &str = "virtnet-e2e-images.version";

/// The images the real nodes run; `e2e/tools/install` builds both from Debian's busybox-static.
#[derive(Debug, Clone)]
pub struct TestImages {
    /// Test pods' image: busybox (sh, ping, nc, wget, ip).
    pub busybox: String,
    /// The pod sandbox image containerd starts every pod with.
    pub pause: String,
}

impl TestImages {
    /// The image names, from the version file `e2e/tools/install` wrote into `bin_dir`.
    pub fn installed(bin_dir: &Path) -> Result<Self, ClusterError> {
        let path = bin_dir.join(TEST_IMAGES_VERSION);
        let version = fs::read_to_string(&path)
            .map_err(|_| ClusterError::MissingBinary { path: path.clone() })?;
        let version = version.trim();
        Ok(Self {
            busybox: format!("localhost/virtnet-e2e/busybox:{version}"),
            pause: format!("localhost/virtnet-e2e/pause:{version}"),
        })
    }

    /// The archives to import, first missing one as the error.
    pub fn archives(bin_dir: &Path) -> Vec<PathBuf> {
        TEST_IMAGE_ARCHIVES
            .iter()
            .map(|archive| bin_dir.join(archive))
            .collect()
    }
}

/// The binaries a real node needs beyond the control plane's: kubelet (e2e/tools/install), and
/// containerd, its runc shim, runc and ctr (Debian's containerd and runc packages).
pub fn missing_binary(bin_dir: &Path) -> Option<PathBuf> {
    [bin_dir.join("kubelet"), bin_dir.join(TEST_IMAGES_VERSION)]
        .into_iter()
        .chain(TestImages::archives(bin_dir))
        .chain(
            ["containerd", "containerd-shim-runc-v2", "ctr", "runc"]
                .iter()
                .map(|name| system_binary(name)),
        )
        .find(|path| !path.is_file())
}

/// Where Debian puts `name` (containerd's in /usr/bin, runc in /usr/sbin).
fn system_binary(name: &str) -> PathBuf {
    ["/usr/bin", "/usr/sbin", "/usr/local/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| Path::new("/usr/bin").join(name))
}

/// One real node of a starting cluster.
pub struct RealNode<'a> {
    pub name: &'a str,
    pub netns: &'a str,
    pub ip: Ipv4Addr,
    pub dirs: &'a NodeDirs,
    /// kubelet's kubeconfig (its `system:node:<name>` identity).
    pub kubeconfig: &'a Path,
    /// The cluster CA, whose client certificates kubelet accepts (the apiserver's among them).
    pub ca_cert: &'a Path,
    pub logs: &'a Path,
}

impl RealNode<'_> {
    /// Writes containerd's and kubelet's configuration and the script that sets up the node's
    /// mount namespace, and returns the node's daemon: containerd and kubelet in one process
    /// group (kubelet-<node>), so stopping it is losing the node.
    pub fn prepare(&self, bins: &Binaries, images: &TestImages) -> Result<Daemon, ClusterError> {
        let root = &self.dirs.root;
        let containerd_config = root.join("containerd.toml");
        write(&containerd_config, &containerd_config_toml(&images.pause))?;
        let kubelet_config = root.join("kubelet.json");
        let config = kubelet_config_json(self.ip, self.ca_cert);
        write(&kubelet_config, &format!("{config:#}\n"))?;
        let sysctl_dir = root.join("sysctl");
        fs::create_dir_all(&sysctl_dir).map_err(|source| ClusterError::StateDir {
            path: sysctl_dir.clone(),
            source,
        })?;
        for (key, value) in KERNEL_DEFAULTS {
            write(
                &sysctl_dir.join(key.replace('/', ".")),
                &format!("{value}\n"),
            )?;
        }
        let script = root.join("node.sh");
        write(
            &script,
            &node_script(&NodeScript {
                dirs: self.dirs,
                sysctl_dir: &sysctl_dir,
                containerd: &system_binary("containerd"),
                containerd_config: &containerd_config,
                containerd_log: &self.logs.join(format!("containerd-{}.log", self.name)),
                kubelet: &bins.path("kubelet"),
                kubelet_args: &[
                    format!("--config={}", kubelet_config.display()),
                    format!("--kubeconfig={}", self.kubeconfig.display()),
                    format!("--hostname-override={}", self.name),
                    format!("--node-ip={}", self.ip),
                    "--v=1".to_owned(),
                ],
            }),
        )?;
        Ok(Daemon::new(
            format!("kubelet-{}", self.name),
            Some(self.netns.to_owned()),
            "unshare",
        )
        .args(["--mount", "--propagation", "slave", "sh"])
        .args([script.as_os_str()]))
    }
}

/// containerd's socket of the node whose directories are `dirs`, as the machine sees it.
pub fn containerd_socket(dirs: &NodeDirs) -> PathBuf {
    dirs.root.join(CONTAINERD_SOCKET.trim_start_matches('/'))
}

/// Imports OCI archives into the node's containerd, in the namespace the CRI uses.
pub fn import_images(dirs: &NodeDirs, archives: &[PathBuf]) -> Result<(), ClusterError> {
    for archive in archives {
        command::run(
            Command::new(system_binary("ctr"))
                .arg("--address")
                .arg(containerd_socket(dirs))
                .args(["--namespace", "k8s.io", "images", "import"])
                .arg(archive),
        )?;
    }
    Ok(())
}

/// Gives the image `from` (already imported) the name `to` too, as a registry push of the same
/// image under a new tag would.
pub fn tag_image(dirs: &NodeDirs, from: &str, to: &str) -> Result<(), ClusterError> {
    command::run(
        Command::new(system_binary("ctr"))
            .arg("--address")
            .arg(containerd_socket(dirs))
            .args([
                "--namespace",
                "k8s.io",
                "images",
                "tag",
                "--force",
                from,
                to,
            ]),
    )?;
    Ok(())
}

/// containerd's CRI configuration: runc with cgroupfs, CNI from the node's /opt/cni/bin and
/// /etc/cni/net.d (the first conflist by name is the pod network, as kubelet's docs expect), the
/// sandbox image imported beforehand, and pod network namespaces under its state directory (the
/// node's /run), not in the machine's /run/netns. Every other path is containerd's default,
/// which the node's mount namespace makes the node's own.
fn containerd_config_toml(sandbox_image: &str) -> String {
    format!(
        r#"version = 2
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  netns_mounts_under_state_dir = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
"#
    )
}

/// kubelet's configuration (see the module docs for the cgroup and kernel choices). The
/// apiserver reaches it with a client certificate of the cluster CA (exec, logs) and is allowed
/// everything; read-only port off; no image garbage collection or disk-pressure eviction (the
/// imported images could not be pulled back, and the disk is the machine's, shared).
fn kubelet_config_json(node_ip: Ipv4Addr, ca_cert: &Path) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": node_ip.to_string(),
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "authentication": {
            "anonymous": { "enabled": false },
            "webhook": { "enabled": false },
            "x509": { "clientCAFile": ca_cert },
        },
        "authorization": { "mode": "AlwaysAllow" },
        "containerRuntimeEndpoint": format!("unix://{CONTAINERD_SOCKET}"),
        "cgroupDriver": "cgroupfs",
        "cgroupsPerQOS": false,
        "enforceNodeAllocatable": [],
        "failCgroupV1": false,
        "failSwapOn": false,
        "protectKernelDefaults": true,
        "makeIPTablesUtilChains": false,
        "localStorageCapacityIsolation": false,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "1Mi",
            "nodefs.available": "0%",
            "nodefs.inodesFree": "0%",
            "imagefs.available": "0%",
        },
        "volumePluginDir": "/var/lib/kubelet/volume-plugins",
        "resolvConf": "/etc/resolv.conf",
        "serializeImagePulls": false,
        "shutdownGracePeriod": "0s",
    })
}

struct NodeScript<'a> {
    dirs: &'a NodeDirs,
    sysctl_dir: &'a Path,
    containerd: &'a Path,
    containerd_config: &'a Path,
    containerd_log: &'a Path,
    kubelet: &'a Path,
    kubelet_args: &'a [String],
}

/// The shell script run in the node's fresh mount namespace: the mounts of the module docs, then
/// containerd in the background and kubelet in its place (same process, same group).
fn node_script(script: &NodeScript<'_>) -> String {
    let dirs = script.dirs;
    let root = dirs.root.display();
    let mut lines = vec![
        // `unshare --propagation slave` made the namespace a slave: nothing mounted here
        // reaches the machine.
        "set -eu".to_owned(),
    ];
    for (key, _) in KERNEL_DEFAULTS {
        lines.push(format!(
            "mount --bind -o ro {}/{} /proc/sys/{key}",
            script.sysctl_dir.display(),
            key.replace('/', ".")
        ));
    }
    lines.extend([
        format!("mkdir -p {root}/etc.upper {root}/etc.work {root}/opt/cni/bin {root}/run {root}/var/log {root}/var/lib/cni"),
        format!("mount -t overlay overlay -o lowerdir=/etc,upperdir={root}/etc.upper,workdir={root}/etc.work /etc"),
        "mkdir -p /etc/cni/net.d".to_owned(),
        format!("mount --bind {} /etc/cni/net.d", dirs.cni_conf.display()),
        format!("mount --bind {root}/opt /opt"),
        format!("mount --bind {} /opt/cni/bin", dirs.cni_bin.display()),
        format!("mount --bind {root}/run /run"),
        format!("mount --bind {root}/var/log /var/log"),
        format!("mount --bind {root}/var/lib /var/lib"),
        format!("mount --bind {} /var/lib/cni", dirs.cni_cache.display()),
        format!(
            "{} --config {} >>{} 2>&1 &",
            script.containerd.display(),
            script.containerd_config.display(),
            script.containerd_log.display()
        ),
        format!("until [ -S {CONTAINERD_SOCKET} ]; do sleep 0.1; done"),
        format!(
            "exec {} {}",
            script.kubelet.display(),
            script.kubelet_args.join(" ")
        ),
    ]);
    lines.join("\n") + "\n"
}

/// Removes the cgroups containerd made for the containers of the real nodes under `nodes_dir`
/// (their tasks' directories name them) in every hierarchy, once their processes are gone:
/// runc removes them on a clean stop, never on a node that is killed.
pub fn remove_container_cgroups(nodes_dir: &Path) {
    let ids: Vec<std::ffi::OsString> = fs::read_dir(nodes_dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .flat_map(|node| {
            fs::read_dir(node.path().join(TASKS_DIR))
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .map(|task| task.file_name())
        })
        .collect();
    let hierarchies: Vec<PathBuf> = fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|hierarchy| hierarchy.path().join(CONTAINERD_CGROUP))
        .collect();
    for hierarchy in &hierarchies {
        for id in &ids {
            // Already gone, or not empty (then it is not ours to force): either way, best effort.
            let _ = fs::remove_dir(hierarchy.join(id));
        }
    }
}

fn write(path: &Path, content: &str) -> Result<(), ClusterError> {
    fs::write(path, content).map_err(|source| ClusterError::StateDir {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs() -> NodeDirs {
        NodeDirs::new(Path::new("/state/nodes"), "c-node1")
    }

    #[test]
    fn the_node_script_mounts_the_node_directories_at_their_usual_paths() {
        let dirs = dirs();
        let script = node_script(&NodeScript {
            dirs: &dirs,
            sysctl_dir: Path::new("/state/nodes/c-node1/sysctl"),
            containerd: Path::new("/usr/bin/containerd"),
            containerd_config: Path::new("/state/nodes/c-node1/containerd.toml"),
            containerd_log: Path::new("/state/logs/containerd-c-node1.log"),
            kubelet: Path::new("/bin/kubelet"),
            kubelet_args: &["--v=1".to_owned()],
        });
        for line in [
            "mount --bind /state/nodes/c-node1/cni/net.d /etc/cni/net.d",
            "mount --bind /state/nodes/c-node1/cni/bin /opt/cni/bin",
            "mount --bind /state/nodes/c-node1/run /run",
            "mount --bind -o ro /state/nodes/c-node1/sysctl/vm.overcommit_memory /proc/sys/vm/overcommit_memory",
            "exec /bin/kubelet --v=1",
        ] {
            assert!(
                script.lines().any(|l| l == line),
                "{line:?} missing:\n{script}"
            );
        }
        // The agent's socket directory is under the node's /run.
        assert!(dirs.agent_run.starts_with(dirs.root.join("run")));
    }

    #[test]
    fn kubelet_protects_the_kernel_defaults_and_uses_cgroupfs() {
        let config = kubelet_config_json(Ipv4Addr::new(10, 6, 0, 11), Path::new("/ca.crt"));
        assert_eq!(config["protectKernelDefaults"], true);
        assert_eq!(config["cgroupDriver"], "cgroupfs");
        assert_eq!(config["address"], "10.6.0.11");
    }

    #[test]
    fn containerd_uses_the_imported_sandbox_image() {
        let toml = containerd_config_toml("localhost/virtnet-e2e/pause:1");
        assert!(toml.contains(r#"sandbox_image = "localhost/virtnet-e2e/pause:1""#));
        assert!(toml.contains("netns_mounts_under_state_dir = true"));
        assert!(toml.contains("restrict_oom_score_adj = true"));
    }
}
