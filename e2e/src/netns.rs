//! Running code inside a named network namespace without ever switching an async thread.
//!
//! `setns` changes the namespace of the calling thread only. Every helper here therefore runs its
//! closure on a fresh, short-lived OS thread that joins the namespace and then exits, so no
//! tokio worker (and no `.await`) ever observes a switched namespace. Sockets created inside the
//! closure stay bound to that namespace after the thread is gone.
use std::{fs::File, path::PathBuf, thread};

use nix::sched::{CloneFlags, setns};

/// Where `ip netns add NAME` bind-mounts a named namespace.
pub fn named_netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Failure to enter a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source} (does `ip netns list` show it?)")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path}: {source} (this needs root / CAP_SYS_ADMIN)")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("the thread working inside network namespace {path} panicked")]
    Panicked { path: PathBuf },
}

/// Runs `work` on a dedicated thread that has joined the network namespace at `path`.
pub fn run_in_netns<T, F>(path: PathBuf, work: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let thread_path = path.clone();
    let handle = thread::spawn(move || -> Result<T, NetnsError> {
        let ns = File::open(&thread_path).map_err(|source| NetnsError::Open {
            path: thread_path.clone(),
            source,
        })?;
        setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: thread_path.clone(),
            source,
        })?;
        Ok(work())
    });
    handle.join().map_err(|_| NetnsError::Panicked { path })?
}
