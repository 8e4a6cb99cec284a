//! Subnets that must not give a held address to a second holder, on a VirtNet cluster of its own
//! (suffix `h`) with the real controller, webhook and agents: a deleted Subnet waits for the pods
//! holding its addresses (and cannot be recreated meanwhile); an address a Subnet's spec dropped
//! but a pod still holds cannot go into another Subnet, through the webhook or past it; and of two
//! overlapping Subnets admitted at the same moment only the first gets pools.
use std::{net::IpAddr, time::Duration};

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams},
};
use serde_json::{Value, json};
use virtnet_e2e::{
    cluster::{Cluster, VirtnetOptions},
    topology::GATEWAY_V4,
};

use crate::{
    controller::{kubectl_refused, subnet_manifest, write_manifest},
    ipam::{apply_example_subnet, kubectl_json, pool_records},
    support::{
        Suite, create_namespace, install_kubevirt_crd, own_virtnet_cluster, ping_from_pod, pod_ip,
        run_on_own_cluster, wait_for_ready_pods,
    },
};

const SUBNET: &str = "subnet";
const NAMESPACE: &str = "held";
const TIMEOUT: Duration = Duration::from_secs(90);

pub fn subnets_never_give_a_held_address_to_a_second_holder(suite: &Suite) -> anyhow::Result<()> {
    let virtnet = VirtnetOptions::from_workspace();
    let example = virtnet.repo.join("examples/statefulset/subnet.yaml");
    let example = example.to_string_lossy().into_owned();
    run_on_own_cluster(suite, own_virtnet_cluster('d', virtnet), async |cluster| {
        create_namespace(cluster, NAMESPACE).await?;
        apply_example_subnet(cluster, &example).await?;
        a_deleted_subnet_waits_for_its_pods(cluster, &example).await?;
        apply_example_subnet(cluster, &example).await?;
        an_address_dropped_from_a_spec_stays_with_its_pod(cluster).await?;
        of_two_overlapping_subnets_only_the_first_gets_pools(cluster).await?;
        a_pod_labelled_as_a_vms_launcher_does_not_get_its_address(cluster).await
    })
}

/// A pause pod named `name` that takes an address from the default conflist's Subnet.
async fn start_holder(cluster: &Cluster, name: &str) -> anyhow::Result<Pod> {
    start_pod(cluster, name, json!({}), json!([])).await
}

/// A pause pod named `name` with extra `labels` and `owners` (ownerReferences).
async fn start_pod(
    cluster: &Cluster,
    name: &str,
    labels: Value,
    owners: Value,
) -> anyhow::Result<Pod> {
    let mut all_labels = json!({"holder": name});
    if let (Some(all), Value::Object(extra)) = (all_labels.as_object_mut(), labels) {
        all.extend(extra);
    }
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": all_labels, "ownerReferences": owners},
        "spec": {"containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]},
    }))?;
    Api::<Pod>::namespaced(cluster.client(), NAMESPACE)
        .create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("creating pod {name}"))?;
    let mut ready = wait_for_ready_pods(cluster, NAMESPACE, &format!("holder={name}"), 1).await?;
    Ok(ready.remove(0))
}

async fn delete_holder(cluster: &Cluster, name: &str) -> anyhow::Result<()> {
    Api::<Pod>::namespaced(cluster.client(), NAMESPACE)
        .delete(name, &DeleteParams::default())
        .await
        .with_context(|| format!("deleting pod {name}"))?;
    Ok(())
}

