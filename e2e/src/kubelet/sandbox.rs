//! Pod sandboxes as containerd keeps them for networking: a named network namespace, a random
//! container id, and an on-disk record of the CNI config and result, so DEL after a config
//! change or a restart runs with exactly what ADD ran with.
use std::{
    io,
    path::{Path, PathBuf},
    process::Stdio,
};

use nix::sys::statfs::{NSFS_MAGIC, statfs};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{io::AsyncReadExt, process::Command};
use tracing::{info, warn};

use super::{
    cni::{self, NetworkConfigList, POD_IFNAME, PluginRunner, RuntimeConf},
    error::SandboxError,
};
use crate::{naming::pod_netns_name, netns::named_netns_path};

/// Which pod a sandbox belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What is persisted about one sandbox, written before its namespace exists and removed after
/// it is gone, so a crash at any point leaves a record to clean up from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// Lets nodes share a cache directory without tearing down each other's pods.
    pub node_name: String,
    pub pod: PodRef,
    pub container_id: String,
    pub if_name: String,
    pub netns: String,
    pub cni_args: String,
    pub config: NetworkConfigList,
    /// `None` until ADD succeeded: such a sandbox is never adopted, only torn down.
    pub result: Option<Value>,
}

impl SandboxRecord {
    fn runtime_conf(&self) -> RuntimeConf {
        RuntimeConf {
            container_id: self.container_id.clone(),
            netns: named_netns_path(&self.netns),
            if_name: self.if_name.clone(),
            args: self.cni_args.clone(),
        }
    }

    /// Keyed by container id and interface, like libcni's result cache.
    fn file_name(&self) -> String {
        format!("{}-{}.json", self.container_id, self.if_name)
    }

    /// The addresses of the pod's `eth0`.
    pub fn pod_interface_ips(&self) -> Result<Vec<std::net::IpAddr>, SandboxError> {
        let unreadable = |reason: String| SandboxError::UnreadableResult {
            container_id: self.container_id.clone(),
            reason,
        };
        let result = self
            .result
            .as_ref()
            .ok_or_else(|| unreadable("ADD never finished".to_owned()))?;
        cni::interface_ips(result, &self.if_name).map_err(unreadable)
    }
}

/// Everything needed to create and destroy the sandboxes of one node.
#[derive(Debug, Clone)]
pub struct Sandboxes {
    node_name: String,
    netns_prefix: String,
    conf_dir: PathBuf,
    records_dir: PathBuf,
    runner: PluginRunner,
}

impl Sandboxes {
    /// `cache_dir` gets a subdirectory of its own, so libcni-style caches of plugins that
    /// delegate (Multus) may live next to it.
    pub fn new(
        node_name: String,
        netns_prefix: String,
        conf_dir: PathBuf,
        cache_dir: &Path,
        runner: PluginRunner,
    ) -> Self {
        Self {
            node_name,
            netns_prefix,
            conf_dir,
            records_dir: cache_dir.join("sandboxes"),
            runner,
        }
    }

    pub fn records_dir(&self) -> &Path {
        &self.records_dir
    }

    pub fn netns_name(&self, pod_uid: &str) -> String {
        pod_netns_name(&self.netns_prefix, pod_uid)
    }

    /// Sets up a new sandbox for `pod`: record, namespace, CNI ADD. On failure everything is
    /// undone (DEL included, as containerd does) before the error is returned.
    pub async fn create(&self, pod: &PodRef) -> Result<SandboxRecord, SandboxError> {
        let config = cni::load_network_config(&self.conf_dir).await?;
        let container_id = random_container_id().await?;
        let mut record = SandboxRecord {
            node_name: self.node_name.clone(),
            pod: pod.clone(),
            cni_args: cni::pod_cni_args(&pod.namespace, &pod.name, &pod.uid, &container_id),
            container_id,
            if_name: POD_IFNAME.to_owned(),
            netns: self.netns_name(&pod.uid),
            config,
            result: None,
        };
        self.save(&record).await?;
        let added = match add_netns(&record.netns).await {
            Ok(()) => self
                .runner
                .add_network_list(&record.config, &record.runtime_conf())
                .await
                .map_err(SandboxError::from),
            Err(error) => Err(error),
        };
        let saved = match added {
            Ok(result) => {
                record.result = Some(result);
                self.save(&record).await
            }
            Err(error) => Err(error),
        };
        match saved {
            Ok(()) => Ok(record),
            Err(error) => {
                self.destroy(&record).await;
                Err(error)
            }
        }
    }

