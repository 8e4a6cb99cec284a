//! What the agent puts on its node before it reports ready: virtnet-ipam and virtnet-coordinator
//! in the node's CNI bin dir and, in default-CNI mode, the default conflist (macvlan or ipvlan on
//! the node's NIC + virtnet-ipam + virtnet-coordinator) in its CNI conf dir.
//!
//! [`plan`] decides everything from the flags alone (pure, unit-tested); [`install`] then reads
//! and checks every input (the plugin binaries, the directories, the master NIC) and only then
//! writes, each file atomically ([`NodeFile::put`]: temp file in the same directory, fsync,
//! rename) and only when it differs, so a restarted agent leaves identical files untouched and a
//! runtime never reads half a file. Nothing else in those directories is touched.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
use tracing::{info, warn};
use virtnet_cni::NetworkConfig;
use virtnet_cni::trusted::TrustedDirs;
use virtnet_ipam::config::IpamConfig;

/// Sorts before other CNI configs (libcni and the runtimes take the lexically first). A Multus
/// installer that wraps the node's first config still sorts before it.
pub const CONFLIST_NAME: &str = "00-virtnet.conflist";
/// The plugins the agent installs, by binary name.
pub const PLUGINS: [&str; 2] = [virtnet_ipam::PLUGIN_NAME, "virtnet-coordinator"];
/// Where the kernel lists the interfaces of the caller's network namespace (the host's, for a
/// hostNetwork agent). Not /sys/class/net: sysfs shows the namespace it was mounted in.
const INTERFACES: &str = "/proc/self/net/dev";

/// The plugins run from the node's bin dir; the conflist is only read.
const PLUGIN_MODE: u32 = 0o755;
const CONFLIST_MODE: u32 = 0o644;

/// A node file the agent cannot put in place; each message says which setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(
        "default-CNI mode needs the node interface pods attach to: set --cni-master \
         (VIRTNET_CNI_MASTER, chart value agent.cni.master), e.g. ens192"
    )]
    MissingMaster,
    #[error("--cni-master {name:?} is not an interface name: {reason}")]
    InvalidMaster { name: String, reason: String },
    #[error(
        "--cni-master {name:?} does not exist on this node (it has {present}); set \
         agent.cni.master to the node's underlay NIC"
    )]
    MasterNotFound { name: String, present: String },
    #[error(
        "default-CNI mode needs the Subnet(s) pods get addresses from when they name none: set \
         --cni-default-subnets (VIRTNET_CNI_DEFAULT_SUBNETS, chart value agent.cni.defaultSubnets)"
    )]
    NoDefaultSubnets,
    #[error(
        "virtnet-ipam would reject the conflist these settings make: {reason}; check \
         --cni-default-subnets and --cni-version (chart values agent.cni.defaultSubnets, \
         agent.cni.cniVersion)"
    )]
    RejectedConflist { reason: String },
    #[error(
        "cannot read the plugin {}: {source}; point --cni-plugins-source \
         (VIRTNET_CNI_PLUGINS_SOURCE) at the directory holding {}",
        path.display(), PLUGINS.join(" and ")
    )]
    MissingPlugin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} is not a directory: mount the node's CNI {what} directory there (hostPath) or set \
         --{flag}",
        path.display()
    )]
    MissingDirectory {
        path: PathBuf,
        what: &'static str,
        flag: &'static str,
    },
    #[error("cannot list the node's interfaces in {INTERFACES}: {0}")]
    ListInterfaces(std::io::Error),
    #[error(
        "cannot write {}: {source}; the agent needs the node directory mounted read-write and \
         must run as root",
        path.display()
    )]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The interface plugin of the default network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InterfaceKind {
    /// macvlan in bridge mode: pods on one NIC reach each other (the example).
    Macvlan,
    /// ipvlan in l2 mode: one MAC address for every pod, for NICs or switches that allow only one.
    Ipvlan,
}

impl InterfaceKind {
    fn plugin_type(self) -> &'static str {
        match self {
            Self::Macvlan => "macvlan",
            Self::Ipvlan => "ipvlan",
        }
    }

    fn mode(self) -> &'static str {
        match self {
            Self::Macvlan => "bridge",
            Self::Ipvlan => "l2",
        }
    }
}

