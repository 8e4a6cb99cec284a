//! VirtNet: underlay IPAM for Kubernetes pods and KubeVirt VMs.
//!
//! - [`crd`]: the `virtnet.io/v1alpha1` custom resources (Subnet, IPPool, Endpoint).
//! - [`ipam`]: the pure IPAM engine (range arithmetic, pool splitting, allocation decisions).
pub mod crd;
pub mod ipam;
