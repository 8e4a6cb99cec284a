//! The Endpoint reconciler: gathers the facts [`super::lifecycle::decide`] needs from watch
//! caches, releases what it decides to release, and sweeps every pool periodically.
//!
//! Caches (reflectors) of Endpoints, Pods, Nodes, StatefulSets and, when the CRD is installed,
//! KubeVirt VirtualMachines feed one queue of triggers: a change to any of them queues the
//! Endpoints it may affect; a timer (and leadership start) queues a full sweep. The queue is
//! worked serially, so two releases of one Endpoint never race each other; races with the agent
//! are settled in the API server by resourceVersion and podUID guards.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::Duration,
};

use futures::{Stream, StreamExt};
use k8s_openapi::{
    api::{
        apps::v1::StatefulSet,
        core::v1::{Node, Pod},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams},
    runtime::{
        events::EventType,
        reflector::{ObjectRef, Store, store::Writer},
        watcher,
    },
};
use tokio::{sync::mpsc, task::JoinSet};
use tracing::{info, warn};

use super::{
    Context, Error,
    lifecycle::{
        AllocationRef, Decision, IpamClaimView, NodeView, OWNER_STATEFULSET, OWNER_VIRTUAL_MACHINE,
        Observed, OwnerView, PodState, PodView, Reason, Settings, StatefulSetView, SweptRecord,
        VirtualMachineView, absent_pod, decide, listed_with_its_copies, plan_orphans,
        recheck_after, sticky_owner,
    },
};
use crate::{
    crd::{Endpoint, EndpointSpec, IPAM_CLAIM_KIND, IpAllocation, IpPool, IpamClaim},
    ipam::{KUBEVIRT_API_GROUP, KUBEVIRT_VM_NAME_LABEL},
    store::{
        self,
        parse::{self, endpoint_addresses, holder_name},
    },
};
/// Delay before an Endpoint whose reconcile failed is tried again.
const RETRY_DELAY: Duration = Duration::from_secs(2);
/// A recheck runs this long after its grace ends, so the grace has surely ended by then.
const RECHECK_MARGIN: Duration = Duration::from_millis(500);

/// Settings of the Endpoint reconciler.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub lifecycle: Settings,
    /// Interval of the full sweep (also run when leadership starts).
    pub sweep_interval: Duration,
}

enum Trigger {
    Endpoint(ObjectRef<Endpoint>),
    Sweep,
}

/// The watch caches the decisions read.
struct Caches {
    endpoints: Store<Endpoint>,
    pods: Store<Pod>,
    nodes: Store<Node>,
    statefulsets: Store<StatefulSet>,
    /// Empty until the KubeVirt CRDs are served.
    vms: OwnerCache,
    /// Empty until the IPAMClaim CRD is served.
    claims: OwnerCache,
    /// UIDs of pods whose deletion the pod watch delivered, and when: such a pod's absence is
    /// not the cache lagging behind a new pod (see [`PodView::Deleted`]).
    deleted_pods: DeletedPods,
    /// When the pod cache's first list was asked for: a pod that existed well before then and
    /// is not in the cache was deleted (perhaps while no controller ran).
    pods_listed_after: Timestamp,
}

type DeletedPods = Arc<Mutex<BTreeMap<String, Timestamp>>>;

/// The cache of a sticky owner kind defined outside VirtNet, set once the kind is served.
type OwnerCache = Arc<OnceLock<(Store<DynamicObject>, ApiResource)>>;

/// How often the controller looks again for an owner kind that is not served yet (KubeVirt or
/// the IPAMClaim CRD installed after VirtNet).
const OWNER_KIND_RETRY: Duration = Duration::from_secs(20);

