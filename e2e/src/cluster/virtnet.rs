//! VirtNet itself in a harness cluster, as the chart would run it: the CRDs and the chart's RBAC,
//! `virtnet controller` in the control-plane namespace and `virtnet agent` in every node namespace
//! (each as its chart ServiceAccount, through a client certificate for
//! `system:serviceaccount:kube-system:<sa>` in group `system:serviceaccounts`), virtnet-ipam and
//! virtnet-coordinator in every node's CNI bin dir and seed 000's conflist as its default network.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use super::{ClusterError, components::apiserver_url};
use crate::{
    command, kubeconfig,
    pki::{CertificateAuthority, ClientIdentity},
    process::Daemon,
};

/// The conflist that makes VirtNet the node's default network; it sorts before the bootstrap one.
pub const VIRTNET_CONFLIST: &str = "00-virtnet.conflist";
/// The Subnet seed 000's conflist allocates from.
pub const SEED_SUBNET: &str = "subnet";
const NAMESPACE: &str = "kube-system";
const RBAC_KINDS: &[&str] = &[
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
];

/// Where VirtNet's build output and sources are.
#[derive(Debug, Clone)]
pub struct VirtnetOptions {
    /// Holds `virtnet`, `virtnet-ipam` and `virtnet-coordinator` (`cargo build --workspace`).
    pub binaries: PathBuf,
    /// The repository root, for `chart/` and `chart/crds/`.
    pub repo: PathBuf,
    /// Extra environment of every `virtnet agent` (e.g. `VIRTNET_GROUP_COMMIT=false`).
    pub agent_env: Vec<String>,
}

impl VirtnetOptions {
    /// The debug build of this workspace: `$CARGO_TARGET_DIR/debug`, else `<repo>/target/debug`.
    pub fn from_workspace() -> Self {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let target =
            std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo.join("target"), PathBuf::from);
        Self {
            binaries: target.join("debug"),
            repo,
            agent_env: Vec::new(),
        }
    }

    /// The first missing VirtNet binary, if any.
    pub fn missing(&self) -> Option<PathBuf> {
        ["virtnet", "virtnet-ipam", "virtnet-coordinator"]
            .iter()
            .map(|name| self.binaries.join(name))
            .find(|path| !path.is_file())
    }
}

/// Keeps the documents of a multi-document YAML stream whose `kind` is one of `kinds`.
fn documents_of_kinds(stream: &str, kinds: &[&str]) -> String {
    stream
        .split("\n---")
        .filter(|document| {
            document.lines().any(|line| {
                line.strip_prefix("kind: ")
                    .is_some_and(|kind| kinds.contains(&kind.trim()))
            })
        })
        .map(|document| format!("---{}\n", document.trim_start_matches("---")))
        .collect()
}

/// Seed 000's conflist, talking to the agent at `socket`.
fn seed_conflist(socket: &Path) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "0.3.1",
        "name": "macvlan",
        "plugins": [
            {
                "type": "macvlan", "master": crate::topology::NODE_NIC, "mode": "bridge",
                "ipam": {"type": "virtnet-ipam", "default_subnet": SEED_SUBNET, "agent_socket": socket},
            },
            {"type": "virtnet-coordinator"},
        ],
    })
}

/// What [`install`] needs of the starting cluster.
pub struct Target<'a> {
    pub kubectl: &'a Path,
    pub helm: &'a Path,
    pub admin_kubeconfig: &'a Path,
    pub state: &'a Path,
    pub pki_dir: &'a Path,
    pub ca: &'a CertificateAuthority,
    pub control_plane_netns: &'a str,
    /// (node name, its network namespace, its directories)
    pub nodes: Vec<(String, String, super::NodeDirs)>,
}

