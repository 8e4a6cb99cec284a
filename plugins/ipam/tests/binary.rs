//! Runs the real virtnet-ipam binary the way a container runtime does: environment, stdin,
//! and a JSON reply on stdout.

use std::error::Error;

use serde_json::{Value, json};
use virtnet_cni::ErrorCode;
use virtnet_cni::testing::{PluginRun, run_plugin};

type TestResult = Result<(), Box<dyn Error>>;

const BINARY: &str = env!("CARGO_BIN_EXE_virtnet-ipam");
const UNREACHABLE: &str = "the VirtNet agent is not reachable at /var/run/virtnet/agent.sock: is the virtnet-agent DaemonSet running on this node?";

fn env_for(command: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "0123456789abcdef"),
        ("CNI_NETNS", "/var/run/netns/cni-1234"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=sample-ss-0;K8S_POD_UID=3f1c",
        ),
    ]
}

fn add_env() -> Vec<(&'static str, &'static str)> {
    env_for("ADD")
}

fn env_with(name: &'static str, value: &'static str) -> Vec<(&'static str, &'static str)> {
    let mut env: Vec<_> = add_env()
        .into_iter()
        .filter(|(known, _)| *known != name)
        .collect();
    env.push((name, value));
    env
}

fn env_without(name: &str) -> Vec<(&'static str, &'static str)> {
    add_env()
        .into_iter()
        .filter(|(known, _)| *known != name)
        .collect()
}

/// The macvlan plugin config from the VirtNet README, as macvlan hands it to its IPAM plugin.
fn readme_config() -> Value {
    json!({
        "cniVersion": "0.3.1",
        "name": "macvlan",
        "type": "macvlan",
        "master": "ens192",
        "mode": "bridge",
        "ipam": {"type": "virtnet-ipam", "default_subnet": "subnet"},
    })
}

fn config_with(pointer_parent: &str, key: &str, value: Value) -> String {
    let mut config = readme_config();
    if let Some(Value::Object(object)) = config.pointer_mut(pointer_parent) {
        object.insert(key.to_owned(), value);
    }
    config.to_string()
}

fn ipam_with(key: &str, value: Value) -> String {
    config_with("/ipam", key, value)
}

fn run(env: &[(&str, &str)], stdin: &str) -> Result<PluginRun, Box<dyn Error>> {
    Ok(run_plugin(BINARY, env, stdin)?)
}

fn rejects(env: &[(&str, &str)], stdin: &str, code: ErrorCode, needles: &[&str]) -> TestResult {
    run(env, stdin)?.expect_error(code, needles)?;
    Ok(())
}

// --- malformed stdin ---------------------------------------------------------------------

#[test]
fn empty_stdin() -> TestResult {
    rejects(
        &add_env(),
        "",
        ErrorCode::DECODE_FAILURE,
        &["stdin is empty", "network config"],
    )
}

#[test]
fn stdin_is_not_json() -> TestResult {
    rejects(
        &add_env(),
        "cniVersion: 0.3.1",
        ErrorCode::DECODE_FAILURE,
        &["not valid JSON"],
    )
}

#[test]
fn stdin_is_a_json_array() -> TestResult {
    rejects(
        &add_env(),
        "[{\"cniVersion\": \"0.3.1\"}]",
        ErrorCode::DECODE_FAILURE,
        &["must be a JSON object", "got a list"],
    )
}

#[test]
fn missing_cni_version() -> TestResult {
    let config = json!({"name": "macvlan", "type": "macvlan", "ipam": {"type": "virtnet-ipam", "default_subnet": "subnet"}});
    rejects(
        &add_env(),
        &config.to_string(),
        ErrorCode::INCOMPATIBLE_VERSION,
        &["no cniVersion", "0.3.1, 0.4.0, 1.0.0, 1.1.0"],
    )
}

#[test]
fn cni_version_too_old() -> TestResult {
    let stdin = config_with("", "cniVersion", json!("0.2.0"));
    rejects(
        &add_env(),
        &stdin,
        ErrorCode::INCOMPATIBLE_VERSION,
        &["\"0.2.0\" is not supported", "0.3.1, 0.4.0, 1.0.0, 1.1.0"],
    )
}

#[test]
fn cni_version_from_the_future() -> TestResult {
    let stdin = config_with("", "cniVersion", json!("9.9.9"));
    rejects(
        &add_env(),
        &stdin,
        ErrorCode::INCOMPATIBLE_VERSION,
        &["\"9.9.9\" is not supported"],
    )
}

#[test]
fn missing_ipam_section() -> TestResult {
    let stdin = json!({"cniVersion": "0.3.1", "name": "macvlan", "type": "macvlan"}).to_string();
    rejects(
        &add_env(),
        &stdin,
        ErrorCode::INVALID_NETWORK_CONFIG,
        &["no \"ipam\" section", "\"type\": \"virtnet-ipam\""],
    )
}

