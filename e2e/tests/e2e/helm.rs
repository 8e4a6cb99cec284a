//! VirtNet installed as users install it, on real nodes (kubelet + containerd + runc): `make
//! image`'s image imported into each node's containerd, the chart installed with helm. The agent
//! is the DaemonSet's pod and the controller the Deployment's, each with its ServiceAccount token,
//! so the chart's RBAC, probes, tolerations and hostPath mounts are what runs. Pods get their
//! addresses through containerd → macvlan → virtnet-ipam → virtnet-coordinator, and talk on the
//! wire (ping, TCP, a ClusterIP through kube-proxy); `helm upgrade` to a new image tag keeps the
//! held addresses and a running pod's connectivity; a pod deleted with kubectl has its address
//! released by containerd's CNI DEL; `helm uninstall` leaves the nodes' other CNI files alone.
use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::Duration,
};

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use serde_json::json;
use virtnet_e2e::cluster::{
    Cluster, HelmInstall, NodeDirs, TestImages, VIRTNET_NAMESPACE as NAMESPACE,
    VIRTNET_RELEASE as RELEASE, VirtnetOptions, default_bin_dir,
};

use crate::{
    ipam::{apply_example_subnet, kubectl_json, pool_records},
    support::{
        Suite, create_namespace, own_virtnet_cluster, pod_ip, pod_name, run_on_own_cluster,
        wait_for_ready_pods,
    },
};

const TEST_NAMESPACE: &str = "helm";
const UPGRADE_TAG: &str = "e2e-upgrade";
const HTTP_PORT: u16 = 8080;
/// What the server pod answers.
const GREETING: &str = "served-by-virtnet";
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(180);
const RELEASE_TIMEOUT: Duration = Duration::from_secs(60);

pub fn helm_installed_virtnet_wires_real_node_pods_and_keeps_their_addresses_across_an_upgrade(
    suite: &Suite,
) -> anyhow::Result<()> {
    let virtnet = VirtnetOptions::helm_from_workspace();
    let subnet = virtnet.repo.join("examples/statefulset/subnet.yaml");
    let chart = virtnet.repo.join("chart");
    let helm = virtnet
        .helm
        .clone()
        .context("helm_from_workspace sets helm")?;
    let mut options = own_virtnet_cluster('h', virtnet);
    options.nodes = 2;
    options.real_nodes = true;
    run_on_own_cluster(suite, options, async |cluster| {
        scenario(cluster, &subnet.to_string_lossy(), &chart, &helm).await
    })
}

