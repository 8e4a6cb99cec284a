//! Splitting a Subnet's effective set into `replicas` IPPools, safely and with little churn.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use super::error::IpamError;
use super::range::IpRange;
use super::set::IpSet;

/// The most pools one Subnet may be split into.
pub const MAX_REPLICAS: u32 = 1024;

/// The most addresses one pool is given when the Subnet's size decides the pool count: a
/// full pool's allocation records (about 375 bytes each with their managed fields) then stay
/// near 750 KiB, half of etcd's default 1.5 MiB object limit.
pub const MAX_POOL_ADDRESSES: u128 = 2048;

/// The most pools a Subnet's size alone asks for; past it (huge IPv6 ranges) the pools get
/// more addresses each, which only matters once that many are allocated.
pub const MAX_DERIVED_POOLS: u32 = 64;

/// How many pools a Subnet of `addresses` allocatable addresses is split into: its `replicas`,
/// or more when that would put over [`MAX_POOL_ADDRESSES`] into one pool (at most
/// [`MAX_DERIVED_POOLS`] from size alone), so a /16 simply works.
pub fn pool_count(replicas: u32, addresses: u128) -> u32 {
    let by_size = addresses.div_ceil(MAX_POOL_ADDRESSES);
    let by_size = u32::try_from(by_size)
        .unwrap_or(u32::MAX)
        .min(MAX_DERIVED_POOLS);
    replicas.max(by_size).min(MAX_REPLICAS)
}

/// The name of pool `index` of `subnet`: `<subnet>-<index>`.
pub fn pool_name(subnet: &str, index: u32) -> String {
    format!("{subnet}-{index}")
}

/// Splits a pool name into `(subnet, index)`; the inverse of [`pool_name`].
///
/// Subnet names may contain `-`, so the index is whatever follows the last one. Indices are
/// written without leading zeros, so `s-01` is not a pool name.
pub fn parse_pool_name(name: &str) -> Option<(&str, u32)> {
    let (subnet, index_text) = name.rsplit_once('-')?;
    let index: u32 = index_text.parse().ok()?;
    (!subnet.is_empty() && index.to_string() == index_text).then_some((subnet, index))
}

/// A pool as it exists now: the input to [`split_subnet`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurrentPool {
    /// The pool's index within its Subnet.
    pub index: u32,
    /// The addresses currently assigned to the pool (its spec ranges).
    pub ranges: IpSet,
    /// The pool's allocated addresses; these are pinned to it.
    pub allocated: IpSet,
}

/// What one pool should look like: the output of [`split_subnet`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolPlan {
    /// The pool's index within its Subnet.
    pub index: u32,
    /// `<subnet>-<index>`.
    pub name: String,
    /// The addresses the pool should own: its allocated addresses plus its share of free ones.
    pub ranges: IpSet,
    /// The allocated addresses the plan was computed from (copied from the input).
    pub allocated: IpSet,
    /// Allocated addresses the Subnet no longer offers; they stay pinned until released.
    pub outside_subnet: IpSet,
    /// The pool is beyond `replicas`: it gets no free addresses and hands nothing out.
    pub draining: bool,
    /// The pool is draining and holds no allocation, so it may be deleted.
    pub deletable: bool,
}

impl PoolPlan {
    /// The free addresses the pool may hand out.
    pub fn free(&self) -> IpSet {
        self.ranges.subtract(&self.allocated)
    }
}

/// The input to [`split_subnet`].
#[derive(Clone, Copy, Debug)]
pub struct SplitRequest<'a> {
    /// The Subnet's name, used to name the pools.
    pub subnet: &'a str,
    /// The Subnet's effective set ([`super::SubnetAddresses::effective`]).
    pub effective: &'a IpSet,
    /// How many active pools to have, `1..=1024`.
    pub replicas: u32,
    /// The pools that exist now, in any order.
    pub pools: &'a [CurrentPool],
}

