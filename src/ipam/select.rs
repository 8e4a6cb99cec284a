//! Which Subnet (or pool, or static address) serves one interface of a pod.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use super::annotations::{
    DEFAULT_SUBNET_ANNOTATION, NamespaceDefaultSubnet, PodIpamAnnotations, lookup_entry,
};
use super::error::IpamError;
use super::network_selection::NETWORKS_ANNOTATION;
use super::range::IpFamily;
use super::selector::LabelSelector;
use super::split::parse_pool_name;
use super::subnet::SubnetAddresses;

/// What selection needs to know about one Subnet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetFacts {
    /// The Subnet's name.
    pub name: String,
    /// Its validated addressing.
    pub addresses: SubnetAddresses,
    /// Whether it is a cluster default Subnet (`default: true`).
    pub default: bool,
    /// Pods of namespaces whose labels this rejects may not use the Subnet.
    pub namespace_selector: Option<LabelSelector>,
    /// Pods on nodes whose labels this rejects may not use the Subnet.
    pub node_selector: Option<LabelSelector>,
}

impl SubnetFacts {
    /// Describes the first selector that rejects the pod, or `None` if the pod may use the Subnet.
    fn rejection(
        &self,
        namespace_labels: &BTreeMap<String, String>,
        node_labels: &BTreeMap<String, String>,
    ) -> Option<String> {
        let checks = [
            (
                "namespaceSelector",
                &self.namespace_selector,
                namespace_labels,
                "namespace",
            ),
            ("nodeSelector", &self.node_selector, node_labels, "node"),
        ];
        checks
            .into_iter()
            .find_map(|(field, selector, labels, whose)| {
                selector
                    .as_ref()
                    .filter(|selector| !selector.matches(labels))
                    .map(|selector| {
                        format!("its {field} `{selector}` does not match the {whose}'s labels")
                    })
            })
    }
}

/// Where a selection came from; shown in errors and worth recording on the Endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectionSource {
    /// A pod annotation (one of the `ipam.virtnet.io/…` constants).
    PodAnnotation(&'static str),
    /// The `ips` of the pod's network-selection element for the interface
    /// (`k8s.v1.cni.cncf.io/networks`, the CNI `ips` capability).
    NetworkSelectionIps,
    /// The namespace annotation `ipam.virtnet.io/default-subnet`.
    NamespaceDefault,
    /// The CNI config's default Subnet(s).
    CniDefault,
    /// The Subnets marked `default: true`.
    ClusterDefault,
}

impl fmt::Display for SelectionSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PodAnnotation(annotation) => write!(f, "pod annotation {annotation}"),
            Self::NetworkSelectionIps => write!(
                f,
                "the ips of the pod's {NETWORKS_ANNOTATION} element for this interface"
            ),
            Self::NamespaceDefault => {
                write!(f, "namespace annotation {DEFAULT_SUBNET_ANNOTATION}")
            }
            Self::CniDefault => f.write_str("the CNI config's default_subnet"),
            Self::ClusterDefault => f.write_str("the cluster default Subnets (default: true)"),
        }
    }
}

/// The decision for one family of one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Allocate exactly `address` from a pool of `subnet`.
    StaticAddress {
        /// The requested address.
        address: IpAddr,
        /// The Subnet it belongs to.
        subnet: String,
        /// Where the request came from.
        source: SelectionSource,
    },
    /// Allocate from this pool only.
    Pool {
        /// The IPPool name.
        pool: String,
        /// The pool's Subnet.
        subnet: String,
        /// Where the request came from.
        source: SelectionSource,
    },
    /// Allocate from any pool of these Subnets, tried in this order.
    Subnets {
        /// Candidate Subnet names, in preference order.
        subnets: Vec<String>,
        /// Where the candidates came from.
        source: SelectionSource,
    },
}

/// The decisions for one interface; a family is `None` when nothing asks for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceSelection {
    /// The IPv4 decision.
    pub ipv4: Option<Selection>,
    /// The IPv6 decision.
    pub ipv6: Option<Selection>,
}

