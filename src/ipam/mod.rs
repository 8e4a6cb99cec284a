//! The pure IPAM engine: no I/O, every decision a function.
//!
//! Nothing here talks to Kubernetes or the host; it works on its own small structs, so every
//! rule is unit- and property-tested without a cluster.
//!
//! - Addresses: [`IpRange`] and [`IpSet`] (IPv4 and IPv6 alike, O(ranges) arithmetic), and
//!   [`SubnetAddresses`], a Subnet's validated CIDR, gateway and *effective* (allocatable) set.
//! - Splitting a Subnet into IPPools: [`split_subnet`] (balanced, deterministic, idempotent, and
//!   safe: allocated addresses never move, scale-down drains instead of deleting).
//! - Choosing where an interface's addresses come from: [`select_for_interface`] over parsed
//!   [`PodIpamAnnotations`] / [`NamespaceDefaultSubnet`] and Subnet [`LabelSelector`]s.
//! - Who holds an address: [`AllocationKey`] (sticky for StatefulSet pods and KubeVirt VMs).
//! - Picking pools and addresses without cross-node contention: [`order_pools_for_node`],
//!   [`pick_free_address`].
//! - An in-memory model enforcing all of it: [`PoolState`], [`allocate_in_pools`],
//!   [`find_static_pool`], [`apply_split`].

mod annotations;
mod error;
mod key;
mod network_selection;
mod pick;
mod pool;
mod range;
mod select;
mod selector;
mod set;
mod split;
mod subnet;

#[cfg(test)]
mod proptests;

pub use annotations::{
    DEFAULT_SUBNET_ANNOTATION, IPPOOLS_ANNOTATION, InterfaceEntry, NamespaceDefaultSubnet,
    PodIpamAnnotations, STATIC_IPS_ANNOTATION, SUBNET_ANNOTATION, SUBNETS_ANNOTATION, lookup_entry,
};
pub use error::IpamError;
pub use key::{
    AllocationKey, FixedIpRetention, KUBEVIRT_API_GROUP, KUBEVIRT_LAUNCHER_LABEL,
    KUBEVIRT_LAUNCHER_VALUE, KUBEVIRT_VM_NAME_LABEL, OwnerRef, PodFacts,
};
pub use network_selection::{
    DEFAULT_INTERFACE, DEFAULT_NETWORK_ANNOTATION, NETWORKS_ANNOTATION, NetworkSelection,
    selection_for_interface,
};
pub use pick::{node_rotation, order_pools_for_node, pick_free_address, stable_hash};
pub use pool::{
    AllocationHolder, PoolCounts, PoolState, allocate_in_pools, apply_split, find_static_pool,
};
pub use range::{IpFamily, IpRange};
pub use select::{
    InterfaceSelection, Selection, SelectionRequest, SelectionSource, SubnetFacts,
    select_for_interface,
};
pub use selector::{LabelRequirement, LabelSelector, SelectorOperator};
pub use set::IpSet;
pub use split::{
    CurrentPool, MAX_DERIVED_POOLS, MAX_POOL_ADDRESSES, MAX_REPLICAS, PoolPlan, SplitRequest,
    parse_pool_name, pool_count, pool_name, split_subnet,
};
pub use subnet::{NotAllocatable, SubnetAddresses, default_gateway, reserved_addresses};
