//! Allocation keys: who holds an address, and for how long.
//!
//! StatefulSet pods and KubeVirt VMs keep their address across pod re-creation ("sticky"), so
//! their key names the stable identity (pod name, VM name). Every other pod is keyed by its UID,
//! so a same-name pod created later never inherits an address that is still being released
//! (a bug of the Go prototype).

use std::collections::BTreeMap;
use std::fmt;

/// The label KubeVirt puts on virt-launcher pods (`kubevirt.io: virt-launcher`).
pub const KUBEVIRT_LAUNCHER_LABEL: &str = "kubevirt.io";
/// The value of [`KUBEVIRT_LAUNCHER_LABEL`] on virt-launcher pods.
pub const KUBEVIRT_LAUNCHER_VALUE: &str = "virt-launcher";
/// The label naming the VM a virt-launcher pod runs.
pub const KUBEVIRT_VM_NAME_LABEL: &str = "vm.kubevirt.io/name";
/// The API group of KubeVirt's VirtualMachineInstance.
pub const KUBEVIRT_API_GROUP: &str = "kubevirt.io";

/// One owner reference of a pod, reduced to what key derivation needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerRef {
    /// The owner's kind, e.g. `StatefulSet`.
    pub kind: String,
    /// The owner's name.
    pub name: String,
    /// The owner's API group (the part of `apiVersion` before `/`; empty for the core group).
    pub api_group: String,
}

/// The facts about a pod that decide its allocation key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodFacts {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The pod's UID.
    pub uid: String,
    /// The pod's owner references.
    pub owners: Vec<OwnerRef>,
    /// The pod's labels.
    pub labels: BTreeMap<String, String>,
}

/// Who holds an allocation. Equality includes the kind, so a StatefulSet pod and a VM that
/// happen to share `namespace/name` are never mistaken for one holder.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AllocationKey {
    /// An ordinary pod: the address lives as long as this pod UID.
    Pod {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name (names the Endpoint; not part of the identity).
        name: String,
        /// The pod's UID, the identity.
        uid: String,
    },
    /// A StatefulSet pod: the address sticks to `namespace/pod-name` across re-creation.
    StatefulSetPod {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name (`<statefulset>-<ordinal>`).
        name: String,
    },
    /// A KubeVirt VM: the address sticks to `namespace/vm-name` across restarts and migrations.
    VirtualMachine {
        /// The VM's namespace.
        namespace: String,
        /// The VM's name.
        name: String,
    },
    /// An IPAMClaim (`k8s.cni.cncf.io`) of one interface: the address belongs to the claim,
    /// whichever pods use it (both pods of a live migration at once), until it is deleted.
    IpamClaim {
        /// The claim's namespace (the pod's).
        namespace: String,
        /// The claim's name, e.g. `vm1.underlay`.
        name: String,
    },
}

/// Which workloads keep their addresses when their pods are replaced (the chart's
/// `fixedIPRetention`); the controller and the agent read the same settings.
#[derive(clap::Args, Clone, Copy, Debug, PartialEq, Eq)]
pub struct FixedIpRetention {
    /// StatefulSet replicas keep their addresses until scaled down or deleted.
    #[arg(long = "fixed-ip-statefulset", env = "VIRTNET_FIXED_IP_STATEFULSET", default_value_t = true, action = clap::ArgAction::Set)]
    pub statefulset: bool,
    /// KubeVirt VMs keep their addresses until the VirtualMachine is deleted.
    #[arg(long = "fixed-ip-kubevirt", env = "VIRTNET_FIXED_IP_KUBEVIRT", default_value_t = true, action = clap::ArgAction::Set)]
    pub kubevirt: bool,
}

impl FixedIpRetention {
    /// The default: both kinds keep their addresses.
    pub const ON: Self = Self {
        statefulset: true,
        kubevirt: true,
    };
    /// Every pod is treated like a Deployment's.
    pub const OFF: Self = Self {
        statefulset: false,
        kubevirt: false,
    };
}

impl AllocationKey {
    /// The key for `pod`: sticky for a StatefulSet replica or a VM whose retention is on, else a
    /// non-sticky UID key.
    pub fn for_pod(pod: &PodFacts, retention: FixedIpRetention) -> Self {
        let sticky = virtual_machine_name(pod)
            .filter(|_| retention.kubevirt)
            .map(|vm| Self::VirtualMachine {
                namespace: pod.namespace.clone(),
                name: vm.to_string(),
            })
            .or_else(|| {
                (retention.statefulset && is_statefulset_pod(pod)).then(|| Self::StatefulSetPod {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                })
            });
        sticky.unwrap_or_else(|| Self::Pod {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            uid: pod.uid.clone(),
        })
    }

