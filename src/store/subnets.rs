//! Subnet reads and the status the controller reports on them.

use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
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
