//! CNI plumbing shared by the VirtNet plugins (no Kubernetes dependency).
