//! Inclusive address ranges for IPv4 and IPv6.
//!
//! Addresses are handled as `u128` values tagged with their family, so one code path serves both
//! families and range arithmetic never has to enumerate addresses.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use super::error::IpamError;

/// The IP family of an address, range or subnet.
///
/// IPv4 sorts before IPv6, which gives [`IpRange`] (and therefore every set) one total order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// The family of `address`.
    pub fn of(address: IpAddr) -> Self {
        match address {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    /// The family's annotation field name (`ipv4` / `ipv6`), used in messages and annotations.
    pub fn field_name(self) -> &'static str {
        match self {
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        }
    }

    /// Turns a numeric value back into an address of this family.
    ///
    /// Callers only pass values that came from an address of the same family, so an IPv4 value
    /// always fits in 32 bits and the narrowing cast cannot lose bits.
    pub(crate) fn address(self, value: u128) -> IpAddr {
        match self {
            Self::V4 => IpAddr::V4(Ipv4Addr::from(value as u32)),
            Self::V6 => IpAddr::V6(Ipv6Addr::from(value)),
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// The numeric value of an address (IPv4 addresses occupy the low 32 bits).
pub(crate) fn address_value(address: IpAddr) -> u128 {
    match address {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// An inclusive range of addresses of one family, `start..=end`, never empty.
///
/// Parses from and displays as `10.6.153.100-10.6.153.255`, or `10.6.0.7` for a single address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpRange {
    // Field order matters: the derived `Ord` sorts by family, then start, then end.
    family: IpFamily,
    first: u128,
    last: u128,
}

impl IpRange {
    /// The range `start..=end`; both ends must be of one family and `start <= end`.
    pub fn new(start: IpAddr, end: IpAddr) -> Result<Self, IpamError> {
        let value = format!("{start}-{end}");
        if IpFamily::of(start) != IpFamily::of(end) {
            return Err(IpamError::MixedFamilyRange { value });
        }
        if address_value(start) > address_value(end) {
            return Err(IpamError::ReversedRange {
                value,
                suggestion: format!("{end}-{start}"),
            });
        }
        Ok(Self::from_values(
            IpFamily::of(start),
            address_value(start),
            address_value(end),
        ))
    }

    /// The range holding only `address`.
    pub fn single(address: IpAddr) -> Self {
        let value = address_value(address);
        Self::from_values(IpFamily::of(address), value, value)
    }

    /// Builds a range from raw values the caller has already checked (`first <= last`, same family).
    pub(crate) fn from_values(family: IpFamily, first: u128, last: u128) -> Self {
        debug_assert!(first <= last, "an IpRange is never empty");
        Self {
            family,
            first,
            last,
        }
    }

    /// The family of both ends.
    pub fn family(&self) -> IpFamily {
        self.family
    }

    /// The first address.
    pub fn start(&self) -> IpAddr {
        self.family.address(self.first)
    }

    /// The last address (inclusive).
    pub fn end(&self) -> IpAddr {
        self.family.address(self.last)
    }

    /// How many addresses the range holds.
    ///
    /// Saturates at `u128::MAX` for the whole IPv6 space (2^128 does not fit in a `u128`).
    pub fn address_count(&self) -> u128 {
        (self.last - self.first).saturating_add(1)
    }

    /// Whether `address` lies in the range.
    pub fn contains(&self, address: IpAddr) -> bool {
        let value = address_value(address);
        IpFamily::of(address) == self.family && self.first <= value && value <= self.last
    }

    /// Whether `self` ends before `other` starts (families compare IPv4 first).
    pub(crate) fn ends_before(&self, other: &IpRange) -> bool {
        (self.family, self.last) < (other.family, other.first)
    }

    pub(crate) fn first_value(&self) -> u128 {
        self.first
    }

    pub(crate) fn last_value(&self) -> u128 {
        self.last
    }
}

impl FromStr for IpRange {
    type Err = IpamError;

    /// Parses `a.b.c.d`, `a.b.c.d-e.f.g.h` or their IPv6 forms; spaces around the parts are allowed.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || IpamError::InvalidRange {
            value: text.to_string(),
        };
        let parse_address = |part: &str| part.trim().parse::<IpAddr>().map_err(|_| invalid());
        match text.split_once('-') {
            Some((start, end)) => {
                let start = parse_address(start)?;
                let end = parse_address(end)?;
                Self::new(start, end).map_err(|error| match error {
                    // Report the text the user wrote, not our reformatting of it.
                    IpamError::MixedFamilyRange { .. } => IpamError::MixedFamilyRange {
                        value: text.to_string(),
                    },
                    IpamError::ReversedRange { suggestion, .. } => IpamError::ReversedRange {
                        value: text.to_string(),
                        suggestion,
                    },
                    other => other,
                })
            }
            None => Ok(Self::single(parse_address(text)?)),
        }
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.start())
        } else {
            write!(f, "{}-{}", self.start(), self.end())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    #[test]
    fn parses_and_displays_ranges_canonically() {
        for text in [
            "10.6.153.100-10.6.153.255",
            "10.6.0.7",
            "fd00::10-fd00::20",
            "fd00::1",
        ] {
            let range: IpRange = text.parse().expect("valid range");
            assert_eq!(range.to_string(), text);
        }
        let spaced: IpRange = " 10.0.0.1 - 10.0.0.3 ".parse().expect("spaces are trimmed");
        assert_eq!(spaced.to_string(), "10.0.0.1-10.0.0.3");
        let same_ends: IpRange = "10.0.0.1-10.0.0.1".parse().expect("single via range");
        assert_eq!(same_ends.to_string(), "10.0.0.1");
        let long_v6: IpRange = "fd00:0:0:0:0:0:0:1".parse().expect("uncompressed IPv6");
        assert_eq!(long_v6.to_string(), "fd00::1");
    }

    #[test]
    fn counts_addresses() {
        let range: IpRange = "10.6.153.100-10.6.153.255".parse().expect("valid");
        assert_eq!(range.address_count(), 156);
        assert_eq!(IpRange::single(ip("::1")).address_count(), 1);
        let everything =
            IpRange::new(ip("::"), ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")).expect("valid");
        assert_eq!(everything.address_count(), u128::MAX);
        let all_v4 = IpRange::new(ip("0.0.0.0"), ip("255.255.255.255")).expect("valid");
        assert_eq!(all_v4.address_count(), 1 << 32);
        assert_eq!(all_v4.end(), ip("255.255.255.255"));
    }

    #[test]
    fn rejects_bad_ranges_with_actionable_messages() {
        let error = "10.0.0.9-10.0.0.1"
            .parse::<IpRange>()
            .expect_err("reversed");
        assert_eq!(
            error.to_string(),
            "\"10.0.0.9-10.0.0.1\" starts after it ends: write the lower address first, e.g. 10.0.0.1-10.0.0.9"
        );
        let error = "10.0.0.1-fd00::1".parse::<IpRange>().expect_err("mixed");
        assert!(
            matches!(error, IpamError::MixedFamilyRange { .. }),
            "{error}"
        );
        assert!(
            error.to_string().contains("\"10.0.0.1-fd00::1\""),
            "{error}"
        );
        for bad in [
            "10.0.0.300",
            "10.0.0.1-",
            "",
            "10.0.0.0/24",
            "a-b",
            "10.0.0.1-10.0.0.2-10.0.0.3",
        ] {
            let error = bad.parse::<IpRange>().expect_err(bad);
            assert!(
                matches!(error, IpamError::InvalidRange { .. }),
                "{bad}: {error}"
            );
            assert!(
                error.to_string().contains("10.6.153.100-10.6.153.255"),
                "{error}"
            );
        }
    }

    #[test]
    fn contains_respects_family_and_bounds() {
        let range: IpRange = "10.0.0.1-10.0.0.3".parse().expect("valid");
        assert!(range.contains(ip("10.0.0.1")));
        assert!(range.contains(ip("10.0.0.3")));
        assert!(!range.contains(ip("10.0.0.4")));
        assert!(!range.contains(ip("::a00:1")), "same value, other family");
        assert_eq!(range.family(), IpFamily::V4);
    }

    #[test]
    fn orders_ipv4_before_ipv6() {
        let v4 = IpRange::single(ip("255.255.255.255"));
        let v6 = IpRange::single(ip("::"));
        assert!(v4 < v6);
        assert!(v4.ends_before(&v6));
        assert!(!v6.ends_before(&v4));
    }
}
