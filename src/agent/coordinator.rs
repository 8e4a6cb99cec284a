//! What virtnet-coordinator asks the agent (`POST /v1/coordinator`): the cluster's Service CIDRs
//! and the choices the pod itself makes about its wiring. Decisions are the pure functions
//! [`service_cidrs_of`], [`pod_wiring`] and [`vmi_binding`]; [`Coordination`] holds the
//! ServiceCIDR cache and reads a virt-launcher pod's VirtualMachineInstance.
//!
//! Nothing here may hold up a pod: a cluster without the ServiceCIDR API (or without KubeVirt)
//! gives an empty answer, and the coordinator warns and wires what it can.

use std::sync::Arc;

use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::Value;
use tracing::warn;
use virtnet_cni::agent_api::{
    ApiError, CoordinatorRequest, CoordinatorResponse, DEFAULT_ROUTE_NIC_ANNOTATION, ErrorKind,
};
use virtnet_cni::env::check_interface_name;

use super::service::Agent;
use crate::ipam::{KUBEVIRT_API_GROUP, KUBEVIRT_LAUNCHER_LABEL, KUBEVIRT_LAUNCHER_VALUE};

/// KubeVirt sets it on the target pod of a live migration.
pub const MIGRATION_JOB_ANNOTATION: &str = "kubevirt.io/migrationJobName";
/// The pod interface KubeVirt's pod network (`pod: {}`) is attached as.
const POD_NETWORK_IFNAME: &str = "eth0";
/// The bindings KubeVirt spells as a key of the interface (`bridge: {}`), rather than as
/// `binding: {name: ...}`.
const BUILT_IN_BINDINGS: &[&str] = &["bridge", "masquerade", "passt", "sriov", "slirp", "macvtap"];

/// The agent's state for the coordinator: the node agent (for its pod cache), a client for
/// VirtualMachineInstances, and where the Service CIDRs come from.
pub struct Coordination {
    agent: Arc<Agent>,
    client: Client,
    service_cidrs: ServiceCidrSource,
}

enum ServiceCidrSource {
    /// `--service-cidr`: the operator said so.
    Configured(Vec<IpNet>),
    /// The ServiceCIDR objects, watched.
    Discovered(Store<ServiceCIDR>),
}

impl Coordination {
    /// Starts watching ServiceCIDRs unless `configured` names the CIDRs. The watch is not waited
    /// for: until it has synced (or forever, on a cluster that does not serve the API or
    /// RBAC that does not allow it) the answer has no Service CIDRs.
    pub fn start(agent: Arc<Agent>, client: Client, configured: Vec<IpNet>) -> Self {
        let service_cidrs = if configured.is_empty() {
            let (reader, writer) = reflector::store();
            let api: Api<ServiceCIDR> = Api::all(client.clone());
            let stream = reflector::reflector(
                writer,
                watcher(api, watcher::Config::default()).default_backoff(),
            );
            tokio::spawn(stream.for_each(|event| async move {
                if let Err(error) = event {
                    warn!(
                        %error,
                        "cannot watch ServiceCIDRs (networking.k8s.io/v1, Kubernetes 1.33+); pods \
                         get no Service routes from the coordinator until this works or \
                         --service-cidr is set"
                    );
                }
            }));
            ServiceCidrSource::Discovered(reader)
        } else {
            ServiceCidrSource::Configured(configured)
        };
        Self {
            agent,
            client,
            service_cidrs,
        }
    }

    pub async fn answer(
        &self,
        request: &CoordinatorRequest,
    ) -> Result<CoordinatorResponse, ApiError> {
        let service_cidrs = match &self.service_cidrs {
            ServiceCidrSource::Configured(cidrs) => cidrs.clone(),
            ServiceCidrSource::Discovered(store) => service_cidrs_of(
                &store
                    .state()
                    .iter()
                    .map(|object| ServiceCIDR::clone(object))
                    .collect::<Vec<_>>(),
            ),
        };
        let Some(pod_ref) = &request.pod else {
            return Ok(CoordinatorResponse {
                service_cidrs,
                ..CoordinatorResponse::default()
            });
        };
        let pod = self.agent.pod(pod_ref).await?;
        let vmi = match launcher_vmi(&pod) {
            Some(name) => self.read_vmi(&pod_ref.namespace, name).await,
            None => None,
        };
        Ok(CoordinatorResponse {
            service_cidrs,
            allocated: Some(
                self.agent
                    .addresses_of(&pod.uid().unwrap_or_default(), &request.ifname),
            ),
            ..pod_wiring(&pod, &request.ifname, vmi.as_ref())?
        })
    }

