//! The Endpoint lifecycle: when the addresses of an Endpoint go back to their pools.
//!
//! [`decide`] is a pure function of one Endpoint and what the caches show about its holder; the
//! reconciler in [`super::endpoint`] gathers the facts and applies the decision. The rule it
//! never breaks: **an address whose holder is alive is never released**. A sticky owner (a valid
//! StatefulSet replica or an existing VirtualMachine) keeps the addresses whatever its pod does;
//! once the owner no longer keeps them, they still wait until the pod that uses them is dead.
//!
//! The holder pod is the pod whose UID is the Endpoint's `podUID` (looked up by the Endpoint's
//! name, or for a VirtualMachine among the namespace's pods by UID). "Dead" is, first match wins:
//!
//! | Holder pod (and its node)                                             | Pod verdict           |
//! |-----------------------------------------------------------------------|-----------------------|
//! | no such pod, but the Endpoint is younger than the orphan grace         | alive (the pod cache may lag the agent) |
//! | its node is NotReady and not fenced                                   | alive (see below)     |
//! | its node object is gone                                               | dead: `NodeGone`      |
//! | its node is fenced (tainted `node.kubernetes.io/out-of-service`)      | dead: `NodeFenced`    |
//! | no such pod, and the pod cache saw it deleted or listed all pods well after the Endpoint was written | dead: `PodDeleted` |
//! | no pod of that name (force-deleted, or deleted and DEL never came)    | dead: `PodDeleted`    |
//! | a pod of that name with another UID (recreated under the same name)   | dead: `PodReplaced`   |
//! | phase Succeeded or Failed                                             | dead: `PodCompleted`  |
//! | anything else (Pending, Running, Terminating however long)            | alive                 |
//!
//! A verdict of "alive" that only the orphan grace upholds (a young Endpoint whose pod the cache
//! does not show) is re-examined when that grace ends ([`recheck_after`]), not only at the next
//! sweep.
//!
//! Nothing is reclaimed on a node that is NotReady and not fenced, whatever its pods' state: a
//! node cut off from the API server may still be on the underlay, its sandboxes answering ARP for
//! their addresses, and handing one out again would put it on the wire twice. Its addresses come
//! back through its kubelet's DELs once it returns, or when an administrator fences the node
//! (the `node.kubernetes.io/out-of-service` taint of non-graceful node shutdown, which says it is
//! powered off) or deletes it. Likewise a pod Terminating on a Ready node keeps its addresses
//! until its kubelet's DEL: the kubelet is still tearing its sandbox down, and it retries a
//! failed DEL.
//!
//! The decision, with the sticky owner first:
//!
//! | Endpoint                                   | Owner state                                    | Pod verdict | Decision                           |
//! |--------------------------------------------|------------------------------------------------|-------------|------------------------------------|
//! | sticky StatefulSet, retention on           | exists, not deleting, ordinal in `[start, start+replicas)` | any | Keep                       |
//! | sticky StatefulSet, retention on           | ordinal outside the range (scaled down)        | dead        | Release `StatefulSetScaledDown`    |
//! | sticky StatefulSet, retention on           | gone or deleting (incl. orphan cascade)        | dead        | Release `StatefulSetDeleted`       |
//! | sticky VirtualMachine, retention on        | exists, not deleting (pod/VMI deleted, restart, migration) | any | Keep                   |
//! | sticky VirtualMachine, retention on        | gone or deleting                               | dead        | Release `VirtualMachineDeleted`    |
//! | IPAMClaim (always sticky)                  | exists, not deleting (pods come and go, migration) | any     | Keep                               |
//! | IPAMClaim                                  | gone or deleting                               | dead        | Release `IPAMClaimDeleted`         |
//! | sticky, owner no longer keeps it           | —                                              | alive       | Keep (until the pod dies)          |
//! | not sticky, or its retention switched off  | —                                              | dead        | Release (the pod verdict's reason) |
//! | not sticky, or its retention switched off  | —                                              | alive       | Keep                               |
//!
//! Releases are guarded in the pools: a record is removed only while it still names this
//! Endpoint and its `podUID`, so a same-name pod that took the address over is never robbed.
//!
//! The sweep adds one more rule ([`plan_orphans`]): an allocation that no Endpoint lists, seen
//! unlisted for longer than the orphan grace (the agent writes the pool before the Endpoint), and
//! whose pod is not alive, is released with reason `OrphanAllocation`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::crd::{EndpointSpec, IPAM_CLAIM_KIND};

