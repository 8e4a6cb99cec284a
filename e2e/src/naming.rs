//! Names of everything a cluster creates on the machine, derived from one short cluster name.
//!
//! Every network namespace starts with `<cluster>-`, so a sandbox and a test run coexist and
//! `virtnet-e2e down` can find all of a cluster's namespaces, even pod namespaces that a crashed
//! kubelet stand-in left behind, with a prefix match on `ip netns list`.

/// The longest cluster name accepted: it leaves room for `-pod-` plus an 8-character pod id in
/// names that may end up as link or bridge names (at most 15 bytes in Linux).
pub const MAX_CLUSTER_NAME_LEN: usize = 8;

/// A cluster name was rejected.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid cluster name {name:?}: use 1 to {MAX_CLUSTER_NAME_LEN} lowercase letters or digits \
     (no '-', so one cluster's prefix is never the start of another's)"
)]
pub struct InvalidClusterName {
    pub name: String,
}

/// The validated name of one cluster and every name derived from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNames {
    cluster: String,
}

impl ClusterNames {
    pub fn new(cluster: &str) -> Result<Self, InvalidClusterName> {
        let valid = !cluster.is_empty()
            && cluster.len() <= MAX_CLUSTER_NAME_LEN
            && cluster
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if valid {
            Ok(Self {
                cluster: cluster.to_owned(),
            })
        } else {
            Err(InvalidClusterName {
                name: cluster.to_owned(),
            })
        }
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The prefix shared by every network namespace of this cluster.
    pub fn netns_prefix(&self) -> String {
        format!("{}-", self.cluster)
    }

    /// The namespace holding the bridge that plays the physical L2 network.
    pub fn switch_netns(&self) -> String {
        format!("{}-sw", self.cluster)
    }

    /// The bridge inside the switch namespace.
    pub fn bridge(&self) -> String {
        format!("{}-br", self.cluster)
    }

    /// The namespace holding the bridge of the second underlay (Multus mode's `ens224` network).
    pub fn second_switch_netns(&self) -> String {
        format!("{}-sw2", self.cluster)
    }

    /// The bridge inside the second switch namespace.
    pub fn second_bridge(&self) -> String {
        format!("{}-br2", self.cluster)
    }

    /// The namespace owning the underlay gateway address.
    pub fn router_netns(&self) -> String {
        format!("{}-rt", self.cluster)
    }

    /// The namespace running etcd, kube-apiserver, kube-controller-manager and kube-scheduler.
    pub fn control_plane_netns(&self) -> String {
        format!("{}-cp", self.cluster)
    }

    /// The Kubernetes node name of the `index`-th node (1-based).
    pub fn node(&self, index: usize) -> String {
        format!("{}-node{index}", self.cluster)
    }

    /// The network namespace of a node: its name, so `ip netns exec <node>` reads naturally.
    pub fn node_netns(&self, index: usize) -> String {
        self.node(index)
    }

    /// The prefix the kubelet stand-in gives pod network namespaces (see [`pod_netns_name`]).
    pub fn pod_netns_prefix(&self) -> String {
        format!("{}-pod", self.cluster)
    }
}

/// The network namespace of a pod: `<prefix>-` plus the first 8 characters of its UID.
///
/// The UID rather than namespace/name: a pod deleted and recreated under the same name gets a
/// new namespace, so a slow CNI DEL of the old one never tears down the new pod's network.
pub fn pod_netns_name(prefix: &str, pod_uid: &str) -> String {
    let short_uid: String = pod_uid.chars().take(8).collect();
    format!("{prefix}-{short_uid}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names_are_short_lowercase_words() {
        assert!(ClusterNames::new("sandbox").is_ok());
        assert!(ClusterNames::new("e2e").is_ok());
        for bad in ["", "Sandbox", "a-b", "toolongname", "a_b"] {
            assert!(ClusterNames::new(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn every_namespace_shares_the_cluster_prefix() {
        let names = ClusterNames::new("e2e").expect("valid name");
        let prefix = names.netns_prefix();
        for netns in [
            names.switch_netns(),
            names.second_switch_netns(),
            names.router_netns(),
            names.control_plane_netns(),
            names.node_netns(3),
            pod_netns_name(&names.pod_netns_prefix(), "0123abcd-ffff"),
        ] {
            assert!(netns.starts_with(&prefix), "{netns} lacks {prefix}");
        }
    }

    #[test]
    fn pod_netns_name_uses_the_first_eight_uid_characters() {
        assert_eq!(
            pod_netns_name("e2e-pod", "0123abcd-4567-89ef-0000-111122223333"),
            "e2e-pod-0123abcd"
        );
    }

    #[test]
    fn the_longest_names_still_fit_a_link_name() {
        let names = ClusterNames::new("abcdefgh").expect("valid name");
        assert!(names.bridge().len() <= 15);
        assert!(names.second_bridge().len() <= 15);
    }
}
