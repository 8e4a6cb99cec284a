//! The underlay probes: IP conflict detection (an ARP probe from 0.0.0.0 for IPv4, a DAD-style
//! neighbour solicitation from :: for IPv6), the gateway reachability check (ARP / NDP
//! resolution, not ICMP, which routers may drop) and the announcement after setup (gratuitous
//! ARP, unsolicited neighbour advertisement), so switches and neighbours forget whoever held the
//! address before.
//!
//! [`plan_probes`] decides and the frame builders and [`answer_from`] are pure; [`Prober`] is
//! the only side effect: an `AF_PACKET` socket bound to the pod interface, opened (with the safe
//! nix API) on a thread inside the pod netns; it stays bound there, so it is used from the
//! calling thread afterwards. Every wait is bounded: [`TRIES`] rounds of
//! [`ROUND`], so a check answers within [`MAX_CHECK`] and a reply ends it at once.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, LinkAddr, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrStorage, bind,
    recv, send, setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;

use crate::netlink::{NetlinkError, in_netns};
use crate::plan::Mac;

/// Rounds of probing before an address counts as free or a gateway as unreachable.
pub const TRIES: u32 = 3;
/// How long each round waits for answers (Spiderpool's and arping's figure).
pub const ROUND: Duration = Duration::from_millis(100);
/// The longest a check can take.
pub const MAX_CHECK: Duration = Duration::from_millis(300);

const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ARP_REQUEST: u16 = 1;
const ICMPV6: u8 = 58;
const NEIGHBOUR_SOLICITATION: u8 = 135;
const NEIGHBOUR_ADVERTISEMENT: u8 = 136;
const OPTION_SOURCE_LINK_ADDRESS: u8 = 1;
const OPTION_TARGET_LINK_ADDRESS: u8 = 2;
/// The override flag of a neighbour advertisement: replace what caches hold.
const NA_OVERRIDE: u8 = 0x20;
const BROADCAST: Mac = [0xff; 6];
const ETHERNET_HEADER: usize = 14;
const IPV6_HEADER: usize = 40;

/// What ADD probes on one pod interface.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbePlan {
    /// The pod interface the probes go out of.
    pub ifname: String,
    /// Addresses that must not answer from another MAC (`detectIPConflict`).
    pub conflicts: Vec<IpAddr>,
    /// (gateway, the pod address to ask from) pairs that must answer (`detectGateway`).
    pub gateways: Vec<(IpAddr, IpAddr)>,
    /// Addresses to announce once the pod is wired.
    pub announce: Vec<IpAddr>,
}

impl ProbePlan {
    fn checks_anything(&self) -> bool {
        !self.conflicts.is_empty() || !self.gateways.is_empty()
    }
}

/// Who answered a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub ip: IpAddr,
    pub mac: Mac,
}

/// What a check found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Another host answered for a pod address.
    Conflict(Answer),
    /// A gateway did not answer within [`MAX_CHECK`].
    GatewayUnreachable(IpAddr),
}

/// The probes for `ifname`, given its addresses and their gateways. The announcement comes with
/// either check (see [`Prober`] for why it is not free). A KubeVirt live-migration target shares
/// its address with the source pod until the cut-over, so it is neither checked for conflicts
/// nor announced (the announcement would steal the source's traffic early).
pub fn plan_probes(
    ifname: &str,
    addresses: &[(IpAddr, Option<IpAddr>)],
    detect_conflict: bool,
    detect_gateway: bool,
    migration_target: bool,
) -> ProbePlan {
    let pod_ips: Vec<IpAddr> = addresses.iter().map(|(ip, _)| *ip).collect();
    ProbePlan {
        ifname: ifname.to_owned(),
        conflicts: if detect_conflict && !migration_target {
            pod_ips.clone()
        } else {
            Vec::new()
        },
        gateways: if detect_gateway {
            addresses
                .iter()
                .filter_map(|(ip, gateway)| gateway.map(|gateway| (gateway, *ip)))
                .filter(|(gateway, ip)| gateway.is_ipv4() == ip.is_ipv4())
                .collect()
        } else {
            Vec::new()
        },
        announce: if (detect_conflict || detect_gateway) && !migration_target {
            pod_ips
        } else {
            Vec::new()
        },
    }
}

