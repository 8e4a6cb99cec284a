//! `virtnet agent`: one per node, serves virtnet-ipam over a unix socket.
//!
//! The agent keeps watch-fed caches (reflectors) of Subnets, IPPools, Namespaces, Endpoints, its
//! own Node and the Pods on its node. ADD is a decision on the cache ([`plan::plan_allocation`]:
//! the engine's selection, the address the holder already holds or a free one picked for this
//! node) committed to the API server with a merge patch on the pool's status guarded by its
//! resourceVersion; on a conflict the agent re-reads that pool and decides again (bounded,
//! jittered backoff). There is no cluster-wide lock. The Endpoint is written next; if that fails
//! the claimed addresses are released, and if the agent dies in between, the next ADD finds the
//! address by its holder in the pool and reuses it.
//!
//! API: [`virtnet_cni::agent_api`]. `/healthz`, `/readyz` and `/metrics` are served on
//! `--http-address` by [`crate::observability`].

pub mod install;
pub mod plan;
mod service;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tracing::{info, warn};
use virtnet_cni::agent_api::{
    ALLOCATE_PATH, AllocateRequest, AllocateResponse, ApiError, CHECK_PATH, CheckRequest, Empty,
    ErrorKind, GC_PATH, GcRequest, RELEASE_PATH, ReleaseRequest, STATUS_PATH,
};

use crate::observability::{Health, Metrics};
use service::{Agent, AgentSettings};

/// Errors that stop the agent; each tells the operator what to check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    CrdsMissing(#[from] crate::crd::CrdsMissing),
    #[error(
        "cannot listen on the plugin socket {}: {source}; the agent must run as root with \
         /var/run/virtnet mounted from the host",
        path.display()
    )]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Install(#[from] install::InstallError),
    #[error(
        "default-CNI mode needs the node interface for macvlan: set defaultCNI.master \
         (VIRTNET_DEFAULT_CNI_MASTER) and defaultCNI.subnet (VIRTNET_DEFAULT_CNI_SUBNET)"
    )]
    DefaultCniIncomplete,
    #[error("cannot serve health and metrics on {address}: {source}")]
    Serve {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Settings of `virtnet agent`; the environment names are the ones the chart's DaemonSet sets.
#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// This node's name (the DaemonSet passes spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The unix socket virtnet-ipam connects to (created with mode 0600).
    #[arg(
        long,
        env = "VIRTNET_SOCKET",
        default_value = "/var/run/virtnet/agent.sock"
    )]
    pub socket: PathBuf,
    /// Address of the /healthz, /readyz and /metrics endpoint.
    #[arg(long, env = "VIRTNET_HTTP_ADDR", default_value = "0.0.0.0:9741")]
    pub http_address: SocketAddr,
    /// Group commit: ADDs arriving while a pool write is under way are decided together and
    /// written with one write per pool (false: one write per ADD).
    #[arg(long, env = "VIRTNET_GROUP_COMMIT", default_value_t = true, action = clap::ArgAction::Set)]
    pub group_commit: bool,
    /// Where to install virtnet-ipam and virtnet-coordinator (the host's /opt/cni/bin, as
    /// mounted); nothing is installed without it.
    #[arg(long, env = "VIRTNET_CNI_BIN_DIR")]
    pub cni_bin_dir: Option<PathBuf>,
    /// Where the plugins to install are; default: next to this binary.
    #[arg(long, env = "VIRTNET_PLUGIN_DIR")]
    pub plugin_dir: Option<PathBuf>,
    /// Where to write the default-CNI conflist (the host's /etc/cni/net.d, as mounted).
    #[arg(long, env = "VIRTNET_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Make VirtNet the node's default network: write seed 000's conflist once serving.
    #[arg(long, env = "VIRTNET_DEFAULT_CNI_ENABLED", default_value_t = false, action = clap::ArgAction::Set)]
    pub default_cni: bool,
    /// The node interface macvlan hangs pods on, in the default conflist.
    #[arg(long, env = "VIRTNET_DEFAULT_CNI_MASTER", default_value = "ens192")]
    pub default_cni_master: String,
    /// The Subnet of pods that choose none, in the default conflist.
    #[arg(long, env = "VIRTNET_DEFAULT_CNI_SUBNET", default_value = "subnet")]
    pub default_cni_subnet: String,
}

