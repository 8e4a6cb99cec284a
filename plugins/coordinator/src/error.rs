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
}

impl CoordinatorError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::MissingPrevResult | Self::NoInterfaces | Self::NoIps => {
                ErrorCode::INVALID_NETWORK_CONFIG
            }
        }
    }
}

impl From<CoordinatorError> for CniError {
    fn from(error: CoordinatorError) -> Self {
        Self::new(error.code(), error.to_string())
    }
}