/// The owner kinds (as the agent records them in `spec.ownerKind`) whose addresses are sticky.
pub const OWNER_STATEFULSET: &str = "StatefulSet";
/// See [`OWNER_STATEFULSET`].
pub const OWNER_VIRTUAL_MACHINE: &str = "VirtualMachine";

/// Switches and grace periods of the lifecycle.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// StatefulSet replicas keep their addresses until scaled down or deleted.
    pub fixed_ip_statefulset: bool,
    /// KubeVirt VMs keep their addresses until the VirtualMachine is deleted.
    pub fixed_ip_kubevirt: bool,
    /// How long an allocation may be unlisted by any Endpoint before the sweep reclaims it.
    pub orphan_grace: SignedDuration,
}

/// Why addresses were released (metric label and Event reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    PodDeleted,
    PodReplaced,
    PodCompleted,
    NodeGone,
    NodeFenced,
    StatefulSetScaledDown,
    StatefulSetDeleted,
    VirtualMachineDeleted,
    IpamClaimDeleted,
    OrphanAllocation,
}

impl Reason {
    /// The reason in UpperCamelCase, as Events and metrics show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PodDeleted => "PodDeleted",
            Self::PodReplaced => "PodReplaced",
            Self::PodCompleted => "PodCompleted",
            Self::NodeGone => "NodeGone",
            Self::NodeFenced => "NodeFenced",
            Self::StatefulSetScaledDown => "StatefulSetScaledDown",
            Self::StatefulSetDeleted => "StatefulSetDeleted",
            Self::VirtualMachineDeleted => "VirtualMachineDeleted",
            Self::IpamClaimDeleted => "IPAMClaimDeleted",
            Self::OrphanAllocation => "OrphanAllocation",
        }
    }
}

/// What to do with one Endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Keep,
    Release(Reason),
}

/// The holder pod as the cache shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodView {
    /// No such pod, and its absence is not the cache lagging behind a new pod: the watch
    /// delivered its deletion, or the cache listed every pod well after the Endpoint was written.
    Deleted,
    /// No such pod.
    Gone,
    /// A pod of the Endpoint's name exists, with another UID.
    Replaced,
    Present(PodState),
}

/// The parts of a present pod that matter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodState {
    /// Phase Succeeded or Failed.
    pub terminal: bool,
}

/// The node of the Endpoint (`spec.node`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeView {
    Gone,
    /// Tainted `node.kubernetes.io/out-of-service`: shut down, whatever its Ready condition says.
    Fenced,
    Ready,
    /// Ready is False or Unknown (and the node is not fenced).
    NotReady,
}

/// The sticky owner as the cache shows it (`None` inside: not found).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerView {
    /// Not looked up: the Endpoint is not sticky, or its retention is off.
    NotSticky,
    StatefulSet(Option<StatefulSetView>),
    VirtualMachine(Option<VirtualMachineView>),
    IpamClaim(Option<IpamClaimView>),
}

/// A StatefulSet's deletion state and ordinal range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatefulSetView {
    pub deleting: bool,
    pub replicas: i32,
    /// `spec.ordinals.start` (0 when unset).
    pub ordinals_start: i32,
}

/// A VirtualMachine's deletion state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtualMachineView {
    pub deleting: bool,
}

/// An IPAMClaim's deletion state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpamClaimView {
    pub deleting: bool,
}

