//! The real virtnet-coordinator binary against real network namespaces, asserting on the wire
//! (see `support` for the topology). Needs root; reported as ignored otherwise.

#[path = "support/harness.rs"]
mod harness;
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use harness::{Ignored, root_tests};

use serde_json::{Value, json};
use support::{
    CONTAINER_ID, COORDINATOR, CniCall, NO_DELEGATES, NODE_IP, POD_IP, SWITCH_IP, TestResult,
    World, in_netns, ping, reference_plugins, sh,
};
use virtnet_coordinator::plan::{Target, host_veth_name};

const TCP_PORT: u16 = 8080;

fn main() -> ExitCode {
    root_tests!(
        pod_and_node_reach_each_other_and_services_go_via_the_veth,
        hundred_add_del_cycles_leave_the_node_byte_identical,
        failed_add_leaves_nothing_behind,
        a_second_nic_answers_through_itself,
        dual_stack_pod_reaches_its_node_over_ipv6_too,
        after_the_bridge_plugin_the_pod_reaches_its_node_and_services_by_the_veth,
        gc_removes_only_its_own_networks_unlisted_veths,
    )
}

fn pod_and_node_reach_each_other_and_services_go_via_the_veth() -> TestResult {
    let world = World::with_pod_nic()?;
    // Without the coordinator a macvlan child cannot reach its own parent's address.
    assert!(
        ping(&world.pod, NODE_IP).is_err(),
        "macvlan already reaches its node"
    );
    world.add()?;

    ping(&world.pod, NODE_IP)?;
    ping(&world.node, POD_IP)?;
    // The underlay path still works: the default route stays on eth0.
    ping(&world.pod, SWITCH_IP)?;

    // What a kubelet TCP probe does: node → a listener in the pod.
    let listener = in_netns(&world.pod, || TcpListener::bind(("0.0.0.0", TCP_PORT)))??;
    let server = thread::spawn(move || -> std::io::Result<()> {
        let (mut stream, _) = listener.accept()?;
        stream.write_all(b"pong")
    });
    let target: SocketAddr = format!("{POD_IP}:{TCP_PORT}").parse()?;
    let mut reply = String::new();
    in_netns(&world.node, move || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        Ok(reply)
    })??
    .clone_into(&mut reply);
    server.join().map_err(|_| "server panicked")??;
    assert_eq!(reply, "pong");

    let service = sh(&["ip", "-n", &world.pod, "route", "get", "10.96.0.1"])?;
    assert!(
        service.contains(&format!("via {NODE_IP} dev veth0 src {POD_IP}")),
        "{service}"
    );
    let default = sh(&["ip", "-n", &world.pod, "route", "get", "192.0.2.1"])?;
    assert!(default.contains("dev eth0"), "{default}");

    world.del()?;
    assert!(
        ping(&world.node, POD_IP).is_err(),
        "DEL left the node route"
    );
    // DEL again, and DEL once the pod netns is gone, both succeed.
    world.del()?;
    sh(&["ip", "netns", "del", &world.pod])?;
    sh(&["ip", "netns", "add", &world.pod])?;
    world.del()?;
    Ok(())
}

fn hundred_add_del_cycles_leave_the_node_byte_identical() -> TestResult {
    let world = World::with_pod_nic()?;
    let before = world.node_state()?;
    for _ in 0..100 {
        world.add()?;
        world.del()?;
    }
    assert_eq!(world.node_state()?, before);
    Ok(())
}

