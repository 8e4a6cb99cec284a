//! A Subnet's addresses: the CIDR, its gateway, and the effective (allocatable) set.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use super::error::IpamError;
use super::range::{IpFamily, IpRange, address_value};
use super::set::IpSet;

/// The validated addressing of one Subnet.
///
/// The *effective* set is what pools may hand out:
/// `ips − excludeIPs − gateway − network address − (IPv4) broadcast address`, where an empty
/// `ips` means the whole CIDR. Point-to-point prefixes (IPv4 /31 and /32, IPv6 /127 and /128)
/// have no network or broadcast address to reserve (RFC 3021, RFC 6164).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetAddresses {
    cidr: IpNet,
    gateway: IpAddr,
    ips: IpSet,
    excluded: IpSet,
    effective: IpSet,
}

/// Why an address of a Subnet may not be handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotAllocatable {
    /// The address is outside the CIDR (or of the other family).
    OutsideCidr,
    /// The address is the Subnet's gateway.
    Gateway,
    /// The address is the network or broadcast address of the CIDR.
    NetworkOrBroadcast,
    /// The address is listed in `excludeIPs`.
    Excluded,
    /// `ips` is set and does not list the address.
    NotInIps,
}

impl fmt::Display for NotAllocatable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::OutsideCidr => "it is outside the subnet",
            Self::Gateway => "it is the gateway",
            Self::NetworkOrBroadcast => "it is the network or broadcast address",
            Self::Excluded => "it is listed in excludeIPs",
            Self::NotInIps => "it is not listed in ips",
        })
    }
}

impl SubnetAddresses {
    /// Validates a Subnet spec and computes its effective set.
    ///
    /// `ips` and `exclude_ips` hold items such as `10.6.153.100-10.6.153.255` or `10.6.0.7`; every
    /// item must be of the CIDR's family and inside it. `gateway` defaults to
    /// [`default_gateway`] and must be inside the CIDR.
    pub fn parse<S: AsRef<str>>(
        cidr: IpNet,
        gateway: Option<IpAddr>,
        ips: &[S],
        exclude_ips: &[S],
    ) -> Result<Self, IpamError> {
        if cidr.trunc() != cidr {
            return Err(IpamError::CidrHostBits {
                cidr,
                network: cidr.trunc(),
            });
        }
        let whole = IpSet::from(cidr);
        let ips = parse_inside(cidr, &whole, ips)?;
        let excluded = parse_inside(cidr, &whole, exclude_ips)?;
        let gateway = match gateway {
            Some(gateway) if whole.contains(gateway) => gateway,
            Some(gateway) => {
                return Err(IpamError::GatewayOutsideSubnet {
                    gateway,
                    cidr,
                    default: default_gateway(cidr),
                });
            }
            None => default_gateway(cidr),
        };
        let candidates = if ips.is_empty() { &whole } else { &ips };
        let never_allocatable = excluded
            .union(&IpSet::from(IpRange::single(gateway)))
            .union(&reserved_addresses(cidr));
        let effective = candidates.subtract(&never_allocatable);
        Ok(Self {
            cidr,
            gateway,
            ips,
            excluded,
            effective,
        })
    }

    /// The CIDR, e.g. `10.6.0.0/16`.
    pub fn cidr(&self) -> IpNet {
        self.cidr
    }

    /// The family of the CIDR.
    pub fn family(&self) -> IpFamily {
        IpFamily::of(self.cidr.network())
    }

    /// The gateway (explicit, or the default first usable address).
    pub fn gateway(&self) -> IpAddr {
        self.gateway
    }

    /// The configured `ips`, merged and sorted (empty means "the whole CIDR").
    pub fn ips(&self) -> &IpSet {
        &self.ips
    }

    /// The configured `excludeIPs`, merged and sorted.
    pub fn excluded(&self) -> &IpSet {
        &self.excluded
    }

    /// The addresses pools may hand out.
    pub fn effective(&self) -> &IpSet {
        &self.effective
    }

    /// Why `address` may not be handed out, or `None` if it is in the effective set.
    pub fn why_not_allocatable(&self, address: IpAddr) -> Option<NotAllocatable> {
        if self.effective.contains(address) {
            None
        } else if !self.cidr.contains(&address) {
            Some(NotAllocatable::OutsideCidr)
        } else if address == self.gateway {
            Some(NotAllocatable::Gateway)
        } else if reserved_addresses(self.cidr).contains(address) {
            Some(NotAllocatable::NetworkOrBroadcast)
        } else if self.excluded.contains(address) {
            Some(NotAllocatable::Excluded)
        } else {
            Some(NotAllocatable::NotInIps)
        }
    }
}

