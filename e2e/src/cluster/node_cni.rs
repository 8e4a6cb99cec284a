//! Each node's CNI directories and the bootstrap network the harness wires pods with until
//! virtnet-agent writes VirtNet's own conflist: the real macvlan plugin on the node's NIC with
//! host-local IPAM.
use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use crate::topology::{GATEWAY_V4, NODE_NIC, underlay_cidr};

/// The underlay addresses the bootstrap network hands to pods, away from the hosts (10.6.0.x,
/// 10.6.1.x) and from the Subnet of VirtNet's README (10.6.153.100-255).
pub const POD_RANGE_FIRST: Ipv4Addr = Ipv4Addr::new(10, 6, 200, 10);
pub const POD_RANGE_LAST: Ipv4Addr = Ipv4Addr::new(10, 6, 200, 250);

/// The bootstrap network's conflist in each node's CNI config directory.
pub const BOOTSTRAP_CONFLIST: &str = "10-bootstrap-macvlan.conflist";

/// The CNI reference plugins `e2e/tools/install` builds; each node's bin dir links all of them.
pub const CNI_PLUGINS: &[&str] = &[
    "macvlan",
    "ipvlan",
    "bridge",
    "loopback",
    "host-local",
    "static",
    "tuning",
];

/// The node's directories could not be prepared.
#[derive(Debug, thiserror::Error)]
#[error("cannot prepare {path}: {source} (is the state directory writable?)")]
pub struct NodeDirError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Everything one node keeps on "its disk", under `<state>/nodes/<node>/`, so nodes sharing
/// this machine never see each other's CNI configuration, cache, IPAM state or sockets.
#[derive(Debug, Clone)]
pub struct NodeDirs {
    pub root: PathBuf,
    /// What /etc/cni/net.d is on a real node.
    pub cni_conf: PathBuf,
    /// What /opt/cni/bin is on a real node.
    pub cni_bin: PathBuf,
    /// What /var/lib/cni is on a real node (libcni's result cache).
    pub cni_cache: PathBuf,
    /// host-local's allocation files (its default, /var/lib/cni/networks, is machine-wide).
    pub host_local_data: PathBuf,
    /// Where virtnet-agent will put its socket (a hostPath /run/virtnet on a real node).
    pub agent_run: PathBuf,
}

impl NodeDirs {
    pub fn new(nodes_dir: &Path, node: &str) -> Self {
        let root = nodes_dir.join(node);
        Self {
            cni_conf: root.join("cni/net.d"),
            cni_bin: root.join("cni/bin"),
            cni_cache: root.join("cni/cache"),
            host_local_data: root.join("cni/host-local"),
            agent_run: root.join("run/virtnet"),
            root,
        }
    }

    /// Creates the directories, links the CNI plugins from `bin_dir` and writes the bootstrap
    /// conflist for the `index`-th of `nodes` nodes.
    pub fn prepare(&self, bin_dir: &Path, index: usize, nodes: usize) -> Result<(), NodeDirError> {
        for dir in [
            &self.cni_conf,
            &self.cni_bin,
            &self.cni_cache,
            &self.host_local_data,
            &self.agent_run,
        ] {
            fs::create_dir_all(dir).map_err(|source| NodeDirError {
                path: dir.clone(),
                source,
            })?;
        }
        for plugin in CNI_PLUGINS {
            let link = self.cni_bin.join(plugin);
            std::os::unix::fs::symlink(bin_dir.join(plugin), &link)
                .map_err(|source| NodeDirError { path: link, source })?;
        }
        let conflist = self.cni_conf.join(BOOTSTRAP_CONFLIST);
        let content = bootstrap_conflist(&self.host_local_data, index, nodes);
        fs::write(&conflist, format!("{content:#}\n")).map_err(|source| NodeDirError {
            path: conflist,
            source,
        })
    }
}

/// The slice of the pod range that node `index` (1-based) of `nodes` allocates from: host-local
/// keeps its state per node, so overlapping ranges would hand one address to two pods.
pub fn node_pod_range(index: usize, nodes: usize) -> (Ipv4Addr, Ipv4Addr) {
    let first = u32::from(POD_RANGE_FIRST);
    let last = u32::from(POD_RANGE_LAST);
    let nodes = u32::try_from(nodes.max(1)).unwrap_or(u32::MAX);
    let position = u32::try_from(index.saturating_sub(1)).unwrap_or(u32::MAX);
    let share = (last - first + 1) / nodes;
    let start = first + position * share;
    // The last node also takes the remainder of the division.
    let end = if position + 1 == nodes {
        last
    } else {
        start + share - 1
    };
    (Ipv4Addr::from(start), Ipv4Addr::from(end))
}

/// macvlan in bridge mode on the node's NIC, as in VirtNet's README, with host-local standing in
/// for virtnet-ipam.
fn bootstrap_conflist(host_local_data: &Path, index: usize, nodes: usize) -> serde_json::Value {
    let (range_start, range_end) = node_pod_range(index, nodes);
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "bootstrap-macvlan",
        "plugins": [{
            "type": "macvlan",
            "master": NODE_NIC,
            "mode": "bridge",
            "ipam": {
                "type": "host-local",
                "dataDir": host_local_data,
                "ranges": [[{
                    "subnet": underlay_cidr(),
                    "rangeStart": range_start.to_string(),
                    "rangeEnd": range_end.to_string(),
                    "gateway": GATEWAY_V4.to_string(),
                }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
            },
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ranges_split_the_pod_range_without_overlap_or_gap() {
        let nodes = 3;
        let ranges: Vec<_> = (1..=nodes).map(|i| node_pod_range(i, nodes)).collect();
        assert_eq!(ranges[0].0, POD_RANGE_FIRST);
        assert_eq!(ranges[nodes - 1].1, POD_RANGE_LAST);
        for pair in ranges.windows(2) {
            assert_eq!(u32::from(pair[0].1) + 1, u32::from(pair[1].0));
        }
    }

    #[test]
    fn a_single_node_gets_the_whole_range() {
        assert_eq!(node_pod_range(1, 1), (POD_RANGE_FIRST, POD_RANGE_LAST));
    }
}