    /// The VMI's spec, or `None` (with a warning) when it cannot be read.
    async fn read_vmi(&self, namespace: &str, name: &str) -> Option<Value> {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(KUBEVIRT_API_GROUP, "v1", "VirtualMachineInstance"),
            "virtualmachineinstances",
        );
        let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), namespace, &resource);
        match api.get_opt(name).await {
            Ok(found) => found.map(|vmi| vmi.data["spec"].clone()),
            Err(error) => {
                warn!(
                    %error,
                    "cannot read VirtualMachineInstance {namespace}/{name}; its binding is unknown, \
                     so the coordinator wires the pod as any other"
                );
                None
            }
        }
    }
}

/// Every CIDR of every ServiceCIDR not being deleted, each once, IPv4 first.
pub fn service_cidrs_of(objects: &[ServiceCIDR]) -> Vec<IpNet> {
    let mut cidrs: Vec<IpNet> = objects
        .iter()
        .filter(|object| object.metadata.deletion_timestamp.is_none())
        .filter_map(|object| object.spec.as_ref()?.cidrs.as_ref())
        .flatten()
        .filter_map(|cidr| cidr.parse::<IpNet>().ok())
        .map(|cidr| cidr.trunc())
        .collect();
    cidrs.sort_by_key(|cidr| (cidr.addr().is_ipv6(), *cidr));
    cidrs.dedup();
    cidrs
}

/// The name of the VirtualMachineInstance a virt-launcher pod runs, from its owner reference.
pub fn launcher_vmi(pod: &Pod) -> Option<&str> {
    let is_launcher = pod
        .labels()
        .get(KUBEVIRT_LAUNCHER_LABEL)
        .map(String::as_str)
        == Some(KUBEVIRT_LAUNCHER_VALUE);
    is_launcher.then_some(())?;
    pod.owner_references()
        .iter()
        .find(|owner| {
            owner.kind == "VirtualMachineInstance"
                && owner.api_version.split('/').next() == Some(KUBEVIRT_API_GROUP)
        })
        .map(|owner| owner.name.as_str())
}

/// The pod's own choices: its default-route NIC annotation (an invalid one is refused: the
/// coordinator fails the ADD saying so), whether it is a migration target, and the binding of
/// `ifname` from its VMI's `spec`.
pub fn pod_wiring(
    pod: &Pod,
    ifname: &str,
    vmi_spec: Option<&Value>,
) -> Result<CoordinatorResponse, ApiError> {
    let default_route_nic = pod
        .annotations()
        .get(DEFAULT_ROUTE_NIC_ANNOTATION)
        .map(|nic| {
            check_interface_name(nic)
                .map(|()| nic.clone())
                .map_err(|reason| {
                    ApiError::new(
                        ErrorKind::InvalidRequest,
                        format!(
                            "pod annotation {DEFAULT_ROUTE_NIC_ANNOTATION}={nic:?} is not an \
                         interface name ({reason}); set it to the pod interface that carries the \
                         default route, e.g. \"net1\""
                        ),
                    )
                })
        })
        .transpose()?;
    Ok(CoordinatorResponse {
        service_cidrs: Vec::new(),
        default_route_nic,
        kubevirt_binding: vmi_spec.and_then(|spec| vmi_binding(spec, ifname)),
        migration_target: pod.annotations().contains_key(MIGRATION_JOB_ANNOTATION),
        allocated: None,
    })
}

