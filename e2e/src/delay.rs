//! The faulty proxy: a TCP forwarder put between one component and the apiserver.
//!
//! - It holds every byte the upstream sends for a fixed time before passing it on (what the
//!   client sends goes through at once). That makes the component's watch caches lag by that
//!   much, as they do on a loaded apiserver, while its writes still reach the apiserver at once —
//!   the condition under which a decision made on a cache must be re-checked by a guarded write.
//! - While a flag file exists, it drops what the upstream sends, and once the file is gone it
//!   cuts every connection that lost bytes: the writes made meanwhile are done by the apiserver,
//!   but their answers never arrive, as when a connection breaks after the request went out.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::Instant,
};

/// How often a connection that lost bytes looks whether the flag file is gone.
const FLAG_POLL: Duration = Duration::from_millis(100);

/// What the proxy does to the upstream's bytes.
#[derive(Clone, Debug)]
pub struct Faults {
    /// Every byte is held this long.
    pub delay: Duration,
    /// While this file exists, the upstream's bytes are dropped.
    pub lose_answers_while: Option<PathBuf>,
}

impl Faults {
    fn losing(&self) -> bool {
        self.lose_answers_while.as_deref().is_some_and(Path::exists)
    }
}

/// Serves every connection accepted on `listener`, forwarding it to `upstream` with the
/// upstream's bytes treated as `faults` say. Runs until the process is stopped.
pub async fn serve(
    listener: TcpListener,
    upstream: SocketAddr,
    faults: Faults,
) -> std::io::Result<()> {
    let faults = Arc::new(faults);
    loop {
        let (client, peer) = listener.accept().await?;
        let faults = Arc::clone(&faults);
        tokio::spawn(async move {
            if let Err(error) = forward_one(client, upstream, &faults).await {
                tracing::debug!(%peer, %error, "delayed connection ended");
            }
        });
    }
}

async fn forward_one(
    client: TcpStream,
    upstream: SocketAddr,
    faults: &Faults,
) -> std::io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upward = async {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
    };
    // Chunks wait in order, each until its own due time, so the stream keeps its shape.
    let (held, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reading = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match server_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => {
                    if held
                        .send((Instant::now() + faults.delay, buffer[..read].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    };
    let writing = async move {
        let mut lost = false;
        let mut poll = tokio::time::interval(FLAG_POLL);
        loop {
            tokio::select! {
                next = due.recv() => {
                    let Some((at, chunk)) = next else { break };
                    tokio::time::sleep_until(at).await;
                    if faults.losing() {
                        lost = true;
                    } else if lost || client_write.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
                _ = poll.tick(), if lost => {
                    if !faults.losing() {
                        break;
                    }
                }
            }
        }
        // Closing the client's side makes it see the cut; it then closes its own, which ends
        // the upward copy and so the upstream connection.
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upward, reading, writing);
    Ok(())
}
