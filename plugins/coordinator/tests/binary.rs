//! Runs the real virtnet-coordinator binary the way a container runtime runs a chained plugin:
//! environment, the plugin config with the interface plugin's prevResult on stdin, and a JSON
//! reply on stdout.

use std::error::Error;

use serde_json::{Value, json};
use virtnet_cni::ErrorCode;
use virtnet_cni::testing::{PluginRun, run_plugin};

type TestResult = Result<(), Box<dyn Error>>;

const BINARY: &str = env!("CARGO_BIN_EXE_virtnet-coordinator");
const NOT_CHAINED: &str = "virtnet-coordinator must be chained after an interface plugin such as macvlan; its prevResult is missing";

fn env_for(command: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "0123456789abcdef"),
        ("CNI_NETNS", "/var/run/netns/cni-1234"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=sample-ss-0",
        ),
    ]
}

fn add_env() -> Vec<(&'static str, &'static str)> {
    env_for("ADD")
}

/// What the reference macvlan plugin prints for the README's conflist (spec 0.3.1 layout).
fn macvlan_result() -> Value {
    json!({
        "cniVersion": "0.3.1",
        "interfaces": [{"name": "eth0", "mac": "7a:1f:4c:2e:aa:01", "sandbox": "/var/run/netns/cni-1234"}],
        "ips": [{"version": "4", "interface": 0, "address": "10.6.153.101/16", "gateway": "10.6.0.1"}],
        "dns": {},
    })
}

/// The coordinator's entry of the README's conflist, as the runtime hands it over after macvlan,
/// in pass-through mode: these tests run without root and without the netns; the wiring itself
/// is proven in `tests/netns.rs`.
fn chained_config() -> Value {
    json!({
        "cniVersion": "0.3.1",
        "name": "macvlan",
        "type": "virtnet-coordinator",
        "mode": "disabled",
        "prevResult": macvlan_result(),
    })
}

fn config_with(key: &str, value: Value) -> String {
    let mut config = chained_config();
    config[key] = value;
    config.to_string()
}

fn prev_result_with(pointer: &str, value: Value) -> String {
    let mut config = chained_config();
    if let Some(slot) = config.pointer_mut(pointer) {
        *slot = value;
    }
    config.to_string()
}

fn run(env: &[(&str, &str)], stdin: &str) -> Result<PluginRun, Box<dyn Error>> {
    Ok(run_plugin(BINARY, env, stdin)?)
}

fn rejects(env: &[(&str, &str)], stdin: &str, code: ErrorCode, needles: &[&str]) -> TestResult {
    run(env, stdin)?.expect_error(code, needles)?;
    Ok(())
}

// --- malformed input ---------------------------------------------------------------------

#[test]
fn empty_stdin() -> TestResult {
    rejects(
        &add_env(),
        "\n",
        ErrorCode::DECODE_FAILURE,
        &["stdin is empty"],
    )
}

#[test]
fn unsupported_cni_version() -> TestResult {
    rejects(
        &add_env(),
        &config_with("cniVersion", json!("0.2.0")),
        ErrorCode::INCOMPATIBLE_VERSION,
        &["\"0.2.0\" is not supported", "0.3.1, 0.4.0, 1.0.0, 1.1.0"],
    )
}

#[test]
fn add_without_prev_result() -> TestResult {
    let stdin = json!({"cniVersion": "0.3.1", "name": "macvlan", "type": "virtnet-coordinator"})
        .to_string();
    rejects(
        &add_env(),
        &stdin,
        ErrorCode::INVALID_NETWORK_CONFIG,
        &[NOT_CHAINED],
    )
}

#[test]
fn check_without_prev_result() -> TestResult {
    let stdin = json!({"cniVersion": "0.4.0", "name": "macvlan", "type": "virtnet-coordinator"})
        .to_string();
    rejects(
        &env_for("CHECK"),
        &stdin,
        ErrorCode::INVALID_NETWORK_CONFIG,
        &[NOT_CHAINED],
    )
}

#[test]
fn prev_result_without_ips() -> TestResult {
    rejects(
        &add_env(),
        &prev_result_with("/prevResult/ips", json!([])),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &["prevResult lists no IPs", "ipam"],
    )
}

