//! VirtNet itself in a harness cluster, as the chart would run it: the CRDs and the chart's RBAC,
//! `virtnet controller` in the control-plane namespace and `virtnet agent` in every node namespace
//! (each as its chart ServiceAccount, through a client certificate for
//! `system:serviceaccount:kube-system:<sa>` in group `system:serviceaccounts`). Each agent, in
//! default-CNI mode, installs virtnet-ipam and virtnet-coordinator from the build output into its
//! node's CNI bin dir and the default conflist as the node's default network (in Multus mode, the
//! network Multus delegates to by default: see `multus.rs`), as the chart's DaemonSet does.
//!
//! The controller serves the Subnet admission webhook with a certificate from the harness CA;
//! the chart's ValidatingWebhookConfiguration is registered with its `clientConfig` pointed at
//! the controller's address (the apiserver runs in the same namespace) instead of the Service.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use kube::{
    Api,
    api::{ApiResource, DynamicObject, GroupVersionKind, PostParams},
};

use super::{ClusterError, components::apiserver_url, multus::Multus, real_node};
use crate::{
    command, kubeconfig,
    pki::{CertAndKey, CertificateAuthority, ClientIdentity},
    process::Daemon,
};

/// The conflist `virtnet agent` writes in default-CNI mode; it sorts before the bootstrap one.
pub const VIRTNET_CONFLIST: &str = "00-virtnet.conflist";
/// The chart's hostPath for the agent's socket: the directory of virtnet-ipam's default
/// `agent_socket`. Each node's kubelet stand-in sees its own agent's directory there.
pub const AGENT_RUN_HOST_PATH: &str = "/var/run/virtnet";
/// The Subnet the default conflist allocates from.
pub const EXAMPLE_SUBNET: &str = "subnet";
/// Where VirtNet is installed (the chart's release namespace).
pub const NAMESPACE: &str = "kube-system";
/// The helm release name of a [`HelmInstall`].
pub const RELEASE: &str = "virtnet";
const RBAC_KINDS: &[&str] = &[
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
];
/// Where the controller serves the webhook, in the control-plane namespace.
pub const WEBHOOK_ADDRESS: &str = "127.0.0.1:9443";
/// The chart's ValidatingWebhookConfiguration and the path `virtnet controller` serves.
const WEBHOOK_CONFIGURATION: &str = "virtnet-controller";
const WEBHOOK_PATH: &str = "/validate/subnets";

/// Where VirtNet's build output and sources are.
#[derive(Debug, Clone)]
pub struct VirtnetOptions {
    /// Holds `virtnet`, `virtnet-ipam` and `virtnet-coordinator` (`cargo build --workspace`).
    pub binaries: PathBuf,
    /// The repository root, for `chart/` and `chart/crds/`.
    pub repo: PathBuf,
    /// Multus mode: Multus (thin plugin) is the nodes' default CNI and delegates to the example's
    /// conflist; every node also gets a second NIC on a second underlay (see `topology`).
    pub multus: bool,
    /// VirtNet is the nodes' default network (the agent writes its conflist). Off, with
    /// `multus`, the bootstrap network (macvlan + host-local, the reference plugins) stays the
    /// primary CNI Multus delegates to, and VirtNet serves only the NADs' extra NICs.
    pub default_cni: bool,
    /// Extra environment of `virtnet controller` (e.g. `VIRTNET_GC_INTERVAL`).
    pub controller_env: Vec<(String, String)>,
    /// Extra environment of every `virtnet agent` (e.g. `VIRTNET_GROUP_COMMIT=false`).
    pub agent_env: Vec<(String, String)>,
    /// Install as users do: the image into every node, the chart with helm (real nodes only).
    /// `None`: the harness starts the controller and agents as processes with the chart's RBAC.
    pub helm: Option<HelmInstall>,
}

/// VirtNet installed the way users install it: `make image`'s archive imported into every real
/// node's containerd, then `helm install` of the chart with the harness's values (the nodes' NIC,
/// the example Subnet as default, VirtNet as the default CNI). The controller and the agents are
/// then the chart's Deployment and DaemonSet pods, with their ServiceAccount tokens.
#[derive(Debug, Clone)]
pub struct HelmInstall {
    /// The OCI archive `make image` writes.
    pub image_archive: PathBuf,
    /// The image reference the archive carries.
    pub repository: String,
    pub tag: String,
}

