//! `virtnet agent` puts on its node what the node's runtime needs, on a VirtNet cluster of its own
//! (default-CNI mode, as the harness runs every VirtNet cluster): on every node the CNI bin dir
//! holds virtnet-ipam and virtnet-coordinator byte for byte as built, executable, and the conf dir
//! the default conflist naming virtnet-ipam with the node agent's socket, next to the files that
//! were already there. An agent killed and started again rewrites nothing that is still right
//! (same bytes, same inode) and replaces a stale plugin copy.
use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context, ensure};
use serde_json::Value;
use virtnet_e2e::{
    cluster::{Cluster, EXAMPLE_SUBNET, NodeDirs, VIRTNET_CONFLIST, VirtnetOptions},
    topology::NODE_NIC,
};

use crate::support::Suite;
use crate::support::{own_virtnet_cluster, run_on_own_cluster};

const PLUGINS: [&str; 2] = ["virtnet-ipam", "virtnet-coordinator"];
/// What the harness's node dirs hold before any agent runs.
const BOOTSTRAP_CONFLIST: &str = "10-bootstrap-macvlan.conflist";
const RESTART_TIMEOUT: Duration = Duration::from_secs(60);

pub fn virtnet_agents_install_the_plugins_and_the_conflist_and_a_restart_keeps_them(
    suite: &Suite,
) -> anyhow::Result<()> {
    let virtnet = VirtnetOptions::from_workspace();
    let built = virtnet.binaries.clone();
    let mut options = own_virtnet_cluster('i', virtnet);
    options.nodes = 2;
    run_on_own_cluster(suite, options, async |cluster| {
        scenario(cluster, &built).await
    })
}

async fn scenario(cluster: &mut Cluster, built: &Path) -> anyhow::Result<()> {
    let nodes = cluster.node_names();
    for node in &nodes {
        ensure_installed(&cluster.layout().node_dirs(node), built)
            .with_context(|| format!("node {node}"))?;
    }

    let node = &nodes[0];
    let dirs = cluster.layout().node_dirs(node);
    let stale = dirs.cni_bin.join("virtnet-coordinator");
    fs::write(&stale, "a stale copy")?;
    let before = snapshot(&dirs)?;
    cluster.restart(&format!("virtnet-agent-{node}"))?;
    // The agent installs before it binds its socket, so a connection means it is done; the old
    // agent's socket file refuses connections once it is dead.
    let socket = dirs.agent_run.join("agent.sock");
    cluster
        .wait_for(
            "the restarted agent to serve its socket",
            RESTART_TIMEOUT,
            || {
                let connected = UnixStream::connect(&socket).map(drop);
                async move { connected }
            },
        )
        .await?;
    ensure_installed(&dirs, built).context("after the restart")?;
    let after = snapshot(&dirs)?;
    for (file, (bytes, inode)) in &before {
        let (bytes_after, inode_after) = after
            .get(file)
            .with_context(|| format!("{file} is gone after the restart"))?;
        if file == "virtnet-coordinator" {
            ensure!(
                inode_after != inode,
                "the stale coordinator copy was not replaced"
            );
        } else {
            ensure!(
                bytes_after == bytes && inode_after == inode,
                "{file} was rewritten by the restarted agent although it was already right"
            );
        }
    }
    Ok(())
}

/// The plugins are the built binaries, executable; the conflist is the example's for this node's
/// agent; what was there before stays and no temp file is left behind.
fn ensure_installed(dirs: &NodeDirs, built: &Path) -> anyhow::Result<()> {
    for plugin in PLUGINS {
        let installed = dirs.cni_bin.join(plugin);
        ensure!(
            fs::read(&installed)? == fs::read(built.join(plugin))?,
            "{} differs from the built {plugin}",
            installed.display()
        );
        let mode = fs::metadata(&installed)?.permissions().mode();
        ensure!(mode & 0o111 == 0o111, "{plugin} has mode {mode:o}");
    }
    let path = dirs.cni_conf.join(VIRTNET_CONFLIST);
    let conflist: Value = serde_json::from_slice(&fs::read(&path)?)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    let interface = &conflist["plugins"][0];
    let ipam = &interface["ipam"];
    let socket = dirs.agent_run.join("agent.sock");
    ensure!(
        interface["type"] == "macvlan"
            && interface["master"] == NODE_NIC
            && ipam["type"] == "virtnet-ipam"
            && ipam["default_subnet"] == EXAMPLE_SUBNET
            && ipam["agent_socket"].as_str() == socket.to_str()
            && conflist["plugins"][1]["type"] == "virtnet-coordinator",
        "{} is not the default conflist for this node: {conflist:#}",
        path.display()
    );
    ensure!(
        dirs.cni_conf.join(BOOTSTRAP_CONFLIST).is_file(),
        "{BOOTSTRAP_CONFLIST} was removed"
    );
    for dir in [&dirs.cni_bin, &dirs.cni_conf] {
        for entry in fs::read_dir(dir)? {
            let name = entry?.file_name();
            ensure!(
                !name.to_string_lossy().ends_with(".tmp"),
                "{name:?} left behind in {}",
                dir.display()
            );
        }
    }
    Ok(())
}

/// Content and inode of the agent's files on a node, by file name.
fn snapshot(dirs: &NodeDirs) -> anyhow::Result<BTreeMap<String, (Vec<u8>, u64)>> {
    let files = PLUGINS
        .iter()
        .map(|plugin| dirs.cni_bin.join(plugin))
        .chain([dirs.cni_conf.join(VIRTNET_CONFLIST)]);
    files
        .map(|path| {
            let name = path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok((name, (fs::read(&path)?, fs::metadata(&path)?.ino())))
        })
        .collect()
}
