//! The real virtnet-coordinator binary asking a fake node agent (an axum server on a unix socket
//! in a temp dir) what its config leaves open. No root: the agent is asked before the pod netns
//! is opened, so these runs end at the (missing) netns unless the agent's answer ends them first.

use std::error::Error;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use virtnet_cni::ErrorCode;
use virtnet_cni::agent_api::{
    ApiError, COORDINATOR_PATH, CoordinatorRequest, DEFAULT_ROUTE_NIC_ANNOTATION, Empty, ErrorKind,
    STATUS_PATH,
};
use virtnet_cni::testing::{FakeAgentSocket, PluginRun, run_plugin, serve_fake_agent};

type TestResult = Result<(), Box<dyn Error>>;

const BINARY: &str = env!("CARGO_BIN_EXE_virtnet-coordinator");
const BAD_ANNOTATION: &str =
    "pod annotation coordinator.virtnet.io/default-route-nic=\"net 1\" is not an interface name";

/// Every request the fake agent received.
type Log = Arc<Mutex<Vec<CoordinatorRequest>>>;

/// Refuses pod `bad-annotation` as the agent refuses a malformed annotation, and answers
/// everyone else with a Service CIDR.
struct FakeAgent {
    socket: FakeAgentSocket,
    log: Log,
}

impl FakeAgent {
    fn start() -> Result<Self, Box<dyn Error>> {
        let log = Log::default();
        let router = Router::new()
            .route(COORDINATOR_PATH, post(coordinate))
            .route(STATUS_PATH, get(|| async { Json(Empty {}) }))
            .with_state(log.clone());
        Ok(Self {
            socket: serve_fake_agent(router)?,
            log,
        })
    }

    fn requests(&self) -> Vec<CoordinatorRequest> {
        self.log.lock().map(|log| log.clone()).unwrap_or_default()
    }
}

async fn coordinate(State(log): State<Log>, Json(request): Json<CoordinatorRequest>) -> Response {
    let bad = request.pod.as_ref().map(|pod| pod.name.as_str()) == Some("bad-annotation");
    if let Ok(mut log) = log.lock() {
        log.push(request);
    }
    if bad {
        let message = format!("{BAD_ANNOTATION} (contains a space); set it to e.g. \"net1\"");
        return (
            StatusCode::BAD_REQUEST,
            Json(ApiError::new(ErrorKind::InvalidRequest, message)),
        )
            .into_response();
    }
    Json(json!({"serviceCIDRs": ["10.96.0.0/16"]})).into_response()
}

fn add(socket: &Path, pod: &str) -> Result<PluginRun, Box<dyn Error>> {
    let config = json!({
        "cniVersion": "1.0.0",
        "name": "macvlan",
        "type": "virtnet-coordinator",
        "agent_socket": socket,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "mac": "7a:1f:4c:2e:aa:01", "sandbox": "/var/run/netns/cni-gone"}],
            "ips": [{"interface": 0, "address": "10.6.153.101/16", "gateway": "10.6.0.1"}],
        },
    });
    let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}");
    Ok(run_plugin(
        BINARY,
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "0123456789abcdef"),
            ("CNI_NETNS", "/var/run/netns/cni-gone"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            ("CNI_ARGS", &args),
        ],
        &config.to_string(),
    )?)
}

#[test]
fn the_agent_is_asked_about_the_pod_and_its_refusal_of_an_annotation_fails_add() -> TestResult {
    let agent = FakeAgent::start()?;
    add(&agent.socket.path, "bad-annotation")?
        .expect_error(ErrorCode::INVALID_NETWORK_CONFIG, &[BAD_ANNOTATION])?;
    let requests = agent.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].ifname, "eth0");
    let pod = requests[0].pod.as_ref().ok_or("no pod in the request")?;
    assert_eq!(
        (pod.namespace.as_str(), pod.name.as_str()),
        ("default", "bad-annotation")
    );
    assert!(DEFAULT_ROUTE_NIC_ANNOTATION.starts_with("coordinator.virtnet.io/"));

    // An answer the coordinator can use: ADD goes on, to the pod netns (missing here).
    add(&agent.socket.path, "web-0")?
        .expect_error(ErrorCode::IO_FAILURE, &["cannot open network namespace"])?;
    Ok(())
}

#[test]
fn an_unreachable_agent_only_warns() -> TestResult {
    let directory = tempfile::tempdir()?;
    let run = add(&directory.path().join("nobody.sock"), "web-0")?;
    // The ADD went past the agent to the pod netns, which is what fails here.
    run.expect_error(ErrorCode::IO_FAILURE, &["cannot open network namespace"])?;
    assert!(
        run.stderr.contains("did not answer") && run.stderr.contains("no Service CIDR is known"),
        "{}",
        run.stderr
    );
    Ok(())
}

/// STATUS (spec 1.1.0) against the agent at `socket`; it also lists the links of the netns the
/// test runs in, which needs no privilege and changes nothing.
fn status(socket: &Path) -> Result<PluginRun, Box<dyn Error>> {
    let config = json!({
        "cniVersion": "1.1.0",
        "name": "macvlan",
        "type": "virtnet-coordinator",
        "agent_socket": socket,
    });
    Ok(run_plugin(
        BINARY,
        &[("CNI_COMMAND", "STATUS"), ("CNI_PATH", "/opt/cni/bin")],
        &config.to_string(),
    )?)
}

#[test]
fn status_succeeds_only_while_the_agent_answers() -> TestResult {
    let agent = FakeAgent::start()?;
    let run = status(&agent.socket.path)?;
    assert_eq!(
        (run.exit_code, run.stdout.as_str()),
        (Some(0), ""),
        "{run:?}"
    );

    let directory = tempfile::tempdir()?;
    let gone = directory.path().join("nobody.sock");
    let error = status(&gone)?.expect_error(
        ErrorCode::NOT_AVAILABLE,
        &["the VirtNet agent at", "did not answer", "agent_socket"],
    )?;
    assert!(
        error.msg.contains(&gone.display().to_string()),
        "{}",
        error.msg
    );

    // An agent that is up but not ready yet says why; STATUS passes that on.
    let not_ready = serve_fake_agent(Router::new().route(
        STATUS_PATH,
        get(|| async {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(ApiError::new(
                    ErrorKind::NotReady,
                    "caches are not synced yet",
                )),
            )
        }),
    ))?;
    status(&not_ready.path)?
        .expect_error(ErrorCode::NOT_AVAILABLE, &["caches are not synced yet"])?;
    Ok(())
}
