//! The seam between virtnet-ipam and the node agent.

use std::fmt;
use std::time::Duration;

use hyper::{Method, StatusCode};
use virtnet_cni::CniResult;
use virtnet_cni::agent_api as api;
use virtnet_cni::agent_client::{self, TransportError};
use virtnet_cni::config::GcAttachment;
use virtnet_cni::env::{Attachment, CniArgs, Detachment};
use virtnet_cni::trusted::TrustedPath;

use crate::error::IpamPluginError;

/// Where the node agent listens and how long one request may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEndpoint {
    pub socket: TrustedPath,
    pub timeout: Duration,
}

/// The pod an allocation is for, from `CNI_ARGS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodIdentity<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: Option<&'a str>,
}

impl<'a> PodIdentity<'a> {
    /// The agent keys allocations by pod, so ADD cannot proceed without one.
    pub fn from_args(args: &'a CniArgs) -> Result<Self, IpamPluginError> {
        let pod = &args.pod;
        Ok(Self {
            namespace: pod
                .namespace
                .as_deref()
                .ok_or(IpamPluginError::MissingPodIdentity {
                    missing: "K8S_POD_NAMESPACE",
                })?,
            name: pod
                .name
                .as_deref()
                .ok_or(IpamPluginError::MissingPodIdentity {
                    missing: "K8S_POD_NAME",
                })?,
            uid: pod.uid.as_deref(),
        })
    }
}

/// What virtnet-ipam asks the node agent to do, one variant per CNI command.
#[derive(Debug, Clone, Copy)]
pub enum AgentRequest<'a> {
    /// ADD: one address from each Subnet, for this interface of this pod.
    Allocate {
        network: Option<&'a str>,
        attachment: &'a Attachment,
        pod: PodIdentity<'a>,
        subnets: &'a [String],
    },
    /// DEL: give back whatever this interface holds (nothing held is success).
    Release {
        network: Option<&'a str>,
        detachment: &'a Detachment,
    },
    /// CHECK: confirm the agent still records this interface's allocation.
    Check {
        network: Option<&'a str>,
        attachment: &'a Attachment,
    },
    /// GC: release this network's allocations of attachments the runtime no longer lists.
    GarbageCollect {
        network: Option<&'a str>,
        valid_attachments: &'a [GcAttachment],
    },
    /// STATUS: can the agent serve ADD right now?
    Status,
}

impl fmt::Display for AgentRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Allocate {
                attachment,
                pod,
                subnets,
                ..
            } => write!(
                f,
                "allocate from {} for {}/{} (uid {}) interface {} of container {}",
                subnets.join(", "),
                pod.namespace,
                pod.name,
                pod.uid.unwrap_or("unknown"),
                attachment.ifname,
                attachment.container_id,
            ),
            Self::Release { detachment, .. } => write!(
                f,
                "release interface {} of container {}",
                detachment.ifname, detachment.container_id
            ),
            Self::Check { attachment, .. } => write!(
                f,
                "check interface {} of container {}",
                attachment.ifname, attachment.container_id
            ),
            Self::GarbageCollect {
                network,
                valid_attachments,
            } => write!(
                f,
                "release every allocation of network {} except {} valid attachment(s)",
                network.unwrap_or("(unnamed)"),
                valid_attachments.len()
            ),
            Self::Status => f.write_str("report whether it can allocate"),
        }
    }
}

