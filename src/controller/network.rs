//! The Network reconciler: renders each Network into the NetworkAttachmentDefinition of the same
//! namespace and name ([`super::nads::plan_nad`] decides) and reports the outcome in the
//! Network's `Ready` condition.
//!
//! NetworkAttachmentDefinitions are watched, each mapped to the Network of its own namespace and
//! name, so a hand-edited or deleted NAD is put back as soon as the watch reports it, and a
//! foreign same-name NAD that goes away is replaced by the rendered one. Deleting a Network
//! deletes its NAD through the ownerReference (Kubernetes' garbage collector).

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::{Controller, controller::Action, events::EventType, reflector::ObjectRef, watcher},
};
use serde_json::json;
use tracing::{info, warn};

use super::{
    Context, Error,
    nads::{NadPlan, nad_problems, plan_nad},
};
use crate::crd::{Network, NetworkAttachmentDefinition, NetworkStatus, Subnet};

/// A safety net for missed events, and the cadence at which Subnets created after their Network
/// clear its `UnknownSubnet` reason.
const RESYNC: Duration = Duration::from_secs(60);

/// Whether the API server serves NetworkAttachmentDefinitions (Multus's CRD is installed).
pub async fn nad_crd_installed(ctx: &Context) -> bool {
    let nads: Api<NetworkAttachmentDefinition> = Api::all(ctx.client.clone());
    match nads.list(&ListParams::default().limit(1)).await {
        Ok(_) => true,
        Err(error) => {
            info!(
                %error,
                "NetworkAttachmentDefinitions are not served (Multus's CRD is not installed): \
                 Networks are not rendered; restart the controller after installing Multus"
            );
            false
        }
    }
}

/// Runs the Network reconciler until `stopped` completes.
pub async fn run(ctx: Arc<Context>, stopped: impl Future<Output = ()> + Send + Sync + 'static) {
    let networks: Api<Network> = Api::all(ctx.client.clone());
    let nads: Api<NetworkAttachmentDefinition> = Api::all(ctx.client.clone());
    Controller::new(networks, watcher::Config::default().any_semantic())
        .watches(nads, watcher::Config::default(), |nad| {
            let name = nad.name_any();
            nad.namespace()
                .map(|namespace| ObjectRef::<Network>::new(&name).within(&namespace))
        })
        .graceful_shutdown_on(stopped)
        .run(
            |network, ctx: Arc<Context>| async move {
                let timer = ctx.metrics.reconcile_started("network");
                let result = reconcile(network, ctx.clone()).await;
                timer.finish(result.as_ref().err().map(Error::metric_label));
                result
            },
            |network, error, _ctx| {
                warn!(network = %network.name_any(), %error, "reconcile failed");
                Action::requeue(Duration::from_secs(2))
            },
            ctx,
        )
        .for_each(|_| async {})
        .await;
}

/// Checks every NetworkAttachmentDefinition that uses VirtNet's plugins (rendered or written by
/// hand) whenever it changes, and puts a Warning Event `InvalidConfig` on one whose config
/// cannot work, saying what to fix. NADs of other plugins are never touched.
pub async fn validate(
    ctx: Arc<Context>,
    stopped: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let nads: Api<NetworkAttachmentDefinition> = Api::all(ctx.client.clone());
    Controller::new(nads, watcher::Config::default().any_semantic())
        .graceful_shutdown_on(stopped)
        .run(
            |nad, ctx: Arc<Context>| async move {
                let timer = ctx.metrics.reconcile_started("nad-validation");
                let result = check_nad(&nad, &ctx).await;
                timer.finish(result.as_ref().err().map(Error::metric_label));
                result
            },
            |nad, error, _ctx| {
                warn!(nad = %nad.name_any(), %error, "NAD check failed");
                Action::requeue(Duration::from_secs(5))
            },
            ctx,
        )
        .for_each(|_| async {})
        .await;
}

async fn check_nad(nad: &NetworkAttachmentDefinition, ctx: &Context) -> Result<Action, Error> {
    let config = nad.spec.config.as_deref();
    let names: Vec<String> = if config.is_some_and(|text| text.contains("virtnet-ipam")) {
        Api::<Subnet>::all(ctx.client.clone())
            .list_metadata(&ListParams::default())
            .await?
            .items
            .iter()
            .map(ResourceExt::name_any)
            .collect()
    } else {
        Vec::new()
    };
    let problems = nad_problems(config, |subnet| names.iter().any(|name| name == subnet));
    if !problems.is_empty() {
        warn!(nad = %format!("{}/{}", nad.namespace().unwrap_or_default(), nad.name_any()), ?problems, "NetworkAttachmentDefinition cannot work");
        ctx.publish(
            nad,
            EventType::Warning,
            "InvalidConfig",
            &problems.join("; "),
        )
        .await;
    }
    // Subnets created later clear an unknown-Subnet problem: look again after a while.
    Ok(if problems.is_empty() {
        Action::await_change()
    } else {
        Action::requeue(RESYNC)
    })
}

