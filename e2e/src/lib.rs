//! The local cluster harness.
