//! `virtnet controller` with the real agent and plugins, on one VirtNet cluster of its own (suffix
//! `c`), scenarios in sequence: the Subnet webhook refuses an overlap; Subnet replicas 3→5→2 while
//! pods hold addresses lose or duplicate none; the example StatefulSet of 5 keeps its addresses
//! through `kubectl rollout restart` and scaled to 2 releases exactly 3; the controller killed
//! during a scale-down converges when restarted; the sweep runs at its interval and deleted pools
//! leave /metrics; with fixed-IP retention switched off a StatefulSet pod is like any other; with
//! a standby replica, the leader killed in the middle of a Subnet resize (1 pool from 4, every
//! pool busy) hands over within the Lease time and the resize converges; pods force-deleted while
//! their node is down are reclaimed, by the standby that takes over from the leader killed just
//! before. Latencies are printed.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams},
};
use serde_json::{Value, json};
use virtnet_e2e::{
    cluster::{Cluster, VIRTNET_NAMESPACE, VirtnetOptions},
    topology::GATEWAY_V4,
};

use crate::agent::create_deployment;
use crate::support::{own_virtnet_cluster, run_on_own_cluster};
use crate::{
    ipam::{kubectl_json, pool_records},
    support::{
        Suite, create_namespace, node_name, ping_from_pod, pod_ip, pod_name, wait_for_ready_pods,
    },
};

const SUBNET: &str = "subnet";
/// Sweep interval given to the controller: short enough to see several sweeps in one run.
const SWEEP_SECONDS: u64 = 20;
const TIMEOUT: Duration = Duration::from_secs(90);
const CONTROLLER: &str = "virtnet-controller";
/// The second replica [`leader_killed_during_a_resize`] starts: its identity in the Lease, and
/// the component's name.
const STANDBY: &str = "virtnet-controller-standby";
/// The Lease the replicas compete for, and how long it holds (the controller's setting).
const LEASE: &str = "virtnet-controller";
const LEASE_SECONDS: u64 = 15;

pub fn controller_keeps_addresses_right_with_the_real_agent(suite: &Suite) -> anyhow::Result<()> {
    let mut virtnet = VirtnetOptions::from_workspace();
    virtnet.controller_env = vec![("VIRTNET_GC_INTERVAL".into(), SWEEP_SECONDS.to_string())];
    let examples = virtnet.repo.join("examples/statefulset");
    run_on_own_cluster(suite, own_virtnet_cluster('c', virtnet), async |cluster| {
        scenarios(cluster, &examples).await
    })
}

async fn scenarios(cluster: &mut Cluster, examples: &Path) -> anyhow::Result<()> {
    let first_sweep = cluster
        .wait_for("the controller's first sweep", TIMEOUT, || async {
            cluster
                .controller_metrics()
                .map_err(anyhow::Error::from)
                .and_then(|metrics| sweep_count(&metrics))
        })
        .await?;
    let sweeps_before = (first_sweep, Instant::now());
    webhook_refuses_overlaps(cluster, examples).await?;
    subnet_replicas_change_while_pods_hold_addresses(cluster).await?;
    statefulset_restart_and_scale_down(cluster, examples).await?;
    sweeps_and_pool_gauges(cluster, sweeps_before)?;
    controller_killed_during_a_scale_down(cluster).await?;
    retention_switched_off(cluster, examples).await?;
    leader_killed_during_a_resize(cluster).await?;
    pods_of_a_lost_node_are_reclaimed(cluster).await
}

/// Runs kubectl with `args` and expects it to fail with `expected` in its error.
pub fn kubectl_refused(cluster: &Cluster, args: &[&str], expected: &str) -> anyhow::Result<()> {
    match cluster.kubectl(args) {
        Ok(output) => bail!("kubectl {args:?} succeeded ({output}); expected {expected:?}"),
        Err(error) => {
            let error = error.to_string();
            ensure!(
                error.contains(expected),
                "kubectl {args:?} failed without {expected:?}: {error}"
            );
            let said = error
                .split_once("): ")
                .map_or(error.as_str(), |(_, said)| said);
            eprintln!("refused as expected: {said}");
            Ok(())
        }
    }
}

