//! Bodies of the plugin ↔ agent API: every request the agent parses and every answer a plugin
//! parses, each read like the other side would and written back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtnet_cni::CniVersion;
use virtnet_cni::agent_api::{
    AllocateRequest, AllocateResponse, ApiError, CheckRequest, CoordinatorRequest,
    CoordinatorResponse, Empty, GcRequest, ReleaseRequest,
};
use virtnet_cni::result::CniResult;
use virtnet_fuzz::{accepted, json_round_trip};

fuzz_target!(|body: &[u8]| {
    json_round_trip::<AllocateRequest>(body);
    json_round_trip::<ReleaseRequest>(body);
    json_round_trip::<CheckRequest>(body);
    json_round_trip::<GcRequest>(body);
    json_round_trip::<CoordinatorRequest>(body);
    json_round_trip::<AllocateResponse>(body);
    json_round_trip::<CoordinatorResponse>(body);
    json_round_trip::<Empty>(body);
    json_round_trip::<ApiError>(body);

    // virtnet-ipam prints the agent's answer as its ADD result in the config's version; a chained
    // plugin must read exactly that back as its prevResult.
    let Some(answer) = accepted(serde_json::from_slice::<AllocateResponse>(body)) else {
        return;
    };
    let result = CniResult::from(answer);
    for version in CniVersion::SUPPORTED {
        let printed = serde_json::to_value(result.versioned(version)).expect("a result serializes");
        let reread = CniResult::parse("prevResult", &printed)
            .unwrap_or_else(|error| panic!("{version} result {printed} does not parse: {error}"));
        assert_eq!(
            result, reread,
            "the {version} result changed the agent's answer"
        );
    }
});
