//! The network config on stdin → `NetworkConfig` → each plugin's own config parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtnet_cni::NetworkConfig;
use virtnet_coordinator::config::CoordinatorConfig;
use virtnet_fuzz::accepted;
use virtnet_ipam::config::IpamConfig;

fuzz_target!(|stdin: &[u8]| {
    let Some(network) = accepted(NetworkConfig::parse(stdin)) else {
        return;
    };
    accepted(network.prev_result());
    // ADD, CHECK and STATUS read the config as it is; DEL and GC read it again ignoring unknown
    // keys when that fails (skel::execute). Whatever the strict reading accepts, the lenient one
    // must accept the same way.
    let lenient = network.ignoring_unknown_keys();
    let ipam = accepted(IpamConfig::from_network(&network));
    let lenient_ipam = accepted(IpamConfig::from_network(&lenient));
    if ipam.is_some() {
        assert_eq!(ipam, lenient_ipam, "DEL reads the ipam section differently");
    }
    let coordinator = accepted(CoordinatorConfig::from_network(&network));
    let lenient_coordinator = accepted(CoordinatorConfig::from_network(&lenient));
    if coordinator.is_some() {
        assert_eq!(
            coordinator, lenient_coordinator,
            "DEL reads the coordinator config differently"
        );
    }
});
