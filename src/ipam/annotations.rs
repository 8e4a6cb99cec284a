//! The pod and namespace annotations that steer allocation.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::error::IpamError;
use super::range::IpFamily;

/// Pod annotation: the Subnet (and optional static address) for one interface.
pub const SUBNET_ANNOTATION: &str = "ipam.virtnet.io/subnet";
/// Pod annotation: the Subnets for several interfaces; wins over [`SUBNET_ANNOTATION`].
pub const SUBNETS_ANNOTATION: &str = "ipam.virtnet.io/subnets";
/// Pod annotation: the IPPools for several interfaces.
pub const IPPOOLS_ANNOTATION: &str = "ipam.virtnet.io/ippools";
/// Pod annotation: static addresses for several interfaces.
pub const STATIC_IPS_ANNOTATION: &str = "ipam.virtnet.io/static-ips";
/// Namespace annotation: the default Subnet(s) for pods of the namespace.
pub const DEFAULT_SUBNET_ANNOTATION: &str = "ipam.virtnet.io/default-subnet";

const SUBNET_EXAMPLE: &str =
    r#"{"interface":"eth0","ipv4":"subnet-v4","ipv6":"subnet-v6","address":"10.6.153.120"}"#;
const SUBNETS_EXAMPLE: &str = r#"[{"interface":"net1","ipv4":"subnet-v4","ipv6":"subnet-v6"}]"#;
const IPPOOLS_EXAMPLE: &str = r#"[{"interface":"eth0","ipv4":"subnet-v4-0","ipv6":"subnet-v6-0"}]"#;
const STATIC_IPS_EXAMPLE: &str =
    r#"[{"interface":"eth0","ipv4":"10.6.153.120","ipv6":"fd00::10"}]"#;
const DEFAULT_SUBNET_EXAMPLE: &str = r#"{"ipv4":"subnet-v4","ipv6":"subnet-v6"} or just subnet-v4"#;

/// One interface's entry of an annotation: a value per family (Subnet or IPPool names, or
/// static addresses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceEntry<T> {
    /// The interface; `None` means the interface being set up.
    pub interface: Option<String>,
    /// The IPv4 value.
    pub ipv4: Option<T>,
    /// The IPv6 value.
    pub ipv6: Option<T>,
    /// The annotation the entry came from, for messages.
    pub annotation: &'static str,
}

impl<T> InterfaceEntry<T> {
    /// The value for `family`.
    pub fn for_family(&self, family: IpFamily) -> Option<&T> {
        match family {
            IpFamily::V4 => self.ipv4.as_ref(),
            IpFamily::V6 => self.ipv6.as_ref(),
        }
    }
}

/// The value for (`interface`, `family`) in `entries`, with the annotation it came from.
/// Entries naming the interface are consulted before entries without one, each in list order.
pub fn lookup_entry<'a, T>(
    entries: &'a [InterfaceEntry<T>],
    interface: &str,
    family: IpFamily,
) -> Option<(&'a T, &'static str)> {
    let named = entries
        .iter()
        .filter(|entry| entry.interface.as_deref() == Some(interface));
    let unnamed = entries.iter().filter(|entry| entry.interface.is_none());
    named.chain(unnamed).find_map(|entry| {
        entry
            .for_family(family)
            .map(|value| (value, entry.annotation))
    })
}

