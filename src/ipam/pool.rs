//! An in-memory model of a Subnet's pools that enforces every allocation rule.
//!
//! The agent can run its decisions through these functions against its cached pools before
//! writing the result (conditionally) to the API server; the tests use them as the reference
//! model.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use super::error::IpamError;
use super::key::AllocationKey;
use super::pick::{order_pools_for_node, pick_free_address};
use super::set::IpSet;
use super::split::{CurrentPool, PoolPlan, pool_name};
use super::subnet::SubnetAddresses;

/// Who holds an address: the allocation key and the pod interface.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllocationHolder {
    /// The sticky or per-pod key.
    pub key: AllocationKey,
    /// The pod interface, e.g. `eth0`.
    pub interface: String,
}

impl fmt::Display for AllocationHolder {
    /// E.g. `StatefulSet default/sample-ss-0 (eth0)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ({})", self.key.kind(), self.key, self.interface)
    }
}

/// A pool's address counts, as shown by `kubectl get ippools`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolCounts {
    /// Allocated addresses (including those outside the Subnet).
    pub allocated: u128,
    /// Addresses the pool may still hand out.
    pub free: u128,
    /// Allocated addresses the Subnet no longer offers.
    pub outside_subnet: u128,
}

impl PoolCounts {
    /// `allocated + free`.
    pub fn total(&self) -> u128 {
        self.allocated + self.free
    }
}

/// One pool: its assigned ranges, its allocations, and whether it is draining.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolState {
    /// The Subnet the pool belongs to.
    pub subnet: String,
    /// The pool's index within the Subnet.
    pub index: u32,
    /// The addresses assigned to the pool.
    pub ranges: IpSet,
    /// Allocated address → holder.
    pub allocations: BTreeMap<IpAddr, AllocationHolder>,
    /// A draining pool hands nothing out; it waits for its allocations to be released.
    pub draining: bool,
}

impl PoolState {
    /// An empty, active pool.
    pub fn new(subnet: &str, index: u32, ranges: IpSet) -> Self {
        Self {
            subnet: subnet.to_string(),
            index,
            ranges,
            allocations: BTreeMap::new(),
            draining: false,
        }
    }

    /// `<subnet>-<index>`.
    pub fn name(&self) -> String {
        pool_name(&self.subnet, self.index)
    }

    /// The allocated addresses.
    pub fn allocated(&self) -> IpSet {
        self.allocations.keys().copied().collect()
    }

    /// The addresses the pool may hand out: its ranges that the Subnet still offers, minus
    /// allocations; nothing while draining.
    pub fn free(&self, subnet: &SubnetAddresses) -> IpSet {
        if self.draining {
            return IpSet::new();
        }
        self.ranges
            .intersect(subnet.effective())
            .subtract(&self.allocated())
    }

    /// The pool's counts.
    pub fn counts(&self, subnet: &SubnetAddresses) -> PoolCounts {
        let allocated = self.allocated();
        PoolCounts {
            allocated: allocated.len(),
            free: self.free(subnet).len(),
            outside_subnet: allocated.subtract(subnet.effective()).len(),
        }
    }

    /// The address `holder` holds in this pool, if any.
    pub fn address_of(&self, holder: &AllocationHolder) -> Option<IpAddr> {
        self.allocations
            .iter()
            .find_map(|(address, held_by)| (held_by == holder).then_some(*address))
    }

    /// Hands a free address to `holder`, or returns the one it already holds here (so a retried
    /// CNI ADD never burns a second address).
    pub fn allocate(
        &mut self,
        subnet: &SubnetAddresses,
        holder: AllocationHolder,
        node: &str,
    ) -> Result<IpAddr, IpamError> {
        if let Some(address) = self.address_of(&holder) {
            return Ok(address);
        }
        if self.draining {
            return Err(IpamError::PoolDraining { pool: self.name() });
        }
        let address = pick_free_address(&self.ranges, &self.free(subnet), node, &holder)
            .ok_or_else(|| IpamError::PoolExhausted { pool: self.name() })?;
        self.allocations.insert(address, holder);
        Ok(address)
    }

    /// Hands exactly `address` to `holder`; see [`find_static_pool`] for the checks.
    pub fn allocate_static(
        &mut self,
        subnet: &SubnetAddresses,
        holder: AllocationHolder,
        address: IpAddr,
    ) -> Result<IpAddr, IpamError> {
        find_static_pool(std::slice::from_ref(self), subnet, &holder, address)?;
        self.allocations.insert(address, holder);
        Ok(address)
    }

