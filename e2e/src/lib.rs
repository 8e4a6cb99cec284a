//! VirtNet's local cluster harness: a real control plane, network-namespace nodes on a bridge
//! "switch", and a kubelet stand-in that wires pods with real CNI plugins.
pub mod netns;