fn failed_add_leaves_nothing_behind() -> TestResult {
    let world = World::with_pod_nic()?;
    let before = world.node_state()?;
    // prevResult claims an address eth0 does not hold: the veth, the node's route and neighbour
    // are in place when the pod route sourced from that address is refused; all must go.
    let run = world.run(CniCall {
        binary: COORDINATOR,
        command: "ADD",
        ifname: "eth0",
        cni_path: NO_DELEGATES,
        stdin: world.coordinator_config(world.prev_result("eth0", "10.6.153.102/16", SWITCH_IP)),
    })?;
    assert_ne!(run.exit_code, Some(0), "{}", run.stdout);
    assert!(
        run.stdout
            .contains("adding route 10.6.0.5/32 dev veth0 src 10.6.153.102"),
        "{}",
        run.stdout
    );
    assert_eq!(world.node_state()?, before);

    // A pod that already has a `veth0`: creating the pair fails as a whole.
    sh(&[
        "ip", "-n", &world.pod, "link", "add", "veth0", "type", "veth", "peer", "name", "other",
    ])?;
    let run = world.coordinator("ADD")?;
    assert_ne!(run.exit_code, Some(0), "{}", run.stdout);
    assert!(run.stdout.contains("File exists"), "{}", run.stdout);
    assert_eq!(world.node_state()?, before);

    // A host veth name already taken on the node: refused before any change.
    let host = host_veth_name(Target {
        container_id: CONTAINER_ID,
        ifname: "eth0",
    });
    sh(&[
        "ip",
        "-n",
        &world.node,
        "link",
        "add",
        &host,
        "type",
        "veth",
        "peer",
        "name",
        "squat",
    ])?;
    let before = world.node_state()?;
    let run = world.coordinator("ADD")?;
    assert_ne!(run.exit_code, Some(0));
    assert!(run.stdout.contains("already exists"), "{}", run.stdout);
    assert_eq!(world.node_state()?, before);
    Ok(())
}

fn a_second_nic_answers_through_itself() -> TestResult {
    let mut world = World::with_pod_nic()?;
    let switch2 = world.switch_named("sw2");
    world.underlay("ens5", &switch2, "10.7.0.5/24", "10.7.0.1/24")?;
    world.pod_nic("ens5", "net1", "10.7.0.9/24")?;
    // A peer beyond net1's gateway: its requests come in on net1, and without policy routing the
    // replies would follow the pod's default route out of eth0, to a switch that drops them.
    sh(&[
        "ip",
        "-n",
        &switch2,
        "addr",
        "add",
        "203.0.113.1/32",
        "dev",
        "swp",
    ])?;
    let peer_ping = || {
        sh(&[
            "ip",
            "netns",
            "exec",
            &switch2,
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            "-I",
            "203.0.113.1",
            "10.7.0.9",
        ])
    };
    assert!(peer_ping().is_err(), "replies already leave by net1");
    // What macvlan's IPAM step leaves in the main table for net1, ahead of eth0's default route.
    sh(&[
        "ip", "-n", &world.pod, "route", "prepend", "default", "via", "10.7.0.1", "dev", "net1",
    ])?;
    let mut prev_result = world.prev_result("net1", "10.7.0.9/24", "10.7.0.1");
    prev_result["routes"] = serde_json::json!([{"dst": "0.0.0.0/0", "gw": "10.7.0.1"}]);
    let net1 = |command| CniCall {
        binary: COORDINATOR,
        command,
        ifname: "net1",
        cni_path: NO_DELEGATES,
        stdin: world.coordinator_config(prev_result.clone()),
    };
    World::succeeds(world.run(net1("ADD"))?)?;

    peer_ping()?;
    let route = sh(&[
        "ip",
        "-n",
        &world.pod,
        "route",
        "get",
        "203.0.113.1",
        "from",
        "10.7.0.9",
    ])?;
    assert!(route.contains("via 10.7.0.1 dev net1 table 101"), "{route}");
    let route = sh(&["ip", "-n", &world.pod, "route", "get", "203.0.113.1"])?;
    assert!(
        route.contains(&format!("via {SWITCH_IP} dev eth0")),
        "{route}"
    );

    World::succeeds(world.run(net1("DEL"))?)?;
    assert!(!sh(&["ip", "-n", &world.pod, "rule"])?.contains("101"));
    assert!(sh(&["ip", "-n", &world.pod, "route", "show", "table", "101"])?.is_empty());
    assert!(peer_ping().is_err(), "DEL left the policy routing");
    Ok(())
}

