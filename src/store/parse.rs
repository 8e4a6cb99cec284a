//! CRD → engine conversion, in one place: the objects the API returns hold addresses as
//! strings; after these functions they are typed (`IpAddr`, `IpNet`, [`SubnetAddresses`]), and a
//! malformed one is an error naming its object, never a silent skip.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as KubeLabelSelector;
use kube::ResourceExt;

use crate::crd::{Endpoint, EndpointInterface, IpAllocation, IpPool, Subnet};
use crate::ipam::{
    IpSet, IpamError, LabelRequirement, LabelSelector, SelectorOperator, SubnetAddresses,
    SubnetFacts,
};

/// A VirtNet object the engine cannot use as it is; the message names the object and the field.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error(
        "Subnet {subnet}: spec.subnet {value:?} is not a CIDR: write it like 10.6.0.0/16 or fd00:6::/64"
    )]
    Cidr { subnet: String, value: String },
    #[error("Subnet {subnet}: spec.gateway {value:?} is not an IP address: write it like 10.6.0.1")]
    Gateway { subnet: String, value: String },
    #[error("Subnet {subnet}: {source}")]
    Addresses {
        subnet: String,
        #[source]
        source: IpamError,
    },
    #[error(
        "Subnet {subnet}: a selector uses the operator {operator:?}; use In, NotIn, Exists or \
         DoesNotExist"
    )]
    Selector { subnet: String, operator: String },
    #[error("IPPool {pool} has an unparsable allocation key {key:?}: delete that entry")]
    AllocationKey { pool: String, key: String },
    #[error(
        "IPPool {pool}: spec.ips: {source}; fix or delete the pool so the controller re-creates it"
    )]
    PoolRanges {
        pool: String,
        #[source]
        source: IpamError,
    },
    #[error(
        "Endpoint {endpoint}: interface {interface} records {value:?}, not an address with its \
         prefix length (like 10.6.0.5/16): fix or delete the Endpoint"
    )]
    EndpointAddress {
        endpoint: String,
        interface: String,
        value: String,
    },
}

/// A Subnet's addressing (`spec.subnet`, `gateway`, `ips`, `excludeIPs`).
pub fn subnet_addresses(subnet: &Subnet) -> Result<SubnetAddresses, ParseError> {
    let spec = &subnet.spec;
    let name = subnet.name_any();
    let cidr: IpNet = spec.subnet.parse().map_err(|_| ParseError::Cidr {
        subnet: name.clone(),
        value: spec.subnet.clone(),
    })?;
    let gateway = spec
        .gateway
        .as_deref()
        .map(|value| {
            value.parse::<IpAddr>().map_err(|_| ParseError::Gateway {
                subnet: name.clone(),
                value: value.to_owned(),
            })
        })
        .transpose()?;
    SubnetAddresses::parse(cidr, gateway, &spec.ips, &spec.exclude_ips).map_err(|source| {
        ParseError::Addresses {
            subnet: name,
            source,
        }
    })
}

/// Everything Subnet selection reads of a Subnet.
pub fn subnet_facts(subnet: &Subnet) -> Result<SubnetFacts, ParseError> {
    let name = subnet.name_any();
    let selector = |selector: &Option<KubeLabelSelector>| {
        selector
            .as_ref()
            .map(|selector| label_selector(&name, selector))
            .transpose()
    };
    Ok(SubnetFacts {
        addresses: subnet_addresses(subnet)?,
        default: subnet.spec.default,
        namespace_selector: selector(&subnet.spec.namespace_selector)?,
        node_selector: selector(&subnet.spec.node_selector)?,
        name,
    })
}

