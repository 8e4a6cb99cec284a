//! The plugin ↔ node agent API: HTTP/1.1 with JSON bodies over the agent's unix socket.
//!
//! | request | path | body | success (200) |
//! |---|---|---|---|
//! | ADD | `POST /v1/allocate` | [`AllocateRequest`] | [`AllocateResponse`] |
//! | DEL | `POST /v1/release` | [`ReleaseRequest`] | [`Empty`] |
//! | CHECK | `POST /v1/check` | [`CheckRequest`] | [`Empty`] |
//! | GC | `POST /v1/gc` | [`GcRequest`] | [`Empty`] |
//! | STATUS | `GET /v1/status` | none | [`Empty`] |
//! | coordinator ADD | `POST /v1/coordinator` | [`CoordinatorRequest`] | [`CoordinatorResponse`] |
//!
//! Any other status carries an [`ApiError`], whose [`ErrorKind`] decides the CNI error code the
//! plugin prints. The types are plain serde structs so both sides share them without either
//! pulling in the other's dependencies (no Kubernetes client here). Unknown fields are ignored
//! on both sides: during an upgrade an old plugin talks to a new agent and the other way round,
//! and a DEL must never fail forever over a field one side does not know yet.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::GcAttachment;
use crate::error::{CniError, ErrorCode};
use crate::result::{CniResult, Dns, IpConfig, Route};

pub const ALLOCATE_PATH: &str = "/v1/allocate";
pub const RELEASE_PATH: &str = "/v1/release";
pub const CHECK_PATH: &str = "/v1/check";
pub const GC_PATH: &str = "/v1/gc";
pub const STATUS_PATH: &str = "/v1/status";
pub const COORDINATOR_PATH: &str = "/v1/coordinator";

/// The pod annotation that names the pod interface carrying the default route (and so the
/// coordinator's veth to the node), e.g. `net1`; virtnet-coordinator's `podDefaultRouteNIC` is the
/// fallback.
pub const DEFAULT_ROUTE_NIC_ANNOTATION: &str = "coordinator.virtnet.io/default-route-nic";

/// The pod an attachment belongs to, from `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// ADD: one address from each Subnet (or from the pod's annotations, which win), for this
/// interface of this container. Replaying it returns the same addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocateRequest {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub pod: PodRef,
    /// The Subnets from the CNI config (`default_subnet` / `default_subnets`).
    pub default_subnets: Vec<String>,
    /// The CNI network the call is for: the conflist's (or NAD config's) `name`. Records keep
    /// it so that GC and CHECK of one network never touch another's; absent from plugins that
    /// predate it, and when a plugin is run by hand without a name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// One allocated address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocatedIp {
    /// The address with the prefix length of its Subnet, e.g. `10.6.153.101/16`.
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// The IPPool that recorded the allocation.
    pub pool: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiRoute {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiDns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// ADD's answer: the addresses and the routes (the default route via the Subnet's gateway plus
/// the Subnet's extra routes) and DNS the pod gets on this interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocateResponse {
    pub ips: Vec<AllocatedIp>,
    #[serde(default)]
    pub routes: Vec<ApiRoute>,
    #[serde(default)]
    pub dns: ApiDns,
}

/// DEL: give back what this interface holds; nothing held is success. The pod is known only
/// when the runtime still passes `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseRequest {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    /// The CNI network, as in [`AllocateRequest::network`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// CHECK: the agent still records an allocation for this interface of this container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckRequest {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    /// The CNI network, as in [`AllocateRequest::network`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// GC (CNI 1.1): release every allocation of this network on this node except these
/// attachments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GcRequest {
    pub valid_attachments: Vec<GcAttachment>,
    /// The CNI network, as in [`AllocateRequest::network`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// virtnet-coordinator's ADD: what it needs beyond its own config, for this interface of this
/// pod (the pod is known when the runtime passes `CNI_ARGS`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CoordinatorRequest {
    pub ifname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