    /// Tears a sandbox down, best-effort: CNI DEL, namespace, record. Failures are logged; the
    /// record stays while the namespace does, so a later pass retries.
    pub async fn destroy(&self, record: &SandboxRecord) {
        let path = self.record_path(record);
        if !tokio::fs::try_exists(&path).await.unwrap_or(true) {
            // Someone else (an earlier pass) already finished this teardown.
            return;
        }
        if let Err(error) = self
            .runner
            .del_network_list(
                &record.config,
                &record.runtime_conf(),
                record.result.as_ref(),
            )
            .await
        {
            warn!(pod = %record.pod, container_id = record.container_id, %error, "CNI DEL failed");
        }
        if let Err(error) = delete_netns(&record.netns).await {
            warn!(pod = %record.pod, netns = record.netns, %error, "cannot delete the pod network namespace");
            return;
        }
        if let Err(error) = remove_file(&path).await {
            warn!(pod = %record.pod, %error, "cannot remove the sandbox record");
        }
        info!(pod = %record.pod, container_id = record.container_id, "sandbox torn down");
    }

    /// Whether a restarted stand-in can take the sandbox over instead of running ADD again.
    pub async fn is_intact(&self, record: &SandboxRecord) -> bool {
        record.result.is_some() && netns_is_mounted(&record.netns).await
    }

    /// Every record of this node; unreadable files are logged and skipped.
    pub async fn load_records(&self) -> Result<Vec<SandboxRecord>, SandboxError> {
        let read_error = |source| SandboxError::ReadRecords {
            dir: self.records_dir.clone(),
            source,
        };
        let mut entries = match tokio::fs::read_dir(&self.records_dir).await {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(read_error(source)),
        };
        let mut records = Vec::new();
        while let Some(entry) = entries.next_entry().await.map_err(read_error)? {
            let path = entry.path();
            if path.extension().is_none_or(|extension| extension != "json") {
                continue;
            }
            let parsed = match tokio::fs::read(&path).await {
                // Removed by a worker between listing and reading: its teardown is done.
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => Err(error.to_string()),
                Ok(bytes) => serde_json::from_slice::<SandboxRecord>(&bytes)
                    .map_err(|error| error.to_string()),
            };
            match parsed {
                Ok(record) if record.node_name == self.node_name => records.push(record),
                Ok(_) => {}
                Err(error) => {
                    warn!(path = %path.display(), error, "skipping unreadable sandbox record")
                }
            }
        }
        Ok(records)
    }

    fn record_path(&self, record: &SandboxRecord) -> PathBuf {
        self.records_dir.join(record.file_name())
    }

    /// Written to a temporary name and renamed, so a crash never leaves half a record.
    async fn save(&self, record: &SandboxRecord) -> Result<(), SandboxError> {
        let path = self.record_path(record);
        let write_error = |source| SandboxError::WriteRecord {
            path: path.clone(),
            source,
        };
        tokio::fs::create_dir_all(&self.records_dir)
            .await
            .map_err(write_error)?;
        let temporary = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(record).map_err(|error| write_error(error.into()))?;
        tokio::fs::write(&temporary, bytes)
            .await
            .map_err(write_error)?;
        tokio::fs::rename(&temporary, &path)
            .await
            .map_err(write_error)
    }
}

async fn remove_file(path: &Path) -> Result<(), SandboxError> {
    match tokio::fs::remove_file(path).await {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(SandboxError::RemoveRecord {
            path: path.to_owned(),
            source: error,
        }),
        _ => Ok(()),
    }
}

