//! Fresh (quorum) reads of the objects the controller's release decisions rest on: before an
//! address is released because a pod or node looks gone in a watch cache, the controller reads
//! it again here, so a lagging watch or a stale cache never releases a live pod's address.

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{Api, Client};

use super::StoreError;

/// Pods and Nodes, read afresh.
#[derive(Clone)]
pub struct WorkloadStore {
    client: Client,
}

impl WorkloadStore {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// The pod as the API server has it now (a GET without resourceVersion is a quorum read).
    pub async fn pod(&self, namespace: &str, name: &str) -> Result<Option<Pod>, StoreError> {
        Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|error| StoreError::api(format!("reading pod {namespace}/{name}"), error))
    }

    /// The node as the API server has it now.
    pub async fn node(&self, name: &str) -> Result<Option<Node>, StoreError> {
        Api::<Node>::all(self.client.clone())
            .get_opt(name)
            .await
            .map_err(|error| StoreError::api(format!("reading node {name}"), error))
    }
}