fn ethernet(destination: Mac, source: Mac, ethertype: u16) -> Vec<u8> {
    let mut frame = Vec::with_capacity(86);
    frame.extend_from_slice(&destination);
    frame.extend_from_slice(&source);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame
}

/// An ARP request from `sender` (0.0.0.0 for an RFC 5227 probe) for `target`; with
/// `sender == target` it is a gratuitous ARP.
pub fn arp_request(mac: Mac, sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut frame = ethernet(BROADCAST, mac, ETHERTYPE_ARP);
    frame.extend_from_slice(&1_u16.to_be_bytes()); // Ethernet
    frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    frame.extend_from_slice(&[6, 4]);
    frame.extend_from_slice(&ARP_REQUEST.to_be_bytes());
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&sender.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&target.octets());
    frame
}

fn solicited_node(target: Ipv6Addr) -> Ipv6Addr {
    let [.., a, b, c] = target.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(a),
        u16::from_be_bytes([b, c]),
    )
}

fn multicast_mac(group: Ipv6Addr) -> Mac {
    let [.., a, b, c, d] = group.octets();
    [0x33, 0x33, a, b, c, d]
}

/// An IPv6 packet carrying one ICMPv6 message, with its checksum.
fn icmpv6(mac: Mac, source: Ipv6Addr, destination: Ipv6Addr, mut message: Vec<u8>) -> Vec<u8> {
    let length = u16::try_from(message.len()).unwrap_or(u16::MAX);
    let mut pseudo = Vec::with_capacity(40 + message.len());
    pseudo.extend_from_slice(&source.octets());
    pseudo.extend_from_slice(&destination.octets());
    pseudo.extend_from_slice(&u32::from(length).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, ICMPV6]);
    pseudo.extend_from_slice(&message);
    message[2..4].copy_from_slice(&internet_checksum(&pseudo).to_be_bytes());
    let mut frame = ethernet(multicast_mac(destination), mac, ETHERTYPE_IPV6);
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(&[ICMPV6, 255]);
    frame.extend_from_slice(&source.octets());
    frame.extend_from_slice(&destination.octets());
    frame.extend_from_slice(&message);
    frame
}

fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

/// A neighbour solicitation for `target`: from :: without a link-layer option (DAD), or from
/// `source` with ours (resolution).
pub fn neighbour_solicitation(mac: Mac, source: Option<Ipv6Addr>, target: Ipv6Addr) -> Vec<u8> {
    let mut message = vec![NEIGHBOUR_SOLICITATION, 0, 0, 0, 0, 0, 0, 0];
    message.extend_from_slice(&target.octets());
    if source.is_some() {
        message.extend_from_slice(&[OPTION_SOURCE_LINK_ADDRESS, 1]);
        message.extend_from_slice(&mac);
    }
    icmpv6(
        mac,
        source.unwrap_or(Ipv6Addr::UNSPECIFIED),
        solicited_node(target),
        message,
    )
}

/// An unsolicited neighbour advertisement of `address` to all nodes, overriding caches.
pub fn unsolicited_advertisement(mac: Mac, address: Ipv6Addr) -> Vec<u8> {
    let mut message = vec![NEIGHBOUR_ADVERTISEMENT, 0, 0, 0, NA_OVERRIDE, 0, 0, 0];
    message.extend_from_slice(&address.octets());
    message.extend_from_slice(&[OPTION_TARGET_LINK_ADDRESS, 1]);
    message.extend_from_slice(&mac);
    icmpv6(
        mac,
        address,
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
        message,
    )
}

