//! virtnet-coordinator: the chained CNI plugin that runs after the pod's underlay interface
//! plugin (macvlan) and wires the pod to its node and to Services, and routes extra NICs.
//!
//! - ADD validates the environment, its keys ([`config::CoordinatorConfig`]) and `prevResult`,
//!   asks the node agent ([`agent`]) for the Service CIDRs when the config has none and for the
//!   pod's own choices (its default-route NIC annotation, its KubeVirt binding), reads the
//!   node's addresses, plans ([`plan`]) and applies ([`netlink`]) the changes, rolling back on
//!   failure, then prints `prevResult` unchanged (in the config's `cniVersion`). An agent that
//!   cannot answer never fails the pod: the coordinator warns and wires what its config says.
//! - DEL removes what ADD added, found from the container id and interface name alone; it
//!   succeeds when things, or the pod netns, are already gone.
//!   With `detectIPConflict` / `detectGateway`, ADD first probes the underlay ([`probe`]) and
//!   refuses an address another host answers for, or a gateway that does not answer, before
//!   changing anything; after wiring, it announces the pod's addresses (gratuitous ARP,
//!   unsolicited NA). A KubeVirt live-migration target is neither checked nor announced.
//! - CHECK validates `prevResult`.
//! - GC deletes the host veths of this network whose attachment the runtime no longer lists in
//!   `cni.dev/valid-attachments`, found by the alias ADD gives each ([`plan::plan_gc`]).
//! - STATUS fails with code 50 unless the node's links can be read and the agent answers.

pub mod agent;
pub mod config;
pub mod error;
pub mod netlink;
pub mod plan;
pub mod probe;

use virtnet_cni::agent_api::{CoordinatorRequest, CoordinatorResponse, ErrorKind};
use virtnet_cni::env::{Attachment, Detachment};
use virtnet_cni::logging::LogSettings;
use virtnet_cni::skel::{Call, Plugin};
use virtnet_cni::{CniError, CniResult, NetworkConfig};

use crate::config::{CoordinatorConfig, Mode};
use crate::error::CoordinatorError;
use crate::netlink::{Netlink, NetlinkError, show_mac};
use crate::plan::{Op, Target, Teardown, interface_addresses, plan_add, plan_del, plan_gc};
use crate::probe::{Finding, Prober, plan_probes};

pub const PLUGIN_NAME: &str = "virtnet-coordinator";

pub struct CoordinatorPlugin;

impl Plugin for CoordinatorPlugin {
    const NAME: &'static str = PLUGIN_NAME;
    type Config = CoordinatorConfig;

    fn parse_config(&self, network: &NetworkConfig) -> Result<CoordinatorConfig, CniError> {
        CoordinatorConfig::from_network(network)
    }

