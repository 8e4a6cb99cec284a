//! What the stand-in tells the API about a pod: its status, shaped as the kubelet writes it, and
//! Warning events.
use std::net::IpAddr;

use k8s_openapi::{
    api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateWaiting, ContainerStatus, Event,
        EventSource, HostIP, ObjectReference, Pod, PodCondition, PodIP, PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

/// The field manager of every write, so `managedFields` show who wrote what.
pub const FIELD_MANAGER: &str = "virtnet-e2e-kubelet";
/// The event source component, as the real kubelet names itself.
const COMPONENT: &str = "kubelet";

/// The pod IPs the kubelet reports from the sandbox's addresses: at most one per family (the
/// apiserver rejects more), the node's family first.
pub fn select_pod_ips(interface_ips: &[IpAddr], node_ip: IpAddr) -> Vec<IpAddr> {
    let first_of = |want_ipv4: bool| {
        interface_ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == want_ipv4)
    };
    let node_family = first_of(node_ip.is_ipv4());
    let other_family = first_of(!node_ip.is_ipv4());
    node_family.into_iter().chain(other_family).collect()
}

/// Whether the pod already shows what [`running_status`] would write, so nothing is patched.
pub fn status_is_current(pod: &Pod, node_ip: IpAddr, pod_ips: &[IpAddr]) -> bool {
    let Some(status) = &pod.status else {
        return false;
    };
    let reported_ips: Vec<Option<IpAddr>> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|pod_ip| pod_ip.ip.parse().ok())
        .collect();
    let expected_ips: Vec<Option<IpAddr>> = pod_ips.iter().copied().map(Some).collect();
    status.phase.as_deref() == Some("Running")
        && status.host_ip.as_deref().and_then(|ip| ip.parse().ok()) == Some(node_ip)
        && reported_ips == expected_ips
        && condition_is_true(status, "Ready")
}

fn condition_is_true(status: &PodStatus, condition_type: &str) -> bool {
    status
        .conditions
        .iter()
        .flatten()
        .any(|condition| condition.type_ == condition_type && condition.status == "True")
}

/// The status of a pod whose containers all run: the body of a merge patch.
pub fn running_status(
    pod: &Pod,
    node_ip: IpAddr,
    pod_ips: &[IpAddr],
    container_id: &str,
    now: Timestamp,
) -> Value {
    // A re-reported pod (after a restart) keeps the time it first started.
    let start_time = pod
        .status
        .as_ref()
        .and_then(|status| status.start_time.clone())
        .unwrap_or(Time(now));
    let container_statuses = containers(pod)
        .map(|(name, image)| ContainerStatus {
            name: name.to_owned(),
            ready: true,
            started: Some(true),
            restart_count: 0,
            image: image.to_owned(),
            image_id: image.to_owned(),
            container_id: Some(format!("containerd://{container_id}")),
            state: Some(ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(start_time.clone()),
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        })
        .collect();
    let conditions = [
        "PodScheduled",
        "PodReadyToStartContainers",
        "Initialized",
        "ContainersReady",
        "Ready",
    ]
    .into_iter()
    .map(|condition_type| condition(condition_type, true, None, None, now))
    .collect();
    let status = PodStatus {
        phase: Some("Running".to_owned()),
        pod_ip: pod_ips.first().map(IpAddr::to_string),
        pod_ips: Some(
            pod_ips
                .iter()
                .map(|ip| PodIP { ip: ip.to_string() })
                .collect(),
        ),
        start_time: Some(start_time),
        conditions: Some(conditions),
        container_statuses: Some(container_statuses),
        ..host_status(node_ip)
    };
    json!({ "status": status })
}

/// The status of a pod whose sandbox could not be created: Pending, containers waiting, and
/// the error on the `PodReadyToStartContainers` condition. Body of a merge patch.
pub fn sandbox_failed_status(pod: &Pod, node_ip: IpAddr, message: &str, now: Timestamp) -> Value {
    let container_names: Vec<&str> = containers(pod).map(|(name, _)| name).collect();
    let not_ready = format!(
        "containers with unready status: [{}]",
        container_names.join(" ")
    );
    let conditions = vec![
        condition("PodScheduled", true, None, None, now),
        condition(
            "PodReadyToStartContainers",
            false,
            Some("FailedCreatePodSandBox"),
            Some(message),
            now,
        ),
        condition("Initialized", true, None, None, now),
        condition(
            "ContainersReady",
            false,
            Some("ContainersNotReady"),
            Some(&not_ready),
            now,
        ),
        condition(
            "Ready",
            false,
            Some("ContainersNotReady"),
            Some(&not_ready),
            now,
        ),
    ];
    let container_statuses = containers(pod)
        .map(|(name, image)| ContainerStatus {
            name: name.to_owned(),
            ready: false,
            started: Some(false),
            restart_count: 0,
            image: image.to_owned(),
            image_id: String::new(),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ContainerCreating".to_owned()),
                    message: None,
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        })
        .collect();
    let status = PodStatus {
        phase: Some("Pending".to_owned()),
        conditions: Some(conditions),
        container_statuses: Some(container_statuses),
        ..host_status(node_ip)
    };
    // Explicit nulls: a sandbox that failed after a restart must not leave old addresses behind.
    let mut status = json!(status);
    status["podIP"] = Value::Null;
    status["podIPs"] = Value::Null;
    json!({ "status": status })
}

fn host_status(node_ip: IpAddr) -> PodStatus {
    PodStatus {
        host_ip: Some(node_ip.to_string()),
        host_ips: Some(vec![HostIP {
            ip: node_ip.to_string(),
        }]),
        ..PodStatus::default()
    }
}

fn containers(pod: &Pod) -> impl Iterator<Item = (&str, &str)> {
    pod.spec
        .iter()
        .flat_map(|spec| &spec.containers)
        .map(|container| {
            (
                container.name.as_str(),
                container.image.as_deref().unwrap_or_default(),
            )
        })
}

fn condition(
    condition_type: &str,
    is_true: bool,
    reason: Option<&str>,
    message: Option<&str>,
    now: Timestamp,
) -> PodCondition {
    PodCondition {
        type_: condition_type.to_owned(),
        status: if is_true { "True" } else { "False" }.to_owned(),
        reason: reason.map(str::to_owned),
        message: message.map(str::to_owned),
        last_transition_time: Some(Time(now)),
        ..PodCondition::default()
    }
}

/// Writes a status document made by [`running_status`] or [`sandbox_failed_status`].
pub async fn patch_pod_status(
    client: &Client,
    pod: &Pod,
    status: &Value,
) -> Result<(), kube::Error> {
    let api: Api<Pod> = Api::namespaced(
        client.clone(),
        pod.metadata.namespace.as_deref().unwrap_or_default(),
    );
    api.patch_status(
        pod.metadata.name.as_deref().unwrap_or_default(),
        &patch_params(),
        &Patch::Merge(status),
    )
    .await
    .map(drop)
}

/// Merge patches under the stand-in's field manager.
pub fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    }
}