/// Runs the Endpoint reconciler until `stopped` resolves.
pub async fn run(ctx: Arc<Context>, stopped: impl Future<Output = ()>) {
    let (sender, mut receiver) = mpsc::channel(4096);
    let mut tasks = JoinSet::new();
    let caches = start_caches(&ctx, &sender, &mut tasks).await;
    let ready = async {
        caches.endpoints.wait_until_ready().await.ok();
        caches.pods.wait_until_ready().await.ok();
        caches.nodes.wait_until_ready().await.ok();
        caches.statefulsets.wait_until_ready().await.ok();
        for (owners, _) in caches.vms.get().into_iter().chain(caches.claims.get()) {
            owners.wait_until_ready().await.ok();
        }
    };
    tokio::pin!(stopped);
    {
        tokio::pin!(ready);
        loop {
            tokio::select! {
                () = &mut ready => break,
                // Until every cache has synced, what the watches queue is dropped: the first
                // sweep (its timer fires at once) reconciles every Endpoint anyway. Left in the
                // queue, it would fill it (one trigger per object listed), block the watches
                // and so keep the caches from ever syncing.
                trigger = receiver.recv() => if trigger.is_none() { return },
                () = &mut stopped => return,
            }
        }
    }
    let interval = ctx.endpoints.sweep_interval;
    let ticker = sender.clone();
    tasks.spawn(async move {
        let mut timer = tokio::time::interval(interval);
        loop {
            timer.tick().await;
            if ticker.send(Trigger::Sweep).await.is_err() {
                return;
            }
        }
    });
    let mut worker = Worker {
        ctx,
        caches,
        retry: sender,
        suspects: BTreeMap::new(),
        rechecks: HashMap::new(),
    };
    loop {
        let trigger = tokio::select! {
            trigger = receiver.recv() => trigger,
            () = &mut stopped => None,
        };
        match trigger {
            Some(Trigger::Endpoint(endpoint)) => worker.reconcile(&endpoint).await,
            Some(Trigger::Sweep) => worker.sweep().await,
            None => break,
        }
    }
    tasks.shutdown().await;
}

/// Starts one reflector per watched kind; each change queues the Endpoints it affects.
async fn start_caches(
    ctx: &Context,
    sender: &mpsc::Sender<Trigger>,
    tasks: &mut JoinSet<()>,
) -> Caches {
    let client = &ctx.client;
    let endpoints = cache(
        tasks,
        sender,
        Api::<Endpoint>::all(client.clone()),
        Writer::default(),
        |endpoint, _| vec![ObjectRef::from_obj(&endpoint)],
    );
    let deleted_pods = DeletedPods::default();
    let pods_listed_after = Timestamp::now();
    let pods = cache(
        tasks,
        sender,
        Api::<Pod>::all(client.clone()),
        Writer::default(),
        {
            let deleted_pods = deleted_pods.clone();
            move |pod, deleted| {
                if deleted && let Some(uid) = pod.uid() {
                    deleted_pods
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(uid, Timestamp::now());
                }
                endpoints_of_pod(&pod)
            }
        },
    );
    let nodes = cache(
        tasks,
        sender,
        Api::<Node>::all(client.clone()),
        Writer::default(),
        {
            let endpoints = endpoints.clone();
            move |node, _| {
                select_endpoints(&endpoints, |endpoint| endpoint.spec.node == node.name_any())
            }
        },
    );
    let statefulsets = cache(
        tasks,
        sender,
        Api::<StatefulSet>::all(client.clone()),
        Writer::default(),
        {
            let endpoints = endpoints.clone();
            move |statefulset, _| {
                select_endpoints(&endpoints, |endpoint| {
                    endpoint.spec.owner_kind == OWNER_STATEFULSET
                        && endpoint.spec.owner_name == statefulset.name_any()
                        && endpoint.namespace() == statefulset.namespace()
                })
            }
        },
    );
    let vms = owner_cache(
        tasks,
        sender,
        client,
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(KUBEVIRT_API_GROUP, "v1", OWNER_VIRTUAL_MACHINE),
            "virtualmachines",
        ),
        "without KubeVirt this is expected",
    )
    .await;
    let claims = owner_cache(
        tasks,
        sender,
        client,
        ApiResource::erase::<IpamClaim>(&()),
        "without the IPAMClaim CRD (chart value ipamClaims.installCRD) this is expected",
    )
    .await;
    Caches {
        endpoints,
        pods,
        nodes,
        statefulsets,
        vms,
        claims,
        deleted_pods,
        pods_listed_after,
    }
}

