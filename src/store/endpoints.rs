//! Endpoint reads and writes: the agent records an Endpoint when it allocates and lets it go on
//! DEL; the controller lets go of Endpoints whose addresses it released. Letting go removes only
//! VirtNet's finalizer: another controller's finalizer stays, and so does the object until that
//! controller is done with it.

use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use super::{StoreError, guard, is_conflict, is_not_found};
use crate::crd::{Endpoint, FINALIZER_ENDPOINT};

/// How a guarded Endpoint write went.
#[derive(Debug, PartialEq)]
pub enum Written {
    Done,
    /// The Endpoint changed (or appeared, or vanished) since it was read: read it again and
    /// decide again.
    Changed,
}

/// The merge patch that removes VirtNet's finalizer from `endpoint` and keeps every other,
/// guarded by the resourceVersion the finalizers were read at (a merge patch replaces the whole
/// list, so without the guard a finalizer added meanwhile would be lost). `None` when VirtNet's
/// finalizer is not there.
pub fn finalizer_removal(endpoint: &Endpoint) -> Result<Option<Value>, StoreError> {
    let finalizers = endpoint.finalizers();
    if !finalizers
        .iter()
        .any(|finalizer| finalizer == FINALIZER_ENDPOINT)
    {
        return Ok(None);
    }
    let remaining: Vec<&String> = finalizers
        .iter()
        .filter(|finalizer| *finalizer != FINALIZER_ENDPOINT)
        .collect();
    Ok(Some(json!({
        "metadata": {
            "resourceVersion": guard(endpoint)?,
            "finalizers": remaining,
        },
    })))
}

/// Endpoints in the API server.
#[derive(Clone)]
pub struct EndpointStore {
    client: Client,
}

impl EndpointStore {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    fn api(&self, namespace: &str) -> Api<Endpoint> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// A fresh (quorum) read of one Endpoint.
    pub async fn get(&self, namespace: &str, name: &str) -> Result<Option<Endpoint>, StoreError> {
        self.api(namespace)
            .get_opt(name)
            .await
            .map_err(|error| StoreError::api(format!("reading Endpoint {namespace}/{name}"), error))
    }

    /// A fresh list of every Endpoint.
    pub async fn list(&self) -> Result<Vec<Endpoint>, StoreError> {
        Ok(Api::<Endpoint>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|error| StoreError::api("listing Endpoints", error))?
            .items)
    }

    /// Creates `endpoint`; one that exists already is [`Written::Changed`].
    pub async fn create(&self, endpoint: &Endpoint) -> Result<Written, StoreError> {
        let namespace = endpoint.namespace().unwrap_or_default();
        match self
            .api(&namespace)
            .create(&PostParams::default(), endpoint)
            .await
        {
            Ok(_) => Ok(Written::Done),
            Err(error) if is_conflict(&error) => Ok(Written::Changed),
            Err(error) => Err(StoreError::api(
                format!("creating Endpoint {namespace}/{}", endpoint.name_any()),
                error,
            )),
        }
    }

    /// Replaces `endpoint` as read (its resourceVersion is the guard); one changed or deleted
    /// since is [`Written::Changed`].
    pub async fn replace(&self, endpoint: &Endpoint) -> Result<Written, StoreError> {
        guard(endpoint)?;
        let namespace = endpoint.namespace().unwrap_or_default();
        let name = endpoint.name_any();
        match self
            .api(&namespace)
            .replace(&name, &PostParams::default(), endpoint)
            .await
        {
            Ok(_) => Ok(Written::Done),
            Err(error) if is_conflict(&error) || is_not_found(&error) => Ok(Written::Changed),
            Err(error) => Err(StoreError::api(
                format!("updating Endpoint {namespace}/{name}"),
                error,
            )),
        }
    }

    /// Lets `endpoint` (as read) go: removes VirtNet's finalizer (keeping every other) and
    /// deletes it, both guarded by what was read (resourceVersion, uid), so an Endpoint another
    /// writer changed meanwhile (a new sandbox of the pod took it over) is left alone:
    /// [`Written::Changed`]. An Endpoint already gone is done.
    pub async fn let_go(&self, endpoint: &Endpoint) -> Result<Written, StoreError> {
        let namespace = endpoint.namespace().unwrap_or_default();
        let name = endpoint.name_any();
        let api = self.api(&namespace);
        let failed = |what: &str, error| {
            StoreError::api(format!("{what} Endpoint {namespace}/{name}"), error)
        };
        let mut version = guard(endpoint)?;
        if let Some(patch) = finalizer_removal(endpoint)? {
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(written) => version = guard(&written)?,
                Err(error) if is_not_found(&error) => return Ok(Written::Done),
                Err(error) if is_conflict(&error) => return Ok(Written::Changed),
                Err(error) => return Err(failed("removing VirtNet's finalizer from", error)),
            }
        }
        if endpoint.metadata.deletion_timestamp.is_some() {
            // Already being deleted: with VirtNet's finalizer gone, the API server finishes.
            return Ok(Written::Done);
        }
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: Some(version),
                uid: endpoint.uid(),
            }),
            ..DeleteParams::default()
        };
        match api.delete(&name, &params).await {
            Ok(_) => Ok(Written::Done),
            Err(error) if is_not_found(&error) => Ok(Written::Done),
            Err(error) if is_conflict(&error) => Ok(Written::Changed),
            Err(error) => Err(failed("deleting", error)),
        }
    }
}
