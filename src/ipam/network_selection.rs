//! Which of a pod's Multus network-selection elements a CNI call is for.
//!
//! Multus runs a NAD's plugins with the NAD's config but tells them neither the NAD's namespace
//! nor its name, nor the element's `ips` or `ipam-claim-reference`: only `CNI_IFNAME`. The pod's
//! annotations say the rest, and the interface name ties a call to its element: `eth0` is the
//! pod's default network (`v1.multus-cni.io/default-network`), every other interface is the
//! element of `k8s.v1.cni.cncf.io/networks` whose `interface` it is, or, for an element without
//! one, the element at position N of the list for `net<N>` (counted from 1, as Multus names
//! them).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use serde::Deserialize;

use super::error::IpamError;

/// The pod annotation listing its additional networks.
pub const NETWORKS_ANNOTATION: &str = "k8s.v1.cni.cncf.io/networks";
/// The pod annotation replacing the cluster's default network for this pod.
pub const DEFAULT_NETWORK_ANNOTATION: &str = "v1.multus-cni.io/default-network";
/// The interface Multus gives the default network.
pub const DEFAULT_INTERFACE: &str = "eth0";

/// One network-selection element resolved for an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkSelection {
    /// Namespace of the NetworkAttachmentDefinition (the pod's own when the element names none).
    pub namespace: String,
    /// Name of the NetworkAttachmentDefinition.
    pub name: String,
    /// Static addresses the element asks for (`ips`, written as CIDRs or bare addresses).
    pub ips: Vec<IpAddr>,
    /// The IPAMClaim (in the pod's namespace) the interface's addresses belong to.
    pub ipam_claim: Option<String>,
}

