//! `virtnet controller`'s garbage collection against the real control plane. The test plays the
//! agent: for real pods it writes what the agent writes (a record in an IPPool's
//! `status.allocations`, then an Endpoint with the finalizer), runs the controller binary as a
//! child process, and watches the addresses of dead holders come back while live and sticky
//! holders keep theirs. For KubeVirt it also plays virt-controller (a VirtualMachine CRD with a
//! minimal schema, launcher pods with KubeVirt's labels). Reclaim latencies are printed.
use std::{
    fs::File,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use k8s_openapi::api::{
    apps::v1::StatefulSet,
    core::v1::{Node, Pod},
};
use kube::{
    Api,
    api::{
        ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
    },
};
use serde_json::{Value, json};
use virtnet_e2e::cluster::Cluster;

use crate::support::install_kubevirt_crd;
use crate::support::{
    Suite, create_namespace, delete_namespace, is_pod_ready, node_name, pod_name,
    wait_for_ready_pods,
};

const POOL: &str = "gc-pool";
const FINALIZER: &str = "ipam.virtnet.io/endpoint";
/// Sweep interval and graces given to the controller: short, so the test is quick.
const SWEEP_SECONDS: u64 = 5;
const RECLAIM_TIMEOUT: Duration = Duration::from_secs(60);

/// The controller child process; killed when dropped.
struct ControllerProcess(Child);

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `virtnet` binary next to this test's directory in the cargo target dir.
fn controller_binary() -> anyhow::Result<PathBuf> {
    let test = std::env::current_exe()?;
    let binary = test
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("virtnet"))
        .context("the test binary has no target directory")?;
    ensure!(
        binary.exists(),
        "{} is missing: build it first with `cargo build -p virtnet`",
        binary.display()
    );
    Ok(binary)
}

fn start_controller(cluster: &Cluster) -> anyhow::Result<ControllerProcess> {
    let log = File::create(cluster.layout().logs.join("virtnet-controller.log"))?;
    let sweep = SWEEP_SECONDS.to_string();
    let child = Command::new(controller_binary()?)
        .args(["controller", "--namespace", "default"])
        .args(["--http-address", "127.0.0.1:0"])
        .args(["--leader-election-lease", "virtnet-gc-e2e"])
        .args(["--gc-interval-seconds", &sweep])
        .args(["--orphan-grace-seconds", &sweep])
        .env("KUBECONFIG", cluster.kubeconfig())
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .context("starting virtnet controller")?;
    Ok(ControllerProcess(child))
}

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("virtnet.io", "v1alpha1", kind),
        plural,
    )
}

fn pools(cluster: &Cluster) -> Api<DynamicObject> {
    Api::all_with(cluster.client(), &resource("IPPool", "ippools"))
}

fn endpoints(cluster: &Cluster, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        cluster.client(),
        namespace,
        &resource("Endpoint", "endpoints"),
    )
}

async fn install_crds_and_pool(cluster: &Cluster) -> anyhow::Result<()> {
    let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/../chart/crds");
    cluster.kubectl(&["apply", "--server-side", "-f", crds])?;
    cluster.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "-f",
        crds,
    ])?;
    let pool: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "virtnet.io/v1alpha1", "kind": "IPPool",
        "metadata": { "name": POOL },
        "spec": { "subnet": "gc", "cidr": "10.250.0.0/24", "ips": ["10.250.0.10-10.250.0.60"] },
    }))?;
    pools(cluster).create(&PostParams::default(), &pool).await?;
    set_pool_status(cluster, json!({ "totalIPCount": 51 })).await
}

async fn set_pool_status(cluster: &Cluster, status: Value) -> anyhow::Result<()> {
    pools(cluster)
        .patch_status(
            POOL,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "status": status })),
        )
        .await?;
    Ok(())
}

/// What a claim records: who holds `address` and whether it is sticky.
struct Claim<'a> {
    endpoint: &'a str,
    pod: &'a Pod,
    address: &'a str,
    owner: (&'a str, &'a str),
    sticky: bool,
}