pub fn write_manifest(cluster: &Cluster, name: &str, manifest: &Value) -> anyhow::Result<String> {
    let path = cluster.layout().root.join(format!("{name}.json"));
    std::fs::write(&path, manifest.to_string())?;
    Ok(path.to_string_lossy().into_owned())
}

pub fn subnet_manifest(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "virtnet.io/v1alpha1", "kind": "Subnet", "metadata": {"name": name}, "spec": spec})
}

async fn webhook_refuses_overlaps(cluster: &Cluster, examples: &Path) -> anyhow::Result<()> {
    cluster.kubectl(&[
        "apply",
        "-f",
        &examples.join("subnet.yaml").to_string_lossy(),
    ])?;
    wait_for_pools(cluster, 3).await?;
    let overlap = write_manifest(
        cluster,
        "overlap",
        &subnet_manifest("overlap", json!({"subnet": "10.6.200.0/24"})),
    )?;
    kubectl_refused(
        cluster,
        &["create", "-f", &overlap],
        "spec.subnet 10.6.200.0/24 overlaps Subnet \"subnet\" (10.6.0.0/16)",
    )?;
    let reversed = write_manifest(
        cluster,
        "reversed",
        &subnet_manifest(
            "reversed",
            json!({"subnet": "fd00:6::/64", "ips": ["fd00:6::1ff-fd00:6::100"]}),
        ),
    )?;
    kubectl_refused(
        cluster,
        &["create", "-f", &reversed],
        "starts after it ends: write the lower address first, e.g. fd00:6::100-fd00:6::1ff",
    )?;
    let disjoint = write_manifest(
        cluster,
        "storage",
        &subnet_manifest("storage", json!({"subnet": "10.7.0.0/24", "replicas": 2})),
    )?;
    cluster.kubectl(&["create", "-f", &disjoint])?;
    wait_for_pools(cluster, 5).await?;
    // Its pools go with it (owner references); their gauges must follow (checked later).
    cluster.kubectl(&["delete", "subnet.virtnet.io", "storage", "--wait=true"])?;
    wait_for_pools(cluster, 3).await.map(drop)
}

/// Waits until exactly `count` IPPools exist and returns them.
async fn wait_for_pools(cluster: &Cluster, count: usize) -> anyhow::Result<Vec<Value>> {
    Ok(cluster
        .wait_for(&format!("{count} IPPools"), TIMEOUT, || async {
            let pools = kubectl_json(cluster, &["get", "ippools.virtnet.io"])
                .map_err(|error| error.to_string())?;
            let items = pools["items"].as_array().cloned().unwrap_or_default();
            if items.len() == count {
                Ok(items)
            } else {
                Err(format!("{} pools", items.len()))
            }
        })
        .await?)
}

/// The addresses of an IPPool's `spec.ips` (IPv4 `a` or `a-b` items).
fn pool_addresses(pool: &Value) -> anyhow::Result<BTreeSet<Ipv4Addr>> {
    let mut addresses = BTreeSet::new();
    for item in pool["spec"]["ips"].as_array().into_iter().flatten() {
        let item = item.as_str().context("ips item is not a string")?;
        let (start, end) = item.split_once('-').unwrap_or((item, item));
        let (start, end): (Ipv4Addr, Ipv4Addr) = (start.parse()?, end.parse()?);
        addresses.extend((u32::from(start)..=u32::from(end)).map(Ipv4Addr::from));
    }
    Ok(addresses)
}