async fn scenario(
    cluster: &mut Cluster,
    subnet: &str,
    chart: &Path,
    helm: &HelmInstall,
) -> anyhow::Result<()> {
    let nodes = cluster.node_names();
    ensure_chart_pods(cluster, &helm.image(), nodes.len()).await?;
    let before_uninstall: Vec<BTreeMap<String, Vec<u8>>> = nodes
        .iter()
        .map(|node| other_cni_files(&cluster.layout().node_dirs(node)))
        .collect::<anyhow::Result<_>>()?;

    apply_example_subnet(cluster, subnet).await?;
    create_namespace(cluster, TEST_NAMESPACE).await?;
    let images = TestImages::installed(&default_bin_dir())?;
    let server = start_pod(cluster, &images, "server", &nodes[0], &server_command()).await?;
    let client = start_pod(cluster, &images, "client", &nodes[1], "sleep 3600").await?;
    let service_ip = create_service(cluster).await?;
    let server_ip = pod_ip(&server)?;
    let client_ip = pod_ip(&client)?;
    let example_range = "10.6.153.100".parse::<IpAddr>()?..="10.6.153.255".parse::<IpAddr>()?;
    ensure!(
        example_range.contains(&server_ip) && example_range.contains(&client_ip),
        "pods got {server_ip} and {client_ip}, not addresses of the example Subnet"
    );
    ensure_wire(cluster, &client, server_ip, &service_ip).context("after helm install")?;
    agents_write_only_their_own_nodes_endpoints(cluster, &nodes).await?;
    inspect_shows_the_server(cluster, server_ip)?;
    let held_before = held_addresses(cluster)?;

    // The same image under a new tag, as a release would push it.
    cluster.tag_image(&helm.image(), &format!("{}:{UPGRADE_TAG}", helm.repository))?;
    let notes = cluster.helm(&[
        "upgrade",
        RELEASE,
        &chart.to_string_lossy(),
        "--namespace",
        NAMESPACE,
        "--reuse-values",
        "--set",
        &format!("image.tag={UPGRADE_TAG}"),
        "--wait",
        "--timeout",
        "180s",
    ])?;
    ensure_chart_pods(
        cluster,
        &format!("{}:{UPGRADE_TAG}", helm.repository),
        nodes.len(),
    )
    .await
    .context("after helm upgrade")?;
    let held_after = held_addresses(cluster)?;
    ensure!(
        held_after == held_before,
        "helm upgrade changed the held addresses: {held_before:?} became {held_after:?}"
    );
    ensure_wire(cluster, &client, server_ip, &service_ip).context("after helm upgrade")?;
    for stays in ["CRDs", "addresses"] {
        ensure!(
            notes.contains(stays),
            "the chart's NOTES do not say what stays after uninstall ({stays}):\n{notes}"
        );
    }

    // containerd's CNI DEL, served by the upgraded agent, releases the address.
    cluster.kubectl(&[
        "delete",
        "pod",
        "client",
        "--namespace",
        TEST_NAMESPACE,
        "--timeout=90s",
    ])?;
    let holder = format!("{TEST_NAMESPACE}/client");
    cluster
        .wait_for(
            "the deleted pod's address back in its pool",
            RELEASE_TIMEOUT,
            || async {
                let records = pool_records(cluster).map_err(|error| error.to_string())?;
                let held: Vec<&String> = records
                    .iter()
                    .filter(|(_, record)| record["endpoint"] == holder.as_str())
                    .map(|(address, _)| address)
                    .collect();
                if held.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{holder} still holds {held:?}"))
                }
            },
        )
        .await?;

    cluster.helm(&["uninstall", RELEASE, "--namespace", NAMESPACE, "--wait"])?;
    for (node, before) in nodes.iter().zip(&before_uninstall) {
        let after = other_cni_files(&cluster.layout().node_dirs(node))?;
        ensure!(
            &after == before,
            "helm uninstall changed node {node}'s other CNI files: {:?} became {:?}",
            before.keys().collect::<Vec<_>>(),
            after.keys().collect::<Vec<_>>()
        );
    }
    Ok(())
}