/// The engine's selector for a Kubernetes one; an unknown operator makes the Subnet unusable.
fn label_selector(subnet: &str, selector: &KubeLabelSelector) -> Result<LabelSelector, ParseError> {
    let match_expressions = selector
        .match_expressions
        .iter()
        .flatten()
        .map(|expression| {
            let operator = match expression.operator.as_str() {
                "In" => SelectorOperator::In,
                "NotIn" => SelectorOperator::NotIn,
                "Exists" => SelectorOperator::Exists,
                "DoesNotExist" => SelectorOperator::DoesNotExist,
                other => {
                    return Err(ParseError::Selector {
                        subnet: subnet.to_owned(),
                        operator: other.to_owned(),
                    });
                }
            };
            Ok(LabelRequirement {
                key: expression.key.clone(),
                operator,
                values: expression.values.clone().unwrap_or_default(),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(LabelSelector {
        match_labels: selector.match_labels.clone().unwrap_or_default(),
        match_expressions,
    })
}

/// The addresses a pool's `spec.ips` owns.
pub fn pool_ranges(pool: &IpPool) -> Result<IpSet, ParseError> {
    IpSet::parse_ranges(&pool.spec.ips).map_err(|source| ParseError::PoolRanges {
        pool: pool.name_any(),
        source,
    })
}

/// A pool's `status.allocations`, keyed by typed address.
pub fn pool_allocations(pool: &IpPool) -> Result<BTreeMap<IpAddr, &IpAllocation>, ParseError> {
    pool.status
        .iter()
        .flat_map(|status| &status.allocations)
        .map(|(key, record)| {
            let address = key.parse().map_err(|_| ParseError::AllocationKey {
                pool: pool.name_any(),
                key: key.clone(),
            })?;
            Ok((address, record))
        })
        .collect()
}

/// The addresses a pool's `status.allocations` holds, as a set.
pub fn allocated_addresses(pool: &IpPool) -> Result<IpSet, ParseError> {
    Ok(pool_allocations(pool)?.into_keys().collect())
}

/// `namespace/name` of `endpoint`: how a pool record names its holder.
pub fn holder_name(endpoint: &Endpoint) -> String {
    format!(
        "{}/{}",
        endpoint.namespace().unwrap_or_default(),
        endpoint.name_any()
    )
}

/// One address an Endpoint records, with its pool.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RecordedAddress {
    pub interface: String,
    pub pool: String,
    pub address: IpAddr,
    /// The address with the prefix length it was answered with.
    pub cidr: IpNet,
    /// The gateway answered with it, if any.
    pub gateway: Option<IpAddr>,
}

/// The addresses `interface` of `endpoint` records, with their pools and gateways (an address
/// recorded without its pool is not VirtNet's to release and is left out); a malformed address
/// or gateway is an error naming the Endpoint.
pub fn interface_addresses(
    endpoint: &Endpoint,
    interface: &EndpointInterface,
) -> Result<Vec<RecordedAddress>, ParseError> {
    let malformed = |value: &String| ParseError::EndpointAddress {
        endpoint: holder_name(endpoint),
        interface: interface.interface.clone(),
        value: value.clone(),
    };
    [
        (
            &interface.ipv4_pool,
            &interface.ipv4,
            &interface.ipv4_gateway,
        ),
        (
            &interface.ipv6_pool,
            &interface.ipv6,
            &interface.ipv6_gateway,
        ),
    ]
    .into_iter()
    .filter_map(|(pool, address, gateway)| Some((pool.as_ref()?, address.as_ref()?, gateway)))
    .map(|(pool, value, gateway)| {
        let cidr: IpNet = value.parse().map_err(|_| malformed(value))?;
        let gateway = gateway
            .as_ref()
            .map(|gateway| gateway.parse().map_err(|_| malformed(gateway)))
            .transpose()?;
        Ok(RecordedAddress {
            interface: interface.interface.clone(),
            pool: pool.clone(),
            address: cidr.addr(),
            cidr,
            gateway,
        })
    })
    .collect()
}

/// Every address `endpoint` records, with its pool.
pub fn endpoint_addresses(endpoint: &Endpoint) -> Result<Vec<RecordedAddress>, ParseError> {
    let mut addresses = Vec::new();
    for interface in &endpoint.spec.interfaces {
        addresses.extend(interface_addresses(endpoint, interface)?);
    }
    Ok(addresses)
}