/// Writes what the agent writes for one allocation: the pool record, then the Endpoint.
async fn claim(cluster: &Cluster, namespace: &str, claim: Claim<'_>) -> anyhow::Result<()> {
    let uid = claim
        .pod
        .metadata
        .uid
        .as_deref()
        .context("pod has no uid")?;
    let node = node_name(claim.pod).context("pod is not bound")?;
    let record = json!({
        "endpoint": format!("{namespace}/{}", claim.endpoint),
        "interface": "eth0", "podUID": uid, "node": node,
    });
    set_pool_status(cluster, json!({ "allocations": { claim.address: record } })).await?;
    let owner_references = if claim.sticky {
        json!([])
    } else {
        json!([{ "apiVersion": "v1", "kind": "Pod", "name": pod_name(claim.pod), "uid": uid }])
    };
    let endpoint: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "virtnet.io/v1alpha1", "kind": "Endpoint",
        "metadata": {
            "name": claim.endpoint, "namespace": namespace,
            "finalizers": [FINALIZER], "ownerReferences": owner_references,
        },
        "spec": {
            "interfaces": [{ "interface": "eth0", "ipv4Pool": POOL, "ipv4": format!("{}/24", claim.address) }],
            "ownerKind": claim.owner.0, "ownerName": claim.owner.1,
            "node": node, "podUID": uid, "containerID": "e2e", "sticky": claim.sticky,
        },
    }))?;
    endpoints(cluster, namespace)
        .create(&PostParams::default(), &endpoint)
        .await
        .with_context(|| format!("creating Endpoint {namespace}/{}", claim.endpoint))?;
    Ok(())
}

/// The Endpoint each of `addresses` is recorded for (`None`: free).
async fn holders(cluster: &Cluster, addresses: &[&str]) -> anyhow::Result<Vec<Option<String>>> {
    let pool = pools(cluster).get(POOL).await?;
    Ok(addresses
        .iter()
        .map(|address| {
            pool.data["status"]["allocations"][address]["endpoint"]
                .as_str()
                .map(str::to_owned)
        })
        .collect())
}

/// Waits until every one of `addresses` is free; returns how long that took from `since`.
async fn wait_released(
    cluster: &Cluster,
    addresses: &[&str],
    since: Instant,
) -> anyhow::Result<Duration> {
    let what = format!("{addresses:?} back in {POOL}");
    cluster
        .wait_for(&what, RECLAIM_TIMEOUT, || async {
            let held = holders(cluster, addresses)
                .await
                .map_err(|error| error.to_string())?;
            if held.iter().all(Option::is_none) {
                Ok(())
            } else {
                Err(format!("still held by {held:?}"))
            }
        })
        .await?;
    Ok(since.elapsed())
}

async fn ensure_held(cluster: &Cluster, addresses: &[&str], why: &str) -> anyhow::Result<()> {
    let held = holders(cluster, addresses).await?;
    ensure!(
        held.iter().all(Option::is_some),
        "{why}: {addresses:?} must stay allocated, got holders {held:?}"
    );
    Ok(())
}

fn bare_pod(name: &str) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": { "name": name, "labels": { "app": "gc-bare" } },
        "spec": { "containers": [{ "name": "main", "image": "registry.k8s.io/pause:3.10" }] },
    }))?)
}

fn statefulset(replicas: i32) -> anyhow::Result<StatefulSet> {
    Ok(serde_json::from_value(json!({
        "metadata": { "name": "db" },
        "spec": {
            "replicas": replicas,
            "serviceName": "db",
            "podManagementPolicy": "Parallel",
            "selector": { "matchLabels": { "app": "gc-db" } },
            "template": {
                "metadata": { "labels": { "app": "gc-db" } },
                "spec": { "containers": [{ "name": "main", "image": "registry.k8s.io/pause:3.10" }] },
            },
        },
    }))?)
}

