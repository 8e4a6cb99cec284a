use std::{fs, path::PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use virtnet::telemetry::LogArgs;

/// VirtNet: underlay networking for Kubernetes pods and KubeVirt VMs.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller: Subnet → IPPools, fixed addresses, garbage collection (leader elected).
    Controller {
        #[command(flatten)]
        args: virtnet::controller::ControllerArgs,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Run the node agent: allocates addresses for virtnet-ipam over a unix socket.
    Agent {
        #[command(flatten)]
        args: virtnet::agent::AgentArgs,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Show who holds which address, how full each Subnet is and what looks wrong, for the
    /// cluster in KUBECONFIG (`inspect pod NAMESPACE/NAME` for one pod).
    Inspect(virtnet::inspect::InspectArgs),
    /// Print the CustomResourceDefinitions as YAML (or write them into a directory).
    Crdgen(CrdgenArgs),
}

#[derive(Args)]
struct CrdgenArgs {
    /// Write one file per CRD into this directory (e.g. chart/crds) instead of printing one
    /// multi-document YAML stream to stdout.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crdgen(args) => crdgen(args),
        Command::Inspect(args) => {
            let report = tokio::runtime::Runtime::new()
                .context("starting the async runtime")?
                .block_on(virtnet::inspect::run(args))?;
            print!("{report}");
            Ok(())
        }
        Command::Controller { args, log } => {
            run_service("virtnet controller", &log, virtnet::controller::run(args))
        }
        Command::Agent { args, log } => {
            run_service("virtnet agent", &log, virtnet::agent::run(args))
        }
    }
}

/// Sets up logging and runs a long-running command to completion on a multi-threaded runtime.
fn run_service<E>(
    name: &str,
    log: &LogArgs,
    service: impl std::future::Future<Output = Result<(), E>>,
) -> anyhow::Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    virtnet::telemetry::init(log.log_format, &log.log_level);
    tokio::runtime::Runtime::new()
        .context("starting the async runtime")?
        .block_on(service)
        .with_context(|| format!("{name} failed"))
}

fn crdgen(args: CrdgenArgs) -> anyhow::Result<()> {
    let manifests = virtnet::crd::crd_manifests().context("rendering the CRDs as YAML")?;
    match args.out {
        Some(dir) => {
            for manifest in &manifests {
                let path = dir.join(&manifest.file_name);
                fs::write(&path, &manifest.yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        None => {
            for manifest in &manifests {
                print!("---\n{}", manifest.yaml);
            }
        }
    }
    Ok(())
}