/// Parses spec items and checks each lies in the CIDR, so the error can quote the item as written.
fn parse_inside<S: AsRef<str>>(
    cidr: IpNet,
    whole: &IpSet,
    items: &[S],
) -> Result<IpSet, IpamError> {
    let family = IpFamily::of(cidr.network());
    items
        .iter()
        .map(|item| {
            let text = item.as_ref();
            let range: IpRange = text.parse()?;
            if range.family() != family {
                Err(IpamError::FamilyMismatch {
                    value: text.to_string(),
                    value_family: range.family(),
                    cidr,
                })
            } else if !IpSet::from(range).is_subset(whole) {
                Err(IpamError::OutsideSubnet {
                    value: text.to_string(),
                    cidr,
                })
            } else {
                Ok(range)
            }
        })
        .collect()
}

/// Whether the prefix is long enough to be point-to-point, leaving no network or broadcast
/// address to reserve (IPv4 /31 and /32, IPv6 /127 and /128).
fn is_point_to_point(cidr: IpNet) -> bool {
    cidr.max_prefix_len() - cidr.prefix_len() <= 1
}

/// The network address and, for IPv4, the broadcast address; nothing for point-to-point prefixes.
pub fn reserved_addresses(cidr: IpNet) -> IpSet {
    if is_point_to_point(cidr) {
        return IpSet::new();
    }
    match cidr {
        IpNet::V4(_) => [cidr.network(), cidr.broadcast()].into_iter().collect(),
        IpNet::V6(_) => IpSet::from(IpRange::single(cidr.network())),
    }
}

