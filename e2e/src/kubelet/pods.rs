//! The pod lifecycle: watch this node's pods and run one worker per pod UID, so pods are set up
//! concurrently while the steps of one pod never overlap.
use std::{
    collections::{HashMap, HashSet},
    mem,
    net::IpAddr,
    pin::pin,
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::{
    Api, Client,
    api::{DeleteParams, Preconditions},
    runtime::{WatchStreamExt, reflector, watcher},
};
use tokio::{
    sync::watch,
    task::JoinSet,
    time::{Instant, interval_at, sleep_until},
};
use tracing::{info, warn};

use super::{
    backoff::Backoff,
    error::{KubeletError, PodSyncError},
    report::{self, PodEvents},
    sandbox::{PodRef, SandboxRecord, Sandboxes, random_container_id},
    servers::{self, PodServers},
};

/// How often every pod is looked at again and leftover sandboxes are searched for, like the
/// kubelet's periodic sync.
const RESYNC_PERIOD: Duration = Duration::from_secs(30);

/// What a worker is told about its pod: the latest object, or `None` once it is gone.
type DesiredPod = Option<Arc<Pod>>;

/// Everything the workers share.
pub struct PodContext {
    pub client: Client,
    pub node_name: String,
    pub node_ip: IpAddr,
    pub sandboxes: Sandboxes,
}

/// Watches the pods bound to this node and keeps their sandboxes in line until the watch fails
/// for good.
pub async fn run(context: Arc<PodContext>) -> Result<(), KubeletError> {
    let api: Api<Pod> = Api::all(context.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", context.node_name));
    let (store, writer) = reflector::store();
    let mut events = pin!(reflector(writer, watcher(api, config)).default_backoff());
    let mut dispatcher = Dispatcher::new(context).await;
    let mut resync = interval_at(Instant::now() + RESYNC_PERIOD, RESYNC_PERIOD);
    let mut listed = false;
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod))) => {
                    dispatcher.pod_changed(Arc::new(pod));
                }
                Some(Ok(watcher::Event::Delete(pod))) => dispatcher.pod_deleted(&pod),
                Some(Ok(watcher::Event::InitDone)) => {
                    listed = true;
                    dispatcher.resync(&store.state()).await;
                }
                Some(Ok(watcher::Event::Init)) => {}
                Some(Err(error)) => warn!(%error, "watching pods failed; retrying"),
                None => return Err(KubeletError::WatchEnded),
            },
            _ = resync.tick(), if listed => dispatcher.resync(&store.state()).await,
            Some(_) = dispatcher.workers.join_next(), if !dispatcher.workers.is_empty() => {
                dispatcher.forget_finished();
            }
        }
    }
}

/// Routes pod updates to per-UID workers, starting workers as needed.
struct Dispatcher {
    context: Arc<PodContext>,
    desired_by_uid: HashMap<String, watch::Sender<DesiredPod>>,
    workers: JoinSet<()>,
    /// Sandbox records found on disk for pods that have no worker yet, by pod UID.
    unclaimed_records: HashMap<String, Vec<SandboxRecord>>,
}

impl Dispatcher {
    async fn new(context: Arc<PodContext>) -> Self {
        let mut dispatcher = Self {
            context,
            desired_by_uid: HashMap::new(),
            workers: JoinSet::new(),
            unclaimed_records: HashMap::new(),
        };
        dispatcher.reload_unclaimed_records().await;
        dispatcher
    }

    fn pod_changed(&mut self, pod: Arc<Pod>) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        let delivered = self
            .desired_by_uid
            .get(&uid)
            .is_some_and(|desired| desired.send(Some(Arc::clone(&pod))).is_ok());
        if !delivered {
            self.start_worker(uid, Some(pod));
        }
    }

    fn pod_deleted(&mut self, pod: &Pod) {
        let desired = pod
            .metadata
            .uid
            .as_ref()
            .and_then(|uid| self.desired_by_uid.get(uid));
        if let Some(desired) = desired {
            // A worker that already finished has nothing left to tear down.
            let _ = desired.send(None);
        }
    }

    fn start_worker(&mut self, uid: String, pod: DesiredPod) {
        let leftovers = self.unclaimed_records.remove(&uid).unwrap_or_default();
        let (desired, receiver) = watch::channel(pod);
        let worker = PodWorker::new(Arc::clone(&self.context), receiver, leftovers);
        self.workers.spawn(worker.run());
        self.desired_by_uid.insert(uid, desired);
    }

    fn forget_finished(&mut self) {
        self.desired_by_uid
            .retain(|_, desired| !desired.is_closed());
    }

    /// Brings every worker in line with the full list of this node's pods, and starts teardown
    /// workers for sandboxes whose pod is gone (deleted while the stand-in was down, or
    /// force-deleted).
    async fn resync(&mut self, pods: &[Arc<Pod>]) {
        self.forget_finished();
        self.reload_unclaimed_records().await;
        let listed: HashSet<String> = pods
            .iter()
            .filter_map(|pod| pod.metadata.uid.clone())
            .collect();
        for pod in pods {
            self.pod_changed(Arc::clone(pod));
        }
        for (uid, desired) in &self.desired_by_uid {
            if !listed.contains(uid) {
                let _ = desired.send(None);
            }
        }
        let orphans: Vec<String> = self
            .unclaimed_records
            .keys()
            .filter(|uid| !listed.contains(*uid))
            .cloned()
            .collect();
        for uid in orphans {
            info!(
                pod_uid = uid,
                "tearing down the sandboxes of a pod that no longer exists"
            );
            self.start_worker(uid, None);
        }
    }

    async fn reload_unclaimed_records(&mut self) {
        let records = match self.context.sandboxes.load_records().await {
            Ok(records) => records,
            Err(error) => {
                warn!(%error, "cannot look for leftover sandboxes");
                return;
            }
        };
        self.unclaimed_records.clear();
        for record in records {
            if !self.desired_by_uid.contains_key(&record.pod.uid) {
                self.unclaimed_records
                    .entry(record.pod.uid.clone())
                    .or_default()
                    .push(record);
            }
        }
    }
}

