//! The plugins' side of [`crate::agent_api`]: one HTTP/1.1 exchange with the node agent over
//! its unix socket, bounded by a timeout. Each plugin decodes the answer and words the failures
//! its own way (virtnet-ipam fails the command, virtnet-coordinator warns and carries on).

use crate::trusted::TrustedPath;
use std::io;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// Why no answer came back.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot start the I/O runtime: {0}")]
    Runtime(io::Error),
    #[error("cannot connect: {0}")]
    Unreachable(io::Error),
    #[error("the connection dropped: {0}")]
    Dropped(hyper::Error),
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("cannot build the request: {0}")]
    Request(hyper::http::Error),
}

/// Sends `method path` with a JSON `body` to the agent at `socket` and returns the status and
/// body of its answer. The whole exchange, connecting included, is bounded by `timeout`.
pub fn exchange(
    socket: &TrustedPath,
    timeout: Duration,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> Result<(StatusCode, Bytes), TransportError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(TransportError::Runtime)?;
    runtime
        // The timer must be created inside the runtime.
        .block_on(async { tokio::time::timeout(timeout, send(socket, method, path, body)).await })
        .map_err(|_| TransportError::Timeout(timeout))?
}

async fn send(
    socket: &TrustedPath,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> Result<(StatusCode, Bytes), TransportError> {
    let stream = UnixStream::connect(socket.socket().map_err(TransportError::Unreachable)?)
        .await
        .map_err(TransportError::Unreachable)?;
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(TransportError::Dropped)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!("connection to the VirtNet agent ended: {error}");
        }
    });
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "virtnet-agent")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(TransportError::Request)?;
    let response = sender
        .send_request(request)
        .await
        .map_err(TransportError::Dropped)?;
    let status = response.status();
    let answer = response
        .into_body()
        .collect()
        .await
        .map_err(TransportError::Dropped)?
        .to_bytes();
    Ok((status, answer))
}
