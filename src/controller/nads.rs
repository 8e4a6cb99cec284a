//! What the Network reconciler ([`super::network`]) writes: the NetworkAttachmentDefinition
//! rendered from a Network ([`render_config`]) and whether to create it, put it back, leave it,
//! or refuse to touch it because someone else owns it ([`plan_nad`]). Pure functions.
//!
//! The rendered conflist is the main plugin (macvlan or ipvlan, with virtnet-ipam naming the
//! Network's Subnets), then virtnet-coordinator, always last:
//!
//! ```json
//! {"cniVersion": "1.0.0", "name": "<network>", "plugins": [
//!   {"type": "macvlan", "master": "ens192", "mode": "bridge",
//!    "ipam": {"type": "virtnet-ipam", "default_subnets": ["subnet-v4"]}},
//!   {"type": "virtnet-coordinator"}]}
//! ```

use kube::{Resource, ResourceExt, api::ObjectMeta};
use serde_json::{Map, Value, json};

use crate::crd::{Network, NetworkAttachmentDefinition, NetworkAttachmentDefinitionSpec};

/// The CNI type of VirtNet's IPAM plugin.
const IPAM_PLUGIN: &str = "virtnet-ipam";
/// The CNI type of VirtNet's coordinator plugin.
const COORDINATOR_PLUGIN: &str = "virtnet-coordinator";

/// The conflist of `network`'s NetworkAttachmentDefinition.
pub fn render_config(network: &Network) -> Value {
    let spec = &network.spec;
    let mut main = Map::new();
    main.insert("type".into(), spec.plugin.as_str().into());
    main.insert("master".into(), spec.master_interface().into());
    main.insert(
        "mode".into(),
        spec.mode
            .as_deref()
            .unwrap_or(spec.plugin.default_mode())
            .into(),
    );
    if let Some(mtu) = spec.mtu {
        main.insert("mtu".into(), mtu.into());
    }
    main.insert(
        "ipam".into(),
        json!({"type": IPAM_PLUGIN, "default_subnets": spec.subnets.names().collect::<Vec<_>>()}),
    );

    let options = &spec.coordinator;
    let mut coordinator = Map::new();
    coordinator.insert("type".into(), COORDINATOR_PLUGIN.into());
    let optional = [
        ("mode", options.mode.clone().map(Value::from)),
        (
            "podDefaultRouteNIC",
            options.pod_default_route_nic.clone().map(Value::from),
        ),
        (
            "detectIPConflict",
            options.detect_ip_conflict.then_some(Value::Bool(true)),
        ),
        (
            "detectGateway",
            options.detect_gateway.then_some(Value::Bool(true)),
        ),
        ("vethHostMTU", options.veth_host_mtu.map(Value::from)),
        (
            "kubevirtBinding",
            options.kubevirt_binding.clone().map(Value::from),
        ),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            coordinator.insert(key.into(), value);
        }
    }

    let mut config = Map::new();
    config.insert("cniVersion".into(), spec.cni_version.as_str().into());
    config.insert("name".into(), network.name_any().into());
    if spec.allow_persistent_ips {
        // Top level, where kubevirt/ipam-extensions and OVN-Kubernetes read it.
        config.insert("allowPersistentIPs".into(), true.into());
    }
    config.insert(
        "plugins".into(),
        Value::Array(vec![main.into(), coordinator.into()]),
    );
    config.into()
}

