use clap::{Parser, Subcommand};

/// VirtNet: underlay networking for Kubernetes pods and KubeVirt VMs.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (or write them into a directory).
    Crdgen,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crdgen => Ok(()),
    }
}
