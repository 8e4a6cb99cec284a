//! virtnet-coordinator on a VirtNet cluster (the default conflist: macvlan + virtnet-ipam +
//! virtnet-coordinator as every node's default network), proven on the wire:
//!
//! - a pod reaches its own node (ping, and TCP to a listener in the node's netns), and the node
//!   reaches the pod (TCP to its port, what a kubelet probe does) — which macvlan alone cannot;
//! - a pod reaches a ClusterIP Service whose pods run on other nodes, through the real kube-proxy
//!   (nftables) of its node; the coordinator learnt the Service CIDR from the agent, which read
//!   the cluster's ServiceCIDR object (the conflist names none);
//! - a virt-launcher pod whose VirtualMachineInstance uses the passt binding gets its address and
//!   keeps its default route on the underlay NIC; one with the bridge binding is refused with
//!   a message saying why, and leaves no host veth behind;
//! - with `detectIPConflict` on, a pod asking for an address another underlay host holds is
//!   refused, naming the address and the holder's MAC, before anything changes on the node;
//! - a chain whose IPAM is not virtnet-ipam (the reference `static` plugin, giving a pod another
//!   pod's address) is refused by the coordinator: the node gets no route pulling that address's
//!   traffic into the impostor, and the real holder still answers its node.
//!
//! One cluster of its own runs every scenario in sequence.
use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::{
    Api,
    api::{ApiResource, DynamicObject, GroupVersionKind, PostParams},
};
use serde_json::{Value, json};
use virtnet_e2e::{
    cluster::{Cluster, VIRTNET_CONFLIST, VirtnetOptions},
    netns::{named_netns_path, run_in_netns},
    topology::{GATEWAY_V4, node_ip},
};

use crate::support::{install_kubevirt_crd, own_virtnet_cluster, run_on_own_cluster};
use crate::{
    ipam::apply_example_subnet,
    support::{
        POD_READY_TIMEOUT, Suite, create_namespace, node_name, ping_from_pod, pod_ip, pod_name,
    },
};

const NAMESPACE: &str = "wire";
/// The port the backend pods declare (the kubelet stand-in answers on it with the pod's name).
const BACKEND_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 80;
/// Where the test listens in the client's node, standing in for a node-local service.
const NODE_PORT: u16 = 18080;
/// The Service CIDR the harness's apiserver is started with (`--service-cluster-ip-range`).
const SERVICE_CIDR: &str = "10.96.0.0/16";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// kube-proxy programs a new Service within a second or two; allow for a loaded machine.
const SERVICE_TIMEOUT: Duration = Duration::from_secs(60);
const POD_VETH: &str = "veth0";
const HOST_VETH_PREFIX: &str = "vnc";

pub fn coordinator_wires_pods_to_their_node_services_and_vms(suite: &Suite) -> anyhow::Result<()> {
    let virtnet = VirtnetOptions::from_workspace();
    let subnet = virtnet.repo.join("examples/statefulset/subnet.yaml");
    run_on_own_cluster(suite, own_virtnet_cluster('w', virtnet), async |cluster| {
        scenarios(cluster, &subnet.to_string_lossy()).await
    })
}

async fn scenarios(cluster: &Cluster, subnet: &str) -> anyhow::Result<()> {
    let service_cidrs = cluster.kubectl(&[
        "get",
        "servicecidrs.networking.k8s.io",
        "kubernetes",
        "-o",
        "jsonpath={.spec.cidrs}",
    ])?;
    ensure!(
        service_cidrs.contains(SERVICE_CIDR),
        "the apiserver's ServiceCIDR object lists {service_cidrs:?}, not {SERVICE_CIDR}"
    );
    apply_example_subnet(cluster, subnet).await?;
    create_namespace(cluster, NAMESPACE).await?;
    install_kubevirt_crd(cluster, "VirtualMachineInstance", "virtualmachineinstances").await?;
    let nodes = cluster.node_names();
    let pods: Api<Pod> = Api::namespaced(cluster.client(), NAMESPACE);
    for (name, node, port) in [
        ("client", &nodes[0], None),
        ("backend-2", &nodes[1], Some(BACKEND_PORT)),
        ("backend-3", &nodes[2], Some(BACKEND_PORT)),
    ] {
        pods.create(&PostParams::default(), &pod_on(name, node, port)?)
            .await
            .with_context(|| format!("creating pod {name}"))?;
    }
    let services: Api<Service> = Api::namespaced(cluster.client(), NAMESPACE);
    let service = services
        .create(&PostParams::default(), &backend_service()?)
        .await
        .context("creating the backend Service")?;
    let cluster_ip: IpAddr = service
        .spec
        .and_then(|spec| spec.cluster_ip)
        .context("the Service got no ClusterIP")?
        .parse()?;

    let client = wait_ready(cluster, &pods, "client").await?;
    let backends = [
        wait_ready(cluster, &pods, "backend-2").await?,
        wait_ready(cluster, &pods, "backend-3").await?,
    ];

    pod_reaches_its_node(cluster, &client, node_ip(1))?;
    node_reaches_pod(&nodes[1], &backends[0])?;
    pod_reaches_service(cluster, &client, cluster_ip, &backends).await?;
    virt_launchers(cluster, &pods, &nodes).await?;
    address_in_use_is_refused(cluster, &pods, &nodes[1]).await?;
    foreign_address_gets_no_node_route(cluster, &pods, &nodes[2], &backends[1]).await
}

