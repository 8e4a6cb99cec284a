//! The real virtnet-coordinator binary against real network namespaces, asserting on the wire.
//!
//! Each test builds its own world and never touches the namespace it runs in: a "node" netns
//! whose underlay NIC `ens4` is a veth whose peer sits in a "switch" netns, and a "pod" netns
//! holding a macvlan child of `ens4` (created in the node, moved into the pod) with the pod's
//! address. The coordinator runs inside the node netns, as kubelet's runtime would run it.
//! Needs root; skipped with a message otherwise. Everything is deleted on drop, even on failure.

use std::error::Error;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use serde_json::json;
use virtnet_cni::testing::{PluginRun, run_plugin};
use virtnet_coordinator::plan::{Target, host_veth_name};

type TestResult = Result<(), Box<dyn Error>>;

const BINARY: &str = env!("CARGO_BIN_EXE_virtnet-coordinator");
const NODE_IP: &str = "10.6.0.5";
const SWITCH_IP: &str = "10.6.0.1";
const POD_IP: &str = "10.6.153.101";
const CONTAINER_ID: &str = "c0ffee0123456789";
const TCP_PORT: u16 = 8080;

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipping: this test builds network namespaces and needs root");
    false
}

/// Runs a command and returns its stdout, failing with its stderr.
fn sh(args: &[&str]) -> Result<String, Box<dyn Error>> {
    let output = Command::new(args[0]).args(&args[1..]).output()?;
    if !output.status.success() {
        return Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// Runs `work` on a thread that has joined the named netns (child processes it spawns inherit it).
fn in_netns<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Box<dyn Error>> {
    let netns = File::open(netns_path(name))?;
    thread::spawn(move || -> Result<T, String> {
        setns(&netns, CloneFlags::CLONE_NEWNET).map_err(|error| error.to_string())?;
        Ok(work())
    })
    .join()
    .map_err(|_| "netns thread panicked")?
    .map_err(Into::into)
}

fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Node, switch and pod namespaces wired as the module docs say; deleted on drop.
struct World {
    node: String,
    switch: String,
    pod: String,
}

impl World {
    fn new() -> Result<Self, Box<dyn Error>> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "vcoord{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let world = Self {
            node: format!("{tag}-node"),
            switch: format!("{tag}-sw"),
            pod: format!("{tag}-pod"),
        };
        for netns in [&world.node, &world.switch, &world.pod] {
            sh(&["ip", "netns", "add", netns])?;
            sh(&["ip", "-n", netns, "link", "set", "lo", "up"])?;
        }
        let (node, switch, pod) = (&world.node, &world.switch, &world.pod);
        // No IPv6 DAD on the node, so link-local addresses are final at once and the node's state
        // does not change under the test's feet.
        sh(&[
            "ip",
            "netns",
            "exec",
            node,
            "sysctl",
            "-qw",
            "net.ipv6.conf.default.accept_dad=0",
        ])?;
        sh(&[
            "ip", "-n", node, "link", "add", "ens4", "type", "veth", "peer", "name", "swp",
            "netns", switch,
        ])?;
        sh(&[
            "ip",
            "-n",
            switch,
            "addr",
            "add",
            &format!("{SWITCH_IP}/16"),
            "dev",
            "swp",
        ])?;
        sh(&["ip", "-n", switch, "link", "set", "swp", "up"])?;
        sh(&[
            "ip",
            "-n",
            node,
            "addr",
            "add",
            &format!("{NODE_IP}/16"),
            "dev",
            "ens4",
        ])?;
        sh(&["ip", "-n", node, "link", "set", "ens4", "up"])?;
        sh(&[
            "ip", "-n", node, "link", "add", "mv0", "link", "ens4", "type", "macvlan", "mode",
            "bridge",
        ])?;
        sh(&["ip", "-n", node, "link", "set", "mv0", "netns", pod])?;
        sh(&["ip", "-n", pod, "link", "set", "mv0", "name", "eth0"])?;
        sh(&[
            "ip",
            "-n",
            pod,
            "addr",
            "add",
            &format!("{POD_IP}/16"),
            "dev",
            "eth0",
        ])?;
        sh(&["ip", "-n", pod, "link", "set", "eth0", "up"])?;
        sh(&["ip", "-n", pod, "route", "add", "default", "via", SWITCH_IP])?;
        Ok(world)
    }

    fn stdin(&self) -> String {
        let pod_netns = netns_path(&self.pod).display().to_string();
        json!({
            "cniVersion": "1.0.0",
            "name": "macvlan",
            "type": "virtnet-coordinator",
            "serviceCIDRs": ["10.96.0.0/12"],
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "mac": "7a:1f:4c:2e:aa:01", "sandbox": pod_netns}],
                "ips": [{"interface": 0, "address": format!("{POD_IP}/16"), "gateway": SWITCH_IP}],
            },
        })
        .to_string()
    }

    /// Runs the coordinator inside the node netns.
    fn coordinator(&self, command: &'static str) -> Result<PluginRun, Box<dyn Error>> {
        let stdin = self.stdin();
        let pod_netns = netns_path(&self.pod).display().to_string();
        let run = in_netns(&self.node, move || {
            run_plugin(
                BINARY,
                &[
                    ("CNI_COMMAND", command),
                    ("CNI_CONTAINERID", CONTAINER_ID),
                    ("CNI_NETNS", &pod_netns),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_PATH", "/opt/cni/bin"),
                ],
                &stdin,
            )
        })??;
        Ok(run)
    }

    fn add(&self) -> TestResult {
        let run = self.coordinator("ADD")?;
        if run.exit_code != Some(0) {
            return Err(format!("ADD failed: {}{}", run.stdout, run.stderr).into());
        }
        Ok(())
    }

    fn del(&self) -> TestResult {
        let run = self.coordinator("DEL")?;
        if run.exit_code != Some(0) {
            return Err(format!("DEL failed: {}{}", run.stdout, run.stderr).into());
        }
        Ok(())
    }

    /// Everything on the node the coordinator could leave behind.
    fn node_state(&self) -> Result<String, Box<dyn Error>> {
        let mut state = String::new();
        for args in [
            &["rule"][..],
            &["-6", "rule"],
            &["route", "show", "table", "all"],
            &["-6", "route", "show", "table", "all"],
            &["neigh"],
            &["link"],
        ] {
            let mut command = vec!["ip", "-n", &self.node];
            command.extend_from_slice(args);
            state.push_str(&sh(&command)?);
        }
        Ok(state)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for netns in [&self.pod, &self.node, &self.switch] {
            if let Err(error) = sh(&["ip", "netns", "del", netns]) {
                eprintln!("cleanup: {error}");
            }
        }
    }
}

fn ping(from: &str, to: &str) -> TestResult {
    sh(&[
        "ip", "netns", "exec", from, "ping", "-c", "1", "-W", "2", to,
    ])?;
    Ok(())
}

#[test]
fn pod_and_node_reach_each_other_and_services_go_via_the_veth() -> TestResult {
    if !is_root() {
        return Ok(());
    }
    let world = World::new()?;
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

#[test]
fn hundred_add_del_cycles_leave_the_node_byte_identical() -> TestResult {
    if !is_root() {
        return Ok(());
    }
    let world = World::new()?;
    let before = world.node_state()?;
    for _ in 0..100 {
        world.add()?;
        world.del()?;
    }
    assert_eq!(world.node_state()?, before);
    Ok(())
}

#[test]
fn failed_add_leaves_nothing_behind() -> TestResult {
    if !is_root() {
        return Ok(());
    }
    let world = World::new()?;
    // A pod that already has a `veth0`: the veth is created on the node, then moving its end
    // into the pod fails, and the rollback must delete it.
    sh(&[
        "ip", "-n", &world.pod, "link", "add", "veth0", "type", "veth", "peer", "name", "other",
    ])?;
    let before = world.node_state()?;
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