/// No address lost or duplicated: the pools' `ips` are disjoint, every allocation lies in its
/// own pool's `ips`, and every pod's address is recorded exactly once, for that pod.
fn check_pools_and_pods(cluster: &Cluster, namespace: &str, pods: &[Pod]) -> anyhow::Result<()> {
    let pools = kubectl_json(cluster, &["get", "ippools.virtnet.io"])?;
    let mut owner: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for pool in pools["items"].as_array().into_iter().flatten() {
        let name = pool["metadata"]["name"].as_str().unwrap_or_default();
        let addresses = pool_addresses(pool)?;
        for address in &addresses {
            if let Some(other) = owner.insert(*address, name.to_owned()) {
                bail!("{address} is in the ips of both {other} and {name}");
            }
        }
        for allocated in pool["status"]["allocations"]
            .as_object()
            .into_iter()
            .flatten()
        {
            let address: Ipv4Addr = allocated.0.parse()?;
            ensure!(
                addresses.contains(&address),
                "{name} allocated {address} outside its ips"
            );
        }
    }
    let records = pool_records(cluster)?;
    for pod in pods {
        let address = pod_ip(pod)?.to_string();
        let holders: Vec<&Value> = records
            .iter()
            .filter(|(recorded, _)| *recorded == address)
            .map(|(_, record)| &record["endpoint"])
            .collect();
        let expected = format!("{namespace}/{}", pod_name(pod));
        ensure!(
            holders.len() == 1 && holders[0] == expected.as_str(),
            "{address} of {expected} is recorded for {holders:?}"
        );
    }
    let distinct: BTreeSet<String> = pods
        .iter()
        .map(|pod| pod_ip(pod).map(|ip| ip.to_string()))
        .collect::<Result<_, _>>()?;
    ensure!(
        distinct.len() == pods.len(),
        "pods share addresses: {distinct:?}"
    );
    Ok(())
}

/// Each pod pings the next one and the gateway.
fn ping_ring(cluster: &Cluster, pods: &[Pod]) -> anyhow::Result<()> {
    for (index, pod) in pods.iter().enumerate() {
        let next = &pods[(index + 1) % pods.len()];
        ping_from_pod(cluster, pod, pod_ip(next)?)?;
        ping_from_pod(cluster, pod, IpAddr::V4(GATEWAY_V4))?;
    }
    Ok(())
}

fn set_replicas(
    cluster: &Cluster,
    kind: &str,
    namespace: &str,
    replicas: usize,
) -> anyhow::Result<()> {
    let patch = json!({"spec": {"replicas": replicas}}).to_string();
    let mut args = vec!["patch", kind, "--type=merge", "-p", &patch];
    if !namespace.is_empty() {
        args.extend(["-n", namespace]);
    }
    cluster.kubectl(&args)?;
    Ok(())
}

async fn subnet_replicas_change_while_pods_hold_addresses(cluster: &Cluster) -> anyhow::Result<()> {
    let namespace = "scale";
    create_namespace(cluster, namespace).await?;
    create_deployment(cluster, namespace, "holders", 6).await?;
    let pods = wait_for_ready_pods(cluster, namespace, "app=holders", 6).await?;
    check_pools_and_pods(cluster, namespace, &pods)?;

    set_replicas(cluster, &format!("subnet.virtnet.io/{SUBNET}"), "", 5)?;
    wait_for_pools(cluster, 5).await?;
    wait_subnet_settled(cluster, 5).await?;
    check_pools_and_pods(cluster, namespace, &pods)?;
    set_replicas(cluster, "deployment/holders", namespace, 9)?;
    let pods = wait_for_ready_pods(cluster, namespace, "app=holders", 9).await?;
    check_pools_and_pods(cluster, namespace, &pods)?;
    ping_ring(cluster, &pods)?;

    // 5 → 2 while every pool holds addresses and 3 more pods are being added: the busy pools
    // hand their addresses over to the 2 that remain (no address changes), and then go.
    let held: BTreeSet<(String, String)> = pods
        .iter()
        .map(|pod| Ok((pod_name(pod).to_owned(), pod_ip(pod)?.to_string())))
        .collect::<anyhow::Result<_>>()?;
    let resized = Instant::now();
    set_replicas(cluster, &format!("subnet.virtnet.io/{SUBNET}"), "", 2)?;
    set_replicas(cluster, "deployment/holders", namespace, 12)?;
    wait_for_pools(cluster, 2).await?;
    wait_subnet_settled(cluster, 2).await?;
    eprintln!(
        "controller: Subnet 5→2 with every pool busy ended with 2 pools {:?} after the patch",
        resized.elapsed()
    );
    let pods = wait_for_ready_pods(cluster, namespace, "app=holders", 12).await?;
    check_pools_and_pods(cluster, namespace, &pods)?;
    let now: BTreeSet<(String, String)> = pods
        .iter()
        .map(|pod| Ok((pod_name(pod).to_owned(), pod_ip(pod)?.to_string())))
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        held.is_subset(&now),
        "the resize changed a pod's address: {held:?} → {now:?}"
    );
    ping_ring(cluster, &pods)?;
    set_replicas(cluster, "deployment/holders", namespace, 3)?;
    let pods = wait_for_ready_pods(cluster, namespace, "app=holders", 3).await?;
    check_pools_and_pods(cluster, namespace, &pods)?;
    cluster.kubectl(&["delete", "deployment", "holders", "-n", namespace])?;
    let pools = wait_for_pools(cluster, 2).await?;
    let covered: usize = pools
        .iter()
        .map(|pool| pool_addresses(pool).map(|set| set.len()))
        .sum::<anyhow::Result<usize>>()?;
    ensure!(
        covered == 156,
        "the 2 pools cover {covered} addresses, not 156"
    );
    wait_until_no_records(cluster, namespace).await?;
    eprintln!(
        "controller: Subnet 3→5→2 with 6→9→12→3 pods holding addresses: none lost or duplicated"
    );
    Ok(())
}