/// 64 hex digits, like a containerd sandbox id.
pub async fn random_container_id() -> Result<String, SandboxError> {
    let mut bytes = [0_u8; 32];
    let mut urandom = tokio::fs::File::open("/dev/urandom")
        .await
        .map_err(|source| SandboxError::ContainerId { source })?;
    urandom
        .read_exact(&mut bytes)
        .await
        .map_err(|source| SandboxError::ContainerId { source })?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}

/// Creates the named namespace with `lo` up. A leftover of the same name can only be a dead
/// sandbox of this very pod (the name comes from its UID), so it is replaced.
async fn add_netns(name: &str) -> Result<(), SandboxError> {
    if netns_is_mounted(name).await {
        warn!(netns = name, "replacing a leftover pod network namespace");
        delete_netns(name).await?;
    }
    ip(&["netns", "add", name]).await?;
    ip(&["-n", name, "link", "set", "lo", "up"]).await
}

async fn delete_netns(name: &str) -> Result<(), SandboxError> {
    match tokio::fs::try_exists(named_netns_path(name)).await {
        Ok(false) => Ok(()),
        _ => ip(&["netns", "delete", name]).await,
    }
}

/// A file under /run/netns that is not a namespace mount is a leftover of a deleted namespace.
async fn netns_is_mounted(name: &str) -> bool {
    let path = named_netns_path(name);
    tokio::task::spawn_blocking(move || {
        statfs(&path).is_ok_and(|stats| stats.filesystem_type() == NSFS_MAGIC)
    })
    .await
    .unwrap_or(false)
}