/// A bare pod bound to `node` (no scheduler: the test decides who is where), declaring `port`.
fn pod_on(name: &str, node: &str, port: Option<u16>) -> anyhow::Result<Pod> {
    let ports: Vec<Value> = port
        .iter()
        .map(|port| json!({ "containerPort": port }))
        .collect();
    let app = if port.is_some() { "backend" } else { name };
    Ok(serde_json::from_value(json!({
        "metadata": { "name": name, "labels": { "app": app } },
        "spec": {
            "nodeName": node,
            // The kubelet stand-in runs no containers; the image is never pulled.
            "containers": [{ "name": "main", "image": "registry.k8s.io/pause:3.10", "ports": ports }],
        },
    }))?)
}

fn backend_service() -> anyhow::Result<Service> {
    Ok(serde_json::from_value(json!({
        "metadata": { "name": "backend" },
        "spec": {
            "selector": { "app": "backend" },
            "ports": [{ "port": SERVICE_PORT, "targetPort": BACKEND_PORT }],
        },
    }))?)
}

async fn wait_ready(cluster: &Cluster, pods: &Api<Pod>, name: &str) -> anyhow::Result<Pod> {
    Ok(cluster
        .wait_for(&format!("pod {name} Ready"), POD_READY_TIMEOUT, || async {
            match pods.get(name).await {
                Ok(pod) if crate::support::is_pod_ready(&pod) => Ok(pod),
                Ok(pod) => Err(format!("not Ready: {:?}", pod.status)),
                Err(error) => Err(error.to_string()),
            }
        })
        .await?)
}

/// Connects to `target` from inside network namespace `netns` and returns the line it sends
/// before closing.
fn tcp_exchange(netns: &str, target: SocketAddr) -> anyhow::Result<String> {
    run_in_netns(
        named_netns_path(netns),
        move || -> std::io::Result<String> {
            let mut stream = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)?;
            stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            Ok(answer.trim_end().to_owned())
        },
    )?
    .with_context(|| format!("TCP {target} from netns {netns}"))
}

/// `ip route get <to>` inside the pod: the device the pod's kernel picks.
fn route_device(cluster: &Cluster, pod: &Pod, to: IpAddr) -> anyhow::Result<String> {
    let json = cluster.exec_in_pod_netns(pod, &["ip", "-j", "route", "get", &to.to_string()])?;
    let routes: Value = serde_json::from_str(&json)?;
    routes[0]["dev"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("`ip route get {to}` in pod {} gave {json}", pod_name(pod)))
}

fn pod_reaches_its_node(cluster: &Cluster, pod: &Pod, node: Ipv4Addr) -> anyhow::Result<()> {
    let node_name = node_name(pod).context("the client pod is not bound")?;
    let device = route_device(cluster, pod, node.into())?;
    ensure!(
        device == POD_VETH,
        "the pod routes its node {node} via {device}, not the coordinator's {POD_VETH}"
    );
    ping_from_pod(cluster, pod, node.into())?;
    // Something listening on the node's own address, as a node-local daemon would.
    let listener = run_in_netns(named_netns_path(node_name), move || {
        TcpListener::bind((node, NODE_PORT))
    })?
    .with_context(|| format!("listening on {node}:{NODE_PORT} in node {node_name}"))?;
    let server = thread::spawn(move || accept_one(&listener, b"node"));
    let answer = tcp_exchange(
        &cluster.pod_netns(pod)?,
        SocketAddr::from((node, NODE_PORT)),
    )?;
    let peer = server
        .join()
        .map_err(|_| anyhow::anyhow!("the node listener panicked"))??;
    ensure!(answer == "node", "the node listener sent {answer:?}");
    ensure!(
        peer.ip() == pod_ip(pod)?,
        "the node saw the connection from {peer}, not from the pod's address"
    );
    Ok(())
}

