//! VirtNet's end-to-end suite. One real cluster (see `virtnet_e2e::cluster`) is brought up for
//! the whole binary, every test runs against it, and it is torn down at the end whatever happened,
//! also after a failed or panicking test. A failed test reports the tail of every component log.
//!
//! Without root or without the third-party binaries (`e2e/tools/install` builds them) every test
//! is reported as ignored, with the reason.
#[path = "e2e/agent.rs"]
mod agent;
#[path = "e2e/chaos.rs"]
mod chaos;
#[path = "e2e/cluster.rs"]
mod cluster;
#[path = "e2e/controller.rs"]
mod controller;
#[path = "e2e/coordinator.rs"]
mod coordinator;
#[path = "e2e/gc.rs"]
mod gc;
#[path = "e2e/hardening.rs"]
mod hardening;
#[path = "e2e/helm.rs"]
mod helm;
#[path = "e2e/install.rs"]
mod install;
#[path = "e2e/ipam.rs"]
mod ipam;
#[path = "e2e/multus.rs"]
mod multus;
#[path = "e2e/pod_network.rs"]
mod pod_network;
#[path = "e2e/store.rs"]
mod store;
#[path = "e2e/support.rs"]
mod support;

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    process::ExitCode,
    sync::Arc,
};

use libtest_mimic::{Arguments, Completion, Failed, Trial};
use support::Suite;
use virtnet_e2e::{
    cluster::{Cluster, ClusterError, ClusterOptions, Layout, teardown},
    naming::ClusterNames,
};

/// Every namespace of the suite's cluster starts with `e2e-`; a sandbox (`sandbox-`) coexists.
/// `VIRTNET_E2E_CLUSTER` picks another name, so that two suites can run side by side.
const DEFAULT_CLUSTER_NAME: &str = "e2e";

fn cluster_name() -> String {
    std::env::var("VIRTNET_E2E_CLUSTER").unwrap_or_else(|_| DEFAULT_CLUSTER_NAME.to_owned())
}

/// A test body: it gets the running cluster and returns what went wrong, if anything.
type TestBody = fn(&Suite) -> anyhow::Result<()>;

const TESTS: &[(&str, TestBody)] = &[
    (
        "kubectl_in_the_root_namespace_sees_every_node_ready",
        cluster::kubectl_in_the_root_namespace_sees_every_node_ready,
    ),
    (
        "deployment_pods_ping_across_nodes_and_gateway",
        pod_network::deployment_pods_ping_across_nodes_and_gateway,
    ),
    (
        "deleting_a_deployment_removes_its_pods_and_their_netns",
        pod_network::deleting_a_deployment_removes_its_pods_and_their_netns,
    ),
    (
        "controller_reclaims_dead_holders_and_keeps_live_and_sticky_ones",
        gc::controller_reclaims_dead_holders_and_keeps_live_and_sticky_ones,
    ),
    (
        "controller_keeps_addresses_right_with_the_real_agent",
        controller::controller_keeps_addresses_right_with_the_real_agent,
    ),
    (
        "virtnet_allocates_example_subnet_addresses_and_returns_them",
        ipam::virtnet_allocates_example_subnet_addresses_and_returns_them,
    ),
    (
        "multus_nads_give_pool_addresses_and_a_second_nic_its_own_network",
        multus::multus_nads_give_pool_addresses_and_a_second_nic_its_own_network,
    ),
    (
        "virtnet_beside_another_primary_cni_serves_only_the_nads_extra_nics",
        multus::virtnet_beside_another_primary_cni_serves_only_the_nads_extra_nics,
    ),
    (
        "helm_installed_virtnet_wires_real_node_pods_and_keeps_their_addresses_across_an_upgrade",
        helm::helm_installed_virtnet_wires_real_node_pods_and_keeps_their_addresses_across_an_upgrade,
    ),
    (
        "virtnet_agents_install_the_plugins_and_the_conflist_and_a_restart_keeps_them",
        install::virtnet_agents_install_the_plugins_and_the_conflist_and_a_restart_keeps_them,
    ),
    (
        "coordinator_wires_pods_to_their_node_services_and_vms",
        coordinator::coordinator_wires_pods_to_their_node_services_and_vms,
    ),
    (
        "subnets_never_give_a_held_address_to_a_second_holder",
        hardening::subnets_never_give_a_held_address_to_a_second_holder,
    ),
    (
        "agent_allocates_exactly_under_burst_exhaustion_and_dual_stack",
        agent::agent_allocates_exactly_under_burst_exhaustion_and_dual_stack,
    ),
    (
        "agents_and_the_control_plane_killed_mid_burst_leave_no_duplicate_and_no_leak",
        chaos::agents_and_the_control_plane_killed_mid_burst_leave_no_duplicate_and_no_leak,
    ),
    (
        "store_guards_keep_foreign_finalizers_and_racing_sandboxes_apart",
        store::store_guards_keep_foreign_finalizers_and_racing_sandboxes_apart,
    ),
];

