//! The ADD result, independent of spec version, and its wire layouts.
//!
//! One model ([`CniResult`]) holds everything up to spec 1.1.0. It is parsed from any supported
//! layout and written in any supported layout through [`CniResult::versioned`], which is how a
//! chained plugin converts its `prevResult` to the version its caller asked for:
//!
//! | layout | `ips[].version` | interface `mtu`/`socketPath`/`pciID`, route `mtu`/`advmss`/`priority`/`table`/`scope` | empty `dns` |
//! |---|---|---|---|
//! | 0.3.1, 0.4.0 | written (`"4"`/`"6"`) | dropped | written as `{}` |
//! | 1.0.0 | not written | dropped | omitted |
//! | 1.1.0 | not written | written | omitted |
//!
//! Parsing ignores `ips[].version` (the address says the family) and any key the spec does not
//! define, so results from other plugins are accepted as long as the fields VirtNet reads are
//! well-formed.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::error::CniError;
use crate::fields::{FieldReader, describe};
use crate::version::CniVersion;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: Option<String>,
    /// The network namespace path for interfaces inside the container; `None` on the host.
    pub sandbox: Option<String>,
    /// 1.1.0 and later.
    pub mtu: Option<u32>,
    /// 1.1.0 and later.
    pub socket_path: Option<String>,
    /// 1.1.0 and later.
    pub pci_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// The address with the prefix length of its subnet, e.g. `10.6.153.101/16`.
    pub address: IpNet,
    pub gateway: Option<IpAddr>,
    /// Index into [`CniResult::interfaces`] of the interface holding this address.
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
    /// 1.1.0 and later.
    pub mtu: Option<u32>,
    /// 1.1.0 and later.
    pub advmss: Option<u32>,
    /// 1.1.0 and later.
    pub priority: Option<u32>,
    /// 1.1.0 and later.
    pub table: Option<u32>,
    /// 1.1.0 and later.
    pub scope: Option<u32>,
}