/// Ordinary pods: live holders keep their addresses through sweeps; a deleted, a force-deleted
/// pod's and an unrecorded allocation's addresses come back.
async fn ordinary_pods(cluster: &Cluster) -> anyhow::Result<()> {
    let namespace = "gc-pods";
    create_namespace(cluster, namespace).await?;
    let pods: Api<Pod> = Api::namespaced(cluster.client(), namespace);
    for name in ["plain", "forced"] {
        pods.create(&PostParams::default(), &bare_pod(name)?)
            .await?;
    }
    let ready = wait_for_ready_pods(cluster, namespace, "app=gc-bare", 2).await?;
    let (plain, forced) = ("10.250.0.10", "10.250.0.11");
    for pod in &ready {
        let name = pod_name(pod);
        claim(
            cluster,
            namespace,
            Claim {
                endpoint: name,
                pod,
                address: if name == "plain" { plain } else { forced },
                owner: ("Pod", name),
                sticky: false,
            },
        )
        .await?;
    }
    let orphan = json!({ "endpoint": format!("{namespace}/ghost"), "interface": "eth0", "podUID": "gone", "node": "nowhere" });
    let orphan_written = Instant::now();
    set_pool_status(cluster, json!({ "allocations": { "10.250.0.12": orphan } })).await?;
    let latency = wait_released(cluster, &["10.250.0.12"], orphan_written).await?;
    eprintln!("gc: unrecorded allocation reclaimed after {latency:?}");
    tokio::time::sleep(Duration::from_secs(SWEEP_SECONDS + 1)).await;
    ensure_held(cluster, &[plain, forced], "live pods after a sweep").await?;

    let deleted = Instant::now();
    pods.delete("plain", &DeleteParams::default()).await?;
    let latency = wait_released(cluster, &[plain], deleted).await?;
    eprintln!("gc: deleted pod's address reclaimed {latency:?} after the delete call");

    let deleted = Instant::now();
    pods.delete("forced", &DeleteParams::default().grace_period(0))
        .await?;
    let latency = wait_released(cluster, &[forced], deleted).await?;
    eprintln!("gc: force-deleted pod's address reclaimed {latency:?} after the delete call");
    wait_endpoints_gone(cluster, namespace).await?;
    delete_namespace(cluster, namespace).await
}

async fn wait_endpoints_gone(cluster: &Cluster, namespace: &str) -> anyhow::Result<()> {
    let api = endpoints(cluster, namespace);
    cluster
        .wait_for(
            &format!("no Endpoints left in {namespace}"),
            RECLAIM_TIMEOUT,
            || async {
                let left = api
                    .list(&Default::default())
                    .await
                    .map_err(|error| error.to_string())?;
                match left.items.len() {
                    0 => Ok(()),
                    count => Err(format!("{count} left")),
                }
            },
        )
        .await?;
    Ok(())
}

