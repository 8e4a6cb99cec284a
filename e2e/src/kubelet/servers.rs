//! A pod's "containers": for every TCP port the pod declares, a server inside the pod's network
//! namespace that answers each connection with the pod's name and closes it, so tests can
//! check which pod an address really reaches.
use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, TcpListener as StdTcpListener},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use nix::errno::Errno;
use tokio::{io::AsyncWriteExt, net::TcpListener, task::AbortHandle};
use tracing::{debug, warn};

use super::error::ServerError;
use crate::netns::{named_netns_path, run_in_netns};

/// How long an accept loop rests after an error (e.g. out of file descriptors) before retrying.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// The TCP ports declared by the pod's containers, each once, in ascending order.
pub fn declared_tcp_ports(pod: &Pod) -> Vec<u16> {
    let mut ports: Vec<u16> = pod
        .spec
        .iter()
        .flat_map(|spec| &spec.containers)
        .flat_map(|container| container.ports.iter().flatten())
        .filter(|port| port.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|port| u16::try_from(port.container_port).ok())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The running servers of one pod (none for a pod without ports); dropping this stops them
/// and frees the ports.
#[derive(Debug, Default)]
pub struct PodServers {
    accept_loops: Vec<AbortHandle>,
}

impl Drop for PodServers {
    fn drop(&mut self) {
        for accept_loop in &self.accept_loops {
            accept_loop.abort();
        }
    }
}

/// Listens on every port in `netns` (all addresses, IPv4 and IPv6) and answers with `greeting`.
pub async fn start(
    netns: &str,
    ports: &[u16],
    greeting: String,
) -> Result<PodServers, ServerError> {
    let path = named_netns_path(netns);
    let ports_to_bind = ports.to_vec();
    let bound = tokio::task::spawn_blocking(move || {
        run_in_netns(path, move || {
            ports_to_bind
                .into_iter()
                .map(|port| bind(port).map_err(|source| (port, source)))
                .collect::<Result<Vec<_>, _>>()
        })
    })
    .await
    .map_err(|_| ServerError::BindThread {
        netns: netns.to_owned(),
    })??
    .map_err(|(port, source)| ServerError::Listen {
        netns: netns.to_owned(),
        port,
        source,
    })?;
    let greeting: Arc<str> = Arc::from(greeting);
    let mut servers = PodServers {
        accept_loops: Vec::with_capacity(bound.len()),
    };
    for listener in bound {
        let listener = TcpListener::from_std(listener).map_err(|source| ServerError::Register {
            netns: netns.to_owned(),
            source,
        })?;
        let task = tokio::spawn(answer_connections(listener, Arc::clone(&greeting)));
        servers.accept_loops.push(task.abort_handle());
    }
    Ok(servers)
}

/// One dual-stack socket on `[::]`; plain `0.0.0.0` when the pod has IPv6 disabled.
fn bind(port: u16) -> io::Result<StdTcpListener> {
    let listener = match StdTcpListener::bind((Ipv6Addr::UNSPECIFIED, port)) {
        Err(error)
            if error.raw_os_error() == Some(Errno::EAFNOSUPPORT as i32)
                || error.raw_os_error() == Some(Errno::EADDRNOTAVAIL as i32) =>
        {
            StdTcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?
        }
        bound => bound?,
    };
    // Tokio requires it; the socket was made on a thread outside the runtime.
    listener.set_nonblocking(true)?;
    Ok(listener)
}

async fn answer_connections(listener: TcpListener, greeting: Arc<str>) {
    loop {
        match listener.accept().await {
            Ok((mut stream, peer)) => {
                debug!(%peer, "answering a connection");
                let greeting = Arc::clone(&greeting);
                tokio::spawn(async move {
                    // A client that went away early is its own problem.
                    let _ = stream.write_all(greeting.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
            Err(error) => {
                warn!(%error, "accepting a connection failed");
                tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Read,
        net::{IpAddr, SocketAddr, TcpStream},
    };

    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec};

    use super::*;
    use crate::kubelet::test_support::{NetnsGuard, root_or_skip};

    fn port(number: i32, protocol: Option<&str>) -> ContainerPort {
        ContainerPort {
            container_port: number,
            protocol: protocol.map(str::to_owned),
            ..ContainerPort::default()
        }
    }

    #[test]
    fn tcp_ports_of_all_containers_are_served_once() {
        let container = |ports| Container {
            ports: Some(ports),
            ..Container::default()
        };
        let pod = Pod {
            spec: Some(PodSpec {
                containers: vec![
                    container(vec![
                        port(8080, None),
                        port(53, Some("UDP")),
                        port(80, Some("TCP")),
                    ]),
                    container(vec![port(8080, Some("TCP")), port(9999, Some("SCTP"))]),
                    Container::default(),
                ],
                ..PodSpec::default()
            }),
            ..Pod::default()
        };
        assert_eq!(declared_tcp_ports(&pod), [80, 8080]);
        assert!(declared_tcp_ports(&Pod::default()).is_empty());
    }

    fn greeting_from(netns: &str, address: SocketAddr) -> io::Result<String> {
        run_in_netns(named_netns_path(netns), move || {
            let mut reply = String::new();
            TcpStream::connect(address)?.read_to_string(&mut reply)?;
            Ok(reply)
        })
        .expect("enter the test namespace")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn servers_answer_inside_the_pod_namespace_only_while_running() {
        if !root_or_skip("servers_answer_inside_the_pod_namespace_only_while_running") {
            return;
        }
        let namespaces = NetnsGuard::new("srv");
        let pod_netns = namespaces.add("pod");
        let servers = start(&pod_netns, &[8080, 9090], "web-0\n".to_owned())
            .await
            .expect("start servers");
        for address in [
            IpAddr::from(Ipv4Addr::LOCALHOST),
            IpAddr::from(Ipv6Addr::LOCALHOST),
        ] {
            for port in [8080, 9090] {
                let reply = greeting_from(&pod_netns, SocketAddr::new(address, port))
                    .expect("the server answers");
                assert_eq!(reply, "web-0\n");
            }
        }
        let busy = start(&pod_netns, &[8080], "again\n".to_owned()).await;
        assert!(
            matches!(busy, Err(ServerError::Listen { port: 8080, .. })),
            "{busy:?}"
        );

        drop(servers);
        // Aborted tasks drop their listeners on the next scheduler turn.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let refused = greeting_from(&pod_netns, SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)));
        assert!(refused.is_err(), "still answering after stop: {refused:?}");
    }
}