/// Accepts one connection (or gives up after [`CONNECT_TIMEOUT`]), sends `greeting` and
/// returns the peer's address.
fn accept_one(listener: &TcpListener, greeting: &[u8]) -> std::io::Result<SocketAddr> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                stream.set_nonblocking(false)?;
                stream.write_all(greeting)?;
                return Ok(peer);
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(error) => return Err(error),
        }
    }
}

/// TCP from the node's own netns to the pod's port: what a kubelet probe does.
fn node_reaches_pod(node: &str, pod: &Pod) -> anyhow::Result<()> {
    let answer = tcp_exchange(node, SocketAddr::new(pod_ip(pod)?, BACKEND_PORT))?;
    ensure!(
        answer == pod_name(pod),
        "node {node} reached {answer:?} at pod {}'s address",
        pod_name(pod)
    );
    Ok(())
}

/// TCP to the ClusterIP from the client, whose node's kube-proxy sends it to a backend on
/// another node.
async fn pod_reaches_service(
    cluster: &Cluster,
    client: &Pod,
    cluster_ip: IpAddr,
    backends: &[Pod],
) -> anyhow::Result<()> {
    let device = route_device(cluster, client, cluster_ip)?;
    ensure!(
        device == POD_VETH,
        "the pod routes ClusterIP {cluster_ip} via {device}: the coordinator did not learn the \
         Service CIDR from the agent"
    );
    let client_node = node_name(client);
    ensure!(
        backends
            .iter()
            .all(|backend| node_name(backend) != client_node),
        "every backend must run on another node than the client"
    );
    let netns = cluster.pod_netns(client)?;
    let target = SocketAddr::new(cluster_ip, SERVICE_PORT);
    let answer = cluster
        .wait_for(
            &format!("ClusterIP {target} answering the client"),
            SERVICE_TIMEOUT,
            || async { tcp_exchange(&netns, target).map_err(|error| format!("{error:#}")) },
        )
        .await?;
    ensure!(
        backends.iter().any(|backend| pod_name(backend) == answer),
        "ClusterIP {target} answered {answer:?}, not a backend"
    );
    Ok(())
}

/// Plays virt-controller: a VMI whose pod network uses `binding` (as in
/// examples/kubevirt/virtualmachine.yaml), then its virt-launcher pod on `node`.
async fn launch_vm(
    cluster: &Cluster,
    pods: &Api<Pod>,
    vm: &str,
    binding: Value,
    node: &str,
) -> anyhow::Result<String> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachineInstance"),
        "virtualmachineinstances",
    );
    let vmis: Api<DynamicObject> = Api::namespaced_with(cluster.client(), NAMESPACE, &resource);
    let mut interface = json!({ "name": "default" });
    if let (Some(interface), Value::Object(binding)) = (interface.as_object_mut(), binding) {
        interface.extend(binding);
    }
    let vmi: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": { "name": vm },
        "spec": {
            "domain": { "devices": { "interfaces": [interface] } },
            "networks": [{ "name": "default", "pod": {} }],
        },
    }))?;
    let vmi = vmis.create(&PostParams::default(), &vmi).await?;
    let uid = vmi.metadata.uid.context("the VMI has no uid")?;
    let name = format!("virt-launcher-{vm}-x7k2p");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": { "kubevirt.io": "virt-launcher", "vm.kubevirt.io/name": vm },
            "ownerReferences": [{
                "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                "name": vm, "uid": uid, "controller": true,
            }],
        },
        "spec": {
            "nodeName": node,
            "containers": [{ "name": "compute", "image": "registry.k8s.io/pause:3.10" }],
        },
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    Ok(name)
}

