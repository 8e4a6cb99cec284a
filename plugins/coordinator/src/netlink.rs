//! The coordinator's only side effects: [`Netlink`] carries out the planner's [`Op`]s and
//! [`Teardown`]s in the node and pod network namespaces. It is the only module that imports
//! `rtnetlink`.
//!
//! The pod's netlink socket is opened on a short-lived thread that has joined the pod netns
//! (`setns` affects one thread only); the socket stays bound to that netns once the thread is
//! gone, so no thread that runs `.await` is ever switched. `/proc/sys` writes for the pod go the
//! same way. Adding what already exists and deleting what is already gone both succeed, except
//! for creating the veth, where an existing link is someone else's.

use std::fs::File;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::thread;

use futures::TryStreamExt;
use ipnet::IpNet;
use nix::sched::{CloneFlags, setns};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkInfo};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::{RouteAttribute, RouteProtocol, RouteScope};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute};
use rtnetlink::{Handle, IpVersion, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::plan::{HostLink, NodeAddress, NodeSnapshot, Op, RouteSpec, Side, Teardown};

const EEXIST: i32 = 17;
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const ENODEV: i32 = 19;
const EADDRNOTAVAIL: i32 = 99;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open network namespace {path}: {source} (is the pod sandbox still running?)")]
    OpenNetns { path: PathBuf, source: io::Error },
    #[error(
        "cannot enter network namespace {path}: {source} (virtnet-coordinator needs \
         CAP_SYS_ADMIN and CAP_NET_ADMIN, which container runtimes give CNI plugins)"
    )]
    EnterNetns { path: PathBuf, source: nix::Error },
    #[error("cannot open a netlink socket: {0} (virtnet-coordinator needs CAP_NET_ADMIN)")]
    Socket(io::Error),
    #[error("cannot start the netlink runtime: {0}")]
    Runtime(io::Error),
    #[error("the thread working inside network namespace {0} panicked")]
    Panicked(PathBuf),
    #[error("the pod network namespace is gone, but {0:?} needs it")]
    NoPodNetns(String),
    #[error("link {name:?} is missing from the {side:?} network namespace")]
    NoSuchLink { side: Side, name: String },
    #[error("cannot write /proc/sys/{key} in the {side:?} network namespace: {source}")]
    Sysctl {
        side: Side,
        key: String,
        source: io::Error,
    },
    #[error("{what} in the {side:?} network namespace cannot be expressed: {reason}")]
    Invalid {
        side: Side,
        what: String,
        reason: String,
    },
    #[error("{what} in the {side:?} network namespace failed: {source}")]
    Request {
        side: Side,
        what: String,
        source: rtnetlink::Error,
    },
}

/// A netlink handle in the node netns and, while it exists, one in the pod netns.
pub struct Netlink {
    runtime: tokio::runtime::Runtime,
    node: Handle,
    pod: Option<PodNetns>,
}

struct PodNetns {
    path: PathBuf,
    file: File,
    handle: Handle,
}

