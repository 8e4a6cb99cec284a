//! The agent's decisions, as pure functions over cached objects: who the holder is, which
//! Subnet and address an interface gets, the patches that claim and release an address, the
//! Endpoint that records it, and the answer the plugin prints.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use kube::ResourceExt;
use virtnet_cni::agent_api::{
    AllocateResponse, AllocatedIp, ApiDns, ApiError, ApiRoute, ErrorKind,
};
use virtnet_cni::config::GcAttachment;

use crate::crd::{
    Endpoint, EndpointInterface, EndpointSpec, IPAM_CLAIM_KIND, IpAllocation, IpPool, IpamClaim,
    IpamClaimOwnerPod, IpamClaimStatus, NetworkAttachmentDefinition, Subnet,
};
use crate::ipam::{
    AllocationHolder, AllocationKey, FixedIpRetention, IpFamily, IpamError, KUBEVIRT_API_GROUP,
    NamespaceDefaultSubnet, OwnerRef, PodFacts, PodIpamAnnotations, PoolState, Selection,
    SelectionRequest, SubnetFacts, allocate_in_pools, find_static_pool, parse_pool_name,
    select_for_interface, selection_for_interface,
};
use crate::store::parse::{
    ParseError, allocated_addresses, pool_allocations, pool_ranges, subnet_facts,
};
use crate::store::pools::PoolClaim;

/// Why an allocation cannot be decided; each maps to an [`ErrorKind`] for the plugin.
#[derive(Debug, thiserror::Error)]
pub enum PlanFailure {
    #[error("pod {namespace}/{name} is not in the agent's cache yet; the runtime retries the ADD")]
    PodNotCached { namespace: String, name: String },
    #[error(
        "pod {namespace}/{name} has uid {cached} but the runtime asked for uid {requested}: the \
         pod was re-created; the runtime retries the ADD for the new pod"
    )]
    PodUidMismatch {
        namespace: String,
        name: String,
        cached: String,
        requested: String,
    },
    #[error("{0}; fix the object's spec")]
    Unparsable(#[from] ParseError),
    #[error(
        "Subnet {subnet} has no IPPool yet; is virtnet-controller running? It creates the pools"
    )]
    NoPools { subnet: String },
    #[error(
        "IPPool {pool} named by the pod's annotation does not exist; name an existing pool \
         (kubectl get ippools)"
    )]
    UnknownPool { pool: String },
    #[error(
        "IPAMClaim {claim} records {address:?} in status.ips, which is not an address: fix or \
         clear the claim's status"
    )]
    MalformedClaim { claim: String, address: String },
    #[error(transparent)]
    Ipam(#[from] IpamError),
}

impl PlanFailure {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::PodNotCached { .. } | Self::PodUidMismatch { .. } | Self::NoPools { .. } => {
                ErrorKind::NotReady
            }
            Self::Unparsable(_) => ErrorKind::Internal,
            Self::MalformedClaim { .. } => ErrorKind::InvalidRequest,
            Self::UnknownPool { .. } | Self::Ipam(IpamError::UnknownSubnet { .. }) => {
                ErrorKind::SubnetNotFound
            }
            Self::Ipam(IpamError::PoolExhausted { .. } | IpamError::SubnetExhausted { .. }) => {
                ErrorKind::PoolExhausted
            }
            Self::Ipam(IpamError::StaticAddressInUse { .. }) => ErrorKind::IpConflict,
            Self::Ipam(_) => ErrorKind::InvalidRequest,
        }
    }
}

impl PlanFailure {
    /// The reason of the Warning Event put on the pod for a failure its owner can act on (a
    /// full Subnet, a bad annotation, a Subnet or pool that does not fit); `None` for transient
    /// or internal failures, which the runtime retries anyway.
    pub fn event_reason(&self) -> Option<&'static str> {
        match (self, self.kind()) {
            (Self::Ipam(IpamError::InvalidAnnotation { .. }), _) => Some("InvalidIPAMAnnotation"),
            (_, ErrorKind::PoolExhausted) => Some("IPPoolExhausted"),
            (_, ErrorKind::InvalidRequest | ErrorKind::SubnetNotFound | ErrorKind::IpConflict) => {
                Some("IPAMRequestRejected")
            }
            _ => None,
        }
    }
}

impl From<PlanFailure> for ApiError {
    fn from(failure: PlanFailure) -> Self {
        Self::new(failure.kind(), failure.to_string())
    }
}

/// The facts about the pod that decide its allocation key.
pub fn pod_facts(pod: &Pod) -> PodFacts {
    PodFacts {
        namespace: pod.namespace().unwrap_or_default(),
        name: pod.name_any(),
        uid: pod.uid().unwrap_or_default(),
        owners: pod
            .owner_references()
            .iter()
            .map(|owner| OwnerRef {
                kind: owner.kind.clone(),
                name: owner.name.clone(),
                api_group: owner
                    .api_version
                    .split_once('/')
                    .map(|(group, _)| group.to_owned())
                    .unwrap_or_default(),
            })
            .collect(),
        labels: pod.labels().clone(),
    }
}

/// The owner reference that would make `pod`'s key sticky, in [`AllocationKey::for_pod`]'s order
/// (its VirtualMachineInstance, else its StatefulSet). Whoever creates a pod writes its owner
/// references, so the agent confirms this one's uid before trusting it.
pub fn sticky_owner(pod: &Pod) -> Option<&OwnerReference> {
    let is = |owner: &OwnerReference, group: &str, kind: &str| {
        owner.kind == kind && owner.api_version.split_once('/').map(|(g, _)| g) == Some(group)
    };
    let owners = pod.owner_references();
    owners
        .iter()
        .find(|owner| is(owner, KUBEVIRT_API_GROUP, "VirtualMachineInstance"))
        .or_else(|| owners.iter().find(|owner| is(owner, "apps", "StatefulSet")))
}

/// `pod` without the owner reference of uid `uid` (one the API server did not confirm), so that
/// its key is an ordinary pod's.
pub fn without_owner(mut pod: Pod, uid: &str) -> Pod {
    if let Some(owners) = pod.metadata.owner_references.as_mut() {
        owners.retain(|owner| owner.uid != uid);
    }
    pod
}

/// `namespace/name` of the Endpoint recording `key`'s allocations, as IPPool records name it.
pub fn endpoint_ref(key: &AllocationKey) -> String {
    format!("{}/{}", key.namespace(), key.endpoint_name())
}

/// Whether a pool record belongs to `holder`: same Endpoint and interface, and for a per-pod
/// key the same pod UID (a sticky key keeps its address across pod UIDs).
pub fn record_is_held_by(record: &IpAllocation, holder: &AllocationHolder) -> bool {
    record.endpoint == endpoint_ref(&holder.key)
        && record.interface == holder.interface
        && match &holder.key {
            AllocationKey::Pod { uid, .. } => &record.pod_uid == uid,
            AllocationKey::StatefulSetPod { .. }
            | AllocationKey::VirtualMachine { .. }
            | AllocationKey::IpamClaim { .. } => true,
        }
}

/// The engine's model of `pool`, seen from `holder`: records that belong to it become its
/// holder, every other record an opaque holder that can never equal it.
pub fn pool_state(pool: &IpPool, holder: &AllocationHolder) -> Result<PoolState, PlanFailure> {
    let name = pool.name_any();
    let (subnet, index) =
        parse_pool_name(&name).ok_or_else(|| PlanFailure::UnknownPool { pool: name.clone() })?;
    let mut state = PoolState::new(subnet, index, pool_ranges(pool)?);
    state.draining = pool.spec.draining;
    for (address, record) in pool_allocations(pool)? {
        let held_by = if record_is_held_by(record, holder) {
            holder.clone()
        } else {
            AllocationHolder {
                key: AllocationKey::Pod {
                    namespace: String::new(),
                    name: record.endpoint.clone(),
                    uid: format!("{}/{}", record.pod_uid, record.interface),
                },
                interface: record.interface.clone(),
            }
        };
        state.allocations.insert(address, held_by);
    }
    Ok(state)
}

/// A pool as this agent last wrote or re-read it, and the cache's resourceVersion of the pool
/// at that moment.
pub type Remembered = (Option<String>, IpPool);