/// Waits until the Subnet's Ready condition reports `replicas` pools.
async fn wait_subnet_settled(cluster: &Cluster, replicas: usize) -> anyhow::Result<()> {
    let expected = format!("{replicas} pools serve 156 addresses");
    cluster
        .wait_for(&expected, TIMEOUT, || async {
            let subnet = kubectl_json(cluster, &["get", "subnet.virtnet.io", SUBNET])
                .map_err(|error| error.to_string())?;
            let message = subnet["status"]["conditions"][0]["message"].clone();
            if message == expected.as_str() {
                Ok(())
            } else {
                Err(format!("condition message {message}"))
            }
        })
        .await?;
    Ok(())
}

async fn wait_until_no_records(cluster: &Cluster, namespace: &str) -> anyhow::Result<()> {
    let prefix = format!("{namespace}/");
    cluster
        .wait_for(&format!("no records of {namespace}"), TIMEOUT, || async {
            let left: Vec<String> = held_by(cluster, &prefix)?.into_keys().collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("still held: {left:?}"))
            }
        })
        .await?;
    Ok(())
}

/// Pool records whose endpoint starts with `prefix`: endpoint → address.
fn held_by(cluster: &Cluster, prefix: &str) -> Result<BTreeMap<String, String>, String> {
    Ok(pool_records(cluster)
        .map_err(|error| error.to_string())?
        .into_iter()
        .filter_map(|(address, record)| {
            let endpoint = record["endpoint"].as_str()?;
            endpoint
                .starts_with(prefix)
                .then(|| (endpoint.to_owned(), address))
        })
        .collect())
}

/// Waits until the records of `endpoints` are gone; returns how long that took from `since`.
async fn wait_released(
    cluster: &Cluster,
    namespace: &str,
    endpoints: &[String],
    since: Instant,
) -> anyhow::Result<Duration> {
    let prefix = format!("{namespace}/");
    cluster
        .wait_for(&format!("{endpoints:?} released"), TIMEOUT, || async {
            let held = held_by(cluster, &prefix)?;
            let left: Vec<&String> = endpoints.iter().filter(|e| held.contains_key(*e)).collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("still held: {left:?}"))
            }
        })
        .await?;
    Ok(since.elapsed())
}

const STS_NAMESPACE: &str = "sts";

fn sts_endpoints(ordinals: std::ops::Range<usize>) -> Vec<String> {
    ordinals
        .map(|ordinal| format!("{STS_NAMESPACE}/sample-ss-{ordinal}"))
        .collect()
}

