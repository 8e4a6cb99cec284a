//! [`Agent`]: the caches and every API write of the agent. Decisions are in [`super::plan`].

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, PartialObjectMeta};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};
use virtnet_cni::agent_api::{
    AllocateRequest, AllocateResponse, ApiError, CheckRequest, ErrorKind, GcRequest, PodRef,
    ReleaseRequest,
};

use super::Error;
use super::plan::{
    self, AllocationInput, AllocationPlan, BatchOutcome, BatchWrite, Claim, PersistentClaim,
    PlanFailure, pod_facts,
};
use crate::crd::{Endpoint, EndpointSpec, FINALIZER_ENDPOINT, IpPool, IpamClaim, Subnet};
use crate::ipam::{AllocationHolder, AllocationKey, FixedIpRetention, selection_for_interface};
use crate::observability::{Health, Metrics};
use crate::store::claims::ClaimStore;
use crate::store::endpoints::{EndpointStore, Written};
use crate::store::parse::interface_addresses;
use crate::store::pools::{ClaimOutcome, PoolStore};
use crate::store::workloads::WorkloadStore;
use crate::store::{self, MAX_ATTEMPTS, Retry, StoreError, backoff};

/// How the agent commits claims.
#[derive(Clone)]
pub struct AgentSettings {
    /// Most ADDs decided and written together (1: every ADD on its own).
    pub batch_limit: usize,
    pub metrics: Arc<Metrics>,
    /// Where the caches report their watches' health.
    pub health: Health,
    /// Whether StatefulSet replicas and VMs keep their addresses (sticky keys).
    pub retention: FixedIpRetention,
}

/// The node agent: its caches and its client.
pub struct Agent {
    client: Client,
    pool_store: PoolStore,
    endpoint_store: EndpointStore,
    /// Fresh reads of pods before a GC frees their addresses.
    workloads: WorkloadStore,
    /// NADs and IPAMClaims of persistent addresses.
    claims: ClaimStore,
    node: String,
    retention: FixedIpRetention,
    subnets: Store<Subnet>,
    pools: Store<IpPool>,
    namespaces: Store<Namespace>,
    /// Every node's name and labels: the Subnets' pools are shared out among the nodes.
    nodes: Store<PartialObjectMeta<Node>>,
    pods: Store<Pod>,
    endpoints: Store<Endpoint>,
    /// Held while deciding and claiming (see [`Agent::commit`]) and releasing.
    claiming: tokio::sync::Mutex<()>,
    /// What this agent allocated to each (pod uid, interface), for virtnet-coordinator, which
    /// asks right after the ADD (before the Endpoint watch may have delivered it).
    allocated: std::sync::Mutex<HashMap<(String, String), Vec<IpAddr>>>,
    /// Pools as this agent last wrote or re-read them, until the cache moves on.
    remembered: std::sync::Mutex<HashMap<String, plan::Remembered>>,
    /// ADDs waiting for [`Agent::run_commits`].
    jobs: mpsc::UnboundedSender<ClaimJob>,
    /// DELs' pool records waiting for [`Agent::run_releases`].
    releases: mpsc::UnboundedSender<ReleaseJob>,
    batch_limit: usize,
    metrics: Arc<Metrics>,
    recorder: Recorder,
}

/// One ADD waiting to be decided and claimed.
struct ClaimJob {
    request: AllocateRequest,
    pod: Pod,
    /// The IPAMClaim the interface's address belongs to (as read, and as the plan sees it).
    claim: Option<(IpamClaim, PersistentClaim)>,
    reply: oneshot::Sender<Result<Claimed, ApiError>>,
}

/// A DEL's addresses, to be given back once its Endpoint no longer records them.
struct ReleaseJob {
    holder: AllocationHolder,
    container_id: String,
    /// (pool, address) of every address the interface held.
    addresses: Vec<(String, IpAddr)>,
    reply: oneshot::Sender<Result<(), ApiError>>,
}

/// A request of a batch while it is being committed.
struct Member {
    job: ClaimJob,
    holder: AllocationHolder,
    /// Addresses written for it so far (given back if it fails).
    claimed: Vec<Claim>,
    conflicts: u32,
}

/// What the commit hands back to the ADD: the decision and the addresses it newly claimed.
struct Claimed {
    plan: AllocationPlan,
    claimed: Vec<Claim>,
    attempts: u32,
    batch: usize,
}

/// How one pool write of a batch went.
enum PoolWritten {
    Done,
    Conflict,
    Failed(ApiError),
}

fn shutting_down() -> ApiError {
    ApiError::new(
        ErrorKind::NotReady,
        "the agent is shutting down; the runtime retries the ADD",
    )
}

fn gave_up(claims: &[&Claim]) -> ApiError {
    let pools: Vec<&str> = claims.iter().map(|claim| claim.pool.as_str()).collect();
    ApiError::new(
        ErrorKind::NotReady,
        format!(
            "gave up claiming an address after {MAX_ATTEMPTS} attempts (IPPool {} kept \
             changing); the runtime retries the ADD",
            pools.join(", ")
        ),
    )
}

/// A store failure as the plugin's answer: a busy object is retried by the runtime.
fn refusal(error: StoreError) -> ApiError {
    let kind = if error.is_transient() {
        ErrorKind::NotReady
    } else {
        ErrorKind::Internal
    };
    ApiError::new(kind, error.to_string())
}

