//! Choosing a pool and an address without every node racing for the same one.

use std::net::IpAddr;

use super::pool::{AllocationHolder, PoolState};
use super::set::IpSet;
use super::subnet::SubnetAddresses;

/// A hash that never changes between builds or releases (64-bit FNV-1a), unlike std's
/// `DefaultHasher`; parts are separated so `("ab", "c")` and `("a", "bc")` differ.
pub fn stable_hash(parts: &[&str]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    parts.iter().fold(OFFSET_BASIS, |hash, part| {
        part.bytes()
            .chain([0xff]) // 0xff never occurs in UTF-8, so it cannot be confused with text.
            .fold(hash, |hash, byte| {
                (hash ^ u64::from(byte)).wrapping_mul(PRIME)
            })
    })
}

/// The free address to hand to `holder`: the first address of `free` at or after a start point
/// derived from (node, holder), wrapping around. The start point is taken in `ranges` (the whole
/// pool), so it does not shift as other addresses are allocated. `None` if `free` is empty.
///
/// Taking the lowest free address (Spiderpool) or the head of a FIFO (the Go prototype) makes
/// every node contend for the same address and the same pool, so concurrent allocations
/// conflict by construction. Here each node starts from its own pool (rotation by a hash of the
/// node name) and each allocation from its own offset (a hash of node and holder), then walks
/// forward to the next free address.
pub fn pick_free_address(
    ranges: &IpSet,
    free: &IpSet,
    node: &str,
    holder: &AllocationHolder,
) -> Option<IpAddr> {
    let key = holder.key.to_string();
    let hash = stable_hash(&[node, holder.key.kind(), &key, &holder.interface]);
    let start = ranges.nth(u128::from(hash).checked_rem(ranges.len())?)?;
    free.next_cyclic_from(start)
}

/// How far `node` rotates the pool order: its rank among `peers` (the nodes that may use the
/// Subnet, any order) when it is one of them, else a hash of its name.
///
/// Ranks give every node its own preferred pool whenever there are at least as many pools as
/// nodes, and spread nodes evenly (at most one more per pool than another) when there are
/// fewer; a hash (or rendezvous hashing) only gets there on average: with 3 nodes and 3 pools
/// two nodes share their first pool 7 times in 9. When nodes join or leave the ranks shift,
/// which only moves preferences; correctness never depends on them (claims are guarded by the
/// pool's resourceVersion).
pub fn node_rotation(node: &str, peers: &[String]) -> u64 {
    let rank = peers
        .iter()
        .any(|peer| peer == node)
        .then(|| peers.iter().filter(|peer| peer.as_str() < node).count());
    rank.map_or_else(|| stable_hash(&[node]), |rank| rank as u64)
}

