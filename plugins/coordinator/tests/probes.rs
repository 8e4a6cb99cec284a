//! The underlay probes of the real virtnet-coordinator binary, on the wire in network
//! namespaces (see `support` for the topology: the switch netns is the pod's underlay neighbour
//! and gateway). Needs root; reported as ignored otherwise.

#[path = "support/harness.rs"]
mod harness;
#[allow(
    dead_code,
    reason = "shared with tests/netns.rs; these tests use part of it"
)]
mod support;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use harness::root_tests;

use serde_json::{Value, json};
use support::{COORDINATOR, CniCall, NO_DELEGATES, POD_IP, SWITCH_IP, TestResult, World, sh};
use virtnet_cni::testing::PluginRun;

/// "Well under a second": the probes wait at most 300 ms per check.
const PROBE_BOUND: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    root_tests!(
        an_address_in_use_is_refused_fast_and_leaves_nothing,
        an_ipv6_address_in_use_is_refused,
        a_free_address_is_accepted_and_announced_to_the_neighbours,
        an_unreachable_gateway_is_reported_and_a_reachable_one_passes,
    )
}

/// ADD for the pod's eth0 with `address`/`gateway` and extra coordinator keys.
fn add(
    world: &World,
    address: &str,
    gateway: &str,
    keys: Value,
) -> Result<PluginRun, Box<dyn std::error::Error>> {
    let mut config: Value = serde_json::from_str(
        &world.coordinator_config(world.prev_result("eth0", address, gateway)),
    )?;
    if let (Some(config), Value::Object(keys)) = (config.as_object_mut(), keys) {
        config.extend(keys);
    }
    world.run(CniCall {
        binary: COORDINATOR,
        command: "ADD",
        ifname: "eth0",
        cni_path: NO_DELEGATES,
        stdin: config.to_string(),
    })
}

fn mac_of(netns: &str, link: &str) -> Result<String, Box<dyn std::error::Error>> {
    let links: Value =
        serde_json::from_str(&sh(&["ip", "-n", netns, "-j", "link", "show", link])?)?;
    Ok(links[0]["address"]
        .as_str()
        .ok_or("the link has no address")?
        .to_owned())
}

fn an_address_in_use_is_refused_fast_and_leaves_nothing() -> TestResult {
    let world = World::with_pod_nic()?;
    // Another host on the underlay already holds the pod's address.
    sh(&[
        "ip",
        "-n",
        &world.switch,
        "addr",
        "add",
        &format!("{POD_IP}/32"),
        "dev",
        "swp",
    ])?;
    let holder = mac_of(&world.switch, "swp")?;
    let before = world.node_state()?;
    let started = Instant::now();
    let run = add(
        &world,
        &format!("{POD_IP}/16"),
        SWITCH_IP,
        json!({"detectIPConflict": true}),
    )?;
    let took = started.elapsed();
    assert_ne!(run.exit_code, Some(0), "{}", run.stdout);
    let error: Value = serde_json::from_str(&run.stdout)?;
    assert_eq!(error["code"], 102, "{error}");
    let message = error["msg"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("{POD_IP} of pod interface eth0 is already in use"))
            && message.contains(&holder),
        "{message}"
    );
    assert!(took < PROBE_BOUND, "refused after {took:?}");
    eprintln!("conflict refused in {took:?}");
    assert_eq!(
        world.node_state()?,
        before,
        "a refused ADD changed the node"
    );
    assert!(
        !sh(&["ip", "-n", &world.pod, "link"])?.contains("veth0"),
        "a refused ADD left the pod veth"
    );
    Ok(())
}

fn an_ipv6_address_in_use_is_refused() -> TestResult {
    let world = World::with_pod_nic()?;
    sh(&[
        "ip",
        "-n",
        &world.switch,
        "addr",
        "add",
        "fd00:6::65/64",
        "dev",
        "swp",
        "nodad",
    ])?;
    sh(&[
        "ip",
        "-n",
        &world.pod,
        "addr",
        "add",
        "fd00:6::65/64",
        "dev",
        "eth0",
        "nodad",
    ])?;
    let run = add(
        &world,
        "fd00:6::65/64",
        "fd00:6::1",
        json!({"detectIPConflict": true}),
    )?;
    assert_ne!(run.exit_code, Some(0), "{}", run.stdout);
    assert!(
        run.stdout
            .contains("fd00:6::65 of pod interface eth0 is already in use"),
        "{}",
        run.stdout
    );
    Ok(())
}

fn a_free_address_is_accepted_and_announced_to_the_neighbours() -> TestResult {
    let world = World::with_pod_nic()?;
    // The neighbour still maps the address to whoever held it before.
    sh(&[
        "ip",
        "-n",
        &world.switch,
        "neigh",
        "replace",
        POD_IP,
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "swp",
        "nud",
        "stale",
    ])?;
    let started = Instant::now();
    let run = add(
        &world,
        &format!("{POD_IP}/16"),
        SWITCH_IP,
        json!({"detectIPConflict": true}),
    )?;
    let took = started.elapsed();
    World::succeeds(run)?;
    eprintln!("ADD with an unanswered conflict probe took {took:?}");
    let pod_mac = mac_of(&world.pod, "eth0")?;
    let neighbour = sh(&["ip", "-n", &world.switch, "neigh", "show", POD_IP])?;
    assert!(
        neighbour.contains(&pod_mac),
        "the gratuitous ARP did not reach the neighbour: {neighbour}"
    );
    world.del()?;
    Ok(())
}

fn an_unreachable_gateway_is_reported_and_a_reachable_one_passes() -> TestResult {
    let world = World::with_pod_nic()?;
    let before = world.node_state()?;
    let started = Instant::now();
    let run = add(
        &world,
        &format!("{POD_IP}/16"),
        "10.6.0.254",
        json!({"detectGateway": true}),
    )?;
    let took = started.elapsed();
    assert_ne!(run.exit_code, Some(0), "{}", run.stdout);
    let error: Value = serde_json::from_str(&run.stdout)?;
    assert_eq!(error["code"], 11, "{error}");
    assert!(
        error["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("gateway 10.6.0.254 did not answer"),
        "{error}"
    );
    assert!(took < PROBE_BOUND, "reported after {took:?}");
    assert_eq!(
        world.node_state()?,
        before,
        "a refused ADD changed the node"
    );

    World::succeeds(add(
        &world,
        &format!("{POD_IP}/16"),
        SWITCH_IP,
        json!({"detectGateway": true, "detectIPConflict": true}),
    )?)?;
    world.del()?;
    Ok(())
}
