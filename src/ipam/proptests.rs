//! Property tests: random sequences of allocations, releases, re-splits and Subnet changes
//! never break the safety rules.
//!
//! The subnets are small (an IPv4 /26 and an IPv6 /122, 64 addresses each) so 10 000 cases of up
//! to 30 operations run in seconds while still exhausting pools, excluding allocated addresses,
//! moving the gateway onto allocations and scaling pools up and down.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use proptest::prelude::*;

use super::*;

const UNIVERSE: u8 = 64;
const HOLDERS: u8 = 20;

/// One step of the simulation.
#[derive(Clone, Debug)]
enum Op {
    Allocate {
        holder: u8,
        node: u8,
    },
    AllocateStatic {
        holder: u8,
        offset: u8,
    },
    Release {
        holder: u8,
    },
    Resplit,
    Change {
        change: SubnetChange,
        split_now: bool,
    },
}

/// A change to the Subnet spec. Without `split_now` the controller lags behind: the agent already
/// sees the new spec while the pools still have the old split.
#[derive(Clone, Debug)]
enum SubnetChange {
    Replicas(u32),
    AddRange { start: u8, len: u8 },
    RemoveRange(usize),
    AddExclude { start: u8, len: u8 },
    RemoveExclude(usize),
    Gateway(Option<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    let holder = 0..HOLDERS;
    let offset = 0..UNIVERSE;
    let change = prop_oneof![
        (1u32..=6).prop_map(SubnetChange::Replicas),
        (0..UNIVERSE, 1u8..16).prop_map(|(start, len)| SubnetChange::AddRange { start, len }),
        any::<usize>().prop_map(SubnetChange::RemoveRange),
        (0..UNIVERSE, 1u8..8).prop_map(|(start, len)| SubnetChange::AddExclude { start, len }),
        any::<usize>().prop_map(SubnetChange::RemoveExclude),
        proptest::option::of(0..UNIVERSE).prop_map(SubnetChange::Gateway),
    ];
    prop_oneof![
        6 => (holder.clone(), 0u8..4).prop_map(|(holder, node)| Op::Allocate { holder, node }),
        2 => (holder.clone(), offset).prop_map(|(holder, offset)| Op::AllocateStatic { holder, offset }),
        3 => holder.prop_map(|holder| Op::Release { holder }),
        1 => Just(Op::Resplit),
        3 => (change, any::<bool>()).prop_map(|(change, split_now)| Op::Change { change, split_now }),
    ]
}

/// A starting Subnet: some `ips` ranges (possibly overlapping, possibly none = whole CIDR),
/// some excludes, as (start offset, length) pairs, and a replica count.
#[derive(Clone, Debug)]
struct InitialSpec {
    ips: Vec<(u8, u8)>,
    excludes: Vec<(u8, u8)>,
    replicas: u32,
}

fn initial() -> impl Strategy<Value = InitialSpec> {
    (
        proptest::collection::vec((0..UNIVERSE, 1u8..40), 0..3),
        proptest::collection::vec((0..UNIVERSE, 1u8..6), 0..2),
        1u32..=4,
    )
        .prop_map(|(ips, excludes, replicas)| InitialSpec {
            ips,
            excludes,
            replicas,
        })
}

struct Simulation {
    cidr: IpNet,
    ips: Vec<String>,
    excludes: Vec<String>,
    gateway: Option<IpAddr>,
    replicas: u32,
    subnet: SubnetAddresses,
    pools: Vec<PoolState>,
    /// What the simulation believes each holder holds; the pools must agree exactly.
    held: BTreeMap<AllocationHolder, IpAddr>,
    /// Whether the pools reflect the current spec and allocations well enough for the counts to
    /// add up: true after a split, and kept by allocations and ordinary releases. A spec change
    /// the controller has not split yet, or a release the controller must react to (in a
    /// draining pool, or of an address the Subnet no longer offers), clears it.
    counts_are_current: bool,
}

const SUBNET: &str = "s";

impl Simulation {
    fn new(cidr: &str, initial: &InitialSpec) -> Self {
        let cidr: IpNet = cidr.parse().expect("test cidr");
        let mut simulation = Self {
            cidr,
            ips: Vec::new(),
            excludes: Vec::new(),
            gateway: None,
            replicas: initial.replicas,
            subnet: SubnetAddresses::parse(cidr, None, &[] as &[&str], &[]).expect("empty spec"),
            pools: Vec::new(),
            held: BTreeMap::new(),
            counts_are_current: false,
        };
        let ranges = |spans: &[(u8, u8)]| -> Vec<String> {
            spans
                .iter()
                .map(|(start, len)| simulation.range(*start, *len))
                .collect()
        };
        let (ips, excludes) = (ranges(&initial.ips), ranges(&initial.excludes));
        simulation.ips = ips;
        simulation.excludes = excludes;
        simulation.reparse();
        simulation.split();
        simulation
    }