/// `virtnet inspect` on the cluster: the server pod's address is listed with its holder, and
/// `inspect pod` shows it with its pool and a default route.
fn inspect_shows_the_server(cluster: &Cluster, server_ip: IpAddr) -> anyhow::Result<()> {
    let virtnet = VirtnetOptions::from_workspace().binaries.join("virtnet");
    let inspect = |args: &[&str]| -> anyhow::Result<serde_json::Value> {
        let output = std::process::Command::new(&virtnet)
            .arg("inspect")
            .args(args)
            .args(["-o", "json"])
            .env("KUBECONFIG", cluster.kubeconfig())
            .output()?;
        ensure!(
            output.status.success(),
            "virtnet inspect {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(serde_json::from_slice(&output.stdout)?)
    };
    let holder = format!("{TEST_NAMESPACE}/server");
    let overview = inspect(&[])?;
    let listed = overview["holders"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|entry| {
            entry["address"] == server_ip.to_string() && entry["endpoint"] == holder.as_str()
        });
    ensure!(
        listed,
        "virtnet inspect does not list {server_ip} for {holder}: {overview}"
    );
    let report = inspect(&["pod", &holder])?;
    let interface = &report["interfaces"][0];
    ensure!(
        interface["address"]
            .as_str()
            .is_some_and(|address| address.starts_with(&format!("{server_ip}/")))
            && interface["pool"]
                .as_str()
                .is_some_and(|pool| !pool.is_empty())
            && interface["routes"][0]["dst"] == "0.0.0.0/0",
        "virtnet inspect pod {holder}: {report}"
    );
    Ok(())
}

/// With the token of the agent pod on `nodes[0]` (bound to that pod, so it names its node), an
/// Endpoint of `nodes[0]` can be created and deleted, while one of `nodes[1]` can be neither
/// created nor deleted: the chart's admission policy keeps each agent to its own node.
async fn agents_write_only_their_own_nodes_endpoints(
    cluster: &Cluster,
    nodes: &[String],
) -> anyhow::Result<()> {
    let agents = Api::<Pod>::namespaced(cluster.client(), NAMESPACE)
        .list(&ListParams::default().labels("app.kubernetes.io/name=virtnet-agent"))
        .await?;
    let agent = agents
        .items
        .iter()
        .find(|pod| pod.spec.as_ref().and_then(|spec| spec.node_name.as_deref()) == Some(&nodes[0]))
        .with_context(|| format!("no agent pod on {}", nodes[0]))?;
    let token = cluster.kubectl(&[
        "create",
        "token",
        "virtnet-agent",
        "--namespace",
        NAMESPACE,
        "--bound-object-kind",
        "Pod",
        "--bound-object-name",
        pod_name(agent),
        "--bound-object-uid",
        agent.metadata.uid.as_deref().unwrap_or_default(),
    ])?;
    let admin: serde_json::Value = serde_json::from_slice(&fs::read(cluster.kubeconfig())?)?;
    let server = &admin["clusters"][0]["cluster"];
    let as_agent = |args: &[&str]| -> anyhow::Result<String> {
        let output = std::process::Command::new(default_bin_dir().join("kubectl"))
            .args(["--kubeconfig", "/dev/null", "--token", token.trim()])
            .args(["--server", server["server"].as_str().unwrap_or_default()])
            .args(["--certificate-authority"])
            .arg(server["certificate-authority"].as_str().unwrap_or_default())
            .args(args)
            .output()?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr))
    };
    let endpoint = |name: &str, node: &str| {
        json!({
            "apiVersion": "virtnet.io/v1alpha1", "kind": "Endpoint",
            "metadata": {"name": name, "namespace": TEST_NAMESPACE},
            "spec": {"interfaces": [{"interface": "eth0", "ipv4": "10.6.200.1/16"}],
                     "ownerKind": "Pod", "ownerName": name, "node": node,
                     "podUID": "scope-test", "containerID": "scope-test"},
        })
    };
    let file = tempfile::NamedTempFile::new()?;
    let refusal = "may only write Endpoints of its own node";
    for (name, node, allowed) in [
        ("own-node", &nodes[0], true),
        ("other-node", &nodes[1], false),
    ] {
        fs::write(file.path(), endpoint(name, node).to_string())?;
        let path = file.path().to_string_lossy();
        let created = as_agent(&["create", "-f", &path])?;
        ensure!(
            created.contains(refusal) != allowed,
            "the agent of {} creating an Endpoint of {node}: {created}",
            nodes[0]
        );
        if !allowed {
            cluster.kubectl(&["create", "-f", &path])?;
        }
        let deleted = as_agent(&["delete", "endpoints.virtnet.io", name, "-n", TEST_NAMESPACE])?;
        ensure!(
            deleted.contains(refusal) != allowed,
            "the agent of {} deleting an Endpoint of {node}: {deleted}",
            nodes[0]
        );
    }
    cluster.kubectl(&[
        "delete",
        "endpoints.virtnet.io",
        "other-node",
        "-n",
        TEST_NAMESPACE,
        "--ignore-not-found",
    ])?;
    // A status patch straight to the API, as the agent sends it (kubectl patch reads the object
    // first, which the agent's role does not allow).
    let patch_status_as_agent = |pool: &str, body: &str| -> anyhow::Result<String> {
        let url = format!(
            "{}/apis/virtnet.io/v1alpha1/ippools/{pool}/status",
            server["server"].as_str().unwrap_or_default()
        );
        let output = std::process::Command::new("curl")
            .args(["-sS", "-X", "PATCH", "--cacert"])
            .arg(server["certificate-authority"].as_str().unwrap_or_default())
            .args(["-H", &format!("Authorization: Bearer {}", token.trim())])
            .args(["-H", "Content-Type: application/merge-patch+json"])
            .args(["--data", body, &url])
            .output()?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr))
    };
    agents_change_only_their_own_nodes_pool_records(cluster, nodes, &patch_status_as_agent)
}

