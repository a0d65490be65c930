//! Header hygiene at the proxy boundary (RFC 9110 §7.6): hop-by-hop fields never cross sluice,
//! `Via` records it, and every request carries an id both sides can log.

use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, VIA};
use http::Version;

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Headers vendors use for their own request id, in the order sluice looks for them.
pub const VENDOR_REQUEST_ID_HEADERS: &[&str] = &[
    "x-hubspot-correlation-id",
    "x-request-id",
    "x-ms-service-request-id",
    "x-zendesk-request-id",
    "x-github-request-id",
    "request-id",
    "x-amzn-requestid",
];

/// Removes hop-by-hop fields: the fixed set, any listed in `Connection`, and sluice's own
/// request controls (`Sluice-*`), which are for this hop only.
///
/// One pass over the names finds them; a message that has none (most requests) costs no lookup.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut doomed: Vec<HeaderName> =
        headers.keys().filter(|name| is_hop_by_hop(name) || name.as_str().starts_with("sluice-")).cloned().collect();
    if doomed.is_empty() {
        return;
    }
    // Names listed in `Connection` are hop-by-hop too (read before `Connection` itself goes).
    let named = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok());
    doomed.extend(named);
    for name in doomed {
        headers.remove(name);
    }
}

/// The fixed hop-by-hop fields (RFC 9110 §7.6.1, plus the legacy `Keep-Alive` and
/// `Proxy-Connection`, and the proxy authentication pair meant for sluice itself).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    // Names are lowercase; a string match is a length switch and one compare.
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Appends this hop to `Via`.
pub fn append_via(headers: &mut HeaderMap, version: Version) {
    let hop = match version {
        Version::HTTP_10 => HeaderValue::from_static("1.0 sluice"),
        Version::HTTP_2 => HeaderValue::from_static("2 sluice"),
        Version::HTTP_3 => HeaderValue::from_static("3 sluice"),
        _ => HeaderValue::from_static("1.1 sluice"),
    };
    headers.append(VIA, hop);
}

/// The vendor's own request id from a response, for the log line.
pub fn vendor_request_id(headers: &HeaderMap) -> Option<&str> {
    VENDOR_REQUEST_ID_HEADERS.iter().find_map(|name| headers.get(*name)).and_then(|value| value.to_str().ok())
}

/// The trace id of a W3C `traceparent`, when it is well formed.
pub fn trace_id(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("traceparent")?.to_str().ok()?;
    let mut parts = value.split('-');
    let (_version, trace) = (parts.next()?, parts.next()?);
    (trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit())).then_some(trace)
}

/// A new request id: 128 random bits, hex.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let id: u128 = rand::random();
    // 32 lowercase hex digits, written in place (no formatter, one allocation): always a valid value.
    let mut digits = [0u8; 32];
    for (at, digit) in digits.iter_mut().enumerate() {
        *digit = HEX[((id >> (124 - 4 * at)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&digits).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{TE, TRANSFER_ENCODING};

    #[test]
    fn request_ids_are_32_lowercase_hex_digits_and_differ() {
        let (first, second) = (new_request_id(), new_request_id());
        for id in [&first, &second] {
            let text = id.to_str().unwrap();
            assert_eq!(text.len(), 32, "{text}");
            assert!(text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{text}");
        }
        assert_ne!(first, second);
    }

    #[test]
    fn strips_fixed_and_connection_named_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, HeaderValue::from_static("keep-alive, X-Secret-Hop"));
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        headers.insert(TE, HeaderValue::from_static("trailers"));
        headers
            .insert("traceparent", HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert_eq!(trace_id(&headers), Some("0af7651916cd43dd8448eb211c80319c"));
    }

    #[test]
    fn strips_own_controls_and_every_connection_line_and_keeps_the_rest() {
        let mut headers = HeaderMap::new();
        headers.append(CONNECTION, HeaderValue::from_static("x-one"));
        headers.append(CONNECTION, HeaderValue::from_static("X-Two , close"));
        headers.insert("x-one", HeaderValue::from_static("1"));
        headers.insert("x-two", HeaderValue::from_static("2"));
        headers.insert("sluice-deadline", HeaderValue::from_static("2s"));
        headers.insert("sluice-tenant", HeaderValue::from_static("acme"));
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.append("x-kept", HeaderValue::from_static("a"));
        headers.append("x-kept", HeaderValue::from_static("b"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["x-kept"]);
        assert_eq!(headers.get_all("x-kept").iter().count(), 2);

        let mut clean = HeaderMap::new();
        clean.insert("x-tenant-id", HeaderValue::from_static("acme"));
        clean.insert(http::header::HOST, HeaderValue::from_static("api.hubapi.com"));
        strip_hop_by_hop(&mut clean);
        assert_eq!(clean.len(), 2);
    }

    #[test]
    fn via_is_appended() {
        let mut headers = HeaderMap::new();
        headers.insert(VIA, HeaderValue::from_static("1.1 corp-proxy"));
        append_via(&mut headers, Version::HTTP_11);
        let all: Vec<_> = headers.get_all(VIA).iter().collect();
        assert_eq!(all, ["1.1 corp-proxy", "1.1 sluice"]);
    }
}