/// Installs VirtNet and returns the daemons to start (the controller, then one agent per node).
pub fn install(options: &VirtnetOptions, target: &Target<'_>) -> Result<Vec<Daemon>, ClusterError> {
    let kubectl = |args: &[&str]| {
        command::run_stdout(
            Command::new(target.kubectl)
                .arg("--kubeconfig")
                .arg(target.admin_kubeconfig)
                .args(args),
        )
    };
    let crds = options.repo.join("chart/crds");
    let crds = crds.to_string_lossy();
    kubectl(&["apply", "-f", &crds])?;
    kubectl(&[
        "wait",
        "--for",
        "condition=established",
        "--timeout=60s",
        "-f",
        &crds,
    ])?;
    let rendered = command::run_stdout(
        Command::new(target.helm)
            .args(["template", "virtnet"])
            .arg(options.repo.join("chart"))
            .args(["--namespace", NAMESPACE]),
    )?;
    let rbac = target.state.join("virtnet-rbac.yaml");
    write(&rbac, &documents_of_kinds(&rendered, RBAC_KINDS))?;
    kubectl(&["apply", "-f", &rbac.to_string_lossy()])?;

    let virtnet = options.binaries.join("virtnet");
    let mut daemons = vec![
        Daemon::new(
            "virtnet-controller",
            Some(target.control_plane_netns.to_owned()),
            "env",
        )
        .args([
            format!(
                "KUBECONFIG={}",
                service_account_kubeconfig(target, "virtnet-controller")?.display()
            ),
            format!("POD_NAMESPACE={NAMESPACE}"),
            "VIRTNET_HTTP_ADDR=127.0.0.1:8080".to_owned(),
            virtnet.display().to_string(),
            "controller".to_owned(),
        ]),
    ];
    let agent_kubeconfig = service_account_kubeconfig(target, "virtnet-agent")?;
    for (node, netns, dirs) in &target.nodes {
        for plugin in ["virtnet-ipam", "virtnet-coordinator"] {
            let installed = dirs.cni_bin.join(plugin);
            fs::copy(options.binaries.join(plugin), &installed).map_err(|source| {
                ClusterError::StateDir {
                    path: installed.clone(),
                    source,
                }
            })?;
        }
        let socket = dirs.agent_run.join("agent.sock");
        write(
            &dirs.cni_conf.join(VIRTNET_CONFLIST),
            &format!("{:#}\n", seed_conflist(&socket)),
        )?;
        daemons.push(
            Daemon::new(format!("virtnet-agent-{node}"), Some(netns.clone()), "env")
                .args([
                    format!("KUBECONFIG={}", agent_kubeconfig.display()),
                    format!("NODE_NAME={node}"),
                    format!("VIRTNET_SOCKET={}", socket.display()),
                    "VIRTNET_HTTP_ADDR=127.0.0.1:9741".to_owned(),
                ])
                .args(options.agent_env.iter().cloned())
                .args([virtnet.display().to_string(), "agent".to_owned()]),
        );
    }
    Ok(daemons)
}

/// A kubeconfig acting as ServiceAccount `kube-system/<sa>`, so the component has exactly the
/// chart's RBAC.
fn service_account_kubeconfig(target: &Target<'_>, sa: &str) -> Result<PathBuf, ClusterError> {
    let user = format!("system:serviceaccount:{NAMESPACE}:{sa}");
    let client = target.ca.issue_client(&ClientIdentity {
        file_stem: sa,
        user: &user,
        groups: &["system:serviceaccounts"],
    })?;
    let path = target.pki_dir.join(format!("{sa}.kubeconfig"));
    kubeconfig::write(
        &path,
        &apiserver_url(),
        target.ca.cert_path(),
        &user,
        &client,
    )?;
    Ok(path)
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

    #[test]
    fn keeps_only_the_rbac_documents() {
        let stream = "---\n# Source: a\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: a\n---\napiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: d\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: r\n";
        let kept = documents_of_kinds(stream, RBAC_KINDS);
        assert!(kept.contains("kind: ServiceAccount") && kept.contains("kind: ClusterRole"));
        assert!(!kept.contains("DaemonSet"), "{kept}");
    }

    #[test]
    fn the_conflist_is_seed_000_with_the_node_socket() {
        let conflist = seed_conflist(Path::new("/state/nodes/n1/run/virtnet/agent.sock"));
        assert_eq!(conflist["plugins"][0]["ipam"]["default_subnet"], "subnet");
        assert_eq!(
            conflist["plugins"][0]["ipam"]["agent_socket"],
            "/state/nodes/n1/run/virtnet/agent.sock"
        );
        assert_eq!(conflist["plugins"][1]["type"], "virtnet-coordinator");
    }
}
