//! Health, readiness and Prometheus metrics, served over HTTP by the controller and the agent.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use kube::ResourceExt;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::crd::IpPool;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    controller: String,
    error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReclaimLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchLabels {
    watch: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
    subnet: String,
}

/// The process's metrics, rendered in the Prometheus text format at `/metrics`.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ReconcileLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    durations: Family<ReconcileLabels, Histogram>,
    pool_total: Family<PoolLabels, Gauge>,
    pool_allocated: Family<PoolLabels, Gauge>,
    /// The label sets of the pool gauges, so those of deleted pools can be removed (a Family
    /// cannot be iterated).
    pools_shown: Mutex<BTreeSet<PoolLabels>>,
    reclaims: Family<ReclaimLabels, Counter>,
    allocation_durations: Family<OutcomeLabels, Histogram>,
    gc_decisions: Family<OutcomeLabels, Counter>,
    claim_conflicts: Counter,
    claim_retries: Counter,
    pool_exhaustions: Counter,
    commit_batch_sizes: Histogram,
    watch_expiries: Family<WatchLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("virtnet");
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let durations = Family::<ReconcileLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0])
        });
        let pool_total = Family::<PoolLabels, Gauge>::default();
        let pool_allocated = Family::<PoolLabels, Gauge>::default();
        let reclaims = Family::<ReclaimLabels, Counter>::default();
        let allocation_durations = Family::<OutcomeLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ])
        });
        let gc_decisions = Family::<OutcomeLabels, Counter>::default();
        let claim_conflicts = Counter::default();
        let claim_retries = Counter::default();
        let pool_exhaustions = Counter::default();
        let commit_batch_sizes = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]);
        let watch_expiries = Family::<WatchLabels, Counter>::default();
        registry.register(
            "watch_expiries",
            "Watches whose resourceVersion had expired (410 Gone, e.g. after an API server \
             restart or an etcd compaction), so that their cache listed everything again",
            watch_expiries.clone(),
        );
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that failed",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            durations.clone(),
        );
        registry.register(
            "ippool_total_ips",
            "Addresses in an IPPool",
            pool_total.clone(),
        );
        registry.register(
            "ippool_allocated_ips",
            "Allocated addresses in an IPPool",
            pool_allocated.clone(),
        );
        registry.register(
            "ip_reclaims",
            "Addresses returned to their pool by the controller, by reason",
            reclaims.clone(),
        );
        registry.register(
            "ipam_allocation_duration_seconds",
            "Agent: time from an ADD's arrival to its answer, by outcome (ok or the error kind)",
            allocation_durations.clone(),
        );
        registry.register(
            "ipam_gc_interfaces",
            "Agent: interfaces a CNI GC found unlisted, by outcome (released, or kept because \
             the API still shows the pod running on this node)",
            gc_decisions.clone(),
        );
        registry.register(
            "ipam_claim_conflicts",
            "Agent: IPPool writes refused because the pool changed since it was read",
            claim_conflicts.clone(),
        );
        registry.register(
            "ipam_claim_retries",
            "Agent: ADDs decided again after a conflicting write",
            claim_retries.clone(),
        );
        registry.register(
            "ipam_pool_exhaustions",
            "Agent: ADDs refused because every pool they could use was full",
            pool_exhaustions.clone(),
        );
        registry.register(
            "ipam_commit_batch_size",
            "Agent: ADDs decided and written together by one group commit",
            commit_batch_sizes.clone(),
        );
        Self {
            registry,
            allocation_durations,
            gc_decisions,
            claim_conflicts,
            claim_retries,
            pool_exhaustions,
            commit_batch_sizes,
            watch_expiries,
            reconciles,
            failures,
            durations,
            pool_total,
            pool_allocated,
            pools_shown: Mutex::default(),
            reclaims,
        }
    }
}

/// Measures one reconcile; [`ReconcileTimer::finish`] records its outcome.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    labels: ReconcileLabels,
    started: Instant,
}