    /// Whether the address outlives the pod (StatefulSet and VM keys).
    pub fn is_sticky(&self) -> bool {
        !matches!(self, Self::Pod { .. })
    }

    /// The namespace of the Endpoint recording this allocation.
    pub fn namespace(&self) -> &str {
        match self {
            Self::Pod { namespace, .. }
            | Self::StatefulSetPod { namespace, .. }
            | Self::VirtualMachine { namespace, .. }
            | Self::IpamClaim { namespace, .. } => namespace,
        }
    }

    /// The name of the Endpoint recording this allocation: the pod name for ordinary and
    /// StatefulSet pods, the VM name for KubeVirt, the claim name for an IPAMClaim.
    pub fn endpoint_name(&self) -> &str {
        match self {
            Self::Pod { name, .. }
            | Self::StatefulSetPod { name, .. }
            | Self::VirtualMachine { name, .. }
            | Self::IpamClaim { name, .. } => name,
        }
    }

    /// The kind of holder, for records and messages: `Pod`, `StatefulSet`, `VirtualMachine` or `IPAMClaim`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Pod { .. } => "Pod",
            Self::StatefulSetPod { .. } => "StatefulSet",
            Self::VirtualMachine { .. } => "VirtualMachine",
            Self::IpamClaim { .. } => "IPAMClaim",
        }
    }
}

impl fmt::Display for AllocationKey {
    /// The key string: the pod UID, or `namespace/pod-name`, or `namespace/vm-name`.
    /// Store it together with [`AllocationKey::kind`]: the string alone does not tell a
    /// StatefulSet pod from a VM of the same name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pod { uid, .. } => f.write_str(uid),
            Self::StatefulSetPod { namespace, name }
            | Self::VirtualMachine { namespace, name }
            | Self::IpamClaim { namespace, name } => write!(f, "{namespace}/{name}"),
        }
    }
}

/// The VM a virt-launcher pod runs: the VirtualMachineInstance that owns it (a VMI has the same
/// name as its VM). Labels do not count: any pod may carry KubeVirt's launcher labels, and the
/// VM's address must not go to a pod that merely claims to run it. (The agent also drops owner
/// references whose uid is not the owner's: see `agent::plan::sticky_owner`.)
fn virtual_machine_name(pod: &PodFacts) -> Option<&str> {
    pod.owners
        .iter()
        .find(|owner| {
            owner.kind == "VirtualMachineInstance" && owner.api_group == KUBEVIRT_API_GROUP
        })
        .map(|owner| owner.name.as_str())
}