/// The pools to decide on: the cache, except where this agent holds a newer version it wrote or
/// re-read. Such an entry is used while the cache still shows the version it had when the entry
/// was made, and dropped as soon as the cache moves on (resourceVersions are only compared for
/// equality, as the API asks). A cache that moved to a version that is still older costs at
/// most one more conflict, after which the pool is re-read.
pub fn newest_pools(
    cached: Vec<IpPool>,
    remembered: &mut HashMap<String, Remembered>,
) -> Vec<IpPool> {
    cached
        .into_iter()
        .map(|pool| {
            let name = pool.name_any();
            match remembered.get(&name) {
                Some((base, newer)) if *base == pool.resource_version() => newer.clone(),
                Some(_) => {
                    remembered.remove(&name);
                    pool
                }
                None => pool,
            }
        })
        .collect()
}

/// The cluster's node names and their labels.
pub type NodeLabels = BTreeMap<String, BTreeMap<String, String>>;

/// Everything one interface's decision reads from the caches, except the pools (a group commit
/// decides several interfaces on one view of them, see [`plan_batch`]).
pub struct AllocationInput<'a> {
    pub pod: &'a Pod,
    pub namespace: Option<&'a Namespace>,
    pub node: &'a str,
    /// Every node: this node's labels select Subnets, and the nodes a Subnet may serve share
    /// out its pools (see [`crate::ipam::node_rotation`]).
    pub nodes: &'a NodeLabels,
    pub interface: &'a str,
    /// The CNI network the runtime is adding the interface to (its config's `name`).
    pub network: Option<&'a str>,
    /// The IPAMClaim the interface's address belongs to, when the pod references one on a
    /// network that allows persistent addresses.
    pub persistent_claim: Option<&'a PersistentClaim>,
    /// The sandbox the runtime is adding: named in the records this ADD writes.
    pub container_id: &'a str,
    pub cni_default_subnets: &'a [String],
    pub subnets: &'a [Subnet],
    /// Whether StatefulSet replicas and VMs keep their addresses (sticky keys).
    pub retention: FixedIpRetention,
}

/// One address to hold: from which pool (at which resourceVersion), and whether the pool
/// already records it for this holder (a replayed ADD, or an agent that crashed before writing
/// the Endpoint).
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub pool: String,
    pub resource_version: String,
    pub address: IpAddr,
    pub cidr: IpNet,
    pub gateway: IpAddr,
    pub subnet: String,
    pub already_held: bool,
}

/// The decision for one interface: the holder, one claim per family, and the
/// NetworkAttachmentDefinition (`namespace/name`) the pod selected for the interface, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct AllocationPlan {
    pub holder: AllocationHolder,
    pub claims: Vec<Claim>,
    pub attachment: Option<String>,
}

/// Decides the addresses of one interface: selection by the engine, then the address the
/// holder already holds, or a free one picked for this node.
pub fn plan_allocation(
    input: &AllocationInput<'_>,
    pools: &[IpPool],
) -> Result<AllocationPlan, PlanFailure> {
    let holder = holder_of(input);
    let annotations = PodIpamAnnotations::parse(input.pod.annotations())?;
    let network_selection = selection_for_interface(
        input.pod.annotations(),
        &input.pod.namespace().unwrap_or_default(),
        input.interface,
    )?;
    let empty = BTreeMap::new();
    let namespace_annotations = input.namespace.map_or(&empty, |ns| ns.annotations());
    let namespace_default = NamespaceDefaultSubnet::parse(namespace_annotations)?;
    // A Subnet with a broken spec cannot be chosen; a pod that asks for it (or could only have
    // got it) is told which Subnet is broken and why, instead of "unknown Subnet".
    let (subnets, mut broken) = usable_subnets(input.subnets);
    let selection = select_for_interface(&SelectionRequest {
        interface: input.interface,
        pod: &annotations,
        // The claim's recorded addresses, else what the element asks for.
        requested_ips: match (input.persistent_claim, &network_selection) {
            (Some(claim), _) if !claim.ips.is_empty() => &claim.ips,
            (_, Some(selection)) => &selection.ips,
            _ => &[],
        },
        namespace_default: namespace_default.as_ref(),
        namespace_labels: input.namespace.map_or(&empty, |ns| ns.labels()),
        node_labels: input.nodes.get(input.node).unwrap_or(&empty),
        cni_default_subnets: input.cni_default_subnets,
        config_is_selected_attachment: network_selection.is_some(),
        subnets: &subnets,
    })
    .map_err(|error| {
        let cause = match &error {
            IpamError::UnknownSubnet { subnet, .. } => {
                broken.iter().position(|(name, _)| name == subnet)
            }
            IpamError::NoSubnetForInterface { .. } => (!broken.is_empty()).then_some(0),
            _ => None,
        };
        match cause {
            Some(position) => PlanFailure::from(broken.swap_remove(position).1),
            None => PlanFailure::from(error),
        }
    })?;
    let claims = [selection.ipv4, selection.ipv6]
        .into_iter()
        .flatten()
        .map(|selection| claim(input, pools, &subnets, &holder, &selection))
        .collect::<Result<_, _>>()?;
    Ok(AllocationPlan {
        holder,
        claims,
        attachment: network_selection.map(|selection| selection.attachment()),
    })
}

/// The Subnets whose spec parses, and why each other one does not.
fn usable_subnets(subnets: &[Subnet]) -> (Vec<SubnetFacts>, Vec<(String, ParseError)>) {
    let mut usable = Vec::with_capacity(subnets.len());
    let mut broken = Vec::new();
    for subnet in subnets {
        match subnet_facts(subnet) {
            Ok(facts) => usable.push(facts),
            Err(error) => broken.push((subnet.name_any(), error)),
        }
    }
    (usable, broken)
}

/// Who `input`'s addresses are for.
fn holder_of(input: &AllocationInput<'_>) -> AllocationHolder {
    holder_for(
        input.pod,
        input.interface,
        input.persistent_claim,
        input.retention,
    )
}

/// Who the addresses of `interface` of `pod` are for: the IPAMClaim when there is one, else the
/// pod's key.
pub fn holder_for(
    pod: &Pod,
    interface: &str,
    claim: Option<&PersistentClaim>,
    retention: FixedIpRetention,
) -> AllocationHolder {
    let key = match claim {
        Some(claim) => AllocationKey::IpamClaim {
            namespace: pod.namespace().unwrap_or_default(),
            name: claim.name.clone(),
        },
        None => AllocationKey::for_pod(&pod_facts(pod), retention),
    };
    AllocationHolder {
        key,
        interface: interface.to_owned(),
    }
}

/// An IPAMClaim an interface's address belongs to (in the pod's namespace), and the addresses
/// its status already records (reused: the claim's address survives its Endpoint).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersistentClaim {
    pub name: String,
    pub ips: Vec<IpAddr>,
}