fn dual_stack_pod_reaches_its_node_over_ipv6_too() -> TestResult {
    let world = World::with_pod_nic()?;
    sh(&[
        "ip",
        "-n",
        &world.node,
        "addr",
        "add",
        "fd00:6::5/64",
        "dev",
        "ens4",
    ])?;
    // The pod's address is fresh, as macvlan leaves it: still in DAD when the coordinator runs.
    sh(&[
        "ip",
        "-n",
        &world.pod,
        "addr",
        "add",
        "fd00:6::65/64",
        "dev",
        "eth0",
    ])?;
    let mut prev_result = world.prev_result("eth0", &format!("{POD_IP}/16"), SWITCH_IP);
    prev_result["ips"]
        .as_array_mut()
        .ok_or("ips is a list")?
        .push(serde_json::json!({"interface": 0, "address": "fd00:6::65/64"}));
    World::succeeds(world.run(CniCall {
        binary: COORDINATOR,
        command: "ADD",
        ifname: "eth0",
        cni_path: NO_DELEGATES,
        stdin: world.coordinator_config(prev_result),
    })?)?;
    // Give the pod's DAD (1 s by default) time to finish before using the address.
    thread::sleep(Duration::from_millis(2500));
    ping(&world.pod, "fd00:6::5")?;
    ping(&world.node, "fd00:6::65")?;
    ping(&world.node, POD_IP)?;
    let route = sh(&["ip", "-n", &world.pod, "-6", "route", "get", "fd00:6::5"])?;
    assert!(route.contains("dev veth0"), "{route}");
    world.del()?;
    Ok(())
}

fn after_the_bridge_plugin_the_pod_reaches_its_node_and_services_by_the_veth() -> TestResult {
    let Some(plugins) = reference_plugins(&["bridge", "host-local"]) else {
        return Err(Ignored(
            "needs the reference bridge and host-local plugins: run `make tools` first".into(),
        )
        .into());
    };
    let plugins = plugins.display().to_string();
    let world = World::new()?;
    let data_dir = std::env::temp_dir().join(format!("{}-host-local", world.pod));
    let bridge_config = json!({
        "cniVersion": "1.0.0",
        "name": "bridged",
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "10.88.0.0/24", "gateway": "10.88.0.1"}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": data_dir,
        },
    });
    let bridge_binary = format!("{plugins}/bridge");
    let bridge = |command| CniCall {
        binary: &bridge_binary,
        command,
        ifname: "eth0",
        cni_path: &plugins,
        stdin: bridge_config.to_string(),
    };
    let prev_result: Value =
        serde_json::from_str(&World::succeeds(world.run(bridge("ADD"))?)?.stdout)?;
    let pod_ip = prev_result["ips"][0]["address"]
        .as_str()
        .and_then(|address| address.split('/').next())
        .ok_or("the bridge plugin's result has no address")?
        .to_owned();
    let coordinator = |command| CniCall {
        binary: COORDINATOR,
        command,
        ifname: "eth0",
        cni_path: &plugins,
        stdin: world.coordinator_config(prev_result.clone()),
    };
    let result = (|| -> TestResult {
        World::succeeds(world.run(coordinator("ADD"))?)?;
        // The bridge's gateway would carry this too; the coordinator's veth takes it, as after
        // macvlan, so node and Service traffic never depends on the interface plugin.
        let to_node = sh(&["ip", "-n", &world.pod, "route", "get", NODE_IP])?;
        assert!(to_node.contains("dev veth0"), "{to_node}");
        ping(&world.pod, NODE_IP)?;
        ping(&world.node, &pod_ip)?;
        let service = sh(&["ip", "-n", &world.pod, "route", "get", "10.96.0.1"])?;
        assert!(service.contains("dev veth0"), "{service}");
        let default = sh(&["ip", "-n", &world.pod, "route", "get", "192.0.2.1"])?;
        assert!(default.contains("dev eth0"), "{default}");
        World::succeeds(world.run(coordinator("DEL"))?)?;
        let node_routes = sh(&["ip", "-n", &world.node, "route"])?;
        assert!(
            !node_routes.contains(&format!("{pod_ip} dev vnc")),
            "DEL left the node route: {node_routes}"
        );
        Ok(())
    })();
    let teardown = World::succeeds(world.run(bridge("DEL"))?).map(drop);
    let _ = std::fs::remove_dir_all(&data_dir);
    result.and(teardown)
}