/// The binding of the VMI interface that `ifname` carries. Only the pod network (`pod: {}`,
/// attached as eth0) is mapped: KubeVirt names the pod interfaces of Multus networks after a
/// hash of the network name, which this does not reproduce.
pub fn vmi_binding(spec: &Value, ifname: &str) -> Option<String> {
    if ifname != POD_NETWORK_IFNAME {
        return None;
    }
    let network = spec["networks"]
        .as_array()?
        .iter()
        .find(|network| network.get("pod").is_some())?["name"]
        .as_str()?;
    let interface = spec["domain"]["devices"]["interfaces"]
        .as_array()?
        .iter()
        .find(|interface| interface["name"] == network)?;
    interface["binding"]["name"]
        .as_str()
        .or_else(|| {
            BUILT_IN_BINDINGS
                .iter()
                .copied()
                .find(|binding| interface.get(*binding).is_some())
        })
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).expect("a Pod")
    }

    fn vmi(interface: Value) -> Value {
        json!({
            "networks": [{"name": "default", "pod": {}}, {"name": "storage", "multus": {"networkName": "s"}}],
            "domain": {"devices": {"interfaces": [interface, {"name": "storage", "bridge": {}}]}},
        })
    }

    #[test]
    fn service_cidrs_come_from_every_live_object() {
        let object = |name: &str, cidrs: &[&str], deleting: bool| {
            serde_json::from_value::<ServiceCIDR>(json!({
                "metadata": {
                    "name": name,
                    "deletionTimestamp": deleting.then_some("2026-01-01T00:00:00Z"),
                },
                "spec": {"cidrs": cidrs},
            }))
            .expect("a ServiceCIDR")
        };
        let cidrs = service_cidrs_of(&[
            object("kubernetes", &["fd00:96::/108", "10.96.0.0/16"], false),
            object("extra", &["10.97.0.0/16", "10.96.0.0/16", "garbage"], false),
            object("going", &["10.98.0.0/16"], true),
        ]);
        let expected: Vec<IpNet> = ["10.96.0.0/16", "10.97.0.0/16", "fd00:96::/108"]
            .iter()
            .map(|cidr| cidr.parse().expect("a CIDR"))
            .collect();
        assert_eq!(cidrs, expected);
    }

    #[test]
    fn vmi_binding_of_the_pod_network() {
        for (interface, binding) in [
            (json!({"name": "default", "passt": {}}), Some("passt")),
            (
                json!({"name": "default", "binding": {"name": "passt"}}),
                Some("passt"),
            ),
            (json!({"name": "default", "bridge": {}}), Some("bridge")),
            (
                json!({"name": "default", "masquerade": {}}),
                Some("masquerade"),
            ),
            (json!({"name": "other", "bridge": {}}), None),
        ] {
            assert_eq!(
                vmi_binding(&vmi(interface.clone()), "eth0").as_deref(),
                binding,
                "{interface}"
            );
        }
        assert_eq!(
            vmi_binding(&vmi(json!({"name": "default", "bridge": {}})), "net1"),
            None
        );
        assert_eq!(vmi_binding(&json!({}), "eth0"), None);
    }

    #[test]
    fn launchers_are_recognised_by_label_and_vmi_owner() {
        let launcher = |labels: Value| {
            pod(json!({
                "metadata": {
                    "name": "virt-launcher-vm1-abcde", "namespace": "vms", "labels": labels,
                    "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                                         "name": "vm1", "uid": "u1"}],
                },
            }))
        };
        assert_eq!(
            launcher_vmi(&launcher(json!({"kubevirt.io": "virt-launcher"}))),
            Some("vm1")
        );
        assert_eq!(launcher_vmi(&launcher(json!({}))), None);
    }

    #[test]
    fn pod_annotations_pick_the_default_nic_and_mark_migration_targets() -> Result<(), ApiError> {
        let annotated = |annotations: Value| {
            pod(json!({"metadata": {"name": "p", "namespace": "n", "annotations": annotations}}))
        };
        let plain = pod_wiring(&annotated(json!({})), "eth0", None)?;
        assert_eq!(plain, CoordinatorResponse::default());
        let wiring = pod_wiring(
            &annotated(json!({
                DEFAULT_ROUTE_NIC_ANNOTATION: "net1",
                MIGRATION_JOB_ANNOTATION: "migration-1",
            })),
            "eth0",
            Some(&vmi(json!({"name": "default", "passt": {}}))),
        )?;
        assert_eq!(wiring.default_route_nic.as_deref(), Some("net1"));
        assert!(wiring.migration_target);
        assert_eq!(wiring.kubevirt_binding.as_deref(), Some("passt"));
        let error = pod_wiring(
            &annotated(json!({DEFAULT_ROUTE_NIC_ANNOTATION: "net 1"})),
            "eth0",
            None,
        )
        .expect_err("not an interface name");
        assert_eq!(error.kind, ErrorKind::InvalidRequest);
        assert!(
            error.message.contains(DEFAULT_ROUTE_NIC_ANNOTATION),
            "{}",
            error.message
        );
        Ok(())
    }
}