impl PersistentClaim {
    /// The claim as read: its status addresses parsed (a malformed one is an error naming it).
    pub fn from_claim(claim: &IpamClaim) -> Result<Self, PlanFailure> {
        let name = claim.name_any();
        let ips = claim
            .status
            .iter()
            .flat_map(|status| &status.ips)
            .map(|written| {
                written
                    .parse::<IpNet>()
                    .map(|net| net.addr())
                    .or_else(|_| written.parse::<IpAddr>())
                    .map_err(|_| PlanFailure::MalformedClaim {
                        claim: name.clone(),
                        address: written.clone(),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { name, ips })
    }
}

/// Whether a NetworkAttachmentDefinition's config lets its interfaces keep addresses in
/// IPAMClaims (`"allowPersistentIPs": true` at the top level, where KubeVirt reads it too).
pub fn allows_persistent_ips(nad: &NetworkAttachmentDefinition) -> bool {
    nad.spec
        .config
        .as_deref()
        .and_then(|config| serde_json::from_str::<serde_json::Value>(config).ok())
        .is_some_and(|config| config["allowPersistentIPs"] == serde_json::Value::Bool(true))
}

/// The claim's status after an ADD: its addresses (with prefix), the pod that got them, and
/// `IPsAllocated` (`SuccessfulAllocation`); or, for a refusal, `IPsAllocated` False with the
/// API's reason (`IPAddressConflict`, `SubnetExhausted`) and the addresses left as they were.
pub fn claim_status(
    claim: &IpamClaim,
    pod: &str,
    outcome: Result<&[Claim], &ApiError>,
    now: Time,
) -> IpamClaimStatus {
    let mut status = claim.status.clone().unwrap_or_default();
    let (state, reason, message) = match outcome {
        Ok(claims) => {
            status.ips = claims
                .iter()
                .map(|claim| {
                    IpNet::new(claim.address, claim.cidr.prefix_len())
                        .unwrap_or(claim.cidr)
                        .to_string()
                })
                .collect();
            status.owner_pod = Some(IpamClaimOwnerPod {
                name: pod.to_owned(),
            });
            (
                "True",
                "SuccessfulAllocation",
                format!("allocated to pod {pod}"),
            )
        }
        Err(error) => {
            let reason = match error.kind {
                ErrorKind::PoolExhausted => "SubnetExhausted",
                ErrorKind::IpConflict => "IPAddressConflict",
                _ => "AllocationFailed",
            };
            ("False", reason, error.message.clone())
        }
    };
    let condition = Condition {
        type_: "IPsAllocated".to_owned(),
        status: state.to_owned(),
        reason: reason.to_owned(),
        message: message.chars().take(1000).collect(),
        last_transition_time: now,
        observed_generation: claim.metadata.generation,
    };
    status
        .conditions
        .retain(|known| known.type_ != condition.type_);
    status.conditions.push(condition);
    status
}

fn claim(
    input: &AllocationInput<'_>,
    pools: &[IpPool],
    subnets: &[SubnetFacts],
    holder: &AllocationHolder,
    selection: &Selection,
) -> Result<Claim, PlanFailure> {
    let candidates: Vec<&str> = match selection {
        Selection::StaticAddress { subnet, .. } | Selection::Pool { subnet, .. } => {
            vec![subnet]
        }
        Selection::Subnets { subnets, .. } => subnets.iter().map(String::as_str).collect(),
    };
    let mut last_failure = None;
    for name in candidates {
        let Some(subnet) = subnets.iter().find(|facts| facts.name == name) else {
            continue;
        };
        match claim_in_subnet(input, pools, subnet, holder, selection) {
            Ok(claim) => return Ok(claim),
            Err(failure) => last_failure = Some(failure),
        }
    }
    Err(last_failure.unwrap_or_else(|| {
        PlanFailure::Ipam(IpamError::NoSubnetForInterface {
            interface: holder.interface.clone(),
        })
    }))
}

fn claim_in_subnet(
    input: &AllocationInput<'_>,
    pools: &[IpPool],
    subnet: &SubnetFacts,
    holder: &AllocationHolder,
    selection: &Selection,
) -> Result<Claim, PlanFailure> {
    let objects: Vec<&IpPool> = pools
        .iter()
        .filter(|pool| pool.spec.subnet == subnet.name)
        .filter(|pool| match selection {
            Selection::Pool { pool: wanted, .. } => &pool.name_any() == wanted,
            _ => true,
        })
        .collect();
    if objects.is_empty() {
        return Err(match selection {
            Selection::Pool { pool, .. } => PlanFailure::UnknownPool { pool: pool.clone() },
            _ => PlanFailure::NoPools {
                subnet: subnet.name.clone(),
            },
        });
    }
    let mut states = objects
        .iter()
        .map(|pool| pool_state(pool, holder))
        .collect::<Result<Vec<_>, _>>()?;
    hold_foreign_allocations(&mut states, pools, &subnet.name)?;
    let addresses = &subnet.addresses;
    let held = states
        .iter()
        .enumerate()
        .find_map(|(position, pool)| pool.address_of(holder).map(|address| (position, address)));
    let (position, address) = match (held, selection) {
        (Some(held), _) => held,
        (None, Selection::StaticAddress { address, .. }) => {
            let position = find_static_pool(&states, addresses, holder, *address)?;
            states[position].allocate_static(addresses, holder.clone(), *address)?;
            (position, *address)
        }
        (None, _) => {
            let peers = nodes_served(subnet, input.nodes);
            allocate_in_pools(&mut states, addresses, holder.clone(), input.node, &peers)?
        }
    };
    Ok(Claim {
        pool: objects[position].name_any(),
        resource_version: objects[position].resource_version().unwrap_or_default(),
        address,
        cidr: addresses.cidr(),
        gateway: addresses.gateway(),
        subnet: subnet.name.clone(),
        already_held: held.is_some(),
    })
}

/// Marks as taken, in `states` (pools of Subnet `subnet`), every address that a pool of another
/// Subnet has allocated: Subnets of one network must never share an address, but if two were
/// admitted at once (or one still holds an address its spec no longer lists), the pod holding it
/// keeps it and no other is given it.
fn hold_foreign_allocations(
    states: &mut [PoolState],
    pools: &[IpPool],
    subnet: &str,
) -> Result<(), PlanFailure> {
    for pool in pools.iter().filter(|pool| pool.spec.subnet != subnet) {
        let foreign = allocated_addresses(pool)?;
        for state in states.iter_mut() {
            for address in foreign.intersect(&state.ranges).iter() {
                state
                    .allocations
                    .entry(address)
                    .or_insert_with(|| AllocationHolder {
                        key: AllocationKey::Pod {
                            namespace: String::new(),
                            name: pool.name_any(),
                            uid: format!("allocated in IPPool {}", pool.name_any()),
                        },
                        interface: String::new(),
                    });
            }
        }
    }
    Ok(())
}

/// The nodes whose labels `subnet`'s node selector accepts (all nodes without one).
fn nodes_served(subnet: &SubnetFacts, nodes: &NodeLabels) -> Vec<String> {
    nodes
        .iter()
        .filter(|(_, labels)| {
            subnet
                .node_selector
                .as_ref()
                .is_none_or(|selector| selector.matches(labels))
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// Why this node cannot allocate at all: every pool of every Subnet it may use (by node
/// selector) is full or draining. `None` while any such pool has a free address, and when
/// there is nothing to judge by (no Subnet for this node, or one whose pools do not exist yet).
pub fn node_exhaustion(
    node_labels: &BTreeMap<String, String>,
    subnets: &[Subnet],
    pools: &[IpPool],
) -> Option<String> {
    let nobody = AllocationHolder {
        key: AllocationKey::Pod {
            namespace: String::new(),
            name: String::new(),
            uid: String::new(),
        },
        interface: String::new(),
    };
    let mut full = Vec::new();
    // A broken Subnet serves nobody, so it neither makes the node exhausted nor keeps it
    // ready; allocations for it report why.
    for subnet in usable_subnets(subnets).0 {
        if !subnet
            .node_selector
            .as_ref()
            .is_none_or(|selector| selector.matches(node_labels))
        {
            continue;
        }
        let states: Vec<PoolState> = pools
            .iter()
            .filter(|pool| pool.spec.subnet == subnet.name)
            .filter_map(|pool| pool_state(pool, &nobody).ok())
            .collect();
        let can_allocate = states
            .iter()
            .any(|pool| !pool.draining && !pool.free(&subnet.addresses).is_empty());
        if states.is_empty() || can_allocate {
            return None;
        }
        full.push(subnet.name);
    }
    (!full.is_empty()).then(|| {
        format!(
            "every IPPool of the Subnets this node may use ({}) is full: add addresses to a \
             Subnet's ips, or delete pods that no longer need theirs",
            full.join(", ")
        )
    })
}

/// The record a pool keeps for a claimed address, naming the sandbox that holds it.
pub fn allocation_record(holder: &AllocationHolder, input: &AllocationInput<'_>) -> IpAllocation {
    IpAllocation {
        endpoint: endpoint_ref(&holder.key),
        interface: holder.interface.clone(),
        pod_uid: input.pod.uid().unwrap_or_default(),
        node: input.node.to_owned(),
        container_id: Some(input.container_id.to_owned()),
        network: input.network.map(str::to_owned),
    }
}

/// Whether a pool record is `holder`'s and was written for sandbox `container_id` (a record
/// that names no sandbox predates them and counts as any sandbox's): what DEL and GC of that
/// sandbox may release.
pub fn record_of_sandbox(
    record: &IpAllocation,
    holder: &AllocationHolder,
    container_id: &str,
) -> bool {
    record_is_held_by(record, holder)
        && record
            .container_id
            .as_deref()
            .is_none_or(|recorded| recorded == container_id)
}

/// Whether a call for CNI network `requested` may act on an interface recorded for `recorded`:
/// yes unless both are known and differ (records and plugins that predate network names match
/// any network, as before).
pub fn same_network(recorded: Option<&str>, requested: Option<&str>) -> bool {
    match (recorded, requested) {
        (Some(recorded), Some(requested)) => recorded == requested,
        _ => true,
    }
}

/// The interfaces a CNI GC of `network` on `node` finds unlisted: per-pod (non-sticky)
/// Endpoints of this node, their interfaces recorded for `network` (never another network's,
/// nor one whose network is not recorded) that `valid` does not name.
pub fn gc_candidates<'e>(
    endpoints: impl IntoIterator<Item = &'e Endpoint>,
    node: &str,
    network: &str,
    valid: &[GcAttachment],
) -> Vec<(&'e Endpoint, String)> {
    endpoints
        .into_iter()
        .filter(|endpoint| endpoint.spec.node == node && !endpoint.spec.sticky)
        .flat_map(|endpoint| {
            endpoint
                .spec
                .interfaces
                .iter()
                .filter(|entry| entry.network.as_deref() == Some(network))
                .filter(|entry| {
                    !valid.iter().any(|attachment| {
                        attachment.container_id == endpoint.spec.container_id
                            && attachment.ifname == entry.interface
                    })
                })
                .map(move |entry| (endpoint, entry.interface.clone()))
        })
        .collect()
}

/// Whether `pod` (as the API server has it now) is the pod `endpoint` records, still on `node`
/// and not finished: its sandbox may be alive even when the runtime's list misses it, so a GC
/// must not free its addresses.
pub fn still_runs_here(pod: Option<&Pod>, endpoint: &EndpointSpec, node: &str) -> bool {
    pod.is_some_and(|pod| {
        pod.uid().as_deref() == Some(endpoint.pod_uid.as_str())
            && pod.spec.as_ref().and_then(|spec| spec.node_name.as_deref()) == Some(node)
            && !pod
                .status
                .as_ref()
                .and_then(|status| status.phase.as_deref())
                .is_some_and(|phase| phase == "Succeeded" || phase == "Failed")
    })
}

/// What one request of a group commit comes to.
#[derive(Debug)]
pub enum BatchOutcome {
    /// Decided; its new claims are in the batch's [`PoolWrite`]s.
    Planned(AllocationPlan),
    /// Cannot be decided; the request gets this answer and claims nothing.
    Failed(PlanFailure),
    /// Another request of the batch is for the same holder (a replayed ADD racing the first):
    /// it is decided after that one is settled, so it cannot count an unwritten claim as held.
    Deferred,
}

/// One write of a group commit, and the requests (positions in the batch) it carries claims of.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchWrite {
    pub claim: PoolClaim,
    pub members: Vec<usize>,
}

/// The decisions of a group commit and the writes that make them real.
#[derive(Debug)]
pub struct BatchPlan {
    /// One per request, in the batch's order.
    pub outcomes: Vec<BatchOutcome>,
    /// At most one per pool, in pool name order.
    pub writes: Vec<BatchWrite>,
}

/// Decides a batch of concurrent ADDs on this node on one view of the pools: each request is
/// decided as if the requests before it had already claimed their addresses (so no two get the
/// same one), and the claims are grouped into one write per pool.
///
/// An address the view shows as already held by the request's holder is written too (its
/// record re-asserted for the new sandbox): the view may be stale (a release the cache has not
/// seen yet), and only a write guarded by the pool's resourceVersion proves the address is
/// still the holder's.
pub fn plan_batch(inputs: &[AllocationInput<'_>], mut pools: Vec<IpPool>) -> BatchPlan {
    let mut outcomes = Vec::with_capacity(inputs.len());
    let mut writes: BTreeMap<String, BatchWrite> = BTreeMap::new();
    let mut holders: Vec<AllocationHolder> = Vec::new();
    for (position, input) in inputs.iter().enumerate() {
        let holder = holder_of(input);
        if holders.contains(&holder) {
            outcomes.push(BatchOutcome::Deferred);
            continue;
        }
        holders.push(holder);
        let plan = match plan_allocation(input, &pools) {
            Ok(plan) => plan,
            Err(failure) => {
                outcomes.push(BatchOutcome::Failed(failure));
                continue;
            }
        };
        let record = allocation_record(&plan.holder, input);
        for claim in &plan.claims {
            if let Some(pool) = pools.iter_mut().find(|pool| pool.name_any() == claim.pool) {
                pool.status
                    .get_or_insert_with(Default::default)
                    .allocations
                    .insert(claim.address.to_string(), record.clone());
            }
            let write = writes
                .entry(claim.pool.clone())
                .or_insert_with(|| BatchWrite {
                    claim: PoolClaim {
                        pool: claim.pool.clone(),
                        resource_version: claim.resource_version.clone(),
                        records: BTreeMap::new(),
                    },
                    members: Vec::new(),
                });
            write.claim.records.insert(claim.address, record.clone());
            if !write.members.contains(&position) {
                write.members.push(position);
            }
        }
        outcomes.push(BatchOutcome::Planned(plan));
    }
    BatchPlan {
        outcomes,
        writes: writes.into_values().collect(),
    }
}

/// The Endpoint interface entry recording `plan`'s claims for `interface` of CNI network
/// `network`.
pub fn endpoint_interface(
    interface: &str,
    network: Option<&str>,
    plan: &AllocationPlan,
) -> EndpointInterface {
    let mut entry = EndpointInterface {
        interface: interface.to_owned(),
        network: network.map(str::to_owned),
        network_attachment: plan.attachment.clone(),
        ipv4_pool: None,
        ipv4: None,
        ipv4_gateway: None,
        ipv6_pool: None,
        ipv6: None,
        ipv6_gateway: None,
        vlan: None,
    };
    for claim in &plan.claims {
        let address = IpNet::new(claim.address, claim.cidr.prefix_len())
            .map(|net| net.to_string())
            .ok();
        if claim.address.is_ipv4() {
            entry.ipv4_pool = Some(claim.pool.clone());
            entry.ipv4 = address;
            entry.ipv4_gateway = Some(claim.gateway.to_string());
        } else {
            entry.ipv6_pool = Some(claim.pool.clone());
            entry.ipv6 = address;
            entry.ipv6_gateway = Some(claim.gateway.to_string());
        }
    }
    entry
}

/// What the Endpoint of this pod should say after this ADD: `existing` (if any) with this
/// interface's entry replaced and the current pod's identity.
pub fn endpoint_spec(
    existing: Option<&EndpointSpec>,
    holder: &AllocationHolder,
    interface: EndpointInterface,
    pod: &PodFacts,
    node: &str,
    container_id: &str,
) -> EndpointSpec {
    let mut interfaces: Vec<EndpointInterface> = existing
        .map(|spec| {
            spec.interfaces
                .iter()
                .filter(|known| known.interface != interface.interface)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    interfaces.push(interface);
    interfaces.sort_by(|a, b| a.interface.cmp(&b.interface));
    // OWNER-KIND / OWNER-NAME show the workload, as in the example's table (a Deployment's pod shows
    // its ReplicaSet); only sticky kinds change how long the addresses live.
    let (owner_kind, owner_name) = match &holder.key {
        AllocationKey::Pod { name, .. } => pod.owners.first().map_or_else(
            || ("Pod".to_owned(), name.clone()),
            |owner| (owner.kind.clone(), owner.name.clone()),
        ),
        AllocationKey::StatefulSetPod { name, .. } => (
            "StatefulSet".to_owned(),
            pod.owners
                .iter()
                .find(|owner| owner.kind == "StatefulSet")
                .map_or_else(|| name.clone(), |owner| owner.name.clone()),
        ),
        AllocationKey::VirtualMachine { name, .. } => ("VirtualMachine".to_owned(), name.clone()),
        AllocationKey::IpamClaim { name, .. } => (IPAM_CLAIM_KIND.to_owned(), name.clone()),
    };
    EndpointSpec {
        interfaces,
        owner_kind,
        owner_name,
        node: node.to_owned(),
        pod_uid: pod.uid.clone(),
        container_id: container_id.to_owned(),
        sticky: holder.key.is_sticky(),
    }
}

/// The routes a workload gets with `address`: the default route of its family via `gateway`,
/// then `subnet`'s routes (an unparsable one is left out; the webhook refuses those).
pub fn workload_routes(address: IpAddr, gateway: IpAddr, subnet: Option<&Subnet>) -> Vec<ApiRoute> {
    let default = match IpFamily::of(address) {
        IpFamily::V4 => IpNet::V4(Default::default()),
        IpFamily::V6 => IpNet::V6(Default::default()),
    };
    let extra = subnet.into_iter().flat_map(|subnet| {
        subnet.spec.routes.iter().filter_map(|route| {
            Some(ApiRoute {
                dst: route.dst.parse().ok()?,
                gw: Some(route.gw.parse().ok()?),
            })
        })
    });
    std::iter::once(ApiRoute {
        dst: default,
        gw: Some(gateway),
    })
    .chain(extra)
    .collect()
}

/// The plugin's answer: the addresses with their gateways, a default route per family via the
/// Subnet's gateway plus the Subnet's routes, and the Subnet's DNS (first Subnet with DNS wins).
pub fn allocate_response(claims: &[Claim], subnets: &[Subnet]) -> AllocateResponse {
    let mut response = AllocateResponse::default();
    for claim in claims {
        let address = IpNet::new(claim.address, claim.cidr.prefix_len()).unwrap_or(claim.cidr);
        response.ips.push(AllocatedIp {
            address,
            gateway: Some(claim.gateway),
            pool: claim.pool.clone(),
        });
        let subnet = subnets.iter().find(|s| s.name_any() == claim.subnet);
        response
            .routes
            .extend(workload_routes(claim.address, claim.gateway, subnet));
        let Some(subnet) = subnet else {
            continue;
        };
        if let (true, Some(dns)) = (response.dns == ApiDns::default(), &subnet.spec.dns) {
            response.dns = ApiDns {
                nameservers: dns.nameservers.clone(),
                domain: dns.domain.clone(),
                search: dns.search.clone(),
                options: dns.options.clone(),
            };
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use crate::crd::Endpoint;
    use crate::store::parse::interface_addresses;
    use crate::store::pools::release_patch;

    use serde_json::{Value, json};

    use super::*;
    use crate::ipam::IpSet;

    fn subnet(extra: Value) -> Subnet {
        let mut spec = json!({"subnet": "10.6.0.0/16", "gateway": "10.6.0.1", "ips": ["10.6.153.100-10.6.153.255"], "replicas": 2});
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        serde_json::from_value(json!({
            "apiVersion": "virtnet.io/v1alpha1", "kind": "Subnet",
            "metadata": {"name": "subnet"}, "spec": spec,
        }))
        .expect("valid Subnet")
    }

    fn pool(index: u32, ips: &[&str], allocations: Value) -> IpPool {
        serde_json::from_value(json!({
            "apiVersion": "virtnet.io/v1alpha1", "kind": "IPPool",
            "metadata": {"name": format!("subnet-{index}"), "resourceVersion": format!("{}", 10 + index)},
            "spec": {"subnet": "subnet", "cidr": "10.6.0.0/16", "gateway": "10.6.0.1", "ips": ips},
            "status": {"allocations": allocations},
        }))
        .expect("valid IPPool")
    }

    fn pod(name: &str, uid: &str, owner: Option<&str>, annotations: Value) -> Pod {
        let owners = owner.map_or_else(Vec::new, |kind| {
            vec![json!({"apiVersion": "apps/v1", "kind": kind, "name": "web", "uid": "o"})]
        });
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "uid": uid,
                         "ownerReferences": owners, "annotations": annotations},
        }))
        .expect("valid Pod")
    }

    fn input<'a>(
        pod: &'a Pod,
        subnets: &'a [Subnet],
        nodes: &'a NodeLabels,
        defaults: &'a [String],
    ) -> AllocationInput<'a> {
        AllocationInput {
            pod,
            namespace: None,
            node: "node-1",
            nodes,
            interface: "eth0",
            network: Some("macvlan"),
            persistent_claim: None,
            container_id: "container-1",
            cni_default_subnets: defaults,
            subnets,
            retention: FixedIpRetention::ON,
        }
    }

    fn plan(
        pod: &Pod,
        subnets: &[Subnet],
        pools: &[IpPool],
    ) -> Result<AllocationPlan, PlanFailure> {
        let nodes = NodeLabels::new();
        plan_allocation(&input(pod, subnets, &nodes, &["subnet".to_owned()]), pools)
    }

    fn example_pools() -> Vec<IpPool> {
        vec![
            pool(0, &["10.6.153.100-10.6.153.177"], json!({})),
            pool(1, &["10.6.153.178-10.6.153.255"], json!({})),
        ]
    }

    #[test]
    fn the_agents_own_writes_win_until_the_cache_moves() {
        let cached = example_pools();
        let mut newer = cached[1].clone();
        newer.metadata.resource_version = Some("99".into());
        let mut remembered =
            HashMap::from([("subnet-1".to_owned(), (Some("11".to_owned()), newer))]);
        let versions = |pools: Vec<IpPool>| -> Vec<String> {
            pools
                .iter()
                .map(|pool| pool.resource_version().unwrap_or_default())
                .collect()
        };
        assert_eq!(
            versions(newest_pools(cached.clone(), &mut remembered)),
            ["10", "99"]
        );
        assert_eq!(remembered.len(), 1);

        // The cache moved past our write (say the controller updated the counters after it).
        let mut moved = cached;
        moved[1].metadata.resource_version = Some("100".into());
        assert_eq!(
            versions(newest_pools(moved, &mut remembered)),
            ["10", "100"]
        );
        assert!(remembered.is_empty());
    }

    #[test]
    fn a_new_pod_gets_a_free_address_of_the_cni_default_subnet() -> Result<(), PlanFailure> {
        let pod = pod("web-1", "uid-1", Some("ReplicaSet"), json!({}));
        let plan = plan(&pod, &[subnet(json!({}))], &example_pools())?;
        let [claim] = plan.claims.as_slice() else {
            panic!("one claim expected: {plan:?}")
        };
        let range: IpSet = IpSet::parse_ranges(&["10.6.153.100-10.6.153.255"])?;
        assert!(range.contains(claim.address), "{claim:?}");
        assert!(!claim.already_held);
        assert_eq!(claim.gateway.to_string(), "10.6.0.1");
        assert_eq!(claim.cidr.to_string(), "10.6.0.0/16");
        assert_eq!(
            claim.resource_version,
            if claim.pool == "subnet-0" { "10" } else { "11" }
        );
        Ok(())
    }

    #[test]
    fn an_address_allocated_in_another_subnet_is_never_handed_out() -> Result<(), PlanFailure> {
        let record = json!({"endpoint": "team-b/db", "interface": "eth0", "podUID": "uid-b", "node": "node-2"});
        let foreign = |allocated: &[&str]| -> IpPool {
            let allocations: serde_json::Map<String, Value> = allocated
                .iter()
                .map(|address| ((*address).to_owned(), record.clone()))
                .collect();
            serde_json::from_value(json!({
                "apiVersion": "virtnet.io/v1alpha1", "kind": "IPPool",
                "metadata": {"name": "team-b-0", "resourceVersion": "7"},
                "spec": {"subnet": "team-b", "cidr": "10.6.0.0/16", "ips": ["10.6.153.90-10.6.153.100"]},
                "status": {"allocations": allocations},
            }))
            .expect("valid IPPool")
        };
        let pod = pod("web-1", "uid-1", Some("ReplicaSet"), json!({}));
        let subnets = [subnet(json!({"replicas": 1}))];
        let ours = pool(0, &["10.6.153.100-10.6.153.101"], json!({}));
        let plan = plan(&pod, &subnets, &[ours.clone(), foreign(&["10.6.153.100"])])?;
        assert_eq!(plan.claims[0].address.to_string(), "10.6.153.101");

        let full = self::plan(
            &pod,
            &subnets,
            &[ours.clone(), foreign(&["10.6.153.100", "10.6.153.101"])],
        )
        .expect_err("both addresses are held in team-b");
        assert_eq!(full.kind(), ErrorKind::PoolExhausted, "{full}");

        let wanted = self::pod(
            "db",
            "uid-3",
            None,
            json!({"ipam.virtnet.io/static-ips": "[{\"interface\": \"eth0\", \"ipv4\": \"10.6.153.100\"}]"}),
        );
        let refused = self::plan(&wanted, &subnets, &[ours, foreign(&["10.6.153.100"])])
            .expect_err("the static address is held in team-b");
        assert_eq!(refused.kind(), ErrorKind::IpConflict, "{refused}");
        Ok(())
    }

    #[test]
    fn the_owner_to_confirm_is_the_one_that_makes_the_key_sticky() {
        let forged: Pod = serde_json::from_value(json!({
            "metadata": {"name": "imposter", "namespace": "default", "uid": "uid-9",
                         "ownerReferences": [
                             {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "s"},
                             {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "name": "vm1", "uid": "v"},
                         ]},
        }))
        .expect("valid Pod");
        let owner = sticky_owner(&forged).expect("a sticky owner");
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("VirtualMachineInstance", "v")
        );
        let without_vmi = without_owner(forged, "v");
        assert_eq!(
            sticky_owner(&without_vmi).map(|o| o.uid.as_str()),
            Some("s")
        );
        let ordinary = without_owner(without_vmi, "s");
        assert_eq!(sticky_owner(&ordinary), None);
        assert!(!AllocationKey::for_pod(&pod_facts(&ordinary), FixedIpRetention::ON).is_sticky());
    }

    #[test]
    fn a_replayed_add_finds_the_address_by_its_holder() -> Result<(), PlanFailure> {
        let pod = pod("web-1", "uid-1", Some("ReplicaSet"), json!({}));
        let mut pools = example_pools();
        pools[1] = pool(
            1,
            &["10.6.153.178-10.6.153.255"],
            json!({"10.6.153.200": {"endpoint": "default/web-1", "interface": "eth0", "podUID": "uid-1", "node": "node-1"}}),
        );
        let plan = plan(&pod, &[subnet(json!({}))], &pools)?;
        assert_eq!(plan.claims[0].address.to_string(), "10.6.153.200");
        assert!(plan.claims[0].already_held);

        // A same-name pod with another UID is another holder: it gets a different address.
        let newer = self::pod("web-1", "uid-2", Some("ReplicaSet"), json!({}));
        let other = self::plan(&newer, &[subnet(json!({}))], &pools)?;
        assert_ne!(other.claims[0].address.to_string(), "10.6.153.200");
        assert!(!other.claims[0].already_held);
        Ok(())
    }

    #[test]
    fn a_statefulset_pod_keeps_its_address_across_uids() -> Result<(), PlanFailure> {
        let pools = vec![pool(
            0,
            &["10.6.153.100-10.6.153.255"],
            json!({"10.6.153.150": {"endpoint": "default/web-0", "interface": "eth0", "podUID": "old", "node": "node-2"}}),
        )];
        let pod = pod("web-0", "new", Some("StatefulSet"), json!({}));
        let plan = plan(&pod, &[subnet(json!({}))], &pools)?;
        assert_eq!(plan.claims[0].address.to_string(), "10.6.153.150");
        assert!(plan.claims[0].already_held && plan.holder.key.is_sticky());
        Ok(())
    }

    #[test]
    fn exhaustion_and_unknown_subnets_have_their_kinds() {
        let full = vec![pool(
            0,
            &["10.6.153.100"],
            json!({"10.6.153.100": {"endpoint": "default/a", "interface": "eth0", "podUID": "a", "node": "n"}}),
        )];
        let subnets = [subnet(json!({"ips": ["10.6.153.100"], "replicas": 1}))];
        let pod = pod("web-1", "uid-1", None, json!({}));
        let failure = plan(&pod, &subnets, &full).expect_err("exhausted");
        assert_eq!(failure.kind(), ErrorKind::PoolExhausted, "{failure}");

        let annotated = self::pod(
            "web-2",
            "uid-2",
            None,
            json!({"ipam.virtnet.io/subnet": "{\"ipv4\": \"nope\"}"}),
        );
        let failure = plan(&annotated, &subnets, &full).expect_err("unknown subnet");
        assert_eq!(failure.kind(), ErrorKind::SubnetNotFound, "{failure}");

        let failure = plan(&pod, &subnets, &[]).expect_err("no pools");
        assert_eq!(failure.kind(), ErrorKind::NotReady, "{failure}");
    }

    #[test]
    fn a_static_address_annotation_is_honoured() -> Result<(), PlanFailure> {
        let pod = pod(
            "db",
            "uid-3",
            None,
            json!({"ipam.virtnet.io/static-ips": "[{\"interface\": \"eth0\", \"ipv4\": \"10.6.153.222\"}]"}),
        );
        let plan = plan(&pod, &[subnet(json!({}))], &example_pools())?;
        assert_eq!(plan.claims[0].address.to_string(), "10.6.153.222");
        assert_eq!(plan.claims[0].pool, "subnet-1");
        Ok(())
    }

    #[test]
    fn claim_and_release_patches_are_guarded_by_resource_version() -> Result<(), PlanFailure> {
        let holder = AllocationHolder {
            key: AllocationKey::Pod {
                namespace: "default".into(),
                name: "web-1".into(),
                uid: "uid-1".into(),
            },
            interface: "eth0".into(),
        };
        let pod = pod("web-1", "uid-1", None, json!({}));
        let nodes = NodeLabels::new();
        let record = allocation_record(&holder, &input(&pod, &[], &nodes, &[]));
        let address: IpAddr = "10.6.153.200".parse().map_err(|_| PlanFailure::NoPools {
            subnet: String::new(),
        })?;
        let write = PoolClaim {
            pool: "subnet-1".into(),
            resource_version: "42".into(),
            records: BTreeMap::from([(address, record.clone())]),
        };
        assert_eq!(
            write.patch().ok(),
            Some(json!({
                "metadata": {"resourceVersion": "42"},
                "status": {"allocations": {"10.6.153.200": {
                    "endpoint": "default/web-1", "interface": "eth0", "podUID": "uid-1",
                    "node": "node-1", "containerID": "container-1", "network": "macvlan",
                }}},
            }))
        );
        let held = pool(0, &["10.6.153.200"], json!({"10.6.153.200": record}));
        let release_patch = |holder: &AllocationHolder, container: &str| {
            release_patch(&held, &[address], |_, record| {
                record_of_sandbox(record, holder, container)
            })
            .ok()
            .flatten()
        };
        assert_eq!(
            release_patch(&holder, "container-1"),
            Some(json!({
                "metadata": {"resourceVersion": "10"},
                "status": {"allocations": {"10.6.153.200": null},
                           "allocatedIPCount": 0, "unallocatedIPCount": 0},
            }))
        );
        // DEL or GC of an older sandbox leaves the newer sandbox's address alone.
        assert_eq!(release_patch(&holder, "container-0"), None);
        let other = AllocationHolder {
            key: AllocationKey::Pod {
                namespace: "default".into(),
                name: "web-1".into(),
                uid: "uid-2".into(),
            },
            interface: "eth0".into(),
        };
        assert_eq!(release_patch(&other, "container-1"), None);
        Ok(())
    }

    #[test]
    fn the_endpoint_lists_every_interface_and_the_answer_has_routes_and_dns()
    -> Result<(), PlanFailure> {
        let pod = pod("web-1", "uid-1", Some("ReplicaSet"), json!({}));
        let subnets = [subnet(json!({
            "routes": [{"dst": "10.7.0.0/16", "gw": "10.6.0.254"}],
            "dns": {"nameservers": ["10.96.0.10"]},
        }))];
        let plan = plan(&pod, &subnets, &example_pools())?;
        let net1 = EndpointInterface {
            interface: "net1".into(),
            ..endpoint_interface("net1", Some("macvlan"), &plan)
        };
        let existing = endpoint_spec(None, &plan.holder, net1, &pod_facts(&pod), "node-1", "c1");
        let spec = endpoint_spec(
            Some(&existing),
            &plan.holder,
            endpoint_interface("eth0", Some("macvlan"), &plan),
            &pod_facts(&pod),
            "node-1",
            "c1",
        );
        let names: Vec<&str> = spec
            .interfaces
            .iter()
            .map(|i| i.interface.as_str())
            .collect();
        assert_eq!(names, ["eth0", "net1"]);
        assert_eq!(
            (
                spec.owner_kind.as_str(),
                spec.owner_name.as_str(),
                spec.sticky,
                spec.pod_uid.as_str()
            ),
            ("ReplicaSet", "web", false, "uid-1")
        );
        let endpoint = Endpoint::new("web-1", spec.clone());
        let recorded: Vec<(String, IpAddr)> = interface_addresses(&endpoint, &spec.interfaces[0])?
            .into_iter()
            .map(|recorded| (recorded.pool, recorded.address))
            .collect();
        assert_eq!(
            recorded,
            vec![(plan.claims[0].pool.clone(), plan.claims[0].address)]
        );

        let response = allocate_response(&plan.claims, &subnets);
        assert_eq!(
            serde_json::to_value(&response).map_err(|_| PlanFailure::NoPools {
                subnet: String::new()
            })?["routes"],
            json!([{"dst": "0.0.0.0/0", "gw": "10.6.0.1"}, {"dst": "10.7.0.0/16", "gw": "10.6.0.254"}])
        );
        assert_eq!(response.dns.nameservers, ["10.96.0.10"]);
        assert_eq!(response.ips[0].address.prefix_len(), 16);
        Ok(())
    }

    fn pods(count: usize) -> Vec<Pod> {
        (0..count)
            .map(|n| pod(&format!("web-{n}"), &format!("uid-{n}"), None, json!({})))
            .collect()
    }

    fn planned(outcome: &BatchOutcome) -> &AllocationPlan {
        match outcome {
            BatchOutcome::Planned(plan) => plan,
            other => panic!("planned expected: {other:?}"),
        }
    }

    #[test]
    fn each_node_starts_on_its_own_pool() -> Result<(), PlanFailure> {
        let nodes: NodeLabels = ["node-1", "node-2"]
            .map(|name| (name.to_owned(), BTreeMap::new()))
            .into();
        let defaults = ["subnet".to_owned()];
        let subnets = [subnet(json!({}))];
        let pod = pod("web-1", "uid-1", None, json!({}));
        let mut chosen = Vec::new();
        for node in ["node-1", "node-2"] {
            let request = AllocationInput {
                node,
                ..input(&pod, &subnets, &nodes, &defaults)
            };
            chosen.push(
                plan_allocation(&request, &example_pools())?.claims[0]
                    .pool
                    .clone(),
            );
        }
        assert_eq!(chosen, ["subnet-0", "subnet-1"]);
        Ok(())
    }

    #[test]
    fn a_batch_claims_distinct_addresses_in_one_write_per_pool() {
        let pods = pods(3);
        let nodes = NodeLabels::new();
        let defaults = ["subnet".to_owned()];
        let subnets = [subnet(json!({}))];
        let inputs: Vec<_> = pods
            .iter()
            .map(|pod| input(pod, &subnets, &nodes, &defaults))
            .collect();
        let batch = plan_batch(&inputs, example_pools());
        let addresses: BTreeSet<IpAddr> = batch
            .outcomes
            .iter()
            .map(|outcome| planned(outcome).claims[0].address)
            .collect();
        assert_eq!(addresses.len(), 3, "{batch:?}");
        let [write] = batch.writes.as_slice() else {
            panic!("one node prefers one pool, so one write: {batch:?}")
        };
        assert_eq!(write.members, [0, 1, 2]);
        assert_eq!(
            write.claim.records.keys().copied().collect::<BTreeSet<_>>(),
            addresses
        );
        let patch = write.claim.patch().unwrap_or_default();
        assert_eq!(
            patch["metadata"]["resourceVersion"],
            if write.claim.pool == "subnet-0" {
                "10"
            } else {
                "11"
            }
        );
        assert_eq!(
            patch["status"]["allocations"].as_object().map(|a| a.len()),
            Some(3)
        );
        let first = planned(&batch.outcomes[0]).claims[0].address.to_string();
        assert_eq!(patch["status"]["allocations"][first]["podUID"], "uid-0");
    }

    #[test]
    fn a_batch_answers_each_request_on_its_own() {
        let mut pods = pods(2);
        // A replayed ADD racing the first one, a bad annotation, and a pod already holding one.
        pods.push(pods[0].clone());
        pods.push(pod(
            "bad",
            "uid-bad",
            None,
            json!({"ipam.virtnet.io/subnet": "{\"ipv4\": \"nope\"}"}),
        ));
        pods.push(pod("held", "uid-held", None, json!({})));
        let mut pools = example_pools();
        pools[0] = pool(
            0,
            &["10.6.153.100-10.6.153.177"],
            json!({"10.6.153.150": {"endpoint": "default/held", "interface": "eth0", "podUID": "uid-held", "node": "node-1"}}),
        );
        let nodes = NodeLabels::new();
        let defaults = ["subnet".to_owned()];
        let subnets = [subnet(json!({}))];
        let inputs: Vec<_> = pods
            .iter()
            .map(|pod| input(pod, &subnets, &nodes, &defaults))
            .collect();
        let batch = plan_batch(&inputs, pools);
        assert!(
            matches!(batch.outcomes[2], BatchOutcome::Deferred),
            "{batch:?}"
        );
        assert!(
            matches!(&batch.outcomes[3], BatchOutcome::Failed(failure) if failure.kind() == ErrorKind::SubnetNotFound),
            "{batch:?}"
        );
        let held = planned(&batch.outcomes[4]);
        assert!(held.claims[0].already_held);
        assert_eq!(held.claims[0].address.to_string(), "10.6.153.150");
        let members: Vec<usize> = batch
            .writes
            .iter()
            .flat_map(|write| write.members.iter().copied())
            .collect();
        // The held address is written too: only the guarded write proves it is still held.
        assert_eq!(
            members,
            [0, 1, 4],
            "new claims and re-asserted ones are written"
        );
    }

    #[test]
    fn a_batch_larger_than_the_subnet_fills_it_and_refuses_the_rest() {
        let pods = pods(200);
        let nodes = NodeLabels::new();
        let defaults = ["subnet".to_owned()];
        let subnets = [subnet(json!({}))];
        let inputs: Vec<_> = pods
            .iter()
            .map(|pod| input(pod, &subnets, &nodes, &defaults))
            .collect();
        let batch = plan_batch(&inputs, example_pools());
        let mut addresses = BTreeSet::new();
        let mut exhausted = 0;
        for outcome in &batch.outcomes {
            match outcome {
                BatchOutcome::Planned(plan) => {
                    assert!(
                        addresses.insert(plan.claims[0].address),
                        "duplicate: {plan:?}"
                    )
                }
                BatchOutcome::Failed(failure) => {
                    assert_eq!(failure.kind(), ErrorKind::PoolExhausted, "{failure}");
                    exhausted += 1;
                }
                BatchOutcome::Deferred => panic!("no holder repeats"),
            }
        }
        assert_eq!((addresses.len(), exhausted), (156, 44));
        assert_eq!(batch.writes.len(), 2);
        assert_eq!(
            batch
                .writes
                .iter()
                .map(|write| write.claim.records.len())
                .sum::<usize>(),
            156
        );
    }

    #[test]
    fn the_node_is_exhausted_only_when_every_usable_pool_is_full() {
        let labels = BTreeMap::from([("zone".to_owned(), "a".to_owned())]);
        let tiny = [subnet(json!({"ips": ["10.6.153.100"], "replicas": 1}))];
        let taken = json!({"10.6.153.100": {"endpoint": "default/a", "interface": "eth0", "podUID": "a", "node": "n"}});
        let full = [pool(0, &["10.6.153.100"], taken.clone())];
        let message = node_exhaustion(&labels, &tiny, &full).expect("exhausted");
        assert!(
            message.contains("(subnet)") && message.contains("add addresses"),
            "{message}"
        );
        assert_eq!(
            node_exhaustion(&labels, &tiny, &[pool(0, &["10.6.153.100"], json!({}))]),
            None
        );
        assert_eq!(
            node_exhaustion(&labels, &tiny, &[]),
            None,
            "no pools yet: nothing to judge"
        );
        assert_eq!(
            node_exhaustion(&labels, &[], &full),
            None,
            "no Subnet: nothing to judge"
        );
        // A Subnet for other nodes does not count, either way.
        let elsewhere = subnet(json!({"nodeSelector": {"matchLabels": {"zone": "b"}}}));
        assert_eq!(node_exhaustion(&labels, &[elsewhere], &full), None);
        let mut draining = pool(0, &["10.6.153.100"], json!({}));
        draining.spec.draining = true;
        assert!(node_exhaustion(&labels, &tiny, &[draining]).is_some());
    }

    #[test]
    fn refusals_the_pod_owner_can_act_on_become_events() {
        let pod = pod(
            "web-1",
            "uid-1",
            None,
            json!({"ipam.virtnet.io/subnet": "not json"}),
        );
        let bad = plan(&pod, &[subnet(json!({}))], &example_pools()).expect_err("bad annotation");
        assert_eq!(bad.event_reason(), Some("InvalidIPAMAnnotation"), "{bad}");
        let exhausted = PlanFailure::Ipam(IpamError::SubnetExhausted {
            cidr: "10.6.0.0/16".parse().expect("cidr"),
        });
        assert_eq!(exhausted.event_reason(), Some("IPPoolExhausted"));
        let unknown = PlanFailure::UnknownPool { pool: "x".into() };
        assert_eq!(unknown.event_reason(), Some("IPAMRequestRejected"));
        let transient = PlanFailure::NoPools { subnet: "s".into() };
        assert_eq!(transient.event_reason(), None);
    }

    fn recorded_endpoint(name: &str, node: &str, interfaces: Value) -> Endpoint {
        serde_json::from_value(json!({
            "apiVersion": "virtnet.io/v1alpha1", "kind": "Endpoint",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"interfaces": interfaces, "ownerKind": "Pod", "ownerName": name,
                     "node": node, "podUID": format!("uid-{name}"),
                     "containerID": format!("c-{name}")},
        }))
        .expect("valid Endpoint")
    }

    #[test]
    fn a_gc_only_sees_its_own_network_on_its_own_node() {
        let nic = |interface: &str, network: Option<&str>| json!({"interface": interface, "ipv4": "10.6.0.9/16", "network": network});
        let endpoints = [
            recorded_endpoint(
                "a",
                "node-1",
                json!([nic("eth0", Some("macvlan")), nic("net1", Some("storage"))]),
            ),
            recorded_endpoint("b", "node-1", json!([nic("eth0", Some("macvlan"))])),
            recorded_endpoint("older", "node-1", json!([nic("eth0", None)])),
            recorded_endpoint("elsewhere", "node-2", json!([nic("eth0", Some("macvlan"))])),
        ];
        let valid = [GcAttachment {
            container_id: "c-a".into(),
            ifname: "eth0".into(),
        }];
        let found = |network| -> Vec<(String, String)> {
            gc_candidates(&endpoints, "node-1", network, &valid)
                .into_iter()
                .map(|(endpoint, ifname)| (endpoint.name_any(), ifname))
                .collect()
        };
        assert_eq!(found("macvlan"), [("b".to_owned(), "eth0".to_owned())]);
        assert_eq!(found("storage"), [("a".to_owned(), "net1".to_owned())]);
        assert_eq!(found("othernet"), Vec::<(String, String)>::new());
    }

    #[test]
    fn a_gc_keeps_a_pod_that_still_runs_on_the_node() {
        let endpoint = recorded_endpoint(
            "web",
            "node-1",
            json!([{"interface": "eth0", "ipv4": "10.6.0.9/16"}]),
        );
        let pod_on = |node: &str, uid: &str, phase: &str| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "web", "namespace": "default", "uid": uid},
                "spec": {"nodeName": node, "containers": []},
                "status": {"phase": phase},
            }))
            .expect("valid Pod")
        };
        assert!(still_runs_here(
            Some(&pod_on("node-1", "uid-web", "Running")),
            &endpoint.spec,
            "node-1"
        ));
        assert!(still_runs_here(
            Some(&pod_on("node-1", "uid-web", "Pending")),
            &endpoint.spec,
            "node-1"
        ));
        for gone in [
            pod_on("node-2", "uid-web", "Running"),
            pod_on("node-1", "uid-new", "Running"),
            pod_on("node-1", "uid-web", "Succeeded"),
        ] {
            assert!(
                !still_runs_here(Some(&gone), &endpoint.spec, "node-1"),
                "{gone:?}"
            );
        }
        assert!(!still_runs_here(None, &endpoint.spec, "node-1"));
    }

    #[test]
    fn del_and_check_act_only_on_their_network() {
        assert!(same_network(Some("macvlan"), Some("macvlan")));
        assert!(!same_network(Some("macvlan"), Some("storage")));
        // Records and plugins from before network names: as before, any.
        assert!(same_network(None, Some("storage")));
        assert!(same_network(Some("macvlan"), None));
    }

    #[test]
    fn the_endpoint_records_the_network_and_the_attachment_the_pod_selected()
    -> Result<(), PlanFailure> {
        let pod = pod(
            "web-1",
            "uid-1",
            None,
            json!({"k8s.v1.cni.cncf.io/networks": "infra/underlay@net1"}),
        );
        let nodes = NodeLabels::new();
        let subnets = [subnet(json!({}))];
        let defaults = ["subnet".to_owned()];
        let request = AllocationInput {
            interface: "net1",
            ..input(&pod, &subnets, &nodes, &defaults)
        };
        let plan = plan_allocation(&request, &example_pools())?;
        let entry = endpoint_interface("net1", Some("underlay"), &plan);
        assert_eq!(entry.network.as_deref(), Some("underlay"));
        assert_eq!(entry.network_attachment.as_deref(), Some("infra/underlay"));
        assert_eq!(
            allocation_record(&plan.holder, &request).network.as_deref(),
            Some("macvlan")
        );
        Ok(())
    }

    fn ipam_claim(status: Value) -> IpamClaim {
        serde_json::from_value(json!({
            "apiVersion": "k8s.cni.cncf.io/v1alpha1", "kind": "IPAMClaim",
            "metadata": {"name": "vm1.underlay", "namespace": "default", "resourceVersion": "7",
                         "generation": 1},
            "spec": {"network": "underlay"},
            "status": status,
        }))
        .expect("valid IPAMClaim")
    }

    #[test]
    fn a_claimed_interface_belongs_to_the_claim_and_reuses_its_address() -> Result<(), PlanFailure>
    {
        let launcher = pod(
            "virt-launcher-vm1-abcde",
            "uid-a",
            None,
            json!({"k8s.v1.cni.cncf.io/networks":
                   r#"[{"name": "underlay", "interface": "net1", "ipam-claim-reference": "vm1.underlay"}]"#}),
        );
        let recorded =
            PersistentClaim::from_claim(&ipam_claim(json!({"ips": ["10.6.153.177/16"]})))?;
        assert_eq!(
            recorded.ips,
            ["10.6.153.177".parse::<IpAddr>().expect("address")]
        );
        let nodes = NodeLabels::new();
        let subnets = [subnet(json!({}))];
        let defaults = ["subnet".to_owned()];
        let request = AllocationInput {
            interface: "net1",
            persistent_claim: Some(&recorded),
            ..input(&launcher, &subnets, &nodes, &defaults)
        };
        let plan = plan_allocation(&request, &example_pools())?;
        assert_eq!(
            plan.holder.key,
            AllocationKey::IpamClaim {
                namespace: "default".into(),
                name: "vm1.underlay".into()
            }
        );
        assert_eq!(plan.claims[0].address.to_string(), "10.6.153.177");
        let spec = endpoint_spec(
            None,
            &plan.holder,
            endpoint_interface("net1", Some("underlay"), &plan),
            &pod_facts(&launcher),
            "node-1",
            "c1",
        );
        assert!(spec.sticky);
        assert_eq!(
            (spec.owner_kind.as_str(), spec.owner_name.as_str()),
            (IPAM_CLAIM_KIND, "vm1.underlay")
        );
        let broken = ipam_claim(json!({"ips": ["10.6.153.300/16"]}));
        assert!(matches!(
            PersistentClaim::from_claim(&broken),
            Err(PlanFailure::MalformedClaim { .. })
        ));
        Ok(())
    }

    #[test]
    fn the_claim_status_records_the_address_or_why_not() -> Result<(), PlanFailure> {
        let pod = pod("web-1", "uid-1", None, json!({}));
        let plan = plan(&pod, &[subnet(json!({}))], &example_pools())?;
        let now = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let claim = ipam_claim(json!({}));
        let status = claim_status(
            &claim,
            "virt-launcher-vm1-abcde",
            Ok(&plan.claims),
            now.clone(),
        );
        assert_eq!(status.ips, [format!("{}/16", plan.claims[0].address)]);
        assert_eq!(
            status.owner_pod.map(|owner| owner.name).as_deref(),
            Some("virt-launcher-vm1-abcde")
        );
        assert_eq!(
            (
                status.conditions[0].type_.as_str(),
                status.conditions[0].status.as_str(),
                status.conditions[0].reason.as_str()
            ),
            ("IPsAllocated", "True", "SuccessfulAllocation")
        );
        let full = ApiError::new(ErrorKind::PoolExhausted, "every pool is full");
        let held = ipam_claim(json!({"ips": ["10.6.153.177/16"]}));
        let status = claim_status(&held, "p", Err(&full), now);
        assert_eq!(
            status.ips,
            ["10.6.153.177/16"],
            "a refusal keeps the recorded address"
        );
        assert_eq!(
            (
                status.conditions.len(),
                status.conditions[0].status.as_str(),
                status.conditions[0].reason.as_str()
            ),
            (1, "False", "SubnetExhausted")
        );
        Ok(())
    }

    #[test]
    fn only_a_nad_that_allows_it_keeps_addresses_in_claims() {
        let nad = |config: Option<&str>| NetworkAttachmentDefinition {
            metadata: Default::default(),
            spec: crate::crd::NetworkAttachmentDefinitionSpec {
                config: config.map(str::to_owned),
            },
        };
        assert!(allows_persistent_ips(&nad(Some(
            r#"{"name": "u", "allowPersistentIPs": true, "plugins": []}"#
        ))));
        for config in [
            Some(r#"{"name": "u", "plugins": []}"#),
            Some(r#"{"allowPersistentIPs": "yes"}"#),
            Some("not json"),
            None,
        ] {
            assert!(!allows_persistent_ips(&nad(config)), "{config:?}");
        }
    }
}
