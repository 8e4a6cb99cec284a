//! The coordinator's decisions, as pure functions: from the interface plugin's result, the
//! config and a snapshot of the node, the list of [`Op`]s that ADD performs and DEL undoes.
//!
//! # What ADD builds, and why
//!
//! On the pod's default-route NIC (the pod's `coordinator.virtnet.io/default-route-nic`
//! annotation as the agent reports it, else `podDefaultRouteNIC`, else `eth0`):
//! - a veth pair: [`POD_VETH`] in the pod, [`host_veth_name`] on the node. Both MACs are derived
//!   from the container id and interface name ([`veth_macs`]), so the plan is deterministic and
//!   systemd's `MACAddressPolicy` has nothing to rewrite. The host end's alias
//!   ([`host_veth_alias`]) names the network and attachment, which is how GC ([`plan_gc`]) finds
//!   its own.
//! - in the pod, `<node address>/32 dev veth0 scope link src <pod address>` for each node
//!   address of the pod's families, and each Service CIDR `via <node address> dev veth0`. The
//!   default route is left alone: it stays on the underlay NIC.
//! - on the node, `<pod address>/32 dev <host veth> scope link src <node address>` in the main
//!   table (IPv6 routes carry no `src`, see `preferred_source`). The route dies with the host veth, so the node keeps no per-pod state once the veth
//!   is gone (no `ip rule`, no extra table: a rule per pod would pile up).
//! - static, permanent neighbour entries on both ends of the veth (pod → node addresses and node
//!   → pod addresses). The MACs are known in advance, so no ARP/ND ever crosses the veth and
//!   proxy ARP is not needed.
//! - `rp_filter = 2` (loose) on both veth ends. The effective value is the maximum of `all` and
//!   the interface, so this relaxes a strict node (`all = 1`) for the veth only: Service replies
//!   reach the pod from a ClusterIP source, which a strict check on a host that also routes that
//!   address elsewhere could drop.
//!
//! On any other NIC (a Multus `netN`): policy routing inside the pod, so replies leave by the NIC
//! the request came in on. Its table is [`POLICY_TABLE_BASE`] + the number the interface name
//! ends in (`net1` → 101, `net2` → 102), with the rule `from <address> lookup <table>` at
//! preference = table number. DEL finds the veth and the table again from the interface name
//! alone, and removes both candidates, since the annotation that chose the role may be gone. The
//! default route the interface plugin also put in the main table for this NIC is deleted: the
//! pod's default route stays on the default-route NIC (else the kernel would pick whichever
//! default route comes first, and off-subnet traffic from eth0's address would leave by `net1`).
//!
//! KubeVirt: the underlay NIC's MAC and default route are never touched, which is what passt
//! needs. The bridge binding moves the pod's MAC into the VM, which macvlan cannot carry, so it
//! is refused before anything changes.

use std::net::IpAddr;

use ipnet::IpNet;
use virtnet_cni::CniResult;
use virtnet_cni::config::GcAttachment;
use virtnet_cni::result::IpConfig;

use crate::config::{CoordinatorConfig, KubevirtBinding, Mode};
use crate::error::CoordinatorError;

/// The pod end of the veth pair.
pub const POD_VETH: &str = "veth0";
/// Every host veth name starts with this, followed by 12 hex digits (15 characters in all).
pub const HOST_VETH_PREFIX: &str = "vnc";
/// Every host veth's alias starts with this (see [`host_veth_alias`]).
pub const HOST_VETH_ALIAS_PREFIX: &str = "virtnet-coordinator:";
/// The kernel's `IFALIASZ` (256) less the terminating NUL.
const MAX_ALIAS_LEN: usize = 255;
/// The pod NIC that carries the default route when `podDefaultRouteNIC` is unset.
pub const DEFAULT_POD_NIC: &str = "eth0";
/// The policy table of pod NIC `<name>N` is `POLICY_TABLE_BASE + N`.
pub const POLICY_TABLE_BASE: u32 = 100;
/// Loose reverse-path filtering.
const RP_FILTER_LOOSE: &str = "2";
/// Node interfaces whose addresses are not the node's own (containers, overlays, kube-proxy's
/// IPVS dummy); the pod never needs to reach them through the veth.
const FOREIGN_LINK_PREFIXES: &[&str] = &[
    "lo",
    "veth",
    HOST_VETH_PREFIX,
    "docker",
    "cbr",
    "virbr",
    "lxcbr",
    "cali",
    "flannel",
    "kube-ipvs",
    "cni",
    "cilium",
    "vxlan",
];

pub type Mac = [u8; 6];

/// Which network namespace an operation runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Node,
    Pod,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub dst: IpNet,
    /// `None` is a link-scope route (the destination is on the link).
    pub via: Option<IpAddr>,
    pub dev: String,
    pub src: Option<IpAddr>,
    /// `None` is the main table.
    pub table: Option<u32>,
}

/// One change ADD makes; [`Op::undo`] is how a failed ADD takes it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A veth pair with `host` in the node and `pod` in the pod, both up; `host_alias` says whose
    /// the host end is.
    AddVeth {
        host: String,
        host_mac: Mac,
        host_alias: String,
        pod: String,
        pod_mac: Mac,
        mtu: Option<u32>,
    },
    /// A write under `/proc/sys/` (`key` is relative to it).
    Sysctl {
        side: Side,
        key: String,
        value: &'static str,
    },
    AddRoute {
        side: Side,
        route: RouteSpec,
    },
    AddNeighbour {
        side: Side,
        dev: String,
        ip: IpAddr,
        mac: Mac,
    },
    AddRule {
        side: Side,
        from: IpNet,
        table: u32,
    },
    /// Deletes a route another plugin added (gone already is success); `via: None` matches
    /// any gateway.
    DelRoute {
        side: Side,
        route: RouteSpec,
    },
}