impl ReconcileTimer<'_> {
    /// Records the duration and, when `failure` names an error label, a failure.
    pub fn finish(self, failure: Option<&str>) {
        self.metrics
            .durations
            .get_or_create(&self.labels)
            .observe(self.started.elapsed().as_secs_f64());
        if let Some(error) = failure {
            self.metrics
                .failures
                .get_or_create(&FailureLabels {
                    controller: self.labels.controller.clone(),
                    error: error.to_string(),
                })
                .inc();
        }
    }
}

impl Metrics {
    /// Counts a reconcile of `controller` and starts timing it.
    pub fn reconcile_started(&self, controller: &str) -> ReconcileTimer<'_> {
        let labels = ReconcileLabels {
            controller: controller.to_string(),
        };
        self.reconciles.get_or_create(&labels).inc();
        ReconcileTimer {
            metrics: self,
            labels,
            started: Instant::now(),
        }
    }

    /// Updates the per-pool gauges from a pool's status counters.
    pub fn observe_pool(&self, pool: &IpPool) {
        let labels = PoolLabels {
            pool: pool.name_any(),
            subnet: pool.spec.subnet.clone(),
        };
        let (total, allocated) = pool.status.as_ref().map_or((0, 0), |status| {
            (status.total_ip_count, status.allocated_ip_count)
        });
        self.pool_total.get_or_create(&labels).set(total);
        self.pool_allocated.get_or_create(&labels).set(allocated);
        self.pools_shown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(labels);
    }

    /// Removes the gauges of pools that no longer exist: of `subnet`'s pools (or of every
    /// Subnet's, when `None`) only those named in `existing` stay.
    pub fn forget_pools_except(&self, subnet: Option<&str>, existing: &BTreeSet<String>) {
        let mut shown = self
            .pools_shown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        shown.retain(|labels| {
            let keep = subnet.is_some_and(|subnet| labels.subnet != subnet)
                || existing.contains(&labels.pool);
            if !keep {
                self.pool_total.remove(labels);
                self.pool_allocated.remove(labels);
            }
            keep
        });
    }

    /// Counts one address returned to its pool for `reason`.
    pub fn address_reclaimed(&self, reason: &str) {
        self.reclaims
            .get_or_create(&ReclaimLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Records one ADD's duration; `outcome` is `ok` or the error kind.
    pub fn allocation_finished(&self, seconds: f64, outcome: &str) {
        self.allocation_durations
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .observe(seconds);
    }

    /// Counts one interface a CNI GC released (`released`) or refused to release (`kept`).
    pub fn gc_decided(&self, outcome: &str) {
        self.gc_decisions
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Counts a watch of `watch` (e.g. `IPPools`) that expired and lists again.
    pub fn watch_expired(&self, watch: &str) {
        self.watch_expiries
            .get_or_create(&WatchLabels {
                watch: watch.to_owned(),
            })
            .inc();
    }

    /// Counts a pool write refused for a stale resourceVersion.
    pub fn claim_conflicted(&self) {
        self.claim_conflicts.inc();
    }

    /// Counts an ADD decided again after a conflict.
    pub fn claim_retried(&self) {
        self.claim_retries.inc();
    }

    /// Counts an ADD refused for exhaustion.
    pub fn pool_exhausted(&self) {
        self.pool_exhaustions.inc();
    }

    /// Records how many ADDs one group commit carried.
    pub fn batch_committed(&self, size: usize) {
        self.commit_batch_sizes.observe(size as f64);
    }

    fn render(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// How long a watch may keep failing before `/readyz` says not ready: a watch that reconnects
/// after an API server restart is normal, one that cannot for this long leaves decisions on a
/// view that no longer moves.
pub const WATCH_FAILURE_GRACE: Duration = Duration::from_secs(30);

/// Readiness shared between the work loops and `/readyz`: the process's own flag, and since when
/// each failing watch has been failing.
#[derive(Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
    failing_watches: Arc<Mutex<BTreeMap<&'static str, Instant>>>,
}

impl Health {
    /// Marks the process ready (or not) for `/readyz`.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Records how the last event of watch `what` went: a failure starts (or continues) its
    /// failing streak, anything else ends it.
    pub fn watch_event(&self, what: &'static str, ok: bool) {
        let mut failing = self
            .failing_watches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if ok {
            failing.remove(what);
        } else {
            failing.entry(what).or_insert_with(Instant::now);
        }
    }

    /// What `/readyz` answers now: `Err` says why not ready.
    fn readiness(&self, now: Instant) -> Result<(), String> {
        if !self.ready.load(Ordering::Relaxed) {
            return Err("not ready".to_owned());
        }
        let failing = self
            .failing_watches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let stuck = stuck_watches(&failing, now, WATCH_FAILURE_GRACE);
        if stuck.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the watch of {} has failed for more than {} s: check the API server and RBAC",
                stuck.join(", "),
                WATCH_FAILURE_GRACE.as_secs()
            ))
        }
    }
}

