//! The CNI spec versions VirtNet's plugins speak, and the VERSION reply.

use std::fmt;

use serde::{Serialize, Serializer};

use crate::error::CniError;

/// A supported CNI spec version. Ordered, so `version >= CniVersion::V0_4_0` reads naturally.
///
/// 0.3.0 and older are not supported: no maintained runtime sends them, and the conflist VirtNet
/// users write declares 0.3.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    pub const SUPPORTED: [Self; 4] = [Self::V0_3_1, Self::V0_4_0, Self::V1_0_0, Self::V1_1_0];
    pub const LATEST: Self = Self::V1_1_0;

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::V0_3_1 => "0.3.1",
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }

    /// Parses the `cniVersion` a config declares. Anything else is error code 1, listing what
    /// is supported so the user can pick one.
    pub fn from_declared(declared: &str) -> Result<Self, CniError> {
        Self::SUPPORTED
            .into_iter()
            .find(|version| version.as_str() == declared)
            .ok_or_else(|| {
                CniError::incompatible_version(format!(
                    "cniVersion {declared:?} is not supported; set \"cniVersion\" to one of {}",
                    supported_list()
                ))
            })
    }

    /// 0.3.x and 0.4.0 results tag every IP with `"version": "4"|"6"`; 1.0.0 dropped it.
    pub fn ips_carry_family(self) -> bool {
        self < Self::V1_0_0
    }

    /// 1.1.0 added interface `mtu`/`socketPath`/`pciID` and route `mtu`/`advmss`/`priority`/
    /// `table`/`scope`.
    pub fn has_v1_1_fields(self) -> bool {
        self >= Self::V1_1_0
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for CniVersion {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// "0.3.1, 0.4.0, 1.0.0, 1.1.0", for messages.
pub fn supported_list() -> String {
    CniVersion::SUPPORTED.map(CniVersion::as_str).join(", ")
}

/// The reply to `CNI_COMMAND=VERSION`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionReply {
    pub cni_version: CniVersion,
    pub supported_versions: [CniVersion; 4],
}

impl Default for VersionReply {
    fn default() -> Self {
        Self {
            cni_version: CniVersion::LATEST,
            supported_versions: CniVersion::SUPPORTED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn parses_every_supported_version() -> Result<(), CniError> {
        for version in CniVersion::SUPPORTED {
            assert_eq!(CniVersion::from_declared(version.as_str())?, version);
        }
        Ok(())
    }

    #[test]
    fn unsupported_version_is_code_1_and_lists_the_supported_ones() {
        for declared in ["0.2.0", "0.3.0", "9.9.9", "1.1", ""] {
            let Err(error) = CniVersion::from_declared(declared) else {
                panic!("{declared:?} must be rejected");
            };
            assert_eq!(error.code, ErrorCode::INCOMPATIBLE_VERSION);
            assert!(
                error.msg.contains("0.3.1, 0.4.0, 1.0.0, 1.1.0"),
                "{}",
                error.msg
            );
        }
    }

    #[test]
    fn version_reply_matches_the_spec_shape() -> Result<(), serde_json::Error> {
        assert_eq!(
            serde_json::to_string(&VersionReply::default())?,
            r#"{"cniVersion":"1.1.0","supportedVersions":["0.3.1","0.4.0","1.0.0","1.1.0"]}"#
        );
        Ok(())
    }
}
