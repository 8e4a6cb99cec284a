//! Turning a Subnet and the IPPools that exist into the writes that make them agree (pure).
//!
//! The engine ([`crate::ipam::split_subnet`]) decides *what* each pool should own; this module
//! decides *in which order* to write it, because the order is what keeps an address from being
//! offered by two pools at once (see the split module's docs). A plan happens in two rounds:
//!
//! 1. Losses: every pool that gives addresses away (or starts draining) is cut down to what it
//!    keeps, and nothing else is written. A pool that both loses and gains only loses here.
//! 2. Once no pool has anything to give away (the next reconcile, on fresh state): gains,
//!    creations and deletions of drained, empty pools.
//!
//! Every write is conditional on the `resourceVersion` the plan was computed from, so an agent
//! that allocated in the meantime makes the write fail and the plan is recomputed; and an address
//! only ever joins a pool after every other pool has let go of it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use kube::ResourceExt;

use crate::crd::{Endpoint, IpAllocation, IpPool, IpPoolSpec, Subnet};
use crate::ipam::{CurrentPool, IpSet, SplitRequest, split_subnet};
use crate::store::parse::{
    ParseError, RecordedAddress, allocated_addresses, endpoint_addresses, holder_name,
    pool_allocations, pool_ranges, subnet_addresses,
};
use crate::store::pools::{PoolClaim, PoolCounters, PoolSpecChange, PoolSpecWrite};

/// Everything the controller should do for one Subnet.
#[derive(Clone, Debug, PartialEq)]
pub struct SubnetPlan {
    /// The effective gateway (spec or default), for the Subnet status.
    pub gateway: IpAddr,
    /// Addresses the Subnet can hand out.
    pub total: i64,
    /// How many pools hand them out ([`crate::ipam::pool_count`]: `replicas`, or more for a
    /// large Subnet).
    pub pool_count: u32,
    /// Addresses allocated across the Subnet's pools.
    pub allocated: i64,
    /// Spec writes of this round (see the module docs); empty when the pools match the split.
    pub writes: Vec<PoolSpecWrite>,
    /// Status counters of pools whose shown counters are stale (only meaningful once `writes`
    /// is empty: they are computed from the current specs).
    pub counters: Vec<PoolCounters>,
    /// A draining pool still records addresses: [`plan_handover`] moves them.
    pub handover_pending: bool,
}

/// What the pools of every Subnet but `subnet` hold, per Subnet: the addresses they offer
/// (`spec.ips`) and the ones they have allocated. An address in there must not join `subnet`'s
/// pools whatever the Subnets' specs say: a spec can drop an address a pod still holds (the pool
/// keeps it until it is released), and two Subnets admitted at the same moment were each checked
/// without the other.
pub fn held_by_other_subnets(
    subnet: &str,
    pools: &[IpPool],
) -> Result<BTreeMap<String, IpSet>, ParseError> {
    let mut held: BTreeMap<String, IpSet> = BTreeMap::new();
    for pool in pools.iter().filter(|pool| pool.spec.subnet != subnet) {
        let addresses = pool_ranges(pool)?.union(&allocated_addresses(pool)?);
        let entry = held.entry(pool.spec.subnet.clone()).or_default();
        *entry = entry.union(&addresses);
    }
    Ok(held)
}

/// Another Subnet whose pools hold addresses that `subnet` would hand out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolOverlap {
    /// The other Subnet.
    pub other: String,
    /// The addresses both would hand out.
    pub shared: IpSet,
}

impl PoolOverlap {
    /// The addresses, as `a-b` ranges joined for a message.
    pub fn shared_ranges(&self) -> String {
        self.shared.to_range_strings().join(", ")
    }
}

/// The first other Subnet (by name) whose pools ([`held_by_other_subnets`]) hold an address of
/// `subnet`'s effective set; `None` when `subnet` may have pools for all of it.
pub fn overlap_with_other_pools(
    subnet: &Subnet,
    pools: &[IpPool],
) -> Result<Option<PoolOverlap>, ParseError> {
    let effective = subnet_addresses(subnet)?.effective().clone();
    Ok(held_by_other_subnets(&subnet.name_any(), pools)?
        .into_iter()
        .find_map(|(other, held)| {
            let shared = effective.intersect(&held);
            (!shared.is_empty()).then_some(PoolOverlap { other, shared })
        }))
}

/// What a deleted Subnet (one with a deletion timestamp) waits for before its finalizer goes.
#[derive(Clone, Debug, PartialEq)]
pub enum DeletionStep {
    /// Stop every pool handing out addresses first (conditional writes), so that no allocation
    /// can start between the check below and the finalizer's removal.
    Drain(Vec<PoolSpecChange>),
    /// Every pool is draining but these addresses are still allocated (address, Endpoint).
    Wait(Vec<(IpAddr, String)>),
    /// Nothing is allocated any more: the finalizer may go, and the pools with the Subnet.
    Release,
}

