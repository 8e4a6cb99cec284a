//! The store layer against a scripted API server: each test lists the requests it expects, in
//! order, with the answer to each; the script checks method, path and body of every request.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{Value, json};

use super::StoreError;
use super::endpoints::{EndpointStore, Written};
use super::pools::{ClaimOutcome, PoolClaim, PoolStore};
use crate::crd::{Endpoint, IpPool};

/// One expected request and its answer.
struct Exchange {
    method: Method,
    path: String,
    /// The request body must equal this (`Null`: no body checked).
    body: Value,
    status: u16,
    answer: Value,
}

/// A mocked API server answering a fixed script; [`Script::finish`] fails the test on any
/// request that did not match, and on expected requests never made.
#[derive(Clone, Default)]
struct Script {
    expected: Arc<Mutex<VecDeque<Exchange>>>,
    mismatches: Arc<Mutex<Vec<String>>>,
}

impl Script {
    fn expect(self, method: Method, path: &str, body: Value, status: u16, answer: Value) -> Self {
        self.expected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(Exchange {
                method,
                path: path.to_owned(),
                body,
                status,
                answer,
            });
        self
    }

    fn client(&self) -> kube::Client {
        kube::Client::new(self.clone(), "default")
    }

    fn finish(&self) {
        let mismatches = self
            .mismatches
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        assert!(
            mismatches.is_empty(),
            "unexpected requests: {mismatches:#?}"
        );
        let left = self.expected.lock().unwrap_or_else(PoisonError::into_inner);
        let left: Vec<String> = left
            .iter()
            .map(|exchange| format!("{} {}", exchange.method, exchange.path))
            .collect();
        assert!(left.is_empty(), "requests never made: {left:#?}");
    }
}

impl tower_service::Service<Request<Body>> for Script {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let script = self.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|body| body.to_bytes())
                .unwrap_or_default();
            let sent: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let next = script
                .expected
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_front();
            let seen = format!("{} {} {sent}", parts.method, parts.uri.path());
            let (status, answer) = match next {
                Some(exchange)
                    if exchange.method == parts.method
                        && exchange.path == parts.uri.path()
                        && (exchange.body.is_null() || exchange.body == sent) =>
                {
                    (exchange.status, exchange.answer)
                }
                Some(exchange) => {
                    script
                        .mismatches
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(format!(
                            "{seen}\n  expected {} {} {}",
                            exchange.method, exchange.path, exchange.body
                        ));
                    (500, status_body(500, "InternalError"))
                }
                None => {
                    script
                        .mismatches
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(format!("{seen}\n  expected nothing more"));
                    (500, status_body(500, "InternalError"))
                }
            };
            let response = Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(answer.to_string().into_bytes()));
            Ok(response.unwrap_or_else(|_| Response::new(Body::empty())))
        })
    }
}

fn status_body(code: u16, reason: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": if code < 400 { "Success" } else { "Failure" },
        "reason": reason, "code": code, "message": reason,
    })
}

const ENDPOINT: &str = "/apis/virtnet.io/v1alpha1/namespaces/default/endpoints/p";
const POOL: &str = "/apis/virtnet.io/v1alpha1/ippools/pool-0";
const POOL_STATUS: &str = "/apis/virtnet.io/v1alpha1/ippools/pool-0/status";

fn endpoint_json(version: &str, finalizers: &[&str], container: &str) -> Value {
    json!({
        "apiVersion": "virtnet.io/v1alpha1", "kind": "Endpoint",
        "metadata": {"name": "p", "namespace": "default", "uid": "endpoint-uid",
                     "resourceVersion": version, "finalizers": finalizers},
        "spec": {
            "interfaces": [{"interface": "eth0", "ipv4Pool": "pool-0", "ipv4": "10.0.0.5/24"}],
            "ownerKind": "Pod", "ownerName": "p", "node": "n", "podUID": "pod-uid",
            "containerID": container,
        },
    })
}