/// A StatefulSet of 5: a restarted replica keeps its address, scaling to 2 releases 3,
/// deleting the StatefulSet releases the rest.
async fn statefulset_replicas(cluster: &Cluster) -> anyhow::Result<()> {
    let namespace = "gc-sts";
    create_namespace(cluster, namespace).await?;
    let sets: Api<StatefulSet> = Api::namespaced(cluster.client(), namespace);
    sets.create(&PostParams::default(), &statefulset(5)?)
        .await?;
    let ready = wait_for_ready_pods(cluster, namespace, "app=gc-db", 5).await?;
    let addresses = [
        "10.250.0.20",
        "10.250.0.21",
        "10.250.0.22",
        "10.250.0.23",
        "10.250.0.24",
    ];
    for pod in &ready {
        let name = pod_name(pod);
        let ordinal: usize = name.trim_start_matches("db-").parse()?;
        claim(
            cluster,
            namespace,
            Claim {
                endpoint: name,
                pod,
                address: addresses[ordinal],
                owner: ("StatefulSet", "db"),
                sticky: true,
            },
        )
        .await?;
    }

    let pods: Api<Pod> = Api::namespaced(cluster.client(), namespace);
    let old_uid = pods.get("db-1").await?.metadata.uid;
    pods.delete("db-1", &DeleteParams::default()).await?;
    cluster
        .wait_for("db-1 recreated with a new UID", RECLAIM_TIMEOUT, || async {
            match pods.get_opt("db-1").await {
                Ok(Some(pod)) if pod.metadata.uid != old_uid && is_pod_ready(&pod) => Ok(()),
                Ok(_) => Err("not yet".to_owned()),
                Err(error) => Err(error.to_string()),
            }
        })
        .await?;
    tokio::time::sleep(Duration::from_secs(SWEEP_SECONDS + 1)).await;
    ensure_held(cluster, &addresses, "a restarted StatefulSet replica").await?;

    let scaled = Instant::now();
    sets.patch(
        "db",
        &PatchParams::default(),
        &Patch::Merge(&json!({ "spec": { "replicas": 2 } })),
    )
    .await?;
    let latency = wait_released(cluster, &addresses[2..], scaled).await?;
    eprintln!("gc: StatefulSet 5→2 released 3 addresses {latency:?} after the scale call");
    ensure_held(cluster, &addresses[..2], "replicas below the new count").await?;

    let deleted = Instant::now();
    sets.delete("db", &DeleteParams::default()).await?;
    let latency = wait_released(cluster, &addresses[..2], deleted).await?;
    eprintln!("gc: deleted StatefulSet's addresses released {latency:?} after the delete call");
    wait_endpoints_gone(cluster, namespace).await?;
    delete_namespace(cluster, namespace).await
}

pub fn controller_reclaims_dead_holders_and_keeps_live_and_sticky_ones(
    suite: &Suite,
) -> anyhow::Result<()> {
    let cluster = &suite.cluster;
    suite.block_on(install_crds_and_pool(cluster))?;
    suite.block_on(install_kubevirt_crd(
        cluster,
        "VirtualMachine",
        "virtualmachines",
    ))?;
    let controller = start_controller(cluster)?;
    suite.block_on(ordinary_pods(cluster))?;
    suite.block_on(statefulset_replicas(cluster))?;
    suite.block_on(virtual_machine(cluster))?;
    suite.block_on(partitioned_node(cluster))?;
    suite.block_on(restarted_controller(cluster, controller))
}

/// A virt-launcher pod of VM `vm`, labelled as KubeVirt labels it.
fn launcher_pod(name: &str, vm: &str) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": { "kubevirt.io": "virt-launcher", "vm.kubevirt.io/name": vm },
        },
        "spec": { "containers": [{ "name": "compute", "image": "registry.k8s.io/pause:3.10" }] },
    }))?)
}

/// What the agent does when a new launcher pod takes a VM's address over: the Endpoint and the
/// pool record name the new pod.
async fn hand_over(
    cluster: &Cluster,
    namespace: &str,
    endpoint: &str,
    address: &str,
    pod: &Pod,
) -> anyhow::Result<()> {
    let uid = pod.metadata.uid.as_deref().context("pod has no uid")?;
    let node = node_name(pod).context("pod is not bound")?;
    let record = json!({
        "endpoint": format!("{namespace}/{endpoint}"),
        "interface": "eth0", "podUID": uid, "node": node,
    });
    set_pool_status(cluster, json!({ "allocations": { address: record } })).await?;
    endpoints(cluster, namespace)
        .patch(
            endpoint,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "spec": { "podUID": uid, "node": node } })),
        )
        .await?;
    Ok(())
}