/// Everything [`decide`] looks at besides the Endpoint.
#[derive(Clone, Copy, Debug)]
pub struct Observed {
    pub pod: PodView,
    pub node: NodeView,
    pub owner: OwnerView,
    /// When the Endpoint was created.
    pub endpoint_created: Timestamp,
    pub now: Timestamp,
}

/// Which sticky owner, if any, the Endpoint's addresses follow under `settings`.
pub fn sticky_owner(spec: &EndpointSpec, settings: &Settings) -> Option<&'static str> {
    if !spec.sticky {
        return None;
    }
    match spec.owner_kind.as_str() {
        OWNER_STATEFULSET if settings.fixed_ip_statefulset => Some(OWNER_STATEFULSET),
        OWNER_VIRTUAL_MACHINE if settings.fixed_ip_kubevirt => Some(OWNER_VIRTUAL_MACHINE),
        // A claim's address is the claim's: no retention switch turns that off.
        IPAM_CLAIM_KIND => Some(IPAM_CLAIM_KIND),
        _ => None,
    }
}

/// Decides one Endpoint (named `name`); see the module docs for the table.
pub fn decide(
    name: &str,
    spec: &EndpointSpec,
    observed: &Observed,
    settings: &Settings,
) -> Decision {
    let pod_dead = pod_verdict(observed, settings);
    let owner_gone = match observed.owner {
        OwnerView::NotSticky => return pod_dead.map_or(Decision::Keep, Decision::Release),
        OwnerView::StatefulSet(statefulset) => statefulset_verdict(name, spec, statefulset),
        OwnerView::VirtualMachine(Some(vm)) if !vm.deleting => None,
        OwnerView::VirtualMachine(_) => Some(Reason::VirtualMachineDeleted),
        OwnerView::IpamClaim(Some(claim)) if !claim.deleting => None,
        OwnerView::IpamClaim(_) => Some(Reason::IpamClaimDeleted),
    };
    match (owner_gone, pod_dead) {
        (Some(reason), Some(_)) => Decision::Release(reason),
        _ => Decision::Keep,
    }
}

/// `Some(reason)` when the holder pod is dead.
fn pod_verdict(observed: &Observed, settings: &Settings) -> Option<Reason> {
    let young = observed.now.duration_since(observed.endpoint_created) < settings.orphan_grace;
    if observed.pod == PodView::Gone && young {
        return None;
    }
    match observed.node {
        NodeView::NotReady => return None,
        NodeView::Gone => return Some(Reason::NodeGone),
        NodeView::Fenced => return Some(Reason::NodeFenced),
        NodeView::Ready => {}
    }
    match observed.pod {
        PodView::Gone | PodView::Deleted => Some(Reason::PodDeleted),
        PodView::Replaced => Some(Reason::PodReplaced),
        PodView::Present(pod) => pod.terminal.then_some(Reason::PodCompleted),
    }
}

/// Allowance for clock skew between the API server and the controller, for the second
/// granularity of `creationTimestamp`, and for a list served from a slightly stale watch cache.
const CLOCK_SKEW: SignedDuration = SignedDuration::from_secs(5);

/// What it means that the pod cache does not hold the holder pod: [`PodView::Deleted`] when the
/// watch delivered its deletion, or when the cache's first list was begun well after the
/// Endpoint was written (the agent writes it while the pod exists, so that list would show the
/// pod unless it was deleted, perhaps while no controller ran); else [`PodView::Gone`], which
/// may be the cache lagging behind a brand-new pod.
pub fn absent_pod(
    endpoint_created: Timestamp,
    pods_listed_after: Timestamp,
    deletion_seen: bool,
) -> PodView {
    if deletion_seen || endpoint_created + CLOCK_SKEW < pods_listed_after {
        PodView::Deleted
    } else {
        PodView::Gone
    }
}

/// When the orphan grace that keeps a pod the cache does not show "alive" ends, so the Endpoint
/// is decided again then; `None` when no grace is running (the verdict only changes with the
/// cluster's state).
pub fn recheck_after(observed: &Observed, settings: &Settings) -> Option<SignedDuration> {
    if observed.pod != PodView::Gone {
        return None;
    }
    let left = (observed.endpoint_created + settings.orphan_grace).duration_since(observed.now);
    left.is_positive().then_some(left)
}