/// The frame that asks who holds `target`: a probe from the unspecified address, or a
/// resolution request from `source`.
fn question(mac: Mac, source: Option<IpAddr>, target: IpAddr) -> Vec<u8> {
    match (target, source) {
        (IpAddr::V4(target), Some(IpAddr::V4(source))) => arp_request(mac, source, target),
        (IpAddr::V4(target), _) => arp_request(mac, Ipv4Addr::UNSPECIFIED, target),
        (IpAddr::V6(target), Some(IpAddr::V6(source))) => {
            neighbour_solicitation(mac, Some(source), target)
        }
        (IpAddr::V6(target), _) => neighbour_solicitation(mac, None, target),
    }
}

fn announcement(mac: Mac, address: IpAddr) -> Vec<u8> {
    match address {
        IpAddr::V4(address) => arp_request(mac, address, address),
        IpAddr::V6(address) => unsolicited_advertisement(mac, address),
    }
}

/// If `frame` shows another host (not `own`) holding one of `wanted`: an ARP packet whose
/// sender is that address, or a neighbour advertisement for it.
pub fn answer_from(frame: &[u8], own: Mac, wanted: &[IpAddr]) -> Option<Answer> {
    let source: Mac = frame.get(6..12)?.try_into().ok()?;
    if source == own {
        return None;
    }
    let ethertype = u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?);
    let body = &frame[ETHERNET_HEADER..];
    let (ip, mac) = match ethertype {
        ETHERTYPE_ARP if body.get(2..4)? == ETHERTYPE_IPV4.to_be_bytes() => {
            let mac: Mac = body.get(8..14)?.try_into().ok()?;
            let ip: [u8; 4] = body.get(14..18)?.try_into().ok()?;
            (IpAddr::from(ip), mac)
        }
        ETHERTYPE_IPV6 if *body.get(6)? == ICMPV6 => {
            let icmp = body.get(IPV6_HEADER..)?;
            if *icmp.first()? != NEIGHBOUR_ADVERTISEMENT {
                return None;
            }
            let target: [u8; 16] = icmp.get(8..24)?.try_into().ok()?;
            (IpAddr::from(target), source)
        }
        _ => return None,
    };
    (wanted.contains(&ip) && !ip.is_unspecified()).then_some(Answer { ip, mac })
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot probe the underlay from {ifname}: {what}: {source}")]
    Io {
        ifname: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("pod interface {0:?} has no link-layer address to probe from")]
    NoSuchInterface(String),
    #[error(transparent)]
    Netns(#[from] NetlinkError),
}

/// An `AF_PACKET` socket bound to one interface of the netns it was opened in.
struct PacketSocket {
    fd: OwnedFd,
    mac: Mac,
    ifname: String,
}

impl PacketSocket {
    /// Must run on a thread inside the pod netns.
    fn open(ifname: &str) -> Result<Self, ProbeError> {
        let io = |what| {
            move |errno: Errno| ProbeError::Io {
                ifname: ifname.to_owned(),
                what,
                source: io::Error::from(errno),
            }
        };
        let link: LinkAddr = nix::ifaddrs::getifaddrs()
            .map_err(io("listing interfaces"))?
            .filter(|interface| interface.interface_name == ifname)
            .find_map(|interface| interface.address.as_ref().and_then(link_address))
            .ok_or_else(|| ProbeError::NoSuchInterface(ifname.to_owned()))?;
        let mac = link
            .addr()
            .ok_or_else(|| ProbeError::NoSuchInterface(ifname.to_owned()))?;
        let fd = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::EthAll,
        )
        .map_err(io("opening a packet socket (needs CAP_NET_RAW)"))?;
        bind(fd.as_raw_fd(), &link).map_err(io("binding the packet socket"))?;
        Ok(Self {
            fd,
            mac,
            ifname: ifname.to_owned(),
        })
    }

    fn send(&self, frame: &[u8]) -> Result<(), ProbeError> {
        send(self.fd.as_raw_fd(), frame, MsgFlags::empty())
            .map(drop)
            .map_err(|errno| self.error("sending", errno))
    }

    fn error(&self, what: &'static str, errno: Errno) -> ProbeError {
        ProbeError::Io {
            ifname: self.ifname.clone(),
            what,
            source: io::Error::from(errno),
        }
    }

    /// Asks who holds each of `targets` (from `source` per target, or as a probe) up to
    /// [`TRIES`] times, and returns the first answer, or `None` after [`MAX_CHECK`].
    fn ask(&self, questions: &[(IpAddr, Option<IpAddr>)]) -> Result<Option<Answer>, ProbeError> {
        let wanted: Vec<IpAddr> = questions.iter().map(|(target, _)| *target).collect();
        let mut buffer = [0_u8; 1514];
        for _ in 0..TRIES {
            for (target, source) in questions {
                self.send(&question(self.mac, *source, *target))?;
            }
            let deadline = Instant::now() + ROUND;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                let left = TimeVal::new(0, micros(left.max(Duration::from_micros(1))));
                setsockopt(&self.fd, sockopt::ReceiveTimeout, &left)
                    .map_err(|errno| self.error("setting the receive timeout", errno))?;
                match recv(self.fd.as_raw_fd(), &mut buffer, MsgFlags::empty()) {
                    Ok(length) => {
                        if let Some(answer) = answer_from(&buffer[..length], self.mac, &wanted) {
                            return Ok(Some(answer));
                        }
                    }
                    Err(Errno::EAGAIN | Errno::EINTR) => {}
                    Err(errno) => return Err(self.error("receiving", errno)),
                }
            }
        }
        Ok(None)
    }
}

