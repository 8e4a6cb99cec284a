//! Sets of addresses stored as sorted, disjoint, merged ranges.
//!
//! Every operation costs O(number of ranges), never O(number of addresses), so a /16 or an IPv6
//! /64 is as cheap to handle as a handful of addresses.

use std::fmt;
use std::net::IpAddr;

use super::error::IpamError;
use super::range::{IpFamily, IpRange, address_value};

/// A set of addresses of either family, kept as sorted, disjoint, non-adjacent ranges.
///
/// Because the representation is canonical, two sets are equal exactly when they hold the same
/// addresses, and [`IpSet::to_range_strings`] always yields the same list for the same set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpSet {
    ranges: Vec<IpRange>,
}

impl IpSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a list such as `["10.6.153.100-10.6.153.255", "10.6.0.7"]`; overlaps are merged.
    pub fn parse_ranges<S: AsRef<str>>(items: &[S]) -> Result<Self, IpamError> {
        items
            .iter()
            .map(|item| item.as_ref().parse::<IpRange>())
            .collect()
    }

    /// The ranges, sorted (IPv4 first), disjoint and merged.
    pub fn ranges(&self) -> &[IpRange] {
        &self.ranges
    }

    /// Whether the set holds no address.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// How many addresses the set holds (saturating at `u128::MAX`).
    pub fn len(&self) -> u128 {
        self.ranges.iter().fold(0u128, |total, range| {
            total.saturating_add(range.address_count())
        })
    }

    /// Whether `address` is in the set (binary search).
    pub fn contains(&self, address: IpAddr) -> bool {
        let probe = IpRange::single(address);
        let index = self
            .ranges
            .partition_point(|range| range.ends_before(&probe));
        self.ranges
            .get(index)
            .is_some_and(|range| range.contains(address))
    }

    /// Whether every address of `self` is also in `other`.
    pub fn is_subset(&self, other: &IpSet) -> bool {
        self.subtract(other).is_empty()
    }

    /// Addresses in `self` or `other`.
    pub fn union(&self, other: &IpSet) -> IpSet {
        self.ranges.iter().chain(&other.ranges).copied().collect()
    }

    /// Addresses in `self` but not in `other`.
    pub fn subtract(&self, other: &IpSet) -> IpSet {
        let mut result = Vec::with_capacity(self.ranges.len());
        let removals = &other.ranges;
        // `skip` only moves past removals that end before the current range, because a removal
        // that reaches past this range may still cut the next one.
        let mut skip = 0;
        for range in &self.ranges {
            while removals
                .get(skip)
                .is_some_and(|removal| removal.ends_before(range))
            {
                skip += 1;
            }
            // `cursor` is the lowest value of `range` not yet emitted or removed.
            let mut cursor = Some(range.first_value());
            for removal in removals[skip..]
                .iter()
                .take_while(|removal| !range.ends_before(removal))
            {
                let Some(start) = cursor else { break };
                if removal.first_value() > start {
                    result.push(IpRange::from_values(
                        range.family(),
                        start,
                        removal.first_value() - 1,
                    ));
                }
                cursor = removal
                    .last_value()
                    .checked_add(1)
                    .filter(|next| *next <= range.last_value());
            }
            if let Some(start) = cursor {
                result.push(IpRange::from_values(
                    range.family(),
                    start,
                    range.last_value(),
                ));
            }
        }
        IpSet { ranges: result }
    }

    /// Addresses in both `self` and `other`.
    pub fn intersect(&self, other: &IpSet) -> IpSet {
        let mut result = Vec::new();
        let (mut left, mut right) = (0, 0);
        while let (Some(a), Some(b)) = (self.ranges.get(left), other.ranges.get(right)) {
            if a.family() == b.family() {
                let first = a.first_value().max(b.first_value());
                let last = a.last_value().min(b.last_value());
                if first <= last {
                    result.push(IpRange::from_values(a.family(), first, last));
                }
            }
            // Advance whichever range ends first; the other may still overlap the next one.
            if (a.family(), a.last_value()) <= (b.family(), b.last_value()) {
                left += 1;
            } else {
                right += 1;
            }
        }
        IpSet { ranges: result }
    }

    /// The `n`th address in ascending order (0-based), if the set has that many.
    pub fn nth(&self, mut n: u128) -> Option<IpAddr> {
        for range in &self.ranges {
            if n < range.address_count() {
                return Some(range.family().address(range.first_value() + n));
            }
            n -= range.address_count();
        }
        None
    }

    /// All addresses in ascending order (lazily; never collect this for a large subnet).
    pub fn iter(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ranges.iter().flat_map(|range| {
            (range.first_value()..=range.last_value()).map(|value| range.family().address(value))
        })
    }

    /// The first address of the set at or after `address`, wrapping around to the lowest address
    /// when nothing follows it. `None` only for an empty set.
    pub fn next_cyclic_from(&self, address: IpAddr) -> Option<IpAddr> {
        let probe = IpRange::single(address);
        let index = self
            .ranges
            .partition_point(|range| range.ends_before(&probe));
        match self.ranges.get(index) {
            Some(range) if range.contains(address) => Some(address),
            Some(range) => Some(range.start()),
            None => self.ranges.first().map(IpRange::start),
        }
    }

    /// Splits off the `count` lowest addresses: returns `(lowest count addresses, the rest)`.
    /// If the set is smaller than `count`, the first part is the whole set.
    pub fn split_first(&self, count: u128) -> (IpSet, IpSet) {
        let mut taken = Vec::new();
        let mut wanted = count;
        let mut ranges = self.ranges.iter();
        let mut rest = Vec::new();
        for range in ranges.by_ref() {
            if wanted == 0 {
                rest.push(*range);
                break;
            }
            if range.address_count() <= wanted {
                taken.push(*range);
                wanted -= range.address_count();
            } else {
                let boundary = range.first_value() + wanted;
                taken.push(IpRange::from_values(
                    range.family(),
                    range.first_value(),
                    boundary - 1,
                ));
                rest.push(IpRange::from_values(
                    range.family(),
                    boundary,
                    range.last_value(),
                ));
                wanted = 0;
                break;
            }
        }
        debug_assert!(wanted == 0 || rest.is_empty());
        rest.extend(ranges);
        (IpSet { ranges: taken }, IpSet { ranges: rest })
    }

    /// The canonical list of range strings, sorted ascending and merged, e.g.
    /// `["10.6.0.7", "10.6.153.100-10.6.153.255"]`; what spec lists are normalised to.
    pub fn to_range_strings(&self) -> Vec<String> {
        self.ranges.iter().map(IpRange::to_string).collect()
    }
}

