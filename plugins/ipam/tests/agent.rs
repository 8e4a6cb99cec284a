//! Runs the real virtnet-ipam binary against a fake node agent (a small axum server on a unix
//! socket in a temp dir): what the plugin sends, and how it reports what the agent answers, in
//! every CNI version.

use std::error::Error;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use virtnet_cni::agent_api::{
    ALLOCATE_PATH, AllocateRequest, ApiError, CHECK_PATH, ErrorKind, GC_PATH, RELEASE_PATH,
    STATUS_PATH,
};
use virtnet_cni::testing::{FakeAgentSocket, PluginRun, run_plugin, serve_fake_agent};
use virtnet_cni::{CniVersion, ErrorCode};

type TestResult = Result<(), Box<dyn Error>>;

const BINARY: &str = env!("CARGO_BIN_EXE_virtnet-ipam");

/// Every request body the fake agent received, with its path.
type Log = Arc<Mutex<Vec<(String, Value)>>>;

/// The fake agent; it serves until the test ends (the runtime thread is detached).
struct FakeAgent {
    socket: FakeAgentSocket,
    log: Log,
}

impl FakeAgent {
    /// `status_ok`: whether STATUS answers ready.
    fn start(status_ok: bool) -> Result<Self, Box<dyn Error>> {
        let log = Log::default();
        let router = Router::new()
            .route(ALLOCATE_PATH, post(allocate))
            .route(RELEASE_PATH, post(record))
            .route(CHECK_PATH, post(record))
            .route(GC_PATH, post(record))
            .route(
                STATUS_PATH,
                get(move || async move {
                    if status_ok {
                        Json(json!({})).into_response()
                    } else {
                        refuse(ErrorKind::NotReady, "the agent's caches are not synced yet")
                    }
                }),
            )
            .with_state(log.clone());
        Ok(Self {
            socket: serve_fake_agent(router)?,
            log,
        })
    }

    fn requests(&self) -> Vec<(String, Value)> {
        self.log.lock().map(|log| log.clone()).unwrap_or_default()
    }
}

fn refuse(kind: ErrorKind, message: &str) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(ApiError::new(kind, message)),
    )
        .into_response()
}

async fn record(
    State(log): State<Log>,
    uri: axum::http::Uri,
    Json(body): Json<Value>,
) -> Json<Value> {
    if let Ok(mut log) = log.lock() {
        log.push((uri.path().to_owned(), body));
    }
    Json(json!({}))
}

/// Answers by pod name: `exhausted`, `missing`, `slow` and `garbled` misbehave, everything else
/// gets the example Subnet's first address.
async fn allocate(State(log): State<Log>, Json(request): Json<AllocateRequest>) -> Response {
    if let (Ok(mut log), Ok(body)) = (log.lock(), serde_json::to_value(&request)) {
        log.push((ALLOCATE_PATH.to_owned(), body));
    }
    match request.pod.name.as_str() {
        "exhausted" => refuse(
            ErrorKind::PoolExhausted,
            "Subnet \"subnet\" has no free address; add a range to its IPPools",
        ),
        "missing" => refuse(
            ErrorKind::SubnetNotFound,
            "Subnet \"subnet\" does not exist; create it or fix ipam.default_subnet",
        ),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Json(json!({})).into_response()
        }
        "garbled" => (StatusCode::OK, "<html>not json</html>").into_response(),
        _ => Json(json!({
            "ips": [{"address": "10.6.153.100/16", "gateway": "10.6.0.1", "pool": "subnet-0"}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.6.0.1"}],
            "dns": {"nameservers": ["10.96.0.10"], "search": ["default.svc.cluster.local"]},
        }))
        .into_response(),
    }
}

fn env_for(command: &'static str, pod: &'static str) -> Vec<(&'static str, String)> {
    vec![
        ("CNI_COMMAND", command.to_owned()),
        ("CNI_CONTAINERID", "0123456789abcdef".to_owned()),
        ("CNI_NETNS", "/var/run/netns/cni-1234".to_owned()),
        ("CNI_IFNAME", "eth0".to_owned()),
        ("CNI_PATH", "/opt/cni/bin".to_owned()),
        (
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};K8S_POD_UID=3f1c"
            ),
        ),
    ]
}

fn config(version: CniVersion, socket: &Path, timeout_ms: u64) -> Value {
    json!({
        "cniVersion": version.as_str(),
        "name": "macvlan",
        "type": "macvlan",
        "master": "ens192",
        "ipam": {
            "type": "virtnet-ipam",
            "default_subnet": "subnet",
            "agent_socket": socket,
            "timeout_ms": timeout_ms,
        },
        "cni.dev/valid-attachments": [{"containerID": "0123456789abcdef", "ifname": "eth0"}],
    })
}

fn run(
    command: &'static str,
    pod: &'static str,
    stdin: &Value,
) -> Result<PluginRun, Box<dyn Error>> {
    let env = env_for(command, pod);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Ok(run_plugin(BINARY, &env, &stdin.to_string())?)
}