fn pool_json(version: &str, allocations: Value) -> Value {
    json!({
        "apiVersion": "virtnet.io/v1alpha1", "kind": "IPPool",
        "metadata": {"name": "pool-0", "resourceVersion": version},
        "spec": {"subnet": "s", "cidr": "10.0.0.0/24", "ips": ["10.0.0.2-10.0.0.9"]},
        "status": {"allocations": allocations, "allocatedIPCount": 1,
                   "unallocatedIPCount": 7, "totalIPCount": 8},
    })
}

fn record(container: &str) -> Value {
    json!({"endpoint": "default/p", "interface": "eth0", "podUID": "pod-uid", "node": "n",
           "containerID": container})
}

fn parsed<K: serde::de::DeserializeOwned>(value: Value) -> K {
    serde_json::from_value(value).expect("test objects deserialize")
}

#[tokio::test]
async fn letting_an_endpoint_go_keeps_a_foreign_finalizer() {
    let foreign = "backup.example.com/protect";
    let script = Script::default()
        .expect(
            Method::PATCH,
            ENDPOINT,
            json!({"metadata": {"resourceVersion": "7", "finalizers": [foreign]}}),
            200,
            endpoint_json("8", &[foreign], "c1"),
        )
        .expect(
            Method::DELETE,
            ENDPOINT,
            json!({"preconditions": {"resourceVersion": "8", "uid": "endpoint-uid"}}),
            200,
            status_body(200, "Deleted"),
        );
    let endpoint: Endpoint = parsed(endpoint_json(
        "7",
        &["ipam.virtnet.io/endpoint", foreign],
        "c1",
    ));
    let written = EndpointStore::new(script.client()).let_go(&endpoint).await;
    assert_eq!(written.expect("letting go succeeds"), Written::Done);
    script.finish();
}

#[tokio::test]
async fn an_endpoint_taken_over_meanwhile_is_left_alone() {
    // A new sandbox of the pod replaced the Endpoint after DEL read it: the guarded finalizer
    // removal fails, and nothing is deleted.
    let script = Script::default().expect(
        Method::PATCH,
        ENDPOINT,
        json!({"metadata": {"resourceVersion": "7", "finalizers": []}}),
        409,
        status_body(409, "Conflict"),
    );
    let endpoint: Endpoint = parsed(endpoint_json("7", &["ipam.virtnet.io/endpoint"], "c1"));
    let written = EndpointStore::new(script.client()).let_go(&endpoint).await;
    assert_eq!(written.expect("a conflict is an answer"), Written::Changed);
    script.finish();
}

#[tokio::test]
async fn a_conflicting_release_is_retried_on_a_fresh_read() {
    let script = Script::default()
        .expect(
            Method::GET,
            POOL,
            Value::Null,
            200,
            pool_json("1", json!({"10.0.0.5": record("c1")})),
        )
        .expect(
            Method::PATCH,
            POOL_STATUS,
            json!({"metadata": {"resourceVersion": "1"},
                   "status": {"allocations": {"10.0.0.5": null},
                              "allocatedIPCount": 0, "unallocatedIPCount": 8}}),
            409,
            status_body(409, "Conflict"),
        )
        // Another agent claimed 10.0.0.6 meanwhile: the fresh read has both.
        .expect(
            Method::GET,
            POOL,
            Value::Null,
            200,
            pool_json(
                "2",
                json!({"10.0.0.5": record("c1"), "10.0.0.6": {
                "endpoint": "default/q", "interface": "eth0", "podUID": "q", "node": "m"}}),
            ),
        )
        .expect(
            Method::PATCH,
            POOL_STATUS,
            json!({"metadata": {"resourceVersion": "2"},
                   "status": {"allocations": {"10.0.0.5": null},
                              "allocatedIPCount": 1, "unallocatedIPCount": 7}}),
            200,
            pool_json("3", json!({})),
        );
    let released = PoolStore::new(script.client())
        .release(
            "pool-0",
            &["10.0.0.5".parse().expect("address")],
            |_, record| record.endpoint == "default/p",
        )
        .await;
    assert!(released.expect("the release succeeds").is_some());
    script.finish();
}

