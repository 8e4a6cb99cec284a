//! CNI plumbing shared by VirtNet's plugins. No Kubernetes dependency, so the plugin binaries
//! stay small and start fast.
//!
//! - [`agent_api`]: the HTTP+JSON API between the plugins and the node agent.
//! - `agent_client` (feature `agent-client`): one request to the agent over its unix socket.
//! - [`skel`]: the entry point. [`skel::run`] reads the environment and stdin, validates them,
//!   dispatches to a [`skel::Plugin`] and prints the result or error JSON.
//! - [`env`]: `CNI_*` variables and `CNI_ARGS` → [`env::Inputs`], validated per command.
//! - [`config`]: the network config on stdin → [`config::NetworkConfig`].
//! - [`fields`]: [`fields::FieldReader`], which reads a plugin's own keys with messages that
//!   name the field, what it must be, and what it got.
//! - [`result`]: [`result::CniResult`], parsed from and written as spec 0.3.1, 0.4.0, 1.0.0 and
//!   1.1.0 (this is how a chained plugin converts `prevResult`).
//! - [`version`]: [`version::CniVersion`] and the VERSION reply.
//! - [`error`]: [`error::CniError`] and the spec's [`error::ErrorCode`]s plus VirtNet's own.
//! - [`logging`]: `log_level` / `log_file` settings; logs go to stderr or a file, never stdout.
//! - [`trusted`]: the directories a config may name for the agent socket and log files.
//! - `testing` (feature `testing`): run a plugin binary like a runtime does, for integration tests.

pub mod agent_api;
#[cfg(feature = "agent-client")]
pub mod agent_client;
pub mod config;
pub mod env;
pub mod error;
pub mod fields;
pub mod logging;
pub mod result;
pub mod skel;
#[cfg(feature = "testing")]
pub mod testing;
pub mod trusted;
pub mod version;

pub use config::NetworkConfig;
pub use error::{CniError, ErrorCode};
pub use result::CniResult;
pub use version::CniVersion;
