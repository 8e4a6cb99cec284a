//! `virtnet controller`: owns Subnets and their IPPools.
//!
//! One replica at a time does the work: replicas compete for the Lease `virtnet-controller` and
//! only the holder runs the reconcilers; when it loses the Lease it stops them gracefully and
//! waits to win it again. `/healthz`, `/readyz` and `/metrics` are served by every replica.
//!
//! Reconcilers:
//! - [`subnet`]: Subnet → IPPools (balanced, drained on scale-down, never revoking an address in
//!   use; the plan is [`pools::plan_pools`]) and the Subnet/IPPool status counters.
//! - [`endpoint`]: the Endpoint lifecycle and garbage collection (the state machine is
//!   [`lifecycle::decide`]; its table is in [`lifecycle`]'s docs) and the periodic sweep of
//!   every pool's allocations.
//!
//! - [`network`]: Network → NetworkAttachmentDefinition (rendered by [`nads::plan_nad`]), when
//!   the cluster serves Multus's NetworkAttachmentDefinition CRD.
//!
//! With a serving certificate, every replica also serves the validating admission webhook for
//! Subnets ([`webhook`], deciding with [`admission::review_subnet`]).

mod admission;
mod endpoint;
mod lifecycle;
mod nads;
mod network;
mod pools;
mod subnet;
mod webhook;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::jiff::SignedDuration;
use kube::{
    Api, Client,
    runtime::{
        Controller,
        controller::Action,
        events::{Recorder, Reporter},
        watcher,
    },
};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    crd::{IpPool, LABEL_SUBNET, Subnet},
    ipam::FixedIpRetention,
    observability::{Health, Metrics},
    store::{
        endpoints::EndpointStore, pools::PoolStore, subnets::SubnetStore, workloads::WorkloadStore,
    },
};

/// Errors of the controller; each tells the operator what to check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    CrdsMissing(#[from] crate::crd::CrdsMissing),
    #[error("Subnet {0} has no uid yet; it will be retried")]
    MissingUid(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("leader election failed: {0}; check RBAC for coordination.k8s.io leases")]
    LeaderElection(String),
    #[error(
        "cannot use the webhook certificate file {path}: {problem}; mount the chart's \
         virtnet-webhook-tls Secret or pass PEM files with --webhook-cert/--webhook-key"
    )]
    WebhookCertificate { path: PathBuf, problem: String },
    #[error("cannot listen on {address}: {source}")]
    Serve {
        address: SocketAddr,
        source: std::io::Error,
    },
}

impl Error {
    /// A short, bounded label for the failures metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(status)) if status.is_conflict() => "conflict",
            Self::Kube(_) => "kube",
            Self::CrdsMissing(_) => "crds_missing",
            Self::MissingUid(_) => "missing_uid",
            Self::Store(error) => error.metric_label(),
            Self::LeaderElection(_) => "leader_election",
            Self::WebhookCertificate { .. } => "webhook_certificate",
            Self::Serve { .. } => "serve",
        }
    }
}

/// Settings of `virtnet controller`.
#[derive(clap::Args, Debug, Clone)]
pub struct ControllerArgs {
    /// Namespace of the leader-election Lease (the controller's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    pub namespace: String,
    /// Identity in the Lease and in Events (the pod name when running in a cluster).
    #[arg(long, env = "POD_NAME", default_value = "virtnet-controller")]
    pub identity: String,
    /// Address of the /healthz, /readyz and /metrics endpoint.
    #[arg(long, env = "VIRTNET_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_address: SocketAddr,
    /// Lease (in --namespace) that elects the active replica.
    #[arg(
        long,
        env = "VIRTNET_LEADER_ELECTION_LEASE",
        default_value = "virtnet-controller"
    )]
    pub leader_election_lease: String,
    #[command(flatten)]
    pub retention: FixedIpRetention,
    /// Seconds a pool allocation may go unlisted by any Endpoint before the sweep reclaims it.
    #[arg(long, env = "VIRTNET_ORPHAN_GRACE", default_value_t = 30)]
    pub orphan_grace_seconds: i64,
    /// Seconds between full sweeps of every pool and Endpoint.
    #[arg(long, env = "VIRTNET_GC_INTERVAL", default_value_t = 60)]
    pub gc_interval_seconds: u64,
    /// Address of the validating admission webhook (HTTPS), served when --webhook-cert is set.
    #[arg(long, env = "VIRTNET_WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    pub webhook_address: SocketAddr,
    /// PEM serving certificate (chain) of the webhook; without it no webhook is served.
    #[arg(long, env = "VIRTNET_WEBHOOK_CERT", requires = "webhook_key")]
    pub webhook_cert: Option<PathBuf>,
    /// PEM private key of the webhook's serving certificate.
    #[arg(long, env = "VIRTNET_WEBHOOK_KEY", requires = "webhook_cert")]
    pub webhook_key: Option<PathBuf>,
}

impl ControllerArgs {
    fn webhook_config(&self) -> Option<webhook::WebhookConfig> {
        Some(webhook::WebhookConfig {
            address: self.webhook_address,
            cert: self.webhook_cert.clone()?,
            key: self.webhook_key.clone()?,
        })
    }

