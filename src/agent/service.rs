//! [`Agent`]: the caches and every API write of the agent. Decisions are in [`super::plan`].

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{debug, info, warn};
use virtnet_cni::agent_api::{
    AllocateRequest, AllocateResponse, ApiError, CheckRequest, ErrorKind, GcRequest, PodRef,
};

use super::Error;
use super::plan::{
    self, AllocationInput, AllocationPlan, Claim, allocation_record, claim_patch, pod_facts,
};
use crate::crd::{Endpoint, EndpointSpec, FINALIZER_ENDPOINT, IpPool, Subnet};
use crate::ipam::{AllocationHolder, AllocationKey, FixedIpRetention};

/// Conflicting writes are retried this many times before the plugin is told to try again.
const MAX_ATTEMPTS: u32 = 8;

/// The node agent: its caches and its client.
pub struct Agent {
    client: Client,
    node: String,
    retention: FixedIpRetention,
    subnets: Store<Subnet>,
    pools: Store<IpPool>,
    namespaces: Store<Namespace>,
    nodes: Store<Node>,
    pods: Store<Pod>,
    endpoints: Store<Endpoint>,
    /// Held while deciding and claiming (see [`Agent::allocate`]).
    claiming: tokio::sync::Mutex<()>,
    /// Pools as this agent last wrote or re-read them, until the cache moves on.
    remembered: std::sync::Mutex<HashMap<String, plan::Remembered>>,
}

/// Starts a reflector for `api` and returns its store.
fn cache<K>(api: Api<K>, config: watcher::Config) -> Store<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
    tokio::spawn(stream.for_each(|event| async move {
        if let Err(error) = event {
            warn!(%error, "watch failed; retrying");
        }
    }));
    reader
}

fn internal(what: &str, error: &kube::Error) -> ApiError {
    ApiError::new(
        ErrorKind::Internal,
        format!("{what} failed: {error}; check the agent's RBAC and the API server"),
    )
}

/// A stale resourceVersion, or a create racing another writer of the same object.
fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.is_conflict() || status.is_already_exists())
}

/// 10 ms doubling to 640 ms, with up to 50 % jitter so racing agents spread out.
fn backoff(attempt: u32) -> Duration {
    let base = 10u64 << attempt.min(6);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |elapsed| u64::from(elapsed.subsec_nanos()));
    Duration::from_millis(base + nanos % (base / 2 + 1))
}