/// Microseconds as `suseconds_t`; a round is far below a second.
fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

fn link_address(storage: &SockaddrStorage) -> Option<LinkAddr> {
    storage.as_link_addr().cloned()
}

/// The probes of one ADD on one packet socket: closing an `AF_PACKET` socket waits for an RCU
/// grace period (15-25 ms), so the checks and the announcement share it, and ADD opens none
/// unless a probe is asked for.
pub struct Prober {
    socket: PacketSocket,
    plan: ProbePlan,
}

impl Prober {
    /// Opens the socket on `plan.ifname` inside the pod netns; `None` when the plan does nothing.
    pub fn open(netns: &Path, plan: ProbePlan) -> Result<Option<Self>, ProbeError> {
        if !plan.checks_anything() && plan.announce.is_empty() {
            return Ok(None);
        }
        let ifname = plan.ifname.clone();
        let socket = in_netns(netns, move || PacketSocket::open(&ifname))??;
        Ok(Some(Self { socket, plan }))
    }

    /// Conflicts first (a conflicting host must not be taught the address by a gateway
    /// request), then gateways.
    pub fn check(&self) -> Result<Option<Finding>, ProbeError> {
        let probes: Vec<(IpAddr, Option<IpAddr>)> =
            self.plan.conflicts.iter().map(|ip| (*ip, None)).collect();
        if !probes.is_empty()
            && let Some(answer) = self.socket.ask(&probes)?
        {
            return Ok(Some(Finding::Conflict(answer)));
        }
        for (gateway, source) in &self.plan.gateways {
            if self.socket.ask(&[(*gateway, Some(*source))])?.is_none() {
                return Ok(Some(Finding::GatewayUnreachable(*gateway)));
            }
        }
        Ok(None)
    }

