//! The kubelet + container-runtime stand-in: registers a Node and keeps it Ready, and gives
//! every pod bound to it a network namespace wired by the real CNI plugins (exactly as
//! containerd would call them), TCP servers on its declared ports, and a Running status.
//!
//! It runs inside the node's network namespace, so plugins see the node's links. Stopping it
//! leaves pods, their namespaces and the recorded CNI results in place; the next start adopts
//! them instead of running ADD again.
mod backoff;
mod cni;
mod error;
mod node;
mod pods;
mod report;
mod sandbox;
mod servers;
#[cfg(test)]
mod test_support;

use std::{future::Future, net::IpAddr, path::PathBuf, sync::Arc};

pub use error::KubeletError;
use kube::{
    Client,
    config::{KubeConfigOptions, Kubeconfig},
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

/// Command-line arguments of `virtnet-e2e kubelet`.
#[derive(clap::Args, Debug, Clone)]
pub struct KubeletArgs {
    /// Name of the Node object to register and whose pods to run.
    #[arg(long)]
    pub node_name: String,
    /// The node's address on the underlay, reported as InternalIP and as the pods' hostIP.
    #[arg(long)]
    pub node_ip: IpAddr,
    /// Kubeconfig reaching the apiserver from inside the node's network namespace.
    #[arg(long)]
    pub kubeconfig: PathBuf,
    /// Where the network config is; the lexically first *.conflist, *.conf or *.json is used.
    #[arg(long)]
    pub cni_conf_dir: PathBuf,
    /// Where the CNI plugin binaries are (CNI_PATH).
    #[arg(long)]
    pub cni_bin_dir: PathBuf,
    /// Where each sandbox's CNI config and result are kept, so DEL and restarts reuse them.
    #[arg(long)]
    pub cni_cache_dir: PathBuf,
    /// Pod network namespaces are named `<prefix>-<first 8 characters of the pod UID>`.
    #[arg(long)]
    pub netns_prefix: String,
    /// `<node directory>:<absolute path>`: what a DaemonSet's hostPath is on a real node. The
    /// stand-in and the plugins it runs see the node's own directory at the fixed path (the
    /// machine's other processes do not). Repeatable; see [`enter_host_paths`].
    #[arg(long = "host-path")]
    pub host_paths: Vec<String>,
}

/// Gives this process a mount namespace of its own in which every `--host-path` directory is
/// bind-mounted over its fixed path, so plugins that only know the production path (a
/// NetworkAttachmentDefinition's virtnet-ipam without `agent_socket`) reach this node's agent.
///
/// Must run before any thread starts: `unshare(CLONE_NEWNS)` refuses a process whose threads
/// share its filesystem context. Mount propagation is left as it is: `/` is private, so these
/// mounts stay in here, while `/run/netns` stays shared, so the pod network namespaces this
/// stand-in mounts are still seen by everyone (`ip netns exec` would have made it a slave).
pub fn enter_host_paths(host_paths: &[String]) -> Result<(), KubeletError> {
    let binds = host_paths
        .iter()
        .map(|spec| parse_host_path(spec))
        .collect::<Result<Vec<_>, _>>()?;
    if binds.is_empty() {
        return Ok(());
    }
    let failed = |step: String| {
        move |error: &dyn std::fmt::Display| KubeletError::HostPathMount {
            step,
            error: error.to_string(),
        }
    };
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|error| failed("enter a mount namespace of its own".to_owned())(&error))?;
    for (source, target) in binds {
        let step = format!("bind-mount {} over {}", source.display(), target.display());
        std::fs::create_dir_all(&target).map_err(|error| failed(step.clone())(&error))?;
        nix::mount::mount(
            Some(&source),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|error| failed(step)(&error))?;
    }
    Ok(())
}

/// `<node directory>:<absolute path>`, both absolute.
fn parse_host_path(spec: &str) -> Result<(PathBuf, PathBuf), KubeletError> {
    let invalid = |reason| KubeletError::HostPathSpec {
        spec: spec.to_owned(),
        reason,
    };
    let (source, target) = spec
        .split_once(':')
        .ok_or_else(|| invalid("no ':' between the node directory and the path"))?;
    let (source, target) = (PathBuf::from(source), PathBuf::from(target));
    if source.is_absolute() && target.is_absolute() {
        Ok((source, target))
    } else {
        Err(invalid("both paths must be absolute"))
    }
}

/// Runs the stand-in until SIGTERM or SIGINT.
pub async fn run(args: KubeletArgs) -> Result<(), KubeletError> {
    let stop = stop_signal()?;
    let client = client_from(&args.kubeconfig).await?;
    tokio::fs::create_dir_all(&args.cni_cache_dir)
        .await
        .map_err(|source| KubeletError::CacheDir {
            path: args.cni_cache_dir.clone(),
            source,
        })?;
    tokio::select! {
        result = serve(client, args) => result,
        signal = stop => {
            info!(signal, "stopping; pods, their network namespaces and CNI results stay for the next start");
            Ok(())
        }
    }
}

async fn serve(client: Client, args: KubeletArgs) -> Result<(), KubeletError> {
    let identity = node::NodeIdentity {
        name: args.node_name.clone(),
        ip: args.node_ip,
    };
    let runner = cni::PluginRunner::new(args.cni_bin_dir, cni::PLUGIN_TIMEOUT);
    let context = Arc::new(pods::PodContext {
        client: client.clone(),
        node_name: args.node_name.clone(),
        node_ip: args.node_ip,
        sandboxes: sandbox::Sandboxes::new(
            args.node_name,
            args.netns_prefix,
            args.cni_conf_dir,
            &args.cni_cache_dir,
            runner,
        ),
    });
    info!(
        node = identity.name,
        records = %context.sandboxes.records_dir().display(),
        "kubelet stand-in starting"
    );
    let registered = node::register(&client, &identity).await;
    tokio::select! {
        never = node::keep_alive(&client, &registered) => match never {},
        result = pods::run(context) => result,
    }
}

async fn client_from(path: &std::path::Path) -> Result<Client, KubeletError> {
    let kubeconfig_error = |source| KubeletError::Kubeconfig {
        path: path.to_owned(),
        source,
    };
    // A blocking read, but a tiny one made before any other task exists.
    let kubeconfig = Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(kubeconfig_error)?;
    Client::try_from(config).map_err(|source| KubeletError::Client {
        path: path.to_owned(),
        source,
    })
}

/// Resolves with the signal's name. The handlers are installed before anything else starts, so
/// an early SIGTERM is not lost.
fn stop_signal() -> Result<impl Future<Output = &'static str>, KubeletError> {
    let install = |kind: SignalKind, name: &'static str| {
        signal(kind).map_err(|source| KubeletError::Signal {
            signal: name,
            source,
        })
    };
    let mut terminate = install(SignalKind::terminate(), "SIGTERM")?;
    let mut interrupt = install(SignalKind::interrupt(), "SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_path_is_two_absolute_paths() {
        let (source, target) =
            parse_host_path("/tmp/n1/run/virtnet:/var/run/virtnet").expect("valid");
        assert_eq!(source, PathBuf::from("/tmp/n1/run/virtnet"));
        assert_eq!(target, PathBuf::from("/var/run/virtnet"));
        for bad in ["/only/one", "relative:/var/run/virtnet", "/a:relative"] {
            assert!(parse_host_path(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
