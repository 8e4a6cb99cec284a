//! `prevResult` of any supported version → `CniResult` → every supported version and back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use virtnet_cni::CniVersion;
use virtnet_cni::result::CniResult;
use virtnet_fuzz::accepted;

/// `result` written as `version`'s layout and parsed again: what a chained plugin after this one
/// reads.
fn converted(result: &CniResult, version: CniVersion) -> CniResult {
    let printed = serde_json::to_value(result.versioned(version)).expect("a result serializes");
    assert_eq!(printed["cniVersion"], version.as_str());
    CniResult::parse("prevResult", &printed)
        .unwrap_or_else(|error| panic!("the {version} result {printed} does not parse: {error}"))
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(bytes) else {
        return;
    };
    let Some(result) = accepted(CniResult::parse("prevResult", &value)) else {
        return;
    };
    // 1.1.0 holds every field the model has; older layouts drop the 1.1.0-only ones, once: a
    // second conversion to the same version changes nothing, and going up loses nothing more.
    assert_eq!(result, converted(&result, CniVersion::LATEST));
    for version in CniVersion::SUPPORTED {
        let older = converted(&result, version);
        assert_eq!(older, converted(&older, version), "{version} is not stable");
        assert_eq!(
            older,
            converted(&older, CniVersion::LATEST),
            "{version} → latest"
        );
    }
});