    fn address(&self, offset: u8) -> IpAddr {
        IpSet::from(self.cidr)
            .nth(u128::from(offset % UNIVERSE))
            .expect("offset inside the cidr")
    }

    /// `start..start+len` clipped to the CIDR, as a spec item.
    fn range(&self, start: u8, len: u8) -> String {
        let end = start.saturating_add(len - 1).min(UNIVERSE - 1);
        IpRange::new(self.address(start), self.address(end))
            .expect("ordered")
            .to_string()
    }

    fn holder(number: u8) -> AllocationHolder {
        // Mix sticky and per-pod keys, and two interfaces, among the holders.
        let key = if number.is_multiple_of(3) {
            AllocationKey::StatefulSetPod {
                namespace: "ns".into(),
                name: format!("sts-{number}"),
            }
        } else {
            AllocationKey::Pod {
                namespace: "ns".into(),
                name: format!("pod-{number}"),
                uid: format!("uid-{number}"),
            }
        };
        let interface = if number.is_multiple_of(2) {
            "eth0"
        } else {
            "net1"
        };
        AllocationHolder {
            key,
            interface: interface.into(),
        }
    }

    fn reparse(&mut self) {
        self.subnet = SubnetAddresses::parse(self.cidr, self.gateway, &self.ips, &self.excludes)
            .expect("generated specs are valid");
    }

    fn plans(&self) -> Vec<PoolPlan> {
        let current: Vec<CurrentPool> = self.pools.iter().map(PoolState::current).collect();
        split_subnet(&SplitRequest {
            subnet: SUBNET,
            effective: self.subnet.effective(),
            replicas: self.replicas,
            pools: &current,
        })
        .expect("split of a consistent state")
    }

    fn split(&mut self) {
        let plans = self.plans();
        apply_split(&mut self.pools, SUBNET, &plans).expect("nothing races the simulation");
        self.counts_are_current = true;
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Allocate { holder, node } => {
                let holder = Self::holder(*holder);
                let before = self.held.get(&holder).copied();
                let free_anywhere: u128 = self
                    .pools
                    .iter()
                    .map(|pool| pool.free(&self.subnet).len())
                    .sum();
                let node = format!("node-{node}");
                match allocate_in_pools(&mut self.pools, &self.subnet, holder.clone(), &node, &[]) {
                    Ok((_, address)) => match before {
                        Some(held) => {
                            prop_assert_eq!(address, held, "a retry returns the held address")
                        }
                        None => {
                            prop_assert!(
                                self.subnet.effective().contains(address),
                                "handed out {} which the Subnet does not offer",
                                address
                            );
                            self.held.insert(holder, address);
                        }
                    },
                    Err(error) => {
                        prop_assert!(before.is_none());
                        prop_assert_eq!(
                            free_anywhere,
                            0,
                            "refused ({}) while addresses were free",
                            error
                        );
                    }
                }
            }
            Op::AllocateStatic { holder, offset } => {
                let holder = Self::holder(*holder);
                let address = self.address(*offset);
                let before = self.held.get(&holder).copied();
                let result = find_static_pool(&self.pools, &self.subnet, &holder, address)
                    .and_then(|position| {
                        self.pools[position].allocate_static(&self.subnet, holder.clone(), address)
                    });
                match (result, before) {
                    (Ok(given), Some(held)) => {
                        prop_assert_eq!(given, held, "a holder gets at most one address")
                    }
                    (Ok(given), None) => {
                        prop_assert!(self.subnet.effective().contains(given));
                        self.held.insert(holder, given);
                    }
                    (Err(_), _) => {}
                }
            }
            Op::Release { holder } => {
                let holder = Self::holder(*holder);
                let released = self.pools.iter_mut().find_map(|pool| {
                    let draining = pool.draining;
                    pool.release(&holder).map(|address| (address, draining))
                });
                prop_assert_eq!(
                    released.map(|(address, _)| address),
                    self.held.remove(&holder)
                );
                // A released address the Subnet no longer offers stays in its pool's ranges,
                // unusable, and an emptied draining pool awaits deletion, until the next split.
                if released.is_some_and(|(address, draining)| {
                    draining || !self.subnet.effective().contains(address)
                }) {
                    self.counts_are_current = false;
                }
            }
            Op::Resplit => self.split(),
            Op::Change { change, split_now } => {
                self.change(change);
                self.reparse();
                self.counts_are_current = false;
                if *split_now {
                    self.split();
                }
            }
        }
        Ok(())
    }