/// The host veths on `node` (one per pod the coordinator wired there).
fn host_veths(node: &str) -> anyhow::Result<Vec<String>> {
    let json = virtnet_e2e::command::run_stdout(
        std::process::Command::new("ip").args(["-n", node, "-j", "link", "show"]),
    )?;
    let links: Value = serde_json::from_str(&json)?;
    Ok(links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|link| link["ifname"].as_str())
        .filter(|name| name.starts_with(HOST_VETH_PREFIX))
        .map(str::to_owned)
        .collect())
}

async fn virt_launchers(
    cluster: &Cluster,
    pods: &Api<Pod>,
    nodes: &[String],
) -> anyhow::Result<()> {
    // passt: the pod keeps its address and MAC, and its default route on the underlay NIC.
    let passt = launch_vm(
        cluster,
        pods,
        "vm-passt",
        json!({ "binding": { "name": "passt" } }),
        &nodes[0],
    )
    .await?;
    let passt = wait_ready(cluster, pods, &passt).await?;
    let address = pod_ip(&passt)?;
    let example_range = "10.6.153.100".parse::<IpAddr>()?..="10.6.153.255".parse::<IpAddr>()?;
    ensure!(
        example_range.contains(&address),
        "the passt VM's pod got {address}, outside the example Subnet's range"
    );
    let default = cluster.exec_in_pod_netns(&passt, &["ip", "-j", "route", "show", "default"])?;
    let default: Value = serde_json::from_str(&default)?;
    ensure!(
        default.as_array().map(Vec::len) == Some(1) && default[0]["dev"] == "eth0",
        "the passt VM's pod has default routes {default}, not one via eth0"
    );
    ping_from_pod(cluster, &passt, IpAddr::V4(GATEWAY_V4))?;
    ensure!(
        route_device(cluster, &passt, node_ip(1).into())? == POD_VETH,
        "the passt VM's pod is not wired to its node"
    );

    // bridge: refused before anything changes on the node.
    let bridge_node = &nodes[2];
    let veths_before = host_veths(bridge_node)?;
    let bridge = launch_vm(
        cluster,
        pods,
        "vm-bridge",
        json!({ "bridge": {} }),
        bridge_node,
    )
    .await?;
    let message = cluster
        .wait_for(
            &format!("pod {bridge} refused"),
            POD_READY_TIMEOUT,
            || async {
                let pod = pods.get(&bridge).await.map_err(|error| error.to_string())?;
                sandbox_failure(&pod).ok_or_else(|| format!("status {:?}", pod.status))
            },
        )
        .await?;
    ensure!(
        message.contains("KubeVirt bridge binding") && message.contains("passt binding"),
        "the bridge VM's pod failed with {message:?}, which does not say why or what to use"
    );
    let veths_after = host_veths(bridge_node)?;
    ensure!(
        veths_after == veths_before,
        "the refused pod left host veths on {bridge_node}: before {veths_before:?}, after \
         {veths_after:?}"
    );
    Ok(())
}