async fn reconcile(network: Arc<Network>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = network.name_any();
    let namespace = network.namespace().unwrap_or_default();
    let nads: Api<NetworkAttachmentDefinition> = Api::namespaced(ctx.client.clone(), &namespace);
    let existing = nads.get_opt(&name).await?;
    let plan =
        plan_nad(&network, existing.as_ref()).map_err(|problem| Error::MissingUid(problem.0))?;
    let (ok, reason, message) = match plan {
        NadPlan::Create(nad) => {
            nads.create(&PostParams::default(), &nad).await?;
            info!(%namespace, %name, "NetworkAttachmentDefinition rendered");
            ctx.publish(
                &*network,
                EventType::Normal,
                "Rendered",
                "created the NetworkAttachmentDefinition",
            )
            .await;
            (
                true,
                "Rendered",
                "the NetworkAttachmentDefinition matches the spec".to_owned(),
            )
        }
        NadPlan::Replace(nad) => {
            nads.replace(&name, &PostParams::default(), &nad).await?;
            info!(%namespace, %name, "NetworkAttachmentDefinition put back");
            ctx.publish(
                &*network,
                EventType::Normal,
                "Rendered",
                "the NetworkAttachmentDefinition differed from the spec (edited by hand?): \
                 rewrote it; edit the Network instead",
            )
            .await;
            (
                true,
                "Rendered",
                "the NetworkAttachmentDefinition matches the spec".to_owned(),
            )
        }
        NadPlan::UpToDate => (
            true,
            "Rendered",
            "the NetworkAttachmentDefinition matches the spec".to_owned(),
        ),
        NadPlan::Foreign { owner } => {
            let message = format!(
                "a NetworkAttachmentDefinition {namespace}/{name} exists that this Network does \
                 not own ({}): it is left alone; delete it, or rename the Network",
                owner.map_or_else(
                    || "no controller".to_owned(),
                    |owner| format!("controlled by {owner}")
                )
            );
            ctx.publish(&*network, EventType::Warning, "NotOwned", &message)
                .await;
            (false, "NetworkAttachmentDefinitionNotOwned", message)
        }
    };
    let (ok, reason, message) = match missing_subnets(&ctx, &network).await? {
        missing if ok && !missing.is_empty() => (
            false,
            "UnknownSubnet",
            format!(
                "rendered, but no Subnet named {}: create it or fix spec.subnets",
                missing.join(", ")
            ),
        ),
        _ => (ok, reason, message),
    };
    write_status(&ctx, &network, ok, reason, &message).await?;
    Ok(Action::requeue(RESYNC))
}

/// The Subnets `network` names that do not exist.
async fn missing_subnets(ctx: &Context, network: &Network) -> Result<Vec<String>, Error> {
    let subnets: Api<Subnet> = Api::all(ctx.client.clone());
    let mut missing = Vec::new();
    for name in network.spec.subnets.names() {
        if subnets.get_opt(name).await?.is_none() {
            missing.push(name.to_owned());
        }
    }
    Ok(missing)
}

async fn write_status(
    ctx: &Context,
    network: &Network,
    ok: bool,
    reason: &str,
    message: &str,
) -> Result<(), Error> {
    let condition = Condition {
        type_: "Ready".to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: network.metadata.generation,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
    };
    let current = network.status.clone().unwrap_or_default();
    // The NAD named is the one this Network renders, once it holds it.
    let wanted = NetworkStatus {
        network_attachment_definition: (reason != "NetworkAttachmentDefinitionNotOwned")
            .then(|| network.name_any()),
        conditions: vec![condition],
    };
    let shown = current
        .conditions
        .iter()
        .any(|shown| super::subnet::same_condition(shown, &wanted.conditions[0]));
    if shown && current.network_attachment_definition == wanted.network_attachment_definition {
        return Ok(());
    }
    let api: Api<Network> =
        Api::namespaced(ctx.client.clone(), &network.namespace().unwrap_or_default());
    api.patch_status(
        &network.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&json!({ "status": wanted })),
    )
    .await?;
    Ok(())
}
