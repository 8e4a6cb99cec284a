//! The seam between virtnet-ipam and the node agent.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use virtnet_cni::CniResult;
use virtnet_cni::config::GcAttachment;
use virtnet_cni::env::{Attachment, CniArgs, Detachment};

use crate::error::IpamError;

/// Where the node agent listens and how long one request may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEndpoint {
    pub socket: PathBuf,
    pub timeout: Duration,
}

/// The pod an allocation is for, from `CNI_ARGS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: Option<&'a str>,
}

impl<'a> PodRef<'a> {
    /// The agent keys allocations by pod, so ADD cannot proceed without one.
    pub fn from_args(args: &'a CniArgs) -> Result<Self, IpamError> {
        let pod = &args.pod;
        Ok(Self {
            namespace: pod
                .namespace
                .as_deref()
                .ok_or(IpamError::MissingPodIdentity {
                    missing: "K8S_POD_NAMESPACE",
                })?,
            name: pod.name.as_deref().ok_or(IpamError::MissingPodIdentity {
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
        attachment: &'a Attachment,
        pod: PodRef<'a>,
        subnets: &'a [String],
    },
    /// DEL: give back whatever this interface holds (nothing held is success).
    Release { detachment: &'a Detachment },
    /// CHECK: confirm the agent still records this interface's allocation.
    Check { attachment: &'a Attachment },
    /// GC: release allocations of attachments the runtime no longer lists.
    GarbageCollect {
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
            Self::Release { detachment } => write!(
                f,
                "release interface {} of container {}",
                detachment.ifname, detachment.container_id
            ),
            Self::Check { attachment } => write!(
                f,
                "check interface {} of container {}",
                attachment.ifname, attachment.container_id
            ),
            Self::GarbageCollect { valid_attachments } => write!(
                f,
                "release every allocation except {} valid attachment(s)",
                valid_attachments.len()
            ),
            Self::Status => f.write_str("report whether it can allocate"),
        }
    }
}

impl AgentEndpoint {
    /// Sends `request` to the node agent and returns its answer: the addresses, routes and DNS
    /// for Allocate, an empty result for everything else.
    ///
    /// AGENT CLIENT: this is the one function that talks to the agent. It is not written yet
    /// (the agent's API lands with the agent); until then every request reports the agent as
    /// unreachable, which the runtime retries. Callers have validated the config and the
    /// environment before they get here.
    pub fn send(&self, request: &AgentRequest<'_>) -> Result<CniResult, IpamError> {
        tracing::debug!(
            socket = %self.socket.display(),
            timeout_ms = self.timeout.as_millis(),
            "asking the VirtNet agent to {request}"
        );
        Err(IpamError::AgentUnreachable {
            socket: self.socket.clone(),
        })
    }
}
