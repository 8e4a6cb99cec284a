//! IPPool reads and writes: the agent's claims and releases in `status.allocations`, the
//! controller's spec writes and counters. Every write decided on a read carries that read's
//! resourceVersion.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client};
use serde_json::{Value, json};

use super::{Retry, StoreError, guard, guard_version, is_conflict, is_not_found};
use crate::crd::{IpAllocation, IpPool, IpPoolSpec, LABEL_SUBNET};

/// One guarded write of a group commit: every address a batch claims (or re-asserts) in
/// `pool`, recorded by one merge patch carrying the resourceVersion the batch was decided on —
/// all of them are written, or none.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolClaim {
    pub pool: String,
    pub resource_version: String,
    pub records: BTreeMap<IpAddr, IpAllocation>,
}

impl PoolClaim {
    /// The merge patch (on the status subresource) recording every claim, accepted only if the
    /// pool is still at the resourceVersion it was decided on.
    pub fn patch(&self) -> Result<Value, StoreError> {
        let version = guard_version("IPPool", &self.pool, &self.resource_version)?;
        let allocations: serde_json::Map<String, Value> = self
            .records
            .iter()
            .map(|(address, record)| (address.to_string(), json!(record)))
            .collect();
        Ok(json!({
            "metadata": {"resourceVersion": version},
            "status": {"allocations": allocations},
        }))
    }
}

/// How a claim went.
#[derive(Debug)]
pub enum ClaimOutcome {
    /// Written: the pool as the API server stored it.
    Written(IpPool),
    /// The pool had moved on; this is a fresh read of it to decide again on.
    Conflict(IpPool),
}

/// New `ips` / `draining` for an existing pool, conditional on the version the plan saw.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolSpecChange {
    pub name: String,
    pub resource_version: String,
    pub ips: Vec<String>,
    pub draining: bool,
}

/// One controller write of pool specs (see `controller::pools` for the order they come in).
#[derive(Clone, Debug, PartialEq)]
pub enum PoolSpecWrite {
    /// New `ips` / `draining` for an existing pool.
    Update(PoolSpecChange),
    /// Create a pool that does not exist yet.
    Create { name: String, spec: IpPoolSpec },
    /// Delete a drained, empty pool; conditional so a racing allocation aborts it.
    Delete {
        name: String,
        resource_version: String,
    },
}

/// The status counters a pool should show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolCounters {
    pub name: String,
    pub resource_version: String,
    pub allocated: i64,
    pub unallocated: i64,
    pub total: i64,
}

/// The merge patch removing those of `addresses` whose record in `pool` satisfies `held`
/// (`None`: nothing to remove), guarded by the pool's resourceVersion; the counters follow.
/// One patch for many addresses is what lets a burst of DELs cost one write per pool.
pub fn release_patch(
    pool: &IpPool,
    addresses: &[IpAddr],
    held: impl Fn(IpAddr, &IpAllocation) -> bool,
) -> Result<Option<Value>, StoreError> {
    let Some(status) = pool.status.as_ref() else {
        return Ok(None);
    };
    let removed: serde_json::Map<String, Value> = addresses
        .iter()
        .map(|address| (*address, address.to_string()))
        .filter(|(address, key)| {
            status
                .allocations
                .get(key)
                .is_some_and(|record| held(*address, record))
        })
        .map(|(_, key)| (key, Value::Null))
        .collect();
    if removed.is_empty() {
        return Ok(None);
    }
    let allocated = i64::try_from(status.allocations.len() - removed.len()).unwrap_or(i64::MAX);
    Ok(Some(json!({
        "metadata": {"resourceVersion": guard(pool)?},
        "status": {
            "allocations": removed,
            "allocatedIPCount": allocated,
            "unallocatedIPCount": (status.total_ip_count - allocated).max(0),
        },
    })))
}

/// IPPools in the API server.
#[derive(Clone)]
pub struct PoolStore {
    api: Api<IpPool>,
}

impl PoolStore {
    pub fn new(client: Client) -> Self {
        Self {
            api: Api::all(client),
        }
    }

    /// A fresh (quorum) read of one pool.
    pub async fn get(&self, name: &str) -> Result<Option<IpPool>, StoreError> {
        self.api
            .get_opt(name)
            .await
            .map_err(|error| StoreError::api(format!("reading IPPool {name}"), error))
    }

    /// A fresh list of every pool, or of one Subnet's.
    pub async fn list(&self, subnet: Option<&str>) -> Result<Vec<IpPool>, StoreError> {
        let params = match subnet {
            Some(subnet) => ListParams::default().labels(&format!("{LABEL_SUBNET}={subnet}")),
            None => ListParams::default(),
        };
        Ok(self
            .api
            .list(&params)
            .await
            .map_err(|error| StoreError::api("listing IPPools", error))?
            .items)
    }