/// The CNI versions VirtNet's plugins speak.
const SUPPORTED_CNI_VERSIONS: &[&str] = &["0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// What is wrong with a NetworkAttachmentDefinition's config that uses virtnet-ipam or
/// virtnet-coordinator, each problem saying what to fix; empty for a NAD of other plugins (never
/// judged) and for a sound one. `subnet_exists` says whether a Subnet of that name exists.
pub fn nad_problems(config: Option<&str>, subnet_exists: impl Fn(&str) -> bool) -> Vec<String> {
    let Some(text) = config else {
        return Vec::new();
    };
    let uses_virtnet = text.contains(IPAM_PLUGIN) || text.contains(COORDINATOR_PLUGIN);
    if !uses_virtnet {
        return Vec::new();
    }
    let config: Value = match serde_json::from_str(text) {
        Ok(config) => config,
        Err(error) => {
            return vec![format!(
                "spec.config is not valid JSON ({error}): fix it; pods on this network stay in \
                 ContainerCreating until then"
            )];
        }
    };
    let mut problems = Vec::new();
    let version = config["cniVersion"].as_str().unwrap_or_default();
    if !SUPPORTED_CNI_VERSIONS.contains(&version) {
        problems.push(format!(
            "cniVersion {version:?} is not one VirtNet's plugins speak: use one of {}",
            SUPPORTED_CNI_VERSIONS.join(", ")
        ));
    }
    // A conflist, or a single plugin's config.
    let plugins: Vec<&Value> = match config["plugins"].as_array() {
        Some(plugins) => plugins.iter().collect(),
        None => vec![&config],
    };
    let plugin_type = |plugin: &Value| plugin["type"].as_str().unwrap_or_default().to_owned();
    if let Some(position) = plugins
        .iter()
        .position(|plugin| plugin_type(plugin) == COORDINATOR_PLUGIN)
        && position + 1 != plugins.len()
    {
        problems.push(format!(
            "{COORDINATOR_PLUGIN} is plugin {} of {}: it must be the last plugin of the chain \
             (it wires what the plugins before it made)",
            position + 1,
            plugins.len()
        ));
    }
    for plugin in &plugins {
        let ipam = &plugin["ipam"];
        if ipam["type"] != IPAM_PLUGIN {
            continue;
        }
        let named = ipam["default_subnet"].as_str().into_iter().chain(
            ipam["default_subnets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str),
        );
        for subnet in named {
            if !subnet_exists(subnet) {
                problems.push(format!(
                    "{IPAM_PLUGIN} names Subnet {subnet:?}, which does not exist: create it \
                     (kubectl get subnets) or fix the name"
                ));
            }
        }
    }
    let main = plugins
        .first()
        .map(|plugin| plugin_type(plugin))
        .unwrap_or_default();
    let bridge_binding = plugins.iter().any(|plugin| {
        plugin_type(plugin) == COORDINATOR_PLUGIN && plugin["kubevirtBinding"] == "bridge"
    });
    if bridge_binding && (main == "macvlan" || main == "ipvlan") {
        problems.push(format!(
            "kubevirtBinding \"bridge\" cannot work on {main}: the bridge binding moves the pod \
             interface's MAC into the VM, which {main} cannot carry; use passt"
        ));
    }
    problems
}

/// What to do about the NetworkAttachmentDefinition of a Network.
#[derive(Debug, PartialEq)]
pub enum NadPlan {
    /// None exists: create this one.
    Create(NetworkAttachmentDefinition),
    /// Ours, but edited (or its config unreadable): replace it with this one (which carries the
    /// existing resourceVersion, so a concurrent edit makes the write fail and retry).
    Replace(NetworkAttachmentDefinition),
    /// Ours and as rendered.
    UpToDate,
    /// A NetworkAttachmentDefinition of that name that this Network does not control: never
    /// written. `owner` describes who controls it, if anyone.
    Foreign { owner: Option<String> },
}

/// The Network has no uid yet (it was never stored): nothing can name it as owner.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("Network {0} has no uid yet; it will be retried")]
pub struct NoUid(pub String);

/// Decides from the Network and the same-name NetworkAttachmentDefinition, if any.
pub fn plan_nad(
    network: &Network,
    existing: Option<&NetworkAttachmentDefinition>,
) -> Result<NadPlan, NoUid> {
    let owner = network
        .controller_owner_ref(&())
        .ok_or_else(|| NoUid(network.name_any()))?;
    let config = render_config(network);
    let Some(existing) = existing else {
        return Ok(NadPlan::Create(NetworkAttachmentDefinition {
            metadata: ObjectMeta {
                name: Some(network.name_any()),
                namespace: network.namespace(),
                owner_references: Some(vec![owner]),
                ..ObjectMeta::default()
            },
            spec: NetworkAttachmentDefinitionSpec {
                config: Some(config.to_string()),
            },
        }));
    };
    let controller = existing
        .owner_references()
        .iter()
        .find(|reference| reference.controller == Some(true));
    match controller {
        Some(reference) if reference.uid == owner.uid => {}
        other => {
            return Ok(NadPlan::Foreign {
                owner: other.map(|reference| format!("{} {}", reference.kind, reference.name)),
            });
        }
    }
    let shown: Option<Value> = existing
        .spec
        .config
        .as_deref()
        .and_then(|text| serde_json::from_str(text).ok());
    if shown.as_ref() == Some(&config) {
        return Ok(NadPlan::UpToDate);
    }
    let mut replacement = existing.clone();
    replacement.spec.config = Some(config.to_string());
    Ok(NadPlan::Replace(replacement))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    use super::*;

    fn network(spec: Value) -> Network {
        let mut network: Network = serde_json::from_value(json!({
            "apiVersion": "virtnet.io/v1alpha1",
            "kind": "Network",
            "metadata": {"name": "underlay", "namespace": "team", "uid": "net-uid"},
            "spec": spec,
        }))
        .expect("a Network");
        network.metadata.generation = Some(1);
        network
    }

    fn minimal() -> Network {
        network(json!({"master": "ens192", "subnets": {"ipv4": "subnet-v4"}}))
    }

    #[test]
    fn minimal_network_renders_macvlan_bridge_then_the_coordinator() {
        assert_eq!(
            render_config(&minimal()),
            json!({
                "cniVersion": "1.0.0",
                "name": "underlay",
                "plugins": [
                    {"type": "macvlan", "master": "ens192", "mode": "bridge",
                     "ipam": {"type": "virtnet-ipam", "default_subnets": ["subnet-v4"]}},
                    {"type": "virtnet-coordinator"},
                ],
            })
        );
    }

    #[test]
    fn every_option_lands_in_its_plugin() {
        let network = network(json!({
            "cniVersion": "0.3.1",
            "plugin": "ipvlan",
            "master": "ens224",
            "mode": "l3",
            "mtu": 9000,
            "vlanId": 100,
            "subnets": {"ipv4": "v4", "ipv6": "v6"},
            "coordinator": {"mode": "underlay", "podDefaultRouteNIC": "net1",
                            "detectIPConflict": true, "detectGateway": true,
                            "vethHostMTU": 1400, "kubevirtBinding": "passt"},
            "allowPersistentIPs": true,
        }));
        assert_eq!(
            render_config(&network),
            json!({
                "cniVersion": "0.3.1",
                "name": "underlay",
                "allowPersistentIPs": true,
                "plugins": [
                    {"type": "ipvlan", "master": "ens224.100", "mode": "l3", "mtu": 9000,
                     "ipam": {"type": "virtnet-ipam", "default_subnets": ["v4", "v6"]}},
                    {"type": "virtnet-coordinator", "mode": "underlay",
                     "podDefaultRouteNIC": "net1", "detectIPConflict": true,
                     "detectGateway": true, "vethHostMTU": 1400, "kubevirtBinding": "passt"},
                ],
            })
        );
    }

    #[test]
    fn rendered_plugins_parse_with_the_plugins_own_config_readers() {
        let config = render_config(&network(json!({
            "master": "ens192",
            "subnets": {"ipv4": "v4", "ipv6": "v6"},
            "coordinator": {"detectGateway": true, "kubevirtBinding": "bridge"},
        })));
        for plugin in config["plugins"].as_array().expect("plugins") {
            let mut single = plugin.clone();
            single["cniVersion"] = config["cniVersion"].clone();
            single["name"] = config["name"].clone();
            let parsed = virtnet_cni::NetworkConfig::parse(single.to_string().as_bytes())
                .expect("a plugin config");
            if plugin["type"] == COORDINATOR_PLUGIN {
                virtnet_coordinator::config::CoordinatorConfig::from_network(&parsed)
                    .expect("the coordinator accepts its config");
            } else {
                let ipam = virtnet_ipam::config::IpamConfig::from_network(&parsed)
                    .expect("virtnet-ipam accepts its section");
                assert_eq!(ipam.subnets, ["v4", "v6"]);
            }
        }
    }

    #[test]
    fn absent_nad_is_created_with_a_controller_owner_reference() {
        let NadPlan::Create(nad) = plan_nad(&minimal(), None).expect("plan") else {
            panic!("expected a create");
        };
        assert_eq!(nad.metadata.name.as_deref(), Some("underlay"));
        assert_eq!(nad.metadata.namespace.as_deref(), Some("team"));
        let owner = &nad.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("Network", "net-uid", Some(true))
        );
        let config: Value =
            serde_json::from_str(nad.spec.config.as_deref().expect("config")).expect("JSON");
        assert_eq!(config, render_config(&minimal()));
    }

    fn owned(config: &str) -> NetworkAttachmentDefinition {
        let NadPlan::Create(mut nad) = plan_nad(&minimal(), None).expect("plan") else {
            panic!("expected a create");
        };
        nad.spec.config = Some(config.to_owned());
        nad.metadata.resource_version = Some("7".into());
        nad
    }

    #[test]
    fn our_nad_is_left_when_it_matches_and_put_back_when_edited() {
        let rendered = render_config(&minimal());
        // Same JSON, other formatting: nothing to write.
        let pretty = serde_json::to_string_pretty(&rendered).expect("JSON");
        assert_eq!(
            plan_nad(&minimal(), Some(&owned(&pretty))),
            Ok(NadPlan::UpToDate)
        );
        for edited in [
            rendered.to_string().replace("ens192", "ens999"),
            "{not json".to_owned(),
        ] {
            let NadPlan::Replace(replacement) =
                plan_nad(&minimal(), Some(&owned(&edited))).expect("plan")
            else {
                panic!("expected a replace of {edited}");
            };
            assert_eq!(replacement.metadata.resource_version.as_deref(), Some("7"));
            assert_eq!(replacement.spec.config, Some(rendered.to_string()));
        }
    }

    #[test]
    fn a_nad_this_network_does_not_control_is_never_written() {
        let mut hand_written = owned("{}");
        hand_written.metadata.owner_references = None;
        assert_eq!(
            plan_nad(&minimal(), Some(&hand_written)),
            Ok(NadPlan::Foreign { owner: None })
        );
        // Controlled by something else, or by an earlier Network of the same name.
        for (kind, uid) in [("SpiderMultusConfig", "other"), ("Network", "old-uid")] {
            let mut taken = owned("{}");
            taken.metadata.owner_references = Some(vec![OwnerReference {
                kind: kind.into(),
                name: "underlay".into(),
                uid: uid.into(),
                controller: Some(true),
                ..OwnerReference::default()
            }]);
            assert_eq!(
                plan_nad(&minimal(), Some(&taken)),
                Ok(NadPlan::Foreign {
                    owner: Some(format!("{kind} underlay"))
                })
            );
        }
    }

    #[test]
    fn a_network_never_stored_cannot_own_anything() {
        let mut network = minimal();
        network.metadata.uid = None;
        assert_eq!(plan_nad(&network, None), Err(NoUid("underlay".into())));
    }

    #[test]
    fn broken_virtnet_nads_are_told_what_to_fix_and_others_are_never_judged() {
        let known = |name: &str| name == "subnet";
        let sound = r#"{"cniVersion": "1.0.0", "name": "u", "plugins": [
            {"type": "macvlan", "master": "ens192", "ipam": {"type": "virtnet-ipam", "default_subnet": "subnet"}},
            {"type": "virtnet-coordinator"}]}"#;
        assert_eq!(nad_problems(Some(sound), known), Vec::<String>::new());
        let other = r#"{"cniVersion": "9.9", "type": "bridge", "ipam": {"type": "host-local"}}"#;
        assert_eq!(nad_problems(Some(other), known), Vec::<String>::new());
        assert_eq!(nad_problems(None, known), Vec::<String>::new());
        let cases = [
            (r#"{"type": "virtnet-coordinator",}"#.to_owned(), "not valid JSON"),
            (sound.replace("1.0.0", "0.2.0"), "cniVersion \"0.2.0\""),
            (sound.replace("\"subnet\"}", "\"nosuch\"}"), "Subnet \"nosuch\""),
            (
                r#"{"cniVersion": "1.0.0", "name": "u", "plugins": [{"type": "virtnet-coordinator"},
                   {"type": "macvlan", "ipam": {"type": "virtnet-ipam", "default_subnets": ["subnet"]}}]}"#
                    .to_owned(),
                "must be the last plugin",
            ),
            (
                sound.replace(r#"{"type": "virtnet-coordinator"}"#, r#"{"type": "virtnet-coordinator", "kubevirtBinding": "bridge"}"#),
                "use passt",
            ),
        ];
        for (config, expected) in cases {
            let problems = nad_problems(Some(&config), known);
            assert!(
                problems.len() == 1 && problems[0].contains(expected),
                "{config}: {problems:?}"
            );
        }
    }
}