/// One change DEL makes; each is idempotent (already gone is success).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Teardown {
    /// Deletes the host veth; its peer, routes and neighbours go with it.
    DelLink { side: Side, name: String },
    /// Deletes every pod rule that looks up `table`, then every route in it.
    DelTable { side: Side, table: u32 },
}

impl Op {
    /// What takes this operation back, if anything outlives the links it hangs off.
    pub fn undo(&self) -> Option<Teardown> {
        match self {
            Self::AddVeth { host, .. } => Some(Teardown::DelLink {
                side: Side::Node,
                name: host.clone(),
            }),
            Self::AddRule { side, table, .. } => Some(Teardown::DelTable {
                side: *side,
                table: *table,
            }),
            Self::AddRoute {
                side,
                route: RouteSpec {
                    table: Some(table), ..
                },
            } => Some(Teardown::DelTable {
                side: *side,
                table: *table,
            }),
            // The route belonged to the interface plugin, whose own DEL removes the NIC.
            Self::Sysctl { .. }
            | Self::AddRoute { .. }
            | Self::AddNeighbour { .. }
            | Self::DelRoute { .. } => None,
        }
    }
}

/// An address configured on the node, with the link that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddress {
    pub link: String,
    pub address: IpNet,
}

/// A link of the node, with its alias (`IFLA_IFALIAS`) if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLink {
    pub name: String,
    pub alias: Option<String>,
}

/// What ADD needs to know about the node before changing anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSnapshot {
    pub addresses: Vec<NodeAddress>,
    pub links: Vec<HostLink>,
}

/// Who the plan is for.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub container_id: &'a str,
    pub ifname: &'a str,
}

/// The operations ADD performs, in order; empty when there is nothing to do.
pub fn plan_add(
    config: &CoordinatorConfig,
    target: Target<'_>,
    prev: &CniResult,
    node: &NodeSnapshot,
) -> Result<Vec<Op>, CoordinatorError> {
    if config.mode == Mode::Disabled {
        return Ok(Vec::new());
    }
    if config.kubevirt_binding == Some(KubevirtBinding::Bridge) {
        return Err(CoordinatorError::KubevirtBridge);
    }
    let pod_ips = interface_ips(prev, target.ifname);
    if pod_ips.is_empty() {
        return Err(CoordinatorError::NoIpsOnInterface(target.ifname.to_owned()));
    }
    if target.ifname == default_nic(config) {
        plan_veth(config, target, prev, &pod_ips, node)
    } else {
        plan_policy_routing(target.ifname, prev, &pod_ips)
    }
}

/// What DEL removes, derived from the names alone (DEL carries no reliable prevResult, and the
/// pod, whose annotation may have chosen the default-route NIC, may be gone): the host veth ADD
/// would have made if `ifname` carried the default route, and the policy table it would have
/// filled otherwise (when its name is numbered). Whichever ADD did not make is already absent,
/// which teardown treats as success.
pub fn plan_del(config: &CoordinatorConfig, target: Target<'_>) -> Vec<Teardown> {
    if config.mode == Mode::Disabled {
        return Vec::new();
    }
    let mut teardowns = vec![Teardown::DelLink {
        side: Side::Node,
        name: host_veth_name(target),
    }];
    teardowns.extend(
        policy_table(target.ifname)
            .ok()
            .map(|table| Teardown::DelTable {
                side: Side::Pod,
                table,
            }),
    );
    teardowns
}

/// What GC removes: the host veths this network's ADD made (its alias names `config`'s network
/// and the link carries the name ADD gives that attachment) for attachments the runtime no longer
/// lists. A link without our alias, or another network's, is never touched; so are veths made
/// before host veths had aliases. Deleting the host end takes the pod end, routes and neighbours
/// with it.
pub fn plan_gc(
    config: &CoordinatorConfig,
    links: &[HostLink],
    valid: &[GcAttachment],
) -> Vec<Teardown> {
    if config.mode == Mode::Disabled {
        return Vec::new();
    }
    let Some(network) = config.network.as_deref() else {
        // ADD makes no host veth for a nameless network, so none can be this one's.
        tracing::warn!("the network config has no name; GC has nothing it can tell is its own");
        return Vec::new();
    };
    links
        .iter()
        .filter(|link| {
            let Some((owner, target)) = link.alias.as_deref().and_then(alias_owner) else {
                return false;
            };
            owner == network
                && link.name == host_veth_name(target)
                && !valid.iter().any(|attachment| {
                    attachment.container_id == target.container_id
                        && attachment.ifname == target.ifname
                })
        })
        .map(|link| Teardown::DelLink {
            side: Side::Node,
            name: link.name.clone(),
        })
        .collect()
}

/// The host veth's alias, `virtnet-coordinator:<network>/<container id>/<ifname>`: the node then
/// says whose each veth is (`ip link` shows it), and GC finds its own network's.
pub fn host_veth_alias(network: &str, target: Target<'_>) -> Result<String, CoordinatorError> {
    let alias = format!(
        "{HOST_VETH_ALIAS_PREFIX}{network}/{}/{}",
        target.container_id, target.ifname
    );
    if alias.len() > MAX_ALIAS_LEN || alias.contains('\0') {
        return Err(CoordinatorError::UnlabelableNetwork(network.to_owned()));
    }
    Ok(alias)
}