impl FromIterator<IpRange> for IpSet {
    /// Sorts and merges overlapping or adjacent ranges.
    fn from_iter<I: IntoIterator<Item = IpRange>>(iter: I) -> Self {
        let mut sorted: Vec<IpRange> = iter.into_iter().collect();
        sorted.sort_unstable();
        let mut merged: Vec<IpRange> = Vec::with_capacity(sorted.len());
        for range in sorted {
            match merged.last_mut() {
                Some(previous)
                    if previous.family() == range.family()
                        && range.first_value() <= previous.last_value().saturating_add(1) =>
                {
                    let last = previous.last_value().max(range.last_value());
                    *previous = IpRange::from_values(range.family(), previous.first_value(), last);
                }
                _ => merged.push(range),
            }
        }
        IpSet { ranges: merged }
    }
}

impl FromIterator<IpAddr> for IpSet {
    fn from_iter<I: IntoIterator<Item = IpAddr>>(iter: I) -> Self {
        iter.into_iter().map(IpRange::single).collect()
    }
}

impl<'a> FromIterator<&'a IpSet> for IpSet {
    /// The union of all the sets.
    fn from_iter<I: IntoIterator<Item = &'a IpSet>>(iter: I) -> Self {
        iter.into_iter()
            .flat_map(|set| set.ranges.iter().copied())
            .collect()
    }
}

impl From<IpRange> for IpSet {
    fn from(range: IpRange) -> Self {
        IpSet {
            ranges: vec![range],
        }
    }
}

impl From<ipnet::IpNet> for IpSet {
    /// Every address of the CIDR, network and broadcast included.
    fn from(cidr: ipnet::IpNet) -> Self {
        let family = IpFamily::of(cidr.network());
        IpSet::from(IpRange::from_values(
            family,
            address_value(cidr.network()),
            address_value(cidr.broadcast()),
        ))
    }
}