/// Computes the pools of a Subnet: one plan per index `0..replicas`, plus one per existing pool
/// at or beyond `replicas` (draining), sorted by index.
///
/// Pool sizes (allocated + free) differ by at most one, except where a pool's allocations alone
/// exceed its fair share; such a pool keeps exactly its allocations and gets no free address.
/// A pool keeps the free addresses it already has whenever its share allows, and new addresses
/// are handed out lowest-first in contiguous blocks, so a fresh split yields contiguous pools.
/// Costs O(pools × ranges); it never enumerates addresses.
///
/// Rules (each one fixes a bug of the Go prototype):
///
/// * An allocated address never leaves the pool that holds it, even when the Subnet no longer
///   lists it. Such an address is reported as "outside the subnet" and, once released, is never
///   handed out again (pickers only hand out addresses of the effective set).
/// * Scaling down never deletes a pool with allocations: pools with `index >= replicas` are
///   *draining*; they keep only their allocated addresses and become *deletable* when empty.
/// * An address is never in two pools; only free addresses move between pools.
/// * The result depends only on the input (deterministic), and splitting the output again gives
///   the same output (idempotent), so the controller can reconcile as often as it likes.
///
/// Applying a split must respect optimistic concurrency: write every pool that *loses* addresses
/// before any pool that *gains* them, each write conditional on the pool version the split was
/// computed from, and recompute on any conflict. Otherwise an agent could allocate a moving
/// address from its old pool while the new pool already offers it. [`super::apply_split`] models
/// this for the in-memory [`super::PoolState`].
pub fn split_subnet(request: &SplitRequest<'_>) -> Result<Vec<PoolPlan>, IpamError> {
    if !(1..=MAX_REPLICAS).contains(&request.replicas) {
        return Err(IpamError::InvalidReplicas {
            subnet: request.subnet.to_string(),
            replicas: request.replicas,
        });
    }
    let current = index_pools(request)?;
    check_no_address_allocated_twice(request.subnet, &current)?;
    let pinned: IpSet = current.values().map(|pool| &pool.allocated).collect();

    let active: Vec<u32> = (0..request.replicas).collect();
    let allocated_of = |index: u32| current.get(&index).map(|pool| &pool.allocated);
    let mut unassigned = request.effective.subtract(&pinned);
    let holdings: Vec<Holding> = active
        .iter()
        .map(|index| {
            current
                .get(index)
                .map_or(Holding::default(), |pool| Holding {
                    allocated: pool.allocated.len(),
                    current_total: pool.allocated.len() + pool.ranges.intersect(&unassigned).len(),
                })
        })
        .collect();
    let free_targets = balanced_free_counts(unassigned.len(), &holdings);

    // First every active pool keeps what it can of its current free addresses (lowest index
    // first, so an address two pools both claim goes to one of them only) ...
    let mut free_of: Vec<IpSet> = Vec::with_capacity(active.len());
    for (index, target) in active.iter().zip(&free_targets) {
        let still_free = current
            .get(index)
            .map(|pool| pool.ranges.intersect(&unassigned))
            .unwrap_or_default();
        let (kept, _given_back) = still_free.split_first(*target);
        unassigned = unassigned.subtract(&kept);
        free_of.push(kept);
    }
    // ... then pools below their share are topped up from what is left, lowest addresses first.
    for (free, target) in free_of.iter_mut().zip(&free_targets) {
        let (taken, rest) = unassigned.split_first(target - free.len());
        *free = free.union(&taken);
        unassigned = rest;
    }
    debug_assert!(unassigned.is_empty(), "every free address is assigned");

    let plan = |index: u32, free: IpSet| {
        let allocated = allocated_of(index).cloned().unwrap_or_default();
        let draining = index >= request.replicas;
        PoolPlan {
            index,
            name: pool_name(request.subnet, index),
            ranges: allocated.union(&free),
            outside_subnet: allocated.subtract(request.effective),
            draining,
            deletable: draining && allocated.is_empty(),
            allocated,
        }
    };
    let draining = current
        .keys()
        .filter(|index| **index >= request.replicas)
        .map(|index| plan(*index, IpSet::new()));
    Ok(active
        .iter()
        .zip(free_of)
        .map(|(index, free)| plan(*index, free))
        .chain(draining)
        .collect())
}

