//! `virtnet inspect`: who holds which address, how full each Subnet and pool is, and what
//! looks wrong (Endpoints whose owner is gone, pool records no Endpoint accounts for), for the
//! cluster in KUBECONFIG. Also runs as the kubectl plugin `kubectl virtnet inspect` (install
//! the binary as `kubectl-virtnet`). Everything is decided on one [`ClusterSnapshot`] by pure
//! functions; only [`run`] talks to the API server.

use std::fmt::Write as _;
use std::net::IpAddr;

use clap::{Args, Subcommand, ValueEnum};
use ipnet::IpNet;
use kube::{Client, ResourceExt};
use serde::Serialize;
use virtnet_cni::agent_api::ApiRoute;

use crate::agent::plan::workload_routes;
use crate::crd::{Endpoint, IPAM_CLAIM_KIND};
use crate::store::StoreError;
use crate::store::parse::{ParseError, holder_name, interface_addresses, pool_allocations};
use crate::store::snapshot::ClusterSnapshot;

#[derive(Args)]
pub struct InspectArgs {
    #[command(subcommand)]
    pub target: Option<InspectTarget>,
    /// How to print: aligned tables, or one JSON document.
    #[arg(short, long, value_enum, default_value_t, global = true)]
    pub output: OutputFormat,
}

#[derive(Subcommand)]
pub enum InspectTarget {
    /// One pod's interfaces: network, Subnet, pool, address, gateway and the routes it got.
    Pod {
        /// The pod, as NAMESPACE/NAME.
        pod: String,
    },
}

#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum OutputFormat {
    #[default]
    Table,
    Json,
}

/// What `virtnet inspect` could not do.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("could not reach the cluster: {0}; point KUBECONFIG at it")]
    Connect(#[source] kube::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0:?} is not NAMESPACE/NAME: write the pod like default/web-0")]
    PodName(String),
    #[error("pod {0} does not exist")]
    NoSuchPod(String),
    #[error(
        "pod {0} holds no VirtNet address: no Endpoint names its UID (its NADs or the default \
         network do not use virtnet-ipam, or its ADD has not run yet)"
    )]
    NoAddress(String),
    #[error("could not print JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Fill of one pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolUsage {
    pub name: String,
    pub total: i64,
    pub allocated: usize,
    pub draining: bool,
}

/// Fill of one Subnet and its pools.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SubnetUsage {
    pub name: String,
    pub cidr: String,
    pub total: i64,
    pub allocated: usize,
    pub free: i64,
    pub pools: Vec<PoolUsage>,
}

/// One allocated address and who holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Holder {
    pub address: IpAddr,
    pub subnet: String,
    pub pool: String,
    /// The Endpoint as `namespace/name`.
    pub endpoint: String,
    /// `Pod`, `StatefulSet`, `VirtualMachine` or `IPAMClaim` (empty when no Endpoint exists).
    pub owner_kind: String,
    pub owner_name: String,
    pub node: String,
    pub interface: String,
    pub network: Option<String>,
}

/// Something the snapshot shows that should not last.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Finding {
    /// An Endpoint whose owner (pod, StatefulSet, VM or IPAMClaim) no longer exists; the
    /// controller releases it after its grace period.
    OwnerGone {
        endpoint: String,
        owner_kind: String,
        owner_name: String,
    },
    /// A pool record no Endpoint accounts for; the controller's sweep frees it after its grace.
    Unrecorded {
        pool: String,
        address: IpAddr,
        endpoint: String,
    },
    /// An object VirtNet cannot read as it is.
    Malformed { message: String },
}

/// The whole cluster's view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Overview {
    pub subnets: Vec<SubnetUsage>,
    pub holders: Vec<Holder>,
    pub findings: Vec<Finding>,
}

/// One address of one pod interface, with what the pod got with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceAddress {
    pub interface: String,
    pub network: Option<String>,
    pub network_attachment: Option<String>,
    /// The IPAMClaim that holds the address (persistent across the VM's pods), if any.
    pub claim: Option<String>,
    pub subnet: String,
    pub pool: String,
    pub address: IpNet,
    pub gateway: Option<IpAddr>,
    pub routes: Vec<ApiRoute>,
}

/// `virtnet inspect pod`'s answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodReport {
    pub pod: String,
    pub node: String,
    /// Endpoints naming the pod (`namespace/name`): its own, a VM's or an IPAMClaim's.
    pub endpoints: Vec<String>,
    pub interfaces: Vec<InterfaceAddress>,
}