#[test]
fn ipam_is_not_an_object() -> TestResult {
    let stdin = config_with("", "ipam", json!("virtnet-ipam"));
    rejects(
        &add_env(),
        &stdin,
        ErrorCode::INVALID_NETWORK_CONFIG,
        &["ipam must be a JSON object", "got \"virtnet-ipam\""],
    )
}

#[test]
fn ipam_type_names_another_plugin() -> TestResult {
    rejects(
        &add_env(),
        &ipam_with("type", json!("host-local")),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &[
            "ipam.type is \"host-local\"",
            "set \"type\": \"virtnet-ipam\"",
        ],
    )
}

#[test]
fn default_subnet_is_a_number() -> TestResult {
    rejects(
        &add_env(),
        &ipam_with("default_subnet", json!(5)),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &[
            "ipam.default_subnet must be a string naming a Subnet, e.g. \"default_subnet\": \"subnet\"",
            "got the number 5",
        ],
    )
}

#[test]
fn default_subnet_is_not_a_kubernetes_name() -> TestResult {
    rejects(
        &add_env(),
        &ipam_with("default_subnet", json!("My_Subnet")),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &[
            "ipam.default_subnet must be a string naming a Subnet",
            "got \"My_Subnet\"",
        ],
    )
}

#[test]
fn no_subnet_at_all() -> TestResult {
    let stdin = config_with("", "ipam", json!({"type": "virtnet-ipam"}));
    rejects(
        &add_env(),
        &stdin,
        ErrorCode::INVALID_NETWORK_CONFIG,
        &["names no Subnet", "\"default_subnet\""],
    )
}

#[test]
fn both_subnet_keys() -> TestResult {
    rejects(
        &add_env(),
        &ipam_with("default_subnets", json!(["subnet-v4", "subnet-v6"])),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &["both default_subnet and default_subnets", "keep only one"],
    )
}

#[test]
fn default_subnets_entry_is_not_a_string() -> TestResult {
    let stdin = config_with(
        "",
        "ipam",
        json!({"type": "virtnet-ipam", "default_subnets": ["subnet-v4", {"name": "v6"}]}),
    );
    rejects(
        &add_env(),
        &stdin,
        ErrorCode::INVALID_NETWORK_CONFIG,
        &[
            "ipam.default_subnets[1] must be a Subnet name",
            "got an object",
        ],
    )
}

#[test]
fn unknown_ipam_field_lists_the_accepted_ones() -> TestResult {
    rejects(
        &add_env(),
        &ipam_with("defaultSubnet", json!("subnet")),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &[
            "ipam has an unknown field \"defaultSubnet\" (did you mean \"default_subnet\"?)",
            "accepted fields: type, default_subnet, default_subnets, agent_socket, ipam_unix_socket_path, timeout_ms, log_level, log_file, log_output_file_path",
        ],
    )
}

#[test]
fn abbreviated_ipam_field_gets_a_suggestion() -> TestResult {
    rejects(
        &add_env(),
        &ipam_with("timeout", json!(3000)),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &["ipam has an unknown field \"timeout\" (did you mean \"timeout_ms\"?)"],
    )
}

#[test]
fn timeout_zero() -> TestResult {
    rejects(
        &add_env(),
        &ipam_with("timeout_ms", json!(0)),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &[
            "ipam.timeout_ms must be a whole number of milliseconds in 1..=120000",
            "got the number 0",
        ],
    )
}

#[test]
fn timeout_as_a_duration_string() -> TestResult {
    rejects(
        &add_env(),
        &ipam_with("timeout_ms", json!("10s")),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &["ipam.timeout_ms must be", "got \"10s\""],
    )
}

#[test]
fn bad_log_level() -> TestResult {
    rejects(
        &add_env(),
        &ipam_with("log_level", json!("verbose")),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &[
            "ipam.log_level must be one of \"error\", \"warn\", \"info\", \"debug\", \"trace\"",
            "got \"verbose\"",
        ],
    )
}

#[test]
fn relative_log_file() -> TestResult {
    rejects(
        &add_env(),
        &ipam_with("log_output_file_path", json!("virtnet-ipam.log")),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &["ipam.log_output_file_path must be an absolute path under one of"],
    )
}

/// A network config is tenant input: it cannot make root write or connect outside the node's
/// trusted directories.
#[test]
fn paths_outside_the_trusted_directories_are_refused() -> TestResult {
    for (key, path) in [
        ("log_file", "/etc/cron.d/virtnet"),
        ("log_file", "/var/log/virtnet/../../../etc/shadow"),
        ("agent_socket", "/run/containerd/containerd.sock"),
    ] {
        let run = run(&add_env(), &ipam_with(key, json!(path)))?;
        run.expect_error(
            ErrorCode::INVALID_NETWORK_CONFIG,
            &[
                &format!("ipam.{key} must be an absolute path under one of the node's trusted directories /var/run/virtnet, /run/virtnet, /var/log/virtnet"),
                "VIRTNET_CNI_TRUSTED_DIRS",
                path,
            ],
        )?;
    }
    Ok(())
}