/// What the agent installs on its node; the environment names are the ones the chart sets.
#[derive(clap::Args, Debug, Clone)]
pub struct CniInstallArgs {
    /// Copy virtnet-ipam and virtnet-coordinator into --cni-bin-dir at start-up.
    #[arg(long, env = "VIRTNET_CNI_INSTALL", default_value_t = true, action = clap::ArgAction::Set)]
    pub cni_install: bool,
    /// Where the plugins to install are (the image keeps them next to `virtnet`).
    #[arg(
        long,
        env = "VIRTNET_CNI_PLUGINS_SOURCE",
        default_value = "/usr/local/bin"
    )]
    pub cni_plugins_source: PathBuf,
    /// The node's CNI bin dir (the host's /opt/cni/bin, mounted).
    #[arg(long, env = "VIRTNET_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The node's CNI conf dir (the host's /etc/cni/net.d, mounted).
    #[arg(long, env = "VIRTNET_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Default-CNI mode: write 00-virtnet.conflist, VirtNet as the node's default network.
    #[arg(long, env = "VIRTNET_DEFAULT_CNI", default_value_t = false, action = clap::ArgAction::Set)]
    pub default_cni: bool,
    /// Default-CNI mode: the node NIC the pod interfaces are created on, e.g. ens192.
    #[arg(long, env = "VIRTNET_CNI_MASTER")]
    pub cni_master: Option<String>,
    /// Default-CNI mode: the interface plugin.
    #[arg(long, env = "VIRTNET_CNI_MODE", value_enum, default_value_t = InterfaceKind::Macvlan)]
    pub cni_mode: InterfaceKind,
    /// Default-CNI mode: the Subnet(s) pods without an annotation get addresses from, one per
    /// address family (comma-separated).
    #[arg(long, env = "VIRTNET_CNI_DEFAULT_SUBNETS", value_delimiter = ',')]
    pub cni_default_subnets: Vec<String>,
    /// Default-CNI mode: the conflist's cniVersion. 1.0.0 is what containerd 1.7+, CRI-O and
    /// Multus v4 all run; 1.1.0 adds GC and STATUS where the runtime supports them.
    #[arg(long, env = "VIRTNET_CNI_VERSION", default_value = "1.0.0")]
    pub cni_version: String,
}

/// One file the agent keeps on the node: where, what, with which permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFile {
    pub path: PathBuf,
    pub content: Vec<u8>,
    pub mode: u32,
}

/// Everything [`install`] does, decided from the flags alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallPlan {
    /// (source, destination) of each plugin binary.
    pub plugins: Vec<(PathBuf, PathBuf)>,
    /// The default network, in default-CNI mode.
    pub conflist: Option<NodeFile>,
    /// The NIC the conflist names, which must exist on the node.
    pub master: Option<String>,
}

/// Whether [`NodeFile::put`] had to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Unchanged,
    Written,
}

/// Decides what to install. `socket` is the agent's own socket, which the conflist names so the
/// plugins find this agent wherever it listens.
pub fn plan(args: &CniInstallArgs, socket: &Path) -> Result<InstallPlan, InstallError> {
    let plugins = if args.cni_install {
        PLUGINS
            .iter()
            .map(|plugin| {
                (
                    args.cni_plugins_source.join(plugin),
                    args.cni_bin_dir.join(plugin),
                )
            })
            .collect()
    } else {
        Vec::new()
    };
    if !args.default_cni {
        return Ok(InstallPlan {
            plugins,
            conflist: None,
            master: None,
        });
    }
    let master = args.cni_master.clone().ok_or(InstallError::MissingMaster)?;
    virtnet_cni::env::check_interface_name(&master).map_err(|reason| {
        InstallError::InvalidMaster {
            name: master.clone(),
            reason,
        }
    })?;
    if args.cni_default_subnets.is_empty() {
        return Err(InstallError::NoDefaultSubnets);
    }
    let conflist = Conflist::new(args, &master, socket).render()?;
    check_with_virtnet_ipam(&conflist, socket)?;
    Ok(InstallPlan {
        plugins,
        conflist: Some(NodeFile {
            path: args.cni_conf_dir.join(CONFLIST_NAME),
            content: conflist.into_bytes(),
            mode: CONFLIST_MODE,
        }),
        master: Some(master),
    })
}