/// The first usable address of the CIDR: network + 1, or the first address of a point-to-point
/// prefix (for a /32 or /128 that is the only address, leaving nothing to allocate).
pub fn default_gateway(cidr: IpNet) -> IpAddr {
    let network = cidr.trunc().network();
    let offset = u128::from(!is_point_to_point(cidr));
    IpFamily::of(network).address(address_value(network) + offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> IpNet {
        text.parse().expect("test cidr")
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    const NONE: &[&str] = &[];

    #[test]
    fn example_subnet_has_156_addresses() {
        let subnet = SubnetAddresses::parse(
            cidr("10.6.0.0/16"),
            Some(ip("10.6.0.1")),
            &["10.6.153.100-10.6.153.255"],
            NONE,
        )
        .expect("example subnet");
        assert_eq!(subnet.effective().len(), 156);
        assert_eq!(
            subnet.effective().to_range_strings(),
            ["10.6.153.100-10.6.153.255"]
        );
        assert_eq!(subnet.family(), IpFamily::V4);
    }

    #[test]
    fn effective_set_removes_excludes_gateway_network_and_broadcast() {
        let subnet =
            SubnetAddresses::parse(cidr("10.0.0.0/24"), None, NONE, &["10.0.0.10-10.0.0.19"])
                .expect("valid");
        assert_eq!(subnet.gateway(), ip("10.0.0.1"));
        assert_eq!(
            subnet.effective().to_range_strings(),
            ["10.0.0.2-10.0.0.9", "10.0.0.20-10.0.0.254"]
        );
        assert_eq!(
            subnet.why_not_allocatable(ip("10.0.0.1")),
            Some(NotAllocatable::Gateway)
        );
        assert_eq!(
            subnet.why_not_allocatable(ip("10.0.0.0")),
            Some(NotAllocatable::NetworkOrBroadcast)
        );
        assert_eq!(
            subnet.why_not_allocatable(ip("10.0.0.255")),
            Some(NotAllocatable::NetworkOrBroadcast)
        );
        assert_eq!(
            subnet.why_not_allocatable(ip("10.0.0.12")),
            Some(NotAllocatable::Excluded)
        );
        assert_eq!(
            subnet.why_not_allocatable(ip("10.0.1.1")),
            Some(NotAllocatable::OutsideCidr)
        );
        assert_eq!(
            subnet.why_not_allocatable(ip("::1")),
            Some(NotAllocatable::OutsideCidr)
        );
        assert_eq!(subnet.why_not_allocatable(ip("10.0.0.2")), None);
    }

    #[test]
    fn gateway_inside_ips_is_not_allocatable() {
        let subnet = SubnetAddresses::parse(
            cidr("10.0.0.0/24"),
            Some(ip("10.0.0.5")),
            &["10.0.0.1-10.0.0.9", "10.0.0.3-10.0.0.4"],
            NONE,
        )
        .expect("valid");
        assert_eq!(
            subnet.effective().to_range_strings(),
            ["10.0.0.1-10.0.0.4", "10.0.0.6-10.0.0.9"]
        );
        assert_eq!(subnet.ips().to_range_strings(), ["10.0.0.1-10.0.0.9"]);
        assert_eq!(
            subnet.why_not_allocatable(ip("10.0.0.100")),
            Some(NotAllocatable::NotInIps)
        );
    }

    #[test]
    fn ipv6_reserves_network_but_has_no_broadcast() {
        let subnet = SubnetAddresses::parse(cidr("fd00::/120"), None, NONE, NONE).expect("valid");
        assert_eq!(subnet.gateway(), ip("fd00::1"));
        assert_eq!(subnet.effective().to_range_strings(), ["fd00::2-fd00::ff"]);
        assert_eq!(subnet.family(), IpFamily::V6);
    }

    #[test]
    fn point_to_point_and_host_prefixes() {
        let host = SubnetAddresses::parse(cidr("10.0.0.7/32"), None, NONE, NONE).expect("valid");
        assert_eq!(host.gateway(), ip("10.0.0.7"));
        assert!(host.effective().is_empty());

        let p2p = SubnetAddresses::parse(cidr("10.0.0.6/31"), None, NONE, NONE).expect("valid");
        assert_eq!(p2p.gateway(), ip("10.0.0.6"));
        assert_eq!(p2p.effective().to_range_strings(), ["10.0.0.7"]);

        let p2p6 = SubnetAddresses::parse(cidr("fd00::/127"), None, NONE, NONE).expect("valid");
        assert_eq!(p2p6.effective().to_range_strings(), ["fd00::1"]);

        let host6 = SubnetAddresses::parse(cidr("fd00::9/128"), None, NONE, NONE).expect("valid");
        assert!(host6.effective().is_empty());

        let p2p_gateway_last =
            SubnetAddresses::parse(cidr("10.0.0.6/31"), Some(ip("10.0.0.7")), NONE, NONE)
                .expect("valid");
        assert_eq!(
            p2p_gateway_last.effective().to_range_strings(),
            ["10.0.0.6"]
        );
    }

    #[test]
    fn rejects_items_outside_or_of_the_wrong_family() {
        let error = SubnetAddresses::parse(cidr("10.6.0.0/16"), None, &["10.7.0.1"], NONE)
            .expect_err("outside");
        assert_eq!(
            error.to_string(),
            "\"10.7.0.1\" is outside subnet 10.6.0.0/16: use an address inside the subnet"
        );
        let error =
            SubnetAddresses::parse(cidr("10.6.0.0/16"), None, &["10.6.255.250-10.7.0.5"], NONE)
                .expect_err("straddles the edge");
        assert!(matches!(error, IpamError::OutsideSubnet { .. }), "{error}");
        let error = SubnetAddresses::parse(cidr("10.6.0.0/16"), None, NONE, &["fd00::1"])
            .expect_err("family");
        assert_eq!(
            error.to_string(),
            "\"fd00::1\" is an IPv6 address but subnet 10.6.0.0/16 is IPv4: list only IPv4 addresses in this Subnet"
        );
        let error = SubnetAddresses::parse(cidr("10.6.0.0/16"), Some(ip("10.5.0.1")), NONE, NONE)
            .expect_err("gateway");
        assert_eq!(
            error.to_string(),
            "gateway 10.5.0.1 is outside subnet 10.6.0.0/16: set a gateway inside the subnet, or omit it to use 10.6.0.1"
        );
        let error =
            SubnetAddresses::parse(cidr("10.6.1.0/16"), None, NONE, NONE).expect_err("host bits");
        assert_eq!(
            error.to_string(),
            "subnet 10.6.1.0/16 has host bits set: write it as 10.6.0.0/16"
        );
        let error = SubnetAddresses::parse(cidr("10.6.0.0/16"), None, &["10.6.0.9-10.6.0.1"], NONE)
            .expect_err("reversed");
        assert!(matches!(error, IpamError::ReversedRange { .. }), "{error}");
    }
}