/// Turns on `detectIPConflict` in `node`'s conflist (the kubelet reads it for every new
/// sandbox); another host on the underlay takes an address of the Subnet, and a pod asking for
/// it (static-ips annotation) is refused before the coordinator changes anything on the node.
async fn address_in_use_is_refused(
    cluster: &Cluster,
    pods: &Api<Pod>,
    node: &str,
) -> anyhow::Result<()> {
    let conflist_path = cluster
        .layout()
        .node_dirs(node)
        .cni_conf
        .join(VIRTNET_CONFLIST);
    let mut conflist: Value = serde_json::from_str(&std::fs::read_to_string(&conflist_path)?)?;
    conflist["plugins"][1]["detectIPConflict"] = json!(true);
    std::fs::write(&conflist_path, conflist.to_string())?;

    // An address no pod holds yet (a fixed one could be a running pod's: the pools hand out
    // addresses in no fixed order).
    let (_, squatted) = crate::helm::free_pool_address(cluster)?;
    let router = cluster.names().router_netns();
    virtnet_e2e::command::run(std::process::Command::new("ip").args([
        "-n",
        &router,
        "addr",
        "add",
        &format!("{squatted}/32"),
        "dev",
        "eth0",
    ]))?;
    let links: Value = serde_json::from_str(&virtnet_e2e::command::run_stdout(
        std::process::Command::new("ip").args(["-n", &router, "-j", "link", "show", "eth0"]),
    )?)?;
    let holder = links[0]["address"].as_str().unwrap_or_default().to_owned();

    let veths_before = host_veths(node)?;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {
            "name": "squatter",
            "annotations": {
                "ipam.virtnet.io/static-ips": format!(r#"[{{"interface":"eth0","ipv4":"{squatted}"}}]"#),
            },
        },
        "spec": {
            "nodeName": node,
            "containers": [{ "name": "main", "image": "registry.k8s.io/pause:3.10" }],
        },
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    let message = cluster
        .wait_for("pod squatter refused", POD_READY_TIMEOUT, || async {
            let pod = pods
                .get("squatter")
                .await
                .map_err(|error| error.to_string())?;
            sandbox_failure(&pod).ok_or_else(|| format!("status {:?}", pod.status))
        })
        .await?;
    ensure!(
        message.contains(&format!(
            "{squatted} of pod interface eth0 is already in use"
        )) && message.contains(&holder),
        "the squatter failed with {message:?}, which does not name the address and its holder \
         {holder}"
    );
    let veths_after = host_veths(node)?;
    ensure!(
        veths_after == veths_before,
        "the refused pod left host veths on {node}: before {veths_before:?}, after \
         {veths_after:?}"
    );
    Ok(())
}

/// `node`'s chain with the `static` IPAM plugin handing out the address of `victim`, a pod on
/// that node (a tenant's NAD could say the same): the impostor pod is refused by the
/// coordinator, no host veth or route for the address appears on `node`, and `victim` still
/// answers its node.
async fn foreign_address_gets_no_node_route(
    cluster: &Cluster,
    pods: &Api<Pod>,
    node: &str,
    victim: &Pod,
) -> anyhow::Result<()> {
    let stolen = pod_ip(victim)?;
    let conflist_path = cluster
        .layout()
        .node_dirs(node)
        .cni_conf
        .join(VIRTNET_CONFLIST);
    let original = std::fs::read_to_string(&conflist_path)?;
    let mut conflist: Value = serde_json::from_str(&original)?;
    conflist["plugins"][0]["ipam"] = json!({
        "type": "static",
        "addresses": [{"address": format!("{stolen}/16"), "gateway": GATEWAY_V4.to_string()}],
    });
    std::fs::write(&conflist_path, conflist.to_string())?;
    let veths_before = host_veths(node)?;
    // The victim's own host veth on this node.
    let route_before = route_to(node, stolen)?;
    let impostor: Pod = serde_json::from_value(json!({
        "metadata": {"name": "impostor"},
        "spec": {"nodeName": node,
                 "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]},
    }))?;
    pods.create(&PostParams::default(), &impostor).await?;
    let refused = cluster
        .wait_for("pod impostor refused", POD_READY_TIMEOUT, || async {
            let pod = pods
                .get("impostor")
                .await
                .map_err(|error| error.to_string())?;
            sandbox_failure(&pod).ok_or_else(|| format!("status {:?}", pod.status))
        })
        .await;
    std::fs::write(&conflist_path, original)?;
    let message = refused?;
    ensure!(
        message.contains(&format!(
            "{stolen} of pod interface eth0 was not allocated to this pod"
        )),
        "the impostor failed with {message:?}, not with the coordinator's refusal"
    );
    let veths_after = host_veths(node)?;
    ensure!(
        veths_after == veths_before,
        "the refused pod left host veths on {node}: before {veths_before:?}, after {veths_after:?}"
    );
    let route_after = route_to(node, stolen)?;
    ensure!(
        route_after == route_before,
        "{node} routed {stolen} by {route_before:?} before the impostor and by {route_after:?} after"
    );
    // The victim runs on the same node: the node still reaches it, not the impostor.
    node_reaches_pod(node, victim)
}

/// How `node` routes `address` (`ip route get`, the device part).
fn route_to(node: &str, address: IpAddr) -> anyhow::Result<String> {
    let route = virtnet_e2e::command::run_stdout(std::process::Command::new("ip").args([
        "-n",
        node,
        "route",
        "get",
        &address.to_string(),
    ]))?;
    Ok(route
        .split_whitespace()
        .skip_while(|word| *word != "dev")
        .take(2)
        .collect::<Vec<_>>()
        .join(" "))
}

/// The message of a pod's failed sandbox, as the kubelet reports it.
fn sandbox_failure(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|condition| condition.reason.as_deref() == Some("FailedCreatePodSandBox"))?
        .message
        .clone()
}