/// A cache of a sticky owner kind defined outside VirtNet (KubeVirt VMs, IPAMClaims), whose
/// Endpoints are named after the owner. While the kind is not served the cache stays empty (the
/// owners' addresses are kept) and the kind is looked for again every [`OWNER_KIND_RETRY`], so
/// installing KubeVirt or the claim CRD after VirtNet needs no restart.
async fn owner_cache(
    tasks: &mut JoinSet<()>,
    sender: &mpsc::Sender<Trigger>,
    client: &Client,
    resource: ApiResource,
    expected_when: &'static str,
) -> OwnerCache {
    let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
    let cell = OwnerCache::default();
    let affected = |owner: DynamicObject, _| {
        let namespace = owner.namespace().unwrap_or_default();
        vec![ObjectRef::new(&owner.name_any()).within(&namespace)]
    };
    if api.list(&ListParams::default().limit(1)).await.is_ok() {
        let store = cache(tasks, sender, api, Writer::new(resource.clone()), affected);
        cell.set((store, resource)).ok();
        return cell;
    }
    info!(
        "{} is not served: those addresses are kept until it is ({expected_when}; otherwise \
         check the controller's RBAC for {}); looking again every {}s",
        resource.kind,
        resource.plural,
        OWNER_KIND_RETRY.as_secs()
    );
    let (sender, found) = (sender.clone(), cell.clone());
    tasks.spawn(async move {
        while api.list(&ListParams::default().limit(1)).await.is_err() {
            tokio::time::sleep(OWNER_KIND_RETRY).await;
        }
        info!("{} is served now: watching it", resource.kind);
        let (store, events) = store::cache::reflect(
            api,
            watcher::Config::default().any_semantic(),
            Writer::new(resource.clone()),
        );
        found.set((store, resource)).ok();
        forward(events, sender, affected).await;
    });
    cell
}

/// Starts a reflector of `api` into a new store; each applied or deleted object queues the
/// Endpoints `affected` names (told whether the watch deleted the object).
fn cache<K>(
    tasks: &mut JoinSet<()>,
    sender: &mpsc::Sender<Trigger>,
    api: Api<K>,
    writer: Writer<K>,
    affected: impl Fn(K, bool) -> Vec<ObjectRef<Endpoint>> + Send + 'static,
) -> Store<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash + Send + Sync,
{
    let (store, events) =
        store::cache::reflect(api, watcher::Config::default().any_semantic(), writer);
    tasks.spawn(forward(events, sender.clone(), affected));
    store
}

async fn forward<K>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    sender: mpsc::Sender<Trigger>,
    affected: impl Fn(K, bool) -> Vec<ObjectRef<Endpoint>>,
) {
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        // Only a Delete event says the object was deleted: objects that vanish in a re-list
        // (InitDone) may just as well be unknown to a lagging cache.
        let (object, deleted) = match event {
            Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object)) => {
                (object, false)
            }
            Ok(watcher::Event::Delete(object)) => (object, true),
            Ok(watcher::Event::Init | watcher::Event::InitDone) => continue,
            Err(error) => {
                warn!(%error, "watch failed; retrying with backoff");
                continue;
            }
        };
        for endpoint in affected(object, deleted) {
            if sender.send(Trigger::Endpoint(endpoint)).await.is_err() {
                return;
            }
        }
    }
}

fn select_endpoints(
    endpoints: &Store<Endpoint>,
    matches: impl Fn(&Endpoint) -> bool,
) -> Vec<ObjectRef<Endpoint>> {
    endpoints
        .state()
        .iter()
        .filter(|endpoint| matches(endpoint))
        .map(|endpoint| ObjectRef::from_obj(endpoint.as_ref()))
        .collect()
}

/// The Endpoints a pod may hold: its own name, and its VM's for a virt-launcher pod.
fn endpoints_of_pod(pod: &Pod) -> Vec<ObjectRef<Endpoint>> {
    let namespace = pod.namespace().unwrap_or_default();
    let vm = pod.labels().get(KUBEVIRT_VM_NAME_LABEL).cloned();
    std::iter::once(pod.name_any())
        .chain(vm)
        .map(|name| ObjectRef::new(&name).within(&namespace))
        .collect()
}

struct Worker {
    ctx: Arc<Context>,
    caches: Caches,
    retry: mpsc::Sender<Trigger>,
    /// Unlisted allocations and when the sweep first saw them.
    suspects: BTreeMap<AllocationRef, Timestamp>,
    /// Endpoints queued again for when a grace ends, and when.
    rechecks: HashMap<ObjectRef<Endpoint>, tokio::time::Instant>,
}

impl Worker {
    async fn reconcile(&mut self, reference: &ObjectRef<Endpoint>) {
        let Some(endpoint) = self.caches.endpoints.get(reference) else {
            return;
        };
        let timer = self.ctx.metrics.reconcile_started("endpoint");
        let result = self.reconcile_endpoint(&endpoint).await;
        timer.finish(result.as_ref().err().map(Error::metric_label));
        match result {
            Ok(None) => {}
            Ok(Some(grace_left)) => self.recheck(reference, grace_left + RECHECK_MARGIN),
            Err(error) => {
                warn!(endpoint = %reference, %error, "reconcile failed; retrying");
                self.trigger_later(reference, RETRY_DELAY);
            }
        }
    }