async fn statefulset_restart_and_scale_down(
    cluster: &Cluster,
    examples: &Path,
) -> anyhow::Result<()> {
    create_namespace(cluster, STS_NAMESPACE).await?;
    let manifest = examples.join("statefulset.yaml");
    cluster.kubectl(&[
        "apply",
        "-n",
        STS_NAMESPACE,
        "-f",
        &manifest.to_string_lossy(),
    ])?;
    let pods = wait_for_ready_pods(cluster, STS_NAMESPACE, "app=sample-ss", 5).await?;
    check_pools_and_pods(cluster, STS_NAMESPACE, &pods)?;
    let before = addresses_by_name(&pods)?;

    let restarted = Instant::now();
    cluster.kubectl(&[
        "rollout",
        "restart",
        "statefulset/sample-ss",
        "-n",
        STS_NAMESPACE,
    ])?;
    let old_uids: BTreeSet<String> = pods
        .iter()
        .filter_map(|pod| pod.metadata.uid.clone())
        .collect();
    let api: Api<Pod> = Api::namespaced(cluster.client(), STS_NAMESPACE);
    let pods = cluster
        .wait_for(
            "all 5 replicas restarted and Ready",
            Duration::from_secs(180),
            || async {
                let list = api
                    .list(&ListParams::default().labels("app=sample-ss"))
                    .await
                    .map_err(|error| error.to_string())?;
                let fresh = list
                    .items
                    .iter()
                    .filter(|pod| {
                        !old_uids.contains(pod.metadata.uid.as_deref().unwrap_or_default())
                            && crate::support::is_pod_ready(pod)
                    })
                    .count();
                if fresh == 5 && list.items.len() == 5 {
                    Ok(list.items)
                } else {
                    Err(format!("{fresh} of 5 restarted"))
                }
            },
        )
        .await?;
    let after = addresses_by_name(&pods)?;
    ensure!(
        before == after,
        "addresses changed across the restart: {before:?} → {after:?}"
    );
    check_pools_and_pods(cluster, STS_NAMESPACE, &pods)?;
    eprintln!(
        "controller: rollout restart of 5 replicas kept all 5 addresses ({:?})",
        restarted.elapsed()
    );

    let scaled = Instant::now();
    set_replicas(cluster, "statefulset/sample-ss", STS_NAMESPACE, 2)?;
    let latency = wait_released(cluster, STS_NAMESPACE, &sts_endpoints(2..5), scaled).await?;
    eprintln!("controller: StatefulSet 5→2 released 3 addresses {latency:?} after the scale call");
    let held = held_by(cluster, &format!("{STS_NAMESPACE}/")).map_err(anyhow::Error::msg)?;
    let expected: BTreeMap<String, String> = sts_endpoints(0..2)
        .into_iter()
        .map(|endpoint| {
            let name = endpoint.trim_start_matches("sts/").to_owned();
            (endpoint, before[&name].clone())
        })
        .collect();
    ensure!(
        held == expected,
        "after scaling to 2 the pools hold {held:?}, expected {expected:?}"
    );
    Ok(())
}

fn addresses_by_name(pods: &[Pod]) -> anyhow::Result<BTreeMap<String, String>> {
    pods.iter()
        .map(|pod| Ok((pod_name(pod).to_owned(), pod_ip(pod)?.to_string())))
        .collect()
}