/// The same agent may add and remove an IPPool record naming its node, not one naming another
/// node (the record is added by the admin to test its removal).
fn agents_change_only_their_own_nodes_pool_records(
    cluster: &Cluster,
    nodes: &[String],
    patch_status_as_agent: &dyn Fn(&str, &str) -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    let (pool, address) = free_pool_address(cluster)?;
    let record = |node: Option<&str>| {
        let record = node.map(|node| {
            json!({"endpoint": format!("{TEST_NAMESPACE}/scope-test"), "interface": "eth0",
                   "podUID": "scope-test", "containerID": "scope-test", "node": node})
        });
        json!({"status": {"allocations": {&address: record}}}).to_string()
    };
    let (own, other, removal) = (
        record(Some(&nodes[0])),
        record(Some(&nodes[1])),
        record(None),
    );
    let added = "may only add or change IPPool records of its own node";
    let removed = "may only remove IPPool records of its own node";
    let written = |answer: &str| {
        serde_json::from_str::<serde_json::Value>(answer)
            .is_ok_and(|object| object["kind"] == "IPPool")
    };
    for (what, body, refusal, allowed) in [
        ("adding its own node's record", &own, added, true),
        ("removing it", &removal, removed, true),
        ("adding another node's record", &other, added, false),
    ] {
        let answer = patch_status_as_agent(&pool, body)?;
        ensure!(
            answer.contains(refusal) != allowed && written(&answer) == allowed,
            "the agent of {} {what} in {pool}: {answer}",
            nodes[0]
        );
    }
    let as_admin = |body: &str| {
        cluster.kubectl(&[
            "patch",
            "ippools.virtnet.io",
            &pool,
            "--subresource=status",
            "--type=merge",
            "-p",
            body,
        ])
    };
    as_admin(&other)?;
    let answer = patch_status_as_agent(&pool, &removal)?;
    as_admin(&removal)?;
    ensure!(
        answer.contains(removed),
        "the agent of {} removing another node's record in {pool}: {answer}",
        nodes[0]
    );
    Ok(())
}

/// An IPPool and an address of its range that no record holds.
pub(crate) fn free_pool_address(cluster: &Cluster) -> anyhow::Result<(String, String)> {
    let pools = kubectl_json(cluster, &["get", "ippools.virtnet.io"])?;
    for pool in pools["items"].as_array().into_iter().flatten() {
        let held = &pool["status"]["allocations"];
        for range in pool["spec"]["ips"].as_array().into_iter().flatten() {
            let range = range.as_str().unwrap_or_default();
            let (first, last) = range.split_once('-').unwrap_or((range, range));
            let (first, last): (Ipv4Addr, Ipv4Addr) = (first.parse()?, last.parse()?);
            if let Some(free) = (u32::from(first)..=u32::from(last))
                .map(|address| Ipv4Addr::from(address).to_string())
                .find(|address| held.get(address).is_none())
            {
                let name = pool["metadata"]["name"].as_str().unwrap_or_default();
                return Ok((name.to_owned(), free));
            }
        }
    }
    anyhow::bail!("no IPPool has a free address")
}

/// One agent pod per node and the controller pod, all Ready, running `image` as their
/// ServiceAccounts; the controller on the host network (default-CNI mode).
async fn ensure_chart_pods(cluster: &Cluster, image: &str, nodes: usize) -> anyhow::Result<()> {
    for (component, count) in [("agent", nodes), ("controller", 1)] {
        let selector = format!("app.kubernetes.io/name=virtnet-{component}");
        let pods = cluster
            .wait_for(
                &format!("{count} Ready virtnet-{component} pods running {image}"),
                ROLLOUT_TIMEOUT,
                || async {
                    let list = Api::<Pod>::namespaced(cluster.client(), NAMESPACE)
                        .list(&ListParams::default().labels(&selector))
                        .await
                        .map_err(|error| error.to_string())?;
                    let current: Vec<&Pod> = list
                        .items
                        .iter()
                        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
                        .filter(|pod| pod_image(pod) == Some(image))
                        .filter(|pod| virtnet_e2e::cluster::is_pod_ready(pod))
                        .collect();
                    if current.len() == count && list.items.len() == count {
                        Ok(list.items.clone())
                    } else {
                        Err(format!(
                            "{} pods, {} Ready with the image",
                            list.items.len(),
                            current.len()
                        ))
                    }
                },
            )
            .await?;
        for pod in &pods {
            let spec = pod.spec.as_ref().context("pod without spec")?;
            ensure!(
                spec.service_account_name.as_deref() == Some(&format!("virtnet-{component}"))
                    && spec.host_network == Some(true),
                "pod {} runs as {:?}, hostNetwork {:?}",
                pod_name(pod),
                spec.service_account_name,
                spec.host_network
            );
        }
    }
    Ok(())
}