/// Reads the cluster in KUBECONFIG and prints what `args` asks for.
pub async fn run(args: InspectArgs) -> Result<String, InspectError> {
    let client = Client::try_default().await.map_err(InspectError::Connect)?;
    let snapshot = ClusterSnapshot::read(&client).await?;
    match (args.target, args.output) {
        (None, OutputFormat::Table) => Ok(overview_table(&overview(&snapshot))),
        (None, OutputFormat::Json) => Ok(serde_json::to_string_pretty(&overview(&snapshot))?),
        (Some(InspectTarget::Pod { pod }), output) => {
            let report = pod_report(&snapshot, &pod)?;
            match output {
                OutputFormat::Table => Ok(pod_table(&report)),
                OutputFormat::Json => Ok(serde_json::to_string_pretty(&report)?),
            }
        }
    }
}

/// Whether the workload `endpoint` was written for still exists: the owner object for a sticky
/// address, the pod (by UID) otherwise.
fn owner_exists(snapshot: &ClusterSnapshot, endpoint: &Endpoint) -> bool {
    let spec = &endpoint.spec;
    let sticky_owner = spec.sticky
        && ["StatefulSet", "VirtualMachine", IPAM_CLAIM_KIND].contains(&spec.owner_kind.as_str());
    if sticky_owner {
        let namespace = endpoint.namespace().unwrap_or_default();
        snapshot
            .owners
            .exists(&spec.owner_kind, &namespace, &spec.owner_name)
    } else {
        snapshot.owners.pod_uids.contains(&spec.pod_uid)
    }
}

/// Whether `endpoint` records `address` on `interface` in `pool` (a malformed Endpoint records
/// nothing here: the overview reports it as malformed).
fn records(endpoint: &Endpoint, interface: &str, pool: &str, address: IpAddr) -> bool {
    endpoint
        .spec
        .interfaces
        .iter()
        .filter(|entry| entry.interface == interface)
        .filter_map(|entry| interface_addresses(endpoint, entry).ok())
        .flatten()
        .any(|recorded| recorded.pool == pool && recorded.address == address)
}

/// Fill, holders and findings of the whole snapshot.
pub fn overview(snapshot: &ClusterSnapshot) -> Overview {
    let mut findings = Vec::new();
    let mut holders = Vec::new();
    let mut subnets: Vec<SubnetUsage> = snapshot
        .subnets
        .iter()
        .map(|subnet| SubnetUsage {
            name: subnet.name_any(),
            cidr: subnet.spec.subnet.clone(),
            total: subnet
                .status
                .as_ref()
                .map_or(0, |status| status.total_ip_count),
            allocated: 0,
            free: 0,
            pools: Vec::new(),
        })
        .collect();
    for pool in &snapshot.pools {
        let allocations = match pool_allocations(pool) {
            Ok(allocations) => allocations,
            Err(error) => {
                findings.push(malformed(&error));
                continue;
            }
        };
        let name = pool.name_any();
        for (address, record) in &allocations {
            let endpoint = snapshot
                .endpoints
                .iter()
                .find(|endpoint| holder_name(endpoint) == record.endpoint);
            if !endpoint
                .is_some_and(|endpoint| records(endpoint, &record.interface, &name, *address))
            {
                findings.push(Finding::Unrecorded {
                    pool: name.clone(),
                    address: *address,
                    endpoint: record.endpoint.clone(),
                });
            }
            holders.push(Holder {
                address: *address,
                subnet: pool.spec.subnet.clone(),
                pool: name.clone(),
                endpoint: record.endpoint.clone(),
                owner_kind: endpoint
                    .map(|e| e.spec.owner_kind.clone())
                    .unwrap_or_default(),
                owner_name: endpoint
                    .map(|e| e.spec.owner_name.clone())
                    .unwrap_or_default(),
                node: record.node.clone(),
                interface: record.interface.clone(),
                network: record.network.clone(),
            });
        }
        if let Some(subnet) = subnets.iter_mut().find(|s| s.name == pool.spec.subnet) {
            subnet.allocated += allocations.len();
            subnet.pools.push(PoolUsage {
                name,
                total: pool
                    .status
                    .as_ref()
                    .map_or(0, |status| status.total_ip_count),
                allocated: allocations.len(),
                draining: pool.spec.draining,
            });
        }
    }
    for subnet in &mut subnets {
        subnet.free = subnet.total - i64::try_from(subnet.allocated).unwrap_or(i64::MAX);
    }
    for endpoint in &snapshot.endpoints {
        if let Err(error) = crate::store::parse::endpoint_addresses(endpoint) {
            findings.push(malformed(&error));
        }
        if !owner_exists(snapshot, endpoint) {
            findings.push(Finding::OwnerGone {
                endpoint: holder_name(endpoint),
                owner_kind: endpoint.spec.owner_kind.clone(),
                owner_name: endpoint.spec.owner_name.clone(),
            });
        }
    }
    holders.sort_by(|a, b| (&a.subnet, a.address).cmp(&(&b.subnet, b.address)));
    Overview {
        subnets,
        holders,
        findings,
    }
}