/// The network and attachment a [`host_veth_alias`] names; `None` for any other alias. Split
/// from the right, as neither a container id nor an interface name holds a `/`.
pub fn alias_owner(alias: &str) -> Option<(&str, Target<'_>)> {
    let mut parts = alias.strip_prefix(HOST_VETH_ALIAS_PREFIX)?.rsplitn(3, '/');
    let (ifname, container_id, network) = (parts.next()?, parts.next()?, parts.next()?);
    Some((
        network,
        Target {
            container_id,
            ifname,
        },
    ))
}

fn default_nic(config: &CoordinatorConfig) -> &str {
    config
        .pod_default_route_nic
        .as_deref()
        .unwrap_or(DEFAULT_POD_NIC)
}

/// The host veth's name: [`HOST_VETH_PREFIX`] and 12 hex digits of a hash of the container id
/// and interface name, so DEL finds it again without stored state.
pub fn host_veth_name(target: Target<'_>) -> String {
    let hash = fnv1a(&[target.container_id, "/", target.ifname]);
    format!("{HOST_VETH_PREFIX}{:012x}", hash >> 16)
}

/// The (host, pod) MACs of the veth pair: locally administered unicast, derived like the name.
pub fn veth_macs(target: Target<'_>) -> (Mac, Mac) {
    let mac = |side: &str| {
        let bytes = fnv1a(&[target.container_id, "/", target.ifname, "/", side]).to_be_bytes();
        [0x02, bytes[0], bytes[1], bytes[2], bytes[3], bytes[4]]
    };
    (mac("host"), mac("pod"))
}

/// The policy table of a non-default pod NIC (see the module docs).
pub fn policy_table(ifname: &str) -> Result<u32, CoordinatorError> {
    let digits = ifname.len() - ifname.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    ifname[ifname.len() - digits..]
        .parse::<u32>()
        .ok()
        .and_then(|index| POLICY_TABLE_BASE.checked_add(index))
        .filter(|table| *table < 253)
        .ok_or_else(|| CoordinatorError::UnnumberedInterface(ifname.to_owned()))
}

fn fnv1a(parts: &[&str]) -> u64 {
    parts
        .iter()
        .flat_map(|part| part.bytes())
        .fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// The IP configs prevResult gives `ifname` (all of them when IPs name no interface).
fn interface_ip_configs<'p>(
    prev: &'p CniResult,
    ifname: &str,
) -> impl Iterator<Item = &'p IpConfig> {
    let index = prev
        .interfaces
        .iter()
        .position(|interface| interface.name == ifname && interface.sandbox.is_some());
    prev.ips
        .iter()
        .filter(move |ip| ip.interface.is_none() || ip.interface == index)
}

/// The pod addresses prevResult gives `ifname`.
fn interface_ips(prev: &CniResult, ifname: &str) -> Vec<IpNet> {
    interface_ip_configs(prev, ifname)
        .map(|ip| ip.address)
        .collect()
}

/// The pod addresses prevResult gives `ifname`, each with its gateway (what the probes need).
pub fn interface_addresses(prev: &CniResult, ifname: &str) -> Vec<(IpAddr, Option<IpAddr>)> {
    interface_ip_configs(prev, ifname)
        .map(|ip| (ip.address.addr(), ip.gateway))
        .collect()
}

fn is_own_address(address: &NodeAddress) -> bool {
    let ip = address.address.addr();
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    !ip.is_loopback()
        && !link_local
        && !FOREIGN_LINK_PREFIXES
            .iter()
            .any(|prefix| address.link.starts_with(prefix))
}

/// The `src` of a route from `address`: IPv4 only. The kernel refuses an IPv6 preferred source
/// that is still tentative (in DAD), which a pod's fresh address is when the coordinator runs;
/// without one, IPv6 source selection picks the same global address anyway.
fn preferred_source(address: IpAddr) -> Option<IpAddr> {
    address.is_ipv4().then_some(address)
}