impl Netlink {
    /// Connects in the calling thread's netns (the node) and, when `pod_netns` is given, inside
    /// that netns.
    pub fn open(pod_netns: Option<&Path>) -> Result<Self, NetlinkError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(NetlinkError::Runtime)?;
        let node = connect(&runtime)?;
        let pod = pod_netns
            .map(|path| {
                let file = File::open(path).map_err(|source| NetlinkError::OpenNetns {
                    path: path.to_owned(),
                    source,
                })?;
                let handle = in_netns(path, {
                    let runtime = runtime.handle().clone();
                    move || {
                        let _entered = runtime.enter();
                        let (connection, handle, _) =
                            rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
                        runtime.spawn(connection);
                        Ok(handle)
                    }
                })??;
                Ok::<_, NetlinkError>(PodNetns {
                    path: path.to_owned(),
                    file,
                    handle,
                })
            })
            .transpose()?;
        Ok(Self { runtime, node, pod })
    }

    /// The node's links, with their aliases.
    pub fn host_links(&self) -> Result<Vec<HostLink>, NetlinkError> {
        let links = self.runtime.block_on(self.indexed_links())?;
        Ok(links.into_iter().map(|(_, link)| link).collect())
    }

    /// The node's addresses (with their links' names) and links.
    pub fn node_snapshot(&self) -> Result<NodeSnapshot, NetlinkError> {
        self.runtime.block_on(async {
            let links = self.indexed_links().await?;
            let addresses = self
                .node
                .address()
                .get()
                .execute()
                .try_filter_map(|message| {
                    let link = links
                        .iter()
                        .find(|(index, _)| *index == message.header.index)
                        .map(|(_, link)| link.name.clone())
                        .unwrap_or_default();
                    let address = message
                        .attributes
                        .iter()
                        .find_map(|attribute| match attribute {
                            AddressAttribute::Address(ip) => {
                                IpNet::new(*ip, message.header.prefix_len).ok()
                            }
                            _ => None,
                        });
                    async move { Ok(address.map(|address| NodeAddress { link, address })) }
                })
                .try_collect()
                .await
                .map_err(listing_failed)?;
            Ok(NodeSnapshot {
                addresses,
                links: links.into_iter().map(|(_, link)| link).collect(),
            })
        })
    }

    async fn indexed_links(&self) -> Result<Vec<(u32, HostLink)>, NetlinkError> {
        self.node
            .link()
            .get()
            .execute()
            .map_ok(|link| {
                let (mut name, mut alias) = (String::new(), None);
                for attribute in link.attributes {
                    match attribute {
                        LinkAttribute::IfName(found) => name = found,
                        LinkAttribute::IfAlias(found) => alias = Some(found),
                        _ => {}
                    }
                }
                (link.header.index, HostLink { name, alias })
            })
            .try_collect()
            .await
            .map_err(listing_failed)
    }

    pub fn apply(&self, op: &Op) -> Result<(), NetlinkError> {
        match op {
            Op::AddVeth {
                host,
                host_mac,
                host_alias,
                pod,
                pod_mac,
                mtu,
            } => self.add_veth(host, host_mac, host_alias, pod, pod_mac, *mtu),
            Op::Sysctl { side, key, value } => self.sysctl(*side, key, value),
            Op::AddRoute { side, route } => self.route(*side, route, Mode::Add),
            Op::DelRoute { side, route } => self.route(*side, route, Mode::Del),
            Op::AddNeighbour { side, dev, ip, mac } => {
                let handle = self.handle(*side, "adding a neighbour")?;
                let what = format!("adding neighbour {ip} lladdr {} on {dev}", show_mac(mac));
                self.run(*side, &what, Mode::Add, async {
                    let index = link_index(handle, *side, dev).await?;
                    Ok(handle
                        .neighbours()
                        .add(index, *ip)
                        .link_layer_address(mac)
                        .state(NeighbourState::Permanent)
                        .execute()
                        .await?)
                })
            }
            Op::AddRule { side, from, table } => {
                let handle = self.handle(*side, "adding a rule")?;
                let what = format!("adding rule from {from} lookup {table}");
                let rule = handle
                    .rule()
                    .add()
                    .action(RuleAction::ToTable)
                    .table_id(*table)
                    .priority(*table);
                self.run(*side, &what, Mode::Add, async {
                    match from.addr() {
                        IpAddr::V4(ip) => {
                            rule.v4()
                                .source_prefix(ip, from.prefix_len())
                                .execute()
                                .await?
                        }
                        IpAddr::V6(ip) => {
                            rule.v6()
                                .source_prefix(ip, from.prefix_len())
                                .execute()
                                .await?
                        }
                    }
                    Ok(())
                })
            }
        }
    }

    pub fn teardown(&self, teardown: &Teardown) -> Result<(), NetlinkError> {
        match teardown {
            Teardown::DelLink { side, name } => {
                let handle = self.handle(*side, "deleting a link")?;
                self.run(*side, &format!("deleting link {name}"), Mode::Del, async {
                    let index = link_index(handle, *side, name).await?;
                    Ok(handle.link().del(index).execute().await?)
                })
            }
            Teardown::DelTable { side, table } => {
                let Some(handle) = self.pod_or_node(*side) else {
                    // The pod netns, and the table with it, is already gone.
                    return Ok(());
                };
                self.run(
                    *side,
                    &format!("flushing table {table}"),
                    Mode::Del,
                    async {
                        for version in [IpVersion::V4, IpVersion::V6] {
                            let rules: Vec<_> =
                                handle.rule().get(version).execute().try_collect().await?;
                            for rule in rules.into_iter().filter(|rule| {
                                rule.attributes.contains(&RuleAttribute::Table(*table))
                            }) {
                                ignore_gone(handle.rule().del(rule).execute().await)?;
                            }
                        }
                        let routes: Vec<_> = handle
                            .route()
                            .get(RouteMessageBuilder::<IpAddr>::new().build())
                            .execute()
                            .try_collect()
                            .await?;
                        for route in routes.into_iter().filter(|route| {
                            route.attributes.contains(&RouteAttribute::Table(*table))
                        }) {
                            ignore_gone(handle.route().del(route).execute().await)?;
                        }
                        Ok(())
                    },
                )
            }
        }
    }

    /// Creates the pair in one message, with the pod end born in the pod netns (no temporary
    /// name, no move), both MACs and MTUs set; then brings both ends up, labelling the host end
    /// (the kernel applies an alias only to an existing link, not in the creating message).
    fn add_veth(
        &self,
        host: &str,
        host_mac: &[u8; 6],
        host_alias: &str,
        pod: &str,
        pod_mac: &[u8; 6],
        mtu: Option<u32>,
    ) -> Result<(), NetlinkError> {
        let pod_netns = self
            .pod
            .as_ref()
            .ok_or_else(|| NetlinkError::NoPodNetns(format!("creating {pod}")))?;
        let settings = |mac: &[u8; 6]| {
            let mut attributes = vec![LinkAttribute::Address(mac.to_vec())];
            attributes.extend(mtu.map(LinkAttribute::Mtu));
            attributes
        };
        let mut message = LinkVeth::new(host, pod).build();
        message.attributes.extend(settings(host_mac));
        for attribute in &mut message.attributes {
            if let LinkAttribute::LinkInfo(infos) = attribute {
                for info in infos {
                    if let LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))) = info {
                        peer.attributes.extend(settings(pod_mac));
                        peer.attributes
                            .push(LinkAttribute::NetNsFd(pod_netns.file.as_raw_fd()));
                    }
                }
            }
        }
        let what = format!("creating veth {host} with {pod} in the pod");
        self.run(Side::Node, &what, Mode::Create, async {
            self.node.link().add(message).execute().await?;
            for (handle, side, name, alias) in [
                (&self.node, Side::Node, host, Some(host_alias)),
                (&pod_netns.handle, Side::Pod, pod, None),
            ] {
                let index = link_index(handle, side, name).await?;
                let mut message = LinkUnspec::new_with_index(index).up().build();
                message
                    .attributes
                    .extend(alias.map(|alias| LinkAttribute::IfAlias(alias.to_owned())));
                handle.link().set(message).execute().await?;
            }
            Ok(())
        })
    }

    /// Adds (`Mode::Add`) or deletes (`Mode::Del`) one route.
    fn route(&self, side: Side, route: &RouteSpec, mode: Mode) -> Result<(), NetlinkError> {
        let verb = match mode {
            Mode::Del => "deleting",
            Mode::Create | Mode::Add => "adding",
        };
        let handle = self.handle(side, &format!("{verb} a route"))?;
        let what = format!(
            "{verb} route {}{} dev {}{}{}",
            route.dst,
            route
                .via
                .map(|via| format!(" via {via}"))
                .unwrap_or_default(),
            route.dev,
            route
                .src
                .map(|src| format!(" src {src}"))
                .unwrap_or_default(),
            route
                .table
                .map(|table| format!(" table {table}"))
                .unwrap_or_default(),
        );
        self.run(side, &what, mode, async {
            let index = link_index(handle, side, &route.dev).await?;
            let invalid = |error: &dyn std::error::Error| Failure::Invalid(error.to_string());
            let mut builder = RouteMessageBuilder::<IpAddr>::new()
                .destination_prefix(route.dst.addr(), route.dst.prefix_len())
                .map_err(|error| invalid(&error))?
                .output_interface(index);
            builder = match route.via {
                Some(via) => builder.gateway(via).map_err(|error| invalid(&error))?,
                None if matches!(mode, Mode::Del) => builder,
                None => builder.scope(RouteScope::Link),
            };
            if let Some(src) = route.src {
                builder = builder.pref_source(src).map_err(|error| invalid(&error))?;
            }
            if let Some(table) = route.table {
                builder = builder.table_id(table);
            }
            match mode {
                // Whoever added it chose the protocol (the reference plugins' `boot`); an
                // unspecified one matches any.
                Mode::Del => Ok(handle
                    .route()
                    .del(builder.protocol(RouteProtocol::Unspec).build())
                    .execute()
                    .await?),
                Mode::Create | Mode::Add => {
                    Ok(handle.route().add(builder.build()).execute().await?)
                }
            }
        })
    }

    fn sysctl(&self, side: Side, key: &str, value: &'static str) -> Result<(), NetlinkError> {
        let path = Path::new("/proc/sys").join(key);
        let error = |source| NetlinkError::Sysctl {
            side,
            key: key.to_owned(),
            source,
        };
        match side {
            Side::Node => std::fs::write(&path, value).map_err(error),
            Side::Pod => {
                let netns = self
                    .pod
                    .as_ref()
                    .ok_or_else(|| NetlinkError::NoPodNetns(format!("writing {key}")))?;
                in_netns(&netns.path, move || std::fs::write(&path, value))?.map_err(error)
            }
        }
    }

    fn pod_or_node(&self, side: Side) -> Option<&Handle> {
        match side {
            Side::Node => Some(&self.node),
            Side::Pod => self.pod.as_ref().map(|pod| &pod.handle),
        }
    }

    fn handle(&self, side: Side, what: &str) -> Result<&Handle, NetlinkError> {
        self.pod_or_node(side)
            .ok_or_else(|| NetlinkError::NoPodNetns(what.to_owned()))
    }

    /// Runs one request, mapping "already there" (adds) and "already gone" (deletes) to success.
    fn run(
        &self,
        side: Side,
        what: &str,
        mode: Mode,
        request: impl Future<Output = Result<(), Failure>>,
    ) -> Result<(), NetlinkError> {
        tracing::debug!(?side, "{what}");
        match (self.runtime.block_on(request), mode) {
            (Ok(()), _) => Ok(()),
            (Err(Failure::Netlink(error)), Mode::Add) if errno(&error) == Some(EEXIST) => Ok(()),
            (Err(Failure::Netlink(error)), Mode::Del) if is_gone(&error) => Ok(()),
            (Err(Failure::NoSuchLink { .. }), Mode::Del) => Ok(()),
            (Err(Failure::Netlink(source)), _) => Err(NetlinkError::Request {
                side,
                what: what.to_owned(),
                source,
            }),
            (Err(Failure::NoSuchLink { side, name }), _) => {
                Err(NetlinkError::NoSuchLink { side, name })
            }
            (Err(Failure::Invalid(reason)), _) => Err(NetlinkError::Invalid {
                side,
                what: what.to_owned(),
                reason,
            }),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Creating a link: an existing one is not ours.
    Create,
    Add,
    Del,
}

enum Failure {
    Netlink(rtnetlink::Error),
    NoSuchLink { side: Side, name: String },
    Invalid(String),
}

impl From<rtnetlink::Error> for Failure {
    fn from(error: rtnetlink::Error) -> Self {
        Self::Netlink(error)
    }
}

fn listing_failed(source: rtnetlink::Error) -> NetlinkError {
    NetlinkError::Request {
        side: Side::Node,
        what: "listing links and addresses".to_owned(),
        source,
    }
}

fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => Some(message.raw_code().abs()),
        _ => None,
    }
}