/// Reads and checks every input, then puts each file in place. Runs once at start-up, before
/// the agent reports ready. The files stay when the agent stops: pods keep being created and
/// deleted during an agent upgrade or restart, and a runtime that finds no network config marks
/// the node NotReady and cannot run DEL for the pods it has; without the agent, ADD fails with a
/// clear "agent unreachable" error and is retried, which is what we want.
pub fn install(args: &CniInstallArgs, socket: &Path) -> Result<(), InstallError> {
    let plan = plan(args, socket)?;
    let mut files = Vec::new();
    if !plan.plugins.is_empty() {
        require_directory(&args.cni_bin_dir, "bin", "cni-bin-dir")?;
    }
    for (source, destination) in &plan.plugins {
        let content = fs::read(source).map_err(|error| InstallError::MissingPlugin {
            path: source.clone(),
            source: error,
        })?;
        files.push(NodeFile {
            path: destination.clone(),
            content,
            mode: PLUGIN_MODE,
        });
    }
    if let Some(master) = &plan.master {
        let listing = fs::read_to_string(INTERFACES).map_err(InstallError::ListInterfaces)?;
        let present = interface_names(&listing);
        if !present.contains(&master.as_str()) {
            return Err(InstallError::MasterNotFound {
                name: master.clone(),
                present: present.join(", "),
            });
        }
    }
    match plan.conflist {
        Some(conflist) => {
            require_directory(&args.cni_conf_dir, "conf", "cni-conf-dir")?;
            files.push(conflist);
        }
        // Not removed: the agent cannot tell whether pods still need it for their DEL.
        None if args.cni_conf_dir.join(CONFLIST_NAME).exists() => warn!(
            path = %args.cni_conf_dir.join(CONFLIST_NAME).display(),
            "default-CNI mode is off, but VirtNet's conflist from an earlier run is still the \
             node's default network; delete it on the node if VirtNet should not be"
        ),
        None => {}
    }
    for file in &files {
        let outcome = file.put()?;
        info!(path = %file.path.display(), ?outcome, "CNI file in place");
    }
    Ok(())
}

fn require_directory(
    path: &Path,
    what: &'static str,
    flag: &'static str,
) -> Result<(), InstallError> {
    if path.is_dir() {
        Ok(())
    } else {
        Err(InstallError::MissingDirectory {
            path: path.to_owned(),
            what,
            flag,
        })
    }
}

/// The interface names in a /proc/net/dev listing (two header lines, then `name: counters`).
fn interface_names(listing: &str) -> Vec<&str> {
    listing
        .lines()
        .skip(2)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, _)| name.trim())
        .collect()
}

impl NodeFile {
    /// Makes the file hold `content` with `mode`: nothing when it already does, else a temp file
    /// in the same directory (so the rename stays on one filesystem), fsynced, renamed over the
    /// old one, and the directory fsynced. A runtime sees the old file or the new one, never a
    /// partial one, and a plugin binary being executed is replaced without ETXTBSY. The temp
    /// name is hidden and ends in `.tmp`, which neither libcni nor a runtime picks up.
    pub fn put(&self) -> Result<Outcome, InstallError> {
        let failed = |source| InstallError::Write {
            path: self.path.clone(),
            source,
        };
        if self.is_in_place() {
            return Ok(Outcome::Unchanged);
        }
        let directory = self.path.parent().unwrap_or_else(|| Path::new("."));
        let file_name = self
            .path
            .file_name()
            .map(|name| name.to_string_lossy())
            .unwrap_or_default();
        let temp = directory.join(format!(".{file_name}.tmp"));
        // A leftover of a crashed write is ours to replace; whatever sits there, it is unlinked,
        // not followed: the file is created anew (O_EXCL) and never through a symlink
        // (O_NOFOLLOW), so a link planted in the host directory cannot redirect the write.
        match fs::remove_file(&temp) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(failed(error));
            }
            _ => {}
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .mode(self.mode)
            .open(&temp)
            .map_err(failed)?;
        file.write_all(&self.content).map_err(failed)?;
        // `mode` above is filtered by the umask.
        file.set_permissions(fs::Permissions::from_mode(self.mode))
            .map_err(failed)?;
        file.sync_all().map_err(failed)?;
        fs::rename(&temp, &self.path).map_err(failed)?;
        File::open(directory)
            .and_then(|directory| directory.sync_all())
            .map_err(failed)?;
        Ok(Outcome::Written)
    }

    fn is_in_place(&self) -> bool {
        let Ok(metadata) = fs::metadata(&self.path) else {
            return false;
        };
        metadata.is_file()
            && metadata.permissions().mode() & 0o7777 == self.mode
            && metadata.len() == self.content.len() as u64
            && fs::read(&self.path).is_ok_and(|content| content == self.content)
    }
}

