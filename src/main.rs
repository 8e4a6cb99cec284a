use std::{fs, path::PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

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
        /// Log line format.
        #[arg(long, env = "VIRTNET_LOG_FORMAT", value_enum, default_value_t)]
        log_format: virtnet::telemetry::LogFormat,
        /// Log level: error, warn, info, debug or trace.
        #[arg(long, env = "VIRTNET_LOG_LEVEL", default_value = "info")]
        log_level: String,
    },
    /// Run the node agent: allocates addresses for virtnet-ipam over a unix socket.
    Agent {
        #[command(flatten)]
        args: virtnet::agent::AgentArgs,
        /// Log line format.
        #[arg(long, env = "VIRTNET_LOG_FORMAT", value_enum, default_value_t)]
        log_format: virtnet::telemetry::LogFormat,
        /// Log level: error, warn, info, debug or trace.
        #[arg(long, env = "VIRTNET_LOG_LEVEL", default_value = "info")]
        log_level: String,
    },
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
        Command::Controller {
            args,
            log_format,
            log_level,
        } => {
            virtnet::telemetry::init(log_format, &log_level);
            tokio::runtime::Runtime::new()
                .context("starting the async runtime")?
                .block_on(virtnet::controller::run(args))
                .context("virtnet controller failed")
        }
        Command::Agent {
            args,
            log_format,
            log_level,
        } => {
            virtnet::telemetry::init(log_format, &log_level);
            tokio::runtime::Runtime::new()
                .context("starting the async runtime")?
                .block_on(virtnet::agent::run(args))
                .context("virtnet agent failed")
        }
    }
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