#[test]
fn a_symlinked_log_file_is_not_followed() -> TestResult {
    let directory = tempfile::tempdir()?;
    let target = directory.path().join("elsewhere");
    let link = directory.path().join("ipam.log");
    std::os::unix::fs::symlink(&target, &link)?;
    let mut config = readme_config();
    config["ipam"]["log_file"] = json!(link.to_str().ok_or("temp dir is not UTF-8")?);
    let run = run(&add_env(), &config.to_string())?;
    run.expect_error(ErrorCode::TRY_AGAIN_LATER, &[UNREACHABLE])?;
    assert!(!target.exists(), "the symlink's target was created");
    assert!(
        run.stderr.contains("cannot open log file") && run.stderr.contains("logging to stderr"),
        "stderr: {:?}",
        run.stderr
    );
    Ok(())
}

/// A config written by a newer VirtNet may carry keys this version does not know: ADD refuses
/// it (a typo must be seen), DEL and GC go on and only warn, so the pod can always be torn down.
#[test]
fn del_and_gc_ignore_unknown_keys_that_add_refuses() -> TestResult {
    let mut config = readme_config();
    config["cniVersion"] = json!("1.1.0");
    config["ipam"]["futureSetting"] = json!(true);
    config["cni.dev/valid-attachments"] = json!([]);
    let stdin = config.to_string();
    run(&add_env(), &stdin)?.expect_error(
        ErrorCode::INVALID_NETWORK_CONFIG,
        &["ipam has an unknown field \"futureSetting\""],
    )?;
    for command in ["DEL", "GC"] {
        let run = run(&env_for(command), &stdin)?;
        run.expect_error(ErrorCode::TRY_AGAIN_LATER, &[UNREACHABLE])?;
        assert!(
            run.stderr
                .contains(&format!("{command} goes on ignoring what it does not need"))
                && run.stderr.contains("futureSetting"),
            "stderr: {:?}",
            run.stderr
        );
    }
    Ok(())
}

#[test]
fn relative_agent_socket() -> TestResult {
    rejects(
        &add_env(),
        &ipam_with("agent_socket", json!("agent.sock")),
        ErrorCode::INVALID_NETWORK_CONFIG,
        &["ipam.agent_socket must be an absolute path"],
    )
}

#[test]
fn socket_set_under_both_names() -> TestResult {
    let stdin = config_with(
        "",
        "ipam",
        json!({"type": "virtnet-ipam", "default_subnet": "subnet", "agent_socket": "/a.sock", "ipam_unix_socket_path": "/b.sock"}),
    );
    rejects(
        &add_env(),
        &stdin,
        ErrorCode::INVALID_NETWORK_CONFIG,
        &["ipam.agent_socket and ipam.ipam_unix_socket_path are the same setting"],
    )
}

// --- malformed environment -----------------------------------------------------------------

#[test]
fn missing_cni_command() -> TestResult {
    rejects(
        &env_without("CNI_COMMAND"),
        &readme_config().to_string(),
        ErrorCode::INVALID_ENVIRONMENT,
        &["CNI_COMMAND is not set"],
    )
}

#[test]
fn unknown_cni_command() -> TestResult {
    rejects(
        &env_with("CNI_COMMAND", "ATTACH"),
        &readme_config().to_string(),
        ErrorCode::INVALID_ENVIRONMENT,
        &[
            "CNI_COMMAND=\"ATTACH\" is not a CNI command",
            "ADD, DEL, CHECK, VERSION, GC, STATUS",
        ],
    )
}

#[test]
fn add_without_container_id() -> TestResult {
    rejects(
        &env_without("CNI_CONTAINERID"),
        &readme_config().to_string(),
        ErrorCode::INVALID_ENVIRONMENT,
        &["CNI_COMMAND=ADD requires", "CNI_CONTAINERID is not set"],
    )
}

#[test]
fn add_without_netns() -> TestResult {
    rejects(
        &env_without("CNI_NETNS"),
        &readme_config().to_string(),
        ErrorCode::INVALID_ENVIRONMENT,
        &["CNI_NETNS is not set"],
    )
}

#[test]
fn add_without_ifname() -> TestResult {
    rejects(
        &env_without("CNI_IFNAME"),
        &readme_config().to_string(),
        ErrorCode::INVALID_ENVIRONMENT,
        &["CNI_IFNAME is not set"],
    )
}

