//! Custom resources of group `virtnet.io`, version `v1alpha1` (`kubectl get virtnet` lists all):
//!
//! - [`Subnet`] (cluster scoped, short name `sb`): a network and the addresses VirtNet hands out.
//! - [`IpPool`] (kind `IPPool`, cluster scoped, `ipp`): a controller-made shard of a Subnet,
//!   holding the allocation records.
//! - [`Endpoint`] (namespaced, `vep`): the addresses one workload instance holds.
//! - [`Network`] (namespaced, `vnet`): a secondary network, rendered into a
//!   [`NetworkAttachmentDefinition`] (that kind is Multus's, `k8s.cni.cncf.io/v1`).
//!
//! Read and written but defined elsewhere: [`IpamClaim`] (`k8s.cni.cncf.io/v1alpha1`), a VM
//! interface's persistent address.
//!
//! The types carry their validation as CEL rules, so the CRDs generated from them (`virtnet
//! crdgen`, committed under `chart/crds/`) make the apiserver reject bad objects.
//!
//! Also here: the label and finalizer names that the controller and agent share.

mod endpoint;
mod ipamclaim;
mod ippool;
mod nad;
mod network;
mod rules;
mod subnet;

use kube::CustomResourceExt;

pub use endpoint::{Endpoint, EndpointInterface, EndpointSpec, EndpointStatus};
pub use ipamclaim::{
    IPAM_CLAIM_KIND, IpamClaim, IpamClaimOwnerPod, IpamClaimSpec, IpamClaimStatus,
};
pub use ippool::{IpAllocation, IpPool, IpPoolSpec, IpPoolStatus};
pub use nad::{NetworkAttachmentDefinition, NetworkAttachmentDefinitionSpec};
pub use network::{
    CniVersion, CoordinatorOptions, MainPlugin, Network, NetworkSpec, NetworkStatus, NetworkSubnets,
};
pub use subnet::{Dns, Route, Subnet, SubnetSpec, SubnetStatus};

/// Label on every IPPool naming its Subnet, so the controller and agents can list a Subnet's
/// shards with a label selector.
pub const LABEL_SUBNET: &str = "ipam.virtnet.io/subnet";

/// Finalizer on every Endpoint: its addresses go back to their pools, through the controller,
/// before the object disappears.
pub const FINALIZER_ENDPOINT: &str = "ipam.virtnet.io/endpoint";

/// Finalizer the controller keeps on every Subnet: a deleted Subnet stays (and its pools with it)
/// until no address of its pools is allocated, so a Subnet recreated under the same name cannot
/// hand out an address a pod still uses.
pub const FINALIZER_SUBNET: &str = "ipam.virtnet.io/allocations";

/// The virtnet.io CRDs are not served: the controller and the agent cannot start.
#[derive(Debug, thiserror::Error)]
#[error(
    "the virtnet.io CRDs are not installed ({0}): apply chart/crds/ \
     (kubectl apply -f chart/crds/) or install the Helm chart"
)]
pub struct CrdsMissing(kube::Error);

/// Fails fast, with an install hint, when the API server does not serve the CRDs.
pub async fn ensure_installed(client: &kube::Client) -> Result<(), CrdsMissing> {
    kube::Api::<Subnet>::all(client.clone())
        .list(&kube::api::ListParams::default().limit(1))
        .await
        .map(drop)
        .map_err(CrdsMissing)
}

/// One generated CustomResourceDefinition, as committed under `chart/crds/`.
pub struct CrdManifest {
    /// File name: the CRD's name plus `.yaml`, e.g. `subnets.virtnet.io.yaml`.
    pub file_name: String,
    /// The YAML document, headed by a do-not-edit comment.
    pub yaml: String,
}

/// Renders the CRDs of the virtnet.io kinds.
pub fn crd_manifests() -> Result<Vec<CrdManifest>, serde_saphyr::SerializeError> {
    [
        (Subnet::crd_name(), Subnet::crd()),
        (IpPool::crd_name(), IpPool::crd()),
        (Endpoint::crd_name(), Endpoint::crd()),
        (Network::crd_name(), Network::crd()),
    ]
    .into_iter()
    .map(|(name, crd)| {
        Ok(CrdManifest {
            file_name: format!("{name}.yaml"),
            yaml: format!(
                "# Generated from src/crd by `virtnet crdgen`; do not edit. Regenerate with\n\
                 # `cargo run -- crdgen --out chart/crds`.\n{}",
                serde_saphyr::to_string(&crd)?
            ),
        })
    })
    .collect()
}

/// Helpers for the CEL tests of each kind.
#[cfg(test)]
mod test_support {
    use kube::core::cel::ValidationErrors;
    use serde::de::DeserializeOwned;
    use serde_json::{Value, json};

