//! The emulated physical network: a bridge "switch", a router owning the underlay gateway, the
//! control-plane host and the node hosts, each a network namespace cabled to the switch by a veth.
//!
//! Every link is created directly inside the cluster's namespaces (`ip -n <ns> link add ... peer
//! ... netns <other>`), so nothing, not even for a moment, appears in the root namespace.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
};

use crate::{
    command::{self, CommandError},
    naming::ClusterNames,
};

/// The underlay every host and pod sits on, 10.6.0.0/16 as in VirtNet's README (the example).
pub const UNDERLAY_NETWORK: Ipv4Addr = Ipv4Addr::new(10, 6, 0, 0);
pub const UNDERLAY_PREFIX_LEN: u8 = 16;
/// The underlay gateway, owned by the router namespace so "ping the gateway" is real.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 6, 0, 1);
/// The gateway's IPv6 address, for dual-stack tests.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 6, 0, 0, 0, 0, 0, 1);
pub const GATEWAY_V6_PREFIX_LEN: u8 = 64;
/// The control-plane host; the apiserver listens here.
pub const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(10, 6, 0, 2);
/// The one NIC of every node, named as in the README's conflist.
pub const NODE_NIC: &str = "ens192";
/// The NIC of the router and control-plane hosts.
const HOST_NIC: &str = "eth0";
/// The second underlay (Multus mode): another L2 network, 10.7.0.0/16, on every node's second
/// NIC and on the router, so a pod's `net1` really sits on a network of its own.
pub const SECOND_UNDERLAY_NETWORK: Ipv4Addr = Ipv4Addr::new(10, 7, 0, 0);
/// The second underlay's gateway, owned by the router as well.
pub const SECOND_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 7, 0, 1);
/// Every node's second NIC, named like the second vNIC of a VMware node.
pub const SECOND_NODE_NIC: &str = "ens224";
/// The router's NIC on the second underlay.
const ROUTER_SECOND_NIC: &str = "eth1";

/// The underlay in CIDR notation.
pub fn underlay_cidr() -> String {
    format!("{UNDERLAY_NETWORK}/{UNDERLAY_PREFIX_LEN}")
}

/// The second underlay in CIDR notation.
pub fn second_underlay_cidr() -> String {
    format!("{SECOND_UNDERLAY_NETWORK}/{UNDERLAY_PREFIX_LEN}")
}

/// The address of the `index`-th node (1-based): 10.6.1.<index>.
pub fn node_ip(index: usize) -> Ipv4Addr {
    let last_octet = u8::try_from(index).unwrap_or(u8::MAX);
    Ipv4Addr::new(10, 6, 1, last_octet)
}

/// The address of the `index`-th node's second NIC (1-based): 10.7.1.<index>.
pub fn second_node_ip(index: usize) -> Ipv4Addr {
    let [_, _, third, fourth] = node_ip(index).octets();
    let [first, second, ..] = SECOND_UNDERLAY_NETWORK.octets();
    Ipv4Addr::new(first, second, third, fourth)
}

/// Creates and deletes the namespaces, bridges and cables of one cluster.
#[derive(Debug, Clone)]
pub struct Topology {
    names: ClusterNames,
    nodes: usize,
    second_underlay: bool,
}

impl Topology {
    pub fn new(names: ClusterNames, nodes: usize) -> Self {
        Self {
            names,
            nodes,
            second_underlay: false,
        }
    }

    /// Also builds the second underlay: a switch of its own, the router's `eth1` owning
    /// [`SECOND_GATEWAY_V4`] and every node's [`SECOND_NODE_NIC`].
    pub fn with_second_underlay(mut self, second_underlay: bool) -> Self {
        self.second_underlay = second_underlay;
        self
    }

    /// Builds the whole network. On error the caller deletes what was built by prefix.
    pub fn create(&self) -> Result<(), CommandError> {
        let switch = self.names.switch_netns();
        let bridge = self.names.bridge();
        add_netns(&switch)?;
        ip(&switch, &["link", "add", &bridge, "type", "bridge"])?;
        ip(&switch, &["link", "set", &bridge, "up"])?;

        let router = self.names.router_netns();
        self.cable_host(&router, "router", HOST_NIC)?;
        add_address(&router, HOST_NIC, GATEWAY_V4.into(), UNDERLAY_PREFIX_LEN)?;
        add_address(&router, HOST_NIC, GATEWAY_V6.into(), GATEWAY_V6_PREFIX_LEN)?;

        let control_plane = self.names.control_plane_netns();
        self.cable_host(&control_plane, "cp", HOST_NIC)?;
        add_address(
            &control_plane,
            HOST_NIC,
            CONTROL_PLANE_IP.into(),
            UNDERLAY_PREFIX_LEN,
        )?;
        add_default_route(&control_plane)?;

        for index in 1..=self.nodes {
            let node = self.names.node_netns(index);
            self.cable_host(&node, &format!("node{index}"), NODE_NIC)?;
            add_address(&node, NODE_NIC, node_ip(index).into(), UNDERLAY_PREFIX_LEN)?;
            add_default_route(&node)?;
            enable_forwarding(&node)?;
        }
        if self.second_underlay {
            self.create_second_underlay()?;
        }
        Ok(())
    }