impl HelmInstall {
    /// `make image`'s output for this workspace's version.
    pub fn from_workspace(target_dir: &Path) -> Self {
        let tag = env!("CARGO_PKG_VERSION").to_owned();
        Self {
            image_archive: target_dir.join(format!("image/virtnet-{tag}.oci.tar")),
            repository: "ghcr.io/virtnet/virtnet".to_owned(),
            tag,
        }
    }

    /// The image reference, `repository:tag`.
    pub fn image(&self) -> String {
        format!("{}:{}", self.repository, self.tag)
    }

    /// The harness's values: the image as imported (never pulled), VirtNet as every node's
    /// default CNI on the node NIC with the example Subnet, the controller on the host network
    /// (default-CNI mode: it cannot wait for an address of its own).
    fn values(&self) -> serde_json::Value {
        serde_json::json!({
            "image": { "repository": self.repository, "tag": self.tag, "pullPolicy": "Never" },
            "controller": { "hostNetwork": true },
            "agent": { "cni": {
                "defaultCNI": true,
                "master": crate::topology::NODE_NIC,
                "defaultSubnets": [EXAMPLE_SUBNET],
                "hostBinDir": "/opt/cni/bin",
                "hostConfDir": "/etc/cni/net.d",
            } },
        })
    }
}

impl VirtnetOptions {
    /// The debug build of this workspace, which the tests run.
    pub fn from_workspace() -> Self {
        Self::from_build("debug")
    }

    /// The build of this workspace in `profile`'s output directory (`release` for the benches,
    /// whose figures must be those of what users run): `$CARGO_TARGET_DIR/<profile>`, else
    /// `<repo>/target/<profile>`.
    pub fn from_build(profile: &str) -> Self {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let target =
            std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo.join("target"), PathBuf::from);
        Self {
            binaries: target.join(profile),
            repo,
            multus: false,
            default_cni: true,
            controller_env: Vec::new(),
            agent_env: Vec::new(),
            helm: None,
        }
    }

    /// The workspace's chart and `make image`'s image, installed with helm.
    pub fn helm_from_workspace() -> Self {
        let mut options = Self::from_workspace();
        let target = options
            .binaries
            .parent()
            .map_or_else(|| PathBuf::from("target"), Path::to_path_buf);
        options.helm = Some(HelmInstall::from_workspace(&target));
        options
    }

    /// The first missing VirtNet binary, if any.
    pub fn missing(&self) -> Option<PathBuf> {
        ["virtnet", "virtnet-ipam", "virtnet-coordinator"]
            .iter()
            .map(|name| self.binaries.join(name))
            .find(|path| !path.is_file())
    }
}

/// Keeps the documents of a multi-document YAML stream whose `kind` is one of `kinds`.
fn documents_of_kinds(stream: &str, kinds: &[&str]) -> String {
    stream
        .split("\n---")
        .filter(|document| {
            document.lines().any(|line| {
                line.strip_prefix("kind: ")
                    .is_some_and(|kind| kinds.contains(&kind.trim()))
            })
        })
        .map(|document| format!("---{}\n", document.trim_start_matches("---")))
        .collect()
}

/// What [`install`] needs of the starting cluster.
pub struct Target<'a> {
    /// The third-party binaries (Multus's among them).
    pub bin_dir: &'a Path,
    pub kubectl: &'a Path,
    pub helm: &'a Path,
    pub admin_kubeconfig: &'a Path,
    pub state: &'a Path,
    pub logs: &'a Path,
    pub pki_dir: &'a Path,
    pub ca: &'a CertificateAuthority,
    pub control_plane_netns: &'a str,
    /// (node name, its network namespace, its directories)
    pub nodes: Vec<(String, String, super::NodeDirs)>,
}

/// VirtNet installed in the cluster, its daemons not started yet.
pub struct Installed {
    /// The controller, then one agent per node.
    pub daemons: Vec<Daemon>,
    /// In Multus mode: to configure on each node once its agent wrote VirtNet's conflist.
    pub multus: Option<Multus>,
}

