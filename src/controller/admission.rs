//! What the validating webhook decides about a Subnet (pure): the rules CEL in the CRD cannot
//! express, because they look at other Subnets or need arithmetic CEL lacks.
//!
//! A Subnet is rejected when:
//! - its addressing does not parse as the IPAM engine reads it (for example an IPv6 range that
//!   starts after it ends: CEL cannot order IPv6 addresses);
//! - its CIDR overlaps another Subnet's without being the same network (the two would disagree
//!   about the network), or it is the same network and the two hand out a common address (the
//!   ranges of Subnets on one L2 network must be disjoint: teams may share an underlay, never an
//!   address);
//! - another Subnet's IPPools still hold one of its addresses (offered or allocated), whatever
//!   that Subnet's spec says now: removing an address from a Subnet's `ips` does not take it
//!   from the pod that holds it, and its pool keeps it until it is released;
//! - it is a cluster default (`default: true`) of the same family as another default Subnet with
//!   the very same node and namespace selectors (both would claim the same pods; defaults with
//!   different selectors serve different pods and are allowed).
//!
//! An update that leaves the spec as it was is always allowed, so that labels, annotations and
//! finalizers of Subnets admitted before a rule existed can still change.
//!
//! Two Subnets created at the same moment are each reviewed without the other; the controller
//! therefore checks again before it writes any pool (see `subnet::reconcile`), one Subnet at a
//! time, and writes none for a Subnet whose addresses another Subnet's pools hold.

use ipnet::IpNet;
use kube::ResourceExt;

use super::pools::overlap_with_other_pools;
use crate::crd::{IpPool, Subnet};
use crate::store::parse::subnet_addresses;

/// Decides whether `candidate` (replacing `previous` on an update) may be stored, given every
/// other Subnet in the cluster (the candidate's own stored version may be among them and is
/// skipped by name) and every IPPool. `Err` carries the message the user sees.
pub fn review_subnet(
    candidate: &Subnet,
    previous: Option<&Subnet>,
    others: &[Subnet],
    pools: &[IpPool],
) -> Result<(), String> {
    if previous.is_some_and(|previous| previous.spec == candidate.spec) {
        return Ok(());
    }
    let name = candidate.name_any();
    let addresses = subnet_addresses(candidate).map_err(|error| error.to_string())?;
    let cidr = addresses.cidr();
    let others = others.iter().filter(|other| other.name_any() != name);
    for other in others {
        // A stored Subnet whose CIDR does not parse cannot overlap anything usable.
        let Ok(other_cidr) = other.spec.subnet.parse::<IpNet>() else {
            continue;
        };
        if cidr == other_cidr {
            let other_addresses = match subnet_addresses(other) {
                Ok(other_addresses) => other_addresses,
                // A stored Subnet the engine cannot read hands out nothing.
                Err(_) => continue,
            };
            let shared = addresses.effective().intersect(other_addresses.effective());
            if !shared.is_empty() {
                return Err(format!(
                    "Subnet {name:?} would hand out {} that Subnet {:?} on the same network \
                     {cidr} hands out too: two Subnets must not share addresses; leave them out \
                     of spec.ips here (or list them in spec.excludeIPs of one of the two)",
                    shared.to_range_strings().join(", "),
                    other.name_any(),
                ));
            }
        } else if overlaps(cidr, other_cidr) {
            return Err(format!(
                "spec.subnet {cidr} overlaps Subnet {:?} ({other_cidr}): two Subnets must not \
                 share addresses; choose a CIDR outside {other_cidr}, or add the addresses to \
                 Subnet {:?} instead",
                other.name_any(),
                other.name_any()
            ));
        }
        if candidate.spec.default
            && other.spec.default
            && cidr.network().is_ipv4() == other_cidr.network().is_ipv4()
            && candidate.spec.node_selector == other.spec.node_selector
            && candidate.spec.namespace_selector == other.spec.namespace_selector
        {
            return Err(format!(
                "Subnet {:?} is already the default {} Subnet for the same nodes and namespaces: \
                 set default: false here, or give the two Subnets different nodeSelector or \
                 namespaceSelector",
                other.name_any(),
                if cidr.network().is_ipv4() {
                    "IPv4"
                } else {
                    "IPv6"
                }
            ));
        }
    }
    match overlap_with_other_pools(candidate, pools) {
        Ok(None) => Ok(()),
        Ok(Some(overlap)) => Err(format!(
            "Subnet {name:?} would hand out {} that Subnet {:?} still holds in its IPPools \
             (allocated to pods, or not yet released from its pools): leave them out of \
             spec.ips here until Subnet {:?} has let them go",
            overlap.shared_ranges(),
            overlap.other,
            overlap.other,
        )),
        // A pool the engine cannot read: say which, rather than admit blindly.
        Err(error) => Err(format!("cannot check the existing IPPools: {error}")),
    }
}