/// The default conflist, field for field in its order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Conflist<'a> {
    cni_version: &'a str,
    name: &'static str,
    plugins: (InterfacePlugin<'a>, CoordinatorPlugin<'a>),
}

#[derive(Serialize)]
struct InterfacePlugin<'a> {
    #[serde(rename = "type")]
    plugin_type: &'static str,
    master: &'a str,
    mode: &'static str,
    ipam: IpamSection<'a>,
}

#[derive(Serialize)]
struct IpamSection<'a> {
    #[serde(rename = "type")]
    plugin_type: &'static str,
    /// One Subnet is written as a single name; several (dual-stack) as a list.
    #[serde(skip_serializing_if = "Option::is_none")]
    default_subnet: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    default_subnets: Option<&'a [String]>,
    agent_socket: &'a Path,
}

/// The coordinator asks the agent for Service CIDRs and pod annotations, at the same socket.
#[derive(Serialize)]
struct CoordinatorPlugin<'a> {
    #[serde(rename = "type")]
    plugin_type: &'static str,
    agent_socket: &'a Path,
}

impl<'a> Conflist<'a> {
    fn new(args: &'a CniInstallArgs, master: &'a str, socket: &'a Path) -> Self {
        let subnets = args.cni_default_subnets.as_slice();
        let (default_subnet, default_subnets) = match subnets {
            [single] => (Some(single.as_str()), None),
            several => (None, Some(several)),
        };
        Self {
            cni_version: &args.cni_version,
            // The network is named after its interface plugin.
            name: args.cni_mode.plugin_type(),
            plugins: (
                InterfacePlugin {
                    plugin_type: args.cni_mode.plugin_type(),
                    master,
                    mode: args.cni_mode.mode(),
                    ipam: IpamSection {
                        plugin_type: virtnet_ipam::PLUGIN_NAME,
                        default_subnet,
                        default_subnets,
                        agent_socket: socket,
                    },
                },
                CoordinatorPlugin {
                    plugin_type: PLUGINS[1],
                    agent_socket: socket,
                },
            ),
        }
    }

    /// Pretty JSON in the usual field order with a final newline, as a person would write it.
    fn render(&self) -> Result<String, InstallError> {
        serde_json::to_string_pretty(self)
            .map(|json| json + "\n")
            .map_err(|error| InstallError::RejectedConflist {
                reason: error.to_string(),
            })
    }
}

/// Parses the interface plugin's stdin (its entry with the list's `cniVersion` and `name`, as
/// libcni passes it) the way virtnet-ipam does, so the agent never writes a conflist whose every
/// ADD would fail: Subnet names, socket path and cniVersion are checked by the plugin's own rules.
/// The agent's own socket directory is node configuration, so it is trusted here; outside the
/// plugins' built-in directories the runtime must list it too (`VIRTNET_CNI_TRUSTED_DIRS`).
fn check_with_virtnet_ipam(conflist: &str, socket: &Path) -> Result<(), InstallError> {
    let rejected = |reason: String| InstallError::RejectedConflist { reason };
    let list: serde_json::Value =
        serde_json::from_str(conflist).map_err(|error| rejected(error.to_string()))?;
    let stdin = plugin_stdin(&list, 0).to_string();
    let mut network =
        NetworkConfig::parse(stdin.as_bytes()).map_err(|error| rejected(error.msg))?;
    network.trusted_dirs = trusting_socket_dir(socket).map_err(|error| rejected(error.msg))?;
    IpamConfig::from_network(&network).map_err(|error| rejected(error.msg))?;
    Ok(())
}

