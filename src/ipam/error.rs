//! The one error type of the IPAM engine. Every message says what is wrong and what to do.

use std::net::IpAddr;

use ipnet::IpNet;

use super::range::IpFamily;
use super::select::SelectionSource;
use super::subnet::NotAllocatable;

/// Everything the IPAM engine can reject.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// Not an address or an `a-b` range.
    #[error(
        "{value:?} is not a valid IP address or range: write a single address like 10.6.0.7 or a range like 10.6.153.100-10.6.153.255"
    )]
    InvalidRange {
        /// The text as written.
        value: String,
    },

    /// A range whose start is above its end.
    #[error("{value:?} starts after it ends: write the lower address first, e.g. {suggestion}")]
    ReversedRange {
        /// The text as written.
        value: String,
        /// The range written the right way round.
        suggestion: String,
    },

    /// A range from an IPv4 to an IPv6 address or back.
    #[error("{value:?} mixes IPv4 and IPv6: both ends of a range must be of the same family")]
    MixedFamilyRange {
        /// The text as written.
        value: String,
    },

    /// An `ips` / `excludeIPs` item of the other family than the Subnet.
    #[error(
        "{value:?} is an {value_family} address but subnet {cidr} is {}: list only {} addresses in this Subnet",
        IpFamily::of(cidr.network()),
        IpFamily::of(cidr.network())
    )]
    FamilyMismatch {
        /// The item as written.
        value: String,
        /// The item's family.
        value_family: IpFamily,
        /// The Subnet's CIDR.
        cidr: IpNet,
    },

    /// An `ips` / `excludeIPs` item not inside the CIDR.
    #[error("{value:?} is outside subnet {cidr}: use an address inside the subnet")]
    OutsideSubnet {
        /// The item as written.
        value: String,
        /// The Subnet's CIDR.
        cidr: IpNet,
    },

    /// A CIDR such as `10.6.1.0/16` that is not a network address.
    #[error("subnet {cidr} has host bits set: write it as {network}")]
    CidrHostBits {
        /// The CIDR as given.
        cidr: IpNet,
        /// The network it denotes.
        network: IpNet,
    },

    /// A gateway outside the CIDR.
    #[error(
        "gateway {gateway} is outside subnet {cidr}: set a gateway inside the subnet, or omit it to use {default}"
    )]
    GatewayOutsideSubnet {
        /// The gateway as given.
        gateway: IpAddr,
        /// The Subnet's CIDR.
        cidr: IpNet,
        /// The default gateway of the CIDR.
        default: IpAddr,
    },

    /// `replicas` outside `1..=1024`.
    #[error("Subnet {subnet:?} asks for {replicas} replicas: set spec.replicas between 1 and 1024")]
    InvalidReplicas {
        /// The Subnet's name.
        subnet: String,
        /// The requested replicas.
        replicas: u32,
    },

    /// Two existing pools with one index.
    #[error("two IPPools claim to be {pool}: delete the one the Subnet does not own")]
    DuplicatePoolIndex {
        /// The pool name both claim.
        pool: String,
    },

    /// One address allocated in two pools: a double allocation that already happened.
    #[error(
        "address {address} is allocated in both IPPool {first} and IPPool {second}: two workloads may share it; find them with kubectl get endpoints.virtnet.io -A, then release it from one pool by hand"
    )]
    AddressAllocatedInTwoPools {
        /// The shared address.
        address: IpAddr,
        /// The lower-indexed pool.
        first: String,
        /// The higher-indexed pool.
        second: String,
    },

    /// A pod or namespace annotation that does not parse or makes no sense.
    #[error("annotation {annotation} is invalid: {problem}; write it like {example}")]
    InvalidAnnotation {
        /// The annotation's name.
        annotation: &'static str,
        /// What is wrong.
        problem: String,
        /// A correct value.
        example: &'static str,
    },

    /// A named Subnet that does not exist.
    #[error("Subnet {subnet:?} named by {origin} does not exist: create it, or fix {origin}")]
    UnknownSubnet {
        /// The name.
        subnet: String,
        /// Who named it.
        origin: SelectionSource,
    },

    /// A Subnet named for one family that is of the other.
    #[error(
        "Subnet {subnet:?} ({cidr}) is named as the {wanted} Subnet by {origin} but is not {wanted}: put it under {:?}",
        IpFamily::of(cidr.network()).field_name()
    )]
    SubnetFamilyMismatch {
        /// The name.
        subnet: String,
        /// Its CIDR.
        cidr: IpNet,
        /// The family it was named for.
        wanted: IpFamily,
        /// Who named it.
        origin: SelectionSource,
    },

    /// An explicitly named Subnet whose selector rejects the pod.
    #[error(
        "Subnet {subnet:?} named by {origin} does not accept this pod: {reason}; name another Subnet, or change the selector or the labels"
    )]
    SubnetNotEligible {
        /// The name.
        subnet: String,
        /// Which selector rejects the pod, quoted.
        reason: String,
        /// Who named it.
        origin: SelectionSource,
    },

    /// Default Subnets of a family that all reject the pod.
    #[error(
        "no {family} Subnet named by {origin} accepts this pod ({reasons}): run the pod where a Subnet accepts it, or name another Subnet"
    )]
    NoEligibleSubnet {
        /// The family.
        family: IpFamily,
        /// Why each Subnet rejects the pod.
        reasons: String,
        /// Where the Subnets were named.
        origin: SelectionSource,
    },

    /// No source names any Subnet for the interface.
    #[error(
        "no Subnet serves interface {interface}: annotate the pod with ipam.virtnet.io/subnet, set default_subnet in the CNI config, or mark a Subnet default: true"
    )]
    NoSubnetForInterface {
        /// The interface.
        interface: String,
    },

    /// A pool name that is not `<subnet>-<index>`.
    #[error(
        "IPPool {pool:?} named by {origin} is not a VirtNet pool name (<subnet>-<index>): copy a name from kubectl get ippools.virtnet.io"
    )]
    InvalidPoolName {
        /// The name as given.
        pool: String,
        /// Who named it.
        origin: SelectionSource,
    },

    /// A static address inside no Subnet the pod may use.
    #[error(
        "static address {address} from {origin} is in no Subnet this pod may use: pick an address inside an eligible Subnet, or name the Subnet in the annotation"
    )]
    StaticAddressInNoSubnet {
        /// The address.
        address: IpAddr,
        /// Who asked for it.
        origin: SelectionSource,
    },

    /// A requested address outside every Subnet of the network the interface is attached to.
    #[error(
        "static address {address} from {origin} is outside this network's Subnets ({subnets}): request an address inside one of them, or attach the interface to the network whose Subnet holds it"
    )]
    StaticAddressOutsideNetwork {
        /// The address.
        address: IpAddr,
        /// The network's Subnets (the CNI config's defaults).
        subnets: String,
        /// Who asked for it.
        origin: SelectionSource,
    },

    /// A static address the Subnet does not offer.
    #[error(
        "static address {address} cannot be allocated in subnet {cidr}: {reason}; choose an address the Subnet offers"
    )]
    StaticAddressNotAllocatable {
        /// The address.
        address: IpAddr,
        /// The Subnet's CIDR.
        cidr: IpNet,
        /// Why it is not offered.
        reason: NotAllocatable,
    },

    /// A static address not yet assigned to a pool.
    #[error(
        "static address {address} is in no IPPool of subnet {cidr} yet: wait for the controller to split the Subnet, then retry"
    )]
    StaticAddressNotInAnyPool {
        /// The address.
        address: IpAddr,
        /// The Subnet's CIDR.
        cidr: IpNet,
    },

    /// A static address held by someone else.
    #[error(
        "static address {address} is already allocated in IPPool {pool} to {holder}: choose another address, or release it first"
    )]
    StaticAddressInUse {
        /// The address.
        address: IpAddr,
        /// The pool holding it.
        pool: String,
        /// Who holds it.
        holder: String,
    },

    /// A static request from a holder that already holds a different address.
    #[error(
        "{holder} already holds {held} in IPPool {pool}: release it before asking for {requested}"
    )]
    HolderHoldsAnotherAddress {
        /// The holder.
        holder: String,
        /// What it holds.
        held: IpAddr,
        /// Where.
        pool: String,
        /// What it asked for.
        requested: IpAddr,
    },

    /// A pool with nothing free.
    #[error(
        "IPPool {pool} has no free address: add addresses to the Subnet's ips, or release some"
    )]
    PoolExhausted {
        /// The pool.
        pool: String,
    },

    /// A Subnet whose pools have nothing free.
    #[error(
        "no IPPool of subnet {cidr} has a free address: add addresses to the Subnet's ips, or release some"
    )]
    SubnetExhausted {
        /// The Subnet's CIDR.
        cidr: IpNet,
    },

    /// A draining pool asked for an address.
    #[error(
        "IPPool {pool} is draining (its index is beyond the Subnet's replicas) and hands out no addresses: use another pool of the Subnet, or raise replicas"
    )]
    PoolDraining {
        /// The pool.
        pool: String,
    },

    /// A split computed from allocations that have changed since.
    #[error(
        "IPPool {pool} changed after the split was computed: recompute the split and apply it again"
    )]
    StalePlan {
        /// The pool.
        pool: String,
    },
}