/// A VM keeps its address across launcher pod deletion (restart, VMI deletion) and a live
/// migration (a second launcher pod), and while its last launcher runs after the VM is deleted;
/// the address goes back once the VM and its launchers are gone.
async fn virtual_machine(cluster: &Cluster) -> anyhow::Result<()> {
    let namespace = "gc-vm";
    let address = "10.250.0.30";
    create_namespace(cluster, namespace).await?;
    let vm_resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachine"),
        "virtualmachines",
    );
    let vms: Api<DynamicObject> = Api::namespaced_with(cluster.client(), namespace, &vm_resource);
    let vm: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": { "name": "vm1" }, "spec": { "running": true },
    }))?;
    vms.create(&PostParams::default(), &vm).await?;
    let pods: Api<Pod> = Api::namespaced(cluster.client(), namespace);
    let launcher = |name: &'static str| {
        let pods = pods.clone();
        async move {
            pods.create(&PostParams::default(), &launcher_pod(name, "vm1")?)
                .await?;
            cluster
                .wait_for(&format!("{name} Ready"), RECLAIM_TIMEOUT, || async {
                    match pods.get(name).await {
                        Ok(pod) if is_pod_ready(&pod) => Ok(pod),
                        Ok(_) => Err("not Ready".to_owned()),
                        Err(error) => Err(error.to_string()),
                    }
                })
                .await
                .map_err(anyhow::Error::from)
        }
    };
    let first = launcher("virt-launcher-vm1-a").await?;
    claim(
        cluster,
        namespace,
        Claim {
            endpoint: "vm1",
            pod: &first,
            address,
            owner: ("VirtualMachine", "vm1"),
            sticky: true,
        },
    )
    .await?;

    // VMI deleted / VM restarted: the launcher pod goes; a new one takes the address over.
    pods.delete(
        "virt-launcher-vm1-a",
        &DeleteParams::default().grace_period(0),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(SWEEP_SECONDS + 1)).await;
    ensure_held(cluster, &[address], "a VM whose launcher pod was deleted").await?;
    let restarted = launcher("virt-launcher-vm1-b").await?;
    hand_over(cluster, namespace, "vm1", address, &restarted).await?;

    // Live migration: the target launcher runs next to the source and takes the address over.
    let target = launcher("virt-launcher-vm1-c").await?;
    hand_over(cluster, namespace, "vm1", address, &target).await?;
    pods.delete(
        "virt-launcher-vm1-b",
        &DeleteParams::default().grace_period(0),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(SWEEP_SECONDS + 1)).await;
    ensure_held(cluster, &[address], "a VM after restart and migration").await?;

    // VM deleted while its launcher still runs: kept until the launcher is gone.
    vms.delete("vm1", &DeleteParams::default()).await?;
    tokio::time::sleep(Duration::from_secs(SWEEP_SECONDS + 1)).await;
    ensure_held(
        cluster,
        &[address],
        "a deleted VM whose launcher still runs",
    )
    .await?;
    let deleted = Instant::now();
    pods.delete(
        "virt-launcher-vm1-c",
        &DeleteParams::default().grace_period(0),
    )
    .await?;
    let latency = wait_released(cluster, &[address], deleted).await?;
    eprintln!("gc: deleted VM's address released {latency:?} after its last launcher went");
    wait_endpoints_gone(cluster, namespace).await?;
    delete_namespace(cluster, namespace).await
}

/// A pod deleted while no controller runs (killed without releasing its Lease) is reclaimed by
/// the next leader's first sweep.
async fn restarted_controller(
    cluster: &Cluster,
    controller: ControllerProcess,
) -> anyhow::Result<()> {
    let namespace = "gc-restart";
    let address = "10.250.0.40";
    create_namespace(cluster, namespace).await?;
    let pods: Api<Pod> = Api::namespaced(cluster.client(), namespace);
    pods.create(&PostParams::default(), &bare_pod("late")?)
        .await?;
    let ready = wait_for_ready_pods(cluster, namespace, "app=gc-bare", 1).await?;
    claim(
        cluster,
        namespace,
        Claim {
            endpoint: "late",
            pod: &ready[0],
            address,
            owner: ("Pod", "late"),
            sticky: false,
        },
    )
    .await?;
    drop(controller);
    pods.delete("late", &DeleteParams::default().grace_period(0))
        .await?;
    tokio::time::sleep(Duration::from_secs(SWEEP_SECONDS + 1)).await;
    ensure_held(cluster, &[address], "no controller running").await?;
    let restarted = Instant::now();
    let _controller = start_controller(cluster)?;
    let latency = wait_released(cluster, &[address], restarted).await?;
    eprintln!(
        "gc: restarted controller reclaimed a missed deletion {latency:?} after its start (incl. Lease takeover)"
    );
    wait_endpoints_gone(cluster, namespace).await?;
    delete_namespace(cluster, namespace).await
}

