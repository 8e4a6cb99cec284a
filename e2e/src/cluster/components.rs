//! The command lines of every component, in one place so flags are easy to review against
//! kubeadm's. Ports are the usual ones: every host is its own namespace, nothing collides.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use virtnet_cni::trusted::TRUSTED_DIRS_ENV;

use super::{layout::Layout, node_cni::NodeDirs};
use crate::{
    pki::{CertAndKey, ServiceAccountKey},
    process::Daemon,
    topology::{CONTROL_PLANE_IP, underlay_cidr},
};

pub const APISERVER_PORT: u16 = 6443;
/// etcd listens on the control-plane host's loopback only: only the apiserver talks to it.
const ETCD_CLIENT_URL: &str = "http://127.0.0.1:2379";
const ETCD_PEER_URL: &str = "http://127.0.0.1:2380";
pub const SERVICE_CLUSTER_IP_RANGE: &str = "10.96.0.0/16";
/// Must match what a real cluster uses, since pods' projected tokens carry it.
const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The apiserver as the components in the cluster's namespaces reach it.
pub fn apiserver_url() -> String {
    format!("https://{CONTROL_PLANE_IP}:{APISERVER_PORT}")
}

pub fn apiserver_address() -> SocketAddr {
    SocketAddr::from((CONTROL_PLANE_IP, APISERVER_PORT))
}

/// Where the third-party binaries live (`e2e/tools/install` puts them there).
#[derive(Debug, Clone)]
pub struct Binaries {
    pub dir: PathBuf,
}

impl Binaries {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

pub fn etcd(layout: &Layout, bins: &Binaries, netns: &str) -> Daemon {
    Daemon::new("etcd", Some(netns.to_owned()), bins.path("etcd")).args([
        "--name=control-plane".into(),
        format!("--data-dir={}", layout.etcd_data.display()),
        format!("--listen-client-urls={ETCD_CLIENT_URL}"),
        format!("--advertise-client-urls={ETCD_CLIENT_URL}"),
        format!("--listen-peer-urls={ETCD_PEER_URL}"),
        format!("--initial-advertise-peer-urls={ETCD_PEER_URL}"),
        format!("--initial-cluster=control-plane={ETCD_PEER_URL}"),
        // A throwaway cluster: durability buys nothing and fsync is most of etcd's latency.
        "--unsafe-no-fsync=true".into(),
        "--log-level=warn".into(),
    ])
}

/// The apiserver's own files.
pub struct ApiserverFiles<'a> {
    pub ca_cert: &'a Path,
    pub serving: &'a CertAndKey,
    pub service_account: &'a ServiceAccountKey,
    pub front_proxy_ca_cert: &'a Path,
    pub front_proxy_client: &'a CertAndKey,
    pub kubelet_client: &'a CertAndKey,
}

/// The user the front-proxy client certificate names; the apiserver only trusts request headers
/// from it.
pub const FRONT_PROXY_CLIENT: &str = "front-proxy-client";

pub fn apiserver(bins: &Binaries, netns: &str, files: &ApiserverFiles<'_>) -> Daemon {
    Daemon::new(
        "kube-apiserver",
        Some(netns.to_owned()),
        bins.path("kube-apiserver"),
    )
    .args([
        format!("--etcd-servers={ETCD_CLIENT_URL}"),
        // Every address of the control-plane namespace: its underlay IP for the nodes and the
        // forwarder, its loopback for anything run inside the namespace while debugging.
        "--bind-address=0.0.0.0".into(),
        format!("--advertise-address={CONTROL_PLANE_IP}"),
        format!("--secure-port={APISERVER_PORT}"),
        format!("--tls-cert-file={}", files.serving.cert.display()),
        format!("--tls-private-key-file={}", files.serving.key.display()),
        format!("--client-ca-file={}", files.ca_cert.display()),
        format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
        format!(
            "--service-account-key-file={}",
            files.service_account.public_key.display()
        ),
        format!(
            "--service-account-signing-key-file={}",
            files.service_account.private_key.display()
        ),
        format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
        "--authorization-mode=Node,RBAC".into(),
        // As kubeadm: a node's credentials may only touch its own Node and its own pods.
        "--enable-admission-plugins=NodeRestriction".into(),
        "--allow-privileged=true".into(),
        "--profiling=false".into(),
        // The aggregation layer, set up as kubeadm does. Without it the apiserver publishes no
        // request-header CA and every component's delegated authentication logs errors forever.
        format!(
            "--requestheader-client-ca-file={}",
            files.front_proxy_ca_cert.display()
        ),
        format!("--requestheader-allowed-names={FRONT_PROXY_CLIENT}"),
        "--requestheader-username-headers=X-Remote-User".into(),
        "--requestheader-group-headers=X-Remote-Group".into(),
        "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
        format!(
            "--proxy-client-cert-file={}",
            files.front_proxy_client.cert.display()
        ),
        format!(
            "--proxy-client-key-file={}",
            files.front_proxy_client.key.display()
        ),
        // kubectl exec/logs on real nodes: the apiserver dials kubelet at the node's underlay IP
        // (node names resolve nowhere) with a client certificate kubelet trusts.
        format!(
            "--kubelet-client-certificate={}",
            files.kubelet_client.cert.display()
        ),
        format!(
            "--kubelet-client-key={}",
            files.kubelet_client.key.display()
        ),
        "--kubelet-preferred-address-types=InternalIP".into(),
        // Webhooks (VirtNet's Subnet webhook) are called at their Service's endpoints: no
        // kube-proxy runs in the control-plane namespace to route a ClusterIP.
        "--enable-aggregator-routing=true".into(),
        // The default (lease) endpoint reconciler stays: the advertise address is a routable
        // underlay IP, so the `kubernetes` Service gets real endpoints that kube-proxy programs.
    ])
}