fn malformed(error: &ParseError) -> Finding {
    Finding::Malformed {
        message: error.to_string(),
    }
}

/// The interfaces of pod `name` (`NAMESPACE/NAME`) as its Endpoints record them.
pub fn pod_report(snapshot: &ClusterSnapshot, name: &str) -> Result<PodReport, InspectError> {
    let (namespace, pod_name) = name
        .split_once('/')
        .filter(|(namespace, pod)| !namespace.is_empty() && !pod.is_empty())
        .ok_or_else(|| InspectError::PodName(name.to_owned()))?;
    let pod = snapshot
        .pods
        .iter()
        .find(|pod| pod.namespace().as_deref() == Some(namespace) && pod.name_any() == pod_name)
        .ok_or_else(|| InspectError::NoSuchPod(name.to_owned()))?;
    let uid = pod.uid().unwrap_or_default();
    let endpoints: Vec<&Endpoint> = snapshot
        .endpoints
        .iter()
        .filter(|endpoint| {
            endpoint.namespace().as_deref() == Some(namespace) && endpoint.spec.pod_uid == uid
        })
        .collect();
    if endpoints.is_empty() {
        return Err(InspectError::NoAddress(name.to_owned()));
    }
    let subnet_of = |pool: &str| {
        snapshot
            .pools
            .iter()
            .find(|candidate| candidate.name_any() == pool)
            .map(|pool| pool.spec.subnet.clone())
            .unwrap_or_default()
    };
    let mut interfaces = Vec::new();
    for endpoint in &endpoints {
        let claim =
            (endpoint.spec.owner_kind == IPAM_CLAIM_KIND).then(|| endpoint.spec.owner_name.clone());
        for entry in &endpoint.spec.interfaces {
            for recorded in interface_addresses(endpoint, entry).map_err(StoreError::from)? {
                let subnet = subnet_of(&recorded.pool);
                let routes = recorded.gateway.map_or_else(Vec::new, |gateway| {
                    let spec = snapshot.subnets.iter().find(|s| s.name_any() == subnet);
                    workload_routes(recorded.address, gateway, spec)
                });
                interfaces.push(InterfaceAddress {
                    interface: entry.interface.clone(),
                    network: entry.network.clone(),
                    network_attachment: entry.network_attachment.clone(),
                    claim: claim.clone(),
                    subnet,
                    pool: recorded.pool,
                    address: recorded.cidr,
                    gateway: recorded.gateway,
                    routes,
                });
            }
        }
    }
    interfaces.sort_by(|a, b| (&a.interface, a.address).cmp(&(&b.interface, b.address)));
    Ok(PodReport {
        pod: name.to_owned(),
        node: pod
            .spec
            .as_ref()
            .and_then(|spec| spec.node_name.clone())
            .unwrap_or_default(),
        endpoints: endpoints
            .iter()
            .map(|endpoint| holder_name(endpoint))
            .collect(),
        interfaces,
    })
}

