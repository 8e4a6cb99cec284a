//! Nodes, switches and pods built from network namespaces, shared by the root tests and the ADD
//! latency benchmark. Nothing here touches the namespace the caller runs in.
//!
//! The node's underlay NIC `ens4` is a veth whose peer sits in a "switch" netns (holding the
//! underlay gateway); a pod NIC is a macvlan child of a node NIC, created in the node and moved
//! into the pod. Every namespace is deleted on drop, even when the caller fails.

use std::error::Error;
use std::fs::File;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;

use nix::sched::{CloneFlags, setns};
use serde_json::{Value, json};
use virtnet_cni::testing::{PluginRun, run_plugin};

pub type TestResult = Result<(), Box<dyn Error>>;

pub const COORDINATOR: &str = env!("CARGO_BIN_EXE_virtnet-coordinator");
pub const NODE_IP: &str = "10.6.0.5";
pub const SWITCH_IP: &str = "10.6.0.1";
pub const POD_IP: &str = "10.6.153.101";
/// `CNI_PATH` for a plugin that delegates to none.
pub const NO_DELEGATES: &str = "/opt/cni/bin";
pub const CONTAINER_ID: &str = "c0ffee0123456789";

/// The reference CNI plugins' directory from `make tools` (e2e/tools/install), if it holds
/// every plugin of `needed`.
pub fn reference_plugins(needed: &[&str]) -> Option<PathBuf> {
    let cache = std::env::var_os("VIRTNET_E2E_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/virtnet-e2e"), PathBuf::from);
    std::fs::read_dir(cache)
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("cni-plugins-"))
                && needed.iter().all(|plugin| path.join(plugin).is_file())
        })
        .max()
}

/// Why these tests cannot run here, if they cannot.
pub fn missing_root() -> Option<&'static str> {
    (!nix::unistd::geteuid().is_root())
        .then_some("needs root: builds network namespaces, veths and routes")
}

/// Runs a command and returns its stdout, failing with its stderr.
pub fn sh(args: &[&str]) -> Result<String, Box<dyn Error>> {
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
pub fn in_netns<T: Send + 'static>(
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

pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

pub fn ping(from: &str, to: &str) -> TestResult {
    sh(&[
        "ip", "netns", "exec", from, "ping", "-c", "1", "-W", "2", to,
    ])?;
    Ok(())
}

/// A CNI call: the command, the pod interface and the whole plugin config on stdin.
pub struct CniCall<'a> {
    pub binary: &'a str,
    pub command: &'static str,
    pub ifname: &'a str,
    /// Where the plugin finds its delegates (macvlan's IPAM plugin).
    pub cni_path: &'a str,
    pub stdin: String,
}

pub struct World {
    pub node: String,
    pub switch: String,
    pub pod: String,
    tag: String,
    namespaces: Vec<String>,
}