fn internal(what: &str, error: &kube::Error) -> ApiError {
    ApiError::new(
        ErrorKind::Internal,
        format!("{what} failed: {error}; check the agent's RBAC and the API server"),
    )
}

/// The next batch of queued jobs: waits for one, then takes those already waiting, up to
/// `limit`. `None` once the agent is shutting down.
async fn next_batch<T>(jobs: &mut mpsc::UnboundedReceiver<T>, limit: usize) -> Option<Vec<T>> {
    let first = jobs.recv().await?;
    let mut batch = vec![first];
    while batch.len() < limit {
        match jobs.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    Some(batch)
}

impl Agent {
    /// Checks the CRDs are installed, starts the caches, waits until they have synced and starts
    /// the commit task.
    pub async fn start(
        client: Client,
        node: String,
        settings: AgentSettings,
    ) -> Result<Arc<Self>, Error> {
        crate::crd::ensure_installed(&client).await?;
        let config = watcher::Config::default;
        let watches = store::cache::Watches {
            client: &client,
            health: &settings.health,
            metrics: &settings.metrics,
        };
        let (jobs, queued) = mpsc::unbounded_channel();
        let (releases, queued_releases) = mpsc::unbounded_channel();
        let agent = Self {
            subnets: watches.all(config(), "Subnets"),
            pools: watches.all(config(), "IPPools"),
            namespaces: watches.all(config(), "Namespaces"),
            // Metadata only: names and labels are all the agent reads of other nodes.
            nodes: watches.all(config(), "Nodes"),
            pods: watches.all(config().fields(&format!("spec.nodeName={node}")), "Pods"),
            endpoints: watches.all(config(), "Endpoints"),
            pool_store: PoolStore::new(client.clone()),
            endpoint_store: EndpointStore::new(client.clone()),
            workloads: WorkloadStore::new(client.clone()),
            claims: ClaimStore::new(client.clone()),
            claiming: tokio::sync::Mutex::new(()),
            remembered: std::sync::Mutex::default(),
            allocated: std::sync::Mutex::default(),
            jobs,
            releases,
            batch_limit: settings.batch_limit.max(1),
            metrics: settings.metrics,
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "virtnet-agent".to_owned(),
                    instance: Some(node.clone()),
                },
            ),
            client,
            node,
            retention: settings.retention,
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
        let agent = Arc::new(agent);
        tokio::spawn(Arc::clone(&agent).run_commits(queued));
        tokio::spawn(Arc::clone(&agent).run_releases(queued_releases));
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

    /// `pod`, minus a sticky owner reference (VirtualMachineInstance, StatefulSet) whose uid is
    /// not the uid the API server shows for that owner: a pod that only claims to belong to a VM
    /// or a StatefulSet gets an address of its own, never theirs.
    async fn with_confirmed_owner(&self, mut pod: Pod) -> Result<Pod, ApiError> {
        let namespace = pod.namespace().unwrap_or_default();
        while let Some(owner) = plan::sticky_owner(&pod).cloned() {
            let found = if owner.kind == "StatefulSet" {
                Api::<StatefulSet>::namespaced(self.client.clone(), &namespace)
                    .get_opt(&owner.name)
                    .await
                    .map(|found| found.and_then(|found| found.uid()))
            } else {
                let (group, version) = owner.api_version.split_once('/').unwrap_or_default();
                let resource = ApiResource::from_gvk_with_plural(
                    &GroupVersionKind::gvk(group, version, &owner.kind),
                    "virtualmachineinstances",
                );
                Api::<DynamicObject>::namespaced_with(self.client.clone(), &namespace, &resource)
                    .get_opt(&owner.name)
                    .await
                    .map(|found| found.and_then(|found| found.uid()))
            };
            let confirmed = match found {
                Ok(found) => found.as_ref() == Some(&owner.uid),
                // None at all (without KubeVirt installed the API server answers 404 too).
                Err(kube::Error::Api(status)) if status.is_not_found() => false,
                Err(error) => return Err(internal("reading the pod's owner", &error)),
            };
            if confirmed {
                break;
            }
            warn!(
                pod = %format!("{namespace}/{}", pod.name_any()),
                owner = %format!("{}/{}", owner.kind, owner.name),
                "the pod's owner reference names no such object (uid {}); it gets an \
                 address of its own",
                owner.uid
            );
            pod = plan::without_owner(pod, &owner.uid);
        }
        Ok(pod)
    }

    /// ADD: decide on the cache, claim with optimistic concurrency (grouped with the other ADDs
    /// arriving meanwhile, see [`Agent::commit`]), then record the Endpoint.
    pub async fn allocate(&self, request: &AllocateRequest) -> Result<AllocateResponse, ApiError> {
        let started = Instant::now();
        let result = self.allocate_unmeasured(request).await;
        let outcome = match &result {
            Ok(_) => "ok".to_owned(),
            Err(error) => serde_json::to_value(error.kind)
                .ok()
                .and_then(|kind| kind.as_str().map(str::to_owned))
                .unwrap_or_default(),
        };
        self.metrics
            .allocation_finished(started.elapsed().as_secs_f64(), &outcome);
        if let Err(error) = &result
            && error.kind == ErrorKind::PoolExhausted
        {
            self.metrics.pool_exhausted();
        }
        result
    }

    async fn allocate_unmeasured(
        &self,
        request: &AllocateRequest,
    ) -> Result<AllocateResponse, ApiError> {
        let started = Instant::now();
        let pod = self
            .with_confirmed_owner(self.pod(&request.pod).await?)
            .await?;
        let claim = self.persistent_claim(&pod, request).await?;
        let claim_read = claim.as_ref().map(|(read, _)| read.clone());
        let (reply, answer) = oneshot::channel();
        let job = ClaimJob {
            request: request.clone(),
            pod: pod.clone(),
            claim,
            reply,
        };
        self.jobs.send(job).map_err(|_| shutting_down())?;
        let claimed = answer.await.map_err(|_| shutting_down());
        let claimed = match claimed {
            Ok(Ok(claimed)) => claimed,
            Ok(Err(error)) | Err(error) => {
                if let Some(read) = &claim_read {
                    self.report_to_claim(read, &pod, Err(&error)).await;
                }
                return Err(error);
            }
        };
        if let Err(error) = self.record_endpoint(&claimed.plan, &pod, request).await {
            self.undo(
                &claimed.claimed,
                &claimed.plan.holder,
                &request.container_id,
            )
            .await;
            return Err(error);
        }
        if let Some(read) = &claim_read {
            self.report_to_claim(read, &pod, Ok(&claimed.plan.claims))
                .await;
        }
        self.allocated_to().insert(
            (pod.uid().unwrap_or_default(), request.ifname.clone()),
            claimed
                .plan
                .claims
                .iter()
                .map(|claim| claim.address)
                .collect(),
        );
        info!(
            pod = %format!("{}/{}", request.pod.namespace, request.pod.name),
            interface = %request.ifname,
            addresses = ?claimed.plan.claims.iter().map(|claim| claim.address).collect::<Vec<_>>(),
            attempts = claimed.attempts,
            batch = claimed.batch,
            elapsed_ms = started.elapsed().as_millis(),
            "allocated"
        );
        Ok(plan::allocate_response(
            &claimed.plan.claims,
            &self.subnet_snapshot(),
        ))
    }

    /// The IPAMClaim `request`'s interface keeps its address in: named by the pod's
    /// network-selection element for the interface (`ipam-claim-reference`), on a NAD whose
    /// config allows persistent addresses. A claim that does not exist yet is "try again":
    /// KubeVirt's ipam-extensions creates it with the VM.
    async fn persistent_claim(
        &self,
        pod: &Pod,
        request: &AllocateRequest,
    ) -> Result<Option<(IpamClaim, PersistentClaim)>, ApiError> {
        let namespace = pod.namespace().unwrap_or_default();
        let selection = selection_for_interface(pod.annotations(), &namespace, &request.ifname)
            .map_err(|error| ApiError::from(PlanFailure::from(error)))?;
        let Some((selection, claim_name)) = selection
            .and_then(|selection| selection.ipam_claim.clone().map(|claim| (selection, claim)))
        else {
            return Ok(None);
        };
        let nad = self
            .claims
            .nad(&selection.namespace, &selection.name)
            .await
            .map_err(refusal)?;
        if !nad.as_ref().is_some_and(plan::allows_persistent_ips) {
            info!(
                pod = %format!("{namespace}/{}", pod.name_any()),
                interface = %request.ifname,
                network = %selection.attachment(),
                "the pod names IPAMClaim {claim_name}, but the network does not allow \
                 persistent addresses (allowPersistentIPs): the address is the pod's own"
            );
            return Ok(None);
        }
        let Some(claim) = self
            .claims
            .claim(&namespace, &claim_name)
            .await
            .map_err(refusal)?
        else {
            return Err(ApiError::new(
                ErrorKind::NotReady,
                format!(
                    "IPAMClaim {namespace}/{claim_name}, named by the pod's network selection \
                     for interface {}, does not exist yet (KubeVirt's ipam-extensions creates \
                     it with the VM); the runtime retries the ADD",
                    request.ifname
                ),
            ));
        };
        let persistent = PersistentClaim::from_claim(&claim).map_err(ApiError::from)?;
        Ok(Some((claim, persistent)))
    }

    /// Records an ADD's outcome in the claim's status (addresses, owner pod, `IPsAllocated`).
    /// Best effort: the Endpoint and the pool records hold the address whatever happens here,
    /// and the next ADD writes the status again.
    async fn report_to_claim(
        &self,
        read: &IpamClaim,
        pod: &Pod,
        outcome: Result<&[Claim], &ApiError>,
    ) {
        let mut claim = read.clone();
        let mut retry = Retry::default();
        loop {
            let status =
                plan::claim_status(&claim, &pod.name_any(), outcome, Time(Timestamp::now()));
            match self.claims.write_status(&claim, &status).await {
                Ok(Written::Done) => return,
                Ok(Written::Changed) if retry.after_conflict().await => {
                    match self
                        .claims
                        .claim(&claim.namespace().unwrap_or_default(), &claim.name_any())
                        .await
                    {
                        Ok(Some(fresh)) => claim = fresh,
                        Ok(None) => return,
                        Err(error) => {
                            warn!(%error, "could not re-read the IPAMClaim to record its address");
                            return;
                        }
                    }
                }
                Ok(Written::Changed) => {
                    warn!(claim = %claim.name_any(), "the IPAMClaim kept changing: its status is written by the next ADD");
                    return;
                }
                Err(error) => {
                    warn!(%error, "could not record the address in the IPAMClaim's status");
                    return;
                }
            }
        }
    }

    fn allocated_to(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Vec<IpAddr>>> {
        self.allocated
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The addresses VirtNet allocated to interface `ifname` of the pod with `pod_uid`: what this
    /// agent answered its ADD, else what an Endpoint records for it (after an agent restart).
    pub(super) fn addresses_of(&self, pod_uid: &str, ifname: &str) -> Vec<IpAddr> {
        if let Some(known) = self
            .allocated_to()
            .get(&(pod_uid.to_owned(), ifname.to_owned()))
        {
            return known.clone();
        }
        self.endpoints
            .state()
            .iter()
            .filter(|endpoint| endpoint.spec.pod_uid == pod_uid)
            .flat_map(|endpoint| {
                endpoint
                    .spec
                    .interfaces
                    .iter()
                    .filter(|entry| entry.interface == ifname)
                    // A malformed record confirms nothing (the coordinator then refuses).
                    .filter_map(|entry| interface_addresses(endpoint, entry).ok())
                    .flatten()
                    .map(|recorded| recorded.address)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn subnet_snapshot(&self) -> Vec<Subnet> {
        self.subnets
            .state()
            .iter()
            .map(|subnet| Subnet::clone(subnet))
            .collect()
    }

    fn pool_snapshot(&self) -> Vec<IpPool> {
        self.pools
            .state()
            .iter()
            .map(|pool| IpPool::clone(pool))
            .collect()
    }

    fn node_labels(&self) -> plan::NodeLabels {
        self.nodes
            .state()
            .iter()
            .map(|node| (node.name_any(), node.labels().clone()))
            .collect()
    }

    /// Takes the queued ADDs, up to `batch_limit` at a time, and commits each batch together.
    /// Runs as its own task, so a plugin that gives up cannot cut a batch short.
    async fn run_commits(self: Arc<Self>, mut jobs: mpsc::UnboundedReceiver<ClaimJob>) {
        while let Some(batch) = next_batch(&mut jobs, self.batch_limit).await {
            self.metrics.batch_committed(batch.len());
            self.commit(batch).await;
        }
    }

    /// Takes the queued DELs, up to `batch_limit` at a time, and gives their addresses back
    /// with one write per pool. Runs as its own task, so a DEL whose plugin gave up (its
    /// timeout) still finishes: its Endpoint is already gone, and nothing else would release.
    async fn run_releases(self: Arc<Self>, mut jobs: mpsc::UnboundedReceiver<ReleaseJob>) {
        while let Some(batch) = next_batch(&mut jobs, self.batch_limit).await {
            self.release_batch(batch).await;
        }
    }

    /// Releases every address of `batch`: per pool, one fresh read and one guarded write
    /// removing the records that still name their job's holder and sandbox (in parallel
    /// across pools). A job is answered with the first failure among its pools.
    async fn release_batch(&self, batch: Vec<ReleaseJob>) {
        // Not racing this node's own claims keeps conflicts to other nodes' writes.
        let _claiming = self.claiming.lock().await;
        // Per pool, which jobs (by index) want each address released (two may, a DEL replayed).
        let mut by_pool: BTreeMap<&str, BTreeMap<IpAddr, Vec<usize>>> = BTreeMap::new();
        for (index, job) in batch.iter().enumerate() {
            for (pool, address) in &job.addresses {
                by_pool
                    .entry(pool)
                    .or_default()
                    .entry(*address)
                    .or_default()
                    .push(index);
            }
        }
        let jobs = &batch;
        let results = futures::future::join_all(by_pool.iter().map(|(pool, wanted)| async move {
            let addresses: Vec<IpAddr> = wanted.keys().copied().collect();
            let released = self
                .pool_store
                .release(pool, &addresses, |address, record| {
                    wanted.get(&address).is_some_and(|indexes| {
                        indexes.iter().any(|index| {
                            let job = &jobs[*index];
                            plan::record_of_sandbox(record, &job.holder, &job.container_id)
                        })
                    })
                })
                .await;
            (wanted, released)
        }))
        .await;
        let mut failures: BTreeMap<usize, ApiError> = BTreeMap::new();
        for (wanted, released) in results {
            match released {
                Ok(Some(written)) => self.remember(written),
                Ok(None) => {}
                Err(error) => {
                    let error = refusal(error);
                    for index in wanted.values().flatten() {
                        failures.entry(*index).or_insert_with(|| error.clone());
                    }
                }
            }
        }
        for (index, job) in batch.into_iter().enumerate() {
            // The plugin may have given up waiting; the addresses are released all the same.
            let _ = job.reply.send(failures.remove(&index).map_or(Ok(()), Err));
        }
    }

    /// Group commit: decides every ADD of `batch` on one view of the pools
    /// ([`plan::plan_batch`]) and records all claims on one pool with one write guarded by its
    /// resourceVersion. Each request gets its own answer: a request whose write conflicted is
    /// decided again (with the others that conflicted) on the re-read pool, one that fails
    /// gives back whatever it claimed in earlier rounds, so a failed ADD holds nothing.
    async fn commit(&self, batch: Vec<ClaimJob>) {
        // This node's claims go one batch at a time, so they never conflict with each other;
        // other nodes are not waited for (their writes show up as conflicts).
        let _claiming = self.claiming.lock().await;
        let size = batch.len();
        let mut members: Vec<Member> = batch
            .into_iter()
            .map(|job| Member {
                holder: plan::holder_for(
                    &job.pod,
                    &job.request.ifname,
                    job.claim.as_ref().map(|(_, claim)| claim),
                    self.retention,
                ),
                job,
                claimed: Vec::new(),
                conflicts: 0,
            })
            .collect();
        loop {
            // A plugin that stopped waiting (its timeout) is not served: deciding and writing
            // for it would only be undone, and under load that wasted work is what makes the
            // next requests time out too.
            let (gone, live): (Vec<Member>, Vec<Member>) = members
                .into_iter()
                .partition(|member| member.job.reply.is_closed());
            for member in gone {
                self.undo(
                    &member.claimed,
                    &member.holder,
                    &member.job.request.container_id,
                )
                .await;
            }
            members = live;
            if members.is_empty() {
                break;
            }
            let subnets = self.subnet_snapshot();
            let nodes = self.node_labels();
            let pools = plan::newest_pools(self.pool_snapshot(), &mut self.remembered());
            let namespaces: Vec<_> = members
                .iter()
                .map(|member| {
                    self.namespaces
                        .get(&ObjectRef::new(&member.job.request.pod.namespace))
                })
                .collect();
            let inputs: Vec<AllocationInput<'_>> = members
                .iter()
                .zip(&namespaces)
                .map(|(member, namespace)| AllocationInput {
                    pod: &member.job.pod,
                    namespace: namespace.as_deref(),
                    node: &self.node,
                    nodes: &nodes,
                    interface: &member.job.request.ifname,
                    network: member.job.request.network.as_deref(),
                    persistent_claim: member.job.claim.as_ref().map(|(_, claim)| claim),
                    container_id: &member.job.request.container_id,
                    cni_default_subnets: &member.job.request.default_subnets,
                    subnets: &subnets,
                    retention: self.retention,
                })
                .collect();
            let batch = plan::plan_batch(&inputs, pools);
            drop(inputs);
            let written = self.write_pools(&batch.writes).await;
            let mut again = Vec::new();
            let mut most_conflicts = 0;
            for (mut member, outcome) in members.into_iter().zip(batch.outcomes) {
                let plan = match outcome {
                    BatchOutcome::Deferred => {
                        again.push(member);
                        continue;
                    }
                    BatchOutcome::Failed(failure) => {
                        self.report_refusal(&member.job.pod, &failure);
                        self.settle(member, Err(failure.into()), size).await;
                        continue;
                    }
                    BatchOutcome::Planned(plan) => plan,
                };
                // Every claim was written, held ones re-asserted; only the new ones are this
                // request's to give back if it fails. A write that failed may still have been
                // done (its answer lost): giving it back is guarded by this holder and
                // container, so it lets go of nothing if the write was not done.
                let outcome_of = |claim: &Claim| written.get(&claim.pool);
                member.claimed.extend(
                    plan.claims
                        .iter()
                        .filter(|claim| !claim.already_held)
                        .filter(|claim| {
                            matches!(
                                outcome_of(claim),
                                Some(PoolWritten::Done | PoolWritten::Failed(_))
                            )
                        })
                        .cloned(),
                );
                let failure = plan
                    .claims
                    .iter()
                    .find_map(|claim| match outcome_of(claim) {
                        Some(PoolWritten::Failed(error)) => Some(error.clone()),
                        _ => None,
                    });
                let conflicted = plan
                    .claims
                    .iter()
                    .any(|claim| matches!(outcome_of(claim), Some(PoolWritten::Conflict)));
                if let Some(error) = failure {
                    self.settle(member, Err(error), size).await;
                } else if conflicted {
                    member.conflicts += 1;
                    most_conflicts = most_conflicts.max(member.conflicts);
                    if member.conflicts < MAX_ATTEMPTS {
                        self.metrics.claim_retried();
                        again.push(member);
                    } else {
                        let claims: Vec<&Claim> = plan.claims.iter().collect();
                        self.settle(member, Err(gave_up(&claims)), size).await;
                    }
                } else {
                    self.settle(member, Ok(plan), size).await;
                }
            }
            if most_conflicts > 0 {
                tokio::time::sleep(backoff(most_conflicts)).await;
            }
            members = again;
        }
    }

    /// Makes every write of a batch, in parallel (at most one per pool); a pool whose write
    /// conflicted is re-read so the next round decides on its current version.
    async fn write_pools(&self, writes: &[BatchWrite]) -> BTreeMap<String, PoolWritten> {
        let results = futures::future::join_all(writes.iter().map(|write| async move {
            let pool = &write.claim.pool;
            let outcome = match self.pool_store.claim(&write.claim).await {
                Ok(ClaimOutcome::Written(written)) => {
                    self.remember(written);
                    PoolWritten::Done
                }
                Ok(ClaimOutcome::Conflict(current)) => {
                    self.metrics.claim_conflicted();
                    debug!(%pool, "conflict claiming addresses; re-read the pool");
                    self.remember(current);
                    PoolWritten::Conflict
                }
                Err(error) => {
                    warn!(%error, %pool, "claiming addresses failed");
                    PoolWritten::Failed(refusal(error))
                }
            };
            (pool.clone(), outcome)
        }))
        .await;
        results.into_iter().collect()
    }

    /// Answers one request of a batch. A failed one gives back what it claimed; so does one
    /// whose plugin stopped waiting (nobody would record the Endpoint).
    async fn settle(&self, member: Member, result: Result<AllocationPlan, ApiError>, batch: usize) {
        let answer = result.map(|plan| Claimed {
            plan,
            claimed: member.claimed.clone(),
            attempts: member.conflicts + 1,
            batch,
        });
        let failed = answer.is_err();
        if (member.job.reply.send(answer).is_err() || failed) && !member.claimed.is_empty() {
            self.undo(
                &member.claimed,
                &member.holder,
                &member.job.request.container_id,
            )
            .await;
        }
    }

    /// Puts a Warning Event on the pod for a refusal its owner can act on; published in the
    /// background so the batch is not held up.
    fn report_refusal(&self, pod: &Pod, failure: &PlanFailure) {
        if let Some(reason) = failure.event_reason() {
            self.report(
                pod.object_ref(&()),
                EventType::Warning,
                "AllocateAddress",
                reason,
                failure.to_string(),
            );
        }
    }

    /// Publishes an Event on `regarding` in the background, so no request waits for it.
    fn report(
        &self,
        regarding: ObjectReference,
        type_: EventType,
        action: &str,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note.chars().take(1000).collect()),
            action: action.to_owned(),
            secondary: None,
        };
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            if let Err(error) = recorder.publish(&event, &regarding).await {
                warn!(%error, "could not publish an Event");
            }
        });
    }

    /// STATUS: not ready when every pool this node may use is full.
    pub fn status(&self) -> Result<(), ApiError> {
        let labels = self
            .nodes
            .get(&ObjectRef::new(&self.node))
            .map(|node| node.labels().clone())
            .unwrap_or_default();
        match plan::node_exhaustion(&labels, &self.subnet_snapshot(), &self.pool_snapshot()) {
            Some(message) => Err(ApiError::new(ErrorKind::PoolExhausted, message)),
            None => Ok(()),
        }
    }

    /// Gives back addresses this request claimed, after a later step failed.
    async fn undo(&self, claimed: &[Claim], holder: &AllocationHolder, container_id: &str) {
        let mut by_pool: BTreeMap<&str, Vec<IpAddr>> = BTreeMap::new();
        for claim in claimed {
            by_pool.entry(&claim.pool).or_default().push(claim.address);
        }
        for (pool, addresses) in by_pool {
            if let Err(error) = self
                .release_addresses(pool, &addresses, holder, container_id)
                .await
            {
                warn!(
                    %error, %pool, addresses = ?addresses,
                    "could not release addresses after a failed ADD; the controller's garbage \
                     collection will"
                );
            }
        }
    }

    /// Writes the Endpoint: created with the finalizer (and the pod as owner for a per-pod
    /// key), or updated with this interface and the current pod's identity; both guarded (a
    /// create fails if it exists, a replace carries the version read).
    async fn record_endpoint(
        &self,
        plan: &AllocationPlan,
        pod: &Pod,
        request: &AllocateRequest,
    ) -> Result<(), ApiError> {
        let facts = pod_facts(pod);
        let namespace = plan.holder.key.namespace();
        let name = plan.holder.key.endpoint_name();
        let interface = plan::endpoint_interface(&request.ifname, request.network.as_deref(), plan);
        let mut retry = Retry::default();
        loop {
            // A new pod's Endpoint does not exist yet: when the cache agrees, create it without
            // asking (a stale cache makes the create fail as a conflict, and the retry reads).
            let cached_absent = retry.attempts() == 1
                && self
                    .endpoints
                    .get(&ObjectRef::new(name).within(namespace))
                    .is_none();
            let existing = if cached_absent {
                None
            } else {
                self.endpoint_store
                    .get(namespace, name)
                    .await
                    .map_err(refusal)?
            };
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
                            "Endpoint {namespace}/{name} still belongs to an earlier pod (uid {}) \
                             whose addresses are being released; the runtime retries the ADD",
                            endpoint.spec.pod_uid
                        ),
                    ));
                }
                Some(mut endpoint) => {
                    endpoint.spec = spec;
                    self.endpoint_store.replace(&endpoint).await
                }
                None => {
                    let endpoint = Endpoint {
                        metadata: ObjectMeta {
                            name: Some(name.to_owned()),
                            namespace: Some(namespace.to_owned()),
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
                    self.endpoint_store.create(&endpoint).await
                }
            };
            match written.map_err(refusal)? {
                Written::Done => return Ok(()),
                Written::Changed if retry.after_conflict().await => {}
                Written::Changed => {
                    return Err(ApiError::new(
                        ErrorKind::NotReady,
                        format!(
                            "Endpoint {namespace}/{name} kept changing while being written; the \
                             runtime retries the ADD"
                        ),
                    ));
                }
            }
        }
    }

    /// Removes `addresses` from `pool` where they are still `holder`'s for sandbox
    /// `container_id` (fresh read, guarded write, conflicts retried). Giving up is an error:
    /// reporting success would leak the addresses.
    async fn release_addresses(
        &self,
        pool: &str,
        addresses: &[IpAddr],
        holder: &AllocationHolder,
        container_id: &str,
    ) -> Result<(), ApiError> {
        let released = self
            .pool_store
            .release(pool, addresses, |_, record| {
                plan::record_of_sandbox(record, holder, container_id)
            })
            .await
            .map_err(refusal)?;
        if let Some(written) = released {
            self.remember(written);
        }
        Ok(())
    }

    /// The Endpoint recording sandbox `container_id` (a fresh read): the one named after `pod`
    /// when it records that sandbox, else the one the cache shows recording it on this node
    /// (a KubeVirt launcher's Endpoint is named after its VM, an IPAMClaim's after the claim,
    /// and the runtime may not say which pod). `pod`'s own Endpoint, read afresh, when neither
    /// records the sandbox: the caller decides on it.
    async fn endpoint_for(
        &self,
        container_id: &str,
        pod: Option<&PodRef>,
    ) -> Result<Option<Endpoint>, ApiError> {
        let by_pod = match pod {
            Some(pod) => self
                .endpoint_store
                .get(&pod.namespace, &pod.name)
                .await
                .map_err(refusal)?,
            None => None,
        };
        if by_pod
            .as_ref()
            .is_some_and(|endpoint| endpoint.spec.container_id == container_id)
        {
            return Ok(by_pod);
        }
        let cached = self
            .endpoints
            .state()
            .iter()
            .find(|endpoint| {
                endpoint.spec.container_id == container_id && endpoint.spec.node == self.node
            })
            .map(|endpoint| {
                (
                    endpoint.namespace().unwrap_or_default(),
                    endpoint.name_any(),
                )
            });
        match cached {
            Some((namespace, name)) => self
                .endpoint_store
                .get(&namespace, &name)
                .await
                .map_err(refusal),
            None => Ok(by_pod),
        }
    }

    /// DEL: releases this interface's addresses unless they are sticky (the controller owns
    /// those) or the Endpoint now belongs to another container. Nothing to release is success;
    /// a replayed DEL, or one for a sandbox the agent never saw, changes nothing.
    pub async fn release(&self, request: &ReleaseRequest) -> Result<(), ApiError> {
        let (container_id, ifname) = (request.container_id.as_str(), request.ifname.as_str());
        let pod = request.pod.as_ref();
        let mut endpoint = self.endpoint_for(container_id, pod).await?;
        let mut retry = Retry::default();
        loop {
            // No Endpoint: nothing recorded to release (pool records of a sandbox that never
            // got its Endpoint are the next ADD's to reuse, or the controller's sweep's).
            let Some(current) = endpoint else {
                return Ok(());
            };
            if current.spec.sticky || current.spec.container_id != container_id {
                return Ok(());
            }
            // Another node's record is that node's agent's to release (the API server would
            // refuse this agent's write anyway, see the chart's node-scope policy).
            if current.spec.node != self.node {
                warn!(
                    endpoint = %current.name_any(), node = %current.spec.node,
                    "DEL for an Endpoint of another node: nothing released"
                );
                return Ok(());
            }
            let recorded = current
                .spec
                .interfaces
                .iter()
                .find(|entry| entry.interface == ifname)
                .and_then(|entry| entry.network.clone());
            if !plan::same_network(recorded.as_deref(), request.network.as_deref()) {
                warn!(
                    endpoint = %current.name_any(), %ifname, recorded = ?recorded,
                    requested = ?request.network,
                    "DEL for another network than the interface was added to: nothing released"
                );
                return Ok(());
            }
            let (namespace, name) = (current.namespace().unwrap_or_default(), current.name_any());
            match self
                .release_interface(current, ifname, container_id)
                .await?
            {
                Written::Done => return Ok(()),
                // Changed since it was read (a new sandbox of the pod took it over, most
                // likely): decide again on a fresh read.
                Written::Changed if retry.after_conflict().await => {
                    endpoint = self
                        .endpoint_store
                        .get(&namespace, &name)
                        .await
                        .map_err(refusal)?;
                }
                Written::Changed => {
                    return Err(ApiError::new(
                        ErrorKind::NotReady,
                        format!(
                            "Endpoint {namespace}/{name} kept changing while container \
                             {container_id} was being deleted; the runtime retries the DEL"
                        ),
                    ));
                }
            }
        }
    }

    /// Lets this interface's part of `endpoint` go, then gives its addresses back: the
    /// Endpoint write comes first and is guarded by the version read, so when a newer sandbox
    /// of the pod took the Endpoint over meanwhile nothing is released ([`Written::Changed`]),
    /// and the pool records are released only where they still name `container_id`.
    async fn release_interface(
        &self,
        endpoint: Endpoint,
        ifname: &str,
        container_id: &str,
    ) -> Result<Written, ApiError> {
        let Some(entry) = endpoint
            .spec
            .interfaces
            .iter()
            .find(|entry| entry.interface == ifname)
        else {
            return Ok(Written::Done);
        };
        let addresses =
            interface_addresses(&endpoint, entry).map_err(|error| refusal(error.into()))?;
        let namespace = endpoint.namespace().unwrap_or_default();
        let holder_pod_uid = endpoint.spec.pod_uid.clone();
        let holder = AllocationHolder {
            key: AllocationKey::Pod {
                namespace,
                name: endpoint.name_any(),
                uid: endpoint.spec.pod_uid.clone(),
            },
            interface: ifname.to_owned(),
        };
        let rest: Vec<_> = endpoint
            .spec
            .interfaces
            .iter()
            .filter(|entry| entry.interface != ifname)
            .cloned()
            .collect();
        let written = if rest.is_empty() {
            self.endpoint_store.let_go(&endpoint).await
        } else {
            let mut endpoint = endpoint;
            endpoint.spec = EndpointSpec {
                interfaces: rest,
                ..endpoint.spec
            };
            self.endpoint_store.replace(&endpoint).await
        };
        if written.map_err(refusal)? == Written::Changed {
            return Ok(Written::Changed);
        }
        self.allocated_to()
            .remove(&(holder_pod_uid.clone(), ifname.to_owned()));
        let (reply, answer) = oneshot::channel();
        let job = ReleaseJob {
            holder,
            container_id: container_id.to_owned(),
            addresses: addresses
                .into_iter()
                .map(|recorded| (recorded.pool, recorded.address))
                .collect(),
            reply,
        };
        self.releases.send(job).map_err(|_| shutting_down())?;
        answer.await.map_err(|_| shutting_down())??;
        Ok(Written::Done)
    }

    /// CHECK: the Endpoint still records this interface for this container.
    pub async fn check(&self, request: &CheckRequest) -> Result<(), ApiError> {
        let endpoint = self
            .endpoint_for(&request.container_id, request.pod.as_ref())
            .await?;
        let recorded = endpoint.as_ref().is_some_and(|endpoint| {
            endpoint.spec.container_id == request.container_id
                && endpoint.spec.interfaces.iter().any(|entry| {
                    entry.interface == request.ifname
                        && plan::same_network(entry.network.as_deref(), request.network.as_deref())
                })
        });
        if recorded {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorKind::NotAllocated,
                format!(
                    "no Endpoint records interface {} of container {} for network {}; delete \
                     the pod so it is re-created with an address",
                    request.ifname,
                    request.container_id,
                    request.network.as_deref().unwrap_or("(unnamed)")
                ),
            ))
        }
    }

    /// GC: releases this network's non-sticky allocations on this node whose attachment the
    /// runtime no longer lists, except those of a pod the API server still shows running on
    /// this node (its sandbox may be alive; the runtime's list is not the only truth). Every
    /// address released or kept is logged, counted and reported in an Event.
    pub async fn gc(&self, request: &GcRequest) -> Result<(), ApiError> {
        let Some(network) = request.network.as_deref() else {
            warn!("GC without a network name: nothing released (name the network in its config)");
            return Ok(());
        };
        let endpoints = self.endpoints.state();
        let stale: Vec<(Endpoint, String)> = plan::gc_candidates(
            endpoints.iter().map(Arc::as_ref),
            &self.node,
            network,
            &request.valid_attachments,
        )
        .into_iter()
        .map(|(endpoint, ifname)| (endpoint.clone(), ifname))
        .collect();
        for (endpoint, ifname) in stale {
            let (namespace, name) = (
                endpoint.namespace().unwrap_or_default(),
                endpoint.name_any(),
            );
            let pod = self
                .workloads
                .pod(&namespace, &name)
                .await
                .map_err(refusal)?;
            if plan::still_runs_here(pod.as_ref(), &endpoint.spec, &self.node) {
                warn!(endpoint = %format!("{namespace}/{name}"), %ifname, %network,
                      "GC: the runtime does not list this attachment but the pod still runs \
                       on this node: its addresses are kept");
                self.metrics.gc_decided("kept");
                if let Some(pod) = &pod {
                    self.report(
                        pod.object_ref(&()),
                        EventType::Warning,
                        "GarbageCollect",
                        "GarbageCollectionRefused",
                        format!(
                            "CNI GC of network {network} did not list interface {ifname} of \
                             container {}, but the pod still runs on node {}: its addresses \
                             are kept",
                            endpoint.spec.container_id, self.node
                        ),
                    );
                }
                continue;
            }
            info!(endpoint = %format!("{namespace}/{name}"), %ifname, %network,
                  "GC: the runtime no longer lists this attachment: releasing its addresses");
            let container_id = endpoint.spec.container_id.clone();
            let reference = endpoint.object_ref(&());
            // Changed: the cache was behind (a newer sandbox holds it now); the next GC
            // decides on the new version.
            if self
                .release_interface(endpoint, &ifname, &container_id)
                .await?
                == Written::Done
            {
                self.metrics.gc_decided("released");
                self.report(
                    reference,
                    EventType::Normal,
                    "GarbageCollect",
                    "GarbageCollected",
                    format!(
                        "CNI GC of network {network} released interface {ifname} of container \
                         {container_id}: the runtime no longer lists it"
                    ),
                );
            }
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
