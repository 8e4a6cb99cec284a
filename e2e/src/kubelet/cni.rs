//! CNI network config loading and plugin-chain execution, done the way libcni does it for
//! containerd, so plugins under test see exactly what they would see on a real node.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::{io::AsyncWriteExt, process::Command};
use tracing::debug;

use super::error::{CniCallError, CniCommand};

/// The interface name containerd gives the pod's primary network.
pub const POD_IFNAME: &str = "eth0";

/// How long one plugin may run. A real runtime bounds RunPodSandbox by the kubelet's 2-minute
/// runtime request timeout; a hung plugin must not hold its pod forever.
pub const PLUGIN_TIMEOUT: Duration = Duration::from_secs(120);

/// The file extensions containerd passes to libcni's `ConfFiles`.
const CONFIG_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];

/// The first spec version whose DEL receives the cached ADD result as `prevResult`.
const PREV_RESULT_ON_DEL_SINCE: (u64, u64, u64) = (0, 4, 0);

/// A network configuration list: a `.conflist`, or a single-plugin `.conf`/`.json` wrapped in
/// one. It is persisted with each sandbox so DEL runs with the config ADD ran with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkConfigList {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub name: String,
    pub plugins: Vec<Map<String, Value>>,
}

/// Loads the network config containerd would use: the lexically first config file in `dir`.
pub async fn load_network_config(dir: &Path) -> Result<NetworkConfigList, CniCallError> {
    let read_dir_error = |source| CniCallError::ReadConfDir {
        dir: dir.to_owned(),
        source,
    };
    let mut entries = tokio::fs::read_dir(dir).await.map_err(read_dir_error)?;
    let mut file_names = Vec::new();
    while let Some(entry) = entries.next_entry().await.map_err(read_dir_error)? {
        let is_dir = entry.file_type().await.is_ok_and(|kind| kind.is_dir());
        if let (false, Some(name)) = (is_dir, entry.file_name().to_str()) {
            file_names.push(name.to_owned());
        }
    }
    let chosen =
        pick_network_config_file(&file_names).ok_or_else(|| CniCallError::NoNetworkConfig {
            dir: dir.to_owned(),
        })?;
    let path = dir.join(chosen);
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|source| CniCallError::ReadConfig {
            path: path.clone(),
            source,
        })?;
    parse_network_config(&path, &bytes)
}

/// libcni lists the directory, keeps the config extensions and sorts the names bytewise;
/// containerd then takes the first one.
fn pick_network_config_file(file_names: &[String]) -> Option<&str> {
    file_names
        .iter()
        .map(String::as_str)
        .filter(|name| {
            Path::new(name)
                .extension()
                .and_then(|extension| extension.to_str())
                .is_some_and(|extension| CONFIG_EXTENSIONS.contains(&extension))
        })
        .min()
}

