//! VirtNet's local cluster harness: a real control plane, network-namespace nodes on a bridge
//! "switch", and a kubelet stand-in that wires pods with real CNI plugins.
pub mod bench;
pub mod cluster;
pub mod command;
pub mod delay;
pub mod forward;
pub mod kubeconfig;
pub mod kubelet;
pub mod naming;
pub mod netns;
pub mod pki;
pub mod process;
pub mod topology;