    fn change(&mut self, change: &SubnetChange) {
        match change {
            SubnetChange::Replicas(replicas) => self.replicas = *replicas,
            SubnetChange::AddRange { start, len } => self.ips.push(self.range(*start, *len)),
            SubnetChange::RemoveRange(index) if !self.ips.is_empty() => {
                self.ips.remove(index % self.ips.len());
            }
            SubnetChange::AddExclude { start, len } => self.excludes.push(self.range(*start, *len)),
            SubnetChange::RemoveExclude(index) if !self.excludes.is_empty() => {
                self.excludes.remove(index % self.excludes.len());
            }
            SubnetChange::Gateway(offset) => {
                self.gateway = offset.map(|offset| self.address(offset))
            }
            SubnetChange::RemoveRange(_) | SubnetChange::RemoveExclude(_) => {}
        }
    }

    /// The rules that hold after every step.
    fn check_safety(&self) -> Result<(), TestCaseError> {
        let mut indices: Vec<u32> = self.pools.iter().map(|pool| pool.index).collect();
        indices.sort_unstable();
        indices.dedup();
        prop_assert_eq!(indices.len(), self.pools.len(), "one pool per index");

        let sizes: u128 = self.pools.iter().map(|pool| pool.ranges.len()).sum();
        let union: IpSet = self.pools.iter().map(|pool| &pool.ranges).collect();
        prop_assert_eq!(sizes, union.len(), "an address is in two pools");

        let mut allocations = 0;
        for pool in &self.pools {
            prop_assert!(
                pool.allocated().is_subset(&pool.ranges),
                "allocation outside its pool"
            );
            allocations += pool.allocations.len();
        }
        prop_assert_eq!(
            allocations,
            self.held.len(),
            "allocations appeared or vanished"
        );
        for (holder, address) in &self.held {
            let holding: Vec<&PoolState> = self
                .pools
                .iter()
                .filter(|pool| pool.allocations.get(address) == Some(holder))
                .collect();
            prop_assert_eq!(
                holding.len(),
                1,
                "{} lost or duplicated {}",
                holder,
                address
            );
        }
        Ok(())
    }

    /// The rules that hold whenever the counts are current.
    fn check_counts(&self) -> Result<(), TestCaseError> {
        let effective = self.subnet.effective();
        let counts: Vec<PoolCounts> = self
            .pools
            .iter()
            .map(|pool| pool.counts(&self.subnet))
            .collect();
        let outside: u128 = counts.iter().map(|count| count.outside_subnet).sum();
        let total: u128 = counts.iter().map(PoolCounts::total).sum();
        prop_assert_eq!(total, effective.len() + outside, "counts do not add up");

        for (pool, count) in self.pools.iter().zip(&counts) {
            prop_assert_eq!(
                pool.ranges.len(),
                count.total(),
                "pool {} total",
                pool.name()
            );
            prop_assert_eq!(pool.draining, pool.index >= self.replicas);
            if pool.draining {
                prop_assert!(
                    count.allocated > 0,
                    "empty draining pool {} not deleted",
                    pool.name()
                );
            }
        }
        for index in 0..self.replicas {
            prop_assert!(
                self.pools.iter().any(|pool| pool.index == index),
                "pool {} missing",
                index
            );
        }
        Ok(())
    }