/// A `.conflist` is a list; any other config file is one plugin, wrapped like libcni's
/// `ConfListFromConf` does.
fn parse_network_config(path: &Path, bytes: &[u8]) -> Result<NetworkConfigList, CniCallError> {
    let invalid = |reason: String| CniCallError::InvalidConfig {
        path: path.to_owned(),
        reason,
    };
    let document: Map<String, Value> = serde_json::from_slice(bytes)
        .map_err(|error| invalid(format!("not a JSON object: {error}")))?;
    let text_field = |key: &str| -> Result<String, CniCallError> {
        match document.get(key).and_then(Value::as_str) {
            Some(text) if !text.is_empty() => Ok(text.to_owned()),
            _ => Err(invalid(format!(
                "{key:?} is missing or not a non-empty string"
            ))),
        }
    };
    let name = text_field("name")?;
    let cni_version = text_field("cniVersion")?;
    let is_list = path
        .extension()
        .is_some_and(|extension| extension == "conflist");
    let plugins = if is_list {
        let Some(Value::Array(plugins)) = document.get("plugins") else {
            return Err(invalid(r#""plugins" is missing or not a list"#.to_owned()));
        };
        plugins
            .iter()
            .map(|plugin| match plugin {
                Value::Object(plugin) => Ok(plugin.clone()),
                _ => Err(invalid(
                    "every entry of \"plugins\" must be an object".to_owned(),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?
    } else {
        vec![document.clone()]
    };
    if plugins.is_empty() {
        return Err(invalid(r#""plugins" is empty"#.to_owned()));
    }
    if let Some(position) = plugins
        .iter()
        .position(|plugin| plugin_type(plugin).is_empty())
    {
        return Err(invalid(format!("plugin {position} has no \"type\"")));
    }
    Ok(NetworkConfigList {
        cni_version,
        name,
        plugins,
    })
}

fn plugin_type(plugin: &Map<String, Value>) -> &str {
    plugin
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The `CNI_ARGS` containerd passes for a Kubernetes pod, in containerd's order.
pub fn pod_cni_args(namespace: &str, name: &str, uid: &str, container_id: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};\
         K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={uid}"
    )
}

/// Which attachment a plugin works on: libcni's `RuntimeConf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeConf {
    pub container_id: String,
    pub netns: PathBuf,
    pub if_name: String,
    pub args: String,
}

/// Runs plugin chains from one binary directory (`CNI_PATH`).
#[derive(Debug, Clone)]
pub struct PluginRunner {
    bin_dir: PathBuf,
    timeout: Duration,
}

impl PluginRunner {
    pub fn new(bin_dir: PathBuf, timeout: Duration) -> Self {
        Self { bin_dir, timeout }
    }

    /// ADD through the chain in order, each plugin getting the previous one's result; returns
    /// the last result.
    pub async fn add_network_list(
        &self,
        list: &NetworkConfigList,
        runtime: &RuntimeConf,
    ) -> Result<Value, CniCallError> {
        let mut prev_result = None;
        for plugin in &list.plugins {
            let stdout = self
                .exec(list, plugin, CniCommand::Add, runtime, prev_result.as_ref())
                .await?;
            prev_result = Some(parse_result(list, plugin, &stdout)?);
        }
        prev_result.ok_or_else(|| CniCallError::NoPlugins {
            network: list.name.clone(),
        })
    }

    /// DEL through the chain in reverse, each plugin getting the cached ADD result (from spec
    /// 0.4.0 on). Stops at the first failure, as libcni does.
    pub async fn del_network_list(
        &self,
        list: &NetworkConfigList,
        runtime: &RuntimeConf,
        cached_result: Option<&Value>,
    ) -> Result<(), CniCallError> {
        let prev_result = cached_result.filter(|_| receives_prev_result_on_del(&list.cni_version));
        for plugin in list.plugins.iter().rev() {
            self.exec(list, plugin, CniCommand::Del, runtime, prev_result)
                .await?;
        }
        Ok(())
    }

    async fn exec(
        &self,
        list: &NetworkConfigList,
        plugin: &Map<String, Value>,
        command: CniCommand,
        runtime: &RuntimeConf,
        prev_result: Option<&Value>,
    ) -> Result<Vec<u8>, CniCallError> {
        let plugin_type = plugin_type(plugin);
        let path = self.bin_dir.join(plugin_type);
        let is_file = tokio::fs::metadata(&path)
            .await
            .is_ok_and(|metadata| metadata.is_file());
        if plugin_type.is_empty() || !is_file {
            return Err(CniCallError::PluginNotFound {
                plugin_type: plugin_type.to_owned(),
                bin_dir: self.bin_dir.clone(),
            });
        }
        let stdin = plugin_stdin(list, plugin, prev_result)
            .to_string()
            .into_bytes();
        debug!(
            plugin = plugin_type,
            network = list.name,
            container_id = runtime.container_id,
            %command,
            "running CNI plugin"
        );
        let mut child = Command::new(&path)
            .env("CNI_COMMAND", command.env_value())
            .env("CNI_CONTAINERID", &runtime.container_id)
            .env("CNI_NETNS", &runtime.netns)
            .env("CNI_IFNAME", &runtime.if_name)
            .env("CNI_ARGS", &runtime.args)
            .env("CNI_PATH", &self.bin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A timed-out plugin is dropped, and must not live on as a stray process.
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| CniCallError::Spawn {
                path: path.clone(),
                source,
            })?;
        let stdin_pipe = child.stdin.take();
        let feed_stdin = async move {
            if let Some(mut pipe) = stdin_pipe {
                // A plugin that exits without reading its config breaks the pipe; its exit
                // status and output say what went wrong, so the write error adds nothing.
                let _ = pipe.write_all(&stdin).await;
            }
        };
        let run = async { tokio::join!(feed_stdin, child.wait_with_output()).1 };
        let timed_out = || CniCallError::TimedOut {
            plugin_type: plugin_type.to_owned(),
            network: list.name.clone(),
            command,
            timeout: self.timeout,
        };
        let output = tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| timed_out())?
            .map_err(|source| CniCallError::Spawn {
                path: path.clone(),
                source,
            })?;
        if !output.stderr.is_empty() {
            debug!(
                plugin = plugin_type,
                stderr = %String::from_utf8_lossy(&output.stderr),
                "CNI plugin wrote to stderr"
            );
        }
        if output.status.success() {
            Ok(output.stdout)
        } else {
            Err(CniCallError::PluginFailed {
                plugin_type: plugin_type.to_owned(),
                network: list.name.clone(),
                command,
                message: plugin_failure_message(&output.stdout, &output.stderr, output.status),
            })
        }
    }
}

/// The stdin of one plugin: its own config with the list's `name` and `cniVersion` and the
/// previous result injected, like libcni's `buildOneConfig`. The result is passed as is.
fn plugin_stdin(
    list: &NetworkConfigList,
    plugin: &Map<String, Value>,
    prev_result: Option<&Value>,
) -> Value {
    let mut config = plugin.clone();
    config.insert("name".to_owned(), Value::String(list.name.clone()));
    config.insert(
        "cniVersion".to_owned(),
        Value::String(list.cni_version.clone()),
    );
    if let Some(prev_result) = prev_result {
        config.insert("prevResult".to_owned(), prev_result.clone());
    }
    Value::Object(config)
}

fn parse_result(
    list: &NetworkConfigList,
    plugin: &Map<String, Value>,
    stdout: &[u8],
) -> Result<Value, CniCallError> {
    let invalid = |reason: String| CniCallError::InvalidResult {
        plugin_type: plugin_type(plugin).to_owned(),
        network: list.name.clone(),
        reason,
        stdout: String::from_utf8_lossy(stdout).into_owned(),
    };
    match serde_json::from_slice(stdout) {
        Ok(result @ Value::Object(_)) => Ok(result),
        Ok(_) => Err(invalid("not a JSON object".to_owned())),
        Err(error) => Err(invalid(error.to_string())),
    }
}

/// The error a failed plugin reports, worded like libcni's `pluginErr`: the CNI error object's
/// `msg` (plus `details`) when stdout has one, else whatever the plugin left on stderr.
fn plugin_failure_message(stdout: &[u8], stderr: &[u8], status: ExitStatus) -> String {
    #[derive(Deserialize)]
    struct CniErrorReply {
        #[serde(default)]
        msg: String,
        #[serde(default)]
        details: String,
    }
    if stdout.is_empty() {
        return if stderr.is_empty() {
            format!("netplugin failed with no error message: {status}")
        } else {
            format!("netplugin failed: {:?}", String::from_utf8_lossy(stderr))
        };
    }
    match serde_json::from_slice::<CniErrorReply>(stdout) {
        Ok(reply) if reply.details.is_empty() => reply.msg,
        Ok(reply) => format!("{}; {}", reply.msg, reply.details),
        Err(error) => format!(
            "netplugin failed but error parsing its diagnostic message {:?}: {error}",
            String::from_utf8_lossy(stdout)
        ),
    }
}

/// Whether a chain of this spec version gets the cached result on DEL; an unparseable version
/// gets none, which every plugin accepts.
fn receives_prev_result_on_del(cni_version: &str) -> bool {
    let mut parts = cni_version.split('.').map(str::parse::<u64>);
    let mut next = || parts.next().unwrap_or(Ok(0));
    match (next(), next(), next()) {
        (Ok(major), Ok(minor), Ok(patch)) => (major, minor, patch) >= PREV_RESULT_ON_DEL_SINCE,
        _ => false,
    }
}

/// The addresses a result gives the pod's interface `if_name`: the `ips` whose `interface`
/// index names that interface inside the sandbox, as containerd picks them. Results that do
/// not tie addresses to interfaces give all their addresses.
pub fn interface_ips(result: &Value, if_name: &str) -> Result<Vec<IpAddr>, String> {
    #[derive(Deserialize)]
    struct ResultShape {
        #[serde(default)]
        interfaces: Vec<Interface>,
        #[serde(default)]
        ips: Vec<IpConfig>,
    }
    #[derive(Deserialize)]
    struct Interface {
        name: String,
        #[serde(default)]
        sandbox: String,
    }
    #[derive(Deserialize)]
    struct IpConfig {
        address: String,
        interface: Option<usize>,
    }
    let shape = ResultShape::deserialize(result).map_err(|error| error.to_string())?;
    let on_pod_interface = |ip: &&IpConfig| {
        ip.interface
            .and_then(|index| shape.interfaces.get(index))
            .is_some_and(|interface| interface.name == if_name && !interface.sandbox.is_empty())
    };
    let chosen: Vec<&IpConfig> = if shape.ips.iter().any(|ip| on_pod_interface(&ip)) {
        shape.ips.iter().filter(on_pod_interface).collect()
    } else {
        shape.ips.iter().collect()
    };
    chosen
        .into_iter()
        .map(|ip| {
            let address = ip
                .address
                .split_once('/')
                .map_or(ip.address.as_str(), |(address, _)| address);
            address
                .parse()
                .map_err(|error| format!("address {:?}: {error}", ip.address))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn the_lexically_first_config_file_wins_whatever_its_kind() {
        let files = names(&["99-last.conflist", "10-multus.conf", "20-virtnet.conflist"]);
        assert_eq!(pick_network_config_file(&files), Some("10-multus.conf"));
        let files = names(&["b.json", "a.conflist", "0-readme.txt", "00.conf.bak"]);
        assert_eq!(pick_network_config_file(&files), Some("a.conflist"));
    }

    #[test]
    fn files_without_a_config_extension_are_ignored() {
        let files = names(&["README.md", "net.conflist.disabled", "conflist", "x.yaml"]);
        assert_eq!(pick_network_config_file(&files), None);
    }

    #[test]
    fn sorting_is_bytewise_like_go() {
        // Upper case sorts before lower case in Go's sort.Strings.
        let files = names(&["a.conf", "B.conf", "10.conf", "9.conf"]);
        assert_eq!(pick_network_config_file(&files), Some("10.conf"));
        let files = names(&["a.conf", "B.conf"]);
        assert_eq!(pick_network_config_file(&files), Some("B.conf"));
    }

    #[test]
    fn a_conflist_keeps_its_plugins_in_order() {
        let bytes = json!({
            "cniVersion": "1.0.0", "name": "underlay",
            "plugins": [{"type": "macvlan", "master": "ens192"}, {"type": "tuning"}]
        })
        .to_string();
        let list = parse_network_config(Path::new("/etc/cni/net.d/10.conflist"), bytes.as_bytes())
            .expect("valid conflist");
        assert_eq!(list.name, "underlay");
        assert_eq!(list.cni_version, "1.0.0");
        let types: Vec<&str> = list.plugins.iter().map(plugin_type).collect();
        assert_eq!(types, ["macvlan", "tuning"]);
    }

    #[test]
    fn a_conf_file_is_a_list_of_one_plugin() {
        let conf = json!({"cniVersion": "0.3.1", "name": "multus-cni-network", "type": "multus",
                          "kubeconfig": "/etc/cni/net.d/multus.kubeconfig"});
        for file in ["00-multus.conf", "00-multus.json"] {
            let path = PathBuf::from("/etc/cni/net.d").join(file);
            let list =
                parse_network_config(&path, conf.to_string().as_bytes()).expect("valid conf");
            assert_eq!(list.name, "multus-cni-network");
            assert_eq!(list.plugins.len(), 1);
            assert_eq!(Value::Object(list.plugins[0].clone()), conf);
        }
    }

    #[test]
    fn broken_configs_are_rejected_with_the_reason() {
        let path = Path::new("/etc/cni/net.d/10.conflist");
        let cases = [
            (
                json!({"cniVersion": "1.0.0", "plugins": [{"type": "x"}]}),
                "\"name\"",
            ),
            (
                json!({"name": "n", "plugins": [{"type": "x"}]}),
                "\"cniVersion\"",
            ),
            (
                json!({"cniVersion": "1.0.0", "name": "n", "plugins": []}),
                "empty",
            ),
            (
                json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"master": "x"}]}),
                "type",
            ),
            (
                json!({"cniVersion": "1.0.0", "name": "n", "type": "macvlan"}),
                "\"plugins\"",
            ),
        ];
        for (config, expected) in cases {
            let error = parse_network_config(path, config.to_string().as_bytes())
                .expect_err("invalid config");
            assert!(
                error.to_string().contains(expected),
                "{error} lacks {expected}"
            );
        }
        let conf = json!({"cniVersion": "1.0.0", "name": "n"});
        let error = parse_network_config(Path::new("/x/a.conf"), conf.to_string().as_bytes())
            .expect_err("a .conf needs a type");
        assert!(error.to_string().contains("type"), "{error}");
    }

    fn two_plugin_list() -> NetworkConfigList {
        NetworkConfigList {
            cni_version: "1.0.0".to_owned(),
            name: "underlay".to_owned(),
            plugins: vec![
                json!({"type": "macvlan", "name": "ignored", "cniVersion": "0.1.0", "master": "ens192"})
                    .as_object()
                    .cloned()
                    .expect("object"),
                json!({"type": "tuning"}).as_object().cloned().expect("object"),
            ],
        }
    }

    #[test]
    fn every_plugin_gets_the_list_name_and_version() {
        let list = two_plugin_list();
        let stdin = plugin_stdin(&list, &list.plugins[0], None);
        assert_eq!(
            stdin,
            json!({"type": "macvlan", "name": "underlay", "cniVersion": "1.0.0", "master": "ens192"})
        );
    }

    #[test]
    fn the_previous_result_is_passed_unchanged() {
        let list = two_plugin_list();
        let prev =
            json!({"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.6.0.5/16"}]});
        let stdin = plugin_stdin(&list, &list.plugins[1], Some(&prev));
        assert_eq!(
            stdin,
            json!({"type": "tuning", "name": "underlay", "cniVersion": "1.0.0", "prevResult": prev})
        );
    }

    #[test]
    fn cni_args_match_containerd() {
        assert_eq!(
            pod_cni_args("default", "web-0", "0123-abcd", "c0ffee"),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=0123-abcd"
        );
    }

    #[test]
    fn del_gets_the_cached_result_from_spec_0_4_0_on() {
        for version in ["0.4.0", "1.0.0", "1.1.0", "0.10.0"] {
            assert!(receives_prev_result_on_del(version), "{version}");
        }
        for version in ["0.3.1", "0.2.0", "", "latest"] {
            assert!(!receives_prev_result_on_del(version), "{version}");
        }
    }

    #[test]
    fn a_cni_error_reply_becomes_its_message() {
        let stdout = br#"{"cniVersion":"1.0.0","code":7,"msg":"no free IP in pool web","details":"pool exhausted"}"#;
        let status = exit_status(1);
        assert_eq!(
            plugin_failure_message(stdout, b"", status),
            "no free IP in pool web; pool exhausted"
        );
        let stdout = br#"{"code":11,"msg":"try again later"}"#;
        assert_eq!(
            plugin_failure_message(stdout, b"noise", status),
            "try again later"
        );
        assert_eq!(
            plugin_failure_message(b"", b"panic: boom", status),
            "netplugin failed: \"panic: boom\""
        );
        assert!(plugin_failure_message(b"", b"", status).contains("no error message"));
        assert!(plugin_failure_message(b"oops", b"", status).contains("\"oops\""));
    }

    fn exit_status(code: i32) -> ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        ExitStatus::from_raw(code << 8)
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("valid IP")
    }

    #[test]
    fn eth0_addresses_are_picked_from_a_multi_interface_1_0_0_result() {
        // Multus' shape: the cluster network on eth0, a secondary network on net1, and the
        // host side of a veth (no sandbox) carrying an address of its own.
        let result = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "veth1234", "mac": "aa:aa:aa:aa:aa:01"},
                {"name": "eth0", "mac": "aa:aa:aa:aa:aa:02", "sandbox": "/run/netns/e2e-pod-0123abcd"},
                {"name": "net1", "mac": "aa:aa:aa:aa:aa:03", "sandbox": "/run/netns/e2e-pod-0123abcd"}
            ],
            "ips": [
                {"address": "169.254.1.1/32", "interface": 0},
                {"address": "10.6.0.10/16", "gateway": "10.6.0.1", "interface": 1},
                {"address": "192.168.5.7/24", "interface": 2},
                {"address": "fd00:6::10/64", "interface": 1}
            ]
        });
        assert_eq!(
            interface_ips(&result, POD_IFNAME),
            Ok(vec![ip("10.6.0.10"), ip("fd00:6::10")])
        );
    }

    #[test]
    fn eth0_addresses_are_picked_from_a_multi_interface_0_3_1_result() {
        let result = json!({
            "cniVersion": "0.3.1",
            "interfaces": [
                {"name": "net1", "sandbox": "/run/netns/p"},
                {"name": "eth0", "sandbox": "/run/netns/p"}
            ],
            "ips": [
                {"version": "4", "address": "192.168.5.7/24", "interface": 0},
                {"version": "4", "address": "10.6.0.11/16", "gateway": "10.6.0.1", "interface": 1}
            ],
            "dns": {}
        });
        assert_eq!(
            interface_ips(&result, POD_IFNAME),
            Ok(vec![ip("10.6.0.11")])
        );
    }

    #[test]
    fn results_without_an_eth0_in_the_sandbox_give_all_addresses() {
        let ipam_only = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.6.0.12/16"}]});
        assert_eq!(
            interface_ips(&ipam_only, POD_IFNAME),
            Ok(vec![ip("10.6.0.12")])
        );
        let host_side_eth0 = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0"}],
            "ips": [{"address": "10.6.0.13/16", "interface": 0}, {"address": "10.6.0.14/16"}]
        });
        assert_eq!(
            interface_ips(&host_side_eth0, POD_IFNAME),
            Ok(vec![ip("10.6.0.13"), ip("10.6.0.14")])
        );
    }

    #[test]
    fn unreadable_addresses_are_reported() {
        let result = json!({"cniVersion": "1.0.0", "ips": [{"address": "not-an-ip/24"}]});
        let error = interface_ips(&result, POD_IFNAME).expect_err("bad address");
        assert!(error.contains("not-an-ip"), "{error}");
    }
}
