//! The ADD latency virtnet-coordinator adds to a pod, against plain macvlan in the same run.
//!
//! Each round runs, inside a node netns built for the purpose, the reference macvlan plugin (with
//! host-local IPAM) and then virtnet-coordinator with macvlan's result, exactly as a runtime runs
//! the conflist, timing each ADD; then DEL both. Prints p50/p90 of both and the ratio. Needs root
//! and the reference plugins `make tools` builds; skipped with a message otherwise.

#[path = "../tests/support/mod.rs"]
#[allow(
    dead_code,
    reason = "shared with tests/netns.rs; the benchmark uses part of it"
)]
mod support;

use std::error::Error;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{COORDINATOR, CniCall, World, missing_root, reference_plugins};

const ROUNDS: usize = 50;

fn percentile(samples: &mut [Duration], percent: usize) -> Duration {
    samples.sort_unstable();
    samples[(samples.len() - 1) * percent / 100]
}

fn timed(world: &World, call: CniCall<'_>) -> Result<(Duration, Value), Box<dyn Error>> {
    let start = Instant::now();
    let run = World::succeeds(world.run(call)?)?;
    Ok((start.elapsed(), serde_json::from_str(&run.stdout)?))
}

fn main() -> Result<(), Box<dyn Error>> {
    if let Some(reason) = missing_root() {
        eprintln!("skipping: {reason}");
        return Ok(());
    }
    let Some(plugins) = reference_plugins(&["macvlan", "host-local"]) else {
        eprintln!("skipping: no reference macvlan/host-local plugins; run `make tools` first");
        return Ok(());
    };
    let plugins = plugins.display().to_string();
    let world = World::new()?;
    let data_dir = std::env::temp_dir().join(format!("{}-host-local", world.pod));
    let macvlan_config = json!({
        "cniVersion": "1.0.0",
        "name": "bench",
        "type": "macvlan",
        "master": "ens4",
        "mode": "bridge",
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "10.6.0.0/16", "rangeStart": "10.6.153.100",
                         "rangeEnd": "10.6.153.200", "gateway": "10.6.0.1"}]],
            "dataDir": data_dir,
        },
    });
    let macvlan_binary = format!("{plugins}/macvlan");
    let macvlan = |command| CniCall {
        binary: &macvlan_binary,
        command,
        ifname: "eth0",
        cni_path: &plugins,
        stdin: macvlan_config.to_string(),
    };
    let (mut plain, mut coordinator) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (elapsed, prev_result) = timed(&world, macvlan("ADD"))?;
        plain.push(elapsed);
        let coordinator_call = |command| CniCall {
            binary: COORDINATOR,
            command,
            ifname: "eth0",
            cni_path: &plugins,
            stdin: world.coordinator_config(prev_result.clone()),
        };
        coordinator.push(timed(&world, coordinator_call("ADD"))?.0);
        World::succeeds(world.run(coordinator_call("DEL"))?)?;
        World::succeeds(world.run(macvlan("DEL"))?)?;
    }
    let _ = std::fs::remove_dir_all(&data_dir);
    let (plain50, coordinator50) = (percentile(&mut plain, 50), percentile(&mut coordinator, 50));
    println!(
        "ADD latency over {ROUNDS} rounds: macvlan+host-local p50 {plain50:.2?} p90 {:.2?}; \
         virtnet-coordinator (added after it) p50 {coordinator50:.2?} p90 {:.2?}; \
         coordinator/macvlan p50 ratio {:.2}",
        percentile(&mut plain, 90),
        percentile(&mut coordinator, 90),
        coordinator50.as_secs_f64() / plain50.as_secs_f64(),
    );
    Ok(())
}