/// Scales the StatefulSet back to 5, kills the controller right after asking for 2 again, and
/// restarts it once the 3 pods are gone: it must release exactly their addresses.
async fn controller_killed_during_a_scale_down(cluster: &mut Cluster) -> anyhow::Result<()> {
    set_replicas(cluster, "statefulset/sample-ss", STS_NAMESPACE, 5)?;
    let pods = wait_for_ready_pods(cluster, STS_NAMESPACE, "app=sample-ss", 5).await?;
    check_pools_and_pods(cluster, STS_NAMESPACE, &pods)?;
    let expected: BTreeMap<String, String> = held_by(cluster, "sts/sample-ss-")
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .filter(|(endpoint, _)| sts_endpoints(0..2).contains(endpoint))
        .collect();

    set_replicas(cluster, "statefulset/sample-ss", STS_NAMESPACE, 2)?;
    cluster.stop_component(CONTROLLER)?;
    wait_for_ready_pods(cluster, STS_NAMESPACE, "app=sample-ss", 2).await?;
    let held = held_by(cluster, "sts/").map_err(anyhow::Error::msg)?;
    ensure!(
        held.len() == 5,
        "without a controller nothing is released, but the pools hold {held:?}"
    );

    // The restarted controller never sees these pods. Were their Endpoints written less than
    // 5 s before its pod list, it could not tell them from pods its cache has not caught up with
    // and would wait out the orphan grace (30 s from their creation); a crashed controller is
    // rarely back that fast, so it comes back a little later, as it would.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let restarted = Instant::now();
    cluster.start_component(CONTROLLER, &[])?;
    let latency = wait_released(cluster, STS_NAMESPACE, &sts_endpoints(2..5), restarted).await?;
    eprintln!(
        "controller: restarted controller released the 3 scaled-down addresses {latency:?} after \
         its start"
    );
    let held = held_by(cluster, "sts/").map_err(anyhow::Error::msg)?;
    ensure!(
        held == expected,
        "after the restart the pools hold {held:?}, expected {expected:?}"
    );
    let pods = wait_for_ready_pods(cluster, STS_NAMESPACE, "app=sample-ss", 2).await?;
    check_pools_and_pods(cluster, STS_NAMESPACE, &pods)?;
    Ok(())
}

fn sweep_count(metrics: &str) -> anyhow::Result<u64> {
    Ok(metrics
        .lines()
        .find_map(|line| line.strip_prefix("virtnet_reconciles_total{controller=\"sweep\"} "))
        .context("no sweep counter in /metrics")?
        .trim()
        .parse()?)
}

/// The sweep ran every interval since `before` (its count then, and when); only existing pools
/// have gauges (the deleted Subnet's pools and the drained ones are gone from /metrics).
fn sweeps_and_pool_gauges(cluster: &Cluster, before: (u64, Instant)) -> anyhow::Result<()> {
    let metrics = cluster.controller_metrics()?;
    let sweeps = sweep_count(&metrics)? - before.0;
    let elapsed = before.1.elapsed();
    let expected = elapsed.as_secs_f64() / SWEEP_SECONDS as f64;
    eprintln!("controller: {sweeps} sweeps in {elapsed:?} at a {SWEEP_SECONDS} s interval");
    ensure!(
        (sweeps as f64 - expected).abs() <= 1.0,
        "{sweeps} sweeps in {elapsed:?}, expected about {expected:.1}"
    );
    let shown: BTreeSet<&str> = metrics
        .lines()
        .filter(|line| line.starts_with("virtnet_ippool_total_ips{"))
        .filter_map(|line| line.split("pool=\"").nth(1)?.split('"').next())
        .collect();
    ensure!(
        shown == BTreeSet::from(["subnet-0", "subnet-1"]),
        "pool gauges shown for {shown:?}, expected the 2 remaining pools"
    );
    Ok(())
}