/// How a pod is attached to the network.
#[derive(Debug)]
enum PodNetwork {
    /// `hostNetwork` pods share the node's namespace and get no CNI call, as on a real node.
    Host {
        container_id: String,
    },
    Sandbox(Box<SandboxRecord>),
}

impl PodNetwork {
    fn container_id(&self) -> &str {
        match self {
            Self::Host { container_id } => container_id,
            Self::Sandbox(record) => &record.container_id,
        }
    }

    fn pod_ips(&self, node_ip: IpAddr) -> Result<Vec<IpAddr>, PodSyncError> {
        match self {
            Self::Host { .. } => Ok(vec![node_ip]),
            Self::Sandbox(record) => Ok(report::select_pod_ips(
                &record.pod_interface_ips()?,
                node_ip,
            )),
        }
    }
}

/// Owns one pod UID: sets up its sandbox and servers, reports its status, and tears it down.
struct PodWorker {
    context: Arc<PodContext>,
    desired: watch::Receiver<DesiredPod>,
    /// Records of this pod found on disk: adopted or torn down on the first pass.
    leftovers: Vec<SandboxRecord>,
    network: Option<PodNetwork>,
    servers: Option<PodServers>,
    events: PodEvents,
    backoff: Backoff,
    retry_at: Option<Instant>,
}

impl PodWorker {
    fn new(
        context: Arc<PodContext>,
        desired: watch::Receiver<DesiredPod>,
        leftovers: Vec<SandboxRecord>,
    ) -> Self {
        Self {
            context,
            desired,
            leftovers,
            network: None,
            servers: None,
            events: PodEvents::default(),
            backoff: Backoff::default(),
            retry_at: None,
        }
    }

    async fn run(mut self) {
        loop {
            let desired = self.desired.borrow_and_update().clone();
            let finished = match desired {
                None => {
                    self.tear_down().await;
                    true
                }
                Some(pod) if pod.metadata.deletion_timestamp.is_some() => {
                    self.tear_down().await;
                    self.finalize_deletion(&pod).await
                }
                // Our containers never exit, so a finished pod was made so by someone else.
                Some(pod) if is_finished(&pod) => false,
                Some(pod) => {
                    self.sync_running(&pod).await;
                    false
                }
            };
            if finished {
                return;
            }
            let retry_at = self.retry_at;
            tokio::select! {
                changed = self.desired.changed() => {
                    if changed.is_err() {
                        // The dispatcher is gone: the stand-in is stopping.
                        return;
                    }
                }
                () = sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {}
            }
        }
    }

    fn retry_is_due(&self) -> bool {
        self.retry_at
            .is_none_or(|retry_at| Instant::now() >= retry_at)
    }

    fn schedule_retry(&mut self, pod: &Pod, error: &PodSyncError) {
        let delay = self.backoff.next_delay();
        warn!(pod = %pod_ref(pod), %error, retry_in = ?delay, "pod not in its desired state yet");
        self.retry_at = Some(Instant::now() + delay);
    }

    async fn sync_running(&mut self, pod: &Pod) {
        if !self.retry_is_due() {
            return;
        }
        match self.try_sync_running(pod).await {
            Ok(()) => {
                self.backoff.reset();
                self.retry_at = None;
            }
            Err(error) => self.schedule_retry(pod, &error),
        }
    }