impl World {
    /// A node with `ens4` on a switch, and an empty pod.
    pub fn new() -> Result<Self, Box<dyn Error>> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "vcoord{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut world = Self {
            node: format!("{tag}-node"),
            switch: format!("{tag}-sw"),
            pod: format!("{tag}-pod"),
            tag,
            namespaces: Vec::new(),
        };
        for netns in [world.node.clone(), world.pod.clone()] {
            world.add_netns(&netns)?;
        }
        // No IPv6 DAD on the node, so link-local addresses are final at once and the node's state
        // does not change under the test's feet.
        sh(&[
            "ip",
            "netns",
            "exec",
            &world.node,
            "sysctl",
            "-qw",
            "net.ipv6.conf.default.accept_dad=0",
        ])?;
        let switch = world.switch.clone();
        world.underlay(
            "ens4",
            &switch,
            &format!("{NODE_IP}/16"),
            &format!("{SWITCH_IP}/16"),
        )?;
        Ok(world)
    }

    /// [`World::new`] with the pod's `eth0` already there, as macvlan leaves it.
    pub fn with_pod_nic() -> Result<Self, Box<dyn Error>> {
        let world = Self::new()?;
        world.pod_nic("ens4", "eth0", &format!("{POD_IP}/16"))?;
        sh(&[
            "ip", "-n", &world.pod, "route", "add", "default", "via", SWITCH_IP,
        ])?;
        Ok(world)
    }

    fn add_netns(&mut self, name: &str) -> TestResult {
        sh(&["ip", "netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        sh(&["ip", "-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// A node NIC `nic` whose peer sits in a new `switch` netns with `switch_address`.
    pub fn underlay(
        &mut self,
        nic: &str,
        switch: &str,
        node_address: &str,
        switch_address: &str,
    ) -> TestResult {
        self.add_netns(switch)?;
        let node = &self.node;
        sh(&[
            "ip", "-n", node, "link", "add", nic, "type", "veth", "peer", "name", "swp", "netns",
            switch,
        ])?;
        sh(&[
            "ip",
            "-n",
            switch,
            "addr",
            "add",
            switch_address,
            "dev",
            "swp",
        ])?;
        sh(&["ip", "-n", switch, "link", "set", "swp", "up"])?;
        sh(&["ip", "-n", node, "addr", "add", node_address, "dev", nic])?;
        sh(&["ip", "-n", node, "link", "set", nic, "up"])?;
        Ok(())
    }

    /// A second switch's name.
    pub fn switch_named(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.tag)
    }

    /// Another, empty pod netns, deleted with the others.
    pub fn add_pod(&mut self, suffix: &str) -> Result<String, Box<dyn Error>> {
        let pod = format!("{}-{suffix}", self.tag);
        self.add_netns(&pod)?;
        Ok(pod)
    }

    /// A macvlan child of node NIC `parent`, moved into the pod as `name` with `address`.
    pub fn pod_nic(&self, parent: &str, name: &str, address: &str) -> TestResult {
        self.pod_nic_in(&self.pod, parent, name, address)
    }

    /// [`World::pod_nic`] for pod netns `pod`.
    pub fn pod_nic_in(&self, pod: &str, parent: &str, name: &str, address: &str) -> TestResult {
        let node = &self.node;
        sh(&[
            "ip", "-n", node, "link", "add", "mvtmp", "link", parent, "type", "macvlan", "mode",
            "bridge",
        ])?;
        sh(&["ip", "-n", node, "link", "set", "mvtmp", "netns", pod])?;
        sh(&["ip", "-n", pod, "link", "set", "mvtmp", "name", name])?;
        sh(&["ip", "-n", pod, "addr", "add", address, "dev", name])?;
        sh(&["ip", "-n", pod, "link", "set", name, "up"])?;
        Ok(())
    }

    /// The coordinator's config after macvlan, with `prev_result` for `ifname`.
    pub fn coordinator_config(&self, prev_result: Value) -> String {
        self.network_config("macvlan", prev_result)
    }

    /// [`World::coordinator_config`] for the CNI network named `network`.
    pub fn network_config(&self, network: &str, prev_result: Value) -> String {
        json!({
            "cniVersion": "1.0.0",
            "name": network,
            "type": "virtnet-coordinator",
            "serviceCIDRs": ["10.96.0.0/12"],
            "prevResult": prev_result,
        })
        .to_string()
    }

    /// macvlan's result for one pod NIC.
    pub fn prev_result(&self, ifname: &str, address: &str, gateway: &str) -> Value {
        self.prev_result_in(&self.pod, ifname, address, gateway)
    }

    /// [`World::prev_result`] for pod netns `pod`.
    pub fn prev_result_in(&self, pod: &str, ifname: &str, address: &str, gateway: &str) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": ifname, "mac": "7a:1f:4c:2e:aa:01", "sandbox": netns_path(pod)}],
            "ips": [{"interface": 0, "address": address, "gateway": gateway}],
        })
    }

    /// Runs a CNI plugin inside the node netns, as the container runtime would.
    pub fn run(&self, call: CniCall<'_>) -> Result<PluginRun, Box<dyn Error>> {
        self.run_for(call, &self.pod, CONTAINER_ID)
    }

    /// [`World::run`] for container `container_id` with pod netns `pod`.
    pub fn run_for(
        &self,
        call: CniCall<'_>,
        pod: &str,
        container_id: &str,
    ) -> Result<PluginRun, Box<dyn Error>> {
        let pod_netns = netns_path(pod).display().to_string();
        let (binary, command, ifname, cni_path, stdin, container_id) = (
            call.binary.to_owned(),
            call.command,
            call.ifname.to_owned(),
            call.cni_path.to_owned(),
            call.stdin,
            container_id.to_owned(),
        );
        Ok(in_netns(&self.node, move || {
            run_plugin(
                &binary,
                &[
                    ("CNI_COMMAND", command),
                    ("CNI_CONTAINERID", &container_id),
                    ("CNI_NETNS", &pod_netns),
                    ("CNI_IFNAME", &ifname),
                    ("CNI_PATH", &cni_path),
                ],
                &stdin,
            )
        })??)
    }

    /// Runs the coordinator for the pod's `eth0`, failing unless it succeeds.
    pub fn coordinator(&self, command: &'static str) -> Result<PluginRun, Box<dyn Error>> {
        self.run(CniCall {
            binary: COORDINATOR,
            command,
            ifname: "eth0",
            cni_path: NO_DELEGATES,
            stdin: self.coordinator_config(self.prev_result(
                "eth0",
                &format!("{POD_IP}/16"),
                SWITCH_IP,
            )),
        })
    }

    pub fn succeeds(run: PluginRun) -> Result<PluginRun, Box<dyn Error>> {
        if run.exit_code != Some(0) {
            return Err(format!("plugin failed: {}{}", run.stdout, run.stderr).into());
        }
        Ok(run)
    }

    pub fn add(&self) -> TestResult {
        Self::succeeds(self.coordinator("ADD")?).map(drop)
    }

    pub fn del(&self) -> TestResult {
        Self::succeeds(self.coordinator("DEL")?).map(drop)
    }

    /// Everything on the node the coordinator could leave behind.
    pub fn node_state(&self) -> Result<String, Box<dyn Error>> {
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
        for netns in self.namespaces.iter().rev() {
            if let Err(error) = sh(&["ip", "netns", "del", netns]) {
                eprintln!("cleanup: {error}");
            }
        }
    }
}