/// `fixedIPRetention.statefulSet: false` (the env the chart gives the controller and the agents):
/// a deleted StatefulSet pod's address goes back like a Deployment pod's, and its replacement
/// holds whatever it got under its own UID.
async fn retention_switched_off(cluster: &mut Cluster, examples: &Path) -> anyhow::Result<()> {
    let off = [("VIRTNET_FIXED_IP_STATEFULSET", "false")];
    let agents: Vec<String> = cluster
        .node_names()
        .iter()
        .map(|node| format!("virtnet-agent-{node}"))
        .collect();
    for component in std::iter::once(CONTROLLER).chain(agents.iter().map(String::as_str)) {
        cluster.stop_component(component)?;
        cluster.start_component(component, &off)?;
    }
    let namespace = "nosticky";
    create_namespace(cluster, namespace).await?;
    let manifest = examples.join("statefulset.yaml");
    cluster.kubectl(&["apply", "-n", namespace, "-f", &manifest.to_string_lossy()])?;
    set_replicas(cluster, "statefulset/sample-ss", namespace, 2)?;
    let pods = wait_for_ready_pods(cluster, namespace, "app=sample-ss", 2).await?;
    check_pools_and_pods(cluster, namespace, &pods)?;
    let first = pods
        .iter()
        .find(|pod| pod_name(pod) == "sample-ss-0")
        .context("no sample-ss-0")?;
    let old_uid = first.metadata.uid.clone().context("no uid")?;
    let endpoint = kubectl_json(
        cluster,
        &[
            "get",
            "endpoints.virtnet.io",
            "-n",
            namespace,
            "sample-ss-0",
        ],
    )?;
    ensure!(
        endpoint["spec"]["sticky"] != true,
        "with retention off the Endpoint must not be sticky: {}",
        endpoint["spec"]
    );

    let deleted = Instant::now();
    let api: Api<Pod> = Api::namespaced(cluster.client(), namespace);
    // Not `kubectl delete`: its wait can mistake the recreated pod of that name for this one.
    api.delete("sample-ss-0", &DeleteParams::default()).await?;
    let latency = cluster
        .wait_for("sample-ss-0's old UID released", TIMEOUT, || async {
            let records = pool_records(cluster).map_err(|error| error.to_string())?;
            if records
                .iter()
                .any(|(_, record)| record["podUID"] == old_uid.as_str())
            {
                Err("the old pod's record is still there".to_owned())
            } else {
                Ok(deleted.elapsed())
            }
        })
        .await?;
    eprintln!(
        "controller: retention off: deleted StatefulSet pod's address released {latency:?} after the delete call"
    );
    let pods = cluster
        .wait_for("sample-ss-0 recreated and Ready", TIMEOUT, || async {
            let list = api
                .list(&ListParams::default().labels("app=sample-ss"))
                .await
                .map_err(|error| error.to_string())?;
            let fresh = list.items.iter().any(|pod| {
                pod_name(pod) == "sample-ss-0"
                    && pod.metadata.uid.as_deref() != Some(old_uid.as_str())
                    && crate::support::is_pod_ready(pod)
            });
            if fresh && list.items.len() == 2 {
                Ok(list.items)
            } else {
                Err("not yet".to_owned())
            }
        })
        .await?;
    check_pools_and_pods(cluster, namespace, &pods)?;
    cluster.kubectl(&["delete", "statefulset", "sample-ss", "-n", namespace])?;
    wait_until_no_records(cluster, namespace).await
}