impl Agent {
    /// Checks the CRDs are installed, starts the caches and waits until they have synced.
    pub async fn start(
        client: Client,
        node: String,
        retention: FixedIpRetention,
    ) -> Result<Self, Error> {
        crate::crd::ensure_installed(&client).await?;
        let config = watcher::Config::default;
        let agent = Self {
            subnets: cache(Api::all(client.clone()), config()),
            pools: cache(Api::all(client.clone()), config()),
            namespaces: cache(Api::all(client.clone()), config()),
            nodes: cache(
                Api::all(client.clone()),
                config().fields(&format!("metadata.name={node}")),
            ),
            pods: cache(
                Api::all(client.clone()),
                config().fields(&format!("spec.nodeName={node}")),
            ),
            endpoints: cache(Api::all(client.clone()), config()),
            claiming: tokio::sync::Mutex::new(()),
            remembered: std::sync::Mutex::default(),
            client,
            node,
            retention,
        };
        for (what, ready) in [
            ("Subnets", agent.subnets.wait_until_ready().await),
            ("IPPools", agent.pools.wait_until_ready().await),
            ("Namespaces", agent.namespaces.wait_until_ready().await),
            ("Nodes", agent.nodes.wait_until_ready().await),
            ("Pods", agent.pods.wait_until_ready().await),
            ("Endpoints", agent.endpoints.wait_until_ready().await),
        ] {
            if ready.is_err() {
                warn!("the {what} cache stopped before it synced");
            }
        }
        info!("caches synced");
        Ok(agent)
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, HashMap<String, plan::Remembered>> {
        self.remembered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps `pool` (just written or re-read) for decisions until the cache moves on.
    fn remember(&self, pool: IpPool) {
        let name = pool.name_any();
        let base = self
            .pools
            .get(&ObjectRef::new(&name))
            .and_then(|cached| cached.resource_version());
        self.remembered().insert(name, (base, pool));
    }

    fn pool_api(&self) -> Api<IpPool> {
        Api::all(self.client.clone())
    }

    fn endpoint_api(&self, namespace: &str) -> Api<Endpoint> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// The pod from the cache, or from the API server when the watch has not delivered it yet.
    pub(super) async fn pod(&self, pod: &PodRef) -> Result<Pod, ApiError> {
        let cached = self
            .pods
            .get(&ObjectRef::new(&pod.name).within(&pod.namespace));
        let found = match cached {
            Some(found) => Some(Pod::clone(&found)),
            None => Api::<Pod>::namespaced(self.client.clone(), &pod.namespace)
                .get_opt(&pod.name)
                .await
                .map_err(|error| internal("reading the pod", &error))?,
        };
        let found = found.ok_or_else(|| {
            ApiError::from(plan::PlanFailure::PodNotCached {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
            })
        })?;
        match (&pod.uid, found.uid()) {
            (Some(requested), Some(cached)) if *requested != cached => {
                Err(plan::PlanFailure::PodUidMismatch {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    cached,
                    requested: requested.clone(),
                }
                .into())
            }
            _ => Ok(found),
        }
    }

    /// ADD: decide on the cache, claim with optimistic concurrency, then record the Endpoint.
    pub async fn allocate(&self, request: &AllocateRequest) -> Result<AllocateResponse, ApiError> {
        let started = std::time::Instant::now();
        let pod = self.pod(&request.pod).await?;
        let namespace = self.namespaces.get(&ObjectRef::new(&request.pod.namespace));
        let node = self.nodes.get(&ObjectRef::new(&self.node));
        let node_labels = node
            .as_ref()
            .map(|node| node.labels().clone())
            .unwrap_or_default();
        let subnets: Vec<Subnet> = self
            .subnets
            .state()
            .iter()
            .map(|s| Subnet::clone(s))
            .collect();
        let holder = AllocationHolder {
            key: AllocationKey::for_pod(&pod_facts(&pod), self.retention),
            interface: request.ifname.clone(),
        };
        let mut claimed: Vec<Claim> = Vec::new();
        let mut attempt = 0;
        // This node's claims go one at a time, so they never conflict with each other; other
        // nodes are not waited for (their writes show up as conflicts).
        let claiming = self.claiming.lock().await;
        let plan = loop {
            let cached: Vec<IpPool> = self
                .pools
                .state()
                .iter()
                .map(|pool| IpPool::clone(pool))
                .collect();
            let pools = plan::newest_pools(cached, &mut self.remembered());
            let plan = plan::plan_allocation(&AllocationInput {
                pod: &pod,
                namespace: namespace.as_deref(),
                node: &self.node,
                node_labels: &node_labels,
                interface: &request.ifname,
                cni_default_subnets: &request.default_subnets,
                subnets: &subnets,
                pools: &pools,
                retention: self.retention,
            });
            let plan = match plan {
                Ok(plan) => plan,
                Err(failure) => {
                    self.undo(&claimed, &holder).await;
                    return Err(failure.into());
                }
            };
            match self.claim_all(&plan, &pod, &mut claimed).await {
                Ok(()) => break plan,
                Err(Some(pool)) if attempt + 1 < MAX_ATTEMPTS => {
                    attempt += 1;
                    debug!(%pool, attempt, "conflict claiming an address; re-reading the pool");
                    tokio::time::sleep(backoff(attempt)).await;
                    match self.pool_api().get(&pool).await {
                        Ok(current) => self.remember(current),
                        Err(error) => {
                            self.undo(&claimed, &holder).await;
                            return Err(internal("re-reading an IPPool", &error));
                        }
                    }
                }
                Err(pool) => {
                    self.undo(&claimed, &holder).await;
                    return Err(ApiError::new(
                        ErrorKind::NotReady,
                        format!(
                            "gave up claiming an address after {MAX_ATTEMPTS} attempts ({}); \
                             the runtime retries the ADD",
                            pool.map_or_else(
                                || "the API server refused the write".to_owned(),
                                |pool| format!("IPPool {pool} kept changing"),
                            ),
                        ),
                    ));
                }
            }
        };
        drop(claiming);
        if let Err(error) = self.record_endpoint(&plan, &pod, request).await {
            self.undo(&claimed, &holder).await;
            return Err(error);
        }
        info!(
            pod = %format!("{}/{}", request.pod.namespace, request.pod.name),
            interface = %request.ifname,
            addresses = ?plan.claims.iter().map(|claim| claim.address).collect::<Vec<_>>(),
            attempts = attempt + 1,
            elapsed_ms = started.elapsed().as_millis(),
            "allocated"
        );
        Ok(plan::allocate_response(&plan.claims, &subnets))
    }

    /// Claims every address of `plan` the pool does not record yet; newly claimed ones are
    /// added to `claimed`. `Err(Some(pool))`: a conflict on `pool`; `Err(None)`: another failure.
    async fn claim_all(
        &self,
        plan: &AllocationPlan,
        pod: &Pod,
        claimed: &mut Vec<Claim>,
    ) -> Result<(), Option<String>> {
        let record = allocation_record(&plan.holder, &pod.uid().unwrap_or_default(), &self.node);
        for claim in plan.claims.iter().filter(|claim| !claim.already_held) {
            let patch = claim_patch(&claim.resource_version, claim.address, &record);
            match self
                .pool_api()
                .patch_status(&claim.pool, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(written) => {
                    self.remember(written);
                    claimed.push(claim.clone());
                }
                Err(error) if is_conflict(&error) => return Err(Some(claim.pool.clone())),
                Err(error) => {
                    warn!(%error, pool = %claim.pool, "claiming an address failed");
                    return Err(None);
                }
            }
        }
        Ok(())
    }

    /// Gives back addresses this request claimed, after a later step failed.
    async fn undo(&self, claimed: &[Claim], holder: &AllocationHolder) {
        for claim in claimed {
            if let Err(error) = self
                .release_address(&claim.pool, claim.address, holder)
                .await
            {
                warn!(
                    %error, pool = %claim.pool, address = %claim.address,
                    "could not release an address after a failed ADD; the controller's garbage \
                     collection will"
                );
            }
        }
    }

    /// Writes the Endpoint: created with the finalizer (and the pod as owner for a per-pod
    /// key), or updated with this interface and the current pod's identity.
    async fn record_endpoint(
        &self,
        plan: &AllocationPlan,
        pod: &Pod,
        request: &AllocateRequest,
    ) -> Result<(), ApiError> {
        let facts = pod_facts(pod);
        let api = self.endpoint_api(plan.holder.key.namespace());
        let name = plan.holder.key.endpoint_name();
        let interface = plan::endpoint_interface(&request.ifname, &plan.claims);
        for attempt in 0..MAX_ATTEMPTS {
            let existing = api
                .get_opt(name)
                .await
                .map_err(|error| internal("reading the Endpoint", &error))?;
            let spec = plan::endpoint_spec(
                existing.as_ref().map(|endpoint| &endpoint.spec),
                &plan.holder,
                interface.clone(),
                &facts,
                &self.node,
                &request.container_id,
            );
            let written = match existing {
                Some(endpoint) if !endpoint.spec.sticky && endpoint.spec.pod_uid != facts.uid => {
                    return Err(ApiError::new(
                        ErrorKind::NotReady,
                        format!(
                            "Endpoint {}/{name} still belongs to an earlier pod (uid {}) whose \
                             addresses are being released; the runtime retries the ADD",
                            plan.holder.key.namespace(),
                            endpoint.spec.pod_uid
                        ),
                    ));
                }
                Some(mut endpoint) => {
                    endpoint.spec = spec;
                    api.replace(name, &PostParams::default(), &endpoint).await
                }
                None => {
                    let endpoint = Endpoint {
                        metadata: ObjectMeta {
                            name: Some(name.to_owned()),
                            namespace: Some(plan.holder.key.namespace().to_owned()),
                            finalizers: Some(vec![FINALIZER_ENDPOINT.to_owned()]),
                            owner_references: (!plan.holder.key.is_sticky())
                                .then(|| owner_reference(pod))
                                .flatten()
                                .map(|owner| vec![owner]),
                            ..ObjectMeta::default()
                        },
                        spec,
                        status: None,
                    };
                    api.create(&PostParams::default(), &endpoint).await
                }
            };
            match written {
                Ok(_) => return Ok(()),
                Err(error) if is_conflict(&error) => {
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(error) => return Err(internal("writing the Endpoint", &error)),
            }
        }
        Err(ApiError::new(
            ErrorKind::NotReady,
            format!(
                "Endpoint {name} kept changing while being written; the runtime retries the ADD"
            ),
        ))
    }

    /// Removes `address` from `pool` if it is still `holder`'s, retrying on conflicts. Giving
    /// up is an error (the runtime retries DEL): reporting success would leak the address.
    async fn release_address(
        &self,
        pool: &str,
        address: IpAddr,
        holder: &AllocationHolder,
    ) -> Result<(), ApiError> {
        for attempt in 0..MAX_ATTEMPTS {
            let current = self
                .pool_api()
                .get(pool)
                .await
                .map_err(|error| internal("reading an IPPool", &error))?;
            let Some(patch) = plan::release_patch(&current, address, holder) else {
                return Ok(());
            };
            match self
                .pool_api()
                .patch_status(pool, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(written) => {
                    self.remember(written);
                    return Ok(());
                }
                Err(error) if is_conflict(&error) => tokio::time::sleep(backoff(attempt)).await,
                Err(error) => return Err(internal("releasing an address", &error)),
            }
        }
        Err(ApiError::new(
            ErrorKind::NotReady,
            format!(
                "IPPool {pool} kept changing while {address} was being released; the runtime \
                 retries"
            ),
        ))
    }

    /// The Endpoint of `pod`, or (when the runtime did not say which pod) the one recording
    /// `container_id` on this node.
    async fn endpoint_for(
        &self,
        container_id: &str,
        pod: Option<&PodRef>,
    ) -> Result<Option<Endpoint>, ApiError> {
        match pod {
            Some(pod) => self
                .endpoint_api(&pod.namespace)
                .get_opt(&pod.name)
                .await
                .map_err(|error| internal("reading the Endpoint", &error)),
            None => Ok(self
                .endpoints
                .state()
                .iter()
                .find(|endpoint| {
                    endpoint.spec.container_id == container_id && endpoint.spec.node == self.node
                })
                .map(|endpoint| Endpoint::clone(endpoint))),
        }
    }

    /// DEL: releases this interface's addresses unless they are sticky (the controller owns
    /// those) or the Endpoint now belongs to another container. Nothing to release is success.
    pub async fn release(
        &self,
        container_id: &str,
        ifname: &str,
        pod: Option<&PodRef>,
    ) -> Result<(), ApiError> {
        let Some(endpoint) = self.endpoint_for(container_id, pod).await? else {
            return Ok(());
        };
        if endpoint.spec.sticky || endpoint.spec.container_id != container_id {
            return Ok(());
        }
        self.release_interface(endpoint, ifname).await
    }

    async fn release_interface(&self, endpoint: Endpoint, ifname: &str) -> Result<(), ApiError> {
        let Some(entry) = endpoint
            .spec
            .interfaces
            .iter()
            .find(|entry| entry.interface == ifname)
        else {
            return Ok(());
        };
        let namespace = endpoint.namespace().unwrap_or_default();
        let holder = AllocationHolder {
            key: AllocationKey::Pod {
                namespace: namespace.clone(),
                name: endpoint.name_any(),
                uid: endpoint.spec.pod_uid.clone(),
            },
            interface: ifname.to_owned(),
        };
        {
            // Not racing this node's own claims keeps conflicts to other nodes' writes.
            let _claiming = self.claiming.lock().await;
            for (pool, address) in plan::recorded_addresses(entry) {
                self.release_address(&pool, address, &holder).await?;
            }
        }
        let api = self.endpoint_api(&namespace);
        let rest: Vec<_> = endpoint
            .spec
            .interfaces
            .iter()
            .filter(|entry| entry.interface != ifname)
            .cloned()
            .collect();
        let name = endpoint.name_any();
        let result = if rest.is_empty() {
            // The addresses are back in their pools, so the finalizer has nothing left to guard.
            let unguard = json!({"metadata": {"finalizers": null}});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&unguard))
                .await
            {
                Ok(_) => api
                    .delete(&name, &DeleteParams::default())
                    .await
                    .map(|_| ()),
                Err(error) => Err(error),
            }
        } else {
            let mut endpoint = endpoint;
            endpoint.spec = EndpointSpec {
                interfaces: rest,
                ..endpoint.spec
            };
            api.replace(&name, &PostParams::default(), &endpoint)
                .await
                .map(|_| ())
        };
        match result {
            Ok(()) => Ok(()),
            // The addresses are already back; a racing change or a vanished Endpoint leaves at
            // most a stale record, which the controller's garbage collection removes.
            Err(kube::Error::Api(status)) if status.is_conflict() || status.is_not_found() => {
                warn!(endpoint = %name, "the Endpoint changed while being updated; leaving it to the controller");
                Ok(())
            }
            Err(error) => Err(internal("updating the Endpoint", &error)),
        }
    }

    /// CHECK: the Endpoint still records this interface for this container.
    pub async fn check(&self, request: &CheckRequest) -> Result<(), ApiError> {
        let endpoint = self
            .endpoint_for(&request.container_id, request.pod.as_ref())
            .await?;
        let recorded = endpoint.as_ref().is_some_and(|endpoint| {
            endpoint.spec.container_id == request.container_id
                && endpoint
                    .spec
                    .interfaces
                    .iter()
                    .any(|entry| entry.interface == request.ifname)
        });
        if recorded {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorKind::NotAllocated,
                format!(
                    "no Endpoint records interface {} of container {}; delete the pod so it is \
                     re-created with an address",
                    request.ifname, request.container_id
                ),
            ))
        }
    }

    /// GC: releases the non-sticky allocations on this node whose attachment the runtime no
    /// longer lists.
    pub async fn gc(&self, request: &GcRequest) -> Result<(), ApiError> {
        let valid: BTreeMap<&str, Vec<&str>> =
            request
                .valid_attachments
                .iter()
                .fold(BTreeMap::new(), |mut valid, attachment| {
                    valid
                        .entry(attachment.container_id.as_str())
                        .or_default()
                        .push(attachment.ifname.as_str());
                    valid
                });
        let stale: Vec<(Endpoint, String)> = self
            .endpoints
            .state()
            .iter()
            .filter(|endpoint| endpoint.spec.node == self.node && !endpoint.spec.sticky)
            .flat_map(|endpoint| {
                let listed = valid.get(endpoint.spec.container_id.as_str());
                endpoint
                    .spec
                    .interfaces
                    .iter()
                    .filter(move |entry| {
                        !listed.is_some_and(|names| names.contains(&entry.interface.as_str()))
                    })
                    .map(|entry| (Endpoint::clone(endpoint), entry.interface.clone()))
            })
            .collect();
        for (endpoint, ifname) in stale {
            info!(endpoint = %endpoint.name_any(), %ifname, "GC: the runtime no longer lists this attachment");
            self.release_interface(endpoint, &ifname).await?;
        }
        Ok(())
    }
}

/// The pod as controlling owner of its (non-sticky) Endpoint, so deleting the pod deletes it.
fn owner_reference(pod: &Pod) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: "v1".to_owned(),
        kind: "Pod".to_owned(),
        name: pod.name_any(),
        uid: pod.uid()?,
        controller: Some(true),
        block_owner_deletion: None,
    })
}