fn is_gone(error: &rtnetlink::Error) -> bool {
    matches!(errno(error), Some(ENOENT | ESRCH | ENODEV | EADDRNOTAVAIL))
}

fn ignore_gone(result: Result<(), rtnetlink::Error>) -> Result<(), Failure> {
    match result {
        Err(error) if !is_gone(&error) => Err(error.into()),
        _ => Ok(()),
    }
}

async fn link_index(handle: &Handle, side: Side, name: &str) -> Result<u32, Failure> {
    let found = handle
        .link()
        .get()
        .match_name(name)
        .execute()
        .try_next()
        .await;
    match found {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) => Err(Failure::NoSuchLink {
            side,
            name: name.to_owned(),
        }),
        Err(error) if is_gone(&error) => Err(Failure::NoSuchLink {
            side,
            name: name.to_owned(),
        }),
        Err(error) => Err(error.into()),
    }
}

fn connect(runtime: &tokio::runtime::Runtime) -> Result<Handle, NetlinkError> {
    let _entered = runtime.enter();
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
    runtime.spawn(connection);
    Ok(handle)
}

/// Runs `work` on a dedicated thread that has joined the netns at `path`.
pub(crate) fn in_netns<T: Send + 'static>(
    path: &Path,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetlinkError> {
    let thread_path = path.to_owned();
    thread::spawn(move || {
        let netns = File::open(&thread_path).map_err(|source| NetlinkError::OpenNetns {
            path: thread_path.clone(),
            source,
        })?;
        setns(&netns, CloneFlags::CLONE_NEWNET).map_err(|source| NetlinkError::EnterNetns {
            path: thread_path.clone(),
            source,
        })?;
        Ok(work())
    })
    .join()
    .map_err(|_| NetlinkError::Panicked(path.to_owned()))?
}

pub(crate) fn show_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