/// Decides the next step of a deleted Subnet over its pools (found by label).
pub fn deletion_step(pools: &[IpPool]) -> Result<DeletionStep, ParseError> {
    let drains: Vec<PoolSpecChange> = pools
        .iter()
        .filter(|pool| !pool.spec.draining)
        .map(|pool| PoolSpecChange {
            name: pool.name_any(),
            resource_version: pool.resource_version().unwrap_or_default(),
            ips: pool.spec.ips.clone(),
            draining: true,
        })
        .collect();
    if !drains.is_empty() {
        return Ok(DeletionStep::Drain(drains));
    }
    let mut held = Vec::new();
    for pool in pools {
        for (address, record) in pool_allocations(pool)? {
            held.push((address, record.endpoint.clone()));
        }
    }
    held.sort();
    Ok(if held.is_empty() {
        DeletionStep::Release
    } else {
        DeletionStep::Wait(held)
    })
}

/// Computes the writes and counters that bring `pools` (the Subnet's existing IPPools, found by
/// label) in line with `subnet`. Pools whose names are not `<subnet>-<index>` are ignored.
pub fn plan_pools(subnet: &Subnet, pools: &[IpPool]) -> Result<SubnetPlan, ParseError> {
    let subnet_name = subnet.name_any();
    let addresses = subnet_addresses(subnet)?;
    let indexed = indexed_pools(&subnet_name, pools);
    let view = handover_view(&indexed)?;
    // A handed-over address counts as the active pool's: its draining pool lets it go from
    // its `ips` (a loss, written first) before the active pool adds it (a gain).
    let mut copied: BTreeMap<u32, Vec<IpAddr>> = BTreeMap::new();
    for draining in &view.draining {
        if let Handover::Copied { .. } = draining.handover {
            copied
                .entry(draining.index)
                .or_default()
                .push(draining.address);
        }
    }
    let mut current = Vec::with_capacity(indexed.len());
    let mut recorded = BTreeSet::new();
    for (index, pool) in &indexed {
        let ranges = pool_ranges(pool)?;
        let mut allocated = allocated_addresses(pool)?;
        if !allocated.is_empty() {
            recorded.insert(*index);
        }
        if let Some(copied) = copied.get(index) {
            allocated = allocated.subtract(&copied.iter().copied().collect());
        }
        current.push(CurrentPool {
            index: *index,
            ranges,
            allocated,
        });
    }
    let existing = indexed;
    let pool_count =
        crate::ipam::pool_count(u32::from(subnet.spec.replicas), addresses.effective().len());
    let plans = split_subnet(&SplitRequest {
        subnet: &subnet_name,
        effective: addresses.effective(),
        replicas: pool_count,
        pools: &current,
    })
    .map_err(|source| ParseError::Addresses {
        subnet: subnet_name.clone(),
        source,
    })?;

    let mut losses = Vec::new();
    let mut gains = Vec::new();
    let mut counters = Vec::new();
    let mut allocated_total: u128 = 0;
    for plan in &plans {
        allocated_total += plan.allocated.len();
        let found = existing.iter().find(|(index, _)| *index == plan.index);
        let Some((_, pool)) = found else {
            if !plan.deletable {
                gains.push(PoolSpecWrite::Create {
                    name: plan.name.clone(),
                    spec: IpPoolSpec {
                        subnet: subnet_name.clone(),
                        cidr: addresses.cidr().to_string(),
                        gateway: Some(addresses.gateway().to_string()),
                        ips: plan.ranges.to_range_strings(),
                        draining: plan.draining,
                    },
                });
            }
            continue;
        };
        // An empty version (never from the API server) fails the write, not the guard.
        let resource_version = pool.resource_version().unwrap_or_default();
        // A pool whose every record was handed over still holds them until the Endpoints
        // name the new pools ([`plan_handover`]): it is deleted once it records nothing.
        if plan.deletable && !recorded.contains(&plan.index) {
            gains.push(PoolSpecWrite::Delete {
                name: plan.name.clone(),
                resource_version,
            });
            continue;
        }
        let current_ranges = current
            .iter()
            .find(|pool| pool.index == plan.index)
            .map(|pool| pool.ranges.clone())
            .unwrap_or_default();
        let starts_draining = plan.draining && !pool.spec.draining;
        if !current_ranges.is_subset(&plan.ranges) || starts_draining {
            losses.push(PoolSpecWrite::Update(PoolSpecChange {
                name: plan.name.clone(),
                resource_version,
                ips: current_ranges.intersect(&plan.ranges).to_range_strings(),
                draining: plan.draining,
            }));
        } else if current_ranges != plan.ranges || pool.spec.draining != plan.draining {
            gains.push(PoolSpecWrite::Update(PoolSpecChange {
                name: plan.name.clone(),
                resource_version,
                ips: plan.ranges.to_range_strings(),
                draining: plan.draining,
            }));
        } else {
            let wanted = counters_for(
                &plan.name,
                &resource_version,
                plan.allocated.len(),
                plan.free().len(),
            );
            let shown = pool.status.as_ref().map(|status| {
                (
                    status.allocated_ip_count,
                    status.unallocated_ip_count,
                    status.total_ip_count,
                )
            });
            if shown != Some((wanted.allocated, wanted.unallocated, wanted.total)) {
                counters.push(wanted);
            }
        }
    }
    let writes = if losses.is_empty() { gains } else { losses };
    Ok(SubnetPlan {
        gateway: addresses.gateway(),
        total: saturating_i64(addresses.effective().len()),
        pool_count,
        allocated: saturating_i64(allocated_total),
        writes,
        counters,
        handover_pending: !view.draining.is_empty(),
    })
}