    fn log_settings<'c>(&self, config: &'c CoordinatorConfig) -> &'c LogSettings {
        &config.logging
    }

    fn add(
        &self,
        call: &Call<'_, CoordinatorConfig>,
        attachment: &Attachment,
    ) -> Result<CniResult, CniError> {
        let prev = chained_result(call.network)?;
        if call.config.mode == Mode::Disabled {
            return Ok(prev);
        }
        let answer = agent_answer(call.config, attachment)?;
        let migration_target = answer.migration_target;
        let config = &call.config.with_agent_answer(answer);
        if config.service_cidrs.is_empty() {
            tracing::warn!(
                "no Service CIDR is known: the pod reaches its node but not Service ClusterIPs \
                 through it; set serviceCIDRs in the coordinator's config, e.g. \
                 [\"10.96.0.0/12\"], or let the VirtNet agent read them (ServiceCIDR API, or \
                 its --service-cidr flag)"
            );
        }
        let target = Target {
            container_id: &attachment.container_id,
            ifname: &attachment.ifname,
        };
        let netlink = Netlink::open(Some(&attachment.netns)).map_err(CoordinatorError::from)?;
        let node = netlink.node_snapshot().map_err(CoordinatorError::from)?;
        let ops = plan_add(config, target, &prev, &node)?;
        let probes = plan_probes(
            &attachment.ifname,
            &interface_addresses(&prev, &attachment.ifname),
            config.detect_ip_conflict,
            config.detect_gateway,
            migration_target,
        );
        // Before any change, so a refused pod leaves nothing to undo.
        let prober = Prober::open(&attachment.netns, probes).map_err(CoordinatorError::from)?;
        let finding = prober
            .as_ref()
            .map(Prober::check)
            .transpose()
            .map_err(CoordinatorError::from)?
            .flatten();
        match finding {
            None => {}
            Some(Finding::Conflict(answer)) => {
                return Err(CoordinatorError::IpConflict {
                    ip: answer.ip,
                    mac: show_mac(&answer.mac),
                    ifname: attachment.ifname.clone(),
                }
                .into());
            }
            Some(Finding::GatewayUnreachable(gateway)) => {
                return Err(CoordinatorError::GatewayUnreachable {
                    gateway,
                    ifname: attachment.ifname.clone(),
                }
                .into());
            }
        }
        apply_all(&netlink, &ops).map_err(CoordinatorError::from)?;
        if let Some(Err(error)) = prober.as_ref().map(Prober::announce) {
            tracing::warn!(%error, "the pod is wired, but its addresses could not be announced");
        }
        Ok(prev)
    }

    fn del(
        &self,
        call: &Call<'_, CoordinatorConfig>,
        detachment: &Detachment,
    ) -> Result<(), CniError> {
        let target = Target {
            container_id: &detachment.container_id,
            ifname: &detachment.ifname,
        };
        let teardowns = plan_del(call.config, target);
        if teardowns.is_empty() {
            return Ok(());
        }
        // A pod netns that is already gone took the pod side with it: tear down the node side.
        let netlink = match Netlink::open(detachment.netns.as_deref()) {
            Err(NetlinkError::OpenNetns { .. } | NetlinkError::EnterNetns { .. }) => {
                Netlink::open(None)
            }
            opened => opened,
        }
        .map_err(CoordinatorError::from)?;
        teardown_all(&netlink, &teardowns)
    }

    fn check(
        &self,
        call: &Call<'_, CoordinatorConfig>,
        _attachment: &Attachment,
    ) -> Result<(), CniError> {
        chained_result(call.network).map(drop)
    }

    fn gc(&self, call: &Call<'_, CoordinatorConfig>) -> Result<(), CniError> {
        let netlink = Netlink::open(None).map_err(CoordinatorError::from)?;
        let links = netlink.host_links().map_err(CoordinatorError::from)?;
        let valid = call
            .network
            .valid_attachments
            .as_deref()
            .unwrap_or_default();
        teardown_all(&netlink, &plan_gc(call.config, &links, valid))
    }

    fn status(&self, call: &Call<'_, CoordinatorConfig>) -> Result<(), CniError> {
        // It wires nothing, so it needs neither the node's links nor the agent.
        if call.config.mode == Mode::Disabled {
            return Ok(());
        }
        Netlink::open(None)
            .and_then(|netlink| netlink.host_links())
            .map_err(CoordinatorError::NodeLinksUnreadable)?;
        agent::status(call.config).map_err(|failure| CoordinatorError::AgentUnavailable {
            socket: call.config.agent_socket.as_path().to_owned(),
            failure,
        })?;
        Ok(())
    }
}

/// Runs every teardown, even after one fails (each is idempotent, so a retry finishes the
/// job); reports the first failure.
fn teardown_all(netlink: &Netlink, teardowns: &[Teardown]) -> Result<(), CniError> {
    let mut first_error = None;
    for teardown in teardowns {
        if let Err(error) = netlink.teardown(teardown) {
            tracing::warn!(%error, "continuing with the next step");
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(()), |error| Err(CoordinatorError::from(error).into()))
}

/// What the agent adds to the config for this ADD; nothing (with a warning) when it cannot
/// answer. Only a refusal of the pod's own settings (a malformed annotation) fails the ADD.
fn agent_answer(
    config: &CoordinatorConfig,
    attachment: &Attachment,
) -> Result<CoordinatorResponse, CniError> {
    let pod = agent::pod_ref(&attachment.args);
    if !config.needs_agent(pod.is_some()) {
        return Ok(CoordinatorResponse::default());
    }
    let request = CoordinatorRequest {
        ifname: attachment.ifname.clone(),
        pod,
    };
    match agent::ask(config, &request) {
        Ok(answer) => Ok(answer),
        Err(agent::AgentFailure::Refused(refusal)) if refusal.kind == ErrorKind::InvalidRequest => {
            Err(refusal.into())
        }
        Err(failure) => {
            tracing::warn!(
                socket = %config.agent_socket.as_path().display(),
                "the VirtNet agent did not answer ({failure}); wiring the pod from the \
                 coordinator's config alone"
            );
            Ok(CoordinatorResponse::default())
        }
    }
}

/// Applies `ops` in order; on the first failure, takes back what was done (including the
/// failed step, which may have half-happened) so a failed ADD leaves nothing behind.
fn apply_all(netlink: &Netlink, ops: &[Op]) -> Result<(), NetlinkError> {
    for (index, op) in ops.iter().enumerate() {
        if let Err(error) = netlink.apply(op) {
            for undo in ops[..=index].iter().rev().filter_map(Op::undo) {
                if let Err(undo_error) = netlink.teardown(&undo) {
                    tracing::warn!(%undo_error, "rolling back a failed ADD");
                }
            }
            return Err(error);
        }
    }
    Ok(())
}

/// The interface plugin's result, which the coordinator needs to know what to wire up.
fn chained_result(network: &NetworkConfig) -> Result<CniResult, CniError> {
    let result = network
        .prev_result()?
        .ok_or(CoordinatorError::MissingPrevResult)?;
    if result.interfaces.is_empty() {
        return Err(CoordinatorError::NoInterfaces.into());
    }
    if result.ips.is_empty() {
        return Err(CoordinatorError::NoIps.into());
    }
    Ok(result)
}
