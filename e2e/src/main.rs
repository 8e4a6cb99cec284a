//! `virtnet-e2e`: brings the local cluster up and down, and serves as its loopback API forwarder
//! and (on every node) its kubelet stand-in.
use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use virtnet_e2e::{
    cluster::{
        Cluster, ClusterOptions, DEFAULT_NODES, Layout, VirtnetOptions, default_bin_dir, teardown,
    },
    delay, forward,
    kubelet::{self, KubeletArgs},
    naming::ClusterNames,
    netns::named_netns_path,
};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Bring a cluster up (tearing down any leftovers of the same name first), leave it running
    /// and print its KUBECONFIG.
    Up {
        #[arg(long, default_value = "sandbox")]
        name: String,
        #[arg(long, default_value_t = DEFAULT_NODES)]
        nodes: usize,
        /// Defaults to /tmp/virtnet-e2e/<name>.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Defaults to $VIRTNET_E2E_CACHE/bin, else /var/cache/virtnet-e2e/bin.
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Also run VirtNet (controller, agents, plugins, the default conflist) from the
        /// workspace's debug build.
        #[arg(long)]
        virtnet: bool,
        /// VirtNet in Multus mode (implies --virtnet): Multus is every node's default CNI,
        /// delegating to the default conflist, and every node gets a second NIC `ens224` on a
        /// second underlay, 10.7.0.0/16 (gateway 10.7.0.1).
        #[arg(long)]
        multus: bool,
        /// Real nodes: kubelet + containerd + runc on every node instead of the stand-in.
        #[arg(long)]
        real_nodes: bool,
        /// Install VirtNet as users do (implies --virtnet and --real-nodes): `make image`'s image
        /// imported into every node, the chart installed with helm.
        #[arg(long)]
        helm: bool,
    },
    /// Tear a cluster down: processes, network namespaces, mounts, state directory. Succeeds
    /// when there is nothing to remove.
    Down {
        #[arg(long, default_value = "sandbox")]
        name: String,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Forward TCP connections from the root namespace to an address inside a namespace.
    Forward {
        /// Port 0 picks a free port; see --address-file.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// The named network namespace to dial from.
        #[arg(long)]
        netns: String,
        #[arg(long)]
        upstream: SocketAddr,
        /// Where to write the address actually listened on.
        #[arg(long)]
        address_file: Option<PathBuf>,
    },
    /// Forward TCP connections to `upstream`, holding what the upstream sends for --delay-ms
    /// and dropping it while --lose-answers-while names a file that exists (run inside a node's
    /// namespace between one component and the apiserver).
    Delay {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        upstream: SocketAddr,
        #[arg(long)]
        delay_ms: u64,
        #[arg(long)]
        lose_answers_while: Option<PathBuf>,
    },
    /// Run the kubelet stand-in of one node (inside that node's network namespace).
    Kubelet(KubeletArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Commands::Kubelet(args) = &cli.command {
        // Before the runtime starts its threads: see `enter_host_paths`.
        kubelet::enter_host_paths(&args.host_paths)?;
    }
    tokio::runtime::Runtime::new()
        .context("cannot start the tokio runtime")?
        .block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            // kube_client logs every failed request, and `up` polls an apiserver that is
            // still starting: the harness reports the errors that matter itself.
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,kube_client=off")),
        )
        .init();
    match cli.command {
        Commands::Up {
            name,
            nodes,
            state_dir,
            bin_dir,
            virtnet,
            multus,
            real_nodes,
            helm,
        } => {
            let harness_binary =
                std::env::current_exe().context("cannot locate the virtnet-e2e executable")?;
            let cluster = Cluster::up(ClusterOptions {
                name: name.clone(),
                nodes,
                state_dir,
                bin_dir: bin_dir.unwrap_or_else(default_bin_dir),
                harness_binary,
                virtnet: (virtnet || multus || helm).then(|| VirtnetOptions {
                    multus,
                    ..if helm {
                        VirtnetOptions::helm_from_workspace()
                    } else {
                        VirtnetOptions::from_workspace()
                    }
                }),
                real_nodes: real_nodes || helm,
            })
            .await?;
            println!("export KUBECONFIG={}", cluster.kubeconfig().display());
            eprintln!("tear it down with: virtnet-e2e down --name {name}");
            cluster.leave_running();
        }
        Commands::Down { name, state_dir } => {
            let names = ClusterNames::new(&name)?;
            teardown(&names, &Layout::for_cluster(state_dir.as_deref(), &name))?;
        }
        Commands::Forward {
            listen,
            netns,
            upstream,
            address_file,
        } => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            if let Some(path) = address_file {
                write_atomically(&path, &listener.local_addr()?.to_string())?;
            }
            forward::serve(listener, named_netns_path(&netns), upstream).await?;
        }
        Commands::Delay {
            listen,
            upstream,
            delay_ms,
            lose_answers_while,
        } => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let faults = delay::Faults {
                delay: std::time::Duration::from_millis(delay_ms),
                lose_answers_while,
            };
            delay::serve(listener, upstream, faults).await?;
        }
        Commands::Kubelet(args) => kubelet::run(args).await?,
    }
    Ok(())
}

/// Readers polling for the file never see it half written.
fn write_atomically(path: &Path, content: &str) -> anyhow::Result<()> {
    let temporary = path.with_extension("tmp");
    fs::write(&temporary, content)
        .and_then(|()| fs::rename(&temporary, path))
        .with_context(|| format!("cannot write {}", path.display()))
}