/// Most ADDs one group commit carries: enough for a node's burst of pod starts, few enough
/// that one merge patch stays small.
const GROUP_COMMIT_LIMIT: usize = 64;

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(args: AgentArgs) -> Result<(), Error> {
    if args.default_cni
        && (args.default_cni_master.is_empty() || args.default_cni_subnet.is_empty())
    {
        return Err(Error::DefaultCniIncomplete);
    }
    if let Some(cni_bin_dir) = &args.cni_bin_dir {
        let plugin_dir = match &args.plugin_dir {
            Some(dir) => dir.clone(),
            None => std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(PathBuf::from))
                .unwrap_or_default(),
        };
        let written = install::install_plugins(&plugin_dir, cni_bin_dir)?;
        info!(?written, directory = %cni_bin_dir.display(), "CNI plugins installed");
    }
    let client = kube::Client::try_default().await?;
    let health = Health::default();
    let metrics = Arc::new(Metrics::default());
    let server = crate::observability::serve(args.http_address, metrics.clone(), health.clone())
        .await
        .map_err(|source| Error::Serve {
            address: args.http_address,
            source,
        })?;
    tokio::spawn(server);

    let settings = AgentSettings {
        batch_limit: if args.group_commit {
            GROUP_COMMIT_LIMIT
        } else {
            1
        },
        metrics,
    };
    let agent = Agent::start(client, args.node_name.clone(), settings).await?;
    let listener = bind_socket(&args.socket)?;
    if args.default_cni {
        // Written only once the socket answers: the conflist tells the runtime the node's
        // network is ready. It stays when the agent stops (an upgrade must not take the
        // node's network away); pods started meanwhile retry until the agent is back.
        let conflist = install::default_conflist(
            &args.default_cni_master,
            &args.default_cni_subnet,
            &args.socket,
        );
        let path = args.cni_conf_dir.join(install::CONFLIST_NAME);
        install::install_file(&path, format!("{conflist:#}\n").as_bytes(), 0o644)?;
        info!(path = %path.display(), "default CNI conflist in place");
    }
    health.set_ready(true);
    info!(node = %args.node_name, socket = %args.socket.display(), "serving virtnet-ipam");
    let router = Router::new()
        .route(ALLOCATE_PATH, post(allocate))
        .route(RELEASE_PATH, post(release))
        .route(CHECK_PATH, post(check))
        .route(GC_PATH, post(gc))
        .route(STATUS_PATH, get(status))
        .with_state(agent);
    axum::serve(listener, router)
        .with_graceful_shutdown(crate::telemetry::shutdown_signal())
        .await
        .map_err(|source| Error::Socket {
            path: args.socket.clone(),
            source,
        })?;
    if let Err(error) = std::fs::remove_file(&args.socket) {
        warn!(%error, "could not remove the plugin socket");
    }
    Ok(())
}

/// Binds the plugin socket (replacing a stale one from a previous run) with mode 0600.
fn bind_socket(path: &PathBuf) -> Result<tokio::net::UnixListener, Error> {
    let failed = |source| Error::Socket {
        path: path.clone(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(failed)?;
    }
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(failed(error)),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(failed)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(failed)?;
    Ok(listener)
}

/// An [`ApiError`] as an HTTP answer.
struct Refusal(ApiError);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let status = match self.0.kind {
            ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorKind::SubnetNotFound | ErrorKind::NotAllocated => StatusCode::NOT_FOUND,
            ErrorKind::PoolExhausted | ErrorKind::IpConflict => StatusCode::CONFLICT,
            ErrorKind::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Json(self.0)).into_response()
    }
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Self {
        Self(error)
    }
}

async fn allocate(
    State(agent): State<Arc<Agent>>,
    Json(request): Json<AllocateRequest>,
) -> Result<Json<AllocateResponse>, Refusal> {
    Ok(Json(agent.allocate(&request).await?))
}

async fn release(
    State(agent): State<Arc<Agent>>,
    Json(request): Json<ReleaseRequest>,
) -> Result<Json<Empty>, Refusal> {
    agent
        .release(&request.container_id, &request.ifname, request.pod.as_ref())
        .await?;
    Ok(Json(Empty {}))
}

async fn check(
    State(agent): State<Arc<Agent>>,
    Json(request): Json<CheckRequest>,
) -> Result<Json<Empty>, Refusal> {
    agent.check(&request).await?;
    Ok(Json(Empty {}))
}

async fn gc(
    State(agent): State<Arc<Agent>>,
    Json(request): Json<GcRequest>,
) -> Result<Json<Empty>, Refusal> {
    agent.gc(&request).await?;
    Ok(Json(Empty {}))
}

/// Requests are served only once every cache has synced, so STATUS only reports exhaustion.
async fn status(State(agent): State<Arc<Agent>>) -> Result<Json<Empty>, Refusal> {
    agent.status()?;
    Ok(Json(Empty {}))
}
