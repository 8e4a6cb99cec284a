use virtnet_cni::{CniError, ErrorCode};

/// What virtnet-coordinator itself rejects; malformed fields are reported by
/// [`virtnet_cni::fields::FieldReader`] directly.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(
        "virtnet-coordinator must be chained after an interface plugin such as macvlan; its \
         prevResult is missing (list it after macvlan in the conflist's \"plugins\")"
    )]
    MissingPrevResult,

    #[error(
        "prevResult lists no interfaces; virtnet-coordinator must run after the plugin that \
         creates the pod's interface, such as macvlan"
    )]
    NoInterfaces,

    #[error(
        "prevResult lists no IPs; the interface plugin before virtnet-coordinator must assign \
         the pod's address through its ipam section, e.g. \"ipam\": {{\"type\": \"virtnet-ipam\", \
         \"default_subnet\": \"subnet\"}}"
    )]
    NoIps,

    #[error(
        "prevResult gives interface {0:?} no IP; check that the interface plugin's ipam section \
         assigns one to CNI_IFNAME"
    )]
    NoIpsOnInterface(String),

    #[error(
        "the KubeVirt bridge binding moves the pod's MAC into the VM, which a macvlan interface \
         cannot carry; use the passt binding (or drop kubevirtBinding if this is not a VM pod)"
    )]
    KubevirtBridge,

    #[error(
        "host link {0:?} already exists, left by an earlier attachment of this container that \
         was not deleted; run CNI DEL for it or `ip link del {0}`"
    )]
    HostVethExists(String),

    #[error(
        "the pod interface is named \"veth0\", the name virtnet-coordinator gives the pod end of \
         its veth; let the interface plugin use another CNI_IFNAME such as eth0"
    )]
    PodVethNameTaken,

    #[error(
        "pod interface {0:?} is not the default-route NIC and its name does not end in a number \
         0..=152, which picks its policy routing table (100 + N); name it like net1, or set \
         podDefaultRouteNIC"
    )]
    UnnumberedInterface(String),

    #[error(
        "address {ip} of pod interface {ifname} is already in use on the underlay by MAC {mac}; \
         find that host (or stale VM) and free the address, or exclude it from the Subnet's \
         IPPools, then recreate the pod"
    )]
    IpConflict {
        ip: std::net::IpAddr,
        mac: String,
        ifname: String,
    },

    #[error(
        "gateway {gateway} did not answer ARP/neighbour solicitation on pod interface {ifname} \
         within {} ms; check the Subnet's gateway and the node's uplink/VLAN, or turn \
         detectGateway off",
        crate::probe::MAX_CHECK.as_millis()
    )]
    GatewayUnreachable {
        gateway: std::net::IpAddr,
        ifname: String,
    },

    #[error(
        "address {ip} of pod interface {ifname} was not allocated to this pod by VirtNet (the \
         agent knows only {allocated}), so virtnet-coordinator will not route the node's \
         traffic for it to this pod: it may be another workload's. Give the interface its \
         address through virtnet-ipam (a static one with the ipam.virtnet.io/static-ips \
         annotation or the network selection's ips), or leave virtnet-coordinator out of this \
         network's chain"
    )]
    NotAllocatedByVirtnet {
        ip: std::net::IpAddr,
        ifname: String,
        allocated: String,
    },

    #[error(
        "the network config has no \"name\"; virtnet-coordinator labels each host veth with its \
         network's name so that GC of one network never deletes another's: run it from a \
         conflist or NetworkAttachmentDefinition that names the network"
    )]
    NoNetworkName,

    #[error(
        "network name {0:?} cannot label a host veth (the alias \
         virtnet-coordinator:<network>/<container id>/<ifname> must fit in 255 bytes, without \
         NUL); give the network a shorter name"
    )]
    UnlabelableNetwork(String),

    #[error(
        "cannot read the node's links, which ADD needs to wire a pod ({0}); run \
         virtnet-coordinator with CAP_NET_ADMIN in the node's network namespace, as container \
         runtimes run CNI plugins"
    )]
    NodeLinksUnreadable(#[source] crate::netlink::NetlinkError),

    #[error(
        "the VirtNet agent at {} did not answer ({failure}); without it ADD cannot apply a \
         pod's default-route annotation, KubeVirt binding or VirtNet's address check: check \
         that the virtnet agent pod on this node is running and that agent_socket names its \
         socket",
        socket.display()
    )]
    AgentUnavailable {
        socket: std::path::PathBuf,
        failure: crate::agent::AgentFailure,
    },

    #[error(transparent)]
    Probe(#[from] crate::probe::ProbeError),

    #[error(transparent)]
    Netlink(#[from] crate::netlink::NetlinkError),
}

impl CoordinatorError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::MissingPrevResult
            | Self::NoInterfaces
            | Self::NoIps
            | Self::NoIpsOnInterface(_)
            | Self::KubevirtBridge
            | Self::PodVethNameTaken
            | Self::UnnumberedInterface(_)
            | Self::NotAllocatedByVirtnet { .. }
            | Self::NoNetworkName
            | Self::UnlabelableNetwork(_) => ErrorCode::INVALID_NETWORK_CONFIG,
            // STATUS: ADD cannot be served. Not 51, which says running pods may have lost
            // connectivity: their veths and routes live in the kernel and need neither.
            Self::NodeLinksUnreadable(_) | Self::AgentUnavailable { .. } => {
                ErrorCode::NOT_AVAILABLE
            }
            Self::IpConflict { .. } => ErrorCode::IP_CONFLICT,
            Self::GatewayUnreachable { .. } => ErrorCode::TRY_AGAIN_LATER,
            Self::HostVethExists(_) | Self::Probe(_) | Self::Netlink(_) => ErrorCode::IO_FAILURE,
        }
    }
}

impl From<CoordinatorError> for CniError {
    fn from(error: CoordinatorError) -> Self {
        Self::new(error.code(), error.to_string())
    }
}