fn plan_veth(
    config: &CoordinatorConfig,
    target: Target<'_>,
    prev: &CniResult,
    pod_ips: &[IpNet],
    node: &NodeSnapshot,
) -> Result<Vec<Op>, CoordinatorError> {
    // Node routes pull the node's traffic for an address into this pod: only for addresses
    // VirtNet allocated to it, never one another IPAM in the chain may have copied.
    if let Some(allocated) = &config.allocated
        && let Some(foreign) = pod_ips.iter().find(|ip| !allocated.contains(&ip.addr()))
    {
        return Err(CoordinatorError::NotAllocatedByVirtnet {
            ip: foreign.addr(),
            ifname: target.ifname.to_owned(),
            allocated: if allocated.is_empty() {
                "none".to_owned()
            } else {
                allocated
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        });
    }
    let host = host_veth_name(target);
    if node.links.iter().any(|link| link.name == host) {
        return Err(CoordinatorError::HostVethExists(host));
    }
    if target.ifname == POD_VETH {
        return Err(CoordinatorError::PodVethNameTaken);
    }
    let network = config
        .network
        .as_deref()
        .ok_or(CoordinatorError::NoNetworkName)?;
    let host_alias = host_veth_alias(network, target)?;
    let (host_mac, pod_mac) = veth_macs(target);
    let mtu = config.veth_host_mtu.or_else(|| {
        prev.interfaces
            .iter()
            .find(|interface| interface.name == target.ifname)
            .and_then(|interface| interface.mtu)
    });
    let node_ips: Vec<&NodeAddress> = node
        .addresses
        .iter()
        .filter(|a| is_own_address(a))
        .collect();
    let mut ops = vec![Op::AddVeth {
        host: host.clone(),
        host_mac,
        host_alias,
        pod: POD_VETH.to_owned(),
        pod_mac,
        mtu,
    }];
    if pod_ips.iter().any(|ip| ip.addr().is_ipv4()) {
        ops.extend([Side::Node, Side::Pod].into_iter().map(|side| Op::Sysctl {
            side,
            key: format!(
                "net/ipv4/conf/{}/rp_filter",
                if side == Side::Node { &host } else { POD_VETH }
            ),
            value: RP_FILTER_LOOSE,
        }));
    }
    for pod_ip in pod_ips {
        let pod_addr = pod_ip.addr();
        let same_family: Vec<&NodeAddress> = node_ips
            .iter()
            .copied()
            .filter(|node_ip| node_ip.address.addr().is_ipv4() == pod_addr.is_ipv4())
            .collect();
        // The node address that sources node → pod traffic and is the pod's next hop to
        // Services: the one on the pod's subnet if any (the underlay parent), else the first.
        let Some(primary) = same_family
            .iter()
            .find(|node_ip| node_ip.address.contains(&pod_addr))
            .or_else(|| same_family.first())
            .map(|node_ip| node_ip.address.addr())
        else {
            tracing::warn!(%pod_addr, "the node has no address of this family; the pod cannot reach it");
            continue;
        };
        ops.push(Op::AddRoute {
            side: Side::Node,
            route: RouteSpec {
                dst: IpNet::from(pod_addr),
                via: None,
                dev: host.clone(),
                src: preferred_source(primary),
                table: None,
            },
        });
        ops.push(Op::AddNeighbour {
            side: Side::Node,
            dev: host.clone(),
            ip: pod_addr,
            mac: pod_mac,
        });
        for node_ip in &same_family {
            ops.push(Op::AddRoute {
                side: Side::Pod,
                route: RouteSpec {
                    dst: IpNet::from(node_ip.address.addr()),
                    via: None,
                    dev: POD_VETH.to_owned(),
                    src: preferred_source(pod_addr),
                    table: None,
                },
            });
            ops.push(Op::AddNeighbour {
                side: Side::Pod,
                dev: POD_VETH.to_owned(),
                ip: node_ip.address.addr(),
                mac: host_mac,
            });
        }
        ops.extend(
            config
                .service_cidrs
                .iter()
                .filter(|cidr| cidr.addr().is_ipv4() == pod_addr.is_ipv4())
                .map(|cidr| Op::AddRoute {
                    side: Side::Pod,
                    route: RouteSpec {
                        dst: *cidr,
                        via: Some(primary),
                        dev: POD_VETH.to_owned(),
                        src: preferred_source(pod_addr),
                        table: None,
                    },
                }),
        );
    }
    Ok(ops)
}

fn plan_policy_routing(
    ifname: &str,
    prev: &CniResult,
    pod_ips: &[IpNet],
) -> Result<Vec<Op>, CoordinatorError> {
    let table = policy_table(ifname)?;
    let mut ops = Vec::new();
    for pod_ip in pod_ips {
        let pod_addr = pod_ip.addr();
        ops.push(Op::AddRule {
            side: Side::Pod,
            from: IpNet::from(pod_addr),
            table,
        });
        ops.push(Op::AddRoute {
            side: Side::Pod,
            route: RouteSpec {
                dst: pod_ip.trunc(),
                via: None,
                dev: ifname.to_owned(),
                src: preferred_source(pod_addr),
                table: Some(table),
            },
        });
        let gateway = prev
            .ips
            .iter()
            .find(|ip| ip.address == *pod_ip)
            .and_then(|ip| ip.gateway);
        if let Some(gateway) = gateway {
            let any = if pod_addr.is_ipv4() {
                IpNet::V4(ipnet::Ipv4Net::default())
            } else {
                IpNet::V6(ipnet::Ipv6Net::default())
            };
            ops.push(Op::AddRoute {
                side: Side::Pod,
                route: RouteSpec {
                    dst: any,
                    via: Some(gateway),
                    dev: ifname.to_owned(),
                    src: preferred_source(pod_addr),
                    table: Some(table),
                },
            });
        }
    }
    ops.extend(
        prev.routes
            .iter()
            .filter(|route| route.dst.prefix_len() == 0)
            .map(|route| Op::DelRoute {
                side: Side::Pod,
                route: RouteSpec {
                    dst: route.dst,
                    via: route.gw,
                    dev: ifname.to_owned(),
                    src: None,
                    table: None,
                },
            }),
    );
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use serde_json::{Value, json};
    use virtnet_cni::NetworkConfig;

    use super::*;

    type TestResult = Result<(), Box<dyn Error>>;

    const TARGET: Target<'static> = Target {
        container_id: "0123456789abcdef",
        ifname: "eth0",
    };

    fn config(keys: Value) -> Result<CoordinatorConfig, Box<dyn Error>> {
        let mut config =
            json!({"cniVersion": "1.0.0", "name": "macvlan", "type": "virtnet-coordinator"});
        if let (Some(config), Value::Object(keys)) = (config.as_object_mut(), keys) {
            config.extend(keys);
        }
        Ok(CoordinatorConfig::from_network(&NetworkConfig::parse(
            config.to_string().as_bytes(),
        )?)?)
    }

    fn prev(ifname: &str, ips: Value) -> Result<CniResult, Box<dyn Error>> {
        Ok(CniResult::parse(
            "prevResult",
            &json!({
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "lo0", "mac": "00:00:00:00:00:00"},
                    {"name": ifname, "mac": "7a:1f:4c:2e:aa:01", "sandbox": "/var/run/netns/p", "mtu": 1450},
                ],
                "ips": ips,
            }),
        )?)
    }

    fn v4_prev() -> Result<CniResult, Box<dyn Error>> {
        prev(
            "eth0",
            json!([{"interface": 1, "address": "10.6.153.101/16", "gateway": "10.6.0.1"}]),
        )
    }

    fn node() -> Result<NodeSnapshot, Box<dyn Error>> {
        let address = |link: &str, address: &str| -> Result<NodeAddress, Box<dyn Error>> {
            Ok(NodeAddress {
                link: link.to_owned(),
                address: address.parse()?,
            })
        };
        Ok(NodeSnapshot {
            addresses: vec![
                address("lo", "127.0.0.1/8")?,
                address("ens3", "192.168.1.5/24")?,
                address("ens4", "10.6.0.5/16")?,
                address("ens4", "fe80::1/64")?,
                address("ens4", "fd00:6::5/64")?,
                address("cali1234", "10.244.0.1/32")?,
                address("kube-ipvs0", "10.96.0.10/32")?,
            ],
            links: ["lo", "ens3", "ens4"].map(|name| link(name, None)).to_vec(),
        })
    }

    fn link(name: &str, alias: Option<&str>) -> HostLink {
        HostLink {
            name: name.to_owned(),
            alias: alias.map(str::to_owned),
        }
    }

    /// The host veth `network`'s ADD makes for `target`, as the node lists it.
    fn veth_of(network: &str, target: Target<'_>) -> Result<HostLink, CoordinatorError> {
        Ok(HostLink {
            name: host_veth_name(target),
            alias: Some(host_veth_alias(network, target)?),
        })
    }

    fn route(dst: &str, via: Option<&str>, dev: &str, src: &str) -> Result<Op, Box<dyn Error>> {
        Ok(Op::AddRoute {
            side: if dev == POD_VETH {
                Side::Pod
            } else {
                Side::Node
            },
            route: RouteSpec {
                dst: dst.parse()?,
                via: via.map(str::parse).transpose()?,
                dev: dev.to_owned(),
                src: preferred_source(src.parse()?),
                table: None,
            },
        })
    }

    #[test]
    fn names_are_deterministic_short_and_distinct() {
        let host = host_veth_name(TARGET);
        assert_eq!(host, host_veth_name(TARGET));
        assert_eq!(host.len(), 15);
        assert!(host.starts_with(HOST_VETH_PREFIX));
        virtnet_cni::env::check_interface_name(&host).expect("a valid interface name");
        let net1 = Target {
            ifname: "net1",
            ..TARGET
        };
        let other = Target {
            container_id: "0123456789abcdee",
            ..TARGET
        };
        assert_ne!(host, host_veth_name(net1));
        assert_ne!(host, host_veth_name(other));
        let (host_mac, pod_mac) = veth_macs(TARGET);
        assert_ne!(host_mac, pod_mac);
        for mac in [host_mac, pod_mac] {
            assert_eq!(mac[0] & 0b11, 0b10, "locally administered unicast");
        }
        assert_eq!(veth_macs(TARGET), (host_mac, pod_mac));
    }

    #[test]
    fn node_routes_go_only_to_addresses_virtnet_allocated_to_the_pod() -> TestResult {
        let confirmed = |allocated: &[&str]| -> Result<CoordinatorConfig, Box<dyn Error>> {
            let mut config = config(json!({}))?;
            config.allocated = Some(
                allocated
                    .iter()
                    .map(|ip| ip.parse())
                    .collect::<Result<_, _>>()?,
            );
            Ok(config)
        };
        // v4_prev gives the pod 10.6.153.101.
        assert!(
            plan_add(
                &confirmed(&["10.6.153.101"])?,
                TARGET,
                &v4_prev()?,
                &node()?
            )
            .is_ok()
        );
        for allocated in [&["10.6.153.200"][..], &[]] {
            let error = plan_add(&confirmed(allocated)?, TARGET, &v4_prev()?, &node()?)
                .expect_err("a foreign address gets no node route");
            assert!(
                matches!(&error, CoordinatorError::NotAllocatedByVirtnet { ip, .. } if ip.to_string() == "10.6.153.101"),
                "{error}"
            );
            assert_eq!(error.code(), virtnet_cni::ErrorCode::INVALID_NETWORK_CONFIG);
        }
        // No answer from the agent about the pod (no pod in CNI_ARGS): as before.
        assert!(plan_add(&config(json!({}))?, TARGET, &v4_prev()?, &node()?).is_ok());
        Ok(())
    }

    #[test]
    fn default_nic_gets_the_veth_host_routes_neighbours_and_services() -> TestResult {
        let config = config(json!({"serviceCIDRs": ["10.96.0.0/12", "fd00:96::/108"]}))?;
        let ops = plan_add(&config, TARGET, &v4_prev()?, &node()?)?;
        let host = host_veth_name(TARGET);
        let (host_mac, pod_mac) = veth_macs(TARGET);
        let pod_neighbour = |ip: &str| -> Result<Op, Box<dyn Error>> {
            Ok(Op::AddNeighbour {
                side: Side::Pod,
                dev: POD_VETH.to_owned(),
                ip: ip.parse()?,
                mac: host_mac,
            })
        };
        let sysctl = |side, dev: &str| Op::Sysctl {
            side,
            key: format!("net/ipv4/conf/{dev}/rp_filter"),
            value: "2",
        };
        assert_eq!(
            ops,
            vec![
                Op::AddVeth {
                    host: host.clone(),
                    host_mac,
                    host_alias: "virtnet-coordinator:macvlan/0123456789abcdef/eth0".to_owned(),
                    pod: POD_VETH.to_owned(),
                    pod_mac,
                    mtu: Some(1450),
                },
                sysctl(Side::Node, &host),
                sysctl(Side::Pod, POD_VETH),
                // The node's address on the pod's subnet sources node → pod traffic.
                route("10.6.153.101/32", None, &host, "10.6.0.5")?,
                Op::AddNeighbour {
                    side: Side::Node,
                    dev: host.clone(),
                    ip: "10.6.153.101".parse()?,
                    mac: pod_mac,
                },
                route("192.168.1.5/32", None, POD_VETH, "10.6.153.101")?,
                pod_neighbour("192.168.1.5")?,
                route("10.6.0.5/32", None, POD_VETH, "10.6.153.101")?,
                pod_neighbour("10.6.0.5")?,
                // Only the v4 Service CIDR: the pod has no v6 address.
                route("10.96.0.0/12", Some("10.6.0.5"), POD_VETH, "10.6.153.101")?,
            ]
        );
        // The pod's default route and MAC are never touched, and only the host veth needs undo.
        assert!(
            !ops.iter()
                .any(|op| matches!(op, Op::AddRoute { route, .. } if route.dst.prefix_len() == 0))
        );
        let undo: Vec<_> = ops.iter().filter_map(Op::undo).collect();
        assert_eq!(
            undo,
            [Teardown::DelLink {
                side: Side::Node,
                name: host
            }]
        );
        Ok(())
    }

    #[test]
    fn dual_stack_routes_each_family_through_its_own_node_address() -> TestResult {
        let config = config(json!({"serviceCIDRs": ["10.96.0.0/12", "fd00:96::/108"]}))?;
        let prev = prev(
            "eth0",
            json!([
                {"interface": 1, "address": "10.6.153.101/16"},
                {"interface": 1, "address": "fd00:6::65/64"},
            ]),
        )?;
        let ops = plan_add(&config, TARGET, &prev, &node()?)?;
        let host = host_veth_name(TARGET);
        for expected in [
            route("fd00:6::65/128", None, &host, "fd00:6::5")?,
            route("fd00:6::5/128", None, POD_VETH, "fd00:6::65")?,
            route("fd00:96::/108", Some("fd00:6::5"), POD_VETH, "fd00:6::65")?,
            route("10.96.0.0/12", Some("10.6.0.5"), POD_VETH, "10.6.153.101")?,
        ] {
            assert!(
                ops.contains(&expected),
                "{expected:?} missing from {ops:#?}"
            );
        }
        // Link-local, loopback and foreign (container, IPVS) addresses are never routed.
        for ip in [
            "fe80::1/128",
            "127.0.0.1/32",
            "10.244.0.1/32",
            "10.96.0.10/32",
        ] {
            let ip: IpNet = ip.parse()?;
            assert!(
                !ops.iter()
                    .any(|op| matches!(op, Op::AddRoute { route, .. } if route.dst == ip)),
                "{ip} routed"
            );
        }
        Ok(())
    }

    #[test]
    fn no_service_cidrs_still_wires_the_node() -> TestResult {
        let ops = plan_add(&config(json!({}))?, TARGET, &v4_prev()?, &node()?)?;
        assert!(ops.contains(&route("10.6.0.5/32", None, POD_VETH, "10.6.153.101")?));
        assert!(
            !ops.iter()
                .any(|op| matches!(op, Op::AddRoute { route, .. } if route.via.is_some()))
        );
        Ok(())
    }

    #[test]
    fn node_without_an_address_on_the_pod_subnet_uses_its_first() -> TestResult {
        let mut without = node()?;
        without.addresses.retain(|a| a.link != "ens4");
        let ops = plan_add(&config(json!({}))?, TARGET, &v4_prev()?, &without)?;
        assert!(ops.contains(&route(
            "10.6.153.101/32",
            None,
            &host_veth_name(TARGET),
            "192.168.1.5"
        )?));
        Ok(())
    }

    #[test]
    fn other_nics_get_a_policy_table_numbered_by_their_name() -> TestResult {
        let net2 = Target {
            ifname: "net2",
            ..TARGET
        };
        let prev = prev(
            "net2",
            json!([{"interface": 1, "address": "10.7.0.9/24", "gateway": "10.7.0.1"}]),
        )?;
        let ops = plan_add(&config(json!({}))?, net2, &prev, &node()?)?;
        let in_table = |dst: &str, via: Option<&str>| -> Result<Op, Box<dyn Error>> {
            Ok(Op::AddRoute {
                side: Side::Pod,
                route: RouteSpec {
                    dst: dst.parse()?,
                    via: via.map(str::parse).transpose()?,
                    dev: "net2".to_owned(),
                    src: Some("10.7.0.9".parse()?),
                    table: Some(102),
                },
            })
        };
        assert_eq!(
            ops,
            vec![
                Op::AddRule {
                    side: Side::Pod,
                    from: "10.7.0.9/32".parse()?,
                    table: 102,
                },
                in_table("10.7.0.0/24", None)?,
                in_table("0.0.0.0/0", Some("10.7.0.1"))?,
            ]
        );
        let table = Teardown::DelTable {
            side: Side::Pod,
            table: 102,
        };
        assert!(ops.iter().all(|op| op.undo() == Some(table.clone())));
        assert!(plan_del(&config(json!({}))?, net2).contains(&table));
        Ok(())
    }

    #[test]
    fn another_nics_default_route_leaves_the_main_table() -> TestResult {
        let net1 = Target {
            ifname: "net1",
            ..TARGET
        };
        let mut prev = prev(
            "net1",
            json!([{"interface": 1, "address": "10.7.160.10/16", "gateway": "10.7.0.1"}]),
        )?;
        prev.routes = CniResult::parse(
            "prevResult",
            &json!({"cniVersion": "1.0.0", "routes": [
                {"dst": "0.0.0.0/0", "gw": "10.7.0.1"},
                {"dst": "10.9.0.0/16", "gw": "10.7.0.254"},
            ]}),
        )?
        .routes;
        let ops = plan_add(&config(json!({}))?, net1, &prev, &node()?)?;
        let deleted: Vec<&Op> = ops
            .iter()
            .filter(|op| matches!(op, Op::DelRoute { .. }))
            .collect();
        assert_eq!(
            deleted,
            [&Op::DelRoute {
                side: Side::Pod,
                route: RouteSpec {
                    dst: "0.0.0.0/0".parse()?,
                    via: Some("10.7.0.1".parse()?),
                    dev: "net1".to_owned(),
                    src: None,
                    table: None,
                },
            }],
            "only the default route leaves main; the Subnet's own routes stay"
        );
        assert!(
            ops.iter().any(|op| matches!(op, Op::AddRoute { route, .. }
                if route.dst.prefix_len() == 0 && route.table == Some(101))),
            "the default route via net1 lives on in table 101: {ops:?}"
        );
        Ok(())
    }

    #[test]
    fn pod_default_route_nic_moves_the_veth() -> TestResult {
        let config = config(json!({"podDefaultRouteNIC": "net1"}))?;
        let net1 = Target {
            ifname: "net1",
            ..TARGET
        };
        let prev = prev(
            "net1",
            json!([{"interface": 1, "address": "10.6.153.101/16"}]),
        )?;
        let ops = plan_add(&config, net1, &prev, &node()?)?;
        assert!(matches!(&ops[0], Op::AddVeth { host, .. } if *host == host_veth_name(net1)));
        // eth0 is now an extra NIC: table 100.
        let eth0 = plan_add(&config, TARGET, &v4_prev()?, &node()?)?;
        assert!(matches!(&eth0[0], Op::AddRule { table: 100, .. }));
        Ok(())
    }

    #[test]
    fn the_pods_annotation_moves_the_veth_over_the_config() -> TestResult {
        let net1 = Target {
            ifname: "net1",
            ..TARGET
        };
        let net1_prev = prev(
            "net1",
            json!([{"interface": 1, "address": "10.7.0.9/24", "gateway": "10.7.0.1"}]),
        )?;
        // The conflist says eth0; the pod's annotation (through the agent) says net1.
        let annotated = config(json!({"podDefaultRouteNIC": "eth0"}))?.with_agent_answer(
            virtnet_cni::agent_api::CoordinatorResponse {
                default_route_nic: Some("net1".into()),
                ..Default::default()
            },
        );
        let ops = plan_add(&annotated, net1, &net1_prev, &node()?)?;
        assert!(matches!(&ops[0], Op::AddVeth { host, .. } if *host == host_veth_name(net1)));
        let eth0 = plan_add(&annotated, TARGET, &v4_prev()?, &node()?)?;
        assert!(
            eth0.iter().all(|op| matches!(
                op,
                Op::AddRule { table: 100, .. }
                    | Op::AddRoute {
                        route: RouteSpec {
                            table: Some(100),
                            ..
                        },
                        ..
                    }
            )),
            "{eth0:#?}"
        );
        // Without an annotation the config decides again.
        let plain = config(json!({"podDefaultRouteNIC": "eth0"}))?
            .with_agent_answer(virtnet_cni::agent_api::CoordinatorResponse::default());
        assert!(matches!(
            &plan_add(&plain, TARGET, &v4_prev()?, &node()?)?[0],
            Op::AddVeth { .. }
        ));
        Ok(())
    }

    #[test]
    fn policy_table_numbering() {
        assert_eq!(policy_table("eth0").ok(), Some(100));
        assert_eq!(policy_table("net1").ok(), Some(101));
        assert_eq!(policy_table("net152").ok(), Some(252));
        for name in ["net", "net153", "net99999999999"] {
            assert!(matches!(
                policy_table(name),
                Err(CoordinatorError::UnnumberedInterface(_))
            ));
        }
    }

    #[test]
    fn del_removes_what_either_role_of_the_nic_made_whatever_the_default_nic() -> TestResult {
        let either = vec![
            Teardown::DelLink {
                side: Side::Node,
                name: host_veth_name(TARGET),
            },
            Teardown::DelTable {
                side: Side::Pod,
                table: 100,
            },
        ];
        // The annotation that picked the default NIC at ADD is not known at DEL.
        for keys in [json!({}), json!({"podDefaultRouteNIC": "net1"})] {
            assert_eq!(plan_del(&config(keys)?, TARGET), either);
        }
        let unnumbered = Target {
            ifname: "lan",
            ..TARGET
        };
        assert_eq!(
            plan_del(&config(json!({}))?, unnumbered),
            [Teardown::DelLink {
                side: Side::Node,
                name: host_veth_name(unnumbered),
            }]
        );
        Ok(())
    }

    #[test]
    fn disabled_changes_nothing() -> TestResult {
        let config = config(json!({"mode": "disabled", "kubevirtBinding": "bridge"}))?;
        assert!(plan_add(&config, TARGET, &v4_prev()?, &node()?)?.is_empty());
        assert!(plan_del(&config, TARGET).is_empty());
        Ok(())
    }

    #[test]
    fn kubevirt_passt_keeps_the_plan_bridge_is_refused() -> TestResult {
        let plain = plan_add(&config(json!({}))?, TARGET, &v4_prev()?, &node()?)?;
        let passt = config(json!({"kubevirtBinding": "passt"}))?;
        assert_eq!(plan_add(&passt, TARGET, &v4_prev()?, &node()?)?, plain);
        let bridge = config(json!({"kubevirtBinding": "bridge"}))?;
        assert!(matches!(
            plan_add(&bridge, TARGET, &v4_prev()?, &node()?),
            Err(CoordinatorError::KubevirtBridge)
        ));
        Ok(())
    }

    #[test]
    fn refuses_before_any_change() -> TestResult {
        let plain = config(json!({}))?;
        let mut taken = node()?;
        taken.links.push(link(&host_veth_name(TARGET), None));
        assert!(matches!(
            plan_add(&plain, TARGET, &v4_prev()?, &taken),
            Err(CoordinatorError::HostVethExists(_))
        ));
        let veth0 = Target {
            ifname: POD_VETH,
            ..TARGET
        };
        let pod_config = config(json!({"podDefaultRouteNIC": "veth0"}))?;
        let prev_veth0 = prev("veth0", json!([{"interface": 1, "address": "10.6.0.9/16"}]))?;
        assert!(matches!(
            plan_add(&pod_config, veth0, &prev_veth0, &node()?),
            Err(CoordinatorError::PodVethNameTaken)
        ));
        let other_nic = prev("eth1", json!([{"interface": 1, "address": "10.6.0.9/16"}]))?;
        assert!(matches!(
            plan_add(&plain, TARGET, &other_nic, &node()?),
            Err(CoordinatorError::NoIpsOnInterface(_))
        ));
        Ok(())
    }

    #[test]
    fn the_host_veth_alias_names_network_container_and_interface() -> TestResult {
        let alias = host_veth_alias("macvlan", TARGET)?;
        assert_eq!(alias, "virtnet-coordinator:macvlan/0123456789abcdef/eth0");
        let (network, target) = alias_owner(&alias).ok_or("our own alias")?;
        assert_eq!(
            (network, target.container_id, target.ifname),
            ("macvlan", TARGET.container_id, TARGET.ifname)
        );
        // A name with a slash still reads back whole: ids and interface names hold none.
        let odd = host_veth_alias("team/a", TARGET)?;
        assert_eq!(
            alias_owner(&odd).map(|(network, _)| network),
            Some("team/a")
        );
        for foreign in [
            "",
            "uplink to rack 4",
            "virtnet-coordinator:",
            "other:net/c/eth0",
        ] {
            assert!(alias_owner(foreign).is_none(), "{foreign:?}");
        }
        // The kernel keeps at most 255 bytes; a longer alias is refused before any change.
        let long = "n".repeat(240);
        let error = host_veth_alias(&long, TARGET).expect_err("too long");
        assert_eq!(error.code(), virtnet_cni::ErrorCode::INVALID_NETWORK_CONFIG);
        let mut nameless = config(json!({}))?;
        nameless.network = None;
        assert!(matches!(
            plan_add(&nameless, TARGET, &v4_prev()?, &node()?),
            Err(CoordinatorError::NoNetworkName)
        ));
        Ok(())
    }

    #[test]
    fn gc_deletes_only_this_networks_unlisted_veths() -> TestResult {
        let listed = Target {
            container_id: "live0123456789ab",
            ifname: "eth0",
        };
        let gone_net1 = Target {
            ifname: "net1",
            ..TARGET
        };
        let other_networks = Target {
            container_id: "f00d0123456789ab",
            ..TARGET
        };
        let links = vec![
            link("lo", None),
            link("ens4", None),
            veth_of("macvlan", TARGET)?,
            veth_of("macvlan", gone_net1)?,
            veth_of("macvlan", listed)?,
            veth_of("macvlan-b", other_networks)?,
            // Made before host veths had aliases: nothing says whose it is.
            link(
                &host_veth_name(Target {
                    container_id: "01d0123456789abc",
                    ..TARGET
                }),
                None,
            ),
            // Our alias on a link ADD did not name: someone else's, whatever it says.
            link("ens5", host_veth_alias("macvlan", TARGET).ok().as_deref()),
            link("vnc-foreign", Some("uplink to rack 4")),
        ];
        let valid = [GcAttachment {
            container_id: listed.container_id.to_owned(),
            ifname: listed.ifname.to_owned(),
        }];
        let deleted = |target| Teardown::DelLink {
            side: Side::Node,
            name: host_veth_name(target),
        };
        assert_eq!(
            plan_gc(&config(json!({}))?, &links, &valid),
            [deleted(TARGET), deleted(gone_net1)]
        );
        // The other network's GC, listing nothing, takes its own veth only.
        let other = config(json!({"name": "macvlan-b"}))?;
        assert_eq!(plan_gc(&other, &links, &[]), [deleted(other_networks)]);
        // Every attachment listed: nothing to do; so for a disabled or nameless network.
        let all: Vec<GcAttachment> = [TARGET, gone_net1, listed]
            .iter()
            .map(|target| GcAttachment {
                container_id: target.container_id.to_owned(),
                ifname: target.ifname.to_owned(),
            })
            .collect();
        assert!(plan_gc(&config(json!({}))?, &links, &all).is_empty());
        assert!(plan_gc(&config(json!({"mode": "disabled"}))?, &links, &[]).is_empty());
        let mut nameless = config(json!({}))?;
        nameless.network = None;
        assert!(plan_gc(&nameless, &links, &[]).is_empty());
        // Listing the container's net1 does not keep its eth0.
        assert_eq!(
            plan_gc(&config(json!({}))?, &links, &all[1..]),
            [deleted(TARGET)]
        );
        Ok(())
    }
}
