//! Faults in the middle of a burst, on a VirtNet cluster of its own (one cluster, the faults in
//! sequence): one node's agent SIGKILLed while 300 pods start (and started again), then
//! kube-apiserver restarted, then etcd restarted, then, for 3 s, every answer the apiserver sends
//! that agent lost (its writes done, the connections cut afterwards: a retry must find its own
//! record, not claim a second address), each while 150 pods start. The apiserver restart expires
//! the agents' watches (410 Gone): their caches list again. After each fault
//! every pod is Ready with exactly one address, recorded once for it in the pools and answered
//! on the wire by exactly one MAC, and the controller reclaimed nothing of a running pod (after an
//! etcd restart its caches may be stale: a release is confirmed on fresh reads); once the Deployment is deleted, no address is left allocated
//! (an ADD the fault cut off between its pool write and its Endpoint leaves a record the
//! controller's sweep reclaims).
use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::ensure;
use virtnet_e2e::{
    cluster::{Cluster, VirtnetOptions, sample_sum},
    delay::Faults,
};

use crate::agent::{
    apply, create_deployment, delete_deployment, ensure_each_answered_by_one_mac, namespace,
    records_of, subnet, wait_for_pods, wait_for_pool_count,
};
use crate::ipam::pool_records;
use crate::support::{Suite, own_virtnet_cluster, pod_ip, pod_name, run_on_own_cluster};

const SUBNET: &str = "chaos";
/// The controller's sweep interval here: an orphaned record comes back within grace + sweep.
const SWEEP_SECONDS: u64 = 10;
/// How long the apiserver's answers to the agent are lost.
const LOST_ANSWERS: Duration = Duration::from_secs(3);
/// Pods of a burst on a busy 2-core machine, plus the time the fault takes away.
const BURST_TIMEOUT: Duration = Duration::from_secs(420);
const RELEASE_TIMEOUT: Duration = Duration::from_secs(180);

pub fn agents_and_the_control_plane_killed_mid_burst_leave_no_duplicate_and_no_leak(
    suite: &Suite,
) -> anyhow::Result<()> {
    let mut virtnet = VirtnetOptions::from_workspace();
    virtnet.controller_env = vec![("VIRTNET_GC_INTERVAL".into(), SWEEP_SECONDS.to_string())];
    let example_subnet = virtnet.repo.join("examples/statefulset/subnet.yaml");
    run_on_own_cluster(suite, own_virtnet_cluster('k', virtnet), async |cluster| {
        cluster.kubectl(&["apply", "-f", &example_subnet.to_string_lossy()])?;
        apply(
            cluster,
            &subnet(
                SUBNET,
                "10.6.0.0/16",
                "10.6.170.1",
                "10.6.170.2-10.6.171.200",
                3,
            ),
        )?;
        apply(cluster, &namespace(SUBNET, SUBNET))?;
        wait_for_pool_count(cluster, SUBNET, 3).await?;
        let agent = format!(
            "virtnet-agent-{}",
            cluster.node_names().first().cloned().unwrap_or_default()
        );
        burst_through(
            cluster,
            "agent-killed",
            300,
            async |cluster: &mut Cluster| {
                cluster.stop_component(&agent)?;
                tokio::time::sleep(Duration::from_secs(2)).await;
                cluster.start_component(&agent, &[])?;
                Ok(())
            },
        )
        .await?;
        for component in ["kube-apiserver", "etcd"] {
            let expired_before = watch_expiries(cluster)?;
            burst_through(
                cluster,
                &format!("{component}-restarted"),
                150,
                async |cluster| {
                    cluster.restart(component)?;
                    Ok(())
                },
            )
            .await?;
            let expired = watch_expiries(cluster)? - expired_before;
            eprintln!("chaos: {component}-restarted: {expired} agent watches expired (410 Gone)");
            // A restarted apiserver's watch cache begins at the current revision: every watch
            // resumed from an older one expires, and the agents' caches must list again.
            ensure!(
                component != "kube-apiserver" || expired > 0,
                "no agent watch expired across the apiserver restart, so the burst did not test \
                 the caches' recovery from 410 Gone"
            );
        }
        let flag = cluster.layout().root.join("agent-answers-lost");
        cluster.proxy_apiserver_for(
            &agent,
            std::path::Path::new(env!("CARGO_BIN_EXE_virtnet-e2e")),
            &Faults {
                delay: Duration::ZERO,
                lose_answers_while: Some(flag.clone()),
            },
        )?;
        // The agent restarted behind the proxy: its counters begin again once it serves.
        let failed_before = cluster
            .wait_for("the proxied agent's /metrics", RELEASE_TIMEOUT, || async {
                failed_adds(cluster, 1).map_err(|error| error.to_string())
            })
            .await?;
        burst_through(cluster, "answers-lost", 150, async |_| {
            std::fs::write(&flag, "")?;
            tokio::time::sleep(LOST_ANSWERS).await;
            std::fs::remove_file(&flag)?;
            Ok(())
        })
        .await?;
        let failed = failed_adds(cluster, 1)? - failed_before;
        eprintln!("chaos: answers-lost: {failed} ADDs of that agent failed and were retried");
        ensure!(
            failed > 0,
            "no ADD of the agent whose answers were lost failed, so the burst did not test a lost \
             answer"
        );
        Ok(())
    })
}