impl fmt::Display for IpSet {
    /// Comma-separated canonical ranges, e.g. `10.6.0.1,10.6.153.100-10.6.153.255`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_range_strings().join(","))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    pub(crate) fn set(items: &[&str]) -> IpSet {
        IpSet::parse_ranges(items).expect("test ranges")
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    #[test]
    fn merges_overlapping_and_adjacent_ranges() {
        let merged = set(&[
            "10.0.0.10-10.0.0.20",
            "10.0.0.1",
            "10.0.0.15-10.0.0.30",
            "10.0.0.31",
            "10.0.0.2-10.0.0.3",
            "fd00::1-fd00::2",
            "fd00::3",
        ]);
        assert_eq!(
            merged.to_range_strings(),
            [
                "10.0.0.1-10.0.0.3",
                "10.0.0.10-10.0.0.31",
                "fd00::1-fd00::3"
            ]
        );
        assert_eq!(merged.len(), 3 + 22 + 3);
        assert_eq!(
            merged.to_string(),
            "10.0.0.1-10.0.0.3,10.0.0.10-10.0.0.31,fd00::1-fd00::3"
        );
    }

    #[test]
    fn does_not_merge_across_families() {
        let edge = set(&["255.255.255.255", "::"]);
        assert_eq!(edge.ranges().len(), 2);
        assert_eq!(edge.to_range_strings(), ["255.255.255.255", "::"]);
    }

    #[test]
    fn set_algebra() {
        let a = set(&["10.0.0.0-10.0.0.99"]);
        let b = set(&["10.0.0.50-10.0.0.149", "10.0.0.10"]);
        assert_eq!(a.union(&b).to_range_strings(), ["10.0.0.0-10.0.0.149"]);
        assert_eq!(
            a.subtract(&b).to_range_strings(),
            ["10.0.0.0-10.0.0.9", "10.0.0.11-10.0.0.49"]
        );
        assert_eq!(
            a.intersect(&b).to_range_strings(),
            ["10.0.0.10", "10.0.0.50-10.0.0.99"]
        );
        assert!(set(&["10.0.0.1-10.0.0.5"]).is_subset(&a));
        assert!(!b.is_subset(&a));
        assert!(IpSet::new().is_subset(&IpSet::new()));
    }

    #[test]
    fn subtract_handles_a_removal_spanning_several_ranges() {
        let a = set(&[
            "10.0.0.1-10.0.0.5",
            "10.0.0.10-10.0.0.15",
            "10.0.0.20-10.0.0.25",
        ]);
        let cut = set(&["10.0.0.3-10.0.0.12", "10.0.0.14", "10.0.0.25-10.0.0.40"]);
        assert_eq!(
            a.subtract(&cut).to_range_strings(),
            [
                "10.0.0.1-10.0.0.2",
                "10.0.0.13",
                "10.0.0.15",
                "10.0.0.20-10.0.0.24"
            ]
        );
    }

    #[test]
    fn subtract_at_the_top_of_the_address_space() {
        let top = set(&[
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fff0-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ]);
        let cut = set(&["ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"]);
        assert_eq!(top.subtract(&cut).len(), 15);
        let all_v4 = set(&["0.0.0.0-255.255.255.255"]);
        assert_eq!(
            all_v4.subtract(&set(&["255.255.255.255"])).len(),
            (1 << 32) - 1
        );
    }

    #[test]
    fn nth_iter_and_cyclic_search() {
        let s = set(&["10.0.0.1-10.0.0.2", "10.0.0.10", "fd00::5"]);
        assert_eq!(s.nth(0), Some(ip("10.0.0.1")));
        assert_eq!(s.nth(2), Some(ip("10.0.0.10")));
        assert_eq!(s.nth(3), Some(ip("fd00::5")));
        assert_eq!(s.nth(4), None);
        assert_eq!(
            s.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            ["10.0.0.1", "10.0.0.2", "10.0.0.10", "fd00::5"]
        );
        let v4 = set(&["10.0.0.1-10.0.0.2", "10.0.0.10"]);
        assert_eq!(v4.next_cyclic_from(ip("10.0.0.2")), Some(ip("10.0.0.2")));
        assert_eq!(v4.next_cyclic_from(ip("10.0.0.3")), Some(ip("10.0.0.10")));
        assert_eq!(v4.next_cyclic_from(ip("10.0.0.11")), Some(ip("10.0.0.1")));
        assert_eq!(v4.next_cyclic_from(ip("0.0.0.0")), Some(ip("10.0.0.1")));
        assert_eq!(IpSet::new().next_cyclic_from(ip("10.0.0.1")), None);
    }

