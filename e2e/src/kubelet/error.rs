//! What can go wrong in the kubelet stand-in, worded for the person who has to fix it.
use std::{io, path::PathBuf, time::Duration};

use crate::netns::NetnsError;

/// A failure that stops the kubelet stand-in.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error(
        "cannot load kubeconfig {path}: {source} (pass --kubeconfig with the cluster's admin \
         kubeconfig, e.g. the one `virtnet-e2e up` wrote)"
    )]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "cannot build a Kubernetes client from {path}: {source} (check its server address and \
         credentials)"
    )]
    Client { path: PathBuf, source: kube::Error },
    #[error(
        "cannot create the CNI cache directory {path}: {source} (pass a writable \
         --cni-cache-dir)"
    )]
    CacheDir { path: PathBuf, source: io::Error },
    #[error("cannot install the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        source: io::Error,
    },
    #[error("the pod watch ended unexpectedly; restart the kubelet stand-in")]
    WatchEnded,
    #[error(
        "--host-path {spec:?}: {reason} (give `<node directory>:<absolute path>`, e.g. \
         /tmp/virtnet-e2e/sandbox/nodes/sandbox-node1/run/virtnet:/var/run/virtnet)"
    )]
    HostPathSpec { spec: String, reason: &'static str },
    #[error("cannot {step} for --host-path: {error} (this needs root / CAP_SYS_ADMIN)")]
    HostPathMount { step: String, error: String },
}

/// The CNI operation a plugin was asked to do, spelled as containerd spells it in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Del,
}

impl CniCommand {
    /// The value of `CNI_COMMAND`.
    pub fn env_value(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
        }
    }
}

impl std::fmt::Display for CniCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Add => "add",
            Self::Del => "delete",
        })
    }
}

/// A failure to load the network config or to run a plugin of the chain.
#[derive(Debug, thiserror::Error)]
pub enum CniCallError {
    #[error("cannot read the CNI config directory {dir}: {source} (check --cni-conf-dir)")]
    ReadConfDir { dir: PathBuf, source: io::Error },
    #[error(
        "no network config found in {dir} (*.conflist, *.conf or *.json): install the network \
         plugin, which writes its config there"
    )]
    NoNetworkConfig { dir: PathBuf },
    #[error("cannot read CNI config {path}: {source}")]
    ReadConfig { path: PathBuf, source: io::Error },
    #[error("invalid CNI config {path}: {reason}; fix or remove the file")]
    InvalidConfig { path: PathBuf, reason: String },
    #[error("network config {network:?} has no plugins; give it at least one")]
    NoPlugins { network: String },
    #[error(
        "failed to find plugin {plugin_type:?} in path [{bin_dir}]: install it into \
         --cni-bin-dir"
    )]
    PluginNotFound {
        plugin_type: String,
        bin_dir: PathBuf,
    },
    #[error("cannot run CNI plugin {path}: {source} (is it an executable for this machine?)")]
    Spawn { path: PathBuf, source: io::Error },
    // The same shape as containerd's message, so what tests and people read matches a real node.
    #[error("plugin type={plugin_type:?} name={network:?} failed ({command}): {message}")]
    PluginFailed {
        plugin_type: String,
        network: String,
        command: CniCommand,
        message: String,
    },
    #[error(
        "plugin type={plugin_type:?} name={network:?} did not finish {command} within \
         {timeout:?} and was killed; look for what it waits on in its log"
    )]
    TimedOut {
        plugin_type: String,
        network: String,
        command: CniCommand,
        timeout: Duration,
    },
    #[error(
        "plugin type={plugin_type:?} name={network:?} returned an unreadable result ({reason}): \
         {stdout:?}; the plugin is broken"
    )]
    InvalidResult {
        plugin_type: String,
        network: String,
        reason: String,
        stdout: String,
    },
}

/// A failure to build, keep or tear down one pod's sandbox (netns + CNI network).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Cni(#[from] CniCallError),
    #[error("cannot run `{command}`: {source} (install iproute2)")]
    IpSpawn { command: String, source: io::Error },
    #[error("`{command}` failed: {stderr} (the kubelet stand-in must run as root)")]
    IpFailed { command: String, stderr: String },
    #[error("cannot generate a container id from /dev/urandom: {source}")]
    ContainerId { source: io::Error },
    #[error("cannot write the sandbox record {path}: {source} (check --cni-cache-dir)")]
    WriteRecord { path: PathBuf, source: io::Error },
    #[error("cannot remove the sandbox record {path}: {source} (check --cni-cache-dir)")]
    RemoveRecord { path: PathBuf, source: io::Error },
    #[error("cannot read the sandbox records in {dir}: {source} (check --cni-cache-dir)")]
    ReadRecords { dir: PathBuf, source: io::Error },
    #[error("CNI result of sandbox {container_id} is unreadable: {reason}")]
    UnreadableResult {
        container_id: String,
        reason: String,
    },
}

/// A failure to start a pod's "containers" (its TCP port servers).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on TCP port {port} in network namespace {netns}: {source}")]
    Listen {
        netns: String,
        port: u16,
        source: io::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot register the listeners of network namespace {netns} with tokio: {source}")]
    Register { netns: String, source: io::Error },
    #[error("the thread binding the listeners of network namespace {netns} died")]
    BindThread { netns: String },
}

/// Why one pass over a pod did not reach the state the pod asks for; retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum PodSyncError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Servers(#[from] ServerError),
    #[error("cannot {action} pod {pod}: {source}")]
    Api {
        action: &'static str,
        pod: String,
        source: kube::Error,
    },
}