#[test]
fn prev_result_without_interfaces() -> TestResult {
    let stdin = config_with(
        "prevResult",
        json!({"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.6.153.101/16"}]}),
    );
    rejects(
        &add_env(),
        &stdin,
        ErrorCode::INVALID_NETWORK_CONFIG,
        &["prevResult lists no interfaces", "macvlan"],
    )
}

#[test]
fn prev_result_with_an_unparsable_address() -> TestResult {
    rejects(
        &add_env(),
        &prev_result_with("/prevResult/ips/0/address", json!("10.6.153.101")),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &[
            "prevResult.ips[0].address must be an IP address with its prefix length, e.g. \"10.6.153.101/16\"",
            "got \"10.6.153.101\"",
        ],
    )
}

#[test]
fn prev_result_with_a_dangling_interface_index() -> TestResult {
    rejects(
        &add_env(),
        &prev_result_with("/prevResult/ips/0/interface", json!(2)),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &["prevResult.ips[0].interface is 2, but prevResult.interfaces has 1 entry"],
    )
}

#[test]
fn prev_result_is_not_an_object() -> TestResult {
    rejects(
        &add_env(),
        &config_with("prevResult", json!("eth0")),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &["prevResult must be a CNI result object"],
    )
}

#[test]
fn bad_service_cidr_entry() -> TestResult {
    rejects(
        &add_env(),
        &config_with("serviceCIDRs", json!(["10.96.0.0/12", "10.96.0.0/33"])),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &[
            "serviceCIDRs[1] must be a CIDR with no host bits, e.g. \"10.96.0.0/12\"",
            "got \"10.96.0.0/33\"",
        ],
    )
}

#[test]
fn service_cidr_with_host_bits() -> TestResult {
    rejects(
        &add_env(),
        &config_with("serviceCIDRs", json!(["10.96.0.1/12"])),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &["serviceCIDRs[0] must be a CIDR with no host bits"],
    )
}

#[test]
fn host_rule_table_zero() -> TestResult {
    rejects(
        &add_env(),
        &config_with("hostRuleTable", json!(0)),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &[
            "hostRuleTable must be a routing table number in 1..=252 or 256..=2147483648",
            "got the number 0",
        ],
    )
}

#[test]
fn host_rule_table_reserved_by_the_kernel() -> TestResult {
    for table in [253, 254, 255] {
        rejects(
            &add_env(),
            &config_with("hostRuleTable", json!(table)),
            ErrorCode::INVALID_NETWORK_CONFIG,
            &["253-255 are reserved by the kernel"],
        )?;
    }
    Ok(())
}

#[test]
fn unknown_mode() -> TestResult {
    rejects(
        &add_env(),
        &config_with("mode", json!("overlay")),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &["mode must be one of \"auto\", \"underlay\", \"disabled\""],
    )
}

#[test]
fn unknown_field_lists_the_accepted_ones() -> TestResult {
    rejects(
        &add_env(),
        &config_with("detectIpConflict", json!(true)),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &[
            "the network config has an unknown field \"detectIpConflict\" (did you mean \"detectIPConflict\"?)",
            "accepted fields besides the standard CNI keys: mode, serviceCIDRs, hostRuleTable, podDefaultRouteNIC",
        ],
    )
}

#[test]
fn veth_mtu_too_small() -> TestResult {
    rejects(
        &add_env(),
        &config_with("vethHostMTU", json!(68)),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &["vethHostMTU must be a whole number in 576..=65535"],
    )
}

#[test]
fn detect_flag_as_string() -> TestResult {
    rejects(
        &add_env(),
        &config_with("detectGateway", json!("yes")),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &["detectGateway must be true or false; got \"yes\""],
    )
}

#[test]
fn default_route_nic_with_a_colon() -> TestResult {
    rejects(
        &add_env(),
        &config_with("podDefaultRouteNIC", json!("eth0:1")),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &["podDefaultRouteNIC must be an interface name"],
    )
}

#[test]
fn bad_log_level() -> TestResult {
    rejects(
        &add_env(),
        &config_with("log_level", json!(3)),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &["log_level must be one of", "got the number 3"],
    )
}

#[test]
fn add_without_netns() -> TestResult {
    let env: Vec<_> = add_env()
        .into_iter()
        .filter(|(name, _)| *name != "CNI_NETNS")
        .collect();
    rejects(
        &env,
        &chained_config().to_string(),
        ErrorCode::INVALID_ENVIRONMENT,
        &["CNI_COMMAND=ADD requires", "CNI_NETNS is not set"],
    )
}