/// The Subnet's first condition as (reason, message), or `None` when the Subnet is gone.
fn subnet_condition(cluster: &Cluster, name: &str) -> Result<Option<(String, String)>, String> {
    let subnets =
        kubectl_json(cluster, &["get", "subnets.virtnet.io"]).map_err(|e| e.to_string())?;
    let Some(subnet) = subnets["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|subnet| subnet["metadata"]["name"] == name)
    else {
        return Ok(None);
    };
    let condition = &subnet["status"]["conditions"][0];
    Ok(Some((
        condition["reason"].as_str().unwrap_or_default().to_owned(),
        condition["message"].as_str().unwrap_or_default().to_owned(),
    )))
}

/// Waits until Subnet `name` shows a condition with `reason`; returns its message.
async fn wait_for_reason(cluster: &Cluster, name: &str, reason: &str) -> anyhow::Result<String> {
    Ok(cluster
        .wait_for(
            &format!("Subnet {name} showing {reason}"),
            TIMEOUT,
            || async {
                match subnet_condition(cluster, name)? {
                    Some((shown, message)) if shown == reason => Ok(message),
                    Some((shown, message)) => Err(format!("{shown}: {message}")),
                    None => Err(format!("Subnet {name} is gone")),
                }
            },
        )
        .await?)
}

/// The IPPools whose `spec.subnet` is `subnet`.
fn pools_of(cluster: &Cluster, subnet: &str) -> anyhow::Result<Vec<Value>> {
    let pools = kubectl_json(cluster, &["get", "ippools.virtnet.io"])?;
    Ok(pools["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|pool| pool["spec"]["subnet"] == subnet)
        .cloned()
        .collect())
}

/// Whether a pool record holds `address` for the pod `name` of this test's namespace.
fn recorded_for(cluster: &Cluster, address: IpAddr, name: &str) -> anyhow::Result<bool> {
    let endpoint = format!("{NAMESPACE}/{name}");
    Ok(pool_records(cluster)?.iter().any(|(recorded, record)| {
        *recorded == address.to_string() && record["endpoint"] == endpoint.as_str()
    }))
}

/// The note of an Event with `reason` about Subnet `name`, if there is one.
fn event_note(cluster: &Cluster, name: &str, reason: &str) -> anyhow::Result<Option<String>> {
    let events = kubectl_json(cluster, &["get", "events.events.k8s.io", "-A"])?;
    Ok(events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|event| {
            event["reason"] == reason
                && event["regarding"]["kind"] == "Subnet"
                && event["regarding"]["name"] == name
        })
        .map(|event| event["note"].as_str().unwrap_or_default().to_owned()))
}

/// Deleting a Subnet while a pod holds one of its addresses: the Subnet stays (finalizer), says
/// why in its status and an Event, its pools stay and stop allocating, the pod keeps its address
/// and its traffic; the same name cannot be created again meanwhile; once the pod is gone, the
/// Subnet and its pools go.
async fn a_deleted_subnet_waits_for_its_pods(
    cluster: &Cluster,
    example: &str,
) -> anyhow::Result<()> {
    let pod = start_holder(cluster, "holder").await?;
    let address = pod_ip(&pod)?;
    cluster.kubectl(&["delete", "subnet.virtnet.io", SUBNET, "--wait=false"])?;
    let message = wait_for_reason(cluster, SUBNET, "DeletionBlocked").await?;
    ensure!(
        message.contains(&format!("{address} ({NAMESPACE}/holder)")),
        "the DeletionBlocked condition does not name {address} of {NAMESPACE}/holder: {message}"
    );
    eprintln!("hardening: deleted Subnet waits: {message}");
    let note = cluster
        .wait_for("a DeletionBlocked Event", TIMEOUT, || async {
            event_note(cluster, SUBNET, "DeletionBlocked")
                .map_err(|error| error.to_string())?
                .ok_or_else(|| "no Event yet".to_owned())
        })
        .await?;
    ensure!(note.contains(&address.to_string()), "Event note: {note}");

    let pools = pools_of(cluster, SUBNET)?;
    ensure!(pools.len() == 3, "{} pools left, expected 3", pools.len());
    ensure!(
        pools.iter().all(|pool| pool["spec"]["draining"] == true),
        "a deleted Subnet's pools must all be draining"
    );
    ensure!(
        recorded_for(cluster, address, "holder")?,
        "the pool record of {address} is gone while the pod runs"
    );
    ping_from_pod(cluster, &pod, IpAddr::V4(GATEWAY_V4))?;
    kubectl_refused(cluster, &["create", "-f", example], "already exists")?;

    delete_holder(cluster, "holder").await?;
    cluster
        .wait_for("the deleted Subnet and its pools gone", TIMEOUT, || async {
            let subnet = subnet_condition(cluster, SUBNET)?;
            let pools = pools_of(cluster, SUBNET).map_err(|error| error.to_string())?;
            if subnet.is_none() && pools.is_empty() {
                Ok(())
            } else {
                Err(format!("Subnet {subnet:?}, {} pools", pools.len()))
            }
        })
        .await?;
    eprintln!("hardening: the Subnet went once its last pod released {address}");
    Ok(())
}

/// A Subnet's spec drops an address a pod still holds: its pool keeps it, and neither the
/// webhook nor (with the webhook out of the way) the controller lets another Subnet have it.
async fn an_address_dropped_from_a_spec_stays_with_its_pod(
    cluster: &Cluster,
) -> anyhow::Result<()> {
    let pod = start_holder(cluster, "keeper").await?;
    let address = pod_ip(&pod)?.to_string();
    let patch = json!({"spec": {"excludeIPs": [address]}}).to_string();
    cluster.kubectl(&[
        "patch",
        "subnet.virtnet.io",
        SUBNET,
        "--type=merge",
        "-p",
        &patch,
    ])?;
    let taker = write_subnet(
        cluster,
        "taker",
        json!({"subnet": "10.6.0.0/16", "gateway": "10.6.0.1", "ips": [address], "replicas": 1}),
    )?;
    kubectl_refused(
        cluster,
        &["create", "-f", &taker],
        &format!("would hand out {address} that Subnet \"subnet\" still holds in its IPPools"),
    )?;
    ensure!(
        recorded_for(cluster, pod_ip(&pod)?, "keeper")?,
        "the pool record of {address} is gone while the pod runs"
    );
    Ok(())
}

fn write_subnet(cluster: &Cluster, name: &str, spec: Value) -> anyhow::Result<String> {
    write_manifest(cluster, name, &subnet_manifest(name, spec))
}

/// Two overlapping Subnets that both passed admission (the webhook reviews each without the
/// other when they arrive together; here the webhook is out of the way so that both pass for
/// certain): the controller writes pools for the first it reconciles and none for the other,
/// which shows why. The Subnet holding the dropped-but-held address is left alone as well.
async fn of_two_overlapping_subnets_only_the_first_gets_pools(
    cluster: &Cluster,
) -> anyhow::Result<()> {
    cluster.kubectl(&[
        "delete",
        "validatingwebhookconfiguration",
        "virtnet-controller",
    ])?;
    let spec = json!({"subnet": "10.9.0.0/24", "ips": ["10.9.0.10-10.9.0.40"], "replicas": 2});
    let subnets: Api<DynamicObject> = Api::all_with(
        cluster.client(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("virtnet.io", "v1alpha1", "Subnet"),
            "subnets",
        ),
    );
    let subnet = |name: &str| -> anyhow::Result<DynamicObject> {
        Ok(serde_json::from_value(json!({
            "apiVersion": "virtnet.io/v1alpha1", "kind": "Subnet",
            "metadata": {"name": name}, "spec": spec,
        }))?)
    };
    let (first, second) = (subnet("race-a")?, subnet("race-b")?);
    let params = PostParams::default();
    let (a, b) = tokio::join!(
        subnets.create(&params, &first),
        subnets.create(&params, &second)
    );
    a.context("creating race-a")?;
    b.context("creating race-b")?;
    let (winner, loser) = cluster
        .wait_for(
            "one of race-a, race-b with pools, the other refused",
            TIMEOUT,
            || async {
                let reasons = [
                    subnet_condition(cluster, "race-a")?.unwrap_or_default().0,
                    subnet_condition(cluster, "race-b")?.unwrap_or_default().0,
                ];
                match reasons.each_ref().map(String::as_str) {
                    ["PoolsReady", "Overlaps"] => Ok(("race-a", "race-b")),
                    ["Overlaps", "PoolsReady"] => Ok(("race-b", "race-a")),
                    _ => Err(format!("race-a, race-b: {reasons:?}")),
                }
            },
        )
        .await?;
    // Give the loser a few reconciles to prove it stays without pools.
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        pools_of(cluster, loser)?.is_empty(),
        "{loser} got pools although {winner}'s pools hold its addresses"
    );
    ensure!(
        pools_of(cluster, winner)?.len() == 2,
        "{winner} has no 2 pools"
    );
    let (_, message) = subnet_condition(cluster, loser)
        .map_err(anyhow::Error::msg)?
        .context("the refused Subnet is gone")?;
    eprintln!("hardening: {loser} refused: {message}");

    let held = pool_records(cluster)?
        .into_iter()
        .find(|(_, record)| record["endpoint"] == format!("{NAMESPACE}/keeper").as_str())
        .context("keeper's record")?
        .0;
    let taker = write_subnet(
        cluster,
        "taker",
        json!({"subnet": "10.6.0.0/16", "gateway": "10.6.0.1", "ips": [held], "replicas": 1}),
    )?;
    cluster.kubectl(&["create", "-f", &taker])?;
    let message = wait_for_reason(cluster, "taker", "Overlaps").await?;
    ensure!(message.contains(&held), "{message}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        pools_of(cluster, "taker")?.is_empty(),
        "taker got a pool with {held}, which keeper holds in Subnet subnet"
    );
    Ok(())
}