    #[test]
    fn split_first_takes_lowest_addresses() {
        let s = set(&["10.0.0.1-10.0.0.4", "10.0.0.10-10.0.0.12"]);
        let (low, rest) = s.split_first(5);
        assert_eq!(low.to_range_strings(), ["10.0.0.1-10.0.0.4", "10.0.0.10"]);
        assert_eq!(rest.to_range_strings(), ["10.0.0.11-10.0.0.12"]);
        let (low, rest) = s.split_first(4);
        assert_eq!(low.to_range_strings(), ["10.0.0.1-10.0.0.4"]);
        assert_eq!(rest.to_range_strings(), ["10.0.0.10-10.0.0.12"]);
        let (low, rest) = s.split_first(0);
        assert!(low.is_empty());
        assert_eq!(rest, s);
        let (low, rest) = s.split_first(100);
        assert_eq!(low, s);
        assert!(rest.is_empty());
    }

    #[test]
    fn from_cidr_and_contains() {
        let cidr: ipnet::IpNet = "10.6.0.0/16".parse().expect("cidr");
        let whole = IpSet::from(cidr);
        assert_eq!(whole.len(), 65_536);
        assert!(whole.contains(ip("10.6.255.255")));
        assert!(!whole.contains(ip("10.7.0.0")));
        let v6: ipnet::IpNet = "fd00::/64".parse().expect("cidr");
        assert_eq!(IpSet::from(v6).len(), 1 << 64);
        let parse_error = IpSet::parse_ranges(&["10.0.0.1", "nope"]).expect_err("bad item");
        assert!(
            parse_error.to_string().contains("\"nope\""),
            "{parse_error}"
        );
    }

    /// A set over the 64 addresses 10.0.0.0..=10.0.0.63, described as a bitmask, for comparing
    /// the range algebra with plain `BTreeSet` algebra.
    fn small_set() -> impl Strategy<Value = IpSet> {
        any::<u64>().prop_map(|mask| {
            (0..64u32)
                .filter(|bit| mask & (1 << bit) != 0)
                .map(|bit| IpAddr::from([10, 0, 0, bit as u8]))
                .collect()
        })
    }

    fn model(set: &IpSet) -> BTreeSet<IpAddr> {
        set.iter().collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        #[test]
        fn algebra_matches_a_plain_set_model(a in small_set(), b in small_set(), n in 0u128..70) {
            let (ma, mb) = (model(&a), model(&b));
            prop_assert_eq!(model(&a.union(&b)), &ma | &mb);
            prop_assert_eq!(model(&a.subtract(&b)), &ma - &mb);
            prop_assert_eq!(model(&a.intersect(&b)), &ma & &mb);
            prop_assert_eq!(a.len(), ma.len() as u128);
            prop_assert_eq!(a.nth(n), ma.iter().nth(n as usize).copied());
            let (low, rest) = a.split_first(n);
            prop_assert_eq!(low.union(&rest), a.clone());
            prop_assert!(low.intersect(&rest).is_empty());
            prop_assert_eq!(low.len(), n.min(a.len()));
            for bit in 0..64u8 {
                let address = IpAddr::from([10, 0, 0, bit]);
                prop_assert_eq!(a.contains(address), ma.contains(&address));
                let expected = ma.range(address..).next().or(ma.iter().next()).copied();
                prop_assert_eq!(a.next_cyclic_from(address), expected);
            }
            // Canonical form: rebuilding from the strings gives the same ranges back.
            prop_assert_eq!(IpSet::parse_ranges(&a.to_range_strings()).expect("round trip"), a.clone());
            for pair in a.ranges().windows(2) {
                prop_assert!(pair[0].last_value() + 1 < pair[1].first_value(), "merged and sorted");
            }
        }
    }
}