fn main() -> ExitCode {
    let args = Arguments::from_args();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "virtnet_e2e=info".into()),
        )
        .init();

    // Listing, or a filter that selects none of these tests (`cargo test some_unit_test`), must
    // not cost a cluster start: the trials are only listed or filtered out, never run.
    let selected = TESTS.iter().any(|(name, _)| {
        let probe = Trial::test(*name, || Ok(()));
        !args.is_filtered_out(&probe) && !args.is_ignored(&probe)
    });
    if args.list || !selected {
        return ignore_all(&args, "no test selected");
    }
    let options = ClusterOptions::new(cluster_name(), env!("CARGO_BIN_EXE_virtnet-e2e"));
    if let Some(reason) = skip_reason(&options) {
        eprintln!("e2e: every test ignored: {reason}");
        return ignore_all(&args, &reason);
    }

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => return fail_all(&args, &format!("cannot start tokio: {error}")),
    };
    tear_down_on_interrupt(&runtime);
    let cluster = match runtime.block_on(Cluster::up(options)) {
        Ok(cluster) => cluster,
        Err(error) => return fail_all(&args, &format!("the cluster did not come up: {error}")),
    };
    let suite = Arc::new(Suite { runtime, cluster });
    let trials = TESTS
        .iter()
        .map(|&(name, body)| {
            let suite = Arc::clone(&suite);
            Trial::test(name, move || run_reporting_logs(&suite, body))
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);

    // `run` dropped every trial, so this is the last reference; tear down before exiting, since
    // `ExitCode` is returned past no destructor that could still do it.
    let teardown = match Arc::into_inner(suite) {
        Some(suite) => suite.cluster.down(),
        None => Ok(()),
    };
    match teardown {
        Ok(()) => conclusion.exit_code(),
        Err(error) => {
            eprintln!("e2e: teardown failed: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Ctrl-C would otherwise leave the cluster running (its components have sessions of their own,
/// out of reach of the terminal's signal) until the next run cleans it up.
fn tear_down_on_interrupt(runtime: &tokio::runtime::Runtime) {
    runtime.spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("e2e: interrupted; tearing the cluster down");
            let name = cluster_name();
            let torn_down = ClusterNames::new(&name)
                .map_err(ClusterError::from)
                .and_then(|names| teardown(&names, &Layout::for_cluster(None, &name)));
            if let Err(error) = torn_down {
                eprintln!("e2e: {error}");
            }
            std::process::exit(130);
        }
    });
}

/// Why the suite cannot run here, if it cannot.
fn skip_reason(options: &ClusterOptions) -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some(
            "needs root (network namespaces, veths, mounts): run `make test` as root".to_owned(),
        );
    }
    options
        .missing_prerequisite()
        .map(|missing| missing.to_string())
}

/// Runs a test body; on failure or panic, appends the tail of every component log.
fn run_reporting_logs(suite: &Suite, body: TestBody) -> Result<(), Failed> {
    let failure = match catch_unwind(AssertUnwindSafe(|| body(suite))) {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(error)) => format!("{error:#}"),
        Err(panic) => panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "the test panicked".to_owned()),
    };
    Err(format!(
        "{failure}\n\ncomponent logs:\n{}",
        suite.cluster.dump_logs()
    )
    .into())
}

fn ignore_all(args: &Arguments, reason: &str) -> ExitCode {
    let trials = TESTS
        .iter()
        .map(|(name, _)| {
            let reason = reason.to_owned();
            Trial::ignorable_test(*name, move || Ok(Completion::ignored_with(reason)))
        })
        .collect();
    libtest_mimic::run(args, trials).exit_code()
}

fn fail_all(args: &Arguments, reason: &str) -> ExitCode {
    let reason = reason.to_owned();
    let trials = TESTS
        .iter()
        .map(|(name, _)| {
            let reason = reason.clone();
            Trial::test(*name, move || Err(reason.into()))
        })
        .collect();
    libtest_mimic::run(args, trials).exit_code()
}