async fn ip(args: &[&str]) -> Result<(), SandboxError> {
    let command = format!("ip {}", args.join(" "));
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| SandboxError::IpSpawn {
            command: command.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(SandboxError::IpFailed {
            command,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn record(container_id: &str, result: Option<Value>) -> SandboxRecord {
        SandboxRecord {
            node_name: "e2e-node1".to_owned(),
            pod: PodRef {
                namespace: "default".to_owned(),
                name: "web-0".to_owned(),
                uid: "0123abcd-4567".to_owned(),
            },
            container_id: container_id.to_owned(),
            if_name: POD_IFNAME.to_owned(),
            netns: "e2e-pod-0123abcd".to_owned(),
            cni_args: cni::pod_cni_args("default", "web-0", "0123abcd-4567", container_id),
            config: NetworkConfigList {
                cni_version: "1.0.0".to_owned(),
                name: "underlay".to_owned(),
                plugins: vec![
                    json!({"type": "macvlan"})
                        .as_object()
                        .cloned()
                        .expect("object"),
                ],
            },
            result,
        }
    }

    fn sandboxes(node_name: &str, cache_dir: &Path) -> Sandboxes {
        Sandboxes::new(
            node_name.to_owned(),
            "e2e-pod".to_owned(),
            PathBuf::from("/nonexistent"),
            cache_dir,
            PluginRunner::new(PathBuf::from("/nonexistent"), cni::PLUGIN_TIMEOUT),
        )
    }

    #[tokio::test]
    async fn records_round_trip_through_the_cache_directory() {
        let cache = tempfile::tempdir().expect("temp dir");
        let store = sandboxes("e2e-node1", cache.path());
        let finished = record(
            &"a".repeat(64),
            Some(json!({"cniVersion": "1.0.0", "ips": []})),
        );
        let pending = record(&"b".repeat(64), None);
        store.save(&finished).await.expect("save");
        store.save(&pending).await.expect("save");
        let mut loaded = store.load_records().await.expect("load");
        loaded.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        assert_eq!(loaded, [finished.clone(), pending]);
        assert!(
            cache
                .path()
                .join("sandboxes")
                .join(format!("{}-eth0.json", "a".repeat(64)))
                .is_file()
        );

        remove_file(&store.record_path(&finished))
            .await
            .expect("remove");
        assert_eq!(store.load_records().await.expect("load").len(), 1);
    }

    #[tokio::test]
    async fn other_nodes_records_and_foreign_files_are_ignored() {
        let cache = tempfile::tempdir().expect("temp dir");
        let other_node = sandboxes("e2e-node2", cache.path());
        let other_nodes_record = SandboxRecord {
            node_name: "e2e-node2".to_owned(),
            ..record(&"c".repeat(64), None)
        };
        other_node.save(&other_nodes_record).await.expect("save");
        assert_eq!(other_node.load_records().await.expect("load").len(), 1);
        let records_dir = cache.path().join("sandboxes");
        std::fs::write(records_dir.join("garbage.json"), b"{").expect("write");
        std::fs::write(records_dir.join("half.json.tmp"), b"{").expect("write");
        let this_node = sandboxes("e2e-node1", cache.path());
        assert_eq!(this_node.load_records().await.expect("load"), []);
    }

    #[tokio::test]
    async fn a_missing_cache_directory_has_no_records() {
        let cache = tempfile::tempdir().expect("temp dir");
        let store = sandboxes("e2e-node1", &cache.path().join("not-yet"));
        assert_eq!(store.load_records().await.expect("load"), []);
    }

    #[tokio::test]
    async fn container_ids_are_64_hex_digits_and_unique() {
        let first = random_container_id().await.expect("id");
        let second = random_container_id().await.expect("id");
        assert_eq!(first.len(), 64);
        assert!(first.bytes().all(|byte| byte.is_ascii_hexdigit()));
        assert_ne!(first, second);
    }

    #[test]
    fn a_pending_sandbox_has_no_pod_ips() {
        assert!(record(&"d".repeat(64), None).pod_interface_ips().is_err());
    }
}

/// Real plugins in real namespaces: a "node" namespace whose underlay NIC is one end of a veth
/// pair (the other end in a "peer" namespace), and pods wired with macvlan + host-local +
/// tuning. Nothing touches the root namespace.
#[cfg(test)]
mod root_tests {
    use std::{future::Future, path::Path};

    use serde_json::json;
    use tempfile::TempDir;

    use super::*;
    use crate::kubelet::test_support::{NetnsGuard, ip, root_or_skip};

    /// Where `e2e/tools/install` puts the CNI reference plugins.
    const PLUGIN_DIR: &str = "/var/cache/virtnet-e2e/bin";
    const UNDERLAY_NIC: &str = "underlay0";

    struct NodeFixture {
        node_netns: String,
        dirs: TempDir,
        // Declared last, so dropped last: after everything that might still use them.
        namespaces: NetnsGuard,
    }

    impl NodeFixture {
        fn new(test: &str, tag: &str) -> Option<Self> {
            if !root_or_skip(test) {
                return None;
            }
            if !Path::new(PLUGIN_DIR).join("macvlan").is_file() {
                eprintln!("skipping {test}: no CNI plugins in {PLUGIN_DIR}; run e2e/tools/install");
                return None;
            }
            let namespaces = NetnsGuard::new(tag);
            let node_netns = namespaces.add("node");
            let peer_netns = namespaces.add("peer");
            ip(&[
                "-n",
                &node_netns,
                "link",
                "add",
                UNDERLAY_NIC,
                "type",
                "veth",
                "peer",
                "name",
                "peer0",
                "netns",
                &peer_netns,
            ]);
            ip(&["-n", &node_netns, "link", "set", UNDERLAY_NIC, "up"]);
            ip(&["-n", &peer_netns, "link", "set", "peer0", "up"]);
            Some(Self {
                dirs: tempfile::tempdir().expect("temp dir"),
                namespaces,
                node_netns,
            })
        }

        /// Sandboxes whose macvlan attaches to `master`; every pod namespace they may create is
        /// deleted with the fixture.
        fn sandboxes(&self, master: &str, pod: &PodRef) -> Sandboxes {
            let conf_dir = self.dirs.path().join("net.d");
            std::fs::create_dir_all(&conf_dir).expect("conf dir");
            let conflist = json!({
                "cniVersion": "1.0.0",
                "name": "e2e-underlay",
                "plugins": [
                    {
                        "type": "macvlan", "master": master, "mode": "bridge",
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": "192.168.77.0/24",
                                         "rangeStart": "192.168.77.10", "rangeEnd": "192.168.77.20"}]],
                            "dataDir": self.ipam_dir()
                        }
                    },
                    {"type": "tuning", "mtu": 1400}
                ]
            });
            std::fs::write(conf_dir.join("10-underlay.conflist"), conflist.to_string())
                .expect("write conflist");
            let sandboxes = Sandboxes::new(
                "test-node".to_owned(),
                format!("{}-pod", self.namespaces.prefix()),
                conf_dir,
                &self.dirs.path().join("cache"),
                PluginRunner::new(PathBuf::from(PLUGIN_DIR), cni::PLUGIN_TIMEOUT),
            );
            self.namespaces.track(&sandboxes.netns_name(&pod.uid));
            sandboxes
        }

        fn ipam_dir(&self) -> PathBuf {
            self.dirs.path().join("ipam")
        }

        /// Runs `test` on a thread inside the node namespace, as the stand-in itself runs, so
        /// the plugins it starts see the node's links.
        fn run_on_node<F, Fut>(&self, test: F)
        where
            F: FnOnce() -> Fut + Send + 'static,
            Fut: Future<Output = ()>,
        {
            crate::netns::run_in_netns(named_netns_path(&self.node_netns), move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(test());
            })
            .expect("the test inside the node namespace passes");
        }
    }

    fn pod() -> PodRef {
        PodRef {
            namespace: "default".to_owned(),
            name: "web-0".to_owned(),
            uid: "5eed1234-0000-4000-8000-000000000001".to_owned(),
        }
    }

    #[test]
    fn a_sandbox_is_wired_by_the_real_chain_and_torn_down() {
        let Some(fixture) =
            NodeFixture::new("a_sandbox_is_wired_by_the_real_chain_and_torn_down", "ok")
        else {
            return;
        };
        let sandboxes = fixture.sandboxes(UNDERLAY_NIC, &pod());
        let ipam_dir = fixture.ipam_dir();
        fixture.run_on_node(move || async move {
            let record = sandboxes.create(&pod()).await.expect("ADD succeeds");
            assert_eq!(record.container_id.len(), 64);
            assert_eq!(
                record.pod_interface_ips().expect("eth0 addresses"),
                [std::net::IpAddr::from([192, 168, 77, 10])]
            );
            let eth0 = ip(&["-n", &record.netns, "-o", "addr", "show", "dev", POD_IFNAME]);
            assert!(eth0.contains("192.168.77.10/24"), "{eth0}");
            let link = ip(&["-n", &record.netns, "link", "show", POD_IFNAME]);
            assert!(
                link.contains("mtu 1400"),
                "tuning got no prevResult? {link}"
            );
            let lo = ip(&["-n", &record.netns, "link", "show", "lo"]);
            assert!(lo.contains("UP"), "{lo}");
            assert!(sandboxes.is_intact(&record).await);
            assert_eq!(
                sandboxes.load_records().await.expect("records"),
                std::slice::from_ref(&record)
            );
            assert!(ipam_dir.join("e2e-underlay").join("192.168.77.10").exists());

            sandboxes.destroy(&record).await;
            assert!(!netns_is_mounted(&record.netns).await);
            assert!(!named_netns_path(&record.netns).exists());
            assert_eq!(sandboxes.load_records().await.expect("records"), []);
            assert!(
                !ipam_dir.join("e2e-underlay").join("192.168.77.10").exists(),
                "DEL did not release the address"
            );
        });
    }

    #[test]
    fn a_failed_add_reports_the_plugin_error_and_leaves_nothing_behind() {
        let Some(fixture) = NodeFixture::new(
            "a_failed_add_reports_the_plugin_error_and_leaves_nothing_behind",
            "fail",
        ) else {
            return;
        };
        let sandboxes = fixture.sandboxes("missing0", &pod());
        fixture.run_on_node(move || async move {
            let error = sandboxes.create(&pod()).await.expect_err("no such master");
            let message = error.to_string();
            assert!(
                message.starts_with(r#"plugin type="macvlan" name="e2e-underlay" failed (add): "#),
                "{message}"
            );
            // macvlan's own words, passed on verbatim.
            assert!(message.ends_with("Link not found"), "{message}");
            assert!(!named_netns_path(&sandboxes.netns_name(&pod().uid)).exists());
            assert_eq!(sandboxes.load_records().await.expect("records"), []);
        });
    }
}