fn pod_image(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.containers.first()?.image.as_deref()
}

/// busybox's httpd answering [`GREETING`] on [`HTTP_PORT`].
fn server_command() -> String {
    format!(
        "mkdir -p /tmp/www && echo {GREETING} >/tmp/www/index.html && \
         exec httpd -f -p {HTTP_PORT} -h /tmp/www"
    )
}

/// A busybox pod on `node` running `command`, Ready.
async fn start_pod(
    cluster: &Cluster,
    images: &TestImages,
    name: &str,
    node: &str,
    command: &str,
) -> anyhow::Result<Pod> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": name, "labels": { "app": name } },
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main",
                "image": images.busybox,
                "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", command],
            }],
        },
    }))?;
    Api::<Pod>::namespaced(cluster.client(), TEST_NAMESPACE)
        .create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("creating pod {name}"))?;
    let mut ready = wait_for_ready_pods(cluster, TEST_NAMESPACE, &format!("app={name}"), 1).await?;
    ready.pop().context("no pod")
}

/// A ClusterIP Service in front of the server pod; returns its ClusterIP.
async fn create_service(cluster: &Cluster) -> anyhow::Result<String> {
    let service: Service = serde_json::from_value(json!({
        "metadata": { "name": "server" },
        "spec": {
            "selector": { "app": "server" },
            "ports": [{ "port": HTTP_PORT, "targetPort": HTTP_PORT }],
        },
    }))?;
    let created = Api::<Service>::namespaced(cluster.client(), TEST_NAMESPACE)
        .create(&PostParams::default(), &service)
        .await
        .context("creating the server Service")?;
    created
        .spec
        .and_then(|spec| spec.cluster_ip)
        .context("the Service has no ClusterIP")
}

/// From the client pod: ping the server, fetch from it over TCP directly and through the
/// Service's ClusterIP (kube-proxy on the client's node).
fn ensure_wire(
    cluster: &Cluster,
    client: &Pod,
    server: IpAddr,
    service_ip: &str,
) -> anyhow::Result<()> {
    let server = server.to_string();
    cluster
        .exec_in_pod(client, &["ping", "-c", "3", "-W", "5", &server])
        .with_context(|| format!("ping {server} from the client pod"))?;
    for target in [server.as_str(), service_ip] {
        let url = format!("http://{target}:{HTTP_PORT}/");
        // kube-proxy may still be programming the new Service's rules: a few tries.
        let mut last = String::new();
        for _ in 0..20 {
            // busybox's `wget -T` crashes: the timeout is busybox's own `timeout`.
            let get = ["timeout", "5", "wget", "-q", "-O", "-", &url];
            match cluster.exec_in_pod(client, &get) {
                Ok(body) if body.trim() == GREETING => {
                    last.clear();
                    break;
                }
                Ok(body) => last = format!("answered {body:?}"),
                Err(error) => last = error.to_string(),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        ensure!(last.is_empty(), "GET {url} from the client pod: {last}");
    }
    Ok(())
}

/// Which address each holder keeps, from every IPPool's allocations.
fn held_addresses(cluster: &Cluster) -> anyhow::Result<BTreeMap<String, String>> {
    let endpoints = kubectl_json(cluster, &["get", "endpoints.virtnet.io", "-A"])?;
    ensure!(
        endpoints["items"]
            .as_array()
            .is_some_and(|items| !items.is_empty()),
        "no Endpoints recorded"
    );
    Ok(pool_records(cluster)?
        .into_iter()
        .map(|(address, record)| {
            (
                record["endpoint"].as_str().unwrap_or_default().to_owned(),
                address,
            )
        })
        .collect())
}

/// Every file of the node's CNI directories that is not VirtNet's, with its content (a plugin
/// link's content is its target).
fn other_cni_files(dirs: &NodeDirs) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let mut files = BTreeMap::new();
    for dir in [&dirs.cni_conf, &dirs.cni_bin] {
        for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.starts_with("virtnet") || name.contains("virtnet.conflist") {
                continue;
            }
            let content = match fs::read_link(&path) {
                Ok(target) => target.to_string_lossy().into_owned().into_bytes(),
                Err(_) => fs::read(&path)?,
            };
            files.insert(path.display().to_string(), content);
        }
    }
    Ok(files)
}