/// Rows under a header, each column as wide as its widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..header.len())
        .map(|column| {
            rows.iter()
                .map(|row| row[column].len())
                .chain([header[column].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

fn or_dash(value: Option<&str>) -> String {
    value
        .filter(|value| !value.is_empty())
        .unwrap_or("-")
        .to_owned()
}

pub fn overview_table(overview: &Overview) -> String {
    let mut usage = Vec::new();
    for subnet in &overview.subnets {
        usage.push(vec![
            subnet.name.clone(),
            "-".to_owned(),
            subnet.cidr.clone(),
            subnet.total.to_string(),
            subnet.allocated.to_string(),
            subnet.free.to_string(),
        ]);
        for pool in &subnet.pools {
            usage.push(vec![
                subnet.name.clone(),
                pool.name.clone() + if pool.draining { " (draining)" } else { "" },
                String::new(),
                pool.total.to_string(),
                pool.allocated.to_string(),
                (pool.total - i64::try_from(pool.allocated).unwrap_or(i64::MAX)).to_string(),
            ]);
        }
    }
    let holders: Vec<Vec<String>> = overview
        .holders
        .iter()
        .map(|holder| {
            vec![
                holder.address.to_string(),
                holder.subnet.clone(),
                holder.pool.clone(),
                format!("{}/{}", or_dash(Some(&holder.owner_kind)), holder.endpoint),
                holder.node.clone(),
                holder.interface.clone(),
                or_dash(holder.network.as_deref()),
            ]
        })
        .collect();
    let mut out = table(&["SUBNET", "POOL", "CIDR", "TOTAL", "USED", "FREE"], &usage);
    out.push('\n');
    out += &table(
        &[
            "ADDRESS",
            "SUBNET",
            "POOL",
            "HOLDER",
            "NODE",
            "INTERFACE",
            "NETWORK",
        ],
        &holders,
    );
    out.push('\n');
    if overview.findings.is_empty() {
        out += "No problems found.\n";
    }
    for finding in &overview.findings {
        let _ = match finding {
            Finding::OwnerGone {
                endpoint,
                owner_kind,
                owner_name,
            } => writeln!(
                out,
                "Endpoint {endpoint}: its {owner_kind} {owner_name} is gone (the controller \
                 releases it after its grace period)"
            ),
            Finding::Unrecorded {
                pool,
                address,
                endpoint,
            } => writeln!(
                out,
                "IPPool {pool}: {address} is recorded for Endpoint {endpoint}, which does not \
                 record it (the controller's sweep frees it after its grace period)"
            ),
            Finding::Malformed { message } => writeln!(out, "{message}"),
        };
    }
    out
}

pub fn pod_table(report: &PodReport) -> String {
    let rows: Vec<Vec<String>> = report
        .interfaces
        .iter()
        .map(|entry| {
            let routes: Vec<String> = entry
                .routes
                .iter()
                .map(|route| match route.gw {
                    Some(gw) => format!("{} via {gw}", route.dst),
                    None => route.dst.to_string(),
                })
                .collect();
            vec![
                entry.interface.clone(),
                or_dash(
                    entry
                        .network_attachment
                        .as_deref()
                        .or(entry.network.as_deref()),
                ),
                entry.subnet.clone(),
                entry.pool.clone(),
                entry.address.to_string(),
                entry
                    .gateway
                    .map_or_else(|| "-".to_owned(), |gw| gw.to_string()),
                routes.join(", "),
            ]
        })
        .collect();
    format!(
        "Pod {} on node {} (Endpoint {})\n\n{}",
        report.pod,
        or_dash(Some(&report.node)),
        report.endpoints.join(", "),
        table(
            &[
                "INTERFACE",
                "NETWORK",
                "SUBNET",
                "POOL",
                "ADDRESS",
                "GATEWAY",
                "ROUTES"
            ],
            &rows
        )
    )
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    use super::*;
    use crate::crd::{IpPool, Subnet};

    fn parsed<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
        serde_json::from_value(value).expect("test object deserializes")
    }

    fn endpoint(
        name: &str,
        uid: &str,
        kind: &str,
        owner: &str,
        sticky: bool,
        ip: &str,
    ) -> Endpoint {
        parsed(json!({
            "apiVersion": "virtnet.io/v1alpha1", "kind": "Endpoint",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"interfaces": [{"interface": "net1", "ipv4Pool": "lan-0", "ipv4": ip,
                                     "ipv4Gateway": "10.6.0.1", "network": "lan",
                                     "networkAttachment": "default/lan"}],
                     "ownerKind": kind, "ownerName": owner, "node": "node-1",
                     "podUID": uid, "containerID": "c1", "sticky": sticky},
        }))
    }

    fn record(endpoint: &str) -> serde_json::Value {
        json!({"endpoint": endpoint, "interface": "net1", "podUID": "u", "node": "node-1",
               "network": "lan"})
    }

    fn snapshot() -> ClusterSnapshot {
        let subnet: Subnet = parsed(json!({
            "apiVersion": "virtnet.io/v1alpha1", "kind": "Subnet", "metadata": {"name": "lan"},
            "spec": {"subnet": "10.6.0.0/16", "ips": ["10.6.1.1-10.6.1.10"],
                     "routes": [{"dst": "10.7.0.0/16", "gw": "10.6.0.254"}]},
            "status": {"totalIPCount": 10, "allocatedIPCount": 3},
        }));
        let pool: IpPool = parsed(json!({
            "apiVersion": "virtnet.io/v1alpha1", "kind": "IPPool",
            "metadata": {"name": "lan-0", "resourceVersion": "7"},
            "spec": {"subnet": "lan", "cidr": "10.6.0.0/16", "ips": ["10.6.1.1-10.6.1.10"]},
            "status": {"allocations": {"10.6.1.1": record("default/web"),
                                       "10.6.1.2": record("default/db"),
                                       "10.6.1.3": record("default/lost")},
                       "totalIPCount": 10},
        }));
        let pod: Pod = parsed(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "uid-web"},
            "spec": {"nodeName": "node-1", "containers": []},
        }));
        let mut snapshot = ClusterSnapshot {
            subnets: vec![subnet],
            pools: vec![pool],
            endpoints: vec![
                endpoint("web", "uid-web", "Pod", "web", false, "10.6.1.1/16"),
                // A StatefulSet replica whose StatefulSet was deleted.
                endpoint("db", "uid-db", "StatefulSet", "db", true, "10.6.1.2/16"),
            ],
            pods: vec![pod],
            ..ClusterSnapshot::default()
        };
        snapshot.owners.pod_uids.insert("uid-web".to_owned());
        snapshot
    }

    #[test]
    fn the_overview_counts_holders_and_flags_gone_owners_and_unrecorded_addresses() {
        let overview = overview(&snapshot());
        assert_eq!(overview.subnets.len(), 1);
        let lan = &overview.subnets[0];
        assert_eq!((lan.total, lan.allocated, lan.free), (10, 3, 7));
        assert_eq!(lan.pools[0].allocated, 3);
        let held: Vec<(String, &str)> = overview
            .holders
            .iter()
            .map(|holder| (holder.address.to_string(), holder.owner_kind.as_str()))
            .collect();
        assert_eq!(
            held,
            [
                ("10.6.1.1".to_owned(), "Pod"),
                ("10.6.1.2".to_owned(), "StatefulSet"),
                ("10.6.1.3".to_owned(), "")
            ]
        );
        assert_eq!(
            overview.findings,
            [
                Finding::Unrecorded {
                    pool: "lan-0".into(),
                    address: "10.6.1.3".parse().expect("address"),
                    endpoint: "default/lost".into(),
                },
                Finding::OwnerGone {
                    endpoint: "default/db".into(),
                    owner_kind: "StatefulSet".into(),
                    owner_name: "db".into(),
                },
            ]
        );
        let table = overview_table(&overview);
        assert!(table.contains("lan-0"), "{table}");
        assert!(table.contains("its StatefulSet db is gone"), "{table}");
    }

    #[test]
    fn a_pod_report_lists_each_address_with_its_subnet_pool_and_routes() {
        let report = pod_report(&snapshot(), "default/web").expect("the pod has an Endpoint");
        assert_eq!(report.node, "node-1");
        assert_eq!(report.endpoints, ["default/web"]);
        let entry = &report.interfaces[0];
        assert_eq!(
            (entry.subnet.as_str(), entry.pool.as_str()),
            ("lan", "lan-0")
        );
        assert_eq!(entry.address.to_string(), "10.6.1.1/16");
        let routes: Vec<String> = entry
            .routes
            .iter()
            .map(|route| format!("{} {:?}", route.dst, route.gw))
            .collect();
        assert_eq!(
            routes,
            [
                "0.0.0.0/0 Some(10.6.0.1)".to_owned(),
                "10.7.0.0/16 Some(10.6.0.254)".to_owned()
            ]
        );
        assert_eq!(entry.claim, None);
        let table = pod_table(&report);
        assert!(table.contains("default/lan"), "{table}");
        // A VM's interface whose address an IPAMClaim holds names the claim.
        let mut claimed = snapshot();
        claimed.endpoints.push(endpoint(
            "vm1.lan",
            "uid-web",
            IPAM_CLAIM_KIND,
            "vm1.lan",
            true,
            "10.6.1.4/16",
        ));
        let report = pod_report(&claimed, "default/web").expect("the pod has Endpoints");
        let claims: Vec<Option<&str>> = report
            .interfaces
            .iter()
            .map(|entry| entry.claim.as_deref())
            .collect();
        assert_eq!(claims, [None, Some("vm1.lan")]);
        assert!(matches!(
            pod_report(&snapshot(), "web"),
            Err(InspectError::PodName(_))
        ));
        assert!(matches!(
            pod_report(&snapshot(), "default/nope"),
            Err(InspectError::NoSuchPod(_))
        ));
    }
}