/// Installs VirtNet's CRDs and RBAC (and Multus's, in Multus mode) and returns the daemons to
/// start.
pub fn install(options: &VirtnetOptions, target: &Target<'_>) -> Result<Installed, ClusterError> {
    let kubectl = |args: &[&str]| {
        command::run_stdout(
            Command::new(target.kubectl)
                .arg("--kubeconfig")
                .arg(target.admin_kubeconfig)
                .args(args),
        )
    };
    let crds = options.repo.join("chart/crds");
    let crds = crds.to_string_lossy();
    kubectl(&["apply", "-f", &crds])?;
    kubectl(&[
        "wait",
        "--for",
        "condition=established",
        "--timeout=60s",
        "-f",
        &crds,
    ])?;
    let rendered = command::run_stdout(
        Command::new(target.helm)
            .args(["template", "virtnet"])
            .arg(options.repo.join("chart"))
            .args(["--namespace", NAMESPACE]),
    )?;
    let rbac = target.state.join("virtnet-rbac.yaml");
    write(&rbac, &documents_of_kinds(&rendered, RBAC_KINDS))?;
    kubectl(&["apply", "-f", &rbac.to_string_lossy()])?;
    let webhook_cert = register_webhook(target, &rendered, &kubectl)?;

    let virtnet = options.binaries.join("virtnet");
    let mut daemons = vec![
        Daemon::new(
            "virtnet-controller",
            Some(target.control_plane_netns.to_owned()),
            "env",
        )
        .args([
            format!(
                "KUBECONFIG={}",
                service_account_kubeconfig(target, "virtnet-controller")?.display()
            ),
            format!("POD_NAMESPACE={NAMESPACE}"),
            "VIRTNET_HTTP_ADDR=127.0.0.1:8080".to_owned(),
            format!("VIRTNET_WEBHOOK_ADDR={WEBHOOK_ADDRESS}"),
            format!("VIRTNET_WEBHOOK_CERT={}", webhook_cert.cert.display()),
            format!("VIRTNET_WEBHOOK_KEY={}", webhook_cert.key.display()),
        ])
        .args(
            options
                .controller_env
                .iter()
                .map(|(key, value)| format!("{key}={value}")),
        )
        .args([virtnet.display().to_string(), "controller".to_owned()]),
    ];
    let agent_kubeconfig = service_account_kubeconfig(target, "virtnet-agent")?;
    let multus = options
        .multus
        .then(|| Multus::install(target, |args| Ok(kubectl(args)?)))
        .transpose()?;
    for (node, netns, dirs) in &target.nodes {
        let socket = dirs.agent_run.join("agent.sock");
        daemons.push(
            Daemon::new(format!("virtnet-agent-{node}"), Some(netns.clone()), "env")
                .args([
                    format!("KUBECONFIG={}", agent_kubeconfig.display()),
                    format!("NODE_NAME={node}"),
                    format!("VIRTNET_SOCKET={}", socket.display()),
                    "VIRTNET_HTTP_ADDR=127.0.0.1:9741".to_owned(),
                    format!("VIRTNET_CNI_PLUGINS_SOURCE={}", options.binaries.display()),
                    format!("VIRTNET_CNI_BIN_DIR={}", dirs.cni_bin.display()),
                    format!("VIRTNET_CNI_CONF_DIR={}", dirs.cni_conf.display()),
                    format!("VIRTNET_DEFAULT_CNI={}", options.default_cni),
                    format!("VIRTNET_CNI_MASTER={}", crate::topology::NODE_NIC),
                    format!("VIRTNET_CNI_DEFAULT_SUBNETS={EXAMPLE_SUBNET}"),
                ])
                .args(
                    options
                        .agent_env
                        .iter()
                        .map(|(key, value)| format!("{key}={value}")),
                )
                .args([virtnet.display().to_string(), "agent".to_owned()]),
        );
    }
    Ok(Installed { daemons, multus })
}

/// Installs VirtNet with helm (see [`HelmInstall`]) and waits until its pods are Ready.
pub fn install_with_helm(
    options: &VirtnetOptions,
    helm: &HelmInstall,
    target: &Target<'_>,
) -> Result<(), ClusterError> {
    for (_, _, dirs) in &target.nodes {
        real_node::import_images(dirs, std::slice::from_ref(&helm.image_archive))?;
    }
    let values = values_file(target.state);
    write(&values, &format!("{:#}\n", helm.values()))?;
    command::run(
        Command::new(target.helm)
            .args(["install", RELEASE])
            .arg(options.repo.join("chart"))
            .args(["--namespace", NAMESPACE, "--kubeconfig"])
            .arg(target.admin_kubeconfig)
            .arg("--values")
            .arg(&values)
            .args(["--wait", "--timeout", "180s"]),
    )?;
    Ok(())
}

/// The values file [`install_with_helm`] installed the chart with, under the cluster's state.
pub fn values_file(state: &Path) -> PathBuf {
    state.join("virtnet-values.yaml")
}