/// The positions in `pools` worth trying on `node`, in order: pools that are not draining and
/// have a free address. Every non-draining pool is sorted by index and rotated by
/// [`node_rotation`], so different nodes start on different pools (see [`pick_free_address`]
/// for why); a full pool is skipped without shifting the others, so a node keeps its
/// preference while its neighbours' pools fill up.
pub fn order_pools_for_node(
    pools: &[PoolState],
    subnet: &SubnetAddresses,
    node: &str,
    peers: &[String],
) -> Vec<usize> {
    let mut open: Vec<usize> = (0..pools.len())
        .filter(|position| !pools[*position].draining)
        .collect();
    open.sort_by_key(|position| pools[*position].index);
    if !open.is_empty() {
        let rotation = node_rotation(node, peers) % open.len() as u64;
        open.rotate_left(rotation as usize);
    }
    open.retain(|position| !pools[*position].free(subnet).is_empty());
    open
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::ipam::AllocationKey;
    use crate::ipam::set::tests::set;

    fn holder(uid: &str) -> AllocationHolder {
        AllocationHolder {
            key: AllocationKey::Pod {
                namespace: "default".into(),
                name: format!("pod-{uid}"),
                uid: uid.into(),
            },
            interface: "eth0".into(),
        }
    }

    #[test]
    fn hash_is_stable_and_separates_parts() {
        assert_eq!(stable_hash(&[]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash(&["node-1"]), stable_hash(&["node-1"]));
        assert_ne!(stable_hash(&["ab", "c"]), stable_hash(&["a", "bc"]));
        // Pinned value: changing the hash would reshuffle every cluster's allocation pattern.
        assert_eq!(stable_hash(&["a"]), 0x089b_c907_b544_c769);
    }

    #[test]
    fn picks_spread_over_the_pool() {
        let ranges = set(&["10.0.0.0-10.0.0.255"]);
        let picks: BTreeSet<IpAddr> = (0..32)
            .filter_map(|n| pick_free_address(&ranges, &ranges, "node-a", &holder(&n.to_string())))
            .collect();
        assert!(
            picks.len() > 20,
            "32 holders should rarely collide: {}",
            picks.len()
        );
        assert!(
            picks
                .iter()
                .any(|address| address.to_string() != "10.0.0.0")
        );
    }

    #[test]
    fn pick_walks_forward_to_the_next_free_address_and_wraps() {
        let ranges = set(&["10.0.0.0-10.0.0.15"]);
        let someone = holder("x");
        let preferred = pick_free_address(&ranges, &ranges, "n", &someone).expect("free");
        let without_preferred = ranges.subtract(&IpSet::from_iter([preferred]));
        let next = pick_free_address(&ranges, &without_preferred, "n", &someone).expect("free");
        assert_eq!(Some(next), without_preferred.next_cyclic_from(preferred));
        let only = set(&["10.0.0.3"]);
        assert_eq!(
            pick_free_address(&ranges, &only, "n", &someone),
            only.nth(0),
            "wraps to the only free one"
        );
        assert_eq!(
            pick_free_address(&ranges, &IpSet::new(), "n", &someone),
            None
        );
        assert_eq!(
            pick_free_address(&IpSet::new(), &IpSet::new(), "n", &someone),
            None
        );
    }

    #[test]
    fn pool_order_skips_draining_and_full_pools_and_rotates_by_node() {
        let subnet = SubnetAddresses::parse(
            "10.0.0.0/24".parse().expect("cidr"),
            None,
            &["10.0.0.10-10.0.0.49"],
            &[],
        )
        .expect("valid");
        let mut pools: Vec<PoolState> = (0..4)
            .map(|index| {
                let first = 10 + index * 10;
                let ranges = set(&[&format!("10.0.0.{first}-10.0.0.{}", first + 9)]);
                PoolState::new("s", index, ranges)
            })
            .collect();
        pools[1].draining = true;
        pools[3].ranges = IpSet::new();
        let orders: BTreeSet<Vec<usize>> = (0..16)
            .map(|n| order_pools_for_node(&pools, &subnet, &format!("node-{n}"), &[]))
            .collect();
        assert_eq!(
            orders,
            BTreeSet::from([vec![0, 2], vec![2, 0]]),
            "both rotations occur"
        );
        pools.swap(0, 2);
        let order = order_pools_for_node(&pools, &subnet, "node-1", &[]);
        assert_eq!(order.len(), 2);
        assert!(order.iter().all(|position| [0, 2].contains(position)));
    }

    fn pools_of(count: u32) -> (SubnetAddresses, Vec<PoolState>) {
        let subnet = SubnetAddresses::parse(
            "10.0.0.0/16".parse().expect("cidr"),
            None,
            &["10.0.0.10-10.0.255.254"],
            &[],
        )
        .expect("valid");
        let pools = (0..count)
            .map(|index| {
                let ranges = set(&[&format!("10.0.{index}.10-10.0.{index}.19")]);
                PoolState::new("s", index, ranges)
            })
            .collect();
        (subnet, pools)
    }

    /// Which pool index each of `nodes` tries first.
    fn first_choices(pools: &[PoolState], subnet: &SubnetAddresses, nodes: &[String]) -> Vec<u32> {
        nodes
            .iter()
            .map(|node| {
                let order = order_pools_for_node(pools, subnet, node, nodes);
                pools[order[0]].index
            })
            .collect()
    }

    #[test]
    fn three_nodes_prefer_three_different_pools() {
        let (subnet, mut pools) = pools_of(3);
        let nodes: Vec<String> = ["worker-b", "worker-c", "control-plane"]
            .map(String::from)
            .to_vec();
        let first = first_choices(&pools, &subnet, &nodes);
        assert_eq!(first.iter().collect::<BTreeSet<_>>().len(), 3, "{first:?}");
        // The order pools are listed in does not matter, only their index.
        pools.reverse();
        assert_eq!(first_choices(&pools, &subnet, &nodes), first);
        // A node the caller did not list still gets an order (by hash).
        assert_eq!(
            order_pools_for_node(&pools, &subnet, "stranger", &nodes).len(),
            3
        );
    }

    #[test]
    fn a_full_preferred_pool_sends_the_node_to_the_next_one_only() {
        let (subnet, mut pools) = pools_of(3);
        let nodes: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        assert_eq!(first_choices(&pools, &subnet, &nodes), [0, 1, 2]);
        pools[1].ranges = IpSet::new();
        assert_eq!(first_choices(&pools, &subnet, &nodes), [0, 2, 2]);
        assert_eq!(order_pools_for_node(&pools, &subnet, "b", &nodes), [2, 0]);
    }

    proptest::proptest! {
        /// With at least as many pools as nodes every node has a pool of its own; with fewer,
        /// no pool is the first choice of more than one node more than any other pool.
        #[test]
        fn first_choices_spread_evenly(
            names in proptest::collection::btree_set("[a-z0-9-]{1,12}", 1..24),
            pool_count in 1u32..16,
        ) {
            let (subnet, pools) = pools_of(pool_count);
            let nodes: Vec<String> = names.into_iter().rev().collect();
            let mut per_pool = vec![0usize; pool_count as usize];
            for index in first_choices(&pools, &subnet, &nodes) {
                per_pool[index as usize] += 1;
            }
            let most = per_pool.iter().copied().max().unwrap_or_default();
            let least = per_pool.iter().copied().min().unwrap_or_default();
            proptest::prop_assert!(most - least <= 1, "{:?}", per_pool);
            for node in &nodes {
                let mut order = order_pools_for_node(&pools, &subnet, node, &nodes);
                order.sort_unstable();
                proptest::prop_assert_eq!(order, (0..pool_count as usize).collect::<Vec<_>>());
            }
        }
    }
}