/// The agent's answer to [`CoordinatorRequest`]; every field is empty when unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CoordinatorResponse {
    /// The cluster's Service CIDRs: the agent's `--service-cidr`, else the ServiceCIDR objects
    /// (networking.k8s.io/v1).
    #[serde(default, rename = "serviceCIDRs")]
    pub service_cidrs: Vec<IpNet>,
    /// The pod's [`DEFAULT_ROUTE_NIC_ANNOTATION`], validated as an interface name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_route_nic: Option<String>,
    /// For a KubeVirt virt-launcher pod: the binding of the VM interface on this pod interface,
    /// as KubeVirt names it (`passt`, `bridge`, `masquerade`, or a binding plugin's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubevirt_binding: Option<String>,
    /// The pod is the target of a KubeVirt live migration, so it shares its address with the
    /// source pod for a moment.
    #[serde(default)]
    pub migration_target: bool,
    /// The addresses VirtNet allocated to this interface of this pod (none: VirtNet allocated
    /// it nothing). virtnet-coordinator routes the node's traffic only to these: an address
    /// another IPAM put in prevResult may be someone else's. Absent when the pod is unknown or
    /// the agent predates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<Vec<IpAddr>>,
}

/// The body of a success that carries nothing (DEL, CHECK, GC, STATUS).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// What went wrong on the agent's side, in terms the plugin maps to a CNI error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ErrorKind {
    /// Every IPPool of the requested Subnet is fully allocated.
    PoolExhausted,
    /// The Subnet (or IPPool) named in the config or an annotation does not exist.
    SubnetNotFound,
    /// The address is already in use on the underlay.
    IpConflict,
    /// The request or the pod's annotations are wrong; retrying will not help.
    InvalidRequest,
    /// CHECK: the agent records no (or another) allocation for this interface.
    NotAllocated,
    /// The agent cannot serve right now (caches not synced, API server unreachable); retry.
    NotReady,
    /// Anything else; the message says what.
    Internal,
}

impl ErrorKind {
    pub fn code(self) -> ErrorCode {
        match self {
            Self::PoolExhausted => ErrorCode::POOL_EXHAUSTED,
            Self::SubnetNotFound => ErrorCode::SUBNET_NOT_FOUND,
            Self::IpConflict => ErrorCode::IP_CONFLICT,
            Self::InvalidRequest => ErrorCode::INVALID_NETWORK_CONFIG,
            Self::NotAllocated => ErrorCode::CONTAINER_UNKNOWN,
            Self::NotReady | Self::Internal => ErrorCode::TRY_AGAIN_LATER,
        }
    }
}

/// The body of every non-200 answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "camelCase")]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    /// What is wrong and what the user should do, e.g. "Subnet \"subnet\" has no free address;
    /// add an IPPool range or free addresses".
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl From<ApiError> for CniError {
    fn from(error: ApiError) -> Self {
        Self::new(error.kind.code(), error.message)
    }
}