    /// Releases what `holder` holds here. Only the holder's own record is removed, so a stale
    /// release (say, for an older pod of the same name) cannot free another holder's address.
    /// An address the Subnet no longer offers stays in `ranges` (the controller owns those) but
    /// is never free again; the next split drops it.
    pub fn release(&mut self, holder: &AllocationHolder) -> Option<IpAddr> {
        let address = self.address_of(holder)?;
        self.allocations.remove(&address);
        Some(address)
    }

    /// The pool as input to [`super::split_subnet`].
    pub fn current(&self) -> CurrentPool {
        CurrentPool {
            index: self.index,
            ranges: self.ranges.clone(),
            allocated: self.allocated(),
        }
    }
}

/// Allocates for `holder` from the pools of one Subnet: the address it already holds in any of
/// them, or else a free address from the first pool in [`order_pools_for_node`] order (`peers`:
/// the nodes that may use the Subnet, which spreads their first choices).
/// Returns the position of the pool in `pools` and the address.
pub fn allocate_in_pools(
    pools: &mut [PoolState],
    subnet: &SubnetAddresses,
    holder: AllocationHolder,
    node: &str,
    peers: &[String],
) -> Result<(usize, IpAddr), IpamError> {
    if let Some(held) = pools
        .iter()
        .enumerate()
        .find_map(|(position, pool)| pool.address_of(&holder).map(|address| (position, address)))
    {
        return Ok(held);
    }
    let position = order_pools_for_node(pools, subnet, node, peers)
        .into_iter()
        .next()
        .ok_or(IpamError::SubnetExhausted {
            cidr: subnet.cidr(),
        })?;
    let address = pools[position].allocate(subnet, holder, node)?;
    Ok((position, address))
}

/// Checks a static request for `address` against the pools of its Subnet and returns the
/// position of the pool to allocate it from.
///
/// The address must be offered by the Subnet, lie in a non-draining pool, and be free — unless
/// `holder` already holds it, which is accepted as is (a sticky pod coming back), even if the
/// Subnet has since stopped offering it. A holder may hold one address per Subnet and interface.
pub fn find_static_pool(
    pools: &[PoolState],
    subnet: &SubnetAddresses,
    holder: &AllocationHolder,
    address: IpAddr,
) -> Result<usize, IpamError> {
    let held_by = pools.iter().enumerate().find_map(|(position, pool)| {
        pool.allocations
            .get(&address)
            .map(|held_by| (position, pool, held_by))
    });
    match held_by {
        Some((position, _, held_by)) if held_by == holder => return Ok(position),
        Some((_, pool, held_by)) => {
            return Err(IpamError::StaticAddressInUse {
                address,
                pool: pool.name(),
                holder: held_by.to_string(),
            });
        }
        None => {}
    }
    if let Some(reason) = subnet.why_not_allocatable(address) {
        return Err(IpamError::StaticAddressNotAllocatable {
            address,
            cidr: subnet.cidr(),
            reason,
        });
    }
    let position = pools
        .iter()
        .position(|pool| pool.ranges.contains(address))
        .ok_or(IpamError::StaticAddressNotInAnyPool {
            address,
            cidr: subnet.cidr(),
        })?;
    if pools[position].draining {
        return Err(IpamError::PoolDraining {
            pool: pools[position].name(),
        });
    }
    if let Some((pool, held)) = pools
        .iter()
        .find_map(|pool| pool.address_of(holder).map(|held| (pool, held)))
    {
        return Err(IpamError::HolderHoldsAnotherAddress {
            holder: holder.to_string(),
            held,
            pool: pool.name(),
            requested: address,
        });
    }
    Ok(position)
}