/// The Warning events of one pod; a repeat of the last one bumps its count instead of adding
/// another, like the kubelet's event correlator.
#[derive(Debug, Default)]
pub struct PodEvents {
    last: Option<RecordedEvent>,
}

#[derive(Debug)]
struct RecordedEvent {
    name: String,
    reason: &'static str,
    message: String,
    count: i32,
}

impl PodEvents {
    pub async fn warn(
        &mut self,
        client: &Client,
        node_name: &str,
        pod: &Pod,
        reason: &'static str,
        message: &str,
    ) -> Result<(), kube::Error> {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let api: Api<Event> = Api::namespaced(client.clone(), namespace);
        let now = Time(Timestamp::now());
        if let Some(last) = &mut self.last
            && last.reason == reason
            && last.message == message
        {
            let bump = json!({ "count": last.count + 1, "lastTimestamp": now });
            match api
                .patch(&last.name, &patch_params(), &Patch::Merge(&bump))
                .await
            {
                Ok(_) => {
                    last.count += 1;
                    return Ok(());
                }
                // Events expire (1 h by default); start a new one.
                Err(kube::Error::Api(status)) if status.is_not_found() => {}
                Err(error) => return Err(error),
            }
        }
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{pod_name}.")),
                namespace: Some(namespace.to_owned()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: Some(pod_name),
                namespace: Some(namespace.to_owned()),
                uid: pod.metadata.uid.clone(),
                resource_version: pod.metadata.resource_version.clone(),
                ..ObjectReference::default()
            },
            reason: Some(reason.to_owned()),
            message: Some(message.to_owned()),
            type_: Some("Warning".to_owned()),
            source: Some(EventSource {
                component: Some(COMPONENT.to_owned()),
                host: Some(node_name.to_owned()),
            }),
            reporting_component: Some(COMPONENT.to_owned()),
            reporting_instance: Some(node_name.to_owned()),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Event::default()
        };
        let created = api.create(&PostParams::default(), &event).await?;
        self.last = Some(RecordedEvent {
            name: created.metadata.name.unwrap_or_default(),
            reason,
            message: message.to_owned(),
            count: 1,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Container, PodSpec};

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("valid IP")
    }

