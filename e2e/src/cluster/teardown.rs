//! Removing everything a cluster put on the machine, from whatever state it is in: running,
//! half started, or left behind by a crashed or killed run.
use std::{fs, path::Path};

use nix::mount::{MntFlags, umount2};

use super::{ClusterError, layout::Layout, real_node};
use crate::{naming::ClusterNames, process, topology};

/// Stops the cluster's processes, deletes its network namespaces (pod namespaces included),
/// unmounts anything left under its state directory and removes that directory.
///
/// Idempotent: succeeds when nothing is there. It goes on past individual failures, so one
/// stuck namespace does not leave the others behind, and reports all of them at the end.
pub fn teardown(names: &ClusterNames, layout: &Layout) -> Result<(), ClusterError> {
    let mut leftovers = Vec::new();
    if let Err(error) = process::stop_recorded(&layout.pids) {
        leftovers.push(error.to_string());
    }

    let prefix = names.netns_prefix();
    let namespaces = topology::netns_with_prefix(&prefix)?;
    // Anything still running in the cluster's namespaces (a component whose pid file was lost,
    // a CNI plugin caught mid-call) belongs to the cluster too.
    for netns in &namespaces {
        let pids = topology::netns_pids(netns).unwrap_or_default();
        // Real nodes' pod containers run in network namespaces containerd made (not named, so
        // not listed here) as children of the runc shims, which are in the node's: they go first,
        // before their parents' death hands them to init.
        process::kill_pids(&process::descendants(&pids));
        process::kill_pids(&pids);
    }
    for netns in &namespaces {
        if let Err(error) = topology::delete_netns(netns) {
            leftovers.push(error.to_string());
        }
    }

    real_node::remove_container_cgroups(&layout.nodes);
    leftovers.extend(unmount_under(&layout.root));
    match fs::remove_dir_all(&layout.root) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => leftovers.push(format!("{}: {error}", layout.root.display())),
    }

    let remaining = topology::netns_with_prefix(&prefix)?;
    if !remaining.is_empty() {
        leftovers.push(format!("network namespaces {}", remaining.join(", ")));
    }
    if leftovers.is_empty() {
        Ok(())
    } else {
        Err(ClusterError::Teardown {
            cluster: names.cluster().to_owned(),
            leftovers: leftovers.join("; "),
        })
    }
}

/// Lazily unmounts every mount point under `root`, deepest first; returns what failed.
fn unmount_under(root: &Path) -> Vec<String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // Field 5 is the mount point; paths with spaces would be octal-escaped, ours have none.
    let mut mount_points: Vec<&str> = mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .filter(|mount_point| Path::new(mount_point).starts_with(root))
        .collect();
    mount_points.sort_by_key(|mount_point| std::cmp::Reverse(mount_point.len()));
    mount_points
        .into_iter()
        .filter_map(|mount_point| {
            umount2(mount_point, MntFlags::MNT_DETACH)
                .err()
                .map(|error| format!("mount {mount_point}: {error}"))
        })
        .collect()
}