/// The IPAM annotations of one pod, parsed and validated.
///
/// Pod annotations (all JSON; every field optional unless noted):
///
/// | Annotation | Form | Meaning |
/// |---|---|---|
/// | [`SUBNET_ANNOTATION`] `ipam.virtnet.io/subnet` | `{"interface":"eth0","ipv4":"<Subnet>","ipv6":"<Subnet>","address":"<static ip>"}` | Single-NIC form, compatible with the Go prototype. `address` is a static address of either family. |
/// | [`SUBNETS_ANNOTATION`] `ipam.virtnet.io/subnets` | `[{"interface":"net1","ipv4":"<Subnet>","ipv6":"<Subnet>"}]` | Multi-NIC form; when present, `subnet` is ignored entirely. |
/// | [`IPPOOLS_ANNOTATION`] `ipam.virtnet.io/ippools` | `[{"interface":"eth0","ipv4":"<IPPool>","ipv6":"<IPPool>"}]` | Pin an interface to specific pools. |
/// | [`STATIC_IPS_ANNOTATION`] `ipam.virtnet.io/static-ips` | `[{"interface":"eth0","ipv4":"10.6.153.120","ipv6":"fd00::10"}]` | Static addresses per interface. |
///
/// The namespace counterpart is [`NamespaceDefaultSubnet`]: [`DEFAULT_SUBNET_ANNOTATION`]
/// `ipam.virtnet.io/default-subnet` holds `{"ipv4":"<Subnet>","ipv6":"<Subnet>"}`, or a bare
/// Subnet name (serving that Subnet's family).
///
/// An entry without `interface` applies to the interface being set up (the CNI `ifname`); an
/// entry naming the interface wins over one without. Unknown fields are rejected, so a typo such
/// as `"ipv4pool"` fails loudly instead of being ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodIpamAnnotations {
    /// Subnet names per interface, from `subnets`, or else from `subnet`.
    pub subnets: Vec<InterfaceEntry<String>>,
    /// IPPool names per interface, from `ippools`.
    pub pools: Vec<InterfaceEntry<String>>,
    /// Static addresses per interface: `static-ips` entries first, then `subnet`'s `address`.
    pub static_addresses: Vec<InterfaceEntry<IpAddr>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamesJson {
    interface: Option<String>,
    ipv4: Option<String>,
    ipv6: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubnetJson {
    interface: Option<String>,
    ipv4: Option<String>,
    ipv6: Option<String>,
    address: Option<IpAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddressesJson {
    interface: Option<String>,
    ipv4: Option<Ipv4Addr>,
    ipv6: Option<Ipv6Addr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FamilyNamesJson {
    ipv4: Option<String>,
    ipv6: Option<String>,
}

/// One annotation being parsed: its name and example travel into every error.
#[derive(Clone, Copy)]
struct Annotation {
    name: &'static str,
    example: &'static str,
}

impl Annotation {
    fn error(self, problem: impl Into<String>) -> IpamError {
        IpamError::InvalidAnnotation {
            annotation: self.name,
            problem: problem.into(),
            example: self.example,
        }
    }

    fn parse_text<T: DeserializeOwned>(self, text: &str) -> Result<T, IpamError> {
        serde_json::from_str(text).map_err(|error| self.error(error.to_string()))
    }

    /// Parses the annotation's JSON if it is present.
    fn parse_json<T: DeserializeOwned>(
        self,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Option<T>, IpamError> {
        annotations
            .get(self.name)
            .map(|text| self.parse_text(text))
            .transpose()
    }

    /// Validates one entry: a non-empty interface name and at least one non-empty family value.
    fn entry<T>(
        self,
        interface: Option<String>,
        ipv4: Option<T>,
        ipv6: Option<T>,
        is_blank: impl Fn(&T) -> bool,
    ) -> Result<InterfaceEntry<T>, IpamError> {
        if interface.as_deref().is_some_and(str::is_empty) {
            return Err(self.error(
                "\"interface\" is empty: name the interface, e.g. \"eth0\", or leave the field out",
            ));
        }
        for (family, value) in [(IpFamily::V4, &ipv4), (IpFamily::V6, &ipv6)] {
            if value.as_ref().is_some_and(&is_blank) {
                return Err(self.error(format!(
                    "\"{}\" is empty: give a name or leave the field out",
                    family.field_name()
                )));
            }
        }
        if ipv4.is_none() && ipv6.is_none() {
            let interface = interface.as_deref().unwrap_or("the interface");
            return Err(self.error(format!(
                "the entry for {interface} sets neither \"ipv4\" nor \"ipv6\""
            )));
        }
        Ok(InterfaceEntry {
            interface,
            ipv4,
            ipv6,
            annotation: self.name,
        })
    }

    /// Rejects two entries for one interface: which one should win would be a guess.
    fn check_unique<T>(self, entries: &[InterfaceEntry<T>]) -> Result<(), IpamError> {
        for (position, entry) in entries.iter().enumerate() {
            if entries[..position]
                .iter()
                .any(|earlier| earlier.interface == entry.interface)
            {
                let interface = entry.interface.as_deref().unwrap_or("(no interface)");
                return Err(self.error(format!(
                    "interface {interface} has more than one entry: merge them into one"
                )));
            }
        }
        Ok(())
    }

    fn parse_names_list(
        self,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Vec<InterfaceEntry<String>>, IpamError> {
        let entries = self
            .parse_json::<Vec<NamesJson>>(annotations)?
            .unwrap_or_default()
            .into_iter()
            .map(|json| self.entry(json.interface, json.ipv4, json.ipv6, String::is_empty))
            .collect::<Result<Vec<_>, _>>()?;
        self.check_unique(&entries)?;
        Ok(entries)
    }
}

const SUBNET: Annotation = Annotation {
    name: SUBNET_ANNOTATION,
    example: SUBNET_EXAMPLE,
};
const SUBNETS: Annotation = Annotation {
    name: SUBNETS_ANNOTATION,
    example: SUBNETS_EXAMPLE,
};
const IPPOOLS: Annotation = Annotation {
    name: IPPOOLS_ANNOTATION,
    example: IPPOOLS_EXAMPLE,
};
const STATIC_IPS: Annotation = Annotation {
    name: STATIC_IPS_ANNOTATION,
    example: STATIC_IPS_EXAMPLE,
};
const DEFAULT_SUBNET: Annotation = Annotation {
    name: DEFAULT_SUBNET_ANNOTATION,
    example: DEFAULT_SUBNET_EXAMPLE,
};

impl PodIpamAnnotations {
    /// Parses the pod's IPAM annotations; other annotations are ignored.
    pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Self, IpamError> {
        let mut static_addresses = STATIC_IPS
            .parse_json::<Vec<AddressesJson>>(annotations)?
            .unwrap_or_default()
            .into_iter()
            .map(|json| {
                STATIC_IPS.entry(
                    json.interface,
                    json.ipv4.map(IpAddr::V4),
                    json.ipv6.map(IpAddr::V6),
                    |_| false,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        STATIC_IPS.check_unique(&static_addresses)?;

        let mut subnets = SUBNETS.parse_names_list(annotations)?;
        if !annotations.contains_key(SUBNETS_ANNOTATION)
            && let Some(json) = SUBNET.parse_json::<SubnetJson>(annotations)?
        {
            if json.ipv4.is_some() || json.ipv6.is_some() {
                let entry = SUBNET.entry(
                    json.interface.clone(),
                    json.ipv4,
                    json.ipv6,
                    String::is_empty,
                )?;
                subnets.push(entry);
            }
            match json.address {
                Some(address) => {
                    let (ipv4, ipv6) = match address {
                        IpAddr::V4(_) => (Some(address), None),
                        IpAddr::V6(_) => (None, Some(address)),
                    };
                    static_addresses.push(SUBNET.entry(json.interface, ipv4, ipv6, |_| false)?);
                }
                None if subnets.is_empty() => {
                    return Err(SUBNET.error("it sets none of \"ipv4\", \"ipv6\" or \"address\""));
                }
                None => {}
            }
        }

        Ok(Self {
            subnets,
            pools: IPPOOLS.parse_names_list(annotations)?,
            static_addresses,
        })
    }
}

/// The namespace's default Subnet(s), from [`DEFAULT_SUBNET_ANNOTATION`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamespaceDefaultSubnet {
    /// `{"ipv4":"<Subnet>","ipv6":"<Subnet>"}`.
    PerFamily {
        /// The IPv4 Subnet.
        ipv4: Option<String>,
        /// The IPv6 Subnet.
        ipv6: Option<String>,
    },
    /// A bare Subnet name; it serves the family of that Subnet.
    Named(String),
}

impl NamespaceDefaultSubnet {
    /// Parses the namespace's annotation; `None` if it is absent.
    pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Option<Self>, IpamError> {
        let Some(text) = annotations.get(DEFAULT_SUBNET_ANNOTATION) else {
            return Ok(None);
        };
        let text = text.trim();
        if text.starts_with('{') {
            let json: FamilyNamesJson = DEFAULT_SUBNET.parse_text(text)?;
            let entry = DEFAULT_SUBNET.entry(None, json.ipv4, json.ipv6, String::is_empty)?;
            return Ok(Some(Self::PerFamily {
                ipv4: entry.ipv4,
                ipv6: entry.ipv6,
            }));
        }
        let name = if text.starts_with('"') {
            DEFAULT_SUBNET.parse_text::<String>(text)?
        } else {
            text.to_string()
        };
        let looks_like_a_name = !name.is_empty()
            && !name.contains(|c: char| c.is_whitespace() || "{}[]\",:".contains(c));
        if looks_like_a_name {
            Ok(Some(Self::Named(name)))
        } else {
            Err(DEFAULT_SUBNET.error(format!(
                "{text:?} is neither a Subnet name nor a JSON object"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    #[test]
    fn no_annotations_parse_to_nothing() {
        let parsed = PodIpamAnnotations::parse(&annotations(&[("other", "x")])).expect("valid");
        assert_eq!(parsed, PodIpamAnnotations::default());
        assert_eq!(
            NamespaceDefaultSubnet::parse(&annotations(&[])).expect("valid"),
            None
        );
    }

    #[test]
    fn single_nic_form() {
        let parsed = PodIpamAnnotations::parse(&annotations(&[(
            SUBNET_ANNOTATION,
            r#"{"interface":"eth0","ipv4":"subnet","address":"10.6.153.120"}"#,
        )]))
        .expect("valid");
        assert_eq!(
            lookup_entry(&parsed.subnets, "eth0", IpFamily::V4),
            Some((&"subnet".to_string(), SUBNET_ANNOTATION))
        );
        assert_eq!(lookup_entry(&parsed.subnets, "eth0", IpFamily::V6), None);
        assert_eq!(lookup_entry(&parsed.subnets, "net1", IpFamily::V4), None);
        assert_eq!(
            lookup_entry(&parsed.static_addresses, "eth0", IpFamily::V4),
            Some((&ip("10.6.153.120"), SUBNET_ANNOTATION))
        );
    }

    #[test]
    fn entry_without_interface_applies_to_the_current_one() {
        let parsed =
            PodIpamAnnotations::parse(&annotations(&[(SUBNET_ANNOTATION, r#"{"ipv6":"v6"}"#)]))
                .expect("valid");
        assert_eq!(
            lookup_entry(&parsed.subnets, "net7", IpFamily::V6).map(|(name, _)| name.as_str()),
            Some("v6")
        );
        let address_only = PodIpamAnnotations::parse(&annotations(&[(
            SUBNET_ANNOTATION,
            r#"{"address":"fd00::7"}"#,
        )]))
        .expect("valid");
        assert!(address_only.subnets.is_empty());
        assert_eq!(
            lookup_entry(&address_only.static_addresses, "eth0", IpFamily::V6).map(|(a, _)| *a),
            Some(ip("fd00::7"))
        );
    }

    #[test]
    fn multi_nic_subnets_win_over_subnet() {
        let parsed = PodIpamAnnotations::parse(&annotations(&[
            (
                SUBNET_ANNOTATION,
                r#"{"ipv4":"ignored","address":"10.0.0.9"}"#,
            ),
            (
                SUBNETS_ANNOTATION,
                r#"[{"interface":"eth0","ipv4":"a"},{"interface":"net1","ipv4":"b","ipv6":"b6"}]"#,
            ),
        ]))
        .expect("valid");
        let name = |interface, family| {
            lookup_entry(&parsed.subnets, interface, family).map(|(name, _)| name.clone())
        };
        assert_eq!(name("eth0", IpFamily::V4).as_deref(), Some("a"));
        assert_eq!(name("net1", IpFamily::V6).as_deref(), Some("b6"));
        assert!(
            parsed.static_addresses.is_empty(),
            "subnet's address ignored too"
        );
    }

    #[test]
    fn pools_and_static_ips() {
        let parsed = PodIpamAnnotations::parse(&annotations(&[
            (
                IPPOOLS_ANNOTATION,
                r#"[{"interface":"eth0","ipv4":"subnet-0"}]"#,
            ),
            (
                STATIC_IPS_ANNOTATION,
                r#"[{"interface":"eth0","ipv4":"10.6.153.120","ipv6":"fd00::10"}]"#,
            ),
            (SUBNET_ANNOTATION, r#"{"address":"10.6.153.121"}"#),
        ]))
        .expect("valid");
        assert_eq!(
            lookup_entry(&parsed.pools, "eth0", IpFamily::V4).map(|(n, _)| n.as_str()),
            Some("subnet-0")
        );
        // The named static-ips entry wins over the unnamed address of `subnet`.
        assert_eq!(
            lookup_entry(&parsed.static_addresses, "eth0", IpFamily::V4),
            Some((&ip("10.6.153.120"), STATIC_IPS_ANNOTATION))
        );
        assert_eq!(
            lookup_entry(&parsed.static_addresses, "net1", IpFamily::V4),
            Some((&ip("10.6.153.121"), SUBNET_ANNOTATION))
        );
    }

    #[test]
    fn bad_annotations_name_the_annotation_and_show_an_example() {
        let cases = [
            (SUBNET_ANNOTATION, "{not json", "key must be a string"),
            (
                SUBNET_ANNOTATION,
                r#"{"ipv4pool":"x"}"#,
                "unknown field `ipv4pool`",
            ),
            (SUBNET_ANNOTATION, r#"{"interface":"eth0"}"#, "sets none of"),
            (SUBNET_ANNOTATION, r#"{"ipv4":""}"#, "\"ipv4\" is empty"),
            (
                SUBNET_ANNOTATION,
                r#"{"address":"10.0.0.300"}"#,
                "invalid IP address syntax",
            ),
            (SUBNETS_ANNOTATION, r#"{"ipv4":"a"}"#, "expected a sequence"),
            (
                SUBNETS_ANNOTATION,
                r#"[{"ipv4":"a"},{"ipv4":"b"}]"#,
                "more than one entry",
            ),
            (
                SUBNETS_ANNOTATION,
                r#"[{"interface":"","ipv4":"a"}]"#,
                "\"interface\" is empty",
            ),
            (
                SUBNETS_ANNOTATION,
                r#"[{"interface":"net1"}]"#,
                "neither \"ipv4\" nor \"ipv6\"",
            ),
            (
                IPPOOLS_ANNOTATION,
                r#"[{"interface":"eth0","ipv4":"p"},{"interface":"eth0","ipv6":"q"}]"#,
                "interface eth0 has more than one entry",
            ),
            (
                STATIC_IPS_ANNOTATION,
                r#"[{"interface":"eth0","ipv4":"fd00::1"}]"#,
                "invalid IPv4 address syntax",
            ),
        ];
        for (name, value, problem) in cases {
            let error = PodIpamAnnotations::parse(&annotations(&[(name, value)])).expect_err(value);
            let message = error.to_string();
            assert!(
                message.starts_with(&format!("annotation {name} is invalid: ")),
                "{message}"
            );
            assert!(message.contains(problem), "{value}: {message}");
            assert!(message.contains("write it like"), "{message}");
        }
    }

    #[test]
    fn namespace_default_subnet_forms() {
        let parse = |value: &str| {
            NamespaceDefaultSubnet::parse(&annotations(&[(DEFAULT_SUBNET_ANNOTATION, value)]))
        };
        assert_eq!(
            parse(r#"{"ipv4":"a","ipv6":"b"}"#).expect("valid"),
            Some(NamespaceDefaultSubnet::PerFamily {
                ipv4: Some("a".into()),
                ipv6: Some("b".into())
            })
        );
        assert_eq!(
            parse("subnet").expect("valid"),
            Some(NamespaceDefaultSubnet::Named("subnet".into()))
        );
        assert_eq!(
            parse(" \"subnet\" ").expect("valid"),
            Some(NamespaceDefaultSubnet::Named("subnet".into()))
        );
        for bad in [
            "",
            "two words",
            "{\"ipv4\":1}",
            "{}",
            "[\"a\"]",
            "\"unterminated",
        ] {
            let error = parse(bad).expect_err(bad);
            assert!(
                error.to_string().contains(DEFAULT_SUBNET_ANNOTATION),
                "{error}"
            );
        }
    }
}