#[test]
fn unknown_cni_args_key_without_ignore_unknown() -> TestResult {
    let mut env = add_env();
    env.retain(|(name, _)| *name != "CNI_ARGS");
    env.push(("CNI_ARGS", "K8S_POD_NAME=web-0;MAC=aa:bb"));
    rejects(
        &env,
        &chained_config().to_string(),
        ErrorCode::INVALID_ENVIRONMENT,
        &["CNI_ARGS has the unknown key \"MAC\"", "IgnoreUnknown=1"],
    )
}

// --- behaviour ---------------------------------------------------------------------------------

#[test]
fn version_reply() -> TestResult {
    let reply = run(&[("CNI_COMMAND", "VERSION")], "")?.expect_json()?;
    assert_eq!(
        reply,
        json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
    Ok(())
}

#[test]
fn add_passes_prev_result_through_in_the_same_version() -> TestResult {
    let result = run(&add_env(), &chained_config().to_string())?.expect_json()?;
    assert_eq!(result, macvlan_result());
    Ok(())
}

#[test]
fn add_converts_prev_result_to_the_requested_version() -> TestResult {
    let mut config = chained_config();
    config["cniVersion"] = json!("1.0.0");
    let result = run(&add_env(), &config.to_string())?.expect_json()?;
    assert_eq!(
        result,
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "mac": "7a:1f:4c:2e:aa:01", "sandbox": "/var/run/netns/cni-1234"}],
            "ips": [{"interface": 0, "address": "10.6.153.101/16", "gateway": "10.6.0.1"}],
        })
    );
    Ok(())
}

#[test]
fn add_accepts_every_documented_setting() -> TestResult {
    let mut config = chained_config();
    for (key, value) in [
        ("serviceCIDRs", json!(["10.96.0.0/12", "fd00:10:96::/112"])),
        ("hostRuleTable", json!(500)),
        ("podDefaultRouteNIC", json!("eth0")),
        ("detectIPConflict", json!(true)),
        ("detectGateway", json!(false)),
        ("vethHostMTU", json!(1500)),
        (
            "coordinator_unix_socket_path",
            json!("/var/run/virtnet/virtnet.sock"),
        ),
        ("log_level", json!("warn")),
    ] {
        config[key] = value;
    }
    assert_eq!(
        run(&add_env(), &config.to_string())?.expect_json()?,
        macvlan_result()
    );
    Ok(())
}

#[test]
fn add_into_a_missing_netns_fails_naming_it() -> TestResult {
    rejects(
        &add_env(),
        &config_with("mode", json!("auto")),
        ErrorCode::IO_FAILURE,
        &[
            "cannot open network namespace /var/run/netns/cni-1234",
            "is the pod sandbox still running?",
        ],
    )
}

#[test]
fn del_succeeds_without_prev_result_or_netns() -> TestResult {
    let stdin = json!({"cniVersion": "0.3.1", "name": "macvlan", "type": "virtnet-coordinator"})
        .to_string();
    let env: Vec<_> = env_for("DEL")
        .into_iter()
        .filter(|(name, _)| *name != "CNI_NETNS")
        .collect();
    let run = run(&env, &stdin)?;
    assert_eq!(
        (run.exit_code, run.stdout.as_str()),
        (Some(0), ""),
        "{run:?}"
    );
    Ok(())
}

#[test]
fn check_gc_and_status_succeed_on_1_1_0() -> TestResult {
    let mut config = chained_config();
    config["cniVersion"] = json!("1.1.0");
    for command in ["CHECK", "GC", "STATUS"] {
        let run = run(&env_for(command), &config.to_string())?;
        assert_eq!(
            (run.exit_code, run.stdout.as_str()),
            (Some(0), ""),
            "{command}: {run:?}"
        );
    }
    Ok(())
}

#[test]
fn debug_logging_writes_nothing_but_the_result_to_stdout() -> TestResult {
    let run = run(&add_env(), &config_with("log_level", json!("debug")))?;
    assert_eq!(run.expect_json()?, macvlan_result());
    assert_eq!(run.stdout.lines().count(), 1, "stdout: {:?}", run.stdout);
    assert!(run.stderr.contains("DEBUG"), "stderr: {:?}", run.stderr);
    assert!(
        run.stderr.contains("ADD succeeded"),
        "stderr: {:?}",
        run.stderr
    );
    Ok(())
}