/// Everything selection looks at, for one interface of one pod.
#[derive(Clone, Copy, Debug)]
pub struct SelectionRequest<'a> {
    /// The interface being set up (CNI `ifname`).
    pub interface: &'a str,
    /// The pod's parsed IPAM annotations.
    pub pod: &'a PodIpamAnnotations,
    /// Static addresses the pod's network-selection element asks for (its `ips`).
    pub requested_ips: &'a [IpAddr],
    /// The namespace's parsed default Subnet annotation.
    pub namespace_default: Option<&'a NamespaceDefaultSubnet>,
    /// The namespace's labels (for Subnet namespace selectors).
    pub namespace_labels: &'a BTreeMap<String, String>,
    /// The node's labels (for Subnet node selectors).
    pub node_labels: &'a BTreeMap<String, String>,
    /// The CNI config's default Subnet names, in preference order.
    pub cni_default_subnets: &'a [String],
    /// The CNI config is a NAD's that the pod's network selection names for this interface:
    /// its defaults are that network's own and come before the namespace default. A node's
    /// default conflist (no selection element) ranks below the namespace default.
    pub config_is_selected_attachment: bool,
    /// Every Subnet of the cluster.
    pub subnets: &'a [SubnetFacts],
}

/// Decides where each family of `request.interface` gets its address from.
///
/// Fails when an explicitly named Subnet or pool is unknown, of the wrong family or rejects the
/// pod, when the CNI defaults all reject the pod, or when nothing at all serves the interface.
///
/// Each family is chosen independently, from the first of these that names something for it:
///
/// 1. a static address (`ipam.virtnet.io/static-ips`, or `address` in `ipam.virtnet.io/subnet`);
/// 2. the pod's pool annotation (`ipam.virtnet.io/ippools`), then its Subnet annotation
///    (`ipam.virtnet.io/subnets`, or else `ipam.virtnet.io/subnet`) for the interface;
/// 3. the `ips` of the pod's Multus network-selection element for the interface: a static
///    address, which must lie in one of the CNI config's default Subnets when it names any (the
///    network's Subnets), else in any Subnet the pod may use;
/// 4. for an interface the pod's network selection attaches through a NAD, that NAD's default
///    Subnet(s) (a NAD rendered from a `Network` names the Network's);
/// 5. the namespace annotation `ipam.virtnet.io/default-subnet`;
/// 6. for any other interface (the node's default conflist), the CNI config's default Subnet(s);
/// 7. the cluster default Subnets (`default: true`).
///
/// So a dual-stack pod whose annotation names only an IPv4 Subnet still gets IPv6 from the
/// next source that names an IPv6 one. A Subnet whose namespace or node selector rejects the pod
/// is never chosen: naming it explicitly is an error that quotes the selector, and default
/// Subnets that reject the pod are skipped.
///
/// A default that names a Subnet which does not exist (CNI `default_subnet`, or the namespace's
/// single-name form) has no family to go by. Once the pod's own annotations or an existing
/// namespace default serve the interface, such a name is skipped rather than failing a pod that
/// never needed it; otherwise it is an error.
pub fn select_for_interface(
    request: &SelectionRequest<'_>,
) -> Result<InterfaceSelection, IpamError> {
    let chosen = [IpFamily::V4, IpFamily::V6]
        .into_iter()
        .any(|family| request.pod_names_something(family))
        || request.namespace_names_something();
    let ipv4 = select_family(request, IpFamily::V4, chosen)?;
    let ipv6 = select_family(request, IpFamily::V6, chosen)?;
    if ipv4.is_none() && ipv6.is_none() {
        return Err(IpamError::NoSubnetForInterface {
            interface: request.interface.to_string(),
        });
    }
    Ok(InterfaceSelection { ipv4, ipv6 })
}

fn select_family(
    request: &SelectionRequest<'_>,
    family: IpFamily,
    skip_missing_defaults: bool,
) -> Result<Option<Selection>, IpamError> {
    let interface = request.interface;
    let named_subnet = lookup_entry(&request.pod.subnets, interface, family);

    if let Some((address, annotation)) =
        lookup_entry(&request.pod.static_addresses, interface, family)
    {
        let source = SelectionSource::PodAnnotation(annotation);
        let subnet = match named_subnet {
            Some((name, subnet_annotation)) => request.resolve(
                name,
                family,
                SelectionSource::PodAnnotation(subnet_annotation),
            )?,
            None => request.subnet_containing(*address, source)?,
        };
        return Ok(Some(Selection::StaticAddress {
            address: *address,
            subnet: subnet.name.clone(),
            source,
        }));
    }

    if let Some((pool, annotation)) = lookup_entry(&request.pod.pools, interface, family) {
        let source = SelectionSource::PodAnnotation(annotation);
        let (subnet, _index) = parse_pool_name(pool).ok_or_else(|| IpamError::InvalidPoolName {
            pool: pool.clone(),
            origin: source,
        })?;
        let subnet = request.resolve(subnet, family, source)?;
        return Ok(Some(Selection::Pool {
            pool: pool.clone(),
            subnet: subnet.name.clone(),
            source,
        }));
    }

    if let Some((name, annotation)) = named_subnet {
        let source = SelectionSource::PodAnnotation(annotation);
        return request.only(name, family, source).map(Some);
    }

    if let Some(address) = request
        .requested_ips
        .iter()
        .find(|address| IpFamily::of(**address) == family)
    {
        let source = SelectionSource::NetworkSelectionIps;
        let subnet = request.network_subnet_containing(*address, source)?;
        return Ok(Some(Selection::StaticAddress {
            address: *address,
            subnet: subnet.name.clone(),
            source,
        }));
    }

    if request.config_is_selected_attachment
        && let Some(selection) = request.cni_defaults(family, skip_missing_defaults)?
    {
        return Ok(Some(selection));
    }

    if let Some(name) = request.namespace_default_name(family, skip_missing_defaults)? {
        return request
            .only(name, family, SelectionSource::NamespaceDefault)
            .map(Some);
    }

    if !request.config_is_selected_attachment
        && let Some(selection) = request.cni_defaults(family, skip_missing_defaults)?
    {
        return Ok(Some(selection));
    }

    Ok(request.cluster_defaults(family))
}

