//! The store layer: the only code of `virtnet agent` and `virtnet controller` that reads or
//! writes the Kubernetes API for VirtNet's own objects (Subnets, IPPools, Endpoints) and the
//! caches they decide on.
//!
//! - [`cache`]: the watch caches (one reflector setup for both components).
//! - [`pools`]: claim addresses (a group commit's one write per pool), release them, and the
//!   controller's pool spec and counter writes.
//! - [`endpoints`]: record an Endpoint, let it go (removing only VirtNet's finalizer).
//! - [`subnets`]: the Subnet status the controller reports.
//! - [`claims`]: the NAD and IPAMClaim of a persistent address, and the claim's status.
//! - [`workloads`]: fresh reads of pods and nodes, confirming cache evidence before a release.
//! - [`parse`]: CRD → engine conversion: after it, addresses are typed, and a malformed one is
//!   an error naming its object.
//!
//! Every write that depends on what was read carries the resourceVersion it was decided on, and
//! an object without one is an error ([`StoreError::MissingResourceVersion`]), never a write
//! without its guard. Conflicts are retried under one policy ([`Retry`]). docs/store.md lists
//! every write, where it is made and with which guard.

pub mod cache;
pub mod claims;
pub mod endpoints;
pub mod parse;
pub mod pools;
pub mod snapshot;
pub mod subnets;
pub mod workloads;

use std::time::{Duration, SystemTime};

use kube::{Resource, ResourceExt};

/// What a store operation could not do; each message says what to check.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{action} failed: {source}; check VirtNet's RBAC and that the API server answers")]
    Api {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "{kind} {name} has no resourceVersion, so a write decided on it would have no guard: \
         VirtNet only writes objects it read from the API server (report this as a bug)"
    )]
    MissingResourceVersion { kind: String, name: String },
    #[error(
        "{kind} {name} kept changing while {action} ({MAX_ATTEMPTS} attempts); it is retried \
         later (if this persists, look for another writer hammering it)"
    )]
    Contended {
        kind: &'static str,
        name: String,
        action: String,
    },
    #[error(transparent)]
    Parse(#[from] parse::ParseError),
}

impl StoreError {
    pub(crate) fn api(action: impl Into<String>, source: kube::Error) -> Self {
        Self::Api {
            action: action.into(),
            source,
        }
    }

    /// A short, bounded label for failure metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Api { source, .. } if is_conflict(source) => "conflict",
            Self::Api { .. } => "kube",
            Self::MissingResourceVersion { .. } => "missing_resource_version",
            Self::Contended { .. } => "contended",
            Self::Parse(_) => "parse",
        }
    }

    /// Whether retrying later may succeed (a busy object), as opposed to a broken request.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Contended { .. })
    }
}

/// Conflicting writes are retried this many times before the caller is told to try again.
pub const MAX_ATTEMPTS: u32 = 8;

/// A stale resourceVersion, or a create racing another writer of the same object.
pub fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.is_conflict() || status.is_already_exists())
}

/// The object is gone (deleted meanwhile, or never existed), or its API is not installed (a
/// bare 404 without a Status body).
pub fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.is_not_found() || status.code == 404)
}

/// 10 ms doubling to 640 ms, with up to 50 % jitter so racing writers spread out.
pub fn backoff(attempt: u32) -> Duration {
    let base = 10u64 << attempt.min(6);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |elapsed| u64::from(elapsed.subsec_nanos()));
    Duration::from_millis(base + nanos % (base / 2 + 1))
}

/// The one conflict policy: after a conflict, wait [`backoff`] and read again, at most
/// [`MAX_ATTEMPTS`] times.
#[derive(Debug, Default)]
pub struct Retry {
    attempt: u32,
}

impl Retry {
    /// Waits before the next attempt; `false` when the attempts are used up.
    pub async fn after_conflict(&mut self) -> bool {
        self.attempt += 1;
        if self.attempt >= MAX_ATTEMPTS {
            return false;
        }
        tokio::time::sleep(backoff(self.attempt)).await;
        true
    }

    /// Attempts made so far (1 for the first).
    pub fn attempts(&self) -> u32 {
        self.attempt + 1
    }
}

/// The resourceVersion guarding a write decided on `object`: an error when it has none.
pub fn guard<K: Resource>(object: &K) -> Result<String, StoreError>
where
    K::DynamicType: Default,
{
    match object.resource_version() {
        Some(version) if !version.is_empty() => Ok(version),
        _ => Err(StoreError::MissingResourceVersion {
            kind: K::kind(&K::DynamicType::default()).into_owned(),
            name: object.name_any(),
        }),
    }
}

/// `version` as the guard of a write to `kind` `name`: an error when it is empty.
pub fn guard_version(kind: &'static str, name: &str, version: &str) -> Result<String, StoreError> {
    if version.is_empty() {
        return Err(StoreError::MissingResourceVersion {
            kind: kind.to_owned(),
            name: name.to_owned(),
        });
    }
    Ok(version.to_owned())
}

#[cfg(test)]
mod tests;
