//! The loopback forwarder: lets the test process and kubectl in the root namespace reach the
//! apiserver without a single address or route being added there.
//!
//! It listens on 127.0.0.1 in the root namespace and, per connection, dials the apiserver from a
//! thread that joined the control-plane namespace; the connected socket stays in that namespace
//! and is then driven by tokio like any other.
use std::{
    net::{SocketAddr, TcpStream as StdTcpStream},
    path::PathBuf,
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};

use crate::netns::{NetnsError, run_in_netns};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The forwarder could not accept or connect.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot accept connections: {0}")]
    Accept(std::io::Error),
    #[error("cannot connect to {upstream} inside {netns}: {source} (is the apiserver running?)")]
    Connect {
        upstream: SocketAddr,
        netns: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("the connecting thread was cancelled: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Forwards every connection accepted on `listener` to `upstream` inside namespace `netns`.
/// Runs until the process is stopped; one failed connection never stops the others.
pub async fn serve(
    listener: TcpListener,
    netns: PathBuf,
    upstream: SocketAddr,
) -> Result<(), ForwardError> {
    loop {
        let (client, peer) = listener.accept().await.map_err(ForwardError::Accept)?;
        let netns = netns.clone();
        tokio::spawn(async move {
            if let Err(error) = forward_one(client, netns, upstream).await {
                tracing::warn!(%peer, %error, "forwarding failed");
            }
        });
    }
}

async fn forward_one(
    mut client: TcpStream,
    netns: PathBuf,
    upstream: SocketAddr,
) -> Result<(), ForwardError> {
    let mut server = connect_in_netns(netns, upstream).await?;
    // Either side closing ends the copy; resets are normal for a proxy and not worth a warning.
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    Ok(())
}

/// Opens a TCP connection from inside namespace `netns`.
async fn connect_in_netns(netns: PathBuf, upstream: SocketAddr) -> Result<TcpStream, ForwardError> {
    let connect_netns = netns.clone();
    let connected = tokio::task::spawn_blocking(move || {
        run_in_netns(connect_netns, move || {
            StdTcpStream::connect_timeout(&upstream, CONNECT_TIMEOUT)
        })
    })
    .await??;
    let connect_error = |source| ForwardError::Connect {
        upstream,
        netns: netns.clone(),
        source,
    };
    let stream = connected.map_err(connect_error)?;
    stream.set_nonblocking(true).map_err(connect_error)?;
    TcpStream::from_std(stream).map_err(connect_error)
}