    #[test]
    fn one_pod_ip_per_family_with_the_node_family_first() {
        let ips = [
            ip("fd00:6::10"),
            ip("10.6.0.10"),
            ip("10.6.0.11"),
            ip("fd00:6::11"),
        ];
        assert_eq!(
            select_pod_ips(&ips, ip("10.6.1.1")),
            [ip("10.6.0.10"), ip("fd00:6::10")]
        );
        assert_eq!(
            select_pod_ips(&ips, ip("fd00:6::1:1")),
            [ip("fd00:6::10"), ip("10.6.0.10")]
        );
        assert_eq!(
            select_pod_ips(&[ip("fd00:6::10")], ip("10.6.1.1")),
            [ip("fd00:6::10")]
        );
        assert!(select_pod_ips(&[], ip("10.6.1.1")).is_empty());
    }

    fn pod() -> Pod {
        let container = |name: &str| Container {
            name: name.to_owned(),
            image: Some("busybox:1.37".to_owned()),
            ..Container::default()
        };
        Pod {
            spec: Some(PodSpec {
                containers: vec![container("web"), container("sidecar")],
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    fn with_status(mut pod: Pod, document: &Value) -> Pod {
        pod.status = Some(serde_json::from_value(document["status"].clone()).expect("a PodStatus"));
        pod
    }

    #[test]
    fn a_running_status_reports_addresses_conditions_and_containers() {
        let now = Timestamp::now();
        let pod_ips = [ip("10.6.0.10"), ip("fd00:6::10")];
        let document = running_status(&pod(), ip("10.6.1.1"), &pod_ips, "ab12", now);
        let status = &document["status"];
        assert_eq!(status["phase"], "Running");
        assert_eq!(status["hostIP"], "10.6.1.1");
        assert_eq!(status["hostIPs"], json!([{"ip": "10.6.1.1"}]));
        assert_eq!(status["podIP"], "10.6.0.10");
        assert_eq!(
            status["podIPs"],
            json!([{"ip": "10.6.0.10"}, {"ip": "fd00:6::10"}])
        );
        let conditions = status["conditions"].as_array().expect("conditions");
        assert_eq!(conditions.len(), 5);
        assert!(
            conditions
                .iter()
                .all(|condition| condition["status"] == "True")
        );
        let containers = status["containerStatuses"].as_array().expect("containers");
        assert_eq!(containers.len(), 2);
        assert_eq!(containers[1]["name"], "sidecar");
        assert_eq!(containers[1]["ready"], true);
        assert_eq!(containers[1]["containerID"], "containerd://ab12");
        assert!(containers[1]["state"]["running"].is_object());

        let reported = with_status(pod(), &document);
        assert!(status_is_current(&reported, ip("10.6.1.1"), &pod_ips));
        assert!(!status_is_current(&reported, ip("10.6.1.1"), &pod_ips[..1]));
        assert!(!status_is_current(&reported, ip("10.6.1.2"), &pod_ips));
        assert!(!status_is_current(&pod(), ip("10.6.1.1"), &pod_ips));
    }

    #[test]
    fn a_restarted_pod_keeps_its_start_time() {
        let first = Timestamp::from_second(1_000).expect("valid time");
        let reported = with_status(
            pod(),
            &running_status(&pod(), ip("10.6.1.1"), &[], "ab", first),
        );
        let again = running_status(&reported, ip("10.6.1.1"), &[], "ab", Timestamp::now());
        assert_eq!(again["status"]["startTime"], json!(Time(first)));
    }

    #[test]
    fn a_failed_sandbox_leaves_the_pod_pending_with_the_error() {
        let message =
            "plugin type=\"virtnet-ipam\" name=\"underlay\" failed (add): pool web exhausted";
        let document = sandbox_failed_status(&pod(), ip("10.6.1.1"), message, Timestamp::now());
        let status = &document["status"];
        assert_eq!(status["phase"], "Pending");
        assert_eq!(status["podIPs"], Value::Null);
        let sandbox_condition = status["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .find(|condition| condition["type"] == "PodReadyToStartContainers")
            .expect("the sandbox condition");
        assert_eq!(sandbox_condition["status"], "False");
        assert_eq!(sandbox_condition["reason"], "FailedCreatePodSandBox");
        assert_eq!(sandbox_condition["message"], message);
        assert_eq!(
            status["containerStatuses"][0]["state"]["waiting"]["reason"],
            "ContainerCreating"
        );
        let reported = with_status(pod(), &document);
        assert!(!status_is_current(&reported, ip("10.6.1.1"), &[]));
    }
}
