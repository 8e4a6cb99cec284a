use std::path::PathBuf;

use virtnet_cni::agent_api as api;
use virtnet_cni::{CniError, ErrorCode};

/// Everything virtnet-ipam itself can reject or fail at; malformed fields are reported by
/// [`virtnet_cni::fields::FieldReader`] directly.
#[derive(Debug, thiserror::Error)]
pub enum IpamPluginError {
    #[error(
        "the network config has no \"ipam\" section; virtnet-ipam reads its settings from \
         \"ipam\": {{\"type\": \"virtnet-ipam\", \"default_subnet\": \"<Subnet name>\"}}"
    )]
    MissingIpamSection,

    #[error(
        "ipam.type is {found:?}, but this is virtnet-ipam; set \"type\": \"virtnet-ipam\" in the \
         ipam section"
    )]
    WrongType { found: String },

    #[error(
        "the ipam section names no Subnet to allocate from; set \"default_subnet\": \"<Subnet \
         name>\", or \"default_subnets\": [\"<IPv4 Subnet>\", \"<IPv6 Subnet>\"] for dual stack"
    )]
    NoSubnet,

    #[error(
        "the ipam section sets both default_subnet and default_subnets; keep only one \
         (default_subnets takes a list, e.g. [\"subnet-v4\", \"subnet-v6\"])"
    )]
    BothSubnetKeys,

    #[error("ipam.default_subnets is empty; list at least one Subnet, e.g. [\"subnet\"]")]
    EmptySubnetList,

    #[error("ipam.default_subnets lists {name:?} more than once; list each Subnet once")]
    DuplicateSubnet { name: String },

    #[error(
        "CNI_ARGS has no {missing}; virtnet-ipam needs the pod's K8S_POD_NAMESPACE and \
         K8S_POD_NAME, which the container runtime sets when kubelet creates a pod"
    )]
    MissingPodIdentity { missing: &'static str },

    #[error(
        "the VirtNet agent is not reachable at {}: is the virtnet-agent DaemonSet running on \
         this node?",
        socket.display()
    )]
    AgentUnreachable {
        socket: PathBuf,
        cause: std::io::Error,
    },

    #[error(
        "the VirtNet agent at {} did not answer within {timeout_ms} ms; check the agent's logs \
         (kubectl -n kube-system logs on this node's virtnet-agent pod) or raise ipam.timeout_ms",
        socket.display()
    )]
    AgentTimeout { socket: PathBuf, timeout_ms: u128 },

    #[error(
        "the VirtNet agent at {} dropped the request; check the agent's logs, it may have \
         restarted",
        socket.display()
    )]
    AgentDropped {
        socket: PathBuf,
        cause: hyper::Error,
    },

    #[error(
        "the VirtNet agent at {} answered something virtnet-ipam cannot read ({details}); \
         install the virtnet-ipam binary from the same VirtNet release as the agent",
        socket.display()
    )]
    AgentProtocol { socket: PathBuf, details: String },

    /// The agent refused or failed the request; its message says what to do.
    #[error(transparent)]
    Agent(api::ApiError),

    #[error("cannot start virtnet-ipam's I/O runtime: {0}")]
    Runtime(std::io::Error),

    /// STATUS reports any failure as "not available", as the spec asks.
    #[error(transparent)]
    NotAvailable(Box<IpamPluginError>),
}

impl IpamPluginError {
    /// The underlying cause, reported as the CNI error's `details`.
    fn cause(&self) -> Option<String> {
        match self {
            Self::AgentUnreachable { cause, .. } | Self::Runtime(cause) => Some(cause.to_string()),
            Self::AgentDropped { cause, .. } => Some(cause.to_string()),
            Self::NotAvailable(inner) => inner.cause(),
            _ => None,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            Self::MissingIpamSection
            | Self::WrongType { .. }
            | Self::NoSubnet
            | Self::BothSubnetKeys
            | Self::EmptySubnetList
            | Self::DuplicateSubnet { .. } => ErrorCode::INVALID_NETWORK_CONFIG,
            Self::MissingPodIdentity { .. } => ErrorCode::INVALID_ENVIRONMENT,
            Self::AgentUnreachable { .. }
            | Self::AgentTimeout { .. }
            | Self::AgentDropped { .. } => ErrorCode::TRY_AGAIN_LATER,
            Self::AgentProtocol { .. } => ErrorCode::AGENT_PROTOCOL,
            Self::Agent(error) => error.kind.code(),
            Self::Runtime(_) => ErrorCode::IO_FAILURE,
            Self::NotAvailable(_) => ErrorCode::NOT_AVAILABLE,
        }
    }
}

impl From<IpamPluginError> for CniError {
    fn from(error: IpamPluginError) -> Self {
        let cni = Self::new(error.code(), error.to_string());
        match error.cause() {
            Some(cause) => cni.with_details(cause),
            None => cni,
        }
    }
}