/// The pools of Subnet `subnet` by index; pools whose names are not `<subnet>-<index>` are
/// left out.
fn indexed_pools<'a>(subnet: &str, pools: &'a [IpPool]) -> Vec<(u32, &'a IpPool)> {
    pools
        .iter()
        .filter_map(|pool| {
            let name = pool.name_any();
            let (owner, index) = crate::ipam::parse_pool_name(&name)?;
            (owner == subnet).then_some((index, pool))
        })
        .collect()
}

/// Where one record of a draining pool stands in a handover ([`HandoverStep`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handover<'a> {
    /// No active pool records the address yet.
    Pending,
    /// Active pool `to` records it for the same holder: the copy is done.
    Copied { to: &'a str },
    /// An active pool records it for another holder: a duplicate no handover can repair (the
    /// split refuses it, loudly).
    Contested,
}

/// One allocation record of a draining pool, with where its handover stands.
struct DrainingRecord<'a> {
    index: u32,
    pool: &'a IpPool,
    address: IpAddr,
    record: &'a IpAllocation,
    handover: Handover<'a>,
}

/// The Subnet's pools as a handover sees them: every active pool with its record count, and
/// every record of a draining pool.
struct HandoverView<'a> {
    active: Vec<(&'a IpPool, usize)>,
    draining: Vec<DrainingRecord<'a>>,
}

fn handover_view<'a>(pools: &[(u32, &'a IpPool)]) -> Result<HandoverView<'a>, ParseError> {
    let mut active = Vec::new();
    let mut recorded: BTreeMap<IpAddr, (&'a str, &'a str)> = BTreeMap::new();
    for (_, pool) in pools.iter().filter(|(_, pool)| !pool.spec.draining) {
        let records = pool_allocations(pool)?;
        active.push((*pool, records.len()));
        let name = pool.metadata.name.as_deref().unwrap_or_default();
        for (address, record) in records {
            recorded.insert(address, (name, record.endpoint.as_str()));
        }
    }
    let mut draining = Vec::new();
    for (index, pool) in pools.iter().filter(|(_, pool)| pool.spec.draining) {
        for (address, record) in pool_allocations(pool)? {
            let handover = match recorded.get(&address) {
                None => Handover::Pending,
                Some((to, holder)) if *holder == record.endpoint => Handover::Copied { to },
                Some(_) => Handover::Contested,
            };
            draining.push(DrainingRecord {
                index: *index,
                pool,
                address,
                record,
                handover,
            });
        }
    }
    Ok(HandoverView { active, draining })
}

/// One step of handing a draining pool's allocations over to the pools that remain, so that a
/// scale-down ends with `replicas` pools even while every pool holds addresses. The address and
/// its holder never change, only which pool records it; each step is one guarded write and is
/// safe on its own, so a step that fails or a controller that dies between steps leaves a state
/// the next reconcile continues from:
///
/// 1. [`Copy`](Self::Copy): the active pool records the address as the draining pool does,
///    before it offers it. Then the split ([`plan_pools`]) moves the address out of the draining
///    pool's `ips` and into the active pool's: at no moment does a pool offer it unrecorded.
/// 2. [`Repoint`](Self::Repoint): the Endpoint names the active pool, so the holder's DEL (and
///    the controller's release) goes there.
/// 3. [`Drop`](Self::Drop): the draining pool forgets its copy, and once empty it is deleted.
///
/// A DEL in the middle releases the record the Endpoint names; the other copy's holder is then
/// gone, and the sweep or step 3 removes it.
#[derive(Clone, Debug, PartialEq)]
pub enum HandoverStep {
    /// Record these addresses in an active pool (a group claim guarded by its version).
    Copy(PoolClaim),
    /// The Endpoint, as read, with the handed-over addresses' pools rewritten.
    Repoint(Box<Endpoint>),
    /// Remove these records (address → the Endpoint it must still name) from a draining pool.
    Drop {
        pool: String,
        holders: BTreeMap<IpAddr, String>,
    },
}