/// The controller's own check of a stored Subnet, for one written while no webhook answered (the
/// webhook fails open): `subnet` is judged against the Subnets created before it (by creation
/// time, then name), which keep their pools; a conflicting newer one gets none.
pub fn review_against_older(subnet: &Subnet, all: &[Subnet]) -> Result<(), String> {
    let age = |of: &Subnet| (of.metadata.creation_timestamp.clone(), of.name_any());
    let own = age(subnet);
    let older: Vec<Subnet> = all
        .iter()
        .filter(|other| age(other) < own)
        .cloned()
        .collect();
    // Pools are checked by the reconciler itself (`overlap_with_other_pools`), on a fresh list.
    review_subnet(subnet, None, &older, &[])
}

/// Whether two networks share an address (networks of different families never do).
fn overlaps(a: IpNet, b: IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn subnet(name: &str, spec: Value) -> Subnet {
        serde_json::from_value(json!({
            "apiVersion": "virtnet.io/v1alpha1", "kind": "Subnet",
            "metadata": {"name": name},
            "spec": spec,
        }))
        .expect("subnet deserializes")
    }

    fn example_subnet() -> Subnet {
        subnet(
            "subnet",
            json!({"subnet": "10.6.0.0/16", "gateway": "10.6.0.1", "ips": ["10.6.153.100-10.6.153.255"], "replicas": 3}),
        )
    }

    #[test]
    fn of_two_overlapping_stored_subnets_only_the_newer_is_refused() {
        let mut older = subnet(
            "older",
            json!({ "subnet": "10.6.0.0/16", "ips": ["10.6.1.1-10.6.1.9"] }),
        );
        older.metadata.creation_timestamp = Some(stamp("2026-01-01T00:00:00Z"));
        let mut newer = subnet("newer", json!({ "subnet": "10.6.1.0/24" }));
        newer.metadata.creation_timestamp = Some(stamp("2026-01-01T00:00:05Z"));
        let all = [older.clone(), newer.clone()];
        assert_eq!(review_against_older(&older, &all), Ok(()));
        let refused = review_against_older(&newer, &all).expect_err("the newer overlaps");
        assert!(refused.contains("\"older\""), "{refused}");
    }

    fn stamp(rfc3339: &str) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
        serde_json::from_value(json!(rfc3339)).expect("an RFC 3339 time")
    }

    #[test]
    fn disjoint_subnets_are_admitted() {
        let others = [
            example_subnet(),
            subnet("v6", json!({"subnet": "fd00:6::/64"})),
            subnet("broken", json!({"subnet": "not-a-cidr"})),
        ];
        for candidate in [
            subnet("storage", json!({"subnet": "10.7.0.0/16"})),
            subnet("right-after", json!({"subnet": "10.5.255.0/24"})),
            subnet("v6b", json!({"subnet": "fd00:7::/64"})),
        ] {
            assert_eq!(
                review_subnet(&candidate, None, &others, &[]),
                Ok(()),
                "{}",
                candidate.spec.subnet
            );
        }
    }

    #[test]
    fn an_overlap_names_the_other_subnet_and_its_cidr() {
        let others = [example_subnet()];
        for cidr in ["10.6.153.0/24", "10.0.0.0/8"] {
            let candidate = subnet("second", json!({"subnet": cidr}));
            let message = review_subnet(&candidate, None, &others, &[]).expect_err(cidr);
            assert!(
                message.starts_with(&format!(
                    "spec.subnet {cidr} overlaps Subnet \"subnet\" (10.6.0.0/16): two Subnets must not share addresses"
                )),
                "{message}"
            );
        }
        let v6 = [subnet("v6", json!({"subnet": "fd00:6::/48"}))];
        let message = review_subnet(
            &subnet("v6b", json!({"subnet": "fd00:6:0:1::/64"})),
            None,
            &v6,
            &[],
        )
        .expect_err("IPv6 overlap");
        assert!(
            message.contains("overlaps Subnet \"v6\" (fd00:6::/48)"),
            "{message}"
        );
    }

    #[test]
    fn subnets_of_one_network_are_admitted_only_with_disjoint_addresses() {
        let others = [example_subnet()];
        let beside = subnet(
            "team-b",
            json!({"subnet": "10.6.0.0/16", "gateway": "10.6.0.1", "ips": ["10.6.160.10-10.6.160.49"]}),
        );
        assert_eq!(review_subnet(&beside, None, &others, &[]), Ok(()));
        let sharing = subnet(
            "team-c",
            json!({"subnet": "10.6.0.0/16", "ips": ["10.6.153.200-10.6.154.10"]}),
        );
        let message = review_subnet(&sharing, None, &others, &[]).expect_err("shared addresses");
        assert!(
            message.starts_with(
                "Subnet \"team-c\" would hand out 10.6.153.200-10.6.153.255 that Subnet \"subnet\" on the same network 10.6.0.0/16 hands out too"
            ),
            "{message}"
        );
        let everything = subnet("all", json!({"subnet": "10.6.0.0/16"}));
        assert!(review_subnet(&everything, None, &others, &[]).is_err());
    }

    fn pool_of(subnet: &str, ips: &[&str], allocated: &[&str]) -> IpPool {
        let allocations: serde_json::Map<String, Value> = allocated
            .iter()
            .map(|address| {
                let record =
                    json!({"endpoint": "ns/pod", "interface": "eth0", "podUID": "u", "node": "n"});
                ((*address).to_owned(), record)
            })
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "virtnet.io/v1alpha1", "kind": "IPPool",
            "metadata": {"name": format!("{subnet}-0"), "labels": {crate::crd::LABEL_SUBNET: subnet}},
            "spec": {"subnet": subnet, "cidr": "10.6.0.0/16", "ips": ips},
            "status": {"allocations": allocations},
        }))
        .expect("pool deserializes")
    }

    #[test]
    fn an_address_another_subnets_pool_still_holds_is_refused() {
        // "subnet" no longer lists 10.6.153.120 in its spec, but a pod still holds it.
        let narrowed = subnet(
            "subnet",
            json!({"subnet": "10.6.0.0/16", "ips": ["10.6.153.200-10.6.153.255"]}),
        );
        let pools = [pool_of(
            "subnet",
            &["10.6.153.120", "10.6.153.200-10.6.153.255"],
            &["10.6.153.120"],
        )];
        let taker = subnet(
            "taker",
            json!({"subnet": "10.6.0.0/16", "ips": ["10.6.153.100-10.6.153.150"]}),
        );
        let others = std::slice::from_ref(&narrowed);
        assert_eq!(review_subnet(&taker, None, others, &[]), Ok(()));
        let message = review_subnet(&taker, None, others, &pools).expect_err("held address");
        assert!(
            message.starts_with(
                "Subnet \"taker\" would hand out 10.6.153.120 that Subnet \"subnet\" still holds in its IPPools"
            ),
            "{message}"
        );
        // The Subnet's own pools never count against it.
        assert_eq!(review_subnet(&narrowed, None, &[], &pools), Ok(()));
    }

    #[test]
    fn a_subnet_does_not_overlap_its_own_stored_version() {
        let stored = example_subnet();
        let mut scaled = example_subnet();
        scaled.spec.replicas = 5;
        assert_eq!(
            review_subnet(&scaled, Some(&stored), std::slice::from_ref(&stored), &[]),
            Ok(())
        );
    }

    #[test]
    fn a_reversed_ipv6_range_is_rejected_with_the_order_to_write() {
        let candidate = subnet(
            "v6",
            json!({"subnet": "fd00:6::/64", "ips": ["fd00:6::1ff-fd00:6::100"]}),
        );
        let message = review_subnet(&candidate, None, &[], &[]).expect_err("reversed range");
        assert_eq!(
            message,
            "Subnet v6: \"fd00:6::1ff-fd00:6::100\" starts after it ends: write the lower address first, e.g. fd00:6::100-fd00:6::1ff"
        );
        let excluded = subnet(
            "v6",
            json!({"subnet": "fd00:6::/64", "excludeIPs": ["fd00:6::9-fd00:6::1"]}),
        );
        assert!(review_subnet(&excluded, None, &[], &[]).is_err());
    }

    #[test]
    fn two_defaults_for_the_same_pods_are_rejected_but_selected_ones_are_not() {
        let first = subnet("first", json!({"subnet": "10.6.0.0/16", "default": true}));
        let second = subnet("second", json!({"subnet": "10.7.0.0/16", "default": true}));
        let message = review_subnet(&second, None, std::slice::from_ref(&first), &[])
            .expect_err("second default");
        assert!(
            message.starts_with("Subnet \"first\" is already the default IPv4 Subnet"),
            "{message}"
        );
        let rack = subnet(
            "rack-b",
            json!({"subnet": "10.7.0.0/16", "default": true,
                   "nodeSelector": {"matchLabels": {"rack": "b"}}}),
        );
        let v6 = subnet("v6", json!({"subnet": "fd00:6::/64", "default": true}));
        let plain = subnet("plain", json!({"subnet": "10.8.0.0/16"}));
        for candidate in [rack, v6, plain] {
            assert_eq!(
                review_subnet(&candidate, None, std::slice::from_ref(&first), &[]),
                Ok(())
            );
        }
    }

    #[test]
    fn a_metadata_only_update_is_admitted_even_for_a_subnet_that_breaks_a_rule() {
        let stored = subnet("second", json!({"subnet": "10.6.153.0/24"}));
        let mut labelled = stored.clone();
        labelled
            .labels_mut()
            .insert("team".to_owned(), "net".to_owned());
        assert_eq!(
            review_subnet(&labelled, Some(&stored), &[example_subnet()], &[]),
            Ok(())
        );
    }
}