    /// Decides one Endpoint and applies the decision; `Some(delay)` when it is kept only by a
    /// grace period that ends after `delay`.
    async fn reconcile_endpoint(&self, endpoint: &Endpoint) -> Result<Option<Duration>, Error> {
        let observed = self.observe(endpoint);
        let settings = &self.ctx.endpoints.lifecycle;
        match decide(&endpoint.name_any(), &endpoint.spec, &observed, settings) {
            Decision::Keep => {
                Ok(recheck_after(&observed, settings).map(|left| left.unsigned_abs()))
            }
            Decision::Release(_) => {
                // The caches call for a release: confirm it on fresh reads first.
                let confirmed = self.confirm(endpoint).await?;
                match decide(&endpoint.name_any(), &endpoint.spec, &confirmed, settings) {
                    Decision::Keep => {
                        info!(endpoint = %holder_name(endpoint), "the caches were behind: a fresh read keeps the addresses");
                        Ok(recheck_after(&confirmed, settings).map(|left| left.unsigned_abs()))
                    }
                    Decision::Release(reason) => {
                        self.release(endpoint, reason).await.map(|()| None)
                    }
                }
            }
        }
    }

    /// Queues `reference` again after `delay`, unless a recheck that soon is already queued.
    fn recheck(&mut self, reference: &ObjectRef<Endpoint>, delay: Duration) {
        let due = tokio::time::Instant::now() + delay;
        let now = tokio::time::Instant::now();
        if self
            .rechecks
            .get(reference)
            .is_some_and(|&queued| queued > now && queued <= due)
        {
            return;
        }
        self.rechecks.insert(reference.clone(), due);
        self.trigger_later(reference, delay);
    }

