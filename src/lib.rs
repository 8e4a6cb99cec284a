//! VirtNet: underlay IPAM for Kubernetes pods and KubeVirt VMs.
//!
//! - [`crd`]: the `virtnet.io/v1alpha1` custom resources (Subnet, IPPool, Endpoint).
//! - [`ipam`]: the pure IPAM engine (range arithmetic, pool splitting, allocation decisions).
//! - [`agent`]: `virtnet agent` (per-node allocation for virtnet-ipam over a unix socket).
//! - [`controller`]: `virtnet controller` (Subnet → IPPools, status, leader election).
//! - [`inspect`]: `virtnet inspect` (who holds which address, and what looks wrong).
//! - [`store`]: the only code that reads or writes the Kubernetes API for both (caches, guarded
//!   writes, CRD → engine conversion); neither component imports the other.
//! - [`observability`] and [`telemetry`]: health/metrics endpoints and logs.
pub mod agent;
pub mod controller;
pub mod crd;
pub mod inspect;
pub mod ipam;
pub mod observability;
pub mod store;
pub mod telemetry;
