//! Pod and namespace annotations → VirtNet's IPAM annotation parsers, the Multus network
//! selection, and the choice of Subnets they lead to.
//!
//! Input: the interface name on the first line, then one `key=value` annotation per line. The
//! map is handed to both the pod and the namespace parser: each reads only its own keys.
#![no_main]

use std::collections::BTreeMap;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use virtnet::ipam::{
    NamespaceDefaultSubnet, PodIpamAnnotations, SelectionRequest, SubnetAddresses, SubnetFacts,
    select_for_interface, selection_for_interface,
};
use virtnet_fuzz::accepted;

/// A small cluster for selection to choose from: an IPv4 and an IPv6 default, and one more IPv4
/// Subnet, named as in the annotation examples.
static SUBNETS: LazyLock<Vec<SubnetFacts>> = LazyLock::new(|| {
    [
        ("subnet-v4", "10.6.0.0/16", true),
        ("subnet-v6", "fd00::/64", true),
        ("other-v4", "192.168.0.0/24", false),
    ]
    .into_iter()
    .map(|(name, cidr, default)| SubnetFacts {
        name: name.to_owned(),
        addresses: SubnetAddresses::parse(
            cidr.parse().expect("a valid CIDR"),
            None,
            &[] as &[&str],
            &[],
        )
        .expect("a valid Subnet"),
        default,
        namespace_selector: None,
        node_selector: None,
    })
    .collect()
});

fuzz_target!(|text: &str| {
    let mut lines = text.split('\n');
    let ifname = lines.next().unwrap_or_default();
    let annotations: BTreeMap<String, String> = lines
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect();

    let pod = accepted(PodIpamAnnotations::parse(&annotations));
    let namespace_default = accepted(NamespaceDefaultSubnet::parse(&annotations));
    let selection = accepted(selection_for_interface(&annotations, "default", ifname));
    let (Some(pod), Some(namespace_default), Some(selection)) = (pod, namespace_default, selection)
    else {
        return;
    };
    let no_labels = BTreeMap::new();
    accepted(select_for_interface(&SelectionRequest {
        interface: ifname,
        pod: &pod,
        requested_ips: selection.as_ref().map_or(&[], |selection| &selection.ips),
        namespace_default: namespace_default.as_ref(),
        namespace_labels: &no_labels,
        node_labels: &no_labels,
        cni_default_subnets: &[],
        subnets: &SUBNETS,
    }));
});