#[test]
fn ifname_too_long() -> TestResult {
    rejects(
        &env_with("CNI_IFNAME", "eth0-underlay-primary"),
        &readme_config().to_string(),
        ErrorCode::INVALID_ENVIRONMENT,
        &["CNI_IFNAME", "at most 15"],
    )
}

#[test]
fn cni_args_entry_without_equals() -> TestResult {
    rejects(
        &env_with("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME"),
        &readme_config().to_string(),
        ErrorCode::INVALID_ENVIRONMENT,
        &["CNI_ARGS entry \"K8S_POD_NAME\" has no '='"],
    )
}

#[test]
fn add_without_pod_name_in_cni_args() -> TestResult {
    rejects(
        &env_with("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default"),
        &readme_config().to_string(),
        ErrorCode::INVALID_ENVIRONMENT,
        &["CNI_ARGS has no K8S_POD_NAME"],
    )
}

#[test]
fn check_needs_cni_version_0_4_0() -> TestResult {
    rejects(
        &env_for("CHECK"),
        &readme_config().to_string(),
        ErrorCode::INCOMPATIBLE_VERSION,
        &["CHECK needs cniVersion 0.4.0 or later"],
    )
}

// --- behaviour ---------------------------------------------------------------------------------

#[test]
fn version_reply() -> TestResult {
    let reply = run(&[("CNI_COMMAND", "VERSION")], "{\"cniVersion\": \"1.1.0\"}")?.expect_json()?;
    assert_eq!(
        reply,
        json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
    Ok(())
}

#[test]
fn valid_add_reaches_the_agent_seam_and_asks_to_retry() -> TestResult {
    let reply = run(&add_env(), &readme_config().to_string())?
        .expect_error(ErrorCode::TRY_AGAIN_LATER, &[UNREACHABLE])?;
    assert_eq!(reply.cni_version, "0.3.1");
    Ok(())
}

#[test]
fn configured_socket_is_named_in_the_message() -> TestResult {
    rejects(
        &add_env(),
        &ipam_with(
            "ipam_unix_socket_path",
            json!("/var/run/virtnet/virtnet.sock"),
        ),
        ErrorCode::TRY_AGAIN_LATER,
        &["not reachable at /var/run/virtnet/virtnet.sock"],
    )
}

#[test]
fn valid_del_check_and_gc_reach_the_agent_seam() -> TestResult {
    let mut config = readme_config();
    config["cniVersion"] = json!("1.1.0");
    config["cni.dev/valid-attachments"] =
        json!([{"containerID": "0123456789abcdef", "ifname": "eth0"}]);
    for command in ["DEL", "CHECK", "GC"] {
        rejects(
            &env_for(command),
            &config.to_string(),
            ErrorCode::TRY_AGAIN_LATER,
            &[UNREACHABLE],
        )?;
    }
    Ok(())
}

#[test]
fn status_reports_not_available() -> TestResult {
    let stdin = config_with("", "cniVersion", json!("1.1.0"));
    rejects(
        &[("CNI_COMMAND", "STATUS")],
        &stdin,
        ErrorCode::NOT_AVAILABLE,
        &[UNREACHABLE],
    )
}

#[test]
fn debug_logs_go_to_stderr_and_stdout_holds_only_the_reply() -> TestResult {
    let run = run(&add_env(), &ipam_with("log_level", json!("debug")))?;
    run.expect_error(ErrorCode::TRY_AGAIN_LATER, &[UNREACHABLE])?;
    assert_eq!(run.stdout.lines().count(), 1, "stdout: {:?}", run.stdout);
    assert!(run.stderr.contains("DEBUG"), "stderr: {:?}", run.stderr);
    assert!(
        run.stderr
            .contains("asking the VirtNet agent to allocate from subnet for default/sample-ss-0"),
        "stderr: {:?}",
        run.stderr
    );
    Ok(())
}

#[test]
fn log_file_receives_the_logs() -> TestResult {
    let directory = tempfile::tempdir()?;
    // A directory that does not exist yet: the plugin creates it.
    let log_file = directory.path().join("nested").join("ipam.log");
    let log_path = log_file.to_str().ok_or("temp dir is not UTF-8")?;
    let mut config = readme_config();
    config["ipam"]["log_file"] = json!(log_path);
    config["ipam"]["log_level"] = json!("debug");
    let run = run(&add_env(), &config.to_string())?;
    run.expect_error(ErrorCode::TRY_AGAIN_LATER, &[UNREACHABLE])?;
    let logged = std::fs::read_to_string(&log_file)?;
    assert!(run.stderr.is_empty(), "stderr: {:?}", run.stderr);
    assert!(
        logged.contains("ADD failed: the VirtNet agent is not reachable"),
        "log: {logged:?}"
    );
    assert!(
        logged.contains("container=\"0123456789abcdef\""),
        "log: {logged:?}"
    );
    Ok(())
}