impl Route {
    /// A route with only a destination and an optional gateway, the fields every version has.
    pub fn new(dst: IpNet, gw: Option<IpAddr>) -> Self {
        Self {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dns {
    pub nameservers: Vec<String>,
    pub domain: Option<String>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

const ADDRESS_WITH_PREFIX: &str = "an IP address with its prefix length, e.g. \"10.6.153.101/16\"";
const ADDRESS: &str = "an IP address, e.g. \"10.6.0.1\"";
const U32: &str = "a whole number in 0..=4294967295";

impl CniResult {
    /// Parses a result in any supported layout. `path` says where it came from (`prevResult`)
    /// and prefixes every message; errors are code 7.
    pub fn parse(path: &str, value: &Value) -> Result<Self, CniError> {
        let fields = value.as_object().ok_or_else(|| {
            CniError::invalid_config(format!(
                "{path} must be a CNI result object; got {}",
                describe(value)
            ))
        })?;
        let mut reader = FieldReader::new(path, fields);
        let result = Self {
            interfaces: reader
                .objects(
                    "interfaces",
                    "an interface such as {\"name\": \"eth0\"}",
                    Interface::read,
                )?
                .unwrap_or_default(),
            ips: reader
                .objects(
                    "ips",
                    "an IP such as {\"address\": \"10.6.153.101/16\"}",
                    IpConfig::read,
                )?
                .unwrap_or_default(),
            routes: reader
                .objects(
                    "routes",
                    "a route such as {\"dst\": \"0.0.0.0/0\"}",
                    Route::read,
                )?
                .unwrap_or_default(),
            dns: reader
                .object(
                    "dns",
                    "an object such as {\"nameservers\": [\"10.96.0.10\"]}",
                )?
                .map(Dns::read)
                .transpose()?
                .unwrap_or_default(),
        };
        result.check_interface_indexes(path)?;
        Ok(result)
    }

    /// This result as the JSON layout of `version`.
    pub fn versioned(&self, version: CniVersion) -> VersionedResult<'_> {
        VersionedResult {
            version,
            result: self,
        }
    }

    fn check_interface_indexes(&self, path: &str) -> Result<(), CniError> {
        for (position, ip) in self.ips.iter().enumerate() {
            if let Some(index) = ip.interface.filter(|&index| index >= self.interfaces.len()) {
                return Err(CniError::invalid_config(format!(
                    "{path}.ips[{position}].interface is {index}, but {path}.interfaces has {} \
                     entr{}; it must be the index of the interface holding {}",
                    self.interfaces.len(),
                    if self.interfaces.len() == 1 {
                        "y"
                    } else {
                        "ies"
                    },
                    ip.address,
                )));
            }
        }
        Ok(())
    }
}

impl Interface {
    fn read(mut fields: FieldReader<'_>) -> Result<Self, CniError> {
        Ok(Self {
            name: fields
                .require(
                    "name",
                    "a non-empty interface name such as \"eth0\"",
                    non_empty_str,
                )?
                .to_owned(),
            mac: fields
                .string("mac", "a MAC address string")?
                .map(str::to_owned),
            sandbox: fields
                .string("sandbox", "a network namespace path")?
                .map(str::to_owned),
            mtu: fields.get("mtu", U32, as_u32)?,
            socket_path: fields.string("socketPath", "a path")?.map(str::to_owned),
            pci_id: fields
                .string("pciID", "a PCI address string")?
                .map(str::to_owned),
        })
    }
}

impl IpConfig {
    fn read(mut fields: FieldReader<'_>) -> Result<Self, CniError> {
        Ok(Self {
            address: fields.require("address", ADDRESS_WITH_PREFIX, as_ip_net)?,
            gateway: fields.get("gateway", ADDRESS, as_ip_addr)?,
            interface: fields.get("interface", "an index into interfaces, e.g. 0", |value| {
                value.as_u64().and_then(|index| usize::try_from(index).ok())
            })?,
        })
    }
}

impl Route {
    fn read(mut fields: FieldReader<'_>) -> Result<Self, CniError> {
        Ok(Self {
            dst: fields.require("dst", "a destination CIDR, e.g. \"0.0.0.0/0\"", as_ip_net)?,
            gw: fields.get("gw", ADDRESS, as_ip_addr)?,
            mtu: fields.get("mtu", U32, as_u32)?,
            advmss: fields.get("advmss", U32, as_u32)?,
            priority: fields.get("priority", U32, as_u32)?,
            table: fields.get("table", U32, as_u32)?,
            scope: fields.get("scope", U32, as_u32)?,
        })
    }
}

impl Dns {
    fn read(mut fields: FieldReader<'_>) -> Result<Self, CniError> {
        let mut strings = |key| -> Result<Vec<String>, CniError> {
            Ok(fields
                .list(key, "a string", |item| item.as_str().map(str::to_owned))?
                .unwrap_or_default())
        };
        let nameservers = strings("nameservers")?;
        let search = strings("search")?;
        let options = strings("options")?;
        Ok(Self {
            nameservers,
            domain: fields
                .string("domain", "a domain name string")?
                .map(str::to_owned),
            search,
            options,
        })
    }
}

fn non_empty_str(value: &Value) -> Option<&str> {
    value.as_str().filter(|text| !text.is_empty())
}

fn as_u32(value: &Value) -> Option<u32> {
    value.as_u64().and_then(|number| u32::try_from(number).ok())
}

fn as_ip_net(value: &Value) -> Option<IpNet> {
    value.as_str()?.parse().ok()
}

fn as_ip_addr(value: &Value) -> Option<IpAddr> {
    value.as_str()?.parse().ok()
}

/// A [`CniResult`] bound to the layout of one spec version; serialize it to get the JSON.
#[derive(Debug, Clone, Copy)]
pub struct VersionedResult<'a> {
    pub version: CniVersion,
    pub result: &'a CniResult,
}

impl Serialize for VersionedResult<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        WireResult::new(self.version, self.result).serialize(serializer)
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireResult<'a> {
    cni_version: CniVersion,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    interfaces: Vec<WireInterface<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ips: Vec<WireIp<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    routes: Vec<WireRoute<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dns: Option<WireDns<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireInterface<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    mac: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mtu: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sandbox: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    socket_path: Option<&'a str>,
    #[serde(rename = "pciID", skip_serializing_if = "Option::is_none")]
    pci_id: Option<&'a str>,
}

#[derive(Serialize)]
struct WireIp<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    interface: Option<usize>,
    address: &'a IpNet,
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway: Option<IpAddr>,
}

