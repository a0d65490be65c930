//! rustls client configuration towards vendors: webpki roots plus an optional extra CA per
//! upstream (tests and staging use it for their own servers), TLS 1.2 and 1.3 only, ALPN
//! h2 + http/1.1 so HTTP/2 is used where the vendor offers it.

use std::path::Path;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{pem::PemObject, CertificateDer};

use crate::config::{ConfigError, Problem, Problems};

/// The client config for one upstream. Its trust roots and its client certificate are read
/// independently, so a config with a bad file of each kind is told of both.
pub fn client_config(
    extra_ca: Option<&Path>,
    client_cert: Option<&(std::path::PathBuf, std::path::PathBuf)>,
    key: &str,
) -> Result<Arc<ClientConfig>, ConfigError> {
    let mut problems = Problems::default();
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        for cert in problems.keep(read_certs(path, key)).into_iter().flatten() {
            if let Err(error) = roots.add(cert) {
                problems.push(Problem::new(key, format!("{}: {error}", path.display())));
            }
        }
    }
    let client_auth = client_cert.and_then(|(cert_path, key_path)| {
        let chain = problems.keep(read_certs(cert_path, key));
        let private = rustls_pki_types::PrivateKeyDer::from_pem_file(key_path).map_err(|error| {
            ConfigError::at_key(key, format!("cannot read client key {}: {error}", key_path.display()))
        });
        chain.zip(problems.keep(private))
    });
    problems.finish()?;
    let builder = ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .with_root_certificates(roots);
    let config = match client_auth {
        None => builder.with_no_client_auth(),
        Some((chain, private)) => builder
            .with_client_auth_cert(chain, private)
            .map_err(|error| ConfigError::at_key(key, format!("client certificate: {error}")))?,
    };
    Ok(Arc::new(config))
}

/// Reads every certificate in a PEM file; an empty or unreadable file is a config error.
pub fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|error| ConfigError::at_key(key, format!("cannot read {}: {error}", path.display())))?;
    if certs.is_empty() {
        return Err(ConfigError::at_key(key, format!("{} holds no PEM certificate", path.display())));
    }
    Ok(certs)
}