#[test]
fn add_prints_the_agents_addresses_in_every_version() -> TestResult {
    let agent = FakeAgent::start(true)?;
    for version in CniVersion::SUPPORTED {
        let reply =
            run("ADD", "web-0", &config(version, &agent.socket.path, 2000))?.expect_json()?;
        let ip = if version.as_str().starts_with("0.") {
            json!({"version": "4", "address": "10.6.153.100/16", "gateway": "10.6.0.1"})
        } else {
            json!({"address": "10.6.153.100/16", "gateway": "10.6.0.1"})
        };
        assert_eq!(
            reply,
            json!({
                "cniVersion": version.as_str(),
                "ips": [ip],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.6.0.1"}],
                "dns": {"nameservers": ["10.96.0.10"], "search": ["default.svc.cluster.local"]},
            }),
            "{version}"
        );
    }
    let (path, body) = agent.requests().first().cloned().ok_or("no request")?;
    assert_eq!(path, ALLOCATE_PATH);
    assert_eq!(
        body,
        json!({
            "containerID": "0123456789abcdef", "ifname": "eth0",
            "netns": "/var/run/netns/cni-1234", "network": "macvlan",
            "pod": {"namespace": "default", "name": "web-0", "uid": "3f1c"},
            "defaultSubnets": ["subnet"],
        })
    );
    Ok(())
}

#[test]
fn del_check_gc_and_status_reach_their_endpoints() -> TestResult {
    let agent = FakeAgent::start(true)?;
    let stdin = config(CniVersion::V1_1_0, &agent.socket.path, 2000);
    for command in ["DEL", "CHECK", "GC", "STATUS"] {
        let run = run(command, "web-0", &stdin)?;
        assert_eq!(run.exit_code, Some(0), "{command}: {run:?}");
        assert!(run.stdout.is_empty(), "{command}: {:?}", run.stdout);
    }
    let requests = agent.requests();
    let pod = json!({"namespace": "default", "name": "web-0", "uid": "3f1c"});
    assert_eq!(
        requests,
        vec![
            (
                RELEASE_PATH.to_owned(),
                json!({
                    "containerID": "0123456789abcdef", "ifname": "eth0", "network": "macvlan",
                    "pod": pod,
                }),
            ),
            (
                CHECK_PATH.to_owned(),
                json!({
                    "containerID": "0123456789abcdef", "ifname": "eth0", "network": "macvlan",
                    "pod": pod,
                }),
            ),
            (
                GC_PATH.to_owned(),
                json!({
                    "network": "macvlan",
                    "validAttachments": [{"containerID": "0123456789abcdef", "ifname": "eth0"}],
                }),
            ),
        ]
    );
    Ok(())
}

#[test]
fn agent_refusals_keep_their_cni_codes_in_every_version() -> TestResult {
    let agent = FakeAgent::start(true)?;
    for version in CniVersion::SUPPORTED {
        let stdin = config(version, &agent.socket.path, 2000);
        let reply = run("ADD", "exhausted", &stdin)?
            .expect_error(ErrorCode::POOL_EXHAUSTED, &["has no free address"])?;
        assert_eq!(reply.cni_version, version.as_str());
        run("ADD", "missing", &stdin)?
            .expect_error(ErrorCode::SUBNET_NOT_FOUND, &["does not exist"])?;
    }
    Ok(())
}

#[test]
fn a_slow_agent_is_cut_off_at_timeout_ms() -> TestResult {
    let agent = FakeAgent::start(true)?;
    let started = std::time::Instant::now();
    run(
        "ADD",
        "slow",
        &config(CniVersion::V1_0_0, &agent.socket.path, 300),
    )?
    .expect_error(
        ErrorCode::TRY_AGAIN_LATER,
        &["did not answer within 300 ms", "raise ipam.timeout_ms"],
    )?;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}

#[test]
fn an_unreadable_answer_is_a_protocol_error() -> TestResult {
    let agent = FakeAgent::start(true)?;
    run(
        "ADD",
        "garbled",
        &config(CniVersion::V1_0_0, &agent.socket.path, 2000),
    )?
    .expect_error(
        ErrorCode::AGENT_PROTOCOL,
        &["cannot read", "same VirtNet release"],
    )?;
    Ok(())
}

#[test]
fn status_is_not_available_when_the_agent_is_not_ready() -> TestResult {
    let agent = FakeAgent::start(false)?;
    run(
        "STATUS",
        "web-0",
        &config(CniVersion::V1_1_0, &agent.socket.path, 2000),
    )?
    .expect_error(ErrorCode::NOT_AVAILABLE, &["caches are not synced"])?;
    Ok(())
}

#[test]
fn a_socket_nobody_listens_on_is_try_again_later_with_the_cause() -> TestResult {
    let directory = tempfile::tempdir()?;
    let socket = directory.path().join("agent.sock");
    let reply = run("ADD", "web-0", &config(CniVersion::V1_0_0, &socket, 2000))?
        .expect_error(ErrorCode::TRY_AGAIN_LATER, &["is not reachable at"])?;
    assert!(
        reply.details.contains("No such file"),
        "details: {:?}",
        reply.details
    );
    Ok(())
}