/// Issues the webhook's serving certificate and registers the chart's webhook configuration,
/// pointed at [`WEBHOOK_ADDRESS`] and trusting the harness CA.
fn register_webhook(
    target: &Target<'_>,
    rendered: &str,
    kubectl: &dyn Fn(&[&str]) -> Result<String, command::CommandError>,
) -> Result<CertAndKey, ClusterError> {
    let host = WEBHOOK_ADDRESS
        .split_once(':')
        .map_or(WEBHOOK_ADDRESS, |(host, _)| host);
    let cert = target.ca.issue_server(
        "virtnet-webhook",
        "virtnet-controller-webhook",
        vec![host.to_owned()],
    )?;
    let configuration = target.state.join("virtnet-webhook.yaml");
    write(
        &configuration,
        &documents_of_kinds(rendered, &["ValidatingWebhookConfiguration"]),
    )?;
    kubectl(&["apply", "-f", &configuration.to_string_lossy()])?;
    let ca = fs::read(target.ca.cert_path()).map_err(|source| ClusterError::StateDir {
        path: target.ca.cert_path().to_owned(),
        source,
    })?;
    let client_config = serde_json::json!([{
        "op": "replace", "path": "/webhooks/0/clientConfig",
        "value": {
            "url": format!("https://{WEBHOOK_ADDRESS}{WEBHOOK_PATH}"),
            "caBundle": k8s_openapi::ByteString(ca),
        },
    }]);
    kubectl(&[
        "patch",
        "validatingwebhookconfiguration",
        WEBHOOK_CONFIGURATION,
        "--type=json",
        "-p",
        &client_config.to_string(),
    ])?;
    Ok(cert)
}

/// Whether the controller answers the Subnet webhook: a server-side dry-run create of a Subnet
/// only the webhook refuses (an IPv6 range that starts after it ends, which CEL cannot order) is
/// denied by it. The webhook fails open, so a create that gets through means nobody answered.
pub async fn webhook_answers(client: &kube::Client) -> Result<(), String> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("virtnet.io", "v1alpha1", "Subnet"),
        "subnets",
    );
    let probe: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "virtnet.io/v1alpha1", "kind": "Subnet",
        "metadata": { "name": "virtnet-e2e-webhook-probe" },
        "spec": { "subnet": "fd00:e2e::/64", "ips": ["fd00:e2e::20-fd00:e2e::10"] },
    }))
    .map_err(|error| error.to_string())?;
    let created = Api::<DynamicObject>::all_with(client.clone(), &resource)
        .create(
            &PostParams {
                dry_run: true,
                ..PostParams::default()
            },
            &probe,
        )
        .await;
    match created {
        Err(kube::Error::Api(status)) if status.message.contains("denied the request") => Ok(()),
        Err(error) => Err(error.to_string()),
        Ok(_) => Err("a Subnet only the webhook refuses was admitted: no replica answers".into()),
    }
}

/// A client certificate acting as ServiceAccount `kube-system/<sa>` (user name and
/// certificate), so the component has exactly that ServiceAccount's RBAC.
pub(super) fn service_account_client(
    target: &Target<'_>,
    sa: &str,
) -> Result<(String, CertAndKey), ClusterError> {
    let user = format!("system:serviceaccount:{NAMESPACE}:{sa}");
    let client = target.ca.issue_client(&ClientIdentity {
        file_stem: sa,
        user: &user,
        groups: &["system:serviceaccounts"],
    })?;
    Ok((user, client))
}

/// A kubeconfig acting as ServiceAccount `kube-system/<sa>`, so the component has exactly the
/// chart's RBAC.
fn service_account_kubeconfig(target: &Target<'_>, sa: &str) -> Result<PathBuf, ClusterError> {
    let (user, client) = service_account_client(target, sa)?;
    let path = target.pki_dir.join(format!("{sa}.kubeconfig"));
    kubeconfig::write(
        &path,
        &apiserver_url(),
        target.ca.cert_path(),
        &user,
        &client,
    )?;
    Ok(path)
}

pub(super) fn write(path: &Path, content: &str) -> Result<(), ClusterError> {
    fs::write(path, content).map_err(|source| ClusterError::StateDir {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_rbac_documents() {
        let stream = "---\n# Source: a\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: a\n---\napiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: d\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: r\n";
        let kept = documents_of_kinds(stream, RBAC_KINDS);
        assert!(kept.contains("kind: ServiceAccount") && kept.contains("kind: ClusterRole"));
        assert!(!kept.contains("DaemonSet"), "{kept}");
    }
}