/// Pods on a node whose kubelet is gone are force-deleted (no CNI DEL ever runs): the controller
/// returns their addresses.
/// Who holds the controllers' Lease.
fn lease_holder(cluster: &Cluster) -> anyhow::Result<String> {
    let lease = kubectl_json(cluster, &["get", "lease", LEASE, "-n", VIRTNET_NAMESPACE])?;
    Ok(lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

/// SIGKILLs the leader (`leader`, the component of that identity) and waits until `successor`
/// holds the Lease; returns how long that took. It must not take much more than the Lease's
/// duration: the successor renews its claim every few seconds.
async fn kill_leader(
    cluster: &mut Cluster,
    leader: &str,
    successor: &str,
) -> anyhow::Result<Duration> {
    ensure!(
        lease_holder(cluster)? == leader,
        "{leader} is not the leader before the kill: {} is",
        lease_holder(cluster)?
    );
    cluster.stop_component(leader)?;
    let killed = Instant::now();
    let takeover = Duration::from_secs(LEASE_SECONDS * 2);
    cluster
        .wait_for(
            &format!("{successor} to take the Lease"),
            takeover,
            || async {
                match lease_holder(cluster) {
                    Ok(holder) if holder == successor => Ok(()),
                    Ok(holder) => Err(format!("held by {holder:?}")),
                    Err(error) => Err(error.to_string()),
                }
            },
        )
        .await?;
    Ok(killed.elapsed())
}

/// A standby replica joins; Subnet 2 → 4 pools with pods in each, then 4 → 1, and the leader is
/// SIGKILLed as soon as the first pool drains: the standby takes the Lease and finishes the
/// resize (every draining pool's addresses handed over to the one pool that stays), with no pod's
/// address changed, lost or recorded twice. The killed replica comes back as the standby.
async fn leader_killed_during_a_resize(cluster: &mut Cluster) -> anyhow::Result<()> {
    cluster.start_replica(
        CONTROLLER,
        STANDBY,
        &[
            "--identity",
            STANDBY,
            "--http-address",
            "127.0.0.1:8081",
            "--webhook-address",
            "127.0.0.1:9444",
        ],
    )?;
    let namespace = "failover";
    create_namespace(cluster, namespace).await?;
    set_replicas(cluster, &format!("subnet.virtnet.io/{SUBNET}"), "", 4)?;
    wait_for_pools(cluster, 4).await?;
    wait_subnet_settled(cluster, 4).await?;
    create_deployment(cluster, namespace, "movers", 8).await?;
    let pods = wait_for_ready_pods(cluster, namespace, "app=movers", 8).await?;
    check_pools_and_pods(cluster, namespace, &pods)?;
    let held = addresses_by_name(&pods)?;

    set_replicas(cluster, &format!("subnet.virtnet.io/{SUBNET}"), "", 1)?;
    cluster
        .wait_for("a pool to start draining", TIMEOUT, || async {
            let pools = kubectl_json(cluster, &["get", "ippools.virtnet.io"])
                .map_err(|error| error.to_string())?;
            let draining = pools["items"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|pool| pool["spec"]["draining"] == true);
            if draining {
                Ok(())
            } else {
                Err("no pool drains yet".to_owned())
            }
        })
        .await?;
    let takeover = kill_leader(cluster, CONTROLLER, STANDBY).await?;
    let resumed = Instant::now();
    wait_for_pools(cluster, 1).await?;
    wait_subnet_settled(cluster, 1).await?;
    eprintln!(
        "controller: leader killed mid-resize; the standby took the Lease {takeover:?} after the \
         kill and left 1 pool {:?} later",
        resumed.elapsed()
    );
    let pods = wait_for_ready_pods(cluster, namespace, "app=movers", 8).await?;
    check_pools_and_pods(cluster, namespace, &pods)?;
    ensure!(
        addresses_by_name(&pods)? == held,
        "the resize changed a pod's address: {held:?}"
    );
    ping_ring(cluster, &pods)?;
    cluster.kubectl(&["delete", "deployment", "movers", "-n", namespace])?;
    wait_until_no_records(cluster, namespace).await?;
    cluster.start_component(CONTROLLER, &[])?;
    Ok(())
}

async fn pods_of_a_lost_node_are_reclaimed(cluster: &mut Cluster) -> anyhow::Result<()> {
    let namespace = "lost";
    create_namespace(cluster, namespace).await?;
    let node = cluster.node_names().last().cloned().context("no nodes")?;
    let api: Api<Pod> = Api::namespaced(cluster.client(), namespace);
    for name in ["lost-a", "lost-b"] {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": "lost"}},
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]},
        }))?;
        api.create(&PostParams::default(), &pod).await?;
    }
    let pods = wait_for_ready_pods(cluster, namespace, "app=lost", 2).await?;
    ensure!(pods.iter().all(|pod| node_name(pod) == Some(node.as_str())));
    check_pools_and_pods(cluster, namespace, &pods)?;
    cluster.stop_component(&format!("kubelet-{node}"))?;
    // The leader goes too: the pods' release is the successor's, once it holds the Lease.
    cluster.stop_component(STANDBY)?;
    let deleted = Instant::now();
    for pod in &pods {
        api.delete(pod_name(pod), &DeleteParams::default().grace_period(0))
            .await?;
    }
    let endpoints: Vec<String> = pods
        .iter()
        .map(|pod| format!("{namespace}/{}", pod_name(pod)))
        .collect();
    let latency = wait_released(cluster, namespace, &endpoints, deleted).await?;
    ensure!(
        lease_holder(cluster)? == CONTROLLER,
        "{CONTROLLER} did not take over from the killed leader"
    );
    eprintln!(
        "controller: pods force-deleted on a node without kubelet, the leader killed just before, \
         reclaimed by its successor {latency:?} after the delete calls"
    );
    Ok(())
}