/// The watches of `failing` that have been failing for longer than `grace` at `now`.
fn stuck_watches(
    failing: &BTreeMap<&'static str, Instant>,
    now: Instant,
    grace: Duration,
) -> Vec<&'static str> {
    failing
        .iter()
        .filter(|(_, since)| now.saturating_duration_since(**since) > grace)
        .map(|(what, _)| *what)
        .collect()
}

#[derive(Clone)]
struct ServerState {
    metrics: Arc<Metrics>,
    health: Health,
}

/// Binds `address` and returns the server future serving `/healthz`, `/readyz` and `/metrics`.
pub async fn serve(
    address: SocketAddr,
    metrics: Arc<Metrics>,
    health: Health,
) -> std::io::Result<impl Future<Output = std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(ServerState { metrics, health });
    Ok(async move { axum::serve(listener, router).await })
}

async fn readyz(State(state): State<ServerState>) -> (StatusCode, String) {
    match state.health.readiness(Instant::now()) {
        Ok(()) => (StatusCode::OK, "ok".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

async fn metrics_text(State(state): State<ServerState>) -> (StatusCode, String) {
    match state.metrics.render() {
        Ok(text) => (StatusCode::OK, text),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_watch_failing_past_its_grace_makes_the_process_unready() {
        let health = Health::default();
        let now = Instant::now();
        assert!(health.readiness(now).is_err(), "not ready before set_ready");
        health.set_ready(true);
        health.watch_event("IPPools", false);
        assert_eq!(
            health.readiness(now),
            Ok(()),
            "a fresh failure is within its grace"
        );
        let later = now + WATCH_FAILURE_GRACE + Duration::from_secs(1);
        let why = health.readiness(later).expect_err("failing too long");
        assert!(why.contains("IPPools"), "{why}");
        health.watch_event("IPPools", false);
        assert!(
            health.readiness(later).is_err(),
            "a repeated failure keeps its start"
        );
        health.watch_event("IPPools", true);
        assert_eq!(health.readiness(later), Ok(()));
    }

    fn pool(name: &str, subnet: &str) -> IpPool {
        serde_json::from_value(json!({
            "apiVersion": "virtnet.io/v1alpha1", "kind": "IPPool",
            "metadata": {"name": name},
            "spec": {"subnet": subnet, "cidr": "10.6.0.0/16", "ips": ["10.6.153.100"]},
            "status": {"totalIPCount": 1, "allocatedIPCount": 0},
        }))
        .expect("pool deserializes")
    }

    #[test]
    fn gauges_of_deleted_pools_leave_the_metrics() {
        let metrics = Metrics::default();
        for (name, subnet) in [("a-0", "a"), ("a-1", "a"), ("b-0", "b")] {
            metrics.observe_pool(&pool(name, subnet));
        }
        let kept: BTreeSet<String> = ["a-0".to_owned()].into();
        metrics.forget_pools_except(Some("a"), &kept);
        let text = metrics.render().expect("renders");
        assert!(
            text.contains("pool=\"a-0\"") && text.contains("pool=\"b-0\""),
            "{text}"
        );
        assert!(!text.contains("pool=\"a-1\""), "{text}");
        metrics.forget_pools_except(None, &BTreeSet::new());
        let text = metrics.render().expect("renders");
        assert!(!text.contains("pool=\""), "{text}");
    }
}
