//! CNI errors: the spec's error codes, VirtNet's own codes, and the JSON reply a failing plugin
//! prints on stdout.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::version::CniVersion;

/// A CNI error code. The spec reserves 0–99; VirtNet's own codes start at 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// The config's `cniVersion` is not one this plugin speaks.
    pub const INCOMPATIBLE_VERSION: Self = Self(1);
    /// The config has a field the plugin recognises but does not support.
    pub const UNSUPPORTED_FIELD: Self = Self(2);
    /// The container is unknown or does not exist.
    pub const CONTAINER_UNKNOWN: Self = Self(3);
    /// A required `CNI_*` environment variable is missing or malformed.
    pub const INVALID_ENVIRONMENT: Self = Self(4);
    /// Reading stdin, a file or a socket failed.
    pub const IO_FAILURE: Self = Self(5);
    /// stdin (or another input) could not be decoded.
    pub const DECODE_FAILURE: Self = Self(6);
    /// The network config is well-formed JSON but its content is wrong.
    pub const INVALID_NETWORK_CONFIG: Self = Self(7);
    /// A transient condition; the runtime should retry the same operation later.
    pub const TRY_AGAIN_LATER: Self = Self(11);
    /// STATUS: the plugin cannot serve ADD requests at all.
    pub const NOT_AVAILABLE: Self = Self(50);
    /// STATUS: ADD works, but pods will have limited connectivity.
    pub const LIMITED_CONNECTIVITY: Self = Self(51);

    /// VirtNet: every IPPool of the requested Subnet is fully allocated.
    pub const POOL_EXHAUSTED: Self = Self(100);
    /// VirtNet: the Subnet named in the config or a pod annotation does not exist.
    pub const SUBNET_NOT_FOUND: Self = Self(101);
    /// VirtNet: the address handed to the pod is already in use on the underlay.
    pub const IP_CONFLICT: Self = Self(102);
    /// VirtNet: the node agent answered something the plugin cannot understand (version skew).
    pub const AGENT_PROTOCOL: Self = Self(103);
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The error every VirtNet plugin operation ends in. `msg` says what is wrong and how to fix it;
/// `details` carries the underlying cause (an OS error, a parser message) when there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    #[must_use]
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn incompatible_version(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::INCOMPATIBLE_VERSION, msg)
    }

    pub fn invalid_environment(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::INVALID_ENVIRONMENT, msg)
    }

    pub fn decode_failure(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::DECODE_FAILURE, msg)
    }

    pub fn invalid_config(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::INVALID_NETWORK_CONFIG, msg)
    }

    pub fn io_failure(msg: impl Into<String>, cause: &std::io::Error) -> Self {
        Self::new(ErrorCode::IO_FAILURE, msg).with_details(cause.to_string())
    }

    /// The error as the JSON object the spec wants on stdout, labelled with `version`.
    pub fn reply(&self, version: CniVersion) -> ErrorReply {
        ErrorReply {
            cni_version: version.as_str().to_owned(),
            code: self.code,
            msg: self.msg.clone(),
            details: self.details.clone(),
        }
    }
}

/// The spec's error result. Deserializable too, so tests and callers of other plugins can read
/// one back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorReply {
    pub cni_version: String,
    pub code: ErrorCode,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_omits_empty_details_and_keeps_the_code() -> Result<(), serde_json::Error> {
        let error = CniError::invalid_config("ipam.default_subnet must be a string");
        let json = serde_json::to_value(error.reply(CniVersion::V0_3_1))?;
        assert_eq!(
            json,
            serde_json::json!({
                "cniVersion": "0.3.1",
                "code": 7,
                "msg": "ipam.default_subnet must be a string",
            })
        );
        Ok(())
    }

    #[test]
    fn reply_round_trips_with_details() -> Result<(), serde_json::Error> {
        let cause = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "pipe closed");
        let reply = CniError::io_failure("cannot read stdin", &cause).reply(CniVersion::V1_1_0);
        let parsed: ErrorReply = serde_json::from_str(&serde_json::to_string(&reply)?)?;
        assert_eq!(parsed, reply);
        assert_eq!(parsed.code, ErrorCode::IO_FAILURE);
        assert_eq!(parsed.details, "pipe closed");
        Ok(())
    }
}