    fn endpoint_config(&self) -> endpoint::Config {
        endpoint::Config {
            lifecycle: lifecycle::Settings {
                fixed_ip_statefulset: self.retention.statefulset,
                fixed_ip_kubevirt: self.retention.kubevirt,
                orphan_grace: SignedDuration::from_secs(self.orphan_grace_seconds),
            },
            sweep_interval: Duration::from_secs(self.gc_interval_seconds.max(1)),
        }
    }
}

/// What every reconcile gets.
pub struct Context {
    pub client: Client,
    pub pools: PoolStore,
    pub endpoint_store: EndpointStore,
    pub subnets: SubnetStore,
    pub workloads: WorkloadStore,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub endpoints: endpoint::Config,
    /// Held while a Subnet's pool specs are decided and written (see [`subnet::reconcile`]).
    pub pool_writes: tokio::sync::Mutex<()>,
}

/// Runs the controller until SIGTERM/SIGINT.
pub async fn run(args: ControllerArgs) -> Result<(), Error> {
    let client = Client::try_default().await?;
    crate::crd::ensure_installed(&client).await?;

    let metrics = Arc::new(Metrics::default());
    let health = Health::default();
    let server = crate::observability::serve(args.http_address, metrics.clone(), health.clone())
        .await
        .map_err(|source| Error::Serve {
            address: args.http_address,
            source,
        })?;
    tokio::spawn(server);
    match args.webhook_config() {
        Some(config) => {
            tokio::spawn(webhook::serve(&config, client.clone()).await?);
        }
        None => info!(
            "no --webhook-cert: not serving the Subnet admission webhook (overlapping Subnets \
             are not rejected)"
        ),
    }
    health.set_ready(true);

    let ctx = Arc::new(Context {
        client: client.clone(),
        pools: PoolStore::new(client.clone()),
        endpoint_store: EndpointStore::new(client.clone()),
        subnets: SubnetStore::new(client.clone()),
        workloads: WorkloadStore::new(client.clone()),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "virtnet-controller".to_string(),
                instance: Some(args.identity.clone()),
            },
        ),
        metrics,
        endpoints: args.endpoint_config(),
        pool_writes: tokio::sync::Mutex::new(()),
    });

    let manager =
        kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &args.leader_election_lease)
            .with_namespace(&args.namespace)
            .with_identity(&args.identity)
            .with_duration(15)
            .with_grace(5)
            .build()
            .await
            .map_err(|error| Error::LeaderElection(error.to_string()))?;
    let (mut leading, lease_task) = manager.watch().await;

    let shutdown = crate::telemetry::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        // Wait to become the leader (or to be told to stop).
        while !*leading.borrow_and_update() {
            tokio::select! {
                changed = leading.changed() => if changed.is_err() { return Ok(()) },
                () = &mut shutdown => return Ok(()),
            }
        }
        info!(identity = %args.identity, "became leader; starting reconcilers");
        let (stop_tx, stop_rx) = watch::channel(false);
        let reconcilers = tokio::spawn(run_reconcilers(ctx.clone(), stop_rx));
        let stopping_for_good = tokio::select! {
            _ = leading.wait_for(|leader| !*leader) => false,
            () = &mut shutdown => true,
        };
        let _ = stop_tx.send(true);
        if let Err(error) = reconcilers.await {
            error!(%error, "reconcilers ended abnormally");
        }
        if stopping_for_good {
            drop(leading);
            // Releases the Lease so a standby replica takes over at once.
            if let Ok(Err(error)) = lease_task.await {
                warn!(%error, "could not release the leader Lease");
            }
            return Ok(());
        }
        warn!("lost the leader Lease; reconcilers stopped");
    }
}

async fn run_reconcilers(ctx: Arc<Context>, mut stop: watch::Receiver<bool>) {
    let subnets: Api<Subnet> = Api::all(ctx.client.clone());
    let pools: Api<IpPool> = Api::all(ctx.client.clone());
    let mut stop_endpoints = stop.clone();
    let mut stop_networks = stop.clone();
    let mut stop_validation = stop.clone();
    let render_networks = network::nad_crd_installed(&ctx).await;
    let network_ctx = ctx.clone();
    let networks = async move {
        if render_networks {
            tokio::join!(
                network::run(network_ctx.clone(), async move {
                    let _ = stop_networks.wait_for(|stop| *stop).await;
                }),
                network::validate(network_ctx, async move {
                    let _ = stop_validation.wait_for(|stop| *stop).await;
                })
            );
        }
    };
    let stopped = async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    let endpoints = endpoint::run(ctx.clone(), async move {
        let _ = stop_endpoints.wait_for(|stop| *stop).await;
    });
    let subnets = Controller::new(subnets, watcher::Config::default().any_semantic())
        .owns(pools, watcher::Config::default().labels(LABEL_SUBNET))
        .graceful_shutdown_on(stopped)
        .run(
            |subnet, ctx: Arc<Context>| async move {
                let timer = ctx.metrics.reconcile_started("subnet");
                let result = subnet::reconcile(subnet, ctx.clone()).await;
                timer.finish(result.as_ref().err().map(Error::metric_label));
                result
            },
            |subnet, error, _ctx| {
                warn!(subnet = %kube::ResourceExt::name_any(subnet.as_ref()), %error, "reconcile failed");
                Action::requeue(Duration::from_secs(2))
            },
            ctx,
        )
        .for_each(|_| async {});
    tokio::join!(subnets, endpoints, networks);
}