    fn trigger_later(&self, reference: &ObjectRef<Endpoint>, delay: Duration) {
        let queue = self.retry.clone();
        let reference = reference.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = queue.send(Trigger::Endpoint(reference)).await;
        });
    }

    /// What the caches show of `endpoint`'s pod, node and owner.
    fn observe(&self, endpoint: &Endpoint) -> Observed {
        let spec = &endpoint.spec;
        let pod = self.cached_pod(endpoint);
        let node = self.caches.nodes.get(&ObjectRef::new(&spec.node));
        let deletion_seen = self
            .caches
            .deleted_pods
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&spec.pod_uid);
        self.observed(endpoint, pod.as_deref(), node.as_deref(), deletion_seen)
    }

    /// The pod the caches hold for `endpoint`: a VM's Endpoint is named after the VM, so its
    /// launcher pod is found by UID; any other by the Endpoint's name.
    fn cached_pod(&self, endpoint: &Endpoint) -> Option<Arc<Pod>> {
        let spec = &endpoint.spec;
        if named_after_owner(spec) {
            self.caches
                .pods
                .find(|pod| pod.metadata.uid.as_deref() == Some(spec.pod_uid.as_str()))
        } else {
            let namespace = endpoint.namespace().unwrap_or_default();
            self.caches
                .pods
                .get(&ObjectRef::new(&endpoint.name_any()).within(&namespace))
        }
    }

    /// The same view from fresh (quorum) reads of the pod and the node, to confirm a release
    /// the caches call for: a lagging pod watch, a stale cache after an etcd restart or a node
    /// missing from the node cache must not release a live pod's address.
    async fn confirm(&self, endpoint: &Endpoint) -> Result<Observed, Error> {
        let spec = &endpoint.spec;
        let namespace = endpoint.namespace().unwrap_or_default();
        // A VM's launcher pod is known only by UID: read afresh the one the cache names; one
        // the cache does not know stays judged by the cache's evidence.
        let name = match self.cached_pod(endpoint) {
            Some(pod) => Some(pod.name_any()),
            None if named_after_owner(spec) => None,
            None => Some(endpoint.name_any()),
        };
        let pod = match &name {
            Some(name) => self.ctx.workloads.pod(&namespace, name).await?,
            None => None,
        };
        let node = self.ctx.workloads.node(&spec.node).await?;
        // Absent from a quorum read: deleted, not a cache behind.
        let deletion_confirmed = name.is_some() && pod.is_none();
        Ok(self.observed(endpoint, pod.as_ref(), node.as_ref(), deletion_confirmed))
    }

    fn observed(
        &self,
        endpoint: &Endpoint,
        pod: Option<&Pod>,
        node: Option<&Node>,
        deletion_seen: bool,
    ) -> Observed {
        let settings = &self.ctx.endpoints.lifecycle;
        let namespace = endpoint.namespace().unwrap_or_default();
        let spec = &endpoint.spec;
        let owner = match sticky_owner(spec, settings) {
            Some(OWNER_STATEFULSET) => OwnerView::StatefulSet(
                self.caches
                    .statefulsets
                    .get(&ObjectRef::new(&spec.owner_name).within(&namespace))
                    .map(|statefulset| statefulset_view(&statefulset)),
            ),
            Some(IPAM_CLAIM_KIND) => OwnerView::IpamClaim(
                owner_deleting(&self.caches.claims, &namespace, &spec.owner_name)
                    .map(|deleting| IpamClaimView { deleting }),
            ),
            Some(_) => OwnerView::VirtualMachine(
                owner_deleting(&self.caches.vms, &namespace, &spec.owner_name)
                    .map(|deleting| VirtualMachineView { deleting }),
            ),
            None => OwnerView::NotSticky,
        };
        let now = Timestamp::now();
        let endpoint_created = endpoint.creation_timestamp().map_or(now, |time| time.0);
        let pod = match pod {
            None => absent_pod(
                endpoint_created,
                self.caches.pods_listed_after,
                deletion_seen,
            ),
            Some(pod) if pod.metadata.uid.as_deref() != Some(spec.pod_uid.as_str()) => {
                PodView::Replaced
            }
            Some(pod) => PodView::Present(pod_state(pod)),
        };
        let node = node.map_or(NodeView::Gone, node_view);
        Observed {
            pod,
            node,
            owner,
            endpoint_created,
            now,
        }
    }

    /// Returns the Endpoint's addresses to their pools, then lets the Endpoint go.
    async fn release(&self, endpoint: &Endpoint, reason: Reason) -> Result<(), Error> {
        let holder = holder_name(endpoint);
        let mut released = Vec::new();
        for recorded in endpoint_addresses(endpoint).map_err(store::StoreError::from)? {
            let allocation = AllocationRef {
                pool: recorded.pool.clone(),
                address: recorded.address,
                endpoint: holder.clone(),
                pod_uid: endpoint.spec.pod_uid.clone(),
            };
            // A sticky Endpoint's records may carry an earlier pod's UID (see `held_by`).
            let match_pod_uid = !endpoint.spec.sticky;
            if self
                .release_allocation(&allocation, match_pod_uid, reason)
                .await?
            {
                released.push(format!("{} ({})", recorded.address, recorded.pool));
            }
        }
        if !released.is_empty() {
            info!(endpoint = %holder, reason = reason.as_str(), addresses = ?released, "addresses released");
            let note = format!("released {}: {}", released.join(", "), reason.as_str());
            self.ctx
                .publish(endpoint, EventType::Normal, reason.as_str(), &note)
                .await;
        }
        // Changed: an agent took the Endpoint over meanwhile (a new pod of a sticky owner);
        // its watch event queues the next decision.
        self.ctx.endpoint_store.let_go(endpoint).await?;
        Ok(())
    }

    /// Removes one pool record if it still names its holder; `true` when it did.
    async fn release_allocation(
        &self,
        allocation: &AllocationRef,
        match_pod_uid: bool,
        reason: Reason,
    ) -> Result<bool, Error> {
        let released = self
            .ctx
            .pools
            .release(&allocation.pool, &[allocation.address], |_, record| {
                held_by(
                    record,
                    &allocation.endpoint,
                    match_pod_uid.then_some(allocation.pod_uid.as_str()),
                )
            })
            .await?;
        let Some(pool) = released else {
            return Ok(false);
        };
        self.ctx.metrics.address_reclaimed(reason.as_str());
        self.ctx.metrics.observe_pool(&pool);
        Ok(true)
    }

    /// Releases unlisted allocations past their grace and reconciles every Endpoint.
    async fn sweep(&mut self) {
        let ctx = self.ctx.clone();
        let timer = ctx.metrics.reconcile_started("sweep");
        let result = self.sweep_orphans().await;
        timer.finish(result.as_ref().err().map(Error::metric_label));
        if let Err(error) = result {
            warn!(%error, "sweep of pool allocations failed; the next sweep retries");
        }
        // Past the orphan grace an unseen pod counts as deleted anyway; past their time,
        // rechecks have run.
        let forget_before = Timestamp::now() - ctx.endpoints.lifecycle.orphan_grace;
        self.caches
            .deleted_pods
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, seen| *seen > forget_before);
        let now = tokio::time::Instant::now();
        self.rechecks.retain(|_, due| *due > now);
        for endpoint in self.caches.endpoints.state() {
            self.reconcile(&ObjectRef::from_obj(endpoint.as_ref()))
                .await;
        }
    }

    async fn sweep_orphans(&mut self) -> Result<(), Error> {
        // Fresh lists, not caches: a record must be judged against the latest Endpoints.
        let pools = self.ctx.pools.list(None).await?;
        let endpoints = self.ctx.endpoint_store.list().await?;
        // Pools deleted with their Subnet leave no reconcile behind to drop their gauges.
        let existing = pools.iter().map(ResourceExt::name_any).collect();
        self.ctx.metrics.forget_pools_except(None, &existing);
        let mut listed: BTreeSet<(String, IpAddr)> = BTreeSet::new();
        let mut listed_unreadable: BTreeSet<String> = BTreeSet::new();
        for endpoint in &endpoints {
            // One unreadable Endpoint must not make every address it lists look orphaned,
            // nor stop the sweep of the others: its addresses stay (and it is reported).
            match endpoint_addresses(endpoint) {
                Ok(addresses) => listed.extend(
                    addresses
                        .into_iter()
                        .map(|recorded| (recorded.pool, recorded.address)),
                ),
                Err(error) => {
                    warn!(%error, "the sweep cannot read an Endpoint");
                    listed_unreadable.insert(holder_name(endpoint));
                }
            }
        }
        let mut records: BTreeMap<IpAddr, Vec<(&IpPool, &IpAllocation)>> = BTreeMap::new();
        for pool in &pools {
            for (address, record) in
                parse::pool_allocations(pool).map_err(store::StoreError::from)?
            {
                records.entry(address).or_default().push((pool, record));
            }
        }
        let mut allocations = Vec::new();
        for (&address, holders) in &records {
            let copies: Vec<SweptRecord<'_>> = holders
                .iter()
                .map(|(pool, record)| SweptRecord {
                    pool: pool.metadata.name.as_deref().unwrap_or_default(),
                    subnet: &pool.spec.subnet,
                    endpoint: &record.endpoint,
                })
                .collect();
            for (swept, (_, record)) in copies.iter().zip(holders) {
                if listed_unreadable.contains(&record.endpoint)
                    || listed_with_its_copies(&copies, swept, address, &listed)
                {
                    continue;
                }
                allocations.push(AllocationRef {
                    pool: swept.pool.to_owned(),
                    address,
                    endpoint: record.endpoint.clone(),
                    pod_uid: record.pod_uid.clone(),
                });
            }
        }
        let alive: BTreeSet<String> = self
            .caches
            .pods
            .state()
            .iter()
            .filter(|pod| !pod_state(pod).terminal)
            .filter_map(|pod| pod.uid())
            .collect();
        let plan = plan_orphans(
            allocations,
            &listed,
            |uid| alive.contains(uid),
            &self.suspects,
            Timestamp::now(),
            self.ctx.endpoints.lifecycle.orphan_grace,
        );
        self.suspects = plan.suspects;
        for allocation in &plan.release {
            if self
                .release_allocation(allocation, true, Reason::OrphanAllocation)
                .await?
            {
                warn!(pool = %allocation.pool, address = %allocation.address, endpoint = %allocation.endpoint, "released an allocation no Endpoint lists");
                if let Some(pool) = pools.iter().find(|pool| pool.name_any() == allocation.pool) {
                    let note = format!(
                        "released {} of {} (pod {}): no Endpoint lists it",
                        allocation.address, allocation.endpoint, allocation.pod_uid
                    );
                    self.ctx
                        .publish(
                            pool,
                            EventType::Warning,
                            Reason::OrphanAllocation.as_str(),
                            &note,
                        )
                        .await;
                }
            }
        }
        Ok(())
    }
}

