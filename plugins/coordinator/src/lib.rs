//! virtnet-coordinator: the chained CNI plugin that runs after the pod's underlay interface
//! plugin (macvlan) and, in time, wires the pod to its host and to Services.
//!
//! What it does **today**:
//! - validates the environment, its own keys ([`config::CoordinatorConfig`]) and, for ADD and
//!   CHECK, the `prevResult` (at least one interface and one IP, well-formed addresses);
//! - ADD prints `prevResult` unchanged, converted to the config's `cniVersion`;
//! - CHECK, DEL, GC and STATUS succeed without touching anything.
//!
//! The host veth, routes, `ip rule`s in `hostRuleTable`, neighbour entries, conflict and
//! gateway detection come with the netlink layer; every setting they need is already parsed and
//! validated here, so a conflist that works today keeps working then.

pub mod config;
pub mod error;
pub mod plan;

use virtnet_cni::env::{Attachment, Detachment};
use virtnet_cni::logging::LogSettings;
use virtnet_cni::skel::{Call, Plugin};
use virtnet_cni::{CniError, CniResult, NetworkConfig};

use crate::config::CoordinatorConfig;
use crate::error::CoordinatorError;

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
        let pod_interfaces = chained_result(call.network)?;
        tracing::debug!(
            mode = ?call.config.mode,
            netns = %attachment.netns.display(),
            "host wiring is not implemented yet; passing prevResult through unchanged"
        );
        Ok(pod_interfaces)
    }

    fn del(
        &self,
        _call: &Call<'_, CoordinatorConfig>,
        _detachment: &Detachment,
    ) -> Result<(), CniError> {
        // ADD changes nothing yet, so there is nothing to undo.
        Ok(())
    }

    fn check(
        &self,
        call: &Call<'_, CoordinatorConfig>,
        _attachment: &Attachment,
    ) -> Result<(), CniError> {
        chained_result(call.network).map(drop)
    }

    fn gc(&self, _call: &Call<'_, CoordinatorConfig>) -> Result<(), CniError> {
        Ok(())
    }

    fn status(&self, _call: &Call<'_, CoordinatorConfig>) -> Result<(), CniError> {
        Ok(())
    }
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
