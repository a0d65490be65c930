//! TLS on both sides of sluice: the interception CA that mints leaf certificates for clients
//! (`ca`), the rustls client configuration used towards vendors (`client`), and the reading of a
//! blind tunnel's ClientHello, which sluice checks but never terminates (`client_hello`).
//!
//! Low in the module graph (it reads only `config` and `kit`): `upstream` builds its clients
//! with it, `state` loads the CA, and `listen` terminates and inspects tunnels.

pub mod ca;
pub mod client;
pub mod client_hello;

/// Installs ring as rustls' process-wide crypto provider; the first call wins, later ones no-op.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
