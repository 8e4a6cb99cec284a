//! Subnet reads and the status the controller reports on them.

use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::StoreError;
use crate::crd::{Subnet, SubnetStatus};

/// Subnets in the API server.
#[derive(Clone)]
pub struct SubnetStore {
    api: Api<Subnet>,
}

impl SubnetStore {
    pub fn new(client: Client) -> Self {
        Self {
            api: Api::all(client),
        }
    }

    /// A fresh list of every Subnet.
    pub async fn list(&self) -> Result<Vec<Subnet>, StoreError> {
        Ok(self
            .api
            .list(&Default::default())
            .await
            .map_err(|error| StoreError::api("listing Subnets", error))?
            .items)
    }

    /// Adds (`hold`) or removes `finalizer` on `subnet`, keeping every other finalizer; guarded
    /// by the resourceVersion the decision was made on, so that no one else's finalizer change
    /// is lost (a conflict is retried by the reconciler on a fresh read). A Subnet already gone
    /// has nothing left to hold.
    pub async fn hold_finalizer(
        &self,
        subnet: &Subnet,
        finalizer: &str,
        hold: bool,
    ) -> Result<(), StoreError> {
        let name = subnet.name_any();
        let resource_version =
            subnet
                .resource_version()
                .ok_or_else(|| StoreError::MissingResourceVersion {
                    kind: "Subnet".to_owned(),
                    name: name.clone(),
                })?;
        let mut finalizers: Vec<&str> = subnet
            .finalizers()
            .iter()
            .map(String::as_str)
            .filter(|kept| *kept != finalizer)
            .collect();
        if hold {
            finalizers.push(finalizer);
        }
        let patch = json!({
            "metadata": {"resourceVersion": resource_version, "finalizers": finalizers},
        });
        match self
            .api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(error) if super::is_not_found(&error) => Ok(()),
            Err(error) => Err(StoreError::api(
                format!("writing the finalizers of Subnet {name}"),
                error,
            )),
        }
    }

    /// Writes a Subnet's status. Unguarded on purpose: the status is the controller's alone (one
    /// leader at a time) and is recomputed from the pools on every reconcile, so the last write
    /// is the right one.
    pub async fn write_status(&self, name: &str, status: &SubnetStatus) -> Result<(), StoreError> {
        self.api
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": status})),
            )
            .await
            .map_err(|error| {
                StoreError::api(format!("writing the status of Subnet {name}"), error)
            })?;
        Ok(())
    }
}
