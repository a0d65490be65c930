//! What a request carries between the layers of its journey, as request (and response)
//! extensions. Low in the module graph (it names only `config::Upstream` and `controls`), so
//! every layer reads these without depending on the layer that wrote them.
//!
//! In order of the journey: the connection puts [`Via`] (and the peer address, the client
//! identity and the generation) on every request; Route adds [`Routed`] and the parsed
//! [`RequestControls`]; Forward leaves [`UpstreamName`] on the response for Observe. Handles that
//! only a room's own layers exchange (the breaker an attempt passed, the scope a quota charged)
//! live in that room.

use std::sync::Arc;

use http::Uri;

use crate::config::Upstream;
pub use crate::controls::RequestControls;

/// Where a request goes: the upstream and the full URI to send.
#[derive(Debug, Clone)]
pub struct Routed {
    pub upstream: Arc<Upstream>,
    pub uri: Uri,
}

/// How the request reached sluice: the host of the CONNECT tunnel it came through, if any.
#[derive(Debug, Clone, Default)]
pub struct Via {
    pub tunnel_host: Option<Arc<str>>,
    /// The port the CONNECT named (used when the upstream has no `target`).
    pub tunnel_port: u16,
    /// The tunnel carries plain HTTP (a blind tunnel whose client spoke no TLS), so a
    /// destination the client picked is `http://`; otherwise it is an intercepted TLS tunnel.
    pub plaintext: bool,
}

/// What the credential sluice injects stands for, when its value changes over time (a brokered
/// OAuth token, renewed every hour or so): quota `credential` scopes and vendor-pause accounts
/// are keyed by it instead of the header's value, so they outlive a renewal. Set by the oauth
/// layer; never a secret.
#[derive(Debug, Clone)]
pub struct CredentialName(pub Arc<str>);

/// The upstream that answered (or was meant to), left in response extensions for `Observe`.
#[derive(Debug, Clone)]
pub struct UpstreamName(pub Arc<str>);
