//! Asking the node agent what the config leaves open ([`virtnet_cni::agent_api`]'s
//! `POST /v1/coordinator`): the cluster's Service CIDRs and the pod's own choices; and whether
//! it answers at all (`GET /v1/status`, for STATUS).

use std::fmt;

use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use virtnet_cni::agent_api::{
    ApiError, COORDINATOR_PATH, CoordinatorRequest, CoordinatorResponse, PodRef, STATUS_PATH,
};
use virtnet_cni::agent_client::{self, TransportError};
use virtnet_cni::env::CniArgs;

use crate::config::CoordinatorConfig;

/// Why the agent gave no usable answer.
#[derive(Debug)]
pub enum AgentFailure {
    /// It could not be reached, or did not answer in time.
    Transport(TransportError),
    /// It answered something that is not its API (a mismatched release).
    Protocol(String),
    /// It refused; [`ApiError::kind`] says whether the request or the agent is at fault.
    Refused(ApiError),
}

impl fmt::Display for AgentFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transport(error) => error.fmt(f),
            Self::Protocol(details) => write!(
                f,
                "its answer is not the VirtNet agent API ({details}); install virtnet-coordinator \
                 from the same release as the agent"
            ),
            Self::Refused(error) => error.fmt(f),
        }
    }
}

/// The pod from `CNI_ARGS`, when the runtime names it.
pub fn pod_ref(args: &CniArgs) -> Option<PodRef> {
    Some(PodRef {
        namespace: args.pod.namespace.clone()?,
        name: args.pod.name.clone()?,
        uid: args.pod.uid.clone(),
    })
}

/// Asks the agent at the config's socket, bounded by the config's timeout.
pub fn ask(
    config: &CoordinatorConfig,
    request: &CoordinatorRequest,
) -> Result<CoordinatorResponse, AgentFailure> {
    let body =
        serde_json::to_vec(request).map_err(|error| AgentFailure::Protocol(error.to_string()))?;
    let answer = exchange(config, Method::POST, COORDINATOR_PATH, body)?;
    serde_json::from_slice(&answer).map_err(|error| AgentFailure::Protocol(error.to_string()))
}

/// Whether the agent answers its STATUS (it refuses while its caches are not synced).
pub fn status(config: &CoordinatorConfig) -> Result<(), AgentFailure> {
    exchange(config, Method::GET, STATUS_PATH, Vec::new()).map(drop)
}

/// One request; the body of a 200 answer, any other answer as the agent's refusal.
fn exchange(
    config: &CoordinatorConfig,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> Result<Bytes, AgentFailure> {
    let (status, answer) = agent_client::exchange(
        &config.agent_socket,
        config.agent_timeout,
        method,
        path,
        body,
    )
    .map_err(AgentFailure::Transport)?;
    if status == StatusCode::OK {
        return Ok(answer);
    }
    let refusal: ApiError = serde_json::from_slice(&answer).map_err(|error| {
        AgentFailure::Protocol(format!(
            "HTTP {status}, {error}: {}",
            String::from_utf8_lossy(&answer)
        ))
    })?;
    Err(AgentFailure::Refused(refusal))
}