#[tokio::test]
async fn a_record_of_another_holder_is_not_released() {
    let script = Script::default().expect(
        Method::GET,
        POOL,
        Value::Null,
        200,
        pool_json("1", json!({"10.0.0.5": record("c2")})),
    );
    let released = PoolStore::new(script.client())
        .release(
            "pool-0",
            &["10.0.0.5".parse().expect("address")],
            |_, record| record.container_id.as_deref() == Some("c1"),
        )
        .await;
    assert!(released.expect("nothing to release is success").is_none());
    script.finish();
}

#[tokio::test]
async fn many_addresses_are_released_with_one_write_and_only_where_held() {
    let script = Script::default()
        .expect(
            Method::GET,
            POOL,
            Value::Null,
            200,
            pool_json(
                "4",
                json!({"10.0.0.5": record("c1"), "10.0.0.6": record("c1"),
                       "10.0.0.7": record("c2")}),
            ),
        )
        .expect(
            Method::PATCH,
            POOL_STATUS,
            json!({"metadata": {"resourceVersion": "4"},
                   "status": {"allocations": {"10.0.0.5": null, "10.0.0.6": null},
                              "allocatedIPCount": 1, "unallocatedIPCount": 7}}),
            200,
            pool_json("5", json!({"10.0.0.7": record("c2")})),
        );
    let addresses: Vec<IpAddr> = ["10.0.0.5", "10.0.0.6", "10.0.0.7", "10.0.0.8"]
        .iter()
        .map(|address| address.parse().expect("address"))
        .collect();
    let released = PoolStore::new(script.client())
        .release("pool-0", &addresses, |_, record| {
            record.container_id.as_deref() == Some("c1")
        })
        .await;
    assert!(released.expect("the release succeeds").is_some());
    script.finish();
}

#[tokio::test]
async fn a_conflicting_claim_answers_with_a_fresh_read() {
    let script = Script::default()
        .expect(
            Method::PATCH,
            POOL_STATUS,
            json!({"metadata": {"resourceVersion": "1"},
                   "status": {"allocations": {"10.0.0.5": record("c1")}}}),
            409,
            status_body(409, "Conflict"),
        )
        .expect(
            Method::GET,
            POOL,
            Value::Null,
            200,
            pool_json("2", json!({})),
        );
    let claim = PoolClaim {
        pool: "pool-0".into(),
        resource_version: "1".into(),
        records: [("10.0.0.5".parse().expect("address"), parsed(record("c1")))].into(),
    };
    match PoolStore::new(script.client()).claim(&claim).await {
        Ok(ClaimOutcome::Conflict(pool)) => {
            assert_eq!(
                kube::ResourceExt::resource_version(&pool).as_deref(),
                Some("2")
            );
        }
        other => panic!("expected a conflict with the fresh pool, got {other:?}"),
    }
    script.finish();
}

#[tokio::test]
async fn an_empty_resource_version_is_an_error_not_a_dropped_guard() {
    // No request at all: the write is refused before it is sent.
    let script = Script::default();
    let claim = PoolClaim {
        pool: "pool-0".into(),
        resource_version: String::new(),
        records: [("10.0.0.5".parse().expect("address"), parsed(record("c1")))].into(),
    };
    let claimed = PoolStore::new(script.client()).claim(&claim).await;
    assert!(
        matches!(claimed, Err(StoreError::MissingResourceVersion { .. })),
        "{claimed:?}"
    );
    let mut endpoint: Endpoint = parsed(endpoint_json("7", &["ipam.virtnet.io/endpoint"], "c1"));
    endpoint.metadata.resource_version = None;
    let store = EndpointStore::new(script.client());
    assert!(matches!(
        store.let_go(&endpoint).await,
        Err(StoreError::MissingResourceVersion { .. })
    ));
    assert!(matches!(
        store.replace(&endpoint).await,
        Err(StoreError::MissingResourceVersion { .. })
    ));
    let mut pool: IpPool = parsed(pool_json("1", json!({"10.0.0.5": record("c1")})));
    pool.metadata.resource_version = Some(String::new());
    assert!(matches!(
        super::pools::release_patch(&pool, &["10.0.0.5".parse().expect("address")], |_, _| true),
        Err(StoreError::MissingResourceVersion { .. })
    ));
    script.finish();
}