/// `Some(reason)` when the StatefulSet no longer keeps replica `name`.
fn statefulset_verdict(
    name: &str,
    spec: &EndpointSpec,
    statefulset: Option<StatefulSetView>,
) -> Option<Reason> {
    let Some(statefulset) = statefulset.filter(|statefulset| !statefulset.deleting) else {
        return Some(Reason::StatefulSetDeleted);
    };
    let ordinal = name
        .strip_prefix(spec.owner_name.as_str())
        .and_then(|rest| rest.strip_prefix('-'))
        .and_then(|ordinal| ordinal.parse::<i64>().ok());
    let start = i64::from(statefulset.ordinals_start);
    let end = start + i64::from(statefulset.replicas);
    match ordinal {
        Some(ordinal) if (start..end).contains(&ordinal) => None,
        _ => Some(Reason::StatefulSetScaledDown),
    }
}

/// One allocation record of a pool: `status.allocations[address]` of `pool`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AllocationRef {
    pub pool: String,
    pub address: IpAddr,
    /// The record's `endpoint` (`namespace/name`).
    pub endpoint: String,
    /// The record's `podUID`.
    pub pod_uid: String,
}

/// One pool record of an address, as the sweep sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SweptRecord<'a> {
    pub pool: &'a str,
    pub subnet: &'a str,
    /// The record's `endpoint` (`namespace/name`).
    pub endpoint: &'a str,
}

/// Whether `record`, one of `copies` (every pool record of `address`), counts as listed: an
/// Endpoint lists the address in a pool of the same Subnet that records it for the same holder.
/// While a resize hands an address over, two pools record it and the Endpoint names one of
/// them; the other copy is no orphan (reclaiming it could free the address in a pool that
/// already offers it).
pub fn listed_with_its_copies(
    copies: &[SweptRecord<'_>],
    record: &SweptRecord<'_>,
    address: IpAddr,
    listed: &BTreeSet<(String, IpAddr)>,
) -> bool {
    copies.iter().any(|copy| {
        copy.subnet == record.subnet
            && copy.endpoint == record.endpoint
            && listed.contains(&(copy.pool.to_owned(), address))
    })
}

/// What the sweep does with allocations that no Endpoint lists.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct OrphanPlan {
    /// Release these (guarded by their endpoint and podUID).
    pub release: Vec<AllocationRef>,
    /// Unlisted allocations still within their grace (or with a live pod), with when they
    /// were first seen unlisted; the next sweep passes them back in.
    pub suspects: BTreeMap<AllocationRef, Timestamp>,
}