fn gc_removes_only_its_own_networks_unlisted_veths() -> TestResult {
    const CONTAINER_B: &str = "b0b0000123456789";
    const POD_B_IP: &str = "10.6.153.102";
    let mut world = World::with_pod_nic()?;
    let pod_b = world.add_pod("podb")?;
    world.pod_nic_in(&pod_b, "ens4", "eth0", &format!("{POD_B_IP}/16"))?;
    let add = |network: &str, pod: &str, container: &str, address: &str| -> TestResult {
        let prev_result = world.prev_result_in(pod, "eth0", &format!("{address}/16"), SWITCH_IP);
        let call = CniCall {
            binary: COORDINATOR,
            command: "ADD",
            ifname: "eth0",
            cni_path: NO_DELEGATES,
            stdin: world.network_config(network, prev_result),
        };
        World::succeeds(world.run_for(call, pod, container)?).map(drop)
    };
    add("net-a", &world.pod, CONTAINER_ID, POD_IP)?;
    add("net-b", &pod_b, CONTAINER_B, POD_B_IP)?;
    // A veth of nobody's network, with no alias.
    sh(&[
        "ip",
        "-n",
        &world.node,
        "link",
        "add",
        "other0",
        "type",
        "veth",
        "peer",
        "name",
        "other1",
    ])?;
    let host_veth = |container_id| {
        host_veth_name(Target {
            container_id,
            ifname: "eth0",
        })
    };
    let (veth_a, veth_b) = (host_veth(CONTAINER_ID), host_veth(CONTAINER_B));
    let links: Value = serde_json::from_str(&sh(&["ip", "-n", &world.node, "-j", "link"])?)?;
    let alias_of = |name: &str| {
        links
            .as_array()
            .and_then(|links| links.iter().find(|link| link["ifname"] == name))
            .map(|link| link["ifalias"].clone())
    };
    assert_eq!(
        alias_of(&veth_a),
        Some(json!(format!(
            "virtnet-coordinator:net-a/{CONTAINER_ID}/eth0"
        )))
    );
    assert_eq!(
        alias_of(&veth_b),
        Some(json!(format!(
            "virtnet-coordinator:net-b/{CONTAINER_B}/eth0"
        )))
    );

    let gc = |network: &str, valid: Value| -> TestResult {
        let stdin = json!({
            "cniVersion": "1.1.0",
            "name": network,
            "type": "virtnet-coordinator",
            "cni.dev/valid-attachments": valid,
        });
        let call = CniCall {
            binary: COORDINATOR,
            command: "GC",
            ifname: "eth0",
            cni_path: NO_DELEGATES,
            stdin: stdin.to_string(),
        };
        World::succeeds(world.run(call)?).map(drop)
    };
    gc("net-a", json!([]))?;
    let node_links = sh(&["ip", "-n", &world.node, "link"])?;
    assert!(
        !node_links.contains(&veth_a),
        "GC kept net-a's veth: {node_links}"
    );
    assert!(
        node_links.contains(&veth_b),
        "GC took net-b's veth: {node_links}"
    );
    assert!(
        node_links.contains("other0"),
        "GC took a foreign veth: {node_links}"
    );
    assert!(ping(&world.node, POD_IP).is_err(), "pod A is still wired");
    ping(&world.node, POD_B_IP)?;

    // net-b's GC keeps what it lists; GC again finds nothing left to do.
    gc(
        "net-b",
        json!([{"containerID": CONTAINER_B, "ifname": "eth0"}]),
    )?;
    gc("net-a", json!([]))?;
    let node_links = sh(&["ip", "-n", &world.node, "link"])?;
    assert!(
        node_links.contains(&veth_b) && node_links.contains("other0"),
        "{node_links}"
    );
    ping(&world.node, POD_B_IP)?;
    Ok(())
}