/// Applies a split to the in-memory pools of `subnet`, the way the controller must apply it to
/// the API server: first every pool only *loses* addresses (and draining pools stop handing
/// out, empty draining pools are deleted), then pools gain addresses and new pools appear.
/// Each pool write first checks the pool's allocations still equal those the plan was computed
/// from (the stand-in for a resourceVersion precondition); on a mismatch it stops with
/// [`IpamError::StalePlan`]. Stopping part-way is safe: addresses removed but not yet re-added
/// sit in no pool until the next split, and are never in two.
pub fn apply_split(
    pools: &mut Vec<PoolState>,
    subnet: &str,
    plans: &[PoolPlan],
) -> Result<(), IpamError> {
    let check_fresh = |pool: &PoolState, plan: &PoolPlan| {
        if pool.allocated() == plan.allocated {
            Ok(())
        } else {
            Err(IpamError::StalePlan {
                pool: plan.name.clone(),
            })
        }
    };
    let position_of = |pools: &[PoolState], index: u32| {
        pools
            .iter()
            .position(|pool| pool.subnet == subnet && pool.index == index)
    };

    // Phase 1: shrink, drain, delete.
    for plan in plans {
        let Some(position) = position_of(pools, plan.index) else {
            continue;
        };
        check_fresh(&pools[position], plan)?;
        if plan.deletable {
            pools.remove(position);
            continue;
        }
        let pool = &mut pools[position];
        pool.ranges = pool.ranges.intersect(&plan.ranges);
        pool.draining |= plan.draining;
    }

    // Phase 2: grow, un-drain, create.
    for plan in plans.iter().filter(|plan| !plan.deletable) {
        let position = match position_of(pools, plan.index) {
            Some(position) => position,
            None => {
                pools.push(PoolState::new(subnet, plan.index, IpSet::new()));
                pools.len() - 1
            }
        };
        let pool = &mut pools[position];
        check_fresh(pool, plan)?;
        pool.ranges = plan.ranges.clone();
        pool.draining = plan.draining;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::NotAllocatable;
    use crate::ipam::set::tests::set;
    use crate::ipam::split::{SplitRequest, split_subnet};

    fn subnet(ips: &[&str], exclude: &[&str]) -> SubnetAddresses {
        SubnetAddresses::parse("10.0.0.0/24".parse().expect("cidr"), None, ips, exclude)
            .expect("valid subnet")
    }

    fn holder(name: &str) -> AllocationHolder {
        AllocationHolder {
            key: AllocationKey::StatefulSetPod {
                namespace: "default".into(),
                name: name.into(),
            },
            interface: "eth0".into(),
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    fn split_into(pools: &mut Vec<PoolState>, subnet: &SubnetAddresses, replicas: u32) {
        let current: Vec<CurrentPool> = pools.iter().map(PoolState::current).collect();
        let plans = split_subnet(&SplitRequest {
            subnet: "s",
            effective: subnet.effective(),
            replicas,
            pools: &current,
        })
        .expect("split");
        apply_split(pools, "s", &plans).expect("apply");
    }

    #[test]
    fn allocate_is_idempotent_and_release_frees() {
        let subnet = subnet(&["10.0.0.10-10.0.0.13"], &[]);
        let mut pool = PoolState::new("s", 0, subnet.effective().clone());
        let first = pool.allocate(&subnet, holder("a"), "node").expect("free");
        assert_eq!(pool.allocate(&subnet, holder("a"), "other-node"), Ok(first));
        assert_eq!(
            pool.counts(&subnet),
            PoolCounts {
                allocated: 1,
                free: 3,
                outside_subnet: 0
            }
        );
        assert_eq!(pool.release(&holder("b")), None, "not b's address");
        assert_eq!(pool.release(&holder("a")), Some(first));
        assert_eq!(pool.counts(&subnet).total(), 4);
    }

    #[test]
    fn exhausted_and_draining_pools_refuse() {
        let subnet = subnet(&["10.0.0.10"], &[]);
        let mut pool = PoolState::new("s", 0, subnet.effective().clone());
        pool.allocate(&subnet, holder("a"), "n").expect("one free");
        assert_eq!(
            pool.allocate(&subnet, holder("b"), "n")
                .expect_err("full")
                .to_string(),
            "IPPool s-0 has no free address: add addresses to the Subnet's ips, or release some"
        );
        pool.draining = true;
        assert!(matches!(
            pool.allocate(&subnet, holder("b"), "n"),
            Err(IpamError::PoolDraining { .. })
        ));
        assert_eq!(
            pool.allocate(&subnet, holder("a"), "n"),
            Ok(ip("10.0.0.10")),
            "holder keeps it"
        );
    }

    #[test]
    fn never_hands_out_gateway_excluded_or_removed_addresses() {
        // The pool's ranges still list .1 (gateway), .2 (now excluded) and .9 (no longer in ips).
        let subnet = subnet(&["10.0.0.1-10.0.0.5"], &["10.0.0.2"]);
        let mut pool = PoolState::new("s", 0, set(&["10.0.0.1-10.0.0.3", "10.0.0.9"]));
        let handed_out: Vec<IpAddr> = (0..3)
            .filter_map(|n| pool.allocate(&subnet, holder(&n.to_string()), "n").ok())
            .collect();
        assert_eq!(handed_out, [ip("10.0.0.3")]);
    }

    #[test]
    fn released_address_outside_the_subnet_is_never_reused() {
        let before = subnet(&["10.0.0.10-10.0.0.11"], &[]);
        let mut pool = PoolState::new("s", 0, before.effective().clone());
        pool.allocate_static(&before, holder("a"), ip("10.0.0.10"))
            .expect("free");
        let after = subnet(&["10.0.0.10-10.0.0.11"], &["10.0.0.10"]);
        assert_eq!(
            pool.counts(&after),
            PoolCounts {
                allocated: 1,
                free: 1,
                outside_subnet: 1
            }
        );
        pool.release(&holder("a"));
        let reused: Vec<IpAddr> = (0..3)
            .filter_map(|n| pool.allocate(&after, holder(&n.to_string()), "n").ok())
            .collect();
        assert_eq!(reused, [ip("10.0.0.11")]);
    }

    #[test]
    fn static_requests_are_checked() {
        let subnet = subnet(&["10.0.0.10-10.0.0.19"], &["10.0.0.15"]);
        let mut pools = vec![
            PoolState::new("s", 0, set(&["10.0.0.10-10.0.0.14"])),
            PoolState::new("s", 1, set(&["10.0.0.16-10.0.0.18"])),
        ];
        let a = holder("a");
        assert_eq!(
            find_static_pool(&pools, &subnet, &a, ip("10.0.0.17")),
            Ok(1)
        );
        pools[1]
            .allocate_static(&subnet, a.clone(), ip("10.0.0.17"))
            .expect("free");
        assert_eq!(
            find_static_pool(&pools, &subnet, &a, ip("10.0.0.17")),
            Ok(1),
            "same holder"
        );

        let message = |address: &str, who: &AllocationHolder| {
            find_static_pool(&pools, &subnet, who, ip(address))
                .expect_err(address)
                .to_string()
        };
        assert_eq!(
            message("10.0.0.17", &holder("b")),
            "static address 10.0.0.17 is already allocated in IPPool s-1 to StatefulSet default/a (eth0): choose another address, or release it first"
        );
        assert_eq!(
            message("10.0.0.15", &holder("b")),
            "static address 10.0.0.15 cannot be allocated in subnet 10.0.0.0/24: it is listed in excludeIPs; choose an address the Subnet offers"
        );
        assert_eq!(
            message("10.0.0.1", &holder("b")),
            "static address 10.0.0.1 cannot be allocated in subnet 10.0.0.0/24: it is the gateway; choose an address the Subnet offers"
        );
        assert!(message("10.0.1.1", &holder("b")).contains("it is outside the subnet"));
        assert!(message("10.0.0.30", &holder("b")).contains("it is not listed in ips"));
        assert_eq!(
            message("10.0.0.19", &holder("b")),
            "static address 10.0.0.19 is in no IPPool of subnet 10.0.0.0/24 yet: wait for the controller to split the Subnet, then retry"
        );
        assert_eq!(
            message("10.0.0.11", &a),
            "StatefulSet default/a (eth0) already holds 10.0.0.17 in IPPool s-1: release it before asking for 10.0.0.11"
        );
        pools[0].draining = true;
        assert!(matches!(
            find_static_pool(&pools, &subnet, &holder("b"), ip("10.0.0.11")),
            Err(IpamError::PoolDraining { .. })
        ));
    }

    #[test]
    fn allocate_in_pools_reuses_then_spreads() {
        let subnet = subnet(&["10.0.0.10-10.0.0.21"], &[]);
        let mut pools = Vec::new();
        split_into(&mut pools, &subnet, 3);
        let (position, address) =
            allocate_in_pools(&mut pools, &subnet, holder("a"), "node-1", &[]).expect("free");
        assert_eq!(
            allocate_in_pools(&mut pools, &subnet, holder("a"), "node-2", &[]),
            Ok((position, address)),
            "the held address is returned from any node"
        );
        for n in 0..11 {
            allocate_in_pools(&mut pools, &subnet, holder(&n.to_string()), "node-1", &[])
                .expect("free");
        }
        assert_eq!(
            allocate_in_pools(&mut pools, &subnet, holder("late"), "node-1", &[])
                .expect_err("all 12 used")
                .to_string(),
            "no IPPool of subnet 10.0.0.0/24 has a free address: add addresses to the Subnet's ips, or release some"
        );
    }

    #[test]
    fn ipv6_pools_allocate_and_check_static_requests() {
        let subnet = SubnetAddresses::parse(
            "fd00::/64".parse().expect("cidr"),
            Some(ip("fd00::1")),
            &["fd00::1-fd00::40"],
            &["fd00::20"],
        )
        .expect("valid subnet");
        assert_eq!(subnet.effective().len(), 62);
        let mut pools = Vec::new();
        split_into(&mut pools, &subnet, 2);
        let mut handed_out = Vec::new();
        for n in 0..62 {
            let (_, address) =
                allocate_in_pools(&mut pools, &subnet, holder(&n.to_string()), "node-6", &[])
                    .expect("62 addresses for 62 holders");
            assert!(subnet.effective().contains(address), "{address}");
            handed_out.push(address);
        }
        handed_out.sort();
        handed_out.dedup();
        assert_eq!(handed_out.len(), 62);
        assert!(matches!(
            allocate_in_pools(&mut pools, &subnet, holder("late"), "node-6", &[]),
            Err(IpamError::SubnetExhausted { .. })
        ));
        assert!(matches!(
            find_static_pool(&pools, &subnet, &holder("late"), ip("fd00::20")),
            Err(IpamError::StaticAddressNotAllocatable {
                reason: NotAllocatable::Excluded,
                ..
            })
        ));
    }

    #[test]
    fn apply_split_scales_down_by_draining() {
        let subnet = subnet(&["10.0.0.10-10.0.0.21"], &[]);
        let mut pools = Vec::new();
        split_into(&mut pools, &subnet, 3);
        let in_last_pool = pools[2].ranges.nth(0).expect("address");
        pools[2]
            .allocate_static(&subnet, holder("a"), in_last_pool)
            .expect("free");
        split_into(&mut pools, &subnet, 1);
        assert_eq!(pools.len(), 2, "pool 1 deleted, pool 2 draining");
        assert!(pools[1].draining && pools[1].index == 2);
        assert_eq!(pools[1].ranges, IpSet::from_iter([in_last_pool]));
        assert_eq!(pools[0].counts(&subnet).free, 11);
        pools[1].release(&holder("a"));
        split_into(&mut pools, &subnet, 1);
        assert_eq!(pools.len(), 1);
        assert_eq!(pools[0].counts(&subnet).free, 12);
        split_into(&mut pools, &subnet, 2);
        assert_eq!(
            pools
                .iter()
                .map(|p| p.counts(&subnet).free)
                .collect::<Vec<_>>(),
            [6, 6]
        );
    }

    #[test]
    fn apply_split_refuses_a_stale_plan_before_any_pool_gains() {
        let subnet = subnet(&["10.0.0.10-10.0.0.21"], &[]);
        let mut pools = Vec::new();
        split_into(&mut pools, &subnet, 2);
        let current: Vec<CurrentPool> = pools.iter().map(PoolState::current).collect();
        let plans = split_subnet(&SplitRequest {
            subnet: "s",
            effective: subnet.effective(),
            replicas: 3,
            pools: &current,
        })
        .expect("split");
        // An agent allocates in pool 1 after the split was computed.
        pools[1]
            .allocate(&subnet, holder("racer"), "n")
            .expect("free");
        let error = apply_split(&mut pools, "s", &plans).expect_err("stale");
        assert_eq!(
            error.to_string(),
            "IPPool s-1 changed after the split was computed: recompute the split and apply it again"
        );
        assert_eq!(pools.len(), 2, "no pool was created");
        let all_ranges: u128 = pools.iter().map(|p| p.ranges.len()).sum();
        assert!(all_ranges <= 12);
        let racer_address = pools[1].address_of(&holder("racer")).expect("kept");
        assert!(pools[1].ranges.contains(racer_address));
        split_into(&mut pools, &subnet, 3);
        assert_eq!(pools.iter().map(|p| p.ranges.len()).sum::<u128>(), 12);
    }
}
