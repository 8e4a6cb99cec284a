//! One read of everything `virtnet inspect` reports on: VirtNet's objects and the workloads
//! that own addresses. Lists, not watches: the command runs once and exits.

use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, PartialObjectMeta};
use kube::{Api, Client, Resource, ResourceExt};

use super::{StoreError, is_not_found};
use crate::crd::{Endpoint, IPAM_CLAIM_KIND, IpPool, IpamClaim, Subnet};
use crate::ipam::KUBEVIRT_API_GROUP;

/// The owners that exist, as (kind, namespace, name), and the UIDs of the pods that exist.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owners {
    pub objects: BTreeSet<(String, String, String)>,
    pub pod_uids: BTreeSet<String>,
}

impl Owners {
    pub fn exists(&self, kind: &str, namespace: &str, name: &str) -> bool {
        self.objects
            .contains(&(kind.to_owned(), namespace.to_owned(), name.to_owned()))
    }
}

/// VirtNet's objects and the owners of their addresses, as listed now.
#[derive(Clone, Debug, Default)]
pub struct ClusterSnapshot {
    pub subnets: Vec<Subnet>,
    pub pools: Vec<IpPool>,
    pub endpoints: Vec<Endpoint>,
    pub pods: Vec<Pod>,
    pub owners: Owners,
}

impl ClusterSnapshot {
    /// Lists every object; the owner kinds of optional APIs (KubeVirt, IPAMClaim) count as
    /// having no objects when their CRD is not installed.
    pub async fn read(client: &Client) -> Result<Self, StoreError> {
        let subnets = list(Api::<Subnet>::all(client.clone()), "Subnets").await?;
        let pools = list(Api::<IpPool>::all(client.clone()), "IPPools").await?;
        let endpoints = list(Api::<Endpoint>::all(client.clone()), "Endpoints").await?;
        let pods = list(Api::<Pod>::all(client.clone()), "pods").await?;
        let mut owners = Owners {
            pod_uids: pods.iter().filter_map(|pod| pod.uid()).collect(),
            ..Owners::default()
        };
        let statefulsets = list_metadata(Api::<StatefulSet>::all(client.clone()), "StatefulSets");
        owners.add("StatefulSet", statefulsets.await?);
        let vm = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(KUBEVIRT_API_GROUP, "v1", "VirtualMachine"),
            "virtualmachines",
        );
        let vms = Api::<DynamicObject>::all_with(client.clone(), &vm);
        owners.add(
            "VirtualMachine",
            optional(list(vms, "VirtualMachines").await)?,
        );
        let claims = Api::<IpamClaim>::all(client.clone());
        owners.add(IPAM_CLAIM_KIND, optional(list(claims, "IPAMClaims").await)?);
        Ok(Self {
            subnets,
            pools,
            endpoints,
            pods,
            owners,
        })
    }
}

impl Owners {
    fn add<K: Resource>(&mut self, kind: &str, objects: Vec<K>) {
        self.objects.extend(objects.iter().map(|object| {
            let meta = object.meta();
            (
                kind.to_owned(),
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            )
        }));
    }
}

async fn list<K>(api: Api<K>, what: &str) -> Result<Vec<K>, StoreError>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.list(&ListParams::default())
        .await
        .map(|list| list.items)
        .map_err(|error| StoreError::api(format!("listing {what}"), error))
}

async fn list_metadata<K>(api: Api<K>, what: &str) -> Result<Vec<PartialObjectMeta<K>>, StoreError>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.list_metadata(&ListParams::default())
        .await
        .map(|list| list.items)
        .map_err(|error| StoreError::api(format!("listing {what}"), error))
}

/// A list of an API that may not be installed: not found is empty.
fn optional<K>(listed: Result<Vec<K>, StoreError>) -> Result<Vec<K>, StoreError> {
    match listed {
        Err(StoreError::Api { source, .. }) if is_not_found(&source) => Ok(Vec::new()),
        other => other,
    }
}