#[tokio::test]
async fn a_crash_between_claim_and_endpoint_is_recovered_by_the_next_add() {
    use crate::agent::plan::{AllocationInput, BatchOutcome, NodeLabels, plan_batch};
    use crate::ipam::FixedIpRetention;
    // The agent claimed 10.0.0.5 for the pod's first sandbox and died before the Endpoint: the
    // pool holds the record, no Endpoint exists. The runtime's next ADD (a new sandbox) finds
    // the address by its holder, re-asserts it for the new sandbox with a guarded write, and
    // creates the Endpoint.
    let subnet: crate::crd::Subnet = parsed(json!({
        "apiVersion": "virtnet.io/v1alpha1", "kind": "Subnet", "metadata": {"name": "s"},
        "spec": {"subnet": "10.0.0.0/24", "gateway": "10.0.0.1", "ips": ["10.0.0.2-10.0.0.9"],
                 "replicas": 1},
    }));
    let pool: IpPool = parsed(pool_json("5", json!({"10.0.0.5": record("c1")})));
    let pod: k8s_openapi::api::core::v1::Pod = parsed(json!({
        "metadata": {"name": "p", "namespace": "default", "uid": "pod-uid"},
    }));
    let nodes = NodeLabels::from([("n".to_owned(), Default::default())]);
    let subnets = [subnet];
    let defaults = ["s".to_owned()];
    let input = AllocationInput {
        pod: &pod,
        namespace: None,
        node: "n",
        nodes: &nodes,
        interface: "eth0",
        network: None,
        persistent_claim: None,
        container_id: "c2",
        cni_default_subnets: &defaults,
        subnets: &subnets,
        retention: FixedIpRetention::ON,
    };
    let batch = plan_batch(&[input], vec![pool]);
    let Some(BatchOutcome::Planned(plan)) = batch.outcomes.first() else {
        panic!("the ADD is decided: {batch:?}");
    };
    assert!(plan.claims[0].already_held, "{plan:?}");
    assert_eq!(plan.claims[0].address.to_string(), "10.0.0.5");
    let script = Script::default()
        .expect(
            Method::PATCH,
            POOL_STATUS,
            json!({"metadata": {"resourceVersion": "5"},
                   "status": {"allocations": {"10.0.0.5": record("c2")}}}),
            200,
            pool_json("6", json!({"10.0.0.5": record("c2")})),
        )
        .expect(
            Method::POST,
            "/apis/virtnet.io/v1alpha1/namespaces/default/endpoints",
            Value::Null,
            201,
            endpoint_json("7", &["ipam.virtnet.io/endpoint"], "c2"),
        );
    let [write] = batch.writes.as_slice() else {
        panic!("one re-assertion: {batch:?}");
    };
    assert!(matches!(
        PoolStore::new(script.client()).claim(&write.claim).await,
        Ok(ClaimOutcome::Written(_))
    ));
    let endpoint: Endpoint = parsed(endpoint_json("", &["ipam.virtnet.io/endpoint"], "c2"));
    let created = EndpointStore::new(script.client()).create(&endpoint).await;
    assert_eq!(created.expect("the Endpoint is created"), Written::Done);
    script.finish();
}