/// `namespace/name` of `endpoint`, as pool records name it.
/// Whether a pool record still names its holder: the Endpoint (`namespace/name`) and, unless
/// `pod_uid` is `None`, that pod. `None` for a sticky Endpoint: its identity is its name (the
/// StatefulSet replica or the VM), and its records keep the UID of the pod that first claimed
/// them while later pods of that name reuse them, so any record naming the Endpoint is its own.
fn held_by(record: &IpAllocation, endpoint: &str, pod_uid: Option<&str>) -> bool {
    record.endpoint == endpoint && pod_uid.is_none_or(|uid| record.pod_uid == uid)
}

fn pod_state(pod: &Pod) -> PodState {
    let phase = pod
        .status
        .as_ref()
        .and_then(|status| status.phase.as_deref());
    PodState {
        terminal: matches!(phase, Some("Succeeded" | "Failed")),
    }
}

/// The taint of non-graceful node shutdown: an administrator's word that the node is off.
const OUT_OF_SERVICE_TAINT: &str = "node.kubernetes.io/out-of-service";

fn node_view(node: &Node) -> NodeView {
    let fenced = node
        .spec
        .as_ref()
        .and_then(|spec| spec.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|taint| taint.key == OUT_OF_SERVICE_TAINT));
    if fenced {
        return NodeView::Fenced;
    }
    let ready = node
        .status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .and_then(|conditions| conditions.iter().find(|c| c.type_ == "Ready"));
    match ready {
        Some(condition) if condition.status != "True" => NodeView::NotReady,
        _ => NodeView::Ready,
    }
}