impl AgentRequest<'_> {
    /// The HTTP method, path and JSON body that carry this request to the agent.
    fn wire(&self) -> Result<(Method, &'static str, Vec<u8>), serde_json::Error> {
        let post = |path, body: Result<Vec<u8>, _>| body.map(|body| (Method::POST, path, body));
        match *self {
            Self::Allocate {
                network,
                attachment,
                pod,
                subnets,
            } => post(
                api::ALLOCATE_PATH,
                serde_json::to_vec(&api::AllocateRequest {
                    container_id: attachment.container_id.clone(),
                    ifname: attachment.ifname.clone(),
                    netns: attachment.netns.to_string_lossy().into_owned(),
                    pod: pod.to_api(),
                    default_subnets: subnets.to_vec(),
                    network: network.map(str::to_owned),
                }),
            ),
            Self::Release {
                network,
                detachment,
            } => post(
                api::RELEASE_PATH,
                serde_json::to_vec(&api::ReleaseRequest {
                    container_id: detachment.container_id.clone(),
                    ifname: detachment.ifname.clone(),
                    pod: PodIdentity::from_args(&detachment.args)
                        .ok()
                        .map(PodIdentity::to_api),
                    network: network.map(str::to_owned),
                }),
            ),
            Self::Check {
                network,
                attachment,
            } => post(
                api::CHECK_PATH,
                serde_json::to_vec(&api::CheckRequest {
                    container_id: attachment.container_id.clone(),
                    ifname: attachment.ifname.clone(),
                    pod: PodIdentity::from_args(&attachment.args)
                        .ok()
                        .map(PodIdentity::to_api),
                    network: network.map(str::to_owned),
                }),
            ),
            Self::GarbageCollect {
                network,
                valid_attachments,
            } => post(
                api::GC_PATH,
                serde_json::to_vec(&api::GcRequest {
                    valid_attachments: valid_attachments.to_vec(),
                    network: network.map(str::to_owned),
                }),
            ),
            Self::Status => Ok((Method::GET, api::STATUS_PATH, Vec::new())),
        }
    }

    /// Reads the agent's success body: the addresses for Allocate, nothing for the rest.
    fn decode(&self, body: &[u8]) -> Result<CniResult, serde_json::Error> {
        match self {
            Self::Allocate { .. } => {
                serde_json::from_slice::<api::AllocateResponse>(body).map(CniResult::from)
            }
            _ => serde_json::from_slice::<api::Empty>(body).map(|_| CniResult::default()),
        }
    }
}

impl PodIdentity<'_> {
    fn to_api(self) -> api::PodRef {
        api::PodRef {
            namespace: self.namespace.to_owned(),
            name: self.name.to_owned(),
            uid: self.uid.map(str::to_owned),
        }
    }
}

impl AgentEndpoint {
    /// Sends `request` to the node agent (HTTP/1.1 + JSON over its unix socket, see
    /// [`virtnet_cni::agent_api`]) and returns its answer: the addresses, routes and DNS for
    /// Allocate, an empty result for everything else. The whole exchange, connecting included,
    /// is bounded by `timeout`. Callers have validated the config and the environment.
    pub fn send(&self, request: &AgentRequest<'_>) -> Result<CniResult, IpamPluginError> {
        tracing::debug!(
            socket = %self.socket.as_path().display(),
            timeout_ms = self.timeout.as_millis(),
            "asking the VirtNet agent to {request}"
        );
        let (method, path, body) = request.wire().map_err(|error| self.protocol(&error))?;
        let (status, answer) =
            agent_client::exchange(&self.socket, self.timeout, method, path, body)
                .map_err(|error| self.transport(error))?;
        tracing::debug!(%status, "the VirtNet agent answered");
        if status == StatusCode::OK {
            return request
                .decode(&answer)
                .map_err(|error| self.protocol(&error));
        }
        let error: api::ApiError = serde_json::from_slice(&answer).map_err(|error| {
            self.protocol(&format!(
                "HTTP {status} with a body that is not an agent error ({error}): {}",
                String::from_utf8_lossy(&answer)
            ))
        })?;
        Err(IpamPluginError::Agent(error))
    }

    fn transport(&self, error: TransportError) -> IpamPluginError {
        let socket = self.socket.as_path().to_path_buf();
        match error {
            TransportError::Runtime(cause) => IpamPluginError::Runtime(cause),
            TransportError::Unreachable(cause) => {
                IpamPluginError::AgentUnreachable { socket, cause }
            }
            TransportError::Dropped(cause) => IpamPluginError::AgentDropped { socket, cause },
            TransportError::Timeout(timeout) => IpamPluginError::AgentTimeout {
                socket,
                timeout_ms: timeout.as_millis(),
            },
            TransportError::Request(error) => self.protocol(&error),
        }
    }

    fn protocol(&self, details: &dyn fmt::Display) -> IpamPluginError {
        IpamPluginError::AgentProtocol {
            socket: self.socket.as_path().to_path_buf(),
            details: details.to_string(),
        }
    }
}
