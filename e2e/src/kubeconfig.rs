//! Kubeconfig files for the admin, the control-plane components and every node.
use std::{fs, path::Path};

use crate::pki::CertAndKey;

/// A kubeconfig could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write kubeconfig {path}: {source}")]
pub struct KubeconfigError {
    pub path: std::path::PathBuf,
    pub source: std::io::Error,
}

/// Writes a single-context kubeconfig that authenticates with a client certificate.
///
/// It is JSON, which is valid YAML for every kubeconfig reader. Credentials are referenced by
/// absolute path, so the file keeps working wherever it is copied on this machine.
pub fn write(
    path: &Path,
    server: &str,
    ca_cert: &Path,
    user: &str,
    client: &CertAndKey,
) -> Result<(), KubeconfigError> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "virtnet-e2e",
            "cluster": { "server": server, "certificate-authority": ca_cert },
        }],
        "users": [{
            "name": user,
            "user": { "client-certificate": client.cert, "client-key": client.key },
        }],
        "contexts": [{
            "name": "virtnet-e2e",
            "context": { "cluster": "virtnet-e2e", "user": user },
        }],
        "current-context": "virtnet-e2e",
    });
    fs::write(path, format!("{config:#}\n")).map_err(|source| KubeconfigError {
        path: path.to_owned(),
        source,
    })
}
