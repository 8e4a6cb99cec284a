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
//! It also warns, with an Event on the Network, when its node lacks a Network's master
//! interface ([`masters`]).
//!
//! At start-up, before anything else, it installs the CNI plugins and, in default-CNI mode, the
//! conflist on its node ([`install`]).
//!
//! API: [`virtnet_cni::agent_api`]. `/healthz`, `/readyz` and `/metrics` are served on
//! `--http-address` by [`crate::observability`].

mod coordinator;
pub mod install;
mod masters;
pub mod plan;
mod service;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ipnet::IpNet;
use tracing::{info, warn};
use virtnet_cni::agent_api::{
    ALLOCATE_PATH, AllocateRequest, AllocateResponse, ApiError, CHECK_PATH, COORDINATOR_PATH,
    CheckRequest, CoordinatorRequest, CoordinatorResponse, Empty, ErrorKind, GC_PATH, GcRequest,
    RELEASE_PATH, ReleaseRequest, STATUS_PATH,
};

use crate::ipam::FixedIpRetention;
use crate::observability::{Health, Metrics};
use coordinator::Coordination;
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
    #[command(flatten)]
    pub cni: install::CniInstallArgs,
    /// The cluster's Service CIDRs, which virtnet-coordinator routes through the node
    /// (comma-separated); unset, they are read from the ServiceCIDR objects.
    #[arg(
        long = "service-cidr",
        env = "VIRTNET_SERVICE_CIDRS",
        value_delimiter = ','
    )]
    pub service_cidrs: Vec<IpNet>,
    #[command(flatten)]
    pub retention: FixedIpRetention,
    /// Group commit: ADDs arriving while a pool write is under way are decided together and
    /// written with one write per pool (false: one write per ADD).
    #[arg(long, env = "VIRTNET_GROUP_COMMIT", default_value_t = true, action = clap::ArgAction::Set)]
    pub group_commit: bool,
}

/// Most ADDs one group commit carries: enough for a node's burst of pod starts, few enough
/// that one merge patch stays small.
const GROUP_COMMIT_LIMIT: usize = 64;

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(args: AgentArgs) -> Result<(), Error> {
    // First, so a bad setting stops the agent before it is ready; nothing else runs yet, so the
    // blocking file I/O holds up no one.
    install::install(&args.cni, &args.socket)?;
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
        health: health.clone(),
        retention: args.retention,
    };
    let agent = Agent::start(client.clone(), args.node_name.clone(), settings).await?;
    tokio::spawn(masters::watch(
        client.clone(),
        args.node_name.clone(),
        health.clone(),
    ));
    let coordination = Arc::new(Coordination::start(
        Arc::clone(&agent),
        client,
        args.service_cidrs.clone(),
    ));
    let (socket, listener) = PluginSocket::bind(&args.socket)?;
    health.set_ready(true);
    info!(node = %args.node_name, socket = %args.socket.display(), "serving virtnet-ipam");
    let router = Router::new()
        .route(ALLOCATE_PATH, post(allocate))
        .route(RELEASE_PATH, post(release))
        .route(CHECK_PATH, post(check))
        .route(GC_PATH, post(gc))
        .route(STATUS_PATH, get(status))
        .with_state(agent)
        .merge(
            Router::new()
                .route(COORDINATOR_PATH, post(coordinate))
                .with_state(coordination),
        );
    axum::serve(listener, router)
        .with_graceful_shutdown(crate::telemetry::shutdown_signal())
        .await
        .map_err(|source| Error::Socket {
            path: args.socket.clone(),
            source,
        })?;
    socket.remove();
    Ok(())
}

/// The plugin socket this agent serves, known by its inode so that exiting removes it only if
/// no newer agent has put its own in its place meanwhile.
struct PluginSocket {
    path: PathBuf,
    inode: (u64, u64),
}

impl PluginSocket {
    /// Binds the socket with mode 0600 under a name of this process's, then renames it over
    /// `path`: a stale socket of a previous run, or the live one of an agent this one replaces
    /// (a rolling update overlaps them), is swapped out in one step, never left missing.
    fn bind(path: &Path) -> Result<(Self, tokio::net::UnixListener), Error> {
        let failed = |source| Error::Socket {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(failed)?;
        }
        let mut fresh = path.as_os_str().to_owned();
        fresh.push(format!(".{}", std::process::id()));
        let fresh = PathBuf::from(fresh);
        match std::fs::remove_file(&fresh) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(failed(error));
            }
            _ => {}
        }
        let listener = tokio::net::UnixListener::bind(&fresh).map_err(failed)?;
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o600)).map_err(failed)?;
        let inode = inode_of(&fresh).map_err(failed)?;
        std::fs::rename(&fresh, path).map_err(failed)?;
        Ok((
            Self {
                path: path.to_owned(),
                inode,
            },
            listener,
        ))
    }

    /// Removes the socket if it is still the one this agent bound.
    fn remove(&self) {
        if inode_of(&self.path).ok() != Some(self.inode) {
            info!(socket = %self.path.display(), "another agent serves the socket now: left in place");
            return;
        }
        if let Err(error) = std::fs::remove_file(&self.path) {
            warn!(%error, "could not remove the plugin socket");
        }
    }
}

fn inode_of(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::symlink_metadata(path)?;
    Ok((metadata.dev(), metadata.ino()))
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
    agent.release(&request).await?;
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

async fn coordinate(
    State(coordination): State<Arc<Coordination>>,
    Json(request): Json<CoordinatorRequest>,
) -> Result<Json<CoordinatorResponse>, Refusal> {
    Ok(Json(coordination.answer(&request).await?))
}

/// Requests are served only once every cache has synced, so STATUS only reports exhaustion.
async fn status(State(agent): State<Arc<Agent>>) -> Result<Json<Empty>, Refusal> {
    agent.status()?;
    Ok(Json(Empty {}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_agent_that_exits_leaves_its_successors_socket_alone() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(|source| Error::Socket {
            path: PathBuf::from("(temp dir)"),
            source,
        })?;
        let path = dir.path().join("virtnet.sock");
        let (old, _old_listener) = PluginSocket::bind(&path)?;
        // A rolling update: the new agent binds while the old one still serves.
        let (new, _new_listener) = PluginSocket::bind(&path)?;
        old.remove();
        assert!(
            path.exists(),
            "the old agent removed the new agent's socket"
        );
        new.remove();
        assert!(!path.exists(), "an agent removes its own socket on exit");
        Ok(())
    }
}