impl NetworkSelection {
    /// `namespace/name`, as the Endpoint records it.
    pub fn attachment(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// An element of the JSON form of the annotations (the fields VirtNet reads; Multus validates
/// the rest).
#[derive(Deserialize)]
struct Element {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    interface: Option<String>,
    #[serde(default)]
    ips: Vec<String>,
    #[serde(default, rename = "ipam-claim-reference")]
    ipam_claim_reference: Option<String>,
}

/// The element of `annotations` that interface `ifname` of a pod in `pod_namespace` was attached
/// for, or `None` when the annotations select no network for it (the cluster's default network,
/// or a pod without Multus annotations).
pub fn selection_for_interface(
    annotations: &BTreeMap<String, String>,
    pod_namespace: &str,
    ifname: &str,
) -> Result<Option<NetworkSelection>, IpamError> {
    if ifname == DEFAULT_INTERFACE {
        let Some(value) = annotations.get(DEFAULT_NETWORK_ANNOTATION) else {
            return Ok(None);
        };
        let elements = parse(DEFAULT_NETWORK_ANNOTATION, value)?;
        return elements
            .into_iter()
            .next()
            .map(|element| resolve(DEFAULT_NETWORK_ANNOTATION, element, pod_namespace))
            .transpose();
    }
    let Some(value) = annotations.get(NETWORKS_ANNOTATION) else {
        return Ok(None);
    };
    let elements = parse(NETWORKS_ANNOTATION, value)?;
    let position = ifname
        .strip_prefix("net")
        .and_then(|number| number.parse::<usize>().ok());
    elements
        .into_iter()
        .enumerate()
        .find(|(index, element)| match &element.interface {
            Some(interface) => interface == ifname,
            None => position == Some(index + 1),
        })
        .map(|(_, element)| resolve(NETWORKS_ANNOTATION, element, pod_namespace))
        .transpose()
}

fn resolve(
    annotation: &'static str,
    element: Element,
    pod_namespace: &str,
) -> Result<NetworkSelection, IpamError> {
    let ips = element
        .ips
        .iter()
        .map(|written| {
            written
                .parse::<IpNet>()
                .map(|net| net.addr())
                .or_else(|_| written.parse::<IpAddr>())
                .map_err(|_| IpamError::InvalidAnnotation {
                    annotation,
                    problem: format!(
                        "ips entry {written:?} of network {} is not an address",
                        element.name
                    ),
                    example: r#"[{"name": "macvlan", "ips": ["10.6.153.120/16"]}]"#,
                })
        })
        .collect::<Result<_, _>>()?;
    Ok(NetworkSelection {
        namespace: element
            .namespace
            .filter(|namespace| !namespace.is_empty())
            .unwrap_or_else(|| pod_namespace.to_owned()),
        name: element.name,
        ips,
        ipam_claim: element.ipam_claim_reference,
    })
}

/// Both forms Multus accepts: a JSON list of elements, or `[namespace/]name[@interface]` items
/// separated by commas.
fn parse(annotation: &'static str, value: &str) -> Result<Vec<Element>, IpamError> {
    let trimmed = value.trim();
    if trimmed.starts_with('[') || trimmed.starts_with('{') {
        let invalid = |problem: String| IpamError::InvalidAnnotation {
            annotation,
            problem,
            example: r#"[{"name": "macvlan", "namespace": "default", "interface": "net1"}]"#,
        };
        return if trimmed.starts_with('{') {
            serde_json::from_str::<Element>(trimmed)
                .map(|element| vec![element])
                .map_err(|error| invalid(error.to_string()))
        } else {
            serde_json::from_str(trimmed).map_err(|error| invalid(error.to_string()))
        };
    }
    trimmed
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| parse_item(annotation, item))
        .collect()
}

fn parse_item(annotation: &'static str, item: &str) -> Result<Element, IpamError> {
    let (reference, interface) = match item.split_once('@') {
        Some((reference, interface)) => (reference, Some(interface.to_owned())),
        None => (item, None),
    };
    let (namespace, name) = match reference.split_once('/') {
        Some((namespace, name)) => (Some(namespace.to_owned()), name),
        None => (None, reference),
    };
    if name.is_empty() || interface.as_deref().is_some_and(str::is_empty) {
        return Err(IpamError::InvalidAnnotation {
            annotation,
            problem: format!("{item:?} names no network or an empty interface"),
            example: "default/macvlan@net1, ipvlan",
        });
    }
    Ok(Element {
        name: name.to_owned(),
        namespace,
        interface,
        ips: Vec::new(),
        ipam_claim_reference: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    }

    fn selected(
        pairs: &[(&str, &str)],
        ifname: &str,
    ) -> Result<Option<NetworkSelection>, IpamError> {
        selection_for_interface(&annotations(pairs), "tenant", ifname)
    }

    #[test]
    fn interfaces_map_to_elements_by_name_or_position() -> Result<(), IpamError> {
        let text = [(
            NETWORKS_ANNOTATION,
            "macvlan-a, infra/macvlan-b@storage, ipvlan",
        )];
        let names = |ifname| -> Result<Option<String>, IpamError> {
            Ok(selected(&text, ifname)?.map(|selection| selection.attachment()))
        };
        assert_eq!(names("net1")?.as_deref(), Some("tenant/macvlan-a"));
        assert_eq!(names("storage")?.as_deref(), Some("infra/macvlan-b"));
        // Position counts every element, named interface or not.
        assert_eq!(names("net3")?.as_deref(), Some("tenant/ipvlan"));
        assert_eq!(names("net2")?, None);
        assert_eq!(names("eth0")?, None);
        Ok(())
    }

    #[test]
    fn the_json_form_carries_ips_and_the_claim() -> Result<(), IpamError> {
        let json = [(
            NETWORKS_ANNOTATION,
            r#"[{"name": "underlay", "interface": "net1", "ips": ["10.6.7.8/16"],
                 "ipam-claim-reference": "vm1.underlay", "mac": "02:00:00:00:00:01"}]"#,
        )];
        assert_eq!(
            selected(&json, "net1")?,
            Some(NetworkSelection {
                namespace: "tenant".into(),
                name: "underlay".into(),
                ips: vec!["10.6.7.8".parse().expect("an address")],
                ipam_claim: Some("vm1.underlay".into()),
            })
        );
        Ok(())
    }

    #[test]
    fn eth0_is_the_default_network_annotation() -> Result<(), IpamError> {
        for value in [
            "kube-system/virtnet",
            r#"{"name": "virtnet", "namespace": "kube-system"}"#,
        ] {
            let pairs = [
                (DEFAULT_NETWORK_ANNOTATION, value),
                (NETWORKS_ANNOTATION, "macvlan-a"),
            ];
            assert_eq!(
                selected(&pairs, "eth0")?.map(|selection| selection.attachment()),
                Some("kube-system/virtnet".into()),
                "{value}"
            );
        }
        Ok(())
    }

    #[test]
    fn malformed_annotations_say_what_to_write() {
        for value in [
            "[{\"nme\": 1}]",
            "ns/@net1",
            "macvlan@",
            r#"[{"name": "a", "ips": ["10.6.0.300"]}]"#,
        ] {
            let Err(error) = selected(&[(NETWORKS_ANNOTATION, value)], "net1") else {
                panic!("{value} must be refused");
            };
            let message = error.to_string();
            assert!(
                message.contains(NETWORKS_ANNOTATION) && message.contains("write it like"),
                "{message}"
            );
        }
    }
}
