//! virtnet-ipam: the CNI IPAM plugin that hands pods addresses from VirtNet Subnets.
//!
//! The container runtime runs it through an interface plugin such as macvlan, whose `ipam`
//! section configures it (see [`config::IpamConfig`]):
//!
//! ```json
//! "ipam": { "type": "virtnet-ipam", "default_subnet": "subnet" }
//! ```
//!
//! Every command validates the environment and the whole `ipam` section first, then asks the
//! node agent over its unix socket ([`agent::AgentEndpoint::send`], the API is
//! [`virtnet_cni::agent_api`]). An unreachable, slow or crashed agent is code 11 (try again
//! later; STATUS: code 50); the agent's own refusals keep their codes (pool exhausted 100,
//! Subnet not found 101, ...). ADD prints the addresses, routes and DNS in the caller's version.

pub mod agent;
pub mod config;
pub mod error;

use virtnet_cni::config::GcAttachment;
use virtnet_cni::env::{Attachment, Detachment};
use virtnet_cni::logging::LogSettings;
use virtnet_cni::skel::{Call, Plugin};
use virtnet_cni::{CniError, CniResult, NetworkConfig};

use crate::agent::{AgentRequest, PodIdentity};
use crate::config::IpamConfig;
use crate::error::IpamPluginError;

pub const PLUGIN_NAME: &str = "virtnet-ipam";

pub struct IpamPlugin;

impl Plugin for IpamPlugin {
    const NAME: &'static str = PLUGIN_NAME;
    type Config = IpamConfig;

    fn parse_config(&self, network: &NetworkConfig) -> Result<IpamConfig, CniError> {
        IpamConfig::from_network(network)
    }

    fn log_settings<'c>(&self, config: &'c IpamConfig) -> &'c LogSettings {
        &config.logging
    }

    fn add(
        &self,
        call: &Call<'_, IpamConfig>,
        attachment: &Attachment,
    ) -> Result<CniResult, CniError> {
        let pod = PodIdentity::from_args(&attachment.args)?;
        let request = AgentRequest::Allocate {
            network: call.network.name.as_deref(),
            attachment,
            pod,
            subnets: &call.config.subnets,
        };
        Ok(call.config.agent.send(&request)?)
    }

    fn del(&self, call: &Call<'_, IpamConfig>, detachment: &Detachment) -> Result<(), CniError> {
        call.config.agent.send(&AgentRequest::Release {
            network: call.network.name.as_deref(),
            detachment,
        })?;
        Ok(())
    }

    fn check(&self, call: &Call<'_, IpamConfig>, attachment: &Attachment) -> Result<(), CniError> {
        call.config.agent.send(&AgentRequest::Check {
            network: call.network.name.as_deref(),
            attachment,
        })?;
        Ok(())
    }

    fn gc(&self, call: &Call<'_, IpamConfig>) -> Result<(), CniError> {
        let valid_attachments: &[GcAttachment] = call
            .network
            .valid_attachments
            .as_deref()
            .unwrap_or_default();
        call.config.agent.send(&AgentRequest::GarbageCollect {
            network: call.network.name.as_deref(),
            valid_attachments,
        })?;
        Ok(())
    }

    fn status(&self, call: &Call<'_, IpamConfig>) -> Result<(), CniError> {
        call.config
            .agent
            .send(&AgentRequest::Status)
            .map_err(|error| IpamPluginError::NotAvailable(Box::new(error)))?;
        Ok(())
    }
}