/// What a Subnet's handover does next.
#[derive(Debug, Default)]
pub struct HandoverPlan {
    pub steps: Vec<HandoverStep>,
    /// Endpoints that could not be read (`namespace/name` and why): the records they hold are
    /// neither repointed nor dropped until they can be, so that no holder loses its record.
    pub unreadable: Vec<(String, ParseError)>,
}

/// The next handover steps for the Subnet's `pools` (found by label), given every Endpoint.
/// No steps when no draining pool records anything, or no pool is active to take it.
pub fn plan_handover(
    subnet: &str,
    pools: &[IpPool],
    endpoints: &[Endpoint],
) -> Result<HandoverPlan, ParseError> {
    let indexed = indexed_pools(subnet, pools);
    let HandoverView {
        mut active,
        draining,
    } = handover_view(&indexed)?;
    let mut plan = HandoverPlan::default();
    let mut listed: BTreeMap<(String, IpAddr), (usize, RecordedAddress)> = BTreeMap::new();
    let mut unreadable = BTreeSet::new();
    for (position, endpoint) in endpoints.iter().enumerate() {
        match endpoint_addresses(endpoint) {
            Ok(addresses) => listed.extend(
                addresses
                    .into_iter()
                    .map(|address| ((address.pool.clone(), address.address), (position, address))),
            ),
            Err(error) => {
                let name = holder_name(endpoint);
                unreadable.insert(name.clone());
                plan.unreadable.push((name, error));
            }
        }
    }
    let mut copies: BTreeMap<String, PoolClaim> = BTreeMap::new();
    let mut repoints: BTreeMap<usize, Endpoint> = BTreeMap::new();
    let mut drops: BTreeMap<String, BTreeMap<IpAddr, String>> = BTreeMap::new();
    for draining in draining {
        let name = draining.pool.name_any();
        match draining.handover {
            Handover::Copied { .. } if unreadable.contains(&draining.record.endpoint) => {}
            Handover::Copied { to } => match listed.get(&(name.clone(), draining.address)) {
                Some((position, address)) => {
                    let endpoint = repoints
                        .entry(*position)
                        .or_insert_with(|| endpoints[*position].clone());
                    repoint(endpoint, address, to);
                }
                None => {
                    drops
                        .entry(name)
                        .or_default()
                        .insert(draining.address, draining.record.endpoint.clone());
                }
            },
            Handover::Contested => {}
            Handover::Pending => {
                let Some((target, load)) = active.iter_mut().min_by_key(|(_, load)| *load) else {
                    return Ok(HandoverPlan::default());
                };
                *load += 1;
                let target_name = target.name_any();
                copies
                    .entry(target_name.clone())
                    .or_insert_with(|| PoolClaim {
                        pool: target_name,
                        resource_version: target.resource_version().unwrap_or_default(),
                        records: BTreeMap::new(),
                    })
                    .records
                    .insert(draining.address, draining.record.clone());
            }
        }
    }
    plan.steps = copies
        .into_values()
        .map(HandoverStep::Copy)
        .chain(
            repoints
                .into_values()
                .map(|endpoint| HandoverStep::Repoint(Box::new(endpoint))),
        )
        .chain(
            drops
                .into_iter()
                .map(|(pool, holders)| HandoverStep::Drop { pool, holders }),
        )
        .collect();
    Ok(plan)
}

/// Makes `endpoint` name pool `to` for `address`, one of the addresses it records.
fn repoint(endpoint: &mut Endpoint, address: &RecordedAddress, to: &str) {
    for interface in &mut endpoint.spec.interfaces {
        if interface.interface != address.interface {
            continue;
        }
        let pool = if address.address.is_ipv4() {
            &mut interface.ipv4_pool
        } else {
            &mut interface.ipv6_pool
        };
        if pool.as_deref() == Some(address.pool.as_str()) {
            *pool = Some(to.to_owned());
        }
    }
}

fn counters_for(name: &str, resource_version: &str, allocated: u128, free: u128) -> PoolCounters {
    PoolCounters {
        name: name.to_string(),
        resource_version: resource_version.to_string(),
        allocated: saturating_i64(allocated),
        unallocated: saturating_i64(free),
        total: saturating_i64(allocated + free),
    }
}