    /// A `virtnet.io/v1alpha1` object of `kind` whose spec is `base_spec` with the top-level
    /// fields of `changes` replaced.
    pub(crate) fn object<K: DeserializeOwned>(kind: &str, base_spec: &Value, changes: &Value) -> K {
        let mut spec = base_spec.clone();
        for (field, value) in changes.as_object().expect("changes are a JSON object") {
            spec[field] = value.clone();
        }
        let object = json!({
            "apiVersion": "virtnet.io/v1alpha1",
            "kind": kind,
            "metadata": {"name": "example", "namespace": "default"},
            "spec": spec,
        });
        serde_json::from_value(object)
            .unwrap_or_else(|e| panic!("{changes} does not deserialize: {e}"))
    }

    /// The failed rules as `field.path: message`, as the apiserver would report them.
    pub(crate) fn failures(result: Result<(), ValidationErrors>) -> Vec<String> {
        result
            .err()
            .map(|errors| {
                errors
                    .iter()
                    .map(|e| format!("{}: {}", e.field_path, e.message))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Asserts that `result` failed exactly one rule, whose report starts with `expected`.
    pub(crate) fn assert_rejected(
        result: Result<(), ValidationErrors>,
        expected: &str,
        case: &Value,
    ) {
        let failures = failures(result);
        assert!(
            failures.len() == 1 && failures[0].starts_with(expected),
            "{case}: expected exactly `{expected}…`, got {failures:#?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeSet,
        fs,
        path::{Path, PathBuf},
    };

    use super::*;

    fn repo_path(relative: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
    }

    #[test]
    fn committed_crds_match_the_rust_types() {
        let crd_dir = repo_path("chart/crds");
        let manifests = crd_manifests().expect("CRDs render as YAML");
        for manifest in &manifests {
            let committed =
                fs::read_to_string(crd_dir.join(&manifest.file_name)).unwrap_or_default();
            assert!(
                committed == manifest.yaml,
                "chart/crds/{} differs from the Rust types in src/crd: run `cargo run -- crdgen --out chart/crds`",
                manifest.file_name
            );
        }
        let generated: BTreeSet<_> = manifests.iter().map(|m| m.file_name.clone()).collect();
        let committed: BTreeSet<_> = fs::read_dir(&crd_dir)
            .expect("chart/crds exists")
            .map(|entry| {
                entry
                    .expect("readable entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(
            committed, generated,
            "chart/crds holds files crdgen does not generate: remove them and run `cargo run -- crdgen --out chart/crds`"
        );
    }

    #[test]
    fn crd_names_kinds_and_short_names() {
        let names = [
            Subnet::crd(),
            IpPool::crd(),
            Endpoint::crd(),
            Network::crd(),
        ]
        .map(|crd| {
            let names = crd.spec.names;
            (
                crd.spec.scope,
                names.kind,
                names.plural,
                names.short_names,
                names.categories,
            )
        });
        let virtnet = || Some(vec!["virtnet".to_owned()]);
        assert_eq!(
            names,
            [
                (
                    "Cluster".into(),
                    "Subnet".into(),
                    "subnets".into(),
                    Some(vec!["sb".into()]),
                    virtnet()
                ),
                (
                    "Cluster".into(),
                    "IPPool".into(),
                    "ippools".into(),
                    Some(vec!["ipp".into()]),
                    virtnet()
                ),
                (
                    "Namespaced".into(),
                    "Endpoint".into(),
                    "endpoints".into(),
                    Some(vec!["vep".into()]),
                    virtnet()
                ),
                (
                    "Namespaced".into(),
                    "Network".into(),
                    "networks".into(),
                    Some(vec!["vnet".into()]),
                    virtnet()
                ),
            ]
        );
    }

    /// Every `*.yaml` file under `dir`, recursively.
    fn yaml_files(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for entry in fs::read_dir(dir).expect("readable directory") {
            let path = entry.expect("readable entry").path();
            if path.is_dir() {
                files.extend(yaml_files(&path));
            } else if path.extension().is_some_and(|ext| ext == "yaml") {
                files.push(path);
            }
        }
        files
    }

    #[test]
    fn example_subnets_parse_and_pass_validation() {
        let mut subnets_checked = 0;
        for file in yaml_files(&repo_path("examples")) {
            let text = fs::read_to_string(&file).expect("readable example");
            let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", file.display()));
            for document in documents.into_iter().filter(|doc| doc["kind"] == "Subnet") {
                let subnet: Subnet = serde_json::from_value(document)
                    .unwrap_or_else(|e| panic!("{}: not a Subnet: {e}", file.display()));
                if let Err(errors) = subnet.validate_cel() {
                    panic!("{}: Subnet fails validation: {errors:?}", file.display());
                }
                subnets_checked += 1;
            }
        }
        assert!(
            subnets_checked >= 2,
            "expected the statefulset and kubevirt examples to hold Subnets"
        );
    }
}