/// Plans the release of unlisted allocations.
///
/// `listed` holds `(pool, address)` of every address some Endpoint lists; `pod_alive` tells
/// whether the pod of a UID is alive; `suspects` is the previous sweep's
/// [`OrphanPlan::suspects`].
pub fn plan_orphans(
    allocations: impl IntoIterator<Item = AllocationRef>,
    listed: &BTreeSet<(String, IpAddr)>,
    pod_alive: impl Fn(&str) -> bool,
    suspects: &BTreeMap<AllocationRef, Timestamp>,
    now: Timestamp,
    grace: SignedDuration,
) -> OrphanPlan {
    let mut plan = OrphanPlan::default();
    for allocation in allocations {
        if listed.contains(&(allocation.pool.clone(), allocation.address)) {
            continue;
        }
        let first_seen = suspects.get(&allocation).copied().unwrap_or(now);
        if now.duration_since(first_seen) >= grace && !pod_alive(&allocation.pod_uid) {
            plan.release.push(allocation);
        } else {
            plan.suspects.insert(allocation, first_seen);
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            fixed_ip_statefulset: true,
            fixed_ip_kubevirt: true,
            orphan_grace: SignedDuration::from_secs(30),
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).expect("valid timestamp")
    }

    fn spec(owner_kind: &str, owner_name: &str, sticky: bool) -> EndpointSpec {
        EndpointSpec {
            interfaces: Vec::new(),
            owner_kind: owner_kind.into(),
            owner_name: owner_name.into(),
            node: "node1".into(),
            pod_uid: "uid-1".into(),
            container_id: "c1".into(),
            sticky,
        }
    }

    fn running() -> PodView {
        PodView::Present(PodState::default())
    }

    /// What the pod looks like while it is Terminating: the verdict does not look at its
    /// deletion deadline, only at whether its kubelet (or a fence) says it is gone.
    fn terminating() -> PodView {
        running()
    }

    fn observed(pod: PodView, owner: OwnerView) -> Observed {
        Observed {
            pod,
            node: NodeView::Ready,
            owner,
            endpoint_created: at(0),
            now: at(1000),
        }
    }

    fn ordinary(pod: PodView) -> Decision {
        decide(
            "web-7d9f-abcde",
            &spec("ReplicaSet", "web-7d9f", false),
            &observed(pod, OwnerView::NotSticky),
            &settings(),
        )
    }

    fn statefulset(replicas: i32, ordinals_start: i32, deleting: bool) -> OwnerView {
        OwnerView::StatefulSet(Some(StatefulSetView {
            deleting,
            replicas,
            ordinals_start,
        }))
    }

    fn replica(name: &str, pod: PodView, owner: OwnerView) -> Decision {
        decide(
            name,
            &spec(OWNER_STATEFULSET, "db", true),
            &observed(pod, owner),
            &settings(),
        )
    }

    fn vm(pod: PodView, owner: Option<VirtualMachineView>) -> Decision {
        decide(
            "vm1",
            &spec(OWNER_VIRTUAL_MACHINE, "vm1", true),
            &observed(pod, OwnerView::VirtualMachine(owner)),
            &settings(),
        )
    }

    #[test]
    fn running_and_pending_pods_keep_their_addresses() {
        assert_eq!(ordinary(running()), Decision::Keep);
    }

    #[test]
    fn deleted_or_force_deleted_pod_releases() {
        assert_eq!(
            ordinary(PodView::Gone),
            Decision::Release(Reason::PodDeleted)
        );
    }

    #[test]
    fn a_pod_missing_from_the_cache_of_a_brand_new_endpoint_is_presumed_alive() {
        let mut facts = observed(PodView::Gone, OwnerView::NotSticky);
        facts.endpoint_created = at(990);
        let decision = decide("p", &spec("Pod", "p", false), &facts, &settings());
        assert_eq!(decision, Decision::Keep);
        // ... until the orphan grace ends, 20 s from now.
        assert_eq!(
            recheck_after(&facts, &settings()),
            Some(SignedDuration::from_secs(20))
        );
    }

    #[test]
    fn a_pod_the_cache_saw_deleted_is_dead_however_young_its_endpoint() {
        // A StatefulSet scaled down right after it was created: no waiting for the grace.
        let mut facts = observed(PodView::Deleted, statefulset(2, 0, false));
        facts.endpoint_created = at(995);
        let decision = decide(
            "db-4",
            &spec(OWNER_STATEFULSET, "db", true),
            &facts,
            &settings(),
        );
        assert_eq!(decision, Decision::Release(Reason::StatefulSetScaledDown));
        facts.pod = PodView::Deleted;
        facts.owner = OwnerView::NotSticky;
        assert_eq!(
            decide("p", &spec("Pod", "p", false), &facts, &settings()),
            Decision::Release(Reason::PodDeleted)
        );
    }

    #[test]
    fn an_absent_pod_is_deleted_when_the_watch_said_so_or_a_later_list_misses_it() {
        assert_eq!(absent_pod(at(100), at(50), true), PodView::Deleted);
        // Listed 10 s after the Endpoint was written: the list would have shown the pod.
        assert_eq!(absent_pod(at(100), at(110), false), PodView::Deleted);
        // Listed 3 s after (within the skew allowance) or before: may be a lagging cache.
        assert_eq!(absent_pod(at(100), at(103), false), PodView::Gone);
        assert_eq!(absent_pod(at(100), at(50), false), PodView::Gone);
    }

    #[test]
    fn a_young_endpoint_whose_pod_the_cache_lacks_is_rechecked_when_the_orphan_grace_ends() {
        // Created at 0, orphan grace 30 s, now 10: decided again at 30.
        let mut facts = observed(PodView::Gone, OwnerView::NotSticky);
        facts.now = at(10);
        assert_eq!(
            recheck_after(&facts, &settings()),
            Some(SignedDuration::from_secs(20))
        );
        // Nothing pending: present or replaced pods, and a grace already over.
        for pod in [running(), PodView::Gone, PodView::Replaced] {
            let facts = observed(pod, OwnerView::NotSticky);
            assert_eq!(recheck_after(&facts, &settings()), None, "{pod:?}");
        }
    }

    #[test]
    fn succeeded_or_failed_pod_releases() {
        let done = PodView::Present(PodState { terminal: true });
        assert_eq!(ordinary(done), Decision::Release(Reason::PodCompleted));
    }

    #[test]
    fn same_name_pod_with_a_new_uid_releases_the_old_holder_only() {
        // The pool records are guarded by the old podUID, so the new pod keeps whatever it got.
        assert_eq!(
            ordinary(PodView::Replaced),
            Decision::Release(Reason::PodReplaced)
        );
    }

    #[test]
    fn a_pod_terminating_on_a_ready_node_keeps_until_its_kubelets_del() {
        // However long past its deadline: the kubelet still tears the sandbox down.
        assert_eq!(ordinary(terminating()), Decision::Keep);
    }

    #[test]
    fn pod_on_a_deleted_node_releases() {
        let mut facts = observed(running(), OwnerView::NotSticky);
        facts.node = NodeView::Gone;
        let decision = decide("p", &spec("Pod", "p", false), &facts, &settings());
        assert_eq!(decision, Decision::Release(Reason::NodeGone));
    }

    #[test]
    fn nothing_on_an_unfenced_not_ready_node_is_reclaimed_until_it_is_fenced() {
        let decide_on = |pod, node| {
            let mut facts = observed(pod, OwnerView::NotSticky);
            facts.node = node;
            decide("p", &spec("Pod", "p", false), &facts, &settings())
        };
        // Behind a partition the sandbox may still answer ARP: deleted, force-deleted, replaced,
        // completed or Terminating, the pod keeps its address.
        let completed = PodView::Present(PodState { terminal: true });
        for pod in [
            PodView::Deleted,
            PodView::Gone,
            PodView::Replaced,
            completed,
            terminating(),
        ] {
            assert_eq!(
                decide_on(pod, NodeView::NotReady),
                Decision::Keep,
                "{pod:?}"
            );
        }
        // Fenced (out-of-service: powered off), every pod of the node lets go.
        for pod in [PodView::Deleted, terminating(), running()] {
            assert_eq!(
                decide_on(pod, NodeView::Fenced),
                Decision::Release(Reason::NodeFenced),
                "{pod:?}"
            );
        }
        // Sticky owners still keep theirs on a fenced node.
        let mut facts = observed(PodView::Deleted, statefulset(3, 0, false));
        facts.node = NodeView::Fenced;
        let sticky = decide(
            "db-1",
            &spec(OWNER_STATEFULSET, "db", true),
            &facts,
            &settings(),
        );
        assert_eq!(sticky, Decision::Keep);
    }

    #[test]
    fn statefulset_pod_restarted_or_rescheduled_keeps() {
        for pod in [PodView::Gone, PodView::Replaced, running(), terminating()] {
            assert_eq!(
                replica("db-2", pod, statefulset(3, 0, false)),
                Decision::Keep
            );
        }
    }

    #[test]
    fn statefulset_scaled_down_releases_ordinals_at_or_above_replicas() {
        assert_eq!(
            replica("db-2", PodView::Gone, statefulset(2, 0, false)),
            Decision::Release(Reason::StatefulSetScaledDown)
        );
        assert_eq!(
            replica("db-1", PodView::Gone, statefulset(2, 0, false)),
            Decision::Keep
        );
        // Still terminating: the pod still uses the address.
        assert_eq!(
            replica("db-2", terminating(), statefulset(2, 0, false)),
            Decision::Keep
        );
    }

    #[test]
    fn statefulset_ordinals_start_is_honoured() {
        let owner = statefulset(2, 5, false);
        assert_eq!(replica("db-6", PodView::Gone, owner), Decision::Keep);
        for name in ["db-4", "db-7", "db-x", "other-5"] {
            assert_eq!(
                replica(name, PodView::Gone, owner),
                Decision::Release(Reason::StatefulSetScaledDown),
                "{name}"
            );
        }
    }

    #[test]
    fn the_copy_of_an_address_being_handed_over_is_listed_through_its_twin() {
        let address: IpAddr = "10.6.153.120".parse().expect("address");
        let draining = SweptRecord {
            pool: "s-4",
            subnet: "s",
            endpoint: "ns/db-4",
        };
        let active = SweptRecord {
            pool: "s-0",
            ..draining
        };
        let copies = [draining, active];
        // The Endpoint names the draining pool (the handover's copy is written, not repointed).
        let listed = BTreeSet::from([("s-4".to_owned(), address)]);
        assert!(listed_with_its_copies(&copies, &active, address, &listed));
        assert!(listed_with_its_copies(&copies, &draining, address, &listed));
        // Another holder's record, or another Subnet's, is not covered by the listed copy.
        for other in [
            SweptRecord {
                endpoint: "ns/other",
                ..active
            },
            SweptRecord {
                subnet: "t",
                pool: "t-0",
                ..active
            },
        ] {
            let copies = [draining, other];
            assert!(
                !listed_with_its_copies(&copies, &other, address, &listed),
                "{other:?}"
            );
        }
        // Nobody lists it any more (the holder's DEL released the listed copy and its Endpoint).
        assert!(!listed_with_its_copies(
            &copies,
            &active,
            address,
            &BTreeSet::new()
        ));
    }

    #[test]
    fn statefulset_deleted_or_orphan_cascaded_releases_once_the_pod_is_dead() {
        for owner in [OwnerView::StatefulSet(None), statefulset(3, 0, true)] {
            assert_eq!(
                replica("db-0", PodView::Gone, owner),
                Decision::Release(Reason::StatefulSetDeleted)
            );
            // Orphan cascade leaves the pod running: it keeps the address until it dies.
            assert_eq!(replica("db-0", running(), owner), Decision::Keep);
        }
    }

    #[test]
    fn virtual_machine_keeps_across_pod_and_vmi_deletion_restart_and_migration() {
        let exists = Some(VirtualMachineView { deleting: false });
        // Launcher pod deleted, VMI deleted, VM restarted: the recorded pod is gone.
        assert_eq!(vm(PodView::Gone, exists), Decision::Keep);
        // Live migration: the source pod still runs while the target takes over.
        assert_eq!(vm(running(), exists), Decision::Keep);
    }

    #[test]
    fn virtual_machine_deleted_releases_once_its_launcher_is_dead() {
        for owner in [None, Some(VirtualMachineView { deleting: true })] {
            assert_eq!(
                vm(PodView::Gone, owner),
                Decision::Release(Reason::VirtualMachineDeleted)
            );
            assert_eq!(vm(running(), owner), Decision::Keep);
        }
    }

    #[test]
    fn an_ipam_claim_keeps_its_address_until_it_is_deleted_and_its_pod_is_dead() {
        let claimed = |pod: PodView, owner: Option<IpamClaimView>, settings: &Settings| {
            decide(
                "vm1.underlay",
                &spec(IPAM_CLAIM_KIND, "vm1.underlay", true),
                &observed(pod, OwnerView::IpamClaim(owner)),
                settings,
            )
        };
        let exists = Some(IpamClaimView { deleting: false });
        let no_retention = Settings {
            fixed_ip_kubevirt: false,
            ..settings()
        };
        // The retention switches are about VMs and StatefulSets: a claim is a claim.
        assert_eq!(
            sticky_owner(&spec(IPAM_CLAIM_KIND, "c", true), &no_retention),
            Some(IPAM_CLAIM_KIND)
        );
        for pod in [PodView::Gone, running()] {
            assert_eq!(claimed(pod, exists, &no_retention), Decision::Keep);
        }
        for owner in [None, Some(IpamClaimView { deleting: true })] {
            assert_eq!(
                claimed(PodView::Gone, owner, &settings()),
                Decision::Release(Reason::IpamClaimDeleted)
            );
            assert_eq!(claimed(running(), owner, &settings()), Decision::Keep);
        }
    }

    #[test]
    fn retention_switched_off_treats_sticky_endpoints_like_ordinary_pods() {
        let off = Settings {
            fixed_ip_statefulset: false,
            fixed_ip_kubevirt: false,
            ..settings()
        };
        for kind in [OWNER_STATEFULSET, OWNER_VIRTUAL_MACHINE] {
            let spec = spec(kind, "db", true);
            assert_eq!(sticky_owner(&spec, &off), None);
            assert_eq!(sticky_owner(&spec, &settings()), Some(kind));
            let facts = observed(PodView::Gone, OwnerView::NotSticky);
            assert_eq!(
                decide("db-0", &spec, &facts, &off),
                Decision::Release(Reason::PodDeleted)
            );
        }
        assert_eq!(
            sticky_owner(&spec(OWNER_STATEFULSET, "db", false), &settings()),
            None
        );
    }

    fn allocation(address: &str, uid: &str) -> AllocationRef {
        AllocationRef {
            pool: "pool-0".into(),
            address: address.parse().expect("test addresses parse"),
            endpoint: "default/p".into(),
            pod_uid: uid.into(),
        }
    }

    #[test]
    fn unlisted_allocations_are_released_after_the_grace_unless_their_pod_lives() {
        let grace = settings().orphan_grace;
        let listed = BTreeSet::from([(
            "pool-0".to_string(),
            "10.0.0.1".parse().expect("test addresses parse"),
        )]);
        let all = || {
            [
                allocation("10.0.0.1", "a"),
                allocation("10.0.0.2", "dead"),
                allocation("10.0.0.3", "alive"),
            ]
        };
        let alive = |uid: &str| uid == "alive";
        // First sighting: both unlisted ones become suspects, nothing is released.
        let first = plan_orphans(all(), &listed, alive, &BTreeMap::new(), at(0), grace);
        assert!(first.release.is_empty());
        assert_eq!(first.suspects.len(), 2);
        // Within the grace: still suspects.
        let early = plan_orphans(all(), &listed, alive, &first.suspects, at(10), grace);
        assert!(early.release.is_empty());
        // Past the grace: the dead pod's allocation goes, the live pod's stays a suspect.
        let late = plan_orphans(all(), &listed, alive, &early.suspects, at(31), grace);
        assert_eq!(late.release, vec![allocation("10.0.0.2", "dead")]);
        assert_eq!(
            late.suspects.keys().cloned().collect::<Vec<_>>(),
            vec![allocation("10.0.0.3", "alive")]
        );
        // Once listed (the agent's Endpoint arrived), a suspect is forgotten.
        let listed_all: BTreeSet<_> = all()
            .into_iter()
            .map(|allocation| (allocation.pool, allocation.address))
            .collect();
        let settled = plan_orphans(all(), &listed_all, alive, &late.suspects, at(40), grace);
        assert_eq!(settled, OrphanPlan::default());
    }
}
