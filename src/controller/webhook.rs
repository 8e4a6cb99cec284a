//! The validating admission webhook: `POST /validate/subnets` over HTTPS, served by every
//! replica (leader or not), deciding with [`super::admission::review_subnet`].
//!
//! The other Subnets and every IPPool are listed from the API server at admission time, not read from a cache:
//! Subnets are created rarely, and a stale cache could admit an overlap with one created a
//! moment ago.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use axum::{Json, Router, extract::State, routing::post};
use kube::{
    Api, Client, ResourceExt,
    api::ListParams,
    core::{
        DynamicObject,
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
    },
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        crypto::ring,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    },
    server::TlsStream,
};
use tracing::{debug, info, warn};

use super::{Error, admission::review_subnet};
use crate::crd::{IpPool, Subnet};

/// The path the ValidatingWebhookConfiguration points at.
pub const SUBNETS_PATH: &str = "/validate/subnets";
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the webhook listens and the PEM files of its serving certificate.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    pub address: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Reads the certificate, binds the port and returns the server future. Fails before serving
/// anything when the certificate or key cannot be used.
pub async fn serve(
    config: &WebhookConfig,
    client: Client,
) -> Result<impl Future<Output = std::io::Result<()>> + use<>, Error> {
    let tls = server_config(&config.cert, &config.key)?;
    let listener = TcpListener::bind(config.address)
        .await
        .map_err(|source| Error::Serve {
            address: config.address,
            source,
        })?;
    let router = Router::new()
        .route(SUBNETS_PATH, post(validate_subnets))
        .with_state(Arc::new(client));
    info!(address = %config.address, path = SUBNETS_PATH, "serving the admission webhook");
    let listener = TlsListener::start(listener, TlsAcceptor::from(Arc::new(tls)), config.address)?;
    Ok(async move { axum::serve(listener, router).await })
}

fn server_config(cert: &Path, key: &Path) -> Result<ServerConfig, Error> {
    let unusable = |path: &Path, problem: String| Error::WebhookCertificate {
        path: path.to_owned(),
        problem,
    };
    let cert_pem = fs::read(cert).map_err(|error| unusable(cert, error.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| unusable(cert, error.to_string()))?;
    if chain.is_empty() {
        return Err(unusable(cert, "it holds no PEM CERTIFICATE".to_owned()));
    }
    let key_pem = fs::read(key).map_err(|error| unusable(key, error.to_string()))?;
    let private_key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|error| unusable(key, error.to_string()))?;
    ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .and_then(|builder| {
            builder
                .with_no_client_auth()
                .with_single_cert(chain, private_key)
        })
        .map_err(|error| unusable(cert, format!("it does not match its key: {error}")))
}

async fn validate_subnets(
    State(client): State<Arc<Client>>,
    Json(review): Json<AdmissionReview<Subnet>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let request: AdmissionRequest<Subnet> = match review.try_into() {
        Ok(request) => request,
        Err(error) => return Json(AdmissionResponse::invalid(error).into_review()),
    };
    let response = AdmissionResponse::from(&request);
    let verdict = match (&request.operation, &request.object) {
        (Operation::Create | Operation::Update, Some(subnet)) => {
            verdict(&client, subnet, request.old_object.as_ref()).await
        }
        _ => Ok(()),
    };
    let response = match verdict {
        Ok(()) => response,
        Err(message) => {
            info!(subnet = %request.name, %message, "Subnet rejected");
            response.deny(message)
        }
    };
    Json(response.into_review())
}

async fn verdict(
    client: &Client,
    subnet: &Subnet,
    previous: Option<&Subnet>,
) -> Result<(), String> {
    let others = list_for_review::<Subnet>(client, subnet, "Subnets").await?;
    let pools = list_for_review::<IpPool>(client, subnet, "IPPools").await?;
    review_subnet(subnet, previous, &others, &pools)
}

/// Every object of kind `K`, from the API server; `what` names them in the refusal.
async fn list_for_review<K>(client: &Client, subnet: &Subnet, what: &str) -> Result<Vec<K>, String>
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map(|list| list.items)
        .map_err(|error| {
            warn!(subnet = %subnet.name_any(), %error, what, "cannot list to check for overlaps");
            format!(
                "virtnet-controller cannot list the {what} to check for overlaps ({error}); \
                 retry, and if it persists check the controller's RBAC and logs"
            )
        })
}

/// TLS connections whose handshake is done; handshakes run in their own tasks so one slow client
/// never holds up the next.
struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<tokio::net::TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    fn start(
        listener: TcpListener,
        acceptor: TlsAcceptor,
        address: SocketAddr,
    ) -> Result<Self, Error> {
        let local = listener
            .local_addr()
            .map_err(|source| Error::Serve { address, source })?;
        let (sender, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        warn!(%error, "webhook accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if sender.is_closed() {
                    return;
                }
                let acceptor = acceptor.clone();
                let sender = sender.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = sender.send((tls, peer)).await;
                        }
                        Ok(Err(error)) => debug!(%peer, %error, "webhook TLS handshake failed"),
                        Err(_) => debug!(%peer, "webhook TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept task only ends when the server is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(result: Result<ServerConfig, Error>) -> String {
        match result {
            Ok(_) => panic!("an unusable certificate was accepted"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn an_unusable_certificate_says_which_file_and_what_to_do() {
        let dir = std::env::temp_dir().join(format!("virtnet-webhook-test-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("temp dir");
        let missing = dir.join("missing.crt");
        let message = problem(server_config(&missing, &missing));
        assert!(
            message.starts_with(&format!(
                "cannot use the webhook certificate file {}",
                missing.display()
            )) && message.contains("--webhook-cert/--webhook-key"),
            "{message}"
        );
        let not_pem = dir.join("not-pem.crt");
        fs::write(&not_pem, "hello").expect("write");
        let message = problem(server_config(&not_pem, &not_pem));
        assert!(message.contains("it holds no PEM CERTIFICATE"), "{message}");
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