    /// The rules that hold right after a split.
    fn check_fresh_split(&self) -> Result<(), TestCaseError> {
        // Balanced: a pool may be more than one address larger than another only if its
        // allocations alone make it so (it has nothing free).
        let active: Vec<PoolCounts> = self
            .pools
            .iter()
            .filter(|pool| !pool.draining)
            .map(|pool| pool.counts(&self.subnet))
            .collect();
        for big in &active {
            for small in &active {
                if big.total() > small.total() + 1 {
                    prop_assert_eq!(big.free, 0, "unbalanced: {:?} vs {:?}", big, small);
                }
            }
        }

        // Idempotent: splitting again changes nothing.
        for plan in self.plans() {
            let pool = self
                .pools
                .iter()
                .find(|pool| pool.index == plan.index)
                .expect("a plan for an existing pool");
            prop_assert_eq!(&plan.ranges, &pool.ranges, "re-split moved addresses");
            prop_assert!(!plan.deletable);
        }
        Ok(())
    }
}

fn run(cidr: &str, initial: &InitialSpec, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut simulation = Simulation::new(cidr, initial);
    simulation.check_safety()?;
    simulation.check_counts()?;
    simulation.check_fresh_split()?;
    for op in ops {
        simulation.apply(op)?;
        simulation.check_safety()?;
        if simulation.counts_are_current {
            simulation.check_counts()?;
        }
        let just_split = matches!(
            op,
            Op::Resplit
                | Op::Change {
                    split_now: true,
                    ..
                }
        );
        if just_split {
            simulation.check_fresh_split()?;
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn ipv4_pools_stay_safe(initial in initial(), ops in proptest::collection::vec(op(), 1..30)) {
        run("10.0.0.0/26", &initial, &ops)?;
    }

    #[test]
    fn ipv6_pools_stay_safe(initial in initial(), ops in proptest::collection::vec(op(), 1..30)) {
        run("fd00::/122", &initial, &ops)?;
    }

    /// Arbitrary (even inconsistent) current pools: overlapping ranges, allocations outside the
    /// effective set or outside their own ranges. As long as no address is allocated twice the
    /// split is safe, deterministic, balanced and idempotent.
    #[test]
    fn split_of_arbitrary_pools_is_safe(
        effective_mask in any::<u64>(),
        pools in proptest::collection::vec((0u32..8, any::<u64>(), any::<u64>()), 0..6),
        replicas in 1u32..=6,
    ) {
        let address = |bit: u32| IpAddr::from([10, 0, 0, bit as u8]);
        let from_mask = |mask: u64| -> IpSet {
            (0..64).filter(|bit| mask & (1 << bit) != 0).map(address).collect()
        };
        let effective = from_mask(effective_mask);
        let mut claimed = IpSet::new();
        let mut current: Vec<CurrentPool> = Vec::new();
        for (index, ranges_mask, allocated_mask) in pools {
            if current.iter().any(|pool| pool.index == index) {
                continue;
            }
            // Allocations are disjoint across pools (the precondition); ranges may overlap.
            let allocated = from_mask(allocated_mask & ranges_mask).subtract(&claimed);
            claimed = claimed.union(&allocated);
            current.push(CurrentPool { index, ranges: from_mask(ranges_mask), allocated });
        }
        let request = SplitRequest { subnet: SUBNET, effective: &effective, replicas, pools: &current };
        let plans = split_subnet(&request).expect("allocations are disjoint");
        prop_assert_eq!(&split_subnet(&request).expect("again"), &plans, "deterministic");

        let union: IpSet = plans.iter().map(|plan| &plan.ranges).collect();
        let sizes: u128 = plans.iter().map(|plan| plan.ranges.len()).sum();
        prop_assert_eq!(sizes, union.len(), "an address is in two pools");
        prop_assert_eq!(&union, &effective.union(&claimed), "every address has exactly one pool");
        for pool in &current {
            let plan = plans.iter().find(|plan| plan.index == pool.index).expect("kept");
            prop_assert!(pool.allocated.is_subset(&plan.ranges), "allocation moved");
        }
        for plan in &plans {
            prop_assert_eq!(plan.draining, plan.index >= replicas);
            if plan.draining {
                prop_assert_eq!(&plan.ranges, &plan.allocated);
            }
            prop_assert!(plan.free().is_subset(&effective));
        }

        let again: Vec<CurrentPool> = plans
            .iter()
            .map(|plan| CurrentPool { index: plan.index, ranges: plan.ranges.clone(), allocated: plan.allocated.clone() })
            .collect();
        let replanned = split_subnet(&SplitRequest { pools: &again, ..request }).expect("again");
        prop_assert_eq!(replanned, plans, "idempotent");
    }
}
