//! The Subnet reconciler: applies [`super::pools::plan_pools`] through the API server.

use std::{sync::Arc, time::Duration};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions},
    runtime::{controller::Action, events::EventType},
};
use serde_json::json;
use tracing::{info, warn};

use super::{
    Context, Error,
    pools::{PoolCounters, PoolWrite, SubnetPlan, plan_pools},
};
use crate::crd::{IpPool, LABEL_SUBNET, Subnet, SubnetStatus};

/// How often a Subnet is reconciled even when nothing changed (a safety net for missed events).
const RESYNC: Duration = Duration::from_secs(300);

/// Reconciles one Subnet: pools first (one safe round per call), then counters and status.
pub async fn reconcile(subnet: Arc<Subnet>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = subnet.name_any();
    let pools_api: Api<IpPool> = Api::all(ctx.client.clone());
    let pools = pools_api
        .list(&ListParams::default().labels(&format!("{LABEL_SUBNET}={name}")))
        .await?
        .items;
    let plan = match plan_pools(&subnet, &pools) {
        Ok(plan) => plan,
        Err(problem) => {
            let message = problem.to_string();
            warn!(subnet = %name, %message, "Subnet cannot be split into pools");
            ctx.publish(&*subnet, EventType::Warning, "InvalidSpec", &message)
                .await;
            write_status(
                &ctx,
                &subnet,
                None,
                ready(&subnet, false, "InvalidSpec", &message),
            )
            .await?;
            return Ok(Action::requeue(RESYNC));
        }
    };
    if !plan.writes.is_empty() {
        apply_writes(&ctx, &subnet, &plan.writes).await?;
        // The writes changed the pools; the pool watch brings us back on fresh state.
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    for counters in &plan.counters {
        write_pool_counters(&pools_api, counters).await?;
    }
    for pool in &pools {
        ctx.metrics.observe_pool(pool);
    }
    let existing = pools.iter().map(ResourceExt::name_any).collect();
    ctx.metrics.forget_pools_except(Some(&name), &existing);
    let message = format!(
        "{} pools serve {} addresses",
        subnet.spec.replicas, plan.total
    );
    write_status(
        &ctx,
        &subnet,
        Some(&plan),
        ready(&subnet, true, "PoolsReady", &message),
    )
    .await?;
    Ok(Action::requeue(RESYNC))
}

async fn apply_writes(ctx: &Context, subnet: &Subnet, writes: &[PoolWrite]) -> Result<(), Error> {
    let pools_api: Api<IpPool> = Api::all(ctx.client.clone());
    for write in writes {
        match write {
            PoolWrite::Update(change) => {
                let patch = json!({
                    "metadata": { "resourceVersion": change.resource_version },
                    "spec": { "ips": change.ips, "draining": change.draining },
                });
                pools_api
                    .patch(&change.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                info!(pool = %change.name, ips = ?change.ips, draining = change.draining, "pool updated");
            }
            PoolWrite::Create { name, spec } => {
                let pool = IpPool {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        labels: Some([(LABEL_SUBNET.to_string(), subnet.name_any())].into()),
                        owner_references: Some(vec![owner_reference(subnet)?]),
                        ..ObjectMeta::default()
                    },
                    spec: spec.clone(),
                    status: None,
                };
                match pools_api.create(&PostParams::default(), &pool).await {
                    Ok(_) => info!(pool = %name, ips = ?spec.ips, "pool created"),
                    // Another reconcile (or a previous leader) created it: recompute.
                    Err(error) if is_already_exists(&error) => {}
                    Err(error) => return Err(error.into()),
                }
            }
            PoolWrite::Delete {
                name,
                resource_version,
            } => {
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        resource_version: Some(resource_version.clone()),
                        uid: None,
                    }),
                    ..DeleteParams::default()
                };
                pools_api.delete(name, &params).await?;
                info!(pool = %name, "drained pool deleted");
            }
        }
    }
    ctx.publish(
        subnet,
        EventType::Normal,
        "PoolsUpdated",
        &format!("{} IPPool write(s) to match spec", writes.len()),
    )
    .await;
    Ok(())
}

async fn write_pool_counters(api: &Api<IpPool>, counters: &PoolCounters) -> Result<(), Error> {
    let patch = json!({
        "metadata": { "resourceVersion": counters.resource_version },
        "status": {
            "allocatedIPCount": counters.allocated,
            "unallocatedIPCount": counters.unallocated,
            "totalIPCount": counters.total,
        },
    });
    api.patch_status(
        &counters.name,
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

async fn write_status(
    ctx: &Context,
    subnet: &Subnet,
    plan: Option<&SubnetPlan>,
    condition: Condition,
) -> Result<(), Error> {
    let current = subnet.status.clone().unwrap_or_default();
    let wanted = SubnetStatus {
        gateway: plan
            .map(|plan| plan.gateway.to_string())
            .or(current.gateway.clone()),
        total_ip_count: plan.map_or(current.total_ip_count, |plan| plan.total),
        allocated_ip_count: plan.map_or(current.allocated_ip_count, |plan| plan.allocated),
        conditions: vec![condition],
    };
    let condition_shown = current
        .conditions
        .iter()
        .any(|shown| same_condition(shown, &wanted.conditions[0]));
    if condition_shown
        && current.gateway == wanted.gateway
        && current.total_ip_count == wanted.total_ip_count
        && current.allocated_ip_count == wanted.allocated_ip_count
    {
        return Ok(());
    }
    let api: Api<Subnet> = Api::all(ctx.client.clone());
    api.patch_status(
        &subnet.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&json!({ "status": wanted })),
    )
    .await?;
    Ok(())
}

/// Conditions are equal for our purposes when only their transition time differs.
pub(super) fn same_condition(a: &Condition, b: &Condition) -> bool {
    a.type_ == b.type_
        && a.status == b.status
        && a.reason == b.reason
        && a.message == b.message
        && a.observed_generation == b.observed_generation
}

fn ready(subnet: &Subnet, ok: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: "Ready".to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        observed_generation: subnet.metadata.generation,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
    }
}

fn owner_reference(subnet: &Subnet) -> Result<OwnerReference, Error> {
    subnet
        .controller_owner_ref(&())
        .ok_or_else(|| Error::MissingUid(subnet.name_any()))
}

fn is_already_exists(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.is_already_exists())
}

impl Context {
    /// Publishes an Event on `object`; failures are logged, never fatal (events are advisory).
    pub async fn publish<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        type_: EventType,
        reason: &str,
        note: &str,
    ) {
        let event = kube::runtime::events::Event {
            type_,
            reason: reason.to_string(),
            note: Some(note.to_string()),
            action: "Reconcile".to_string(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &object.object_ref(&())).await {
            warn!(%error, reason, "could not publish an event");
        }
    }
}
