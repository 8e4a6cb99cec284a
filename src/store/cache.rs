//! The watch caches: one reflector setup, used by the agent and the controller.

use std::fmt::Debug;
use std::hash::Hash;

use futures::{Stream, StreamExt};
use kube::runtime::reflector::{Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tracing::warn;

use crate::observability::Health;

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

/// A cache nobody reacts to: the store of [`reflect`], its events polled in the background,
/// each reported to `health` as watch `what` (a watch failing for long makes `/readyz` fail).
pub fn spawn<K>(
    api: Api<K>,
    config: watcher::Config,
    health: &Health,
    what: &'static str,
) -> Store<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Clone + Default + Eq + Hash + Send + Sync,
{
    let (store, events) = reflect(api, config, Writer::default());
    let health = health.clone();
    tokio::spawn(events.for_each(move |event| {
        health.watch_event(what, event.is_ok());
        if let Err(error) = event {
            warn!(%error, watch = what, "watch failed; retrying with backoff");
        }
        std::future::ready(())
    }));
    store
}