    /// Announces the pod's addresses (once the pod is wired).
    pub fn announce(&self) -> Result<(), ProbeError> {
        self.plan
            .announce
            .iter()
            .try_for_each(|address| self.socket.send(&announcement(self.socket.mac, *address)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];
    const OTHER: Mac = [0x02, 0, 0, 0, 0, 0x02];

    fn ip(ip: &str) -> IpAddr {
        ip.parse().expect("an address")
    }

    #[test]
    fn probes_follow_the_flags_and_spare_migration_targets() {
        let addresses = [
            (ip("10.6.153.101"), Some(ip("10.6.0.1"))),
            (ip("fd00:6::65"), Some(ip("fd00:6::1"))),
        ];
        let all = plan_probes("eth0", &addresses, true, true, false);
        assert_eq!(all.conflicts, [ip("10.6.153.101"), ip("fd00:6::65")]);
        assert_eq!(
            all.gateways,
            [
                (ip("10.6.0.1"), ip("10.6.153.101")),
                (ip("fd00:6::1"), ip("fd00:6::65"))
            ]
        );
        assert_eq!(all.announce, all.conflicts);
        let none = plan_probes("eth0", &addresses, false, false, false);
        assert!(!none.checks_anything() && none.announce.is_empty());
        let gateway_only = plan_probes("eth0", &addresses, false, true, false);
        assert!(gateway_only.conflicts.is_empty());
        assert_eq!(gateway_only.announce.len(), 2);
        let target = plan_probes("eth0", &addresses, true, true, true);
        assert!(target.conflicts.is_empty() && target.announce.is_empty());
        assert_eq!(target.gateways.len(), 2, "the gateway is still checked");
    }

    #[test]
    fn arp_probe_and_gratuitous_arp_layout() {
        let probe = arp_request(MAC, Ipv4Addr::UNSPECIFIED, Ipv4Addr::new(10, 6, 153, 101));
        assert_eq!(probe.len(), 42);
        assert_eq!(&probe[..6], &BROADCAST);
        assert_eq!(&probe[12..14], &[0x08, 0x06]);
        assert_eq!(&probe[20..22], &[0, 1], "request");
        assert_eq!(&probe[28..32], &[0, 0, 0, 0], "sender 0.0.0.0");
        assert_eq!(&probe[38..42], &[10, 6, 153, 101]);
        // Our own probe is never an answer; another host's ARP from the address is.
        assert_eq!(answer_from(&probe, MAC, &[ip("10.6.153.101")]), None);
        let garp = announcement(OTHER, ip("10.6.153.101"));
        assert_eq!(
            answer_from(&garp, MAC, &[ip("10.6.153.101")]),
            Some(Answer {
                ip: ip("10.6.153.101"),
                mac: OTHER
            })
        );
        // A probe from 0.0.0.0 (someone else's DAD) says nothing about who holds the address.
        let their_probe = arp_request(OTHER, Ipv4Addr::UNSPECIFIED, Ipv4Addr::new(10, 6, 153, 101));
        assert_eq!(answer_from(&their_probe, MAC, &[ip("10.6.153.101")]), None);
    }

    #[test]
    fn neighbour_discovery_layout_and_checksum() {
        let target: Ipv6Addr = "fd00:6::65".parse().expect("an address");
        let dad = neighbour_solicitation(MAC, None, target);
        assert_eq!(&dad[..6], &[0x33, 0x33, 0xff, 0, 0, 0x65]);
        assert_eq!(
            dad.len(),
            ETHERNET_HEADER + IPV6_HEADER + 24,
            "no link-layer option"
        );
        assert_eq!(dad[ETHERNET_HEADER + 7], 255, "hop limit");
        // The checksum over the pseudo-header and the message folds to zero.
        let icmp = &dad[ETHERNET_HEADER + IPV6_HEADER..];
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&Ipv6Addr::UNSPECIFIED.octets());
        pseudo.extend_from_slice(&solicited_node(target).octets());
        pseudo.extend_from_slice(&24_u32.to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, ICMPV6]);
        pseudo.extend_from_slice(icmp);
        assert_eq!(internet_checksum(&pseudo), 0);
        let resolve = neighbour_solicitation(MAC, Some(target), "fd00:6::1".parse().expect("ip"));
        assert_eq!(resolve.len(), ETHERNET_HEADER + IPV6_HEADER + 32);

        let advertisement = unsolicited_advertisement(OTHER, target);
        assert_eq!(&advertisement[..6], &[0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(
            answer_from(&advertisement, MAC, &[IpAddr::V6(target)]),
            Some(Answer {
                ip: IpAddr::V6(target),
                mac: OTHER
            })
        );
        assert_eq!(answer_from(&dad, OTHER, &[IpAddr::V6(target)]), None);
        assert_eq!(answer_from(&advertisement, MAC, &[ip("fd00:6::1")]), None);
        assert_eq!(answer_from(&[0; 10], MAC, &[ip("fd00:6::1")]), None);
    }
}