    async fn try_sync_running(&mut self, pod: &Pod) -> Result<(), PodSyncError> {
        let network = match self.network.take() {
            Some(network) => network,
            None => self.start_network(pod).await?,
        };
        let network = self.network.insert(network);
        if self.servers.is_none() {
            let started = match network {
                PodNetwork::Host { .. } => Ok(PodServers::default()),
                PodNetwork::Sandbox(record) => {
                    let greeting =
                        format!("{}\n", pod.metadata.name.as_deref().unwrap_or_default());
                    servers::start(&record.netns, &servers::declared_tcp_ports(pod), greeting).await
                }
            };
            match started {
                Ok(servers) => self.servers = Some(servers),
                Err(error) => {
                    let message = format!("Error: {error}");
                    record_warning(&mut self.events, &self.context, pod, "Failed", &message).await;
                    return Err(error.into());
                }
            }
        }
        let node_ip = self.context.node_ip;
        let pod_ips = network.pod_ips(node_ip)?;
        if !report::status_is_current(pod, node_ip, &pod_ips) {
            let status = report::running_status(
                pod,
                node_ip,
                &pod_ips,
                network.container_id(),
                Timestamp::now(),
            );
            report::patch_pod_status(&self.context.client, pod, &status)
                .await
                .map_err(|source| PodSyncError::Api {
                    action: "report the status of",
                    pod: pod_ref(pod).to_string(),
                    source,
                })?;
            info!(pod = %pod_ref(pod), ips = ?pod_ips, "pod running");
        }
        Ok(())
    }

    /// Adopts a sandbox left by an earlier run of the stand-in if it is intact, else creates
    /// one. Leftovers that are not adopted are torn down first, so their addresses are freed.
    async fn start_network(&mut self, pod: &Pod) -> Result<PodNetwork, PodSyncError> {
        let context = Arc::clone(&self.context);
        let sandboxes = &context.sandboxes;
        let mut adopted = None;
        for record in mem::take(&mut self.leftovers) {
            if adopted.is_none() && sandboxes.is_intact(&record).await {
                adopted = Some(record);
            } else {
                sandboxes.destroy(&record).await;
            }
        }
        if let Some(record) = adopted {
            info!(pod = %record.pod, container_id = record.container_id, "adopted the existing sandbox");
            return Ok(PodNetwork::Sandbox(Box::new(record)));
        }
        let uses_host_network = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.host_network)
            .unwrap_or(false);
        if uses_host_network {
            let container_id = random_container_id().await?;
            return Ok(PodNetwork::Host { container_id });
        }
        match sandboxes.create(&pod_ref(pod)).await {
            Ok(record) => {
                info!(pod = %record.pod, container_id = record.container_id, "sandbox created");
                Ok(PodNetwork::Sandbox(Box::new(record)))
            }
            Err(error) => {
                let message = format!("Failed to create pod sandbox: {error}");
                self.report_sandbox_failure(pod, &message).await;
                Err(error.into())
            }
        }
    }

    /// Records a failed sandbox where people and tests look: the pod's status and an event.
    async fn report_sandbox_failure(&mut self, pod: &Pod, message: &str) {
        let status =
            report::sandbox_failed_status(pod, self.context.node_ip, message, Timestamp::now());
        if let Err(error) = report::patch_pod_status(&self.context.client, pod, &status).await {
            warn!(pod = %pod_ref(pod), %error, "cannot record the sandbox failure in the pod status");
        }
        record_warning(
            &mut self.events,
            &self.context,
            pod,
            "FailedCreatePodSandBox",
            message,
        )
        .await;
    }

    /// Stops the servers and tears down every sandbox this worker knows of.
    async fn tear_down(&mut self) {
        self.servers = None;
        let sandboxes = &self.context.sandboxes;
        for record in mem::take(&mut self.leftovers) {
            sandboxes.destroy(&record).await;
        }
        if let Some(PodNetwork::Sandbox(record)) = self.network.take() {
            sandboxes.destroy(&record).await;
        }
    }

    /// The kubelet's final delete once the pod's resources are released; `true` when done.
    async fn finalize_deletion(&mut self, pod: &Pod) -> bool {
        if !self.retry_is_due() {
            return false;
        }
        let identity = pod_ref(pod);
        let api: Api<Pod> = Api::namespaced(self.context.client.clone(), &identity.namespace);
        // The UID precondition keeps a new pod of the same name from being deleted.
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(identity.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(&identity.name, &params).await {
            Ok(_) => {
                info!(pod = %identity, "pod deleted");
                true
            }
            // Gone already, or the name now belongs to another pod.
            Err(kube::Error::Api(status)) if status.is_not_found() || status.is_conflict() => true,
            Err(source) => {
                let error = PodSyncError::Api {
                    action: "delete",
                    pod: identity.to_string(),
                    source,
                };
                self.schedule_retry(pod, &error);
                false
            }
        }
    }
}

/// A free function rather than a method, so it can run while a field of the worker is borrowed.
async fn record_warning(
    events: &mut PodEvents,
    context: &PodContext,
    pod: &Pod,
    reason: &'static str,
    message: &str,
) {
    if let Err(error) = events
        .warn(&context.client, &context.node_name, pod, reason, message)
        .await
    {
        warn!(pod = %pod_ref(pod), reason, %error, "cannot record an event");
    }
}

fn pod_ref(pod: &Pod) -> PodRef {
    PodRef {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
    }
}

fn is_finished(pod: &Pod) -> bool {
    let phase = pod
        .status
        .as_ref()
        .and_then(|status| status.phase.as_deref());
    matches!(phase, Some("Succeeded" | "Failed"))
}
