//! Multus mode of a VirtNet cluster: the NetworkAttachmentDefinition CRD, Multus v4 (thin
//! plugin) as every node's default CNI with a kubeconfig of its own and least-privilege RBAC
//! (`multus.yaml`), and the conflist `virtnet agent` wrote (the example's), or the bootstrap
//! network standing for another primary CNI, as the cluster default network Multus delegates to, the way Multus's thin entrypoint generates `00-multus.conf` from
//! the node's first conflist once the default network's installer has written it.
//! Pods then pick another default network (`v1.multus-cni.io/default-network`) or extra NICs
//! (`k8s.v1.cni.cncf.io/networks`) from NetworkAttachmentDefinitions.
use std::{fs, path::Path};

use super::{
    ClusterError, NodeDirs,
    components::apiserver_url,
    node_cni::BOOTSTRAP_CONFLIST,
    virtnet::{Target, VIRTNET_CONFLIST},
};
use crate::{kubeconfig, pki::CertAndKey};

/// Sorts before VirtNet's conflist, so the kubelet runs Multus, which runs VirtNet's.
const MULTUS_CONF: &str = "00-multus.conf";
/// The CRD and RBAC of Multus mode.
const MANIFEST: &str = include_str!("multus.yaml");
const NAD_CRD: &str = "crd/network-attachment-definitions.k8s.cni.cncf.io";
const SERVICE_ACCOUNT: &str = "multus";

/// Multus installed cluster-wide, ready to be configured on each node.
pub struct Multus {
    user: String,
    client: CertAndKey,
}

impl Multus {
    /// Applies the CRD and RBAC and issues Multus's client certificate.
    pub fn install(
        target: &Target<'_>,
        kubectl: impl Fn(&[&str]) -> Result<String, ClusterError>,
    ) -> Result<Self, ClusterError> {
        let manifest = target.state.join("multus.yaml");
        super::virtnet::write(&manifest, MANIFEST)?;
        kubectl(&["apply", "-f", &manifest.to_string_lossy()])?;
        kubectl(&[
            "wait",
            "--for",
            "condition=established",
            "--timeout=60s",
            NAD_CRD,
        ])?;
        let (user, client) = super::virtnet::service_account_client(target, SERVICE_ACCOUNT)?;
        Ok(Self { user, client })
    }

    /// Links the plugin into the node's CNI bin dir and writes its kubeconfig and `00-multus.conf`
    /// delegating to the cluster network: VirtNet's conflist (which the node's agent must have
    /// written) when `virtnet_is_default`, else the bootstrap network, standing for another
    /// primary CNI. Multus logs to `<logs>/multus-<node>.log`.
    pub fn configure_node(
        &self,
        target: &Target<'_>,
        node: &str,
        dirs: &NodeDirs,
        virtnet_is_default: bool,
    ) -> Result<(), ClusterError> {
        let state_error = |path: &Path| {
            let path = path.to_owned();
            move |source| ClusterError::StateDir { path, source }
        };
        let cluster_conflist = dirs.cni_conf.join(if virtnet_is_default {
            VIRTNET_CONFLIST
        } else {
            BOOTSTRAP_CONFLIST
        });
        let cluster_network: serde_json::Value = fs::read(&cluster_conflist)
            .map_err(state_error(&cluster_conflist))
            .and_then(|bytes| {
                serde_json::from_slice(&bytes).map_err(|error| ClusterError::StateDir {
                    path: cluster_conflist.clone(),
                    source: error.into(),
                })
            })?;
        let plugin = dirs.cni_bin.join("multus");
        std::os::unix::fs::symlink(target.bin_dir.join("multus"), &plugin)
            .map_err(state_error(&plugin))?;
        // Where the Multus DaemonSet puts it on a real node: /etc/cni/net.d/multus.d/.
        let kubeconfig_dir = dirs.cni_conf.join("multus.d");
        fs::create_dir_all(&kubeconfig_dir).map_err(state_error(&kubeconfig_dir))?;
        let kubeconfig = kubeconfig_dir.join("multus.kubeconfig");
        kubeconfig::write(
            &kubeconfig,
            &apiserver_url(),
            target.ca.cert_path(),
            &self.user,
            &self.client,
        )?;
        let conf = multus_conf(
            &cluster_network,
            &kubeconfig,
            dirs,
            &target.logs.join(format!("multus-{node}.log")),
        );
        super::virtnet::write(&dirs.cni_conf.join(MULTUS_CONF), &format!("{conf:#}\n"))
    }
}

/// The thin plugin's config: `cluster_network` as its first (default) delegate, and every
/// directory it would otherwise take machine-wide (/opt/cni/bin, /var/lib/cni/multus,
/// /etc/cni/multus/net.d) inside the node's own.
fn multus_conf(
    cluster_network: &serde_json::Value,
    kubeconfig: &Path,
    dirs: &NodeDirs,
    log_file: &Path,
) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "0.3.1",
        "name": "multus-cni-network",
        "type": "multus",
        "kubeconfig": kubeconfig,
        "binDir": dirs.cni_bin,
        "confDir": dirs.cni_conf,
        // Multus keeps each pod's delegates here for a DEL that comes after the pod is gone.
        "cniDir": dirs.cni_cache.join("multus"),
        "logFile": log_file,
        "logLevel": "verbose",
        "logToStderr": false,
        "delegates": [cluster_network],
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn the_conf_delegates_to_the_cluster_network_and_stays_in_the_node_dirs() {
        let dirs = NodeDirs::new(Path::new("/state/nodes"), "n1");
        let delegate = serde_json::json!({"cniVersion": "0.3.1", "name": "macvlan", "plugins": []});
        let conf = multus_conf(
            &delegate,
            Path::new("/k"),
            &dirs,
            &PathBuf::from("/logs/multus-n1.log"),
        );
        assert_eq!(conf["type"], "multus");
        assert_eq!(conf["delegates"][0], delegate);
        for key in ["binDir", "confDir", "cniDir"] {
            let dir = conf[key].as_str().unwrap_or_default();
            assert!(dir.starts_with("/state/nodes/n1/"), "{key} = {dir}");
        }
    }

    #[test]
    fn the_manifest_defines_the_crd_and_grants_only_reads_of_pods_and_networks() {
        assert!(MANIFEST.contains("name: network-attachment-definitions.k8s.cni.cncf.io"));
        assert!(!MANIFEST.contains("\"*\""), "no wildcard grants");
        assert!(!MANIFEST.contains("\"list\"") && !MANIFEST.contains("\"watch\""));
    }
}