/// Indexes the current pools, rejecting two pools with one index.
fn index_pools<'a>(
    request: &SplitRequest<'a>,
) -> Result<BTreeMap<u32, &'a CurrentPool>, IpamError> {
    let mut by_index = BTreeMap::new();
    for pool in request.pools {
        if by_index.insert(pool.index, pool).is_some() {
            return Err(IpamError::DuplicatePoolIndex {
                pool: pool_name(request.subnet, pool.index),
            });
        }
    }
    Ok(by_index)
}

/// An address allocated in two pools is a double allocation that already happened; no split can
/// repair it, so refuse loudly instead of silently picking a winner.
fn check_no_address_allocated_twice(
    subnet: &str,
    current: &BTreeMap<u32, &CurrentPool>,
) -> Result<(), IpamError> {
    let mut spans: Vec<(IpRange, u32)> = current
        .values()
        .flat_map(|pool| {
            pool.allocated
                .ranges()
                .iter()
                .map(|range| (*range, pool.index))
        })
        .collect();
    spans.sort_unstable();
    // Ranges within one pool are disjoint, and as long as no overlap has been seen the sorted
    // spans are disjoint too, so an overlap always shows up between neighbours.
    match spans
        .windows(2)
        .find(|pair| !pair[0].0.ends_before(&pair[1].0))
    {
        Some([(_, first), (shared, second)]) => Err(IpamError::AddressAllocatedInTwoPools {
            address: shared.start(),
            first: pool_name(subnet, *first.min(second)),
            second: pool_name(subnet, *first.max(second)),
        }),
        _ => Ok(()),
    }
}

/// One active pool as the balancing sees it.
#[derive(Clone, Copy, Debug, Default)]
struct Holding {
    /// Allocated addresses; they cannot move.
    allocated: u128,
    /// What the pool holds now and could keep: its allocations plus its still-free addresses.
    current_total: u128,
}