impl From<AllocateResponse> for CniResult {
    /// An IPAM plugin's result: addresses without an interface index (the interface plugin
    /// fills that in), routes and DNS.
    fn from(response: AllocateResponse) -> Self {
        Self {
            interfaces: Vec::new(),
            ips: response
                .ips
                .into_iter()
                .map(|ip| IpConfig {
                    address: ip.address,
                    gateway: ip.gateway,
                    interface: None,
                })
                .collect(),
            routes: response
                .routes
                .into_iter()
                .map(|route| Route::new(route.dst, route.gw))
                .collect(),
            dns: Dns {
                nameservers: response.dns.nameservers,
                domain: response.dns.domain,
                search: response.dns.search,
                options: response.dns.options,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use serde_json::json;

    use super::*;
    use crate::version::CniVersion;

    #[test]
    fn fields_from_a_newer_or_older_peer_are_ignored() -> Result<(), Box<dyn Error>> {
        let release: ReleaseRequest = serde_json::from_value(json!({
            "containerID": "abc", "ifname": "eth0", "network": "macvlan",
            "fieldOfANewerPlugin": {"x": 1},
        }))?;
        assert_eq!(release.container_id, "abc");
        let answer: AllocateResponse = serde_json::from_value(json!({
            "ips": [], "routes": [], "fieldOfANewerAgent": true,
        }))?;
        assert!(answer.ips.is_empty());
        Ok(())
    }

    #[test]
    fn allocate_request_wire_format() -> Result<(), Box<dyn Error>> {
        let request = AllocateRequest {
            container_id: "abc".into(),
            ifname: "eth0".into(),
            netns: "/var/run/netns/cni-1".into(),
            pod: PodRef {
                namespace: "default".into(),
                name: "web-0".into(),
                uid: None,
            },
            default_subnets: vec!["subnet".into()],
            network: Some("macvlan".into()),
        };
        let wire = serde_json::to_value(&request)?;
        assert_eq!(
            wire,
            json!({
                "containerID": "abc", "ifname": "eth0", "netns": "/var/run/netns/cni-1",
                "pod": {"namespace": "default", "name": "web-0"},
                "defaultSubnets": ["subnet"], "network": "macvlan",
            })
        );
        assert_eq!(serde_json::from_value::<AllocateRequest>(wire)?, request);
        // A plugin that predates network names is still understood.
        let older = json!({
            "containerID": "abc", "ifname": "eth0", "netns": "/var/run/netns/cni-1",
            "pod": {"namespace": "default", "name": "web-0"}, "defaultSubnets": ["subnet"],
        });
        assert_eq!(
            serde_json::from_value::<AllocateRequest>(older)?.network,
            None
        );
        Ok(())
    }

    #[test]
    fn coordinator_wire_format() -> Result<(), Box<dyn Error>> {
        let request: CoordinatorRequest = serde_json::from_value(json!({
            "ifname": "eth0", "pod": {"namespace": "vms", "name": "virt-launcher-vm1-x"},
        }))?;
        assert_eq!(
            request.pod.map(|pod| pod.name).as_deref(),
            Some("virt-launcher-vm1-x")
        );
        let response = CoordinatorResponse {
            service_cidrs: vec!["10.96.0.0/16".parse()?],
            default_route_nic: None,
            kubevirt_binding: Some("passt".into()),
            migration_target: false,
            allocated: None,
        };
        let wire = serde_json::to_value(&response)?;
        assert_eq!(
            wire,
            json!({"serviceCIDRs": ["10.96.0.0/16"], "kubevirtBinding": "passt", "migrationTarget": false})
        );
        assert_eq!(
            serde_json::from_value::<CoordinatorResponse>(wire)?,
            response
        );
        assert_eq!(
            serde_json::from_value::<CoordinatorResponse>(json!({}))?,
            CoordinatorResponse::default()
        );
        Ok(())
    }

    #[test]
    fn gc_request_uses_the_cni_attachment_keys() -> Result<(), Box<dyn Error>> {
        let wire = json!({"validAttachments": [{"containerID": "abc", "ifname": "eth0"}]});
        let request: GcRequest = serde_json::from_value(wire.clone())?;
        assert_eq!(request.valid_attachments[0].container_id, "abc");
        assert_eq!(serde_json::to_value(&request)?, wire);
        Ok(())
    }

    #[test]
    fn error_kinds_map_to_cni_codes() -> Result<(), Box<dyn Error>> {
        for (kind, code) in [
            ("poolExhausted", ErrorCode::POOL_EXHAUSTED),
            ("subnetNotFound", ErrorCode::SUBNET_NOT_FOUND),
            ("ipConflict", ErrorCode::IP_CONFLICT),
            ("invalidRequest", ErrorCode::INVALID_NETWORK_CONFIG),
            ("notAllocated", ErrorCode::CONTAINER_UNKNOWN),
            ("notReady", ErrorCode::TRY_AGAIN_LATER),
            ("internal", ErrorCode::TRY_AGAIN_LATER),
        ] {
            let error: ApiError =
                serde_json::from_value(json!({"kind": kind, "message": "what to do"}))?;
            let cni = CniError::from(error);
            assert_eq!((cni.code, cni.msg.as_str()), (code, "what to do"), "{kind}");
        }
        Ok(())
    }

    #[test]
    fn allocate_response_becomes_an_ipam_result() -> Result<(), Box<dyn Error>> {
        let response: AllocateResponse = serde_json::from_value(json!({
            "ips": [
                {"address": "10.6.153.101/16", "gateway": "10.6.0.1", "pool": "subnet-0"},
                {"address": "fd00:6::65/64", "pool": "subnet-v6-0"},
            ],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.6.0.1"}, {"dst": "10.7.0.0/16", "gw": "10.6.0.254"}],
            "dns": {"nameservers": ["10.96.0.10"]},
        }))?;
        let result = CniResult::from(response);
        let written = serde_json::to_value(result.versioned(CniVersion::V0_3_1))?;
        assert_eq!(
            written,
            json!({
                "cniVersion": "0.3.1",
                "ips": [
                    {"version": "4", "address": "10.6.153.101/16", "gateway": "10.6.0.1"},
                    {"version": "6", "address": "fd00:6::65/64"},
                ],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.6.0.1"}, {"dst": "10.7.0.0/16", "gw": "10.6.0.254"}],
                "dns": {"nameservers": ["10.96.0.10"]},
            })
        );
        Ok(())
    }
}
