//! What the agent reads and writes for persistent addresses: the NetworkAttachmentDefinition an
//! interface was attached through (does it allow persistent addresses?) and the IPAMClaim the
//! address belongs to, whose status records the address and its pod.

use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::endpoints::Written;
use super::{StoreError, guard, is_conflict, is_not_found};
use crate::crd::{IpamClaim, IpamClaimStatus, NetworkAttachmentDefinition};

/// NADs and IPAMClaims, read afresh (both are read once per ADD that references a claim).
#[derive(Clone)]
pub struct ClaimStore {
    client: Client,
}

impl ClaimStore {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// The NAD `namespace/name`; `None` when it does not exist.
    pub async fn nad(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<NetworkAttachmentDefinition>, StoreError> {
        Api::<NetworkAttachmentDefinition>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|error| {
                StoreError::api(
                    format!("reading NetworkAttachmentDefinition {namespace}/{name}"),
                    error,
                )
            })
    }

    /// The IPAMClaim `namespace/name`; `None` when it does not exist (or the CRD is not
    /// installed).
    pub async fn claim(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<IpamClaim>, StoreError> {
        match Api::<IpamClaim>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
        {
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(None),
            found => found.map_err(|error| {
                StoreError::api(format!("reading IPAMClaim {namespace}/{name}"), error)
            }),
        }
    }

    /// Writes `claim`'s status as decided on the version read: a claim changed (or deleted)
    /// since is [`Written::Changed`].
    pub async fn write_status(
        &self,
        claim: &IpamClaim,
        status: &IpamClaimStatus,
    ) -> Result<Written, StoreError> {
        let namespace = claim.namespace().unwrap_or_default();
        let name = claim.name_any();
        let patch = json!({
            "metadata": {"resourceVersion": guard(claim)?},
            "status": status,
        });
        match Api::<IpamClaim>::namespaced(self.client.clone(), &namespace)
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(Written::Done),
            Err(error) if is_conflict(&error) || is_not_found(&error) => Ok(Written::Changed),
            Err(error) => Err(StoreError::api(
                format!("writing the status of IPAMClaim {namespace}/{name}"),
                error,
            )),
        }
    }
}
