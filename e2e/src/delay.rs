//! The delaying proxy: a TCP forwarder that holds every byte the upstream sends for a fixed
//! time before passing it on (what the client sends goes through at once). Put between one
//! component and the apiserver, it makes that component's watch caches lag by that much, as
//! they do on a loaded apiserver, while its writes still reach the apiserver at once — the
//! condition under which a decision made on a cache must be re-checked by a guarded write.
use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::Instant,
};

/// Serves every connection accepted on `listener`, forwarding it to `upstream` with the
/// upstream's bytes held for `delay`. Runs until the process is stopped.
pub async fn serve(
    listener: TcpListener,
    upstream: SocketAddr,
    delay: Duration,
) -> std::io::Result<()> {
    loop {
        let (client, peer) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(error) = forward_one(client, upstream, delay).await {
                tracing::debug!(%peer, %error, "delayed connection ended");
            }
        });
    }
}

async fn forward_one(
    client: TcpStream,
    upstream: SocketAddr,
    delay: Duration,
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
                        .send((Instant::now() + delay, buffer[..read].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    };
    let writing = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if client_write.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upward, reading, writing);
    Ok(())
}