/// The plugins' trusted directories plus the one the agent's socket is in.
fn trusting_socket_dir(socket: &Path) -> Result<TrustedDirs, virtnet_cni::CniError> {
    TrustedDirs::with_extra(socket.parent().and_then(Path::to_str))
}

/// The stdin libcni gives plugin `index` of a conflist: its own entry plus the list's
/// `cniVersion` and `name`.
fn plugin_stdin(list: &serde_json::Value, index: usize) -> serde_json::Value {
    let mut plugin = list["plugins"][index].clone();
    if let Some(entry) = plugin.as_object_mut() {
        for key in ["cniVersion", "name"] {
            entry.insert(key.to_owned(), list[key].clone());
        }
    }
    plugin
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use serde_json::{Value, json};
    use virtnet_coordinator::config::CoordinatorConfig;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: CniInstallArgs,
    }

    fn args(flags: &[&str]) -> CniInstallArgs {
        let argv = std::iter::once("agent").chain(flags.iter().copied());
        match Cli::try_parse_from(argv) {
            Ok(cli) => cli.args,
            Err(error) => panic!("{error}"),
        }
    }

    const SOCKET: &str = "/var/run/virtnet/agent.sock";

    /// Default-CNI mode on ens192 with Subnet `subnet`, unless `extra` names other Subnets.
    fn default_cni(extra: &[&str]) -> CniInstallArgs {
        let mut flags = vec!["--default-cni=true", "--cni-master=ens192"];
        if !extra
            .iter()
            .any(|flag| flag.starts_with("--cni-default-subnets"))
        {
            flags.push("--cni-default-subnets=subnet");
        }
        flags.extend(extra);
        args(&flags)
    }

    fn conflist_json(plan: &InstallPlan) -> Value {
        let file = plan
            .conflist
            .as_ref()
            .expect("default-CNI mode writes a conflist");
        serde_json::from_slice(&file.content).expect("the conflist is JSON")
    }

    #[test]
    fn by_default_only_the_plugins_are_installed_from_the_image() -> Result<(), InstallError> {
        let plan = plan(&args(&[]), Path::new(SOCKET))?;
        assert_eq!(
            plan.plugins,
            [
                (
                    PathBuf::from("/usr/local/bin/virtnet-ipam"),
                    PathBuf::from("/opt/cni/bin/virtnet-ipam")
                ),
                (
                    PathBuf::from("/usr/local/bin/virtnet-coordinator"),
                    PathBuf::from("/opt/cni/bin/virtnet-coordinator")
                ),
            ]
        );
        assert_eq!((plan.conflist, plan.master), (None, None));
        let nothing = plan_of(&["--cni-install=false"])?;
        assert!(nothing.plugins.is_empty() && nothing.conflist.is_none());
        Ok(())
    }

    fn plan_of(flags: &[&str]) -> Result<InstallPlan, InstallError> {
        plan(&args(flags), Path::new(SOCKET))
    }

    #[test]
    fn the_conflist_is_the_default_one_with_the_agent_socket() -> Result<(), InstallError> {
        let plan = plan(&default_cni(&[]), Path::new(SOCKET))?;
        let file = plan.conflist.as_ref().expect("a conflist");
        assert_eq!(file.path, Path::new("/etc/cni/net.d/00-virtnet.conflist"));
        assert_eq!(file.mode, 0o644);
        assert_eq!(plan.master.as_deref(), Some("ens192"));
        let golden = r#"{
  "cniVersion": "1.0.0",
  "name": "macvlan",
  "plugins": [
    {
      "type": "macvlan",
      "master": "ens192",
      "mode": "bridge",
      "ipam": {
        "type": "virtnet-ipam",
        "default_subnet": "subnet",
        "agent_socket": "/var/run/virtnet/agent.sock"
      }
    },
    {
      "type": "virtnet-coordinator",
      "agent_socket": "/var/run/virtnet/agent.sock"
    }
  ]
}
"#;
        assert_eq!(String::from_utf8_lossy(&file.content), golden);
        Ok(())
    }

    #[test]
    fn every_plugin_accepts_its_part_of_the_conflist() -> Result<(), InstallError> {
        for flags in [
            &[][..],
            &[
                "--cni-mode=ipvlan",
                "--cni-default-subnets=subnet-v4,subnet-v6",
            ][..],
            &["--cni-version=0.3.1"][..],
            &["--cni-version=1.1.0"][..],
        ] {
            let plan = plan(&default_cni(flags), Path::new("/run/n1/agent.sock"))?;
            let conflist = conflist_json(&plan);
            let stdin = |index| plugin_stdin(&conflist, index).to_string();
            let mut network = NetworkConfig::parse(stdin(0).as_bytes())
                .unwrap_or_else(|error| panic!("{flags:?}: {error}"));
            network.trusted_dirs = trusting_socket_dir(Path::new("/run/n1/agent.sock"))
                .unwrap_or_else(|error| panic!("{error}"));
            let ipam = IpamConfig::from_network(&network)
                .unwrap_or_else(|error| panic!("{flags:?}: {error}"));
            assert_eq!(ipam.agent.socket.as_path(), Path::new("/run/n1/agent.sock"));
            let coordinator = NetworkConfig::parse(stdin(1).as_bytes()).and_then(|mut network| {
                network.trusted_dirs = trusting_socket_dir(Path::new("/run/n1/agent.sock"))?;
                CoordinatorConfig::from_network(&network)
            });
            assert!(coordinator.is_ok(), "{flags:?}: {coordinator:?}");
        }
        Ok(())
    }

    #[test]
    fn ipvlan_and_dual_stack_shape() -> Result<(), InstallError> {
        let plan = plan(
            &default_cni(&[
                "--cni-mode=ipvlan",
                "--cni-default-subnets=subnet-v4,subnet-v6",
            ]),
            Path::new(SOCKET),
        )?;
        let conflist = conflist_json(&plan);
        assert_eq!(conflist["name"], "ipvlan");
        let interface = &conflist["plugins"][0];
        assert_eq!(
            (&interface["type"], &interface["mode"]),
            (&json!("ipvlan"), &json!("l2"))
        );
        assert_eq!(
            interface["ipam"]["default_subnets"],
            json!(["subnet-v4", "subnet-v6"])
        );
        assert!(interface["ipam"].get("default_subnet").is_none());
        Ok(())
    }

    #[test]
    fn bad_settings_are_refused_naming_what_to_set() {
        for (flags, needle) in [
            (
                &["--default-cni=true", "--cni-default-subnets=s"][..],
                "set --cni-master",
            ),
            (
                &[
                    "--default-cni=true",
                    "--cni-master=ens 192",
                    "--cni-default-subnets=s",
                ][..],
                "--cni-master \"ens 192\" is not an interface name",
            ),
            (
                &["--default-cni=true", "--cni-master=averyveryverylongname"][..],
                "at most 15",
            ),
            (
                &["--default-cni=true", "--cni-master=ens192"][..],
                "set --cni-default-subnets",
            ),
            (
                &[
                    "--default-cni=true",
                    "--cni-master=ens192",
                    "--cni-default-subnets=Sub_1",
                ][..],
                "ipam.default_subnet must be a string naming a Subnet",
            ),
            (
                &[
                    "--default-cni=true",
                    "--cni-master=ens192",
                    "--cni-default-subnets=a,a",
                ][..],
                "lists \"a\" more than once",
            ),
            (
                &[
                    "--default-cni=true",
                    "--cni-master=ens192",
                    "--cni-default-subnets=a",
                    "--cni-version=2.0.0",
                ][..],
                "cniVersion \"2.0.0\" is not supported",
            ),
        ] {
            let error = plan_of(flags).expect_err("must be refused").to_string();
            assert!(error.contains(needle), "{flags:?}: {error}");
        }
        let relative = plan(&default_cni(&[]), Path::new("agent.sock"))
            .expect_err("a relative socket is refused")
            .to_string();
        assert!(
            relative.contains("agent_socket must be an absolute path"),
            "{relative}"
        );
    }

    #[test]
    fn interface_names_come_from_proc_net_dev() {
        let listing = "Inter-|   Receive                            |  Transmit\n \
             face |bytes    packets errs drop fifo frame compressed multicast|bytes\n    \
             lo:  1000      10    0    0    0     0          0         0  1000\n\
             ens192: 2000      20    0    0    0     0          0         0  2000\n";
        assert_eq!(interface_names(listing), ["lo", "ens192"]);
    }

    #[test]
    fn put_writes_atomically_then_leaves_identical_files_alone() -> Result<(), InstallError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("virtnet-ipam");
        let file = NodeFile {
            path: path.clone(),
            content: b"#!/bin/sh\n".to_vec(),
            mode: 0o755,
        };
        assert_eq!(file.put()?, Outcome::Written);
        let written = fs::metadata(&path).expect("written");
        assert_eq!(written.permissions().mode() & 0o7777, 0o755);
        assert_eq!(file.put()?, Outcome::Unchanged);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(&path).expect("kept").ino(), written.ino());

        // A stale copy or wrong permissions are replaced; other files stay.
        fs::write(dir.path().join("10-other.conflist"), "{}").expect("other file");
        fs::write(&path, "old").expect("stale copy");
        assert_eq!(file.put()?, Outcome::Written);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(file.put()?, Outcome::Written);
        assert_eq!(fs::read(&path).expect("read"), file.content);
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .expect("list")
            .filter_map(Result::ok)
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["10-other.conflist", "virtnet-ipam"]);
        Ok(())
    }

    #[test]
    fn a_link_planted_at_the_temp_name_is_replaced_not_followed() -> Result<(), InstallError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, "untouched").expect("target file");
        let path = dir.path().join("00-virtnet.conflist");
        std::os::unix::fs::symlink(&elsewhere, dir.path().join(".00-virtnet.conflist.tmp"))
            .expect("planted link");
        let file = NodeFile {
            path: path.clone(),
            content: b"{}".to_vec(),
            mode: 0o644,
        };
        assert_eq!(file.put()?, Outcome::Written);
        assert_eq!(fs::read(&elsewhere).expect("read"), b"untouched");
        assert_eq!(fs::read(&path).expect("read"), b"{}");
        assert!(!fs::symlink_metadata(&path).expect("written").is_symlink());
        Ok(())
    }

    #[test]
    fn install_checks_every_input_before_the_first_write() {
        let dir = tempfile::tempdir().expect("temp dir");
        let source = dir.path().join("source");
        let bin = dir.path().join("bin");
        let conf = dir.path().join("conf");
        for created in [&source, &bin, &conf] {
            fs::create_dir(created).expect("dir");
        }
        // Only one of the two plugins is there: nothing may be written.
        fs::write(source.join("virtnet-ipam"), "ipam").expect("plugin");
        let flags = |extra: &[&str]| {
            let mut flags = vec![
                format!("--cni-plugins-source={}", source.display()),
                format!("--cni-bin-dir={}", bin.display()),
                format!("--cni-conf-dir={}", conf.display()),
            ];
            flags.extend(extra.iter().map(|flag| (*flag).to_owned()));
            flags
        };
        let run = |flags: Vec<String>| {
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            install(&args(&flags), Path::new(SOCKET))
        };
        let error = run(flags(&[]))
            .expect_err("a plugin is missing")
            .to_string();
        assert!(error.contains("virtnet-coordinator") && error.contains("--cni-plugins-source"));
        assert_eq!(fs::read_dir(&bin).expect("list").count(), 0);

        fs::write(source.join("virtnet-coordinator"), "coordinator").expect("plugin");
        let error = run(flags(&[
            "--default-cni=true",
            "--cni-master=nosuchnic0",
            "--cni-default-subnets=subnet",
        ]))
        .expect_err("no such NIC")
        .to_string();
        assert!(
            error.contains("\"nosuchnic0\" does not exist on this node"),
            "{error}"
        );
        assert_eq!(fs::read_dir(&bin).expect("list").count(), 0);

        let installed = run(flags(&[
            "--default-cni=true",
            "--cni-master=lo",
            "--cni-default-subnets=subnet",
        ]));
        assert!(installed.is_ok(), "{installed:?}");
        assert_eq!(
            fs::read(bin.join("virtnet-coordinator")).expect("copied"),
            b"coordinator"
        );
        assert!(conf.join(CONFLIST_NAME).is_file());
    }
}