/// A VM's launcher pod (owned by its VirtualMachineInstance) holds the VM's address; another pod
/// that only carries KubeVirt's launcher labels for that VM gets an address of its own (before,
/// the labels made it the VM and it was answered the VM's address, held by the launcher).
async fn a_pod_labelled_as_a_vms_launcher_does_not_get_its_address(
    cluster: &Cluster,
) -> anyhow::Result<()> {
    install_kubevirt_crd(cluster, "VirtualMachineInstance", "virtualmachineinstances").await?;
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachineInstance"),
        "virtualmachineinstances",
    );
    let vmis: Api<DynamicObject> = Api::namespaced_with(cluster.client(), NAMESPACE, &resource);
    let vmi: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": "vm1"},
        "spec": {
            "domain": {"devices": {"interfaces": [{"name": "default", "binding": {"name": "passt"}}]}},
            "networks": [{"name": "default", "pod": {}}],
        },
    }))?;
    let vmi = vmis.create(&PostParams::default(), &vmi).await?;
    let uid = vmi.metadata.uid.context("the VMI has no uid")?;
    let launcher_labels = json!({"kubevirt.io": "virt-launcher", "vm.kubevirt.io/name": "vm1"});
    let launcher = start_pod(
        cluster,
        "virt-launcher-vm1-x7k2p",
        launcher_labels.clone(),
        json!([{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                "name": "vm1", "uid": uid, "controller": true}]),
    )
    .await?;
    let vm_address = pod_ip(&launcher)?;
    let imposter = start_pod(cluster, "imposter", launcher_labels, json!([])).await?;
    let address = pod_ip(&imposter)?;
    ensure!(
        address != vm_address,
        "a pod with only the launcher labels got VM vm1's address {vm_address}"
    );
    ensure!(
        recorded_for(cluster, address, "imposter")?,
        "{address} is not recorded for the imposter pod's own Endpoint"
    );
    eprintln!("hardening: VM vm1 keeps {vm_address}; the labelled imposter got {address}");
    Ok(())
}