impl<'a> SelectionRequest<'a> {
    /// Whether the pod's annotations name a static address, pool or Subnet of `family` for this
    /// interface.
    fn pod_names_something(&self, family: IpFamily) -> bool {
        let interface = self.interface;
        lookup_entry(&self.pod.static_addresses, interface, family).is_some()
            || lookup_entry(&self.pod.pools, interface, family).is_some()
            || lookup_entry(&self.pod.subnets, interface, family).is_some()
            || self
                .requested_ips
                .iter()
                .any(|address| IpFamily::of(*address) == family)
    }

    /// Whether the namespace annotation names a default Subnet that exists (the per-family form
    /// names Subnets of known families; a missing one is reported where it is used).
    fn namespace_names_something(&self) -> bool {
        match self.namespace_default {
            None => false,
            Some(NamespaceDefaultSubnet::PerFamily { ipv4, ipv6 }) => {
                ipv4.is_some() || ipv6.is_some()
            }
            Some(NamespaceDefaultSubnet::Named(name)) => {
                self.subnets.iter().any(|subnet| &subnet.name == name)
            }
        }
    }

    /// A default Subnet by name: `None` when it does not exist and `skip_missing` allows that.
    fn find_default(
        &self,
        name: &str,
        source: SelectionSource,
        skip_missing: bool,
    ) -> Result<Option<&'a SubnetFacts>, IpamError> {
        match self.find(name, source) {
            Err(IpamError::UnknownSubnet { .. }) if skip_missing => Ok(None),
            found => found.map(Some),
        }
    }

    fn find(&self, name: &str, source: SelectionSource) -> Result<&'a SubnetFacts, IpamError> {
        self.subnets
            .iter()
            .find(|subnet| subnet.name == name)
            .ok_or_else(|| IpamError::UnknownSubnet {
                subnet: name.to_string(),
                origin: source,
            })
    }

    fn rejection(&self, subnet: &SubnetFacts) -> Option<String> {
        subnet.rejection(self.namespace_labels, self.node_labels)
    }

    /// Looks up an explicitly named Subnet and insists it fits: right family, accepts the pod.
    fn resolve(
        &self,
        name: &str,
        family: IpFamily,
        source: SelectionSource,
    ) -> Result<&'a SubnetFacts, IpamError> {
        let subnet = self.find(name, source)?;
        if subnet.addresses.family() != family {
            return Err(IpamError::SubnetFamilyMismatch {
                subnet: name.to_string(),
                cidr: subnet.addresses.cidr(),
                wanted: family,
                origin: source,
            });
        }
        match self.rejection(subnet) {
            Some(reason) => Err(IpamError::SubnetNotEligible {
                subnet: name.to_string(),
                reason,
                origin: source,
            }),
            None => Ok(subnet),
        }
    }

    /// A selection of exactly the named Subnet.
    fn only(
        &self,
        name: &str,
        family: IpFamily,
        source: SelectionSource,
    ) -> Result<Selection, IpamError> {
        let subnet = self.resolve(name, family, source)?;
        Ok(Selection::Subnets {
            subnets: vec![subnet.name.clone()],
            source,
        })
    }

    /// The Subnet a static address belongs to when no annotation names one: an eligible Subnet of
    /// the family whose CIDR holds it, preferring one that currently offers it, then by name.
    fn subnet_containing(
        &self,
        address: IpAddr,
        source: SelectionSource,
    ) -> Result<&'a SubnetFacts, IpamError> {
        self.subnets
            .iter()
            .filter(|subnet| subnet.addresses.cidr().contains(&address))
            .filter(|subnet| self.rejection(subnet).is_none())
            .min_by_key(|subnet| {
                let offers_it = subnet.addresses.effective().contains(address);
                (!offers_it, subnet.name.as_str())
            })
            .ok_or(IpamError::StaticAddressInNoSubnet {
                address,
                origin: source,
            })
    }

    /// The Subnet of the network (the CNI config's defaults, when it names any) holding a
    /// requested address.
    fn network_subnet_containing(
        &self,
        address: IpAddr,
        source: SelectionSource,
    ) -> Result<&'a SubnetFacts, IpamError> {
        let subnet = self.subnet_containing(address, source)?;
        if self.cni_default_subnets.is_empty() || self.cni_default_subnets.contains(&subnet.name) {
            return Ok(subnet);
        }
        self.cni_default_subnets
            .iter()
            .filter_map(|name| self.subnets.iter().find(|subnet| &subnet.name == name))
            .find(|subnet| {
                subnet.addresses.cidr().contains(&address) && self.rejection(subnet).is_none()
            })
            .ok_or_else(|| IpamError::StaticAddressOutsideNetwork {
                address,
                subnets: self.cni_default_subnets.join(", "),
                origin: source,
            })
    }

    /// The namespace default Subnet name for `family`, if the namespace names one.
    fn namespace_default_name(
        &self,
        family: IpFamily,
        skip_missing: bool,
    ) -> Result<Option<&'a str>, IpamError> {
        Ok(match self.namespace_default {
            None => None,
            Some(NamespaceDefaultSubnet::PerFamily { ipv4, ipv6 }) => match family {
                IpFamily::V4 => ipv4.as_deref(),
                IpFamily::V6 => ipv6.as_deref(),
            },
            Some(NamespaceDefaultSubnet::Named(name)) => self
                .find_default(name, SelectionSource::NamespaceDefault, skip_missing)?
                .filter(|subnet| subnet.addresses.family() == family)
                .map(|_| name.as_str()),
        })
    }

    /// The CNI config's defaults of `family` that accept the pod, in config order. If the config
    /// names Subnets of this family but none accepts the pod, that is an error: silently falling
    /// through to the cluster default would put the pod on a network the config did not intend.
    fn cni_defaults(
        &self,
        family: IpFamily,
        skip_missing: bool,
    ) -> Result<Option<Selection>, IpamError> {
        let source = SelectionSource::CniDefault;
        let mut of_family = Vec::new();
        for name in self.cni_default_subnets {
            if let Some(subnet) = self.find_default(name, source, skip_missing)?
                && subnet.addresses.family() == family
            {
                of_family.push(subnet);
            }
        }
        if of_family.is_empty() {
            return Ok(None);
        }
        let rejections: Vec<String> = of_family
            .iter()
            .filter_map(|subnet| {
                self.rejection(subnet)
                    .map(|reason| format!("Subnet {:?}: {reason}", subnet.name))
            })
            .collect();
        if rejections.len() == of_family.len() {
            return Err(IpamError::NoEligibleSubnet {
                family,
                reasons: rejections.join("; "),
                origin: source,
            });
        }
        let subnets = of_family
            .iter()
            .filter(|subnet| self.rejection(subnet).is_none())
            .map(|subnet| subnet.name.clone())
            .collect();
        Ok(Some(Selection::Subnets { subnets, source }))
    }

    /// The cluster default Subnets of `family` that accept the pod, by name.
    fn cluster_defaults(&self, family: IpFamily) -> Option<Selection> {
        let mut subnets: Vec<String> = self
            .subnets
            .iter()
            .filter(|subnet| subnet.default && subnet.addresses.family() == family)
            .filter(|subnet| self.rejection(subnet).is_none())
            .map(|subnet| subnet.name.clone())
            .collect();
        subnets.sort();
        (!subnets.is_empty()).then_some(Selection::Subnets {
            subnets,
            source: SelectionSource::ClusterDefault,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::annotations::{
        IPPOOLS_ANNOTATION, STATIC_IPS_ANNOTATION, SUBNET_ANNOTATION, SUBNETS_ANNOTATION,
    };
    use crate::ipam::selector::{LabelRequirement, SelectorOperator};

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn subnet(name: &str, cidr: &str, default: bool) -> SubnetFacts {
        SubnetFacts {
            name: name.into(),
            addresses: SubnetAddresses::parse(
                cidr.parse().expect("cidr"),
                None,
                &[] as &[&str],
                &[],
            )
            .expect("valid subnet"),
            default,
            namespace_selector: None,
            node_selector: None,
        }
    }

    fn team_selector(team: &str) -> LabelSelector {
        LabelSelector {
            match_labels: map(&[("team", team)]),
            ..Default::default()
        }
    }

    /// The fixtures shared by the tests; each test overrides what it needs.
    struct Fixture {
        pod_annotations: BTreeMap<String, String>,
        namespace_annotations: BTreeMap<String, String>,
        namespace_labels: BTreeMap<String, String>,
        node_labels: BTreeMap<String, String>,
        cni_defaults: Vec<String>,
        selected_attachment: bool,
        requested_ips: Vec<IpAddr>,
        subnets: Vec<SubnetFacts>,
    }

    impl Fixture {
        fn new() -> Self {
            let mut rack1 = subnet("rack1", "10.1.0.0/24", false);
            rack1.node_selector = Some(LabelSelector {
                match_expressions: vec![LabelRequirement {
                    key: "rack".into(),
                    operator: SelectorOperator::In,
                    values: vec!["r1".into()],
                }],
                ..Default::default()
            });
            let mut team_b = subnet("team-b", "10.2.0.0/24", false);
            team_b.namespace_selector = Some(team_selector("b"));
            Self {
                pod_annotations: BTreeMap::new(),
                namespace_annotations: BTreeMap::new(),
                namespace_labels: map(&[("team", "a")]),
                node_labels: map(&[("rack", "r2")]),
                cni_defaults: vec![],
                selected_attachment: false,
                requested_ips: vec![],
                subnets: vec![
                    subnet("cluster-v4", "10.0.0.0/24", true),
                    subnet("cluster-v6", "fd00::/120", true),
                    subnet("other-v4", "10.3.0.0/24", false),
                    subnet("other-v6", "fd03::/120", false),
                    rack1,
                    team_b,
                ],
            }
        }

        fn select(&self, interface: &str) -> Result<InterfaceSelection, IpamError> {
            let pod = PodIpamAnnotations::parse(&self.pod_annotations)?;
            let namespace_default = NamespaceDefaultSubnet::parse(&self.namespace_annotations)?;
            select_for_interface(&SelectionRequest {
                interface,
                pod: &pod,
                requested_ips: &self.requested_ips,
                namespace_default: namespace_default.as_ref(),
                namespace_labels: &self.namespace_labels,
                node_labels: &self.node_labels,
                cni_default_subnets: &self.cni_defaults,
                config_is_selected_attachment: self.selected_attachment,
                subnets: &self.subnets,
            })
        }
    }

    fn subnets(names: &[&str], source: SelectionSource) -> Option<Selection> {
        Some(Selection::Subnets {
            subnets: names.iter().map(|n| n.to_string()).collect(),
            source,
        })
    }

    #[test]
    fn a_selected_nads_subnets_come_before_the_namespace_default_a_node_conflists_after() {
        let mut fixture = Fixture::new();
        fixture.cni_defaults = vec!["other-v4".into()];
        fixture.namespace_annotations = map(&[(DEFAULT_SUBNET_ANNOTATION, "cluster-v4")]);
        // The node's default conflist: the namespace's choice wins.
        let selection = fixture.select("eth0").expect("a selection");
        assert_eq!(
            selection.ipv4,
            subnets(&["cluster-v4"], SelectionSource::NamespaceDefault)
        );
        // A NAD the pod's network selection names: the network's own Subnets win.
        fixture.selected_attachment = true;
        let selection = fixture.select("net1").expect("a selection");
        assert_eq!(
            selection.ipv4,
            subnets(&["other-v4"], SelectionSource::CniDefault)
        );
    }

    #[test]
    fn the_network_selection_ips_come_after_the_pod_annotations_and_stay_in_the_network() {
        let mut fixture = Fixture::new();
        fixture.requested_ips = vec!["10.3.0.7".parse().expect("address")];
        // Before the namespace default and the CNI config's defaults.
        fixture.namespace_annotations = map(&[(DEFAULT_SUBNET_ANNOTATION, "cluster-v4")]);
        let selection = fixture.select("net1").expect("the requested address");
        assert_eq!(
            selection.ipv4,
            Some(Selection::StaticAddress {
                address: "10.3.0.7".parse().expect("address"),
                subnet: "other-v4".into(),
                source: SelectionSource::NetworkSelectionIps,
            })
        );
        // A pod annotation for the interface wins.
        fixture.pod_annotations = map(&[(SUBNET_ANNOTATION, r#"{"ipv4": "cluster-v4"}"#)]);
        let selection = fixture.select("net1").expect("the annotation");
        assert_eq!(
            selection.ipv4,
            subnets(
                &["cluster-v4"],
                SelectionSource::PodAnnotation(SUBNET_ANNOTATION)
            )
        );
        // Outside the network's Subnets (the CNI config's defaults): refused, saying which.
        fixture.pod_annotations = BTreeMap::new();
        fixture.cni_defaults = vec!["cluster-v4".into()];
        let error = fixture.select("net1").expect_err("outside the network");
        assert!(
            matches!(error, IpamError::StaticAddressOutsideNetwork { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("(cluster-v4)"), "{error}");
        fixture.requested_ips = vec!["192.0.2.1".parse().expect("address")];
        assert!(matches!(
            fixture.select("net1"),
            Err(IpamError::StaticAddressInNoSubnet { .. })
        ));
    }

    #[test]
    fn cluster_default_is_the_last_resort_for_both_families() {
        let selection = Fixture::new().select("eth0").expect("defaults");
        assert_eq!(
            selection.ipv4,
            subnets(&["cluster-v4"], SelectionSource::ClusterDefault)
        );
        assert_eq!(
            selection.ipv6,
            subnets(&["cluster-v6"], SelectionSource::ClusterDefault)
        );
    }

    #[test]
    fn cni_default_beats_cluster_default_per_family() {
        let mut fixture = Fixture::new();
        fixture.cni_defaults = vec!["other-v4".into()];
        let selection = fixture.select("eth0").expect("valid");
        assert_eq!(
            selection.ipv4,
            subnets(&["other-v4"], SelectionSource::CniDefault)
        );
        assert_eq!(
            selection.ipv6,
            subnets(&["cluster-v6"], SelectionSource::ClusterDefault)
        );
    }

    #[test]
    fn cni_defaults_skip_subnets_rejecting_the_node_but_fail_if_all_do() {
        let mut fixture = Fixture::new();
        fixture.cni_defaults = vec!["rack1".into(), "other-v4".into()];
        let selection = fixture.select("eth0").expect("valid");
        assert_eq!(
            selection.ipv4,
            subnets(&["other-v4"], SelectionSource::CniDefault)
        );
        fixture.cni_defaults = vec!["rack1".into()];
        let error = fixture.select("eth0").expect_err("rack1 rejects node r2");
        assert_eq!(
            error.to_string(),
            "no IPv4 Subnet named by the CNI config's default_subnet accepts this pod (Subnet \"rack1\": its nodeSelector `rack in (r1)` does not match the node's labels): run the pod where a Subnet accepts it, or name another Subnet"
        );
        fixture.node_labels = map(&[("rack", "r1")]);
        assert_eq!(
            fixture.select("eth0").expect("r1 node").ipv4,
            subnets(&["rack1"], SelectionSource::CniDefault)
        );
    }

    #[test]
    fn namespace_default_beats_cni_default() {
        let mut fixture = Fixture::new();
        fixture.cni_defaults = vec!["cluster-v4".into()];
        fixture.namespace_annotations = map(&[(DEFAULT_SUBNET_ANNOTATION, "other-v6")]);
        let selection = fixture.select("eth0").expect("valid");
        assert_eq!(
            selection.ipv4,
            subnets(&["cluster-v4"], SelectionSource::CniDefault)
        );
        assert_eq!(
            selection.ipv6,
            subnets(&["other-v6"], SelectionSource::NamespaceDefault)
        );
        fixture.namespace_annotations =
            map(&[(DEFAULT_SUBNET_ANNOTATION, r#"{"ipv4":"other-v4"}"#)]);
        let selection = fixture.select("eth0").expect("valid");
        assert_eq!(
            selection.ipv4,
            subnets(&["other-v4"], SelectionSource::NamespaceDefault)
        );
    }

    #[test]
    fn pod_subnet_annotation_beats_namespace_default() {
        let mut fixture = Fixture::new();
        fixture.namespace_annotations = map(&[(DEFAULT_SUBNET_ANNOTATION, "cluster-v4")]);
        fixture.pod_annotations = map(&[(SUBNET_ANNOTATION, r#"{"ipv4":"other-v4"}"#)]);
        let selection = fixture.select("eth0").expect("valid");
        let annotation = SelectionSource::PodAnnotation(SUBNET_ANNOTATION);
        assert_eq!(selection.ipv4, subnets(&["other-v4"], annotation));
        assert_eq!(
            selection.ipv6,
            subnets(&["cluster-v6"], SelectionSource::ClusterDefault)
        );
    }

    #[test]
    fn pool_annotation_beats_subnet_annotation() {
        let mut fixture = Fixture::new();
        fixture.pod_annotations = map(&[
            (
                SUBNETS_ANNOTATION,
                r#"[{"interface":"net1","ipv4":"other-v4"}]"#,
            ),
            (
                IPPOOLS_ANNOTATION,
                r#"[{"interface":"net1","ipv4":"cluster-v4-2"}]"#,
            ),
        ]);
        let selection = fixture.select("net1").expect("valid");
        assert_eq!(
            selection.ipv4,
            Some(Selection::Pool {
                pool: "cluster-v4-2".into(),
                subnet: "cluster-v4".into(),
                source: SelectionSource::PodAnnotation(IPPOOLS_ANNOTATION),
            })
        );
        // eth0 is not covered by the annotations: defaults apply.
        assert_eq!(
            fixture.select("eth0").expect("valid").ipv4,
            subnets(&["cluster-v4"], SelectionSource::ClusterDefault)
        );
    }

    #[test]
    fn static_address_beats_everything_and_finds_its_subnet() {
        let mut fixture = Fixture::new();
        fixture.pod_annotations = map(&[
            (
                STATIC_IPS_ANNOTATION,
                r#"[{"interface":"eth0","ipv4":"10.3.0.20","ipv6":"fd00::20"}]"#,
            ),
            (
                IPPOOLS_ANNOTATION,
                r#"[{"interface":"eth0","ipv4":"cluster-v4-0"}]"#,
            ),
        ]);
        let selection = fixture.select("eth0").expect("valid");
        let source = SelectionSource::PodAnnotation(STATIC_IPS_ANNOTATION);
        assert_eq!(
            selection.ipv4,
            Some(Selection::StaticAddress {
                address: "10.3.0.20".parse().expect("ip"),
                subnet: "other-v4".into(),
                source,
            })
        );
        assert_eq!(
            selection.ipv6,
            Some(Selection::StaticAddress {
                address: "fd00::20".parse().expect("ip"),
                subnet: "cluster-v6".into(),
                source,
            })
        );
    }

    #[test]
    fn static_address_uses_the_named_subnet_and_rejects_unknown_ones() {
        let mut fixture = Fixture::new();
        fixture.pod_annotations = map(&[(
            SUBNET_ANNOTATION,
            r#"{"ipv4":"other-v4","address":"10.3.0.9"}"#,
        )]);
        let selection = fixture.select("eth0").expect("valid");
        assert!(matches!(
            selection.ipv4,
            Some(Selection::StaticAddress { ref subnet, .. }) if subnet == "other-v4"
        ));
        fixture.pod_annotations = map(&[(SUBNET_ANNOTATION, r#"{"address":"192.168.0.1"}"#)]);
        let error = fixture.select("eth0").expect_err("no subnet holds it");
        assert_eq!(
            error.to_string(),
            "static address 192.168.0.1 from pod annotation ipam.virtnet.io/subnet is in no Subnet this pod may use: pick an address inside an eligible Subnet, or name the Subnet in the annotation"
        );
        // A static address inside a Subnet that rejects the namespace is not found either.
        fixture.pod_annotations = map(&[(SUBNET_ANNOTATION, r#"{"address":"10.2.0.9"}"#)]);
        assert!(matches!(
            fixture.select("eth0"),
            Err(IpamError::StaticAddressInNoSubnet { .. })
        ));
    }

    #[test]
    fn explicit_ineligible_subnet_names_the_selector() {
        let mut fixture = Fixture::new();
        fixture.pod_annotations = map(&[(SUBNET_ANNOTATION, r#"{"ipv4":"team-b"}"#)]);
        let error = fixture.select("eth0").expect_err("team-b rejects team a");
        assert_eq!(
            error.to_string(),
            "Subnet \"team-b\" named by pod annotation ipam.virtnet.io/subnet does not accept this pod: its namespaceSelector `team=b` does not match the namespace's labels; name another Subnet, or change the selector or the labels"
        );
        fixture.namespace_labels = map(&[("team", "b")]);
        assert!(fixture.select("eth0").is_ok());
    }

    #[test]
    fn explicit_errors_for_unknown_wrong_family_and_bad_pool_names() {
        let mut fixture = Fixture::new();
        fixture.pod_annotations = map(&[(SUBNET_ANNOTATION, r#"{"ipv4":"nope"}"#)]);
        assert_eq!(
            fixture.select("eth0").expect_err("unknown").to_string(),
            "Subnet \"nope\" named by pod annotation ipam.virtnet.io/subnet does not exist: create it, or fix pod annotation ipam.virtnet.io/subnet"
        );
        fixture.pod_annotations = map(&[(SUBNET_ANNOTATION, r#"{"ipv4":"cluster-v6"}"#)]);
        assert_eq!(
            fixture
                .select("eth0")
                .expect_err("wrong family")
                .to_string(),
            "Subnet \"cluster-v6\" (fd00::/120) is named as the IPv4 Subnet by pod annotation ipam.virtnet.io/subnet but is not IPv4: put it under \"ipv6\""
        );
        fixture.pod_annotations = map(&[(IPPOOLS_ANNOTATION, r#"[{"ipv4":"cluster-v4"}]"#)]);
        assert!(matches!(
            fixture.select("eth0"),
            Err(IpamError::InvalidPoolName { .. })
        ));
        fixture.pod_annotations = BTreeMap::new();
        fixture.namespace_annotations = map(&[(DEFAULT_SUBNET_ANNOTATION, "gone")]);
        assert!(matches!(
            fixture.select("eth0"),
            Err(IpamError::UnknownSubnet {
                origin: SelectionSource::NamespaceDefault,
                ..
            })
        ));
        fixture.namespace_annotations = BTreeMap::new();
        fixture.cni_defaults = vec!["gone".into()];
        assert!(matches!(
            fixture.select("eth0"),
            Err(IpamError::UnknownSubnet {
                origin: SelectionSource::CniDefault,
                ..
            })
        ));
    }

    #[test]
    fn missing_defaults_are_skipped_once_the_pod_annotation_serves_the_interface() {
        let mut fixture = Fixture::new();
        fixture.cni_defaults = vec!["gone".into()];
        fixture.namespace_annotations = map(&[(DEFAULT_SUBNET_ANNOTATION, "gone")]);
        fixture.pod_annotations = map(&[(
            SUBNET_ANNOTATION,
            r#"{"interface":"eth0","ipv4":"other-v4"}"#,
        )]);
        let selection = fixture
            .select("eth0")
            .expect("the pod's own choice suffices");
        assert_eq!(
            selection.ipv4,
            subnets(
                &["other-v4"],
                SelectionSource::PodAnnotation(SUBNET_ANNOTATION)
            )
        );
        // IPv6 falls through the missing names to the cluster default.
        assert_eq!(
            selection.ipv6,
            subnets(&["cluster-v6"], SelectionSource::ClusterDefault)
        );
        // Another interface the pod says nothing about still needs the defaults: an error.
        assert!(matches!(
            fixture.select("net1"),
            Err(IpamError::UnknownSubnet { .. })
        ));
        // A namespace default that exists serves it; the missing CNI default is skipped.
        fixture.namespace_annotations = map(&[(DEFAULT_SUBNET_ANNOTATION, "other-v6")]);
        let selection = fixture
            .select("net1")
            .expect("the namespace default suffices");
        assert_eq!(
            selection.ipv6,
            subnets(&["other-v6"], SelectionSource::NamespaceDefault)
        );
        assert_eq!(
            selection.ipv4,
            subnets(&["cluster-v4"], SelectionSource::ClusterDefault)
        );
        fixture.namespace_annotations = map(&[(DEFAULT_SUBNET_ANNOTATION, "gone")]);
        assert!(matches!(
            fixture.select("net1"),
            Err(IpamError::UnknownSubnet { .. })
        ));
    }

    #[test]
    fn nothing_to_select_is_an_error() {
        let mut fixture = Fixture::new();
        fixture.subnets.retain(|subnet| !subnet.default);
        let error = fixture.select("net1").expect_err("no source");
        assert!(
            error
                .to_string()
                .starts_with("no Subnet serves interface net1"),
            "{error}"
        );
    }

    #[test]
    fn cluster_defaults_skip_rejecting_subnets_and_sort_by_name() {
        let mut fixture = Fixture::new();
        fixture
            .subnets
            .push(subnet("a-cluster-v4", "10.9.0.0/24", true));
        let mut picky = subnet("b-cluster-v4", "10.8.0.0/24", true);
        picky.node_selector = Some(team_selector("x"));
        fixture.subnets.push(picky);
        let selection = fixture.select("eth0").expect("valid");
        assert_eq!(
            selection.ipv4,
            subnets(
                &["a-cluster-v4", "cluster-v4"],
                SelectionSource::ClusterDefault
            )
        );
    }
}
