//! A TLS server that, like a shared CDN edge, serves several sites on one address and picks the
//! site (and its certificate) by the ClientHello's SNI; and a TLS client that speaks over an
//! already opened stream (a CONNECT tunnel) with whatever SNI a test wants.
//!
//! Each site answers any HTTP/1.1 request with `200` and the body `site=<name>`. A ClientHello
//! without SNI gets the first site. Every finished handshake is recorded with its SNI.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

#[derive(Debug)]
struct BySni {
    sites: Vec<(String, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match hello.server_name() {
            None => self.sites.first().map(|(_, key)| key.clone()),
            Some(name) => self.sites.iter().find(|(site, _)| site == name).map(|(_, key)| key.clone()),
        }
    }
}

pub struct SniServer {
    pub addr: SocketAddr,
    /// PEM of the CA that signed every site's certificate.
    pub ca_pem: String,
    handshakes: Arc<Mutex<Vec<Option<String>>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl SniServer {
    /// Serves `sites` (the first is the default for a hello without SNI) on a loopback port.
    pub async fn start(sites: &[&str]) -> Self {
        sluice::tls::install_crypto_provider();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "shared edge CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let provider = rustls::crypto::ring::default_provider();
        let mut certified = Vec::new();
        for site in sites {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![site.to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
            let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
            let signing = provider.key_provider.load_private_key(key_der).unwrap();
            certified.push((site.to_string(), Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing))));
        }
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(BySni { sites: certified }));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let default_site = sites.first().map_or_else(String::new, |site| site.to_string());
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let seen = handshakes.clone();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok((stream, _)) => stream, Err(_) => continue },
                    _ = &mut stopped => return,
                };
                let acceptor = acceptor.clone();
                let seen = seen.clone();
                let default_site = default_site.clone();
                tokio::spawn(async move {
                    let Ok(Ok(tls)) =
                        tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    let site = tls.get_ref().1.server_name().map(str::to_owned);
                    seen.lock().unwrap().push(site.clone());
                    let site = site.unwrap_or(default_site);
                    let service = service_fn(move |_request: Request<Incoming>| {
                        let body = format!("site={site}");
                        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
                });
            }
        });
        Self { addr, ca_pem: ca_cert.pem(), handshakes, _stop: stop }
    }

    /// The SNI of every finished handshake, in order (`None`: the client sent none).
    pub fn handshakes(&self) -> Vec<Option<String>> {
        self.handshakes.lock().unwrap().clone()
    }
}

/// A TLS client over `stream` that verifies the server as `name` against `ca_pem`, sending `name`
/// as SNI unless `send_sni` is false.
pub async fn tls_over<S>(
    stream: S,
    name: &str,
    ca_pem: &str,
    send_sni: bool,
) -> std::io::Result<tokio_rustls::client::TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    sluice::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.enable_sni = send_sni;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), connector.connect(name, stream))
        .await
        .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")))
}
