//! A TLS vendor that demands a client certificate (mutual TLS), on an ephemeral loopback port.
//!
//! One test CA signs the server's certificate (for `localhost` and `127.0.0.1`) and a client
//! certificate; the server trusts only client certificates from that CA. A second, unrelated CA
//! signs a "stranger" client certificate the server must refuse. Every handshake is counted (with
//! and without a client certificate) and every request answers 200 with a small JSON echo.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// PEM files of one certificate and its key.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert_pem: String,
    pub key_pem: String,
}

#[derive(Default)]
struct Counts {
    /// Handshakes that completed (always with a verified client certificate).
    accepted: AtomicUsize,
    /// Handshakes that failed (no certificate, or one the server does not trust).
    refused: AtomicUsize,
    requests: AtomicUsize,
}

/// The mutual-TLS vendor.
#[derive(Clone)]
pub struct MtlsMock {
    pub addr: SocketAddr,
    /// The CA that signed the server certificate and the trusted client certificate.
    pub ca_pem: String,
    /// A client certificate the server trusts.
    pub client: CertFiles,
    /// A client certificate from another CA, which the server refuses.
    pub stranger: CertFiles,
    counts: Arc<Counts>,
    _stop: Arc<oneshot::Sender<()>>,
}

fn new_ca(name: &str) -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key).unwrap();
    (cert, rcgen::Issuer::new(params, key))
}

fn client_cert(name: &str, issuer: &rcgen::Issuer<'static, rcgen::KeyPair>) -> CertFiles {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, issuer).unwrap();
    CertFiles { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
}

impl MtlsMock {
    pub async fn start() -> Self {
        sluice::tls::install_crypto_provider();
        let (ca_cert, issuer) = new_ca("mtls vendor CA");
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server_cert = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
        let client = client_cert("sluice-client", &issuer);
        let (_, other_issuer) = new_ca("somebody else's CA");
        let stranger = client_cert("stranger", &other_issuer);

        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into());
        let mut config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![server_cert.der().clone()], key_der)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(Counts::default());
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let server_counts = counts.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                    _ = &mut stop_rx => return,
                };
                let acceptor = acceptor.clone();
                let counts = server_counts.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        counts.refused.fetch_add(1, Ordering::SeqCst);
                        return;
                    };
                    let has_cert = tls.get_ref().1.peer_certificates().is_some_and(|certs| !certs.is_empty());
                    if !has_cert {
                        counts.refused.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    counts.accepted.fetch_add(1, Ordering::SeqCst);
                    let service = service_fn(move |request: Request<Incoming>| {
                        let counts = counts.clone();
                        async move {
                            counts.requests.fetch_add(1, Ordering::SeqCst);
                            let body = serde_json::json!({"path": request.uri().path(), "mtls": true});
                            let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
                            *response.status_mut() = StatusCode::OK;
                            response.headers_mut().insert("content-type", "application/json".parse().unwrap());
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                });
            }
        });
        Self { addr, ca_pem: ca_cert.pem(), client, stranger, counts, _stop: Arc::new(stop_tx) }
    }

    pub fn https_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    pub fn accepted_handshakes(&self) -> usize {
        self.counts.accepted.load(Ordering::SeqCst)
    }

    pub fn refused_handshakes(&self) -> usize {
        self.counts.refused.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.counts.requests.load(Ordering::SeqCst)
    }

    /// Writes `mtls-ca.pem`, `client.crt`, `client.key`, `stranger.crt` and `stranger.key` into
    /// `dir` (keys 0600) and returns the directory's paths for them in that order.
    pub fn write_files(&self, dir: &Path) -> [PathBuf; 5] {
        use std::os::unix::fs::PermissionsExt;
        let files = [
            ("mtls-ca.pem", &self.ca_pem),
            ("client.crt", &self.client.cert_pem),
            ("client.key", &self.client.key_pem),
            ("stranger.crt", &self.stranger.cert_pem),
            ("stranger.key", &self.stranger.key_pem),
        ];
        files.map(|(name, text)| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            if name.ends_with(".key") {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
            path
        })
    }
}