pub fn controller_manager(
    bins: &Binaries,
    netns: &str,
    kubeconfig: &Path,
    ca_cert: &Path,
    service_account: &ServiceAccountKey,
) -> Daemon {
    Daemon::new(
        "kube-controller-manager",
        Some(netns.to_owned()),
        bins.path("kube-controller-manager"),
    )
    .args(delegated_auth_flags(kubeconfig))
    .args([
        // One instance: leader election would only delay the start by a lease period.
        "--leader-elect=false".into(),
        "--bind-address=127.0.0.1".into(),
        format!(
            "--service-account-private-key-file={}",
            service_account.private_key.display()
        ),
        format!("--root-ca-file={}", ca_cert.display()),
        // Each controller acts under its own ServiceAccount, so RBAC is exercised as in
        // production. Every controller runs, nodelifecycle included: the kubelet stand-in renews
        // its Lease, and a node that stops doing so must turn NotReady as in a real cluster.
        "--use-service-account-credentials=true".into(),
        "--controllers=*".into(),
        // Pods get underlay addresses from CNI IPAM, never from node podCIDRs.
        "--allocate-node-cidrs=false".into(),
    ])
}

pub fn scheduler(bins: &Binaries, netns: &str, kubeconfig: &Path) -> Daemon {
    Daemon::new(
        "kube-scheduler",
        Some(netns.to_owned()),
        bins.path("kube-scheduler"),
    )
    .args(delegated_auth_flags(kubeconfig))
    .args(["--leader-elect=false", "--bind-address=127.0.0.1"])
}

/// Kubeconfig plus the delegated authentication/authorization of the component's own health
/// and metrics endpoints, which otherwise log warnings and allow nothing.
fn delegated_auth_flags(kubeconfig: &Path) -> Vec<String> {
    [
        "kubeconfig",
        "authentication-kubeconfig",
        "authorization-kubeconfig",
    ]
    .iter()
    .map(|flag| format!("--{flag}={}", kubeconfig.display()))
    .collect()
}

pub fn kube_proxy(bins: &Binaries, netns: &str, node: &str, kubeconfig: &Path) -> Daemon {
    Daemon::new(
        format!("kube-proxy-{node}"),
        Some(netns.to_owned()),
        bins.path("kube-proxy"),
    )
    .args([
        format!("--kubeconfig={}", kubeconfig.display()),
        "--proxy-mode=nftables".into(),
        format!("--hostname-override={node}"),
        // 0 leaves nf_conntrack_max alone: it is machine-wide, not per namespace.
        "--conntrack-max-per-core=0".into(),
        format!("--cluster-cidr={}", underlay_cidr()),
        // Pods sit on the underlay, inside the cluster CIDR, and a backend answers a pod
        // directly over the underlay: only a masqueraded request (source = this node) gets its
        // reply back through this node's conntrack. VirtNet's README asks the same of clusters.
        "--masquerade-all=true".into(),
        "--healthz-bind-address=127.0.0.1:10256".into(),
        "--metrics-bind-address=127.0.0.1:10249".into(),
    ])
}

/// The kubelet stand-in (`virtnet-e2e kubelet`) of one node. The plugins it runs (and Multus's
/// delegates) inherit its environment, which trusts the node's own directory for the agent
/// socket and log files, as a real node's runtime trusts /run/virtnet.
pub fn kubelet(
    harness_binary: &Path,
    netns: &str,
    node: &str,
    node_ip: std::net::Ipv4Addr,
    kubeconfig: &Path,
    dirs: &NodeDirs,
    pod_netns_prefix: &str,
) -> Daemon {
    Daemon::new(
        format!("kubelet-{node}"),
        Some(netns.to_owned()),
        harness_binary,
    )
    .args([
        "kubelet".into(),
        format!("--node-name={node}"),
        format!("--node-ip={node_ip}"),
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--cni-conf-dir={}", dirs.cni_conf.display()),
        format!("--cni-bin-dir={}", dirs.cni_bin.display()),
        format!("--cni-cache-dir={}", dirs.cni_cache.display()),
        format!("--netns-prefix={pod_netns_prefix}"),
    ])
    .with_env(&[(TRUSTED_DIRS_ENV, &dirs.root.display().to_string())])
}

/// The loopback forwarder (`virtnet-e2e forward`) in the root namespace.
pub fn forwarder(harness_binary: &Path, control_plane_netns: &str, address_file: &Path) -> Daemon {
    Daemon::new("apiserver-forwarder", None, harness_binary).args([
        "forward".into(),
        "--listen=127.0.0.1:0".into(),
        format!("--netns={control_plane_netns}"),
        format!("--upstream={}", apiserver_address()),
        format!("--address-file={}", address_file.display()),
    ])
}