#[derive(Serialize)]
struct WireRoute<'a> {
    dst: &'a IpNet,
    #[serde(skip_serializing_if = "Option::is_none")]
    gw: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mtu: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    advmss: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    table: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<u32>,
}

#[derive(Serialize)]
struct WireDns<'a> {
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    nameservers: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    domain: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    search: &'a [String],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    options: &'a [String],
}

impl<'a> WireResult<'a> {
    fn new(version: CniVersion, result: &'a CniResult) -> Self {
        // Fields a version does not define are dropped rather than passed to a runtime that
        // cannot know them.
        let v1_1 = |value: Option<u32>| value.filter(|_| version.has_v1_1_fields());
        let v1_1_str =
            |value: &'a Option<String>| value.as_deref().filter(|_| version.has_v1_1_fields());
        Self {
            cni_version: version,
            interfaces: result
                .interfaces
                .iter()
                .map(|interface| WireInterface {
                    name: &interface.name,
                    mac: interface.mac.as_deref(),
                    mtu: v1_1(interface.mtu),
                    sandbox: interface.sandbox.as_deref(),
                    socket_path: v1_1_str(&interface.socket_path),
                    pci_id: v1_1_str(&interface.pci_id),
                })
                .collect(),
            ips: result
                .ips
                .iter()
                .map(|ip| WireIp {
                    version: version.ips_carry_family().then_some(match ip.address {
                        IpNet::V4(_) => "4",
                        IpNet::V6(_) => "6",
                    }),
                    interface: ip.interface,
                    address: &ip.address,
                    gateway: ip.gateway,
                })
                .collect(),
            routes: result
                .routes
                .iter()
                .map(|route| WireRoute {
                    dst: &route.dst,
                    gw: route.gw,
                    mtu: v1_1(route.mtu),
                    advmss: v1_1(route.advmss),
                    priority: v1_1(route.priority),
                    table: v1_1(route.table),
                    scope: v1_1(route.scope),
                })
                .collect(),
            // The 0.x layouts always carry a dns object (the reference plugins print `{}`).
            dns: (version.ips_carry_family() || !result.dns.is_empty()).then(|| WireDns {
                nameservers: &result.dns.nameservers,
                domain: result.dns.domain.as_deref(),
                search: &result.dns.search,
                options: &result.dns.options,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use serde_json::json;

    use super::*;
    use crate::error::ErrorCode;

    /// Every field of every version set, two interfaces, both families.
    fn full_result() -> Result<CniResult, Box<dyn Error>> {
        Ok(CniResult {
            interfaces: vec![
                Interface {
                    name: "veth1234".into(),
                    mac: Some("aa:bb:cc:dd:ee:01".into()),
                    sandbox: None,
                    mtu: Some(1500),
                    socket_path: None,
                    pci_id: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("aa:bb:cc:dd:ee:02".into()),
                    sandbox: Some("/var/run/netns/cni-1".into()),
                    mtu: Some(9000),
                    socket_path: Some("/run/vhost.sock".into()),
                    pci_id: Some("0000:00:1f.6".into()),
                },
            ],
            ips: vec![
                IpConfig {
                    address: "10.6.153.101/16".parse()?,
                    gateway: Some("10.6.0.1".parse()?),
                    interface: Some(1),
                },
                IpConfig {
                    address: "fd00:6::65/64".parse()?,
                    gateway: None,
                    interface: Some(1),
                },
            ],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse()?,
                gw: Some("10.6.0.1".parse()?),
                mtu: Some(1400),
                advmss: Some(1360),
                priority: Some(100),
                table: Some(500),
                scope: Some(0),
            }],
            dns: Dns {
                nameservers: vec!["10.96.0.10".into()],
                domain: Some("cluster.local".into()),
                search: vec!["default.svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            },
        })
    }

    /// What survives a trip through a layout without the 1.1.0 fields.
    fn without_v1_1_fields(mut result: CniResult) -> CniResult {
        for interface in &mut result.interfaces {
            interface.mtu = None;
            interface.socket_path = None;
            interface.pci_id = None;
        }
        for route in &mut result.routes {
            *route = Route::new(route.dst, route.gw);
        }
        result
    }

    fn to_json(result: &CniResult, version: CniVersion) -> Result<Value, serde_json::Error> {
        serde_json::to_value(result.versioned(version))
    }

    #[test]
    fn layout_0_3_1_and_0_4_0_tag_ip_families_and_drop_1_1_fields() -> Result<(), Box<dyn Error>> {
        for version in [CniVersion::V0_3_1, CniVersion::V0_4_0] {
            assert_eq!(
                to_json(&full_result()?, version)?,
                json!({
                    "cniVersion": version.as_str(),
                    "interfaces": [
                        {"name": "veth1234", "mac": "aa:bb:cc:dd:ee:01"},
                        {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/var/run/netns/cni-1"},
                    ],
                    "ips": [
                        {"version": "4", "interface": 1, "address": "10.6.153.101/16", "gateway": "10.6.0.1"},
                        {"version": "6", "interface": 1, "address": "fd00:6::65/64"},
                    ],
                    "routes": [{"dst": "0.0.0.0/0", "gw": "10.6.0.1"}],
                    "dns": {
                        "nameservers": ["10.96.0.10"],
                        "domain": "cluster.local",
                        "search": ["default.svc.cluster.local"],
                        "options": ["ndots:5"],
                    },
                })
            );
        }
        Ok(())
    }

    #[test]
    fn layout_1_0_0_drops_ip_families_and_1_1_fields() -> Result<(), Box<dyn Error>> {
        let json = to_json(&full_result()?, CniVersion::V1_0_0)?;
        assert_eq!(
            json["ips"][0],
            json!({"interface": 1, "address": "10.6.153.101/16", "gateway": "10.6.0.1"})
        );
        assert_eq!(
            json["routes"],
            json!([{"dst": "0.0.0.0/0", "gw": "10.6.0.1"}])
        );
        assert_eq!(
            json["interfaces"][1],
            json!({"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/var/run/netns/cni-1"})
        );
        Ok(())
    }

    #[test]
    fn layout_1_1_0_keeps_every_field() -> Result<(), Box<dyn Error>> {
        let json = to_json(&full_result()?, CniVersion::V1_1_0)?;
        assert_eq!(
            json["interfaces"][1],
            json!({
                "name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "mtu": 9000,
                "sandbox": "/var/run/netns/cni-1", "socketPath": "/run/vhost.sock", "pciID": "0000:00:1f.6",
            })
        );
        assert_eq!(
            json["routes"][0],
            json!({"dst": "0.0.0.0/0", "gw": "10.6.0.1", "mtu": 1400, "advmss": 1360, "priority": 100, "table": 500, "scope": 0})
        );
        assert!(json["ips"][0].get("version").is_none());
        Ok(())
    }

    #[test]
    fn every_version_round_trips() -> Result<(), Box<dyn Error>> {
        for version in CniVersion::SUPPORTED {
            let written = to_json(&full_result()?, version)?;
            let parsed = CniResult::parse("prevResult", &written)?;
            let expected = if version.has_v1_1_fields() {
                full_result()?
            } else {
                without_v1_1_fields(full_result()?)
            };
            assert_eq!(parsed, expected, "round trip through {version}");
        }
        Ok(())
    }

    #[test]
    fn empty_dns_is_written_only_in_0_x_layouts() -> Result<(), Box<dyn Error>> {
        let result = CniResult::default();
        assert_eq!(
            to_json(&result, CniVersion::V0_3_1)?,
            json!({"cniVersion": "0.3.1", "dns": {}})
        );
        assert_eq!(
            to_json(&result, CniVersion::V1_0_0)?,
            json!({"cniVersion": "1.0.0"})
        );
        Ok(())
    }

    #[test]
    fn macvlan_0_3_1_prev_result_converts_to_1_0_0_and_back() -> Result<(), Box<dyn Error>> {
        // What the reference macvlan plugin prints for the conflist in the VirtNet README.
        let macvlan = json!({
            "cniVersion": "0.3.1",
            "interfaces": [{"name": "eth0", "mac": "7a:1f:4c:2e:aa:01", "sandbox": "/var/run/netns/cni-42"}],
            "ips": [{"version": "4", "interface": 0, "address": "10.6.153.101/16"}],
            "dns": {},
        });
        let result = CniResult::parse("prevResult", &macvlan)?;
        assert_eq!(
            to_json(&result, CniVersion::V1_0_0)?,
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "mac": "7a:1f:4c:2e:aa:01", "sandbox": "/var/run/netns/cni-42"}],
                "ips": [{"interface": 0, "address": "10.6.153.101/16"}],
            })
        );
        assert_eq!(to_json(&result, CniVersion::V0_3_1)?, macvlan);
        Ok(())
    }

    #[test]
    fn unknown_keys_from_other_plugins_are_ignored() -> Result<(), Box<dyn Error>> {
        let result = CniResult::parse(
            "prevResult",
            &json!({"ips": [{"address": "10.0.0.2/24", "vendorExtension": true}], "extra": 1}),
        )?;
        assert_eq!(result.ips.len(), 1);
        Ok(())
    }

    #[test]
    fn malformed_results_name_the_bad_field() {
        let cases = [
            (
                json!([]),
                "prevResult must be a CNI result object; got a list",
            ),
            (
                json!({"ips": [{"address": "10.6.153.101"}]}),
                "prevResult.ips[0].address must be an IP address with its prefix length",
            ),
            (
                json!({"ips": [{"gateway": "10.0.0.1"}]}),
                "prevResult.ips[0].address is missing",
            ),
            (
                json!({"ips": "10.0.0.2/24"}),
                "prevResult.ips must be a list",
            ),
            (
                json!({"interfaces": [{"name": ""}]}),
                "prevResult.interfaces[0].name must be a non-empty",
            ),
            (
                json!({"routes": [{"dst": "default"}]}),
                "prevResult.routes[0].dst must be a destination CIDR",
            ),
            (
                json!({"routes": [{"dst": "0.0.0.0/0", "table": -1}]}),
                "prevResult.routes[0].table must be a whole number",
            ),
            (
                json!({"interfaces": [{"name": "eth0"}], "ips": [{"address": "10.0.0.2/24", "interface": 1}]}),
                "prevResult.ips[0].interface is 1, but prevResult.interfaces has 1 entry",
            ),
            (
                json!({"dns": {"nameservers": "10.96.0.10"}}),
                "prevResult.dns.nameservers must be a list",
            ),
        ];
        for (value, needle) in cases {
            let error = CniResult::parse("prevResult", &value).expect_err("malformed result");
            assert_eq!(error.code, ErrorCode::INVALID_NETWORK_CONFIG);
            assert!(error.msg.starts_with(needle), "{value}: {}", error.msg);
        }
    }
}