    /// Makes one claim; a conflict is answered with a fresh read of the pool.
    pub async fn claim(&self, claim: &PoolClaim) -> Result<ClaimOutcome, StoreError> {
        let patch = claim.patch()?;
        match self
            .api
            .patch_status(&claim.pool, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(written) => Ok(ClaimOutcome::Written(written)),
            Err(error) if is_conflict(&error) => {
                let current = self.api.get(&claim.pool).await.map_err(|error| {
                    StoreError::api(format!("re-reading IPPool {}", claim.pool), error)
                })?;
                Ok(ClaimOutcome::Conflict(current))
            }
            Err(error) => Err(StoreError::api(
                format!("claiming addresses in IPPool {}", claim.pool),
                error,
            )),
        }
    }

    /// Removes those of `addresses` whose record satisfies `held` from `pool` with one write,
    /// reading the pool afresh before each attempt (conflicts retried under [`Retry`]).
    /// `Some(pool)`: released (the pool as written); `None`: nothing to release (no such pool,
    /// or every record is someone else's). Giving up is an error: reporting success would leak.
    pub async fn release(
        &self,
        pool: &str,
        addresses: &[IpAddr],
        held: impl Fn(IpAddr, &IpAllocation) -> bool,
    ) -> Result<Option<IpPool>, StoreError> {
        let mut retry = Retry::default();
        let what = || {
            let listed: Vec<String> = addresses.iter().map(IpAddr::to_string).collect();
            format!("releasing {}", listed.join(", "))
        };
        loop {
            let Some(current) = self.get(pool).await? else {
                return Ok(None);
            };
            let Some(patch) = release_patch(&current, addresses, &held)? else {
                return Ok(None);
            };
            match self
                .api
                .patch_status(pool, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(written) => return Ok(Some(written)),
                Err(error) if is_conflict(&error) => {
                    if !retry.after_conflict().await {
                        return Err(StoreError::Contended {
                            kind: "IPPool",
                            name: pool.to_owned(),
                            action: what(),
                        });
                    }
                }
                Err(error) if is_not_found(&error) => return Ok(None),
                Err(error) => {
                    return Err(StoreError::api(
                        format!("{} in IPPool {pool}", what()),
                        error,
                    ));
                }
            }
        }
    }

    /// Applies one controller spec write. A create of a pool that exists already is done.
    pub async fn write_spec(
        &self,
        write: &PoolSpecWrite,
        subnet: &str,
        owner: &OwnerReference,
    ) -> Result<(), StoreError> {
        match write {
            PoolSpecWrite::Update(change) => {
                let version = guard_version("IPPool", &change.name, &change.resource_version)?;
                let patch = json!({
                    "metadata": {"resourceVersion": version},
                    "spec": {"ips": change.ips, "draining": change.draining},
                });
                self.api
                    .patch(&change.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(|error| {
                        StoreError::api(format!("updating IPPool {}", change.name), error)
                    })?;
            }
            PoolSpecWrite::Create { name, spec } => {
                let pool = IpPool {
                    metadata: kube::api::ObjectMeta {
                        name: Some(name.clone()),
                        labels: Some([(LABEL_SUBNET.to_owned(), subnet.to_owned())].into()),
                        owner_references: Some(vec![owner.clone()]),
                        ..Default::default()
                    },
                    spec: spec.clone(),
                    status: None,
                };
                match self.api.create(&PostParams::default(), &pool).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(status)) if status.is_already_exists() => {}
                    Err(error) => {
                        return Err(StoreError::api(format!("creating IPPool {name}"), error));
                    }
                }
            }
            PoolSpecWrite::Delete {
                name,
                resource_version,
            } => {
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        resource_version: Some(guard_version("IPPool", name, resource_version)?),
                        uid: None,
                    }),
                    ..DeleteParams::default()
                };
                self.api
                    .delete(name, &params)
                    .await
                    .map_err(|error| StoreError::api(format!("deleting IPPool {name}"), error))?;
            }
        }
        Ok(())
    }

    /// Writes a pool's status counters, guarded by the version they were counted on.
    pub async fn write_counters(&self, counters: &PoolCounters) -> Result<(), StoreError> {
        let version = guard_version("IPPool", &counters.name, &counters.resource_version)?;
        let patch = json!({
            "metadata": {"resourceVersion": version},
            "status": {
                "allocatedIPCount": counters.allocated,
                "unallocatedIPCount": counters.unallocated,
                "totalIPCount": counters.total,
            },
        });
        self.api
            .patch_status(
                &counters.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|error| {
                StoreError::api(
                    format!("writing the counters of IPPool {}", counters.name),
                    error,
                )
            })?;
        Ok(())
    }
}
