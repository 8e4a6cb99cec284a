//! The watch caches: one reflector setup, used by the agent and the controller.

use std::fmt::Debug;
use std::hash::Hash;

use std::sync::Arc;

use futures::{Stream, StreamExt};
use kube::runtime::reflector::{Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::observability::{Health, Metrics};

/// The events of one watch, already applied to its store.
pub type Events<K> =
    std::pin::Pin<Box<dyn Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send>>;

/// Watches `api` into `writer`'s store (re-listing with backoff after a failure) and returns
/// the store and the events, each applied to the store before it is yielded. The store fills
/// only while the events are polled.
pub fn reflect<K>(api: Api<K>, config: watcher::Config, writer: Writer<K>) -> (Store<K>, Events<K>)
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + Hash + Send + Sync,
{
    let store = writer.as_reader();
    let events = watcher(api, config).default_backoff().reflect(writer);
    (store, Box::pin(events))
}

/// Whether the watch failed because its resourceVersion is gone from the API server's history
/// (410 Gone): the watcher then lists everything again, and the store keeps its last view
/// until that list is complete.
pub fn expired(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::WatchError(status) => status.code == 410,
        watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}

/// What the caches of one process share: its client, and where each watch reports (a watch
/// failing for long makes `/readyz` fail; an expiry is counted in the metrics).
pub struct Watches<'a> {
    pub client: &'a Client,
    pub health: &'a Health,
    pub metrics: &'a Arc<Metrics>,
}

impl Watches<'_> {
    /// A cache nobody reacts to of every `K` that `config` selects: the store of [`reflect`],
    /// its events polled in the background, each reported as watch `what`.
    pub fn all<K>(&self, config: watcher::Config, what: &'static str) -> Store<K>
    where
        K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
        K::DynamicType: Clone + Default + Eq + Hash + Send + Sync,
    {
        let api = Api::all(self.client.clone());
        let (store, events) = reflect(api, config, Writer::default());
        let (health, metrics) = (self.health.clone(), Arc::clone(self.metrics));
        tokio::spawn(events.for_each(move |event| {
            health.watch_event(what, event.is_ok());
            match event {
                Err(error) if expired(&error) => {
                    metrics.watch_expired(what);
                    info!(%error, watch = what, "watch expired: listing again");
                }
                Err(error) => warn!(%error, watch = what, "watch failed; retrying with backoff"),
                Ok(_) => {}
            }
            std::future::ready(())
        }));
        store
    }
}

#[cfg(test)]
mod tests {
    use kube::core::Status;
    use kube::runtime::watcher;

    use super::expired;

    #[test]
    fn only_a_410_gone_counts_as_an_expired_watch() {
        let status = |code| Status::failure("too old resource version", "Expired").with_code(code);
        assert!(expired(&watcher::Error::WatchError(status(410).boxed())));
        assert!(expired(&watcher::Error::WatchStartFailed(
            kube::Error::Api(status(410).boxed())
        )));
        assert!(!expired(&watcher::Error::WatchError(status(500).boxed())));
        assert!(!expired(&watcher::Error::WatchFailed(kube::Error::Api(
            status(403).boxed()
        ))));
        assert!(!expired(&watcher::Error::NoResourceVersion));
    }
}