/// How many free addresses each active pool should get, given `free_total` free addresses.
///
/// This is water-filling: pool totals (allocated + free) are made as equal as possible. A pool
/// whose allocations exceed the level keeps exactly its allocations; the others share the rest,
/// so totals among them differ by at most one. The remainder goes to the pools already holding
/// the most (ties to the lowest index), so a rebalance moves as little as possible, a re-split
/// of the output reproduces it, and a fresh split fills pools in index order.
fn balanced_free_counts(free_total: u128, pools: &[Holding]) -> Vec<u128> {
    let mut remaining = pools
        .iter()
        .fold(free_total, |sum, pool| sum.saturating_add(pool.allocated));
    let mut open: Vec<usize> = (0..pools.len()).collect();
    let mut totals: Vec<u128> = pools.iter().map(|pool| pool.allocated).collect();
    while !open.is_empty() {
        let level = remaining / open.len() as u128;
        let (over, mut under): (Vec<usize>, Vec<usize>) = open
            .iter()
            .partition(|pool| pools[**pool].allocated > level);
        if over.is_empty() {
            let extra = remaining % open.len() as u128;
            under.sort_by_key(|pool| (Reverse(pools[*pool].current_total), *pool));
            for (rank, pool) in under.iter().enumerate() {
                totals[*pool] = level + u128::from((rank as u128) < extra);
            }
            break;
        }
        // Over-full pools keep their allocations only; re-level the others without them.
        remaining -= over.iter().map(|pool| pools[*pool].allocated).sum::<u128>();
        open = under;
    }
    totals
        .iter()
        .zip(pools)
        .map(|(total, pool)| total - pool.allocated)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn large_subnets_get_enough_pools_to_stay_under_the_object_limit() {
        assert_eq!(pool_count(3, 156), 3, "small Subnets keep their replicas");
        assert_eq!(pool_count(1, 2048), 1);
        assert_eq!(pool_count(1, 2049), 2);
        assert_eq!(pool_count(1, 65_534), 32, "a /16");
        assert_eq!(
            pool_count(40, 65_534),
            40,
            "more replicas than the size asks for"
        );
        assert_eq!(pool_count(1, 1 << 64), MAX_DERIVED_POOLS, "a /64");
        assert_eq!(pool_count(MAX_REPLICAS, 1 << 64), MAX_REPLICAS);
    }
    use crate::ipam::SubnetAddresses;
    use crate::ipam::set::tests::set;

    fn example_effective() -> IpSet {
        SubnetAddresses::parse(
            "10.6.0.0/16".parse().expect("cidr"),
            Some("10.6.0.1".parse().expect("gateway")),
            &["10.6.153.100-10.6.153.255"],
            &[],
        )
        .expect("example subnet")
        .effective()
        .clone()
    }

    fn split(effective: &IpSet, replicas: u32, pools: &[CurrentPool]) -> Vec<PoolPlan> {
        split_subnet(&SplitRequest {
            subnet: "subnet",
            effective,
            replicas,
            pools,
        })
        .expect("valid split")
    }

    fn as_current(plans: &[PoolPlan]) -> Vec<CurrentPool> {
        plans
            .iter()
            .map(|plan| CurrentPool {
                index: plan.index,
                ranges: plan.ranges.clone(),
                allocated: plan.allocated.clone(),
            })
            .collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    #[test]
    fn example_subnet_splits_into_three_contiguous_pools_of_52() {
        let effective = example_effective();
        let plans = split(&effective, 3, &[]);
        let summary: Vec<(String, Vec<String>, u128)> = plans
            .iter()
            .map(|plan| {
                (
                    plan.name.clone(),
                    plan.ranges.to_range_strings(),
                    plan.free().len(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "subnet-0".to_string(),
                    vec!["10.6.153.100-10.6.153.151".to_string()],
                    52
                ),
                (
                    "subnet-1".to_string(),
                    vec!["10.6.153.152-10.6.153.203".to_string()],
                    52
                ),
                (
                    "subnet-2".to_string(),
                    vec!["10.6.153.204-10.6.153.255".to_string()],
                    52
                ),
            ]
        );
        assert!(plans.iter().all(|plan| !plan.draining && !plan.deletable));
        assert_eq!(
            split(&effective, 3, &as_current(&plans)),
            plans,
            "idempotent"
        );
    }

    #[test]
    fn uneven_totals_differ_by_at_most_one() {
        let effective = set(&["10.0.0.1-10.0.0.10"]);
        let sizes: Vec<u128> = split(&effective, 3, &[])
            .iter()
            .map(|p| p.ranges.len())
            .collect();
        assert_eq!(sizes, [4, 3, 3]);
        let sizes: Vec<u128> = split(&effective, 4, &[])
            .iter()
            .map(|p| p.ranges.len())
            .collect();
        assert_eq!(sizes, [3, 3, 2, 2]);
    }

    #[test]
    fn more_pools_than_addresses_leaves_some_empty() {
        let effective = set(&["10.0.0.1-10.0.0.2"]);
        let sizes: Vec<u128> = split(&effective, 4, &[])
            .iter()
            .map(|p| p.ranges.len())
            .collect();
        assert_eq!(sizes, [1, 1, 0, 0]);
        let nothing = split(&IpSet::new(), 2, &[]);
        assert!(nothing.iter().all(|plan| plan.ranges.is_empty()));
    }

    #[test]
    fn scale_up_moves_only_free_addresses_and_keeps_allocations() {
        let effective = set(&["10.0.0.1-10.0.0.12"]);
        let mut current = as_current(&split(&effective, 2, &[]));
        // Pool 0 holds .1-.6; allocate .2 and .6 there.
        current[0].allocated = set(&["10.0.0.2", "10.0.0.6"]);
        let plans = split(&effective, 3, &current);
        assert!(plans[0].ranges.contains(ip("10.0.0.2")));
        assert!(plans[0].ranges.contains(ip("10.0.0.6")));
        let sizes: Vec<u128> = plans.iter().map(|p| p.ranges.len()).collect();
        assert_eq!(sizes, [4, 4, 4]);
        // Pools keep the lowest of their current free addresses and give back the rest.
        assert_eq!(
            plans[0].ranges.to_range_strings(),
            ["10.0.0.1-10.0.0.3", "10.0.0.6"]
        );
        assert_eq!(plans[1].ranges.to_range_strings(), ["10.0.0.7-10.0.0.10"]);
        assert_eq!(
            plans[2].ranges.to_range_strings(),
            ["10.0.0.4-10.0.0.5", "10.0.0.11-10.0.0.12"]
        );
        assert_eq!(
            split(&effective, 3, &as_current(&plans)),
            plans,
            "idempotent"
        );
    }

    #[test]
    fn scale_down_drains_pools_with_allocations() {
        let effective = set(&["10.0.0.1-10.0.0.9"]);
        let mut current = as_current(&split(&effective, 3, &[]));
        current[2].allocated = set(&["10.0.0.8"]);
        let plans = split(&effective, 1, &current);
        assert_eq!(plans.len(), 3);
        assert_eq!(
            plans[0].ranges.to_range_strings(),
            ["10.0.0.1-10.0.0.7", "10.0.0.9"]
        );
        assert!(plans[1].draining && plans[1].deletable && plans[1].ranges.is_empty());
        assert!(plans[2].draining && !plans[2].deletable);
        assert_eq!(plans[2].ranges.to_range_strings(), ["10.0.0.8"]);
        assert!(plans[2].free().is_empty());

        // Once the last allocation is released, the draining pool becomes deletable.
        let mut released = as_current(&plans);
        released[2].allocated = IpSet::new();
        let plans = split(&effective, 1, &released);
        assert!(plans[2].deletable && plans[2].ranges.is_empty());
        assert_eq!(plans[0].ranges.len(), 9);
    }

    #[test]
    fn removed_and_excluded_allocations_stay_pinned_and_reported() {
        let effective = set(&["10.0.0.1-10.0.0.8"]);
        let mut current = as_current(&split(&effective, 2, &[]));
        current[1].allocated = set(&["10.0.0.7"]);
        let shrunk = set(&["10.0.0.1-10.0.0.4"]);
        let plans = split(&shrunk, 2, &current);
        assert_eq!(plans[1].outside_subnet.to_range_strings(), ["10.0.0.7"]);
        assert!(plans[1].ranges.contains(ip("10.0.0.7")));
        assert!(
            !plans[0].ranges.contains(ip("10.0.0.5")),
            "removed free address dropped"
        );
        // Pool totals are 5 = 4 free + 1 pinned, balanced as 3 / 2 with the pin counted.
        assert_eq!(plans[0].ranges.len() + plans[1].ranges.len(), 5);
        assert_eq!(plans[1].free().len() + 1, plans[1].ranges.len());
    }

    #[test]
    fn pinned_addresses_beyond_the_fair_share_are_kept() {
        let effective = set(&["10.0.0.1-10.0.0.10"]);
        let mut current = as_current(&split(&effective, 1, &[]));
        current[0].allocated = set(&["10.0.0.1-10.0.0.8"]);
        let plans = split(&effective, 2, &current);
        assert_eq!(plans[0].ranges.len(), 8);
        assert!(plans[0].free().is_empty());
        assert_eq!(plans[1].ranges.to_range_strings(), ["10.0.0.9-10.0.0.10"]);
    }

    #[test]
    fn overlapping_current_ranges_are_resolved_to_one_pool() {
        let effective = set(&["10.0.0.1-10.0.0.4"]);
        let current = vec![
            CurrentPool {
                index: 0,
                ranges: set(&["10.0.0.1-10.0.0.3"]),
                allocated: IpSet::new(),
            },
            CurrentPool {
                index: 1,
                ranges: set(&["10.0.0.2-10.0.0.4"]),
                allocated: set(&["10.0.0.3"]),
            },
        ];
        let plans = split(&effective, 2, &current);
        assert_eq!(plans[0].ranges.to_range_strings(), ["10.0.0.1-10.0.0.2"]);
        assert_eq!(plans[1].ranges.to_range_strings(), ["10.0.0.3-10.0.0.4"]);
    }

    #[test]
    fn rejects_bad_requests() {
        let effective = set(&["10.0.0.1-10.0.0.4"]);
        for replicas in [0, MAX_REPLICAS + 1] {
            let error = split_subnet(&SplitRequest {
                subnet: "s",
                effective: &effective,
                replicas,
                pools: &[],
            })
            .expect_err("bad replicas");
            assert!(error.to_string().contains("between 1 and 1024"), "{error}");
        }
        let twice = vec![
            CurrentPool {
                index: 0,
                ranges: set(&["10.0.0.1"]),
                allocated: set(&["10.0.0.1"]),
            },
            CurrentPool {
                index: 1,
                ranges: set(&["10.0.0.1"]),
                allocated: set(&["10.0.0.1"]),
            },
        ];
        let error = split_subnet(&SplitRequest {
            subnet: "s",
            effective: &effective,
            replicas: 2,
            pools: &twice,
        })
        .expect_err("double allocation");
        assert_eq!(
            error,
            IpamError::AddressAllocatedInTwoPools {
                address: ip("10.0.0.1"),
                first: "s-0".into(),
                second: "s-1".into(),
            }
        );
        let duplicate_index = vec![twice[0].clone(), twice[0].clone()];
        let error = split_subnet(&SplitRequest {
            subnet: "s",
            effective: &effective,
            replicas: 2,
            pools: &duplicate_index,
        })
        .expect_err("duplicate index");
        assert!(
            matches!(error, IpamError::DuplicatePoolIndex { .. }),
            "{error}"
        );
    }

    #[test]
    fn ipv6_split() {
        let effective = set(&["fd00::2-fd00::ff"]);
        let plans = split(&effective, 3, &[]);
        let ranges: Vec<Vec<String>> = plans.iter().map(|p| p.ranges.to_range_strings()).collect();
        assert_eq!(
            ranges,
            [
                ["fd00::2-fd00::56"],
                ["fd00::57-fd00::ab"],
                ["fd00::ac-fd00::ff"]
            ]
        );
        let huge = set(&["fd00::-fd00::ffff:ffff:ffff:ffff"]);
        let plans = split(&huge, 1024, &[]);
        assert_eq!(plans.iter().map(|p| p.ranges.len()).sum::<u128>(), 1 << 64);
    }

    #[test]
    fn huge_subnet_split_does_not_enumerate_addresses() {
        let subnet = SubnetAddresses::parse(
            "10.0.0.0/16".parse().expect("cidr"),
            None,
            &[],
            &["10.0.7.0-10.0.7.255"],
        )
        .expect("valid");
        assert_eq!(subnet.effective().len(), 65_533 - 256);
        let started = Instant::now();
        let plans = split(subnet.effective(), MAX_REPLICAS, &[]);
        let again = split(subnet.effective(), 7, &as_current(&plans));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(again.len(), 1024);
        assert_eq!(again.iter().filter(|p| p.deletable).count(), 1024 - 7);
        assert_eq!(
            again.iter().map(|p| p.ranges.len()).sum::<u128>(),
            subnet.effective().len()
        );
    }

    #[test]
    fn pool_names_round_trip() {
        assert_eq!(pool_name("subnet", 2), "subnet-2");
        assert_eq!(parse_pool_name("subnet-2"), Some(("subnet", 2)));
        assert_eq!(parse_pool_name("my-subnet-10"), Some(("my-subnet", 10)));
        assert_eq!(parse_pool_name("subnet-02"), None);
        assert_eq!(parse_pool_name("subnet-x"), None);
        assert_eq!(parse_pool_name("subnet"), None);
        assert_eq!(parse_pool_name("-1"), None);
    }

    #[test]
    fn water_filling() {
        let fresh = |allocated: &[u128]| -> Vec<Holding> {
            allocated
                .iter()
                .map(|allocated| Holding {
                    allocated: *allocated,
                    current_total: *allocated,
                })
                .collect()
        };
        assert_eq!(balanced_free_counts(10, &fresh(&[0, 0, 0])), [4, 3, 3]);
        assert_eq!(balanced_free_counts(10, &fresh(&[8, 0, 0])), [0, 5, 5]);
        assert_eq!(balanced_free_counts(3, &fresh(&[5, 4, 0])), [0, 0, 3]);
        assert_eq!(balanced_free_counts(4, &fresh(&[1, 0])), [2, 2]);
        assert_eq!(balanced_free_counts(0, &fresh(&[])), Vec::<u128>::new());
        // The remainder stays with the pool that already holds more.
        let holding = [
            Holding {
                allocated: 0,
                current_total: 1,
            },
            Holding {
                allocated: 1,
                current_total: 2,
            },
        ];
        assert_eq!(balanced_free_counts(2, &holding), [1, 1]);
    }
}