/// Creates a Deployment of `pods` pods, runs `fault` once a third of them hold addresses, then
/// checks the outcome (see the module docs) and deletes the Deployment.
async fn burst_through(
    cluster: &mut Cluster,
    name: &str,
    pods: usize,
    fault: impl AsyncFnOnce(&mut Cluster) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    create_deployment(cluster, SUBNET, name, pods).await?;
    cluster
        .wait_for(
            "a third of the burst holding addresses",
            BURST_TIMEOUT,
            || async {
                let held = records_of(cluster, SUBNET).map_err(|error| error.to_string())?;
                if held * 3 >= pods {
                    Ok(())
                } else {
                    Err(format!("{held} held"))
                }
            },
        )
        .await?;
    let at = started.elapsed();
    let reclaimed_before = live_holder_reclaims(cluster)?;
    fault(cluster).await?;
    let ready = wait_for_pods(cluster, SUBNET, pods, pods, BURST_TIMEOUT).await?;
    eprintln!(
        "chaos: {name}: fault at {at:?}, all {pods} pods Ready {:?} after the burst began",
        started.elapsed()
    );

    let addresses: BTreeMap<IpAddr, &str> = ready
        .iter()
        .map(|pod| Ok((pod_ip(pod)?, pod_name(pod))))
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        addresses.len() == pods,
        "{name}: {pods} pods got {} distinct addresses",
        addresses.len()
    );
    // Records a cut-off ADD left behind go with the sweep; then each pod's address is recorded
    // once, for it.
    cluster
        .wait_for(
            &format!("{name}: one record per pod"),
            RELEASE_TIMEOUT,
            || async {
                let records = pool_records(cluster).map_err(|error| error.to_string())?;
                let ours: Vec<(String, String)> = records
                    .iter()
                    .filter(|(_, record)| {
                        record["endpoint"]
                            .as_str()
                            .is_some_and(|endpoint| endpoint.starts_with(&format!("{SUBNET}/")))
                    })
                    .map(|(address, record)| {
                        (
                            address.clone(),
                            record["endpoint"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect();
                let wrong: Vec<String> = addresses
                    .iter()
                    .filter(|(address, pod)| {
                        let expected = (address.to_string(), format!("{SUBNET}/{pod}"));
                        ours.iter().filter(|record| **record == expected).count() != 1
                    })
                    .map(|(address, pod)| format!("{pod} {address}"))
                    .collect();
                if wrong.is_empty() && ours.len() == pods {
                    Ok(())
                } else {
                    Err(format!(
                        "{} records; not recorded once: {wrong:?}",
                        ours.len()
                    ))
                }
            },
        )
        .await?;
    let reclaimed = live_holder_reclaims(cluster)? - reclaimed_before;
    ensure!(
        reclaimed == 0,
        "{name}: the controller reclaimed {reclaimed} addresses of pods that all run"
    );
    let macs = ensure_each_answered_by_one_mac(cluster, &addresses)?;
    ensure!(
        macs == pods,
        "{name}: {pods} addresses answered from {macs} distinct MACs"
    );

    let deleted = Instant::now();
    delete_deployment(cluster, SUBNET, name).await?;
    wait_for_pods(cluster, SUBNET, 0, 0, BURST_TIMEOUT).await?;
    cluster
        .wait_for(
            &format!("{name}: every address released"),
            RELEASE_TIMEOUT,
            || async {
                match records_of(cluster, SUBNET) {
                    Ok(0) => Ok(()),
                    Ok(held) => Err(format!("{held} still allocated")),
                    Err(error) => Err(error.to_string()),
                }
            },
        )
        .await?;
    eprintln!(
        "chaos: {name}: 0 duplicates, 0 leaked; every address back {:?} after the delete",
        deleted.elapsed()
    );
    Ok(())
}

/// The ADDs the agent of node `index` (1-based) answered with an error
/// (`virtnet_ipam_allocation_duration_seconds_count` of every outcome but `ok`).
fn failed_adds(cluster: &Cluster, index: usize) -> anyhow::Result<u64> {
    let metrics = cluster.agent_metrics(index)?;
    let failed = sample_sum(
        &metrics,
        "virtnet_ipam_allocation_duration_seconds_count{",
        |line| !line.contains("outcome=\"ok\""),
    )?;
    Ok(failed as u64)
}

/// Every agent's `virtnet_watch_expiries_total`, summed.
fn watch_expiries(cluster: &Cluster) -> anyhow::Result<u64> {
    let mut total = 0.0;
    for index in 1..=cluster.node_names().len() {
        let metrics = cluster.agent_metrics(index)?;
        total += sample_sum(&metrics, "virtnet_watch_expiries_total{", |_| true)?;
    }
    Ok(total as u64)
}

/// The controller's reclaims for any reason but an unlisted record (`virtnet_ip_reclaims_total`):
/// while no pod is deleted these must not move, whatever the controller's caches saw.
fn live_holder_reclaims(cluster: &Cluster) -> anyhow::Result<u64> {
    let metrics = cluster.controller_metrics()?;
    let reclaims = sample_sum(&metrics, "virtnet_ip_reclaims_total{", |line| {
        !line.contains("OrphanAllocation")
    })?;
    Ok(reclaims as u64)
}