const PARTITIONED_NODE: &str = "gc-partitioned";

/// A node cut off from the API server (NotReady, no kubelet to run DELs): its pods keep their
/// addresses whatever happens to the pod objects (a graceful delete that stays Terminating, a
/// force-delete), since the sandboxes may still answer on the underlay; fencing the node (the
/// out-of-service taint) releases them.
async fn partitioned_node(cluster: &Cluster) -> anyhow::Result<()> {
    let namespace = "gc-partition";
    let nodes: Api<Node> = Api::all(cluster.client());
    let node: Node = serde_json::from_value(json!({ "metadata": { "name": PARTITIONED_NODE } }))?;
    nodes.create(&PostParams::default(), &node).await?;
    let result = partitioned_node_pods(cluster, namespace, &nodes).await;
    // Whatever happened: the node and its pods go, so other tests see the cluster's own nodes.
    let pods: Api<Pod> = Api::namespaced(cluster.client(), namespace);
    for name in ["stuck", "forced"] {
        let _ = pods
            .delete(name, &DeleteParams::default().grace_period(0))
            .await;
    }
    let _ = nodes
        .delete(PARTITIONED_NODE, &DeleteParams::default())
        .await;
    result?;
    wait_endpoints_gone(cluster, namespace).await?;
    delete_namespace(cluster, namespace).await
}

async fn partitioned_node_pods(
    cluster: &Cluster,
    namespace: &str,
    nodes: &Api<Node>,
) -> anyhow::Result<()> {
    let not_ready = json!({ "status": { "conditions": [{
        "type": "Ready", "status": "False", "reason": "KubeletStopped",
        "message": "e2e: the node is cut off", "lastHeartbeatTime": "2026-01-01T00:00:00Z",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }] } });
    nodes
        .patch_status(
            PARTITIONED_NODE,
            &PatchParams::default(),
            &Patch::Merge(&not_ready),
        )
        .await?;
    create_namespace(cluster, namespace).await?;
    let pods: Api<Pod> = Api::namespaced(cluster.client(), namespace);
    let (stuck, forced) = ("10.250.0.30", "10.250.0.31");
    for (name, address) in [("stuck", stuck), ("forced", forced)] {
        let mut pod = bare_pod(name)?;
        pod.spec.get_or_insert_default().node_name = Some(PARTITIONED_NODE.to_owned());
        let pod = pods.create(&PostParams::default(), &pod).await?;
        claim(
            cluster,
            namespace,
            Claim {
                endpoint: name,
                pod: &pod,
                address,
                owner: ("Pod", name),
                sticky: false,
            },
        )
        .await?;
    }
    // No kubelet confirms the graceful delete: the pod stays Terminating.
    pods.delete("stuck", &DeleteParams::default().grace_period(1))
        .await?;
    pods.delete("forced", &DeleteParams::default().grace_period(0))
        .await?;
    tokio::time::sleep(Duration::from_secs(3 * SWEEP_SECONDS)).await;
    ensure_held(
        cluster,
        &[stuck, forced],
        "pods of a NotReady node that is not fenced (Terminating past its deadline, force-deleted)",
    )
    .await?;

    let fenced = Instant::now();
    let taint = json!({ "spec": { "taints": [{
        "key": "node.kubernetes.io/out-of-service", "value": "nodeshutdown", "effect": "NoExecute",
    }] } });
    nodes
        .patch(
            PARTITIONED_NODE,
            &PatchParams::default(),
            &Patch::Merge(&taint),
        )
        .await?;
    let latency = wait_released(cluster, &[stuck, forced], fenced).await?;
    eprintln!("gc: a fenced node's addresses reclaimed {latency:?} after the taint");
    Ok(())
}
