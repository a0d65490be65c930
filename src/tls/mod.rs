//! TLS on both sides of sluice: the interception CA that mints leaf certificates for clients
//! (`ca`), and the rustls client configuration used towards vendors (`client`).

pub mod ca;
pub mod client;

/// Installs ring as rustls' process-wide crypto provider; the first call wins, later ones no-op.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
