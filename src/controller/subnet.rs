//! The Subnet reconciler: applies [`super::pools::plan_pools`] through the API server.

use std::{net::IpAddr, sync::Arc, time::Duration};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use kube::{
    Resource, ResourceExt,
    runtime::{controller::Action, events::EventType},
};
use tracing::{info, warn};

use super::{
    Context, Error,
    admission::review_against_older,
    pools::{
        DeletionStep, HandoverStep, SubnetPlan, deletion_step, overlap_with_other_pools,
        plan_handover, plan_pools,
    },
};
use crate::crd::{FINALIZER_SUBNET, IpPool, LABEL_SUBNET, Subnet, SubnetStatus};
use crate::store::StoreError;
use crate::store::endpoints::Written;
use crate::store::parse::holder_name;
use crate::store::pools::{ClaimOutcome, PoolSpecWrite};

/// How often a Subnet is reconciled even when nothing changed (a safety net for missed events).
const RESYNC: Duration = Duration::from_secs(300);

/// Reconciles one Subnet: a deleted one waits for its allocations to go ([`finish_deletion`]);
/// otherwise pools first (one safe round per call), then counters and status.
pub async fn reconcile(subnet: Arc<Subnet>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = subnet.name_any();
    // One Subnet at a time decides and writes pool specs, on a fresh (quorum) list of every
    // pool: two Subnets reconciled at once could each find the other's addresses still free.
    let _pool_writes = ctx.pool_writes.lock().await;
    let all_pools = ctx.pools.list(None).await?;
    let pools: Vec<IpPool> = all_pools
        .iter()
        .filter(|pool| pool.labels().get(LABEL_SUBNET) == Some(&name))
        .cloned()
        .collect();
    if subnet.metadata.deletion_timestamp.is_some() {
        return finish_deletion(&ctx, &subnet, &pools).await;
    }
    if !has_finalizer(&subnet) {
        ctx.subnets
            .hold_finalizer(&subnet, FINALIZER_SUBNET, true)
            .await?;
        // The write wakes the watch, which brings us back on the new version.
        return Ok(Action::await_change());
    }
    if let Some(stale) = pools.iter().find(|pool| !owned_by(pool, &subnet)) {
        let message = format!(
            "IPPool {} belongs to an earlier Subnet of this name and is being removed; pools \
             are created once it is gone",
            stale.name_any()
        );
        write_condition(&ctx, &subnet, "PreviousPoolsRemaining", &message).await?;
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    // The webhook fails open (a Subnet write must not depend on this controller running), so a
    // Subnet that conflicts with an older one may be stored: it gets no pools.
    let subnets = ctx.subnets.list().await?;
    if let Err(message) = review_against_older(&subnet, &subnets) {
        warn!(subnet = %name, %message, "Subnet conflicts with an older Subnet: no pools");
        write_condition(&ctx, &subnet, "Overlaps", &message).await?;
        return Ok(Action::requeue(RESYNC));
    }
    let checked = overlap_with_other_pools(&subnet, &all_pools)
        .and_then(|overlap| plan_pools(&subnet, &pools).map(|plan| (overlap, plan)));
    let plan = match checked {
        Ok((None, plan)) => plan,
        Ok((Some(overlap), _)) => {
            let message = format!(
                "no pools are written: Subnet {:?} already holds {} in its IPPools (offered or \
                 allocated); remove those addresses from this Subnet's spec.ips (or add them to \
                 spec.excludeIPs), or release them from Subnet {:?} first",
                overlap.other,
                overlap.shared_ranges(),
                overlap.other,
            );
            warn!(subnet = %name, %message, "Subnet overlaps another Subnet's pools");
            write_condition(&ctx, &subnet, "Overlaps", &message).await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        Err(problem) => {
            let message = problem.to_string();
            warn!(subnet = %name, %message, "Subnet cannot be split into pools");
            write_condition(&ctx, &subnet, "InvalidSpec", &message).await?;
            return Ok(Action::requeue(RESYNC));
        }
    };
    if !plan.writes.is_empty() {
        apply_writes(&ctx, &subnet, &plan.writes).await?;
        // The writes changed the pools; the pool watch brings us back on fresh state.
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    if plan.handover_pending && hand_over(&ctx, &subnet, &pools).await? {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    for counters in &plan.counters {
        ctx.pools.write_counters(counters).await?;
    }
    for pool in &pools {
        ctx.metrics.observe_pool(pool);
    }
    let existing = pools.iter().map(ResourceExt::name_any).collect();
    ctx.metrics.forget_pools_except(Some(&name), &existing);
    let message = if u32::from(subnet.spec.replicas) == plan.pool_count {
        format!("{} pools serve {} addresses", plan.pool_count, plan.total)
    } else {
        format!(
            "{} pools serve {} addresses (more than spec.replicas {}: at most {} addresses \
             per pool keep each IPPool well under etcd's object size limit)",
            plan.pool_count,
            plan.total,
            subnet.spec.replicas,
            crate::ipam::MAX_POOL_ADDRESSES
        )
    };
    write_status(
        &ctx,
        &subnet,
        Some(&plan),
        ready(&subnet, true, "PoolsReady", &message),
    )
    .await?;
    Ok(Action::requeue(RESYNC))
}

/// A deleted Subnet: its pools stop handing out addresses, and the finalizer stays until no
/// address is allocated, so that neither the pools nor (through a Subnet recreated under the
/// same name) the addresses of running pods can be handed out again. Once the finalizer is
/// gone, the API server deletes the Subnet and the garbage collector its pools.
async fn finish_deletion(
    ctx: &Context,
    subnet: &Subnet,
    pools: &[IpPool],
) -> Result<Action, Error> {
    if !has_finalizer(subnet) {
        return Ok(Action::await_change());
    }
    let step = match deletion_step(pools) {
        Ok(step) => step,
        Err(problem) => {
            let message = format!("deletion waits: {problem}");
            write_condition(ctx, subnet, "DeletionBlocked", &message).await?;
            return Ok(Action::requeue(Duration::from_secs(10)));
        }
    };
    match step {
        DeletionStep::Drain(changes) => {
            let writes: Vec<PoolSpecWrite> =
                changes.into_iter().map(PoolSpecWrite::Update).collect();
            apply_writes(ctx, subnet, &writes).await?;
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        DeletionStep::Wait(held) => {
            const SHOWN: usize = 5;
            let listed: Vec<String> = held
                .iter()
                .take(SHOWN)
                .map(|(address, endpoint)| format!("{address} ({endpoint})"))
                .collect();
            let more = held.len().saturating_sub(SHOWN);
            let message = format!(
                "deletion waits for {} allocated address(es) to be released: {}{}; the pools hand \
                 out no new addresses, and the Subnet goes once its pods are gone",
                held.len(),
                listed.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                },
            );
            info!(subnet = %subnet.name_any(), allocated = held.len(), "deleted Subnet waits for its allocations");
            write_condition(ctx, subnet, "DeletionBlocked", &message).await?;
            Ok(Action::requeue(Duration::from_secs(10)))
        }
        DeletionStep::Release => {
            ctx.subnets
                .hold_finalizer(subnet, FINALIZER_SUBNET, false)
                .await?;
            info!(subnet = %subnet.name_any(), "deleted Subnet holds no address; finalizer removed");
            ctx.metrics
                .forget_pools_except(Some(&subnet.name_any()), &Default::default());
            Ok(Action::await_change())
        }
    }
}

fn has_finalizer(subnet: &Subnet) -> bool {
    subnet.finalizers().iter().any(|f| f == FINALIZER_SUBNET)
}

/// Whether `pool` was made for this very Subnet (its controller owner is the Subnet's uid), not
/// for an earlier one of the same name whose pools the garbage collector is still removing.
fn owned_by(pool: &IpPool, subnet: &Subnet) -> bool {
    pool.owner_references()
        .iter()
        .any(|owner| owner.controller == Some(true) && Some(&owner.uid) == subnet.uid().as_ref())
}

/// Shows a not-Ready condition (counters kept as they were) and, when it is news, an Event.
async fn write_condition(
    ctx: &Context,
    subnet: &Subnet,
    reason: &str,
    message: &str,
) -> Result<(), Error> {
    if write_status(ctx, subnet, None, ready(subnet, false, reason, message)).await? {
        ctx.publish(subnet, EventType::Warning, reason, message)
            .await;
    }
    Ok(())
}

/// Takes the next steps of handing draining pools' allocations over to the active pools
/// ([`HandoverStep`]); `true` when it wrote something (the next round continues on fresh state).
async fn hand_over(ctx: &Context, subnet: &Subnet, pools: &[IpPool]) -> Result<bool, Error> {
    let endpoints = ctx.endpoint_store.list().await?;
    let plan = plan_handover(&subnet.name_any(), pools, &endpoints).map_err(StoreError::from)?;
    for (endpoint, error) in &plan.unreadable {
        warn!(%endpoint, %error, "handover cannot read an Endpoint: the addresses it holds stay where they are");
    }
    let steps = &plan.steps;
    for step in steps {
        match step {
            HandoverStep::Copy(claim) => {
                if let ClaimOutcome::Conflict(_) = ctx.pools.claim(claim).await? {
                    // An agent wrote the pool meanwhile: plan again on fresh state.
                    return Ok(true);
                }
                let addresses: Vec<&IpAddr> = claim.records.keys().collect();
                info!(pool = %claim.pool, ?addresses, "handover: addresses recorded in an active pool");
            }
            HandoverStep::Repoint(endpoint) => {
                if ctx.endpoint_store.replace(endpoint).await? == Written::Changed {
                    return Ok(true);
                }
                info!(endpoint = %holder_name(endpoint), "handover: Endpoint names its address's new pool");
            }
            HandoverStep::Drop { pool, holders } => {
                let addresses: Vec<IpAddr> = holders.keys().copied().collect();
                ctx.pools
                    .release(pool, &addresses, |address, record| {
                        holders.get(&address) == Some(&record.endpoint)
                    })
                    .await?;
                info!(%pool, ?addresses, "handover: draining pool let go of addresses now recorded elsewhere");
            }
        }
    }
    if !steps.is_empty() {
        ctx.publish(
            subnet,
            EventType::Normal,
            "AddressesHandedOver",
            &format!(
                "{} handover step(s): held addresses move to the pools that remain",
                steps.len()
            ),
        )
        .await;
    }
    Ok(!steps.is_empty())
}

async fn apply_writes(
    ctx: &Context,
    subnet: &Subnet,
    writes: &[PoolSpecWrite],
) -> Result<(), Error> {
    let owner = owner_reference(subnet)?;
    for write in writes {
        ctx.pools
            .write_spec(write, &subnet.name_any(), &owner)
            .await?;
        match write {
            PoolSpecWrite::Update(change) => {
                info!(pool = %change.name, ips = ?change.ips, draining = change.draining, "pool updated");
            }
            PoolSpecWrite::Create { name, spec } => {
                info!(pool = %name, ips = ?spec.ips, "pool created");
            }
            PoolSpecWrite::Delete { name, .. } => info!(pool = %name, "drained pool deleted"),
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

async fn write_status(
    ctx: &Context,
    subnet: &Subnet,
    plan: Option<&SubnetPlan>,
    condition: Condition,
) -> Result<bool, Error> {
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
        return Ok(false);
    }
    ctx.subnets
        .write_status(&subnet.name_any(), &wanted)
        .await?;
    Ok(!condition_shown)
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