fn is_statefulset_pod(pod: &PodFacts) -> bool {
    pod.owners
        .iter()
        .any(|owner| owner.kind == "StatefulSet" && owner.api_group == "apps")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(kind: &str, name: &str, api_group: &str) -> OwnerRef {
        OwnerRef {
            kind: kind.into(),
            name: name.into(),
            api_group: api_group.into(),
        }
    }

    fn pod(name: &str, owners: Vec<OwnerRef>, labels: &[(&str, &str)]) -> PodFacts {
        PodFacts {
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            owners,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn ordinary_pods_are_keyed_by_uid() {
        let replica = pod(
            "sample-78b779bcc7-d29fb",
            vec![owner("ReplicaSet", "sample-78b779bcc7", "apps")],
            &[],
        );
        let key = AllocationKey::for_pod(&replica, FixedIpRetention::ON);
        assert_eq!(key.to_string(), "uid-sample-78b779bcc7-d29fb");
        assert!(!key.is_sticky());
        assert_eq!(key.endpoint_name(), "sample-78b779bcc7-d29fb");
        assert_eq!(key.namespace(), "default");
        assert_eq!(key.kind(), "Pod");
        let daemon = pod("ds-abcde", vec![owner("DaemonSet", "ds", "apps")], &[]);
        assert!(!AllocationKey::for_pod(&daemon, FixedIpRetention::ON).is_sticky());
        let bare = pod("bare", vec![], &[]);
        assert!(!AllocationKey::for_pod(&bare, FixedIpRetention::ON).is_sticky());
    }

    #[test]
    fn statefulset_pods_are_sticky_by_name() {
        let member = pod(
            "sample-ss-0",
            vec![owner("StatefulSet", "sample-ss", "apps")],
            &[],
        );
        let key = AllocationKey::for_pod(&member, FixedIpRetention::ON);
        assert_eq!(key.to_string(), "default/sample-ss-0");
        assert!(key.is_sticky());
        assert_eq!(key.endpoint_name(), "sample-ss-0");
        assert_eq!(key.kind(), "StatefulSet");
        let recreated = PodFacts {
            uid: "another-uid".into(),
            ..member.clone()
        };
        assert_eq!(
            AllocationKey::for_pod(&recreated, FixedIpRetention::ON),
            key,
            "survives re-creation"
        );
        let third_party = pod(
            "kruise-0",
            vec![owner("StatefulSet", "kruise", "apps.kruise.io")],
            &[],
        );
        assert!(!AllocationKey::for_pod(&third_party, FixedIpRetention::ON).is_sticky());
    }

    #[test]
    fn kubevirt_pods_are_sticky_by_vm_name() {
        let by_owner = pod(
            "virt-launcher-vm1-x7k2p",
            vec![owner("VirtualMachineInstance", "vm1", "kubevirt.io")],
            &[
                ("kubevirt.io", "virt-launcher"),
                ("vm.kubevirt.io/name", "vm1"),
            ],
        );
        let key = AllocationKey::for_pod(&by_owner, FixedIpRetention::ON);
        assert_eq!(key.to_string(), "default/vm1");
        assert_eq!(key.endpoint_name(), "vm1");
        assert_eq!(key.kind(), "VirtualMachine");
        let migrated = pod(
            "virt-launcher-vm1-q9zzz",
            vec![owner("VirtualMachineInstance", "vm1", "kubevirt.io")],
            &[],
        );
        assert_eq!(
            AllocationKey::for_pod(&migrated, FixedIpRetention::ON),
            key,
            "same VM after migration"
        );
        let forged = pod(
            "imposter",
            vec![],
            &[
                ("kubevirt.io", "virt-launcher"),
                ("vm.kubevirt.io/name", "vm1"),
            ],
        );
        assert!(
            !AllocationKey::for_pod(&forged, FixedIpRetention::ON).is_sticky(),
            "labels alone never make a pod the VM's"
        );
        let label_without_vm = pod(
            "virt-launcher-x",
            vec![],
            &[("kubevirt.io", "virt-launcher")],
        );
        assert!(!AllocationKey::for_pod(&label_without_vm, FixedIpRetention::ON).is_sticky());
    }

    #[test]
    fn retention_off_makes_every_key_ephemeral() {
        let member = pod(
            "sample-ss-0",
            vec![owner("StatefulSet", "sample-ss", "apps")],
            &[],
        );
        let vm = pod(
            "virt-launcher-vm1-x",
            vec![owner("VirtualMachineInstance", "vm1", "kubevirt.io")],
            &[],
        );
        for facts in [&member, &vm] {
            let key = AllocationKey::for_pod(facts, FixedIpRetention::OFF);
            assert!(!key.is_sticky());
            assert_eq!(key.to_string(), facts.uid);
            assert_eq!(key.endpoint_name(), facts.name);
        }
        // Each kind has its own switch.
        let statefulsets_only = FixedIpRetention {
            statefulset: true,
            kubevirt: false,
        };
        assert!(AllocationKey::for_pod(&member, statefulsets_only).is_sticky());
        assert!(!AllocationKey::for_pod(&vm, statefulsets_only).is_sticky());
        let vms_only = FixedIpRetention {
            statefulset: false,
            kubevirt: true,
        };
        assert!(!AllocationKey::for_pod(&member, vms_only).is_sticky());
        assert!(AllocationKey::for_pod(&vm, vms_only).is_sticky());
    }

    #[test]
    fn statefulset_pod_and_vm_of_one_name_are_different_holders() {
        let member = pod("web", vec![owner("StatefulSet", "w", "apps")], &[]);
        let vm = pod(
            "virt-launcher-web-x",
            vec![owner("VirtualMachineInstance", "web", "kubevirt.io")],
            &[],
        );
        let (a, b) = (
            AllocationKey::for_pod(&member, FixedIpRetention::ON),
            AllocationKey::for_pod(&vm, FixedIpRetention::ON),
        );
        assert_eq!(a.to_string(), b.to_string());
        assert_ne!(a, b);
    }
}
