//! What the tests share: the suite's cluster and runtime, and helpers over pods and namespaces.
use std::{
    collections::BTreeSet,
    future::Future,
    net::IpAddr,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use anyhow::Context;
use k8s_openapi::{
    api::core::v1::{Namespace, Pod},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams},
};
use tokio::runtime::Runtime;
use virtnet_e2e::cluster::{Cluster, ClusterOptions, VirtnetOptions};

/// How long pods may take from creation to Ready: scheduling, CNI ADD, status report.
pub const POD_READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The running cluster every test uses, and the runtime its client lives on.
pub struct Suite {
    pub runtime: Runtime,
    pub cluster: Cluster,
}

impl Suite {
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }
}

/// Options of a VirtNet cluster of a test's own (the suite's cluster keeps the bootstrap network
/// for the other tests), named after the suite's cluster plus `suffix`: one letter per test, so
/// that tests running side by side never share a cluster. A second test taking a letter already
/// taken in this run fails at once (two tests on one cluster name tear each other's cluster
/// down, and only when they happen to overlap).
pub fn own_virtnet_cluster(suffix: char, virtnet: VirtnetOptions) -> ClusterOptions {
    static TAKEN: Mutex<BTreeSet<char>> = Mutex::new(BTreeSet::new());
    let newly_taken = TAKEN
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(suffix);
    assert!(
        newly_taken,
        "cluster suffix {suffix:?} is already another test's: give this test a letter of its own"
    );
    let name: String = crate::cluster_name()
        .chars()
        .take(7)
        .chain([suffix])
        .collect();
    let mut options = ClusterOptions::new(name, env!("CARGO_BIN_EXE_virtnet-e2e"));
    options.virtnet = Some(virtnet);
    options
}

/// Brings up the cluster `options` describe, runs `scenario` on it, prints the component logs if
/// it failed and tears the cluster down either way.
pub fn run_on_own_cluster(
    suite: &Suite,
    options: ClusterOptions,
    scenario: impl AsyncFnOnce(&mut Cluster) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    suite.block_on(async {
        let mut cluster = Cluster::up(options).await?;
        let result = scenario(&mut cluster).await;
        if result.is_err() {
            eprintln!("{}", cluster.dump_logs());
        }
        cluster.down()?;
        result
    })
}

/// Installs a KubeVirt CRD (`kind`, plural `plural`, group kubevirt.io, v1) with a minimal schema
/// that keeps every field: VirtNet reads only what KubeVirt's own schema has too.
pub async fn install_kubevirt_crd(
    cluster: &Cluster,
    kind: &str,
    plural: &str,
) -> anyhow::Result<()> {
    install_crd(cluster, "kubevirt.io", "v1", kind, plural).await
}

/// Installs the CRD of `kind` (`plural.group`, served at `version`) with a minimal schema that
/// keeps every field, for kinds of other projects whose own CRDs the harness does not install.
pub async fn install_crd(
    cluster: &Cluster,
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
) -> anyhow::Result<()> {
    let name = format!("{plural}.{group}");
    let crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
        "metadata": { "name": name },
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": { "kind": kind, "plural": plural, "singular": kind.to_lowercase() },
            "versions": [{
                "name": version, "served": true, "storage": true,
                "schema": { "openAPIV3Schema": {
                    "type": "object", "x-kubernetes-preserve-unknown-fields": true,
                } },
            }],
        },
    }))?;
    Api::<CustomResourceDefinition>::all(cluster.client())
        .create(&PostParams::default(), &crd)
        .await
        .with_context(|| format!("creating the {kind} CRD"))?;
    cluster.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        &format!("crd/{name}"),
    ])?;
    Ok(())
}

/// Creates namespace `name`, so each test's objects are apart and deleted together.
pub async fn create_namespace(cluster: &Cluster, name: &str) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(cluster.client());
    let namespace: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": { "name": name },
    }))?;
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(())
}

/// Deletes namespace `name`; the namespace controller removes what is in it.
pub async fn delete_namespace(cluster: &Cluster, name: &str) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(cluster.client());
    namespaces
        .delete(name, &DeleteParams::default())
        .await
        .with_context(|| format!("deleting namespace {name}"))?;
    Ok(())
}

pub use virtnet_e2e::cluster::is_pod_ready;

pub fn pod_name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or("<unnamed>")
}

pub fn pod_ip(pod: &Pod) -> anyhow::Result<IpAddr> {
    let ip = pod
        .status
        .as_ref()
        .and_then(|status| status.pod_ip.as_deref())
        .with_context(|| format!("pod {} has no status.podIP", pod_name(pod)))?;
    ip.parse()
        .with_context(|| format!("pod {} has podIP {ip:?}", pod_name(pod)))
}

pub fn node_name(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref().and_then(|spec| spec.node_name.as_deref())
}

/// Waits until exactly `count` pods match `selector` in `namespace`, all Ready, and returns them.
pub async fn wait_for_ready_pods(
    cluster: &Cluster,
    namespace: &str,
    selector: &str,
    count: usize,
) -> anyhow::Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(cluster.client(), namespace);
    let list_params = ListParams::default().labels(selector);
    let what = format!("{count} Ready pods {selector} in {namespace}");
    let ready = cluster
        .wait_for(&what, POD_READY_TIMEOUT, || async {
            let list = pods
                .list(&list_params)
                .await
                .map_err(|error| error.to_string())?;
            let not_ready: Vec<&str> = list
                .items
                .iter()
                .filter(|pod| !is_pod_ready(pod))
                .map(pod_name)
                .collect();
            if list.items.len() == count && not_ready.is_empty() {
                Ok(list.items)
            } else {
                Err(format!(
                    "{} pods, not Ready: [{}]",
                    list.items.len(),
                    not_ready.join(", ")
                ))
            }
        })
        .await?;
    Ok(ready)
}

/// The addresses on `interface` inside the pod's netns, from `ip -j addr`.
pub fn pod_interface_addresses(
    cluster: &Cluster,
    pod: &Pod,
    interface: &str,
) -> anyhow::Result<Vec<IpAddr>> {
    let json = cluster.exec_in_pod_netns(pod, &["ip", "-j", "addr", "show", "dev", interface])?;
    let links: serde_json::Value = serde_json::from_str(&json)
        .with_context(|| format!("parsing `ip -j addr` output {json:?}"))?;
    Ok(links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|link| link["addr_info"].as_array())
        .flatten()
        .filter_map(|address| address["local"].as_str()?.parse().ok())
        .collect())
}

/// Pings `target` from inside the pod's netns. ping exits 0 once any of the three echoes is
/// answered (the first may be spent on ARP) and non-zero if none is within 5 s.
pub fn ping_from_pod(cluster: &Cluster, pod: &Pod, target: IpAddr) -> anyhow::Result<()> {
    let target = target.to_string();
    cluster
        .exec_in_pod_netns(pod, &["ping", "-c", "3", "-i", "0.2", "-w", "5", &target])
        .with_context(|| format!("ping {target} from pod {}", pod_name(pod)))?;
    Ok(())
}