/// IPv6 pools can hold more than `i64::MAX` addresses; the counters then show the maximum.
fn saturating_i64(count: u128) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kube::api::ObjectMeta;

    use super::*;
    use crate::crd::{IpAllocation, IpPoolStatus, SubnetSpec};
    use crate::ipam::IpSet;

    fn example_subnet(replicas: u16) -> Subnet {
        let spec: SubnetSpec = serde_json::from_value(serde_json::json!({
            "subnet": "10.6.0.0/16",
            "gateway": "10.6.0.1",
            "ips": ["10.6.153.100-10.6.153.255"],
            "replicas": replicas,
        }))
        .expect("example Subnet spec parses");
        Subnet::new("subnet", spec)
    }

    /// Materialises the pools a plan creates, as the API server would store them.
    fn created(plan: &SubnetPlan) -> Vec<IpPool> {
        plan.writes
            .iter()
            .map(|write| match write {
                PoolSpecWrite::Create { name, spec } => IpPool {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        resource_version: Some("1".into()),
                        ..ObjectMeta::default()
                    },
                    spec: spec.clone(),
                    status: None,
                },
                other => panic!("expected only creations, got {other:?}"),
            })
            .collect()
    }

    fn allocate(pool: &mut IpPool, address: &str) {
        pool.status
            .get_or_insert_with(IpPoolStatus::default)
            .allocations
            .insert(
                address.to_string(),
                IpAllocation {
                    endpoint: "default/pod".into(),
                    interface: "eth0".into(),
                    pod_uid: "uid".into(),
                    node: "node1".into(),
                    container_id: None,
                    network: None,
                },
            );
    }

    fn apply(pools: &mut Vec<IpPool>, writes: &[PoolSpecWrite]) {
        for write in writes {
            match write {
                PoolSpecWrite::Update(change) => {
                    let pool = pools
                        .iter_mut()
                        .find(|pool| pool.name_any() == change.name)
                        .expect("updated pool exists");
                    pool.spec.ips = change.ips.clone();
                    pool.spec.draining = change.draining;
                }
                PoolSpecWrite::Create { .. } => pools.extend(created(&SubnetPlan {
                    writes: vec![write.clone()],
                    ..empty_plan()
                })),
                PoolSpecWrite::Delete { name, .. } => pools.retain(|pool| &pool.name_any() != name),
            }
        }
    }

    fn empty_plan() -> SubnetPlan {
        SubnetPlan {
            gateway: "10.6.0.1".parse().expect("address"),
            total: 0,
            pool_count: 1,
            allocated: 0,
            writes: Vec::new(),
            counters: Vec::new(),
            handover_pending: false,
        }
    }

    /// Reconciles until nothing is left to write, checking that no round ever lets two pools
    /// offer the same address.
    fn converge(subnet: &Subnet, pools: &mut Vec<IpPool>) -> SubnetPlan {
        for _ in 0..5 {
            let plan = plan_pools(subnet, pools).expect("plan");
            if plan.writes.is_empty() {
                return plan;
            }
            apply(pools, &plan.writes);
            let mut seen = IpSet::new();
            for pool in pools.iter() {
                let ranges = IpSet::parse_ranges(&pool.spec.ips).expect("ranges");
                assert!(
                    seen.intersect(&ranges).is_empty(),
                    "an address is in two pools"
                );
                seen = seen.union(&ranges);
            }
        }
        panic!("the plan did not converge in 5 rounds");
    }

    #[test]
    fn example_subnet_creates_three_pools_of_52() {
        let subnet = example_subnet(3);
        let plan = plan_pools(&subnet, &[]).expect("plan");
        let pools = created(&plan);
        let ips: Vec<_> = pools.iter().map(|pool| pool.spec.ips.clone()).collect();
        assert_eq!(
            ips,
            [
                vec!["10.6.153.100-10.6.153.151".to_string()],
                vec!["10.6.153.152-10.6.153.203".to_string()],
                vec!["10.6.153.204-10.6.153.255".to_string()],
            ]
        );
        let names: Vec<_> = pools.iter().map(ResourceExt::name_any).collect();
        assert_eq!(names, ["subnet-0", "subnet-1", "subnet-2"]);
        assert_eq!(plan.total, 156);
        assert_eq!(pools[0].spec.gateway.as_deref(), Some("10.6.0.1"));
        assert_eq!(pools[0].spec.cidr, "10.6.0.0/16");
    }

    #[test]
    fn a_whole_slash_16_is_split_into_pools_of_at_most_2048_addresses() {
        let spec: SubnetSpec = serde_json::from_value(serde_json::json!({
            "subnet": "10.6.0.0/16", "replicas": 1,
        }))
        .expect("Subnet spec parses");
        let plan = plan_pools(&Subnet::new("wide", spec), &[]).expect("plan");
        let pools = created(&plan);
        assert_eq!((plan.pool_count, pools.len()), (32, 32));
        for pool in &pools {
            let size = pool_ranges(pool).expect("ranges").len();
            assert!(
                size <= crate::ipam::MAX_POOL_ADDRESSES,
                "{}: {size}",
                pool.name_any()
            );
        }
        assert_eq!(plan.total, 65_533, "every usable address but the gateway");
    }

    #[test]
    fn settled_pools_only_need_their_counters() {
        let subnet = example_subnet(3);
        let mut pools = created(&plan_pools(&subnet, &[]).expect("plan"));
        allocate(&mut pools[1], "10.6.153.160");
        let plan = plan_pools(&subnet, &pools).expect("plan");
        assert!(plan.writes.is_empty());
        assert_eq!(plan.allocated, 1);
        let counters: BTreeMap<_, _> = plan
            .counters
            .iter()
            .map(|c| (c.name.as_str(), (c.allocated, c.unallocated, c.total)))
            .collect();
        assert_eq!(counters["subnet-1"], (1, 51, 52));
        assert_eq!(counters["subnet-0"], (0, 52, 52));
    }

    #[test]
    fn scale_down_drains_a_busy_pool_and_never_moves_its_address() {
        let mut pools = created(&plan_pools(&example_subnet(3), &[]).expect("plan"));
        allocate(&mut pools[2], "10.6.153.250");
        let plan = converge(&example_subnet(2), &mut pools);
        let drained = pools
            .iter()
            .find(|pool| pool.name_any() == "subnet-2")
            .expect("a pool with an allocation is kept");
        assert!(drained.spec.draining);
        assert_eq!(drained.spec.ips, ["10.6.153.250"]);
        assert_eq!(plan.total, 156);
        let active: u128 = pools
            .iter()
            .filter(|pool| !pool.spec.draining)
            .map(|pool| IpSet::parse_ranges(&pool.spec.ips).expect("ranges").len())
            .sum();
        assert_eq!(
            active, 155,
            "every free address is offered by an active pool"
        );

        // Released: the drained pool goes away.
        pools[2].status = None;
        converge(&example_subnet(2), &mut pools);
        assert_eq!(pools.len(), 2);
    }

    fn holder_endpoint(name: &str, pool: &str, address: &str) -> Endpoint {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "virtnet.io/v1alpha1", "kind": "Endpoint",
            "metadata": {"name": name, "namespace": "default", "resourceVersion": "1"},
            "spec": {"interfaces": [{"interface": "eth0", "ipv4Pool": pool,
                                     "ipv4": format!("{address}/16")}],
                     "ownerKind": "StatefulSet", "ownerName": "db", "node": "node1",
                     "podUID": name, "containerID": name, "sticky": true},
        }))
        .expect("Endpoint parses")
    }

    /// Every recorded address is offered by no pool that does not record it for its holder, and
    /// recorded for one holder only.
    fn assert_no_address_offered_twice(pools: &[IpPool]) {
        let mut holders: BTreeMap<IpAddr, String> = BTreeMap::new();
        for pool in pools {
            for (address, record) in pool_allocations(pool).expect("records") {
                let holder = holders
                    .entry(address)
                    .or_insert_with(|| record.endpoint.clone());
                assert_eq!(
                    holder, &record.endpoint,
                    "{address} recorded for two holders"
                );
            }
        }
        for pool in pools {
            let records = pool_allocations(pool).expect("records");
            for address in holders.keys() {
                if pool_ranges(pool).expect("ranges").contains(*address) {
                    assert!(
                        records.contains_key(address),
                        "{} offers {address}, which another pool records",
                        pool.name_any()
                    );
                }
            }
        }
    }

    /// Applies one round of the Subnet reconciler: the split's writes, else the handover's;
    /// Endpoints the handover cannot read go into `unreadable`. `false` once there is nothing
    /// left to do.
    fn reconcile_round(
        subnet: &Subnet,
        pools: &mut Vec<IpPool>,
        endpoints: &mut [Endpoint],
        unreadable: &mut BTreeSet<String>,
    ) -> bool {
        let plan = plan_pools(subnet, pools).expect("plan");
        if !plan.writes.is_empty() {
            apply(pools, &plan.writes);
            return true;
        }
        let handover = plan_handover(&subnet.name_any(), pools, endpoints).expect("handover");
        unreadable.extend(handover.unreadable.into_iter().map(|(name, _)| name));
        let steps = handover.steps;
        assert!(plan.handover_pending || steps.is_empty());
        for step in &steps {
            match step {
                HandoverStep::Copy(claim) => {
                    let pool = pools.iter_mut().find(|pool| pool.name_any() == claim.pool);
                    let status = pool.expect("target exists").status.get_or_insert_default();
                    for (address, record) in &claim.records {
                        status
                            .allocations
                            .insert(address.to_string(), record.clone());
                    }
                }
                HandoverStep::Repoint(repointed) => {
                    let endpoint = endpoints
                        .iter_mut()
                        .find(|endpoint| endpoint.name_any() == repointed.name_any());
                    *endpoint.expect("Endpoint exists") = (**repointed).clone();
                }
                HandoverStep::Drop { pool, holders } => {
                    let pool = pools.iter_mut().find(|p| &p.name_any() == pool);
                    let status = pool.expect("pool exists").status.get_or_insert_default();
                    for address in holders.keys() {
                        status.allocations.remove(&address.to_string());
                    }
                }
            }
        }
        !steps.is_empty()
    }

    /// The five pools of `example_subnet(5)`, each recording its first address for a
    /// StatefulSet pod `db-<index>`, with those pods' Endpoints.
    fn five_busy_pools() -> (Vec<IpPool>, Vec<Endpoint>) {
        let mut pools = created(&plan_pools(&example_subnet(5), &[]).expect("plan"));
        let mut endpoints = Vec::new();
        for (index, pool) in pools.iter_mut().enumerate() {
            let first = pool_ranges(pool)
                .expect("ranges")
                .iter()
                .next()
                .expect("address");
            let name = format!("db-{index}");
            let address = first.to_string();
            pool.status.get_or_insert_default().allocations.insert(
                address.clone(),
                IpAllocation {
                    endpoint: format!("default/{name}"),
                    interface: "eth0".into(),
                    pod_uid: name.clone(),
                    node: "node1".into(),
                    container_id: Some(name.clone()),
                    network: None,
                },
            );
            endpoints.push(holder_endpoint(&name, &pool.name_any(), &address));
        }
        (pools, endpoints)
    }

    #[test]
    fn scale_down_hands_busy_pools_addresses_over_and_ends_with_replicas_pools() {
        let (mut pools, mut endpoints) = five_busy_pools();
        let before: BTreeMap<String, IpAddr> = endpoints
            .iter()
            .map(|endpoint| {
                let recorded = endpoint_addresses(endpoint).expect("addresses");
                (endpoint.name_any(), recorded[0].address)
            })
            .collect();
        let subnet = example_subnet(2);
        let mut rounds = 0;
        let mut unreadable = BTreeSet::new();
        while reconcile_round(&subnet, &mut pools, &mut endpoints, &mut unreadable) {
            assert_no_address_offered_twice(&pools);
            rounds += 1;
            assert!(rounds < 20, "the resize did not converge: {pools:#?}");
        }
        assert!(unreadable.is_empty());
        let names: Vec<String> = pools.iter().map(ResourceExt::name_any).collect();
        assert_eq!(names, ["subnet-0", "subnet-1"]);
        assert!(pools.iter().all(|pool| !pool.spec.draining));
        for endpoint in &endpoints {
            let recorded = &endpoint_addresses(endpoint).expect("addresses")[0];
            assert_eq!(
                recorded.address,
                before[&endpoint.name_any()],
                "no address changed"
            );
            let pool = pools.iter().find(|pool| pool.name_any() == recorded.pool);
            let records =
                pool_allocations(pool.expect("the Endpoint's pool exists")).expect("records");
            assert_eq!(
                records
                    .get(&recorded.address)
                    .map(|record| record.endpoint.as_str()),
                Some(format!("default/{}", endpoint.name_any()).as_str()),
                "the pool the Endpoint names records its address"
            );
        }
        let total: u128 = pools
            .iter()
            .map(|pool| pool_ranges(pool).expect("ranges").len())
            .sum();
        assert_eq!(
            total, 156,
            "every address is offered by one of the two pools"
        );
    }

    #[test]
    fn an_unreadable_endpoint_is_reported_and_its_holder_keeps_its_record() {
        let (mut pools, mut endpoints) = five_busy_pools();
        // db-4's pool drains in a scale to 2; its Endpoint records an address that does not parse.
        endpoints[4].spec.interfaces[0].ipv4 = Some("not-an-address".into());
        let subnet = example_subnet(2);
        let mut unreadable = BTreeSet::new();
        let mut rounds = 0;
        while reconcile_round(&subnet, &mut pools, &mut endpoints, &mut unreadable) {
            assert_no_address_offered_twice(&pools);
            rounds += 1;
            assert!(rounds < 20, "the resize did not converge: {pools:#?}");
        }
        assert_eq!(unreadable, BTreeSet::from(["default/db-4".to_owned()]));
        let holders: Vec<(String, String)> = pools
            .iter()
            .flat_map(|pool| {
                pool_allocations(pool)
                    .expect("records")
                    .into_values()
                    .map(|record| (pool.name_any(), record.endpoint.clone()))
                    .collect::<Vec<_>>()
            })
            .filter(|(_, holder)| holder == "default/db-4")
            .collect();
        assert_eq!(
            holders.len(),
            2,
            "db-4's record stays in its draining pool, copied to an active one: {holders:?}"
        );
        assert!(holders.iter().any(|(pool, _)| pool == "subnet-4"));
        let others_moved = endpoints[..4].iter().all(|endpoint| {
            let recorded = &endpoint_addresses(endpoint).expect("addresses")[0];
            ["subnet-0", "subnet-1"].contains(&recorded.pool.as_str())
        });
        assert!(
            others_moved,
            "the other holders are handed over: {endpoints:#?}"
        );
    }

    #[test]
    fn scale_up_rebalances_in_loss_then_gain_rounds() {
        let mut pools = created(&plan_pools(&example_subnet(3), &[]).expect("plan"));
        let first = plan_pools(&example_subnet(5), &pools).expect("plan");
        assert!(
            first
                .writes
                .iter()
                .all(|write| matches!(write, PoolSpecWrite::Update(_))),
            "the first round only takes addresses away: {:?}",
            first.writes
        );
        converge(&example_subnet(5), &mut pools);
        let sizes: Vec<u128> = pools
            .iter()
            .map(|pool| IpSet::parse_ranges(&pool.spec.ips).expect("ranges").len())
            .collect();
        assert_eq!(sizes.iter().sum::<u128>(), 156);
        assert!(
            sizes.iter().all(|size| (31..=32).contains(size)),
            "{sizes:?}"
        );
    }

    #[test]
    fn a_deleted_subnet_drains_then_waits_for_its_allocations_then_lets_go() {
        let mut pools = created(&plan_pools(&example_subnet(2), &[]).expect("plan"));
        allocate(&mut pools[1], "10.6.153.200");
        let DeletionStep::Drain(drains) = deletion_step(&pools).expect("step") else {
            panic!("the pools hand out addresses: they drain first");
        };
        assert_eq!(drains.len(), 2);
        assert!(drains.iter().all(|change| change.draining));
        assert_eq!(
            drains[0].ips, pools[0].spec.ips,
            "draining changes no range"
        );
        apply(
            &mut pools,
            &drains
                .into_iter()
                .map(PoolSpecWrite::Update)
                .collect::<Vec<_>>(),
        );
        assert_eq!(
            deletion_step(&pools).expect("step"),
            DeletionStep::Wait(vec![(
                "10.6.153.200".parse().expect("address"),
                "default/pod".to_owned()
            )])
        );
        pools[1].status = None;
        assert_eq!(deletion_step(&pools).expect("step"), DeletionStep::Release);
        assert_eq!(deletion_step(&[]).expect("step"), DeletionStep::Release);
    }

    #[test]
    fn another_subnets_offered_or_allocated_addresses_are_an_overlap() {
        let mut theirs = created(&plan_pools(&example_subnet(1), &[]).expect("plan"));
        // Their spec no longer offers 10.6.153.100-10.6.153.199, but a pod holds .120.
        theirs[0].spec.ips = vec!["10.6.153.200-10.6.153.255".into()];
        allocate(&mut theirs[0], "10.6.153.120");
        let candidate = |ips: &[&str]| {
            let mut subnet = example_subnet(1);
            subnet.metadata.name = Some("other".into());
            subnet.spec.ips = ips.iter().map(|ip| (*ip).to_owned()).collect();
            subnet
        };
        let overlap = overlap_with_other_pools(&candidate(&["10.6.153.100-10.6.153.130"]), &theirs)
            .expect("check")
            .expect("the held address overlaps");
        assert_eq!(overlap.other, "subnet");
        assert_eq!(overlap.shared_ranges(), "10.6.153.120");
        let overlap = overlap_with_other_pools(&candidate(&["10.6.153.250-10.6.154.10"]), &theirs)
            .expect("check")
            .expect("the offered addresses overlap");
        assert_eq!(overlap.shared_ranges(), "10.6.153.250-10.6.153.255");
        assert_eq!(
            overlap_with_other_pools(&candidate(&["10.6.153.100-10.6.153.119"]), &theirs)
                .expect("check"),
            None
        );
        // A Subnet's own pools are never an overlap.
        assert_eq!(
            overlap_with_other_pools(&example_subnet(1), &theirs).expect("check"),
            None
        );
    }

    #[test]
    fn an_invalid_subnet_is_reported_not_split() {
        let mut subnet = example_subnet(3);
        subnet.spec.subnet = "10.6.0.0".into();
        let error = plan_pools(&subnet, &[]).expect_err("not a CIDR");
        assert!(
            error.to_string().contains("write it like 10.6.0.0/16"),
            "{error}"
        );
    }
}