fn statefulset_view(statefulset: &StatefulSet) -> StatefulSetView {
    let spec = statefulset.spec.as_ref();
    StatefulSetView {
        deleting: statefulset.metadata.deletion_timestamp.is_some(),
        replicas: spec.and_then(|spec| spec.replicas).unwrap_or(1),
        ordinals_start: spec
            .and_then(|spec| spec.ordinals.as_ref())
            .and_then(|ordinals| ordinals.start)
            .unwrap_or(0),
    }
}

/// Whether the Endpoint is named after its sticky owner (a VM, an IPAMClaim) rather than its pod,
/// whose current one is then known only by UID.
fn named_after_owner(spec: &EndpointSpec) -> bool {
    spec.sticky && (spec.owner_kind == OWNER_VIRTUAL_MACHINE || spec.owner_kind == IPAM_CLAIM_KIND)
}

/// Whether the owner `namespace/name` is being deleted, `None` when it is gone; when its kind is
/// not served, an owner presumed to exist: never release a VM's or a claim's address on the
/// strength of a cache that cannot see them.
fn owner_deleting(owners: &OwnerCache, namespace: &str, name: &str) -> Option<bool> {
    let Some((owners, resource)) = owners.get() else {
        return Some(false);
    };
    owners
        .get(&ObjectRef::new_with(name, resource.clone()).within(namespace))
        .map(|owner| owner.metadata.deletion_timestamp.is_some())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::store::pools::release_patch;

    #[test]
    fn release_patch_removes_only_a_record_that_still_names_the_holder() {
        let pool: IpPool = serde_json::from_value(json!({
            "apiVersion": "virtnet.io/v1alpha1", "kind": "IPPool",
            "metadata": {"name": "pool-0", "resourceVersion": "42"},
            "spec": {"subnet": "s", "cidr": "10.0.0.0/24"},
            "status": {
                "allocations": {
                    "10.0.0.1": {"endpoint": "default/p", "interface": "eth0", "podUID": "old", "node": "n"},
                    "10.0.0.2": {"endpoint": "default/q", "interface": "eth0", "podUID": "q", "node": "n"},
                },
                "allocatedIPCount": 2, "unallocatedIPCount": 8, "totalIPCount": 10,
            },
        }))
        .expect("pool deserializes");
        let release = |pool: &IpPool, address: &str, pod_uid: Option<&str>| {
            let address = address.parse().expect("test addresses parse");
            release_patch(pool, &[address], |_, record| {
                held_by(record, "default/p", pod_uid)
            })
            .expect("the pool has a resourceVersion")
        };
        let released = Some(json!({
            "metadata": {"resourceVersion": "42"},
            "status": {
                "allocations": {"10.0.0.1": null},
                "allocatedIPCount": 1,
                "unallocatedIPCount": 9,
            },
        }));
        // A sticky Endpoint (StatefulSet replica, VM) owns every record naming it, whichever of
        // its pods claimed it first.
        assert_eq!(release(&pool, "10.0.0.1", None), released);
        assert_eq!(release(&pool, "10.0.0.2", None), None);
        assert_eq!(
            release(&pool, "10.0.0.1", Some("old")),
            Some(json!({
                "metadata": {"resourceVersion": "42"},
                "status": {
                    "allocations": {"10.0.0.1": null},
                    "allocatedIPCount": 1,
                    "unallocatedIPCount": 9,
                },
            }))
        );
        // A same-name pod took the address over, another Endpoint holds it, or it is free.
        assert_eq!(release(&pool, "10.0.0.1", Some("new")), None);
        assert_eq!(release(&pool, "10.0.0.2", Some("old")), None);
        assert_eq!(release(&pool, "10.0.0.3", Some("old")), None);
    }

    #[test]
    fn endpoint_addresses_keep_prefix_and_gateway_skip_unpooled_families_and_name_bad_values() {
        let endpoint: Endpoint = serde_json::from_value(json!({
            "apiVersion": "virtnet.io/v1alpha1", "kind": "Endpoint",
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {
                "interfaces": [
                    {"interface": "eth0", "ipv4Pool": "a", "ipv4": "10.0.0.1/24", "ipv4Gateway": "10.0.0.254",
                     "ipv6Pool": "b", "ipv6": "fd00::1/64"},
                    {"interface": "net1", "ipv4": "10.1.0.1/24"},
                ],
                "ownerKind": "Pod", "ownerName": "p", "node": "n", "podUID": "u", "containerID": "c",
            },
        }))
        .expect("endpoint deserializes");
        let addresses: Vec<(String, String)> = endpoint_addresses(&endpoint)
            .expect("the addresses parse")
            .into_iter()
            .map(|recorded| (recorded.pool, recorded.address.to_string()))
            .collect();
        assert_eq!(
            addresses,
            vec![
                ("a".into(), "10.0.0.1".into()),
                ("b".into(), "fd00::1".into())
            ]
        );
        let first = &endpoint_addresses(&endpoint).expect("the addresses parse")[0];
        assert_eq!(first.cidr.to_string(), "10.0.0.1/24");
        assert_eq!(first.gateway, Some("10.0.0.254".parse().expect("address")));

        let mut malformed = endpoint;
        malformed.spec.interfaces[0].ipv4_gateway = Some("10.0.0".into());
        let error = endpoint_addresses(&malformed).expect_err("a bad gateway is an error");
        assert!(
            error.to_string().contains("default/p") && error.to_string().contains("10.0.0"),
            "{error}"
        );
    }

    #[test]
    fn cached_objects_are_read_into_the_views_the_decision_takes() {
        let statefulset: StatefulSet = serde_json::from_value(json!({
            "metadata": {"name": "db", "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"replicas": 3, "ordinals": {"start": 5}, "serviceName": "db",
                     "selector": {}, "template": {}},
        }))
        .expect("statefulset deserializes");
        assert_eq!(
            statefulset_view(&statefulset),
            StatefulSetView {
                deleting: true,
                replicas: 3,
                ordinals_start: 5
            }
        );
        let node = |status: &str, taints: serde_json::Value| -> Node {
            serde_json::from_value(json!({
                "metadata": {"name": "n"},
                "spec": {"taints": taints},
                "status": {"conditions": [{"type": "Ready", "status": status,
                                           "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
            }))
            .expect("node deserializes")
        };
        let unreachable = json!([{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]);
        let out_of_service = json!([{"key": OUT_OF_SERVICE_TAINT, "value": "nodeshutdown",
                                     "effect": "NoExecute"}]);
        assert_eq!(node_view(&node("True", json!([]))), NodeView::Ready);
        assert_eq!(node_view(&node("Unknown", unreachable)), NodeView::NotReady);
        assert_eq!(
            node_view(&node("Unknown", out_of_service)),
            NodeView::Fenced
        );
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": "Failed"},
        }))
        .expect("pod deserializes");
        assert_eq!(pod_state(&pod), PodState { terminal: true });
    }

    #[test]
    fn virt_launcher_pods_trigger_their_vm_endpoint_too() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "virt-launcher-vm1-abcde", "namespace": "vms",
                         "labels": {KUBEVIRT_VM_NAME_LABEL: "vm1"}},
        }))
        .expect("pod deserializes");
        let names: Vec<_> = endpoints_of_pod(&pod).into_iter().map(|r| r.name).collect();
        assert_eq!(names, vec!["virt-launcher-vm1-abcde", "vm1"]);
    }
}