    /// The second L2 network, cabled to the hosts [`Topology::create`] made. No default route
    /// points into it: hosts reach it only as a connected network.
    fn create_second_underlay(&self) -> Result<(), CommandError> {
        let switch = self.names.second_switch_netns();
        let bridge = self.names.second_bridge();
        add_netns(&switch)?;
        ip(&switch, &["link", "add", &bridge, "type", "bridge"])?;
        ip(&switch, &["link", "set", &bridge, "up"])?;
        let router = self.names.router_netns();
        plug(&switch, &bridge, &router, "router", ROUTER_SECOND_NIC)?;
        add_address(
            &router,
            ROUTER_SECOND_NIC,
            SECOND_GATEWAY_V4.into(),
            UNDERLAY_PREFIX_LEN,
        )?;
        for index in 1..=self.nodes {
            let node = self.names.node_netns(index);
            plug(
                &switch,
                &bridge,
                &node,
                &format!("node{index}"),
                SECOND_NODE_NIC,
            )?;
            add_address(
                &node,
                SECOND_NODE_NIC,
                second_node_ip(index).into(),
                UNDERLAY_PREFIX_LEN,
            )?;
        }
        Ok(())
    }

    /// Creates host namespace `netns` and plugs its NIC `nic` into switch port `port`.
    fn cable_host(&self, netns: &str, port: &str, nic: &str) -> Result<(), CommandError> {
        add_netns(netns)?;
        plug(
            &self.names.switch_netns(),
            &self.names.bridge(),
            netns,
            port,
            nic,
        )
    }
}

/// Cables NIC `nic` of host namespace `netns` to port `port` of `bridge` in namespace `switch`.
fn plug(
    switch: &str,
    bridge: &str,
    netns: &str,
    port: &str,
    nic: &str,
) -> Result<(), CommandError> {
    ip(
        switch,
        &[
            "link", "add", port, "type", "veth", "peer", "name", nic, "netns", netns,
        ],
    )?;
    ip(switch, &["link", "set", port, "master", bridge, "up"])?;
    ip(netns, &["link", "set", nic, "up"])
}

/// Creates a named network namespace with its loopback up (the apiserver and etcd use it).
fn add_netns(netns: &str) -> Result<(), CommandError> {
    command::run(Command::new("ip").args(["netns", "add", netns]))?;
    ip(netns, &["link", "set", "lo", "up"])
}

fn add_address(
    netns: &str,
    nic: &str,
    address: IpAddr,
    prefix_len: u8,
) -> Result<(), CommandError> {
    let cidr = format!("{address}/{prefix_len}");
    // `nodad`: an IPv6 address stays tentative (unusable) for a second or two otherwise.
    let dad_flag: &[&str] = if address.is_ipv6() { &["nodad"] } else { &[] };
    let mut args = vec!["addr", "add", &cidr, "dev", nic];
    args.extend_from_slice(dad_flag);
    ip(netns, &args)
}

/// Hosts route off-subnet traffic to the router, like any machine on a real L2 segment.
fn add_default_route(netns: &str) -> Result<(), CommandError> {
    ip(
        netns,
        &["route", "add", "default", "via", &GATEWAY_V4.to_string()],
    )
}

/// A Kubernetes node forwards (kubeadm's preflight insists): kube-proxy's DNATed Service
/// traffic leaves by another interface than it came in on.
fn enable_forwarding(netns: &str) -> Result<(), CommandError> {
    command::run(Command::new("ip").args([
        "netns",
        "exec",
        netns,
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
    ]))
    .map(drop)
}

/// Runs `ip -n <netns> <args>`.
fn ip(netns: &str, args: &[&str]) -> Result<(), CommandError> {
    command::run(Command::new("ip").arg("-n").arg(netns).args(args)).map(drop)
}

/// Every named network namespace whose name starts with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Result<Vec<String>, CommandError> {
    let listing = command::run_stdout(Command::new("ip").args(["netns", "list"]))?;
    Ok(listing
        .lines()
        // Lines look like `name (id: 3)` or just `name`.
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(prefix))
        .map(str::to_owned)
        .collect())
}

/// The processes whose network namespace is `netns`.
pub fn netns_pids(netns: &str) -> Result<Vec<i32>, CommandError> {
    let listing = command::run_stdout(Command::new("ip").args(["netns", "pids", netns]))?;
    Ok(listing
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect())
}

/// Deletes one named network namespace; links inside it (veth ends) go with it.
pub fn delete_netns(netns: &str) -> Result<(), CommandError> {
    command::run(Command::new("ip").args(["netns", "delete", netns])).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_sit_on_the_underlay_away_from_the_gateway() {
        assert_eq!(node_ip(1), Ipv4Addr::new(10, 6, 1, 1));
        assert_ne!(node_ip(1), GATEWAY_V4);
        assert_ne!(node_ip(1), CONTROL_PLANE_IP);
    }

    #[test]
    fn second_nic_addresses_mirror_the_first_on_the_second_underlay() {
        assert_eq!(second_node_ip(3), Ipv4Addr::new(10, 7, 1, 3));
        assert_ne!(second_node_ip(1), SECOND_GATEWAY_V4);
        assert_eq!(second_underlay_cidr(), "10.7.0.0/16");
    }
}
