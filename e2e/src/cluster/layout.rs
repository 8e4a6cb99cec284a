//! Where a cluster keeps its files: one state directory per cluster, removed by teardown.
use std::path::{Path, PathBuf};

use super::node_cni::NodeDirs;

/// The default parent of state directories: `<parent>/<cluster name>`.
pub const DEFAULT_STATE_PARENT: &str = "/tmp/virtnet-e2e";

#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
    pub pki: PathBuf,
    pub logs: PathBuf,
    pub pids: PathBuf,
    pub etcd_data: PathBuf,
    pub nodes: PathBuf,
    /// The admin kubeconfig, pointing at the loopback forwarder.
    pub admin_kubeconfig: PathBuf,
    /// Where the forwarder writes the address it listens on.
    pub forwarder_address: PathBuf,
}

impl Layout {
    pub fn new(root: &Path) -> Self {
        Self {
            pki: root.join("pki"),
            logs: root.join("logs"),
            pids: root.join("pids"),
            etcd_data: root.join("etcd"),
            nodes: root.join("nodes"),
            admin_kubeconfig: root.join("kubeconfig"),
            forwarder_address: root.join("apiserver-forwarder.address"),
            root: root.to_owned(),
        }
    }

    pub fn for_cluster(state_dir: Option<&Path>, cluster: &str) -> Self {
        match state_dir {
            Some(dir) => Self::new(dir),
            None => Self::new(&Path::new(DEFAULT_STATE_PARENT).join(cluster)),
        }
    }

    /// A kubeconfig in the PKI directory, for a component that runs inside the namespaces.
    pub fn component_kubeconfig(&self, component: &str) -> PathBuf {
        self.pki.join(format!("{component}.kubeconfig"))
    }

    pub fn node_dirs(&self, node: &str) -> NodeDirs {
        NodeDirs::new(&self.nodes, node)
    }
}
