//! The token endpoint: one form-encoded `POST` (RFC 6749 §4.4 for `client_credentials`, §6 for
//! `refresh_token`), and what its answer means.
//!
//! The endpoint is the operator's choice (`token_url`), so it is not checked by the egress
//! guard, like a `target`. Its trust roots are the upstream's (`tls.extra_ca` beside the webpki
//! roots). Its answer is read up to 64 KiB. An error answer (RFC 6749 §5.2) becomes a detail
//! naming the status, `error` and `error_description`, printable and bounded, with every secret
//! sluice sent blanked out should the endpoint echo one.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{ClientAuth, ConfigError, Grant, OAuth2, Upstream};

/// Most bytes of a token answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// Longest a token exchange may take, whatever the upstream's `timeouts.request`.
pub const MAX_EXCHANGE: Duration = Duration::from_secs(10);

/// The client of one upstream's token endpoint.
pub struct Endpoint {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    url: Uri,
    /// The whole exchange, connect included.
    pub timeout: Duration,
}

/// What one exchange sends (the secrets read for it).
pub struct Ask<'a> {
    pub grant: Grant,
    pub client_id: &'a str,
    pub client_secret: Option<&'a str>,
    pub refresh_token: Option<&'a str>,
    pub scope: Option<&'a str>,
    pub audience: Option<&'a str>,
    pub client_auth: ClientAuth,
}

/// A successful answer.
#[derive(Clone, PartialEq, Eq)]
pub struct Answer {
    pub access_token: String,
    /// `expires_in`, when the endpoint said (Salesforce does not).
    pub lifetime: Option<Duration>,
    /// A new refresh token: the old one may no longer work (rotation).
    pub refresh_token: Option<String>,
    /// Salesforce's `instance_url`: the org's own API host.
    pub instance_url: Option<String>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("lifetime", &self.lifetime)
            .field("rotated", &self.refresh_token.is_some())
            .field("instance_url", &self.instance_url)
            .finish_non_exhaustive()
    }
}

/// Why an exchange gave no token. Its text is the 502's detail: it never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    #[error("cannot reach the token endpoint: {0}")]
    Unreachable(String),
    #[error("the token endpoint did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("the token endpoint answered {status}{}", refusal(.error, .description))]
    Refused { status: u16, error: Option<String>, description: Option<String> },
    #[error("the token endpoint's answer is not a token: {0}")]
    Malformed(String),
}

fn refusal(error: &Option<String>, description: &Option<String>) -> String {
    match (error, description) {
        (Some(error), Some(description)) => format!(" {error}: {description}"),
        (Some(error), None) => format!(" {error}"),
        (None, Some(description)) => format!(": {description}"),
        (None, None) => String::new(),
    }
}

impl Endpoint {
    /// The client for `upstream`'s token endpoint; `key` names the upstream's TLS settings.
    pub fn new(upstream: &Upstream, settings: &OAuth2, key: &str) -> Result<Self, ConfigError> {
        let tls = crate::tls::client::client_config(upstream.extra_ca.as_deref(), None, key)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(upstream.connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        let timeout = upstream.request_timeout.min(MAX_EXCHANGE);
        Ok(Self { client, url: settings.token_url.clone(), timeout })
    }

    /// Asks for a token, once, within [`Endpoint::timeout`].
    pub async fn exchange(&self, ask: &Ask<'_>) -> Result<Answer, ExchangeError> {
        let request = self.request(ask)?;
        let secrets: Vec<&str> =
            [ask.client_secret, ask.refresh_token].into_iter().flatten().filter(|s| !s.is_empty()).collect();
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|error| ExchangeError::Unreachable(blank(&crate::error::describe(&error), &secrets)))?;
            let (parts, body) = response.into_parts();
            let bytes = Limited::new(body, MAX_ANSWER)
                .collect()
                .await
                .map_err(|error| ExchangeError::Malformed(format!("reading the answer: {error}")))?
                .to_bytes();
            Ok::<_, ExchangeError>((parts.status, bytes))
        };
        let (status, bytes) =
            tokio::time::timeout(self.timeout, exchange).await.map_err(|_| ExchangeError::Timeout(self.timeout))??;
        parse_answer(status, &bytes, &secrets)
    }

    fn request(&self, ask: &Ask<'_>) -> Result<Request<Full<Bytes>>, ExchangeError> {
        let mut form: Vec<(&str, &str)> = vec![("grant_type", ask.grant.as_str())];
        if let (Grant::RefreshToken, Some(token)) = (ask.grant, ask.refresh_token) {
            form.push(("refresh_token", token));
        }
        if let Some(scope) = ask.scope {
            form.push(("scope", scope));
        }
        if let Some(audience) = ask.audience {
            form.push(("audience", audience));
        }
        let mut basic = None;
        match (ask.client_auth, ask.client_secret) {
            (ClientAuth::Basic, Some(secret)) => {
                // RFC 6749 §2.3.1: both are form-encoded before they are joined.
                let pair = format!("{}:{}", form_component(ask.client_id), form_component(secret));
                let mut value = HeaderValue::from_str(&format!("Basic {}", base64(pair.as_bytes())))
                    .map_err(|_| ExchangeError::Malformed("the client id or secret is not usable".into()))?;
                value.set_sensitive(true);
                basic = Some(value);
            }
            (_, secret) => {
                form.push(("client_id", ask.client_id));
                if let Some(secret) = secret {
                    form.push(("client_secret", secret));
                }
            }
        }
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(self.url.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json");
        if let Some(value) = basic {
            builder = builder.header(AUTHORIZATION, value);
        }
        builder
            .body(Full::new(Bytes::from(form_encode(&form))))
            .map_err(|error| ExchangeError::Malformed(format!("building the request: {error}")))
    }
}

/// Reads a token answer: `access_token` on a 2xx, else the RFC 6749 §5.2 error fields.
pub fn parse_answer(status: StatusCode, bytes: &[u8], secrets: &[&str]) -> Result<Answer, ExchangeError> {
    let json: Option<serde_json::Value> = serde_json::from_slice(bytes).ok();
    let text = |name: &str| -> Option<String> {
        json.as_ref()?.get(name)?.as_str().map(|value| printable(&blank(value, secrets))).filter(|v| !v.is_empty())
    };
    if !status.is_success() {
        return Err(ExchangeError::Refused {
            status: status.as_u16(),
            error: text("error"),
            description: text("error_description"),
        });
    }
    let Some(json) = json.as_ref() else { return Err(ExchangeError::Malformed("not JSON".into())) };
    let access_token = json
        .get("access_token")
        .and_then(serde_json::Value::as_str)
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or_else(|| ExchangeError::Malformed("no access_token".into()))?;
    if access_token.len() > 16 * 1024 || !access_token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ExchangeError::Malformed("the access_token is not a usable header value".into()));
    }
    let lifetime = match json.get("expires_in") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(number)) => number.as_f64(),
        // Some endpoints send it as a string.
        Some(serde_json::Value::String(text)) => text.trim().parse::<f64>().ok(),
        Some(_) => return Err(ExchangeError::Malformed("expires_in is not a number".into())),
    }
    .map(|seconds| {
        if seconds.is_finite() && seconds > 0.0 {
            Ok(Duration::from_secs_f64(seconds.min(10.0 * 365.0 * 86_400.0)))
        } else {
            Err(ExchangeError::Malformed("expires_in is not a positive number".into()))
        }
    })
    .transpose()?;
    let refresh_token = json
        .get("refresh_token")
        .and_then(serde_json::Value::as_str)
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .map(str::to_owned);
    if refresh_token
        .as_deref()
        .is_some_and(|token| token.len() > 16 * 1024 || token.bytes().any(|b| b.is_ascii_control()))
    {
        return Err(ExchangeError::Malformed("the refresh_token is not usable".into()));
    }
    let instance_url = json.get("instance_url").and_then(serde_json::Value::as_str).map(str::to_owned);
    Ok(Answer { access_token: access_token.to_owned(), lifetime, refresh_token, instance_url })
}

/// `text` with every secret in `secrets` replaced.
fn blank(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_owned();
    for secret in secrets {
        if secret.len() >= 4 {
            out = out.replace(secret, "<redacted>");
        }
    }
    out
}

/// Printable ASCII only, at most 200 characters: the detail goes into a header.
fn printable(text: &str) -> String {
    text.chars().filter(|c| matches!(c, ' '..='~')).take(200).collect()
}

/// `application/x-www-form-urlencoded` (the WHATWG form encoding RFC 6749 §B asks for).
pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish()
}

/// One value, form-encoded (RFC 6749 §2.3.1 encodes the client id and secret so before Basic).
fn form_component(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// Standard base64 with padding (RFC 4648 §4), for HTTP Basic.
pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_are_encoded_as_browsers_do() {
        assert_eq!(
            form_encode(&[
                ("grant_type", "refresh_token"),
                ("scope", "crm.objects.contacts.read oauth"),
                ("x", "a+b/c=&")
            ]),
            "grant_type=refresh_token&scope=crm.objects.contacts.read+oauth&x=a%2Bb%2Fc%3D%26"
        );
        assert_eq!(form_component("é"), "%C3%A9");
    }

    #[test]
    fn base64_matches_rfc_4648() {
        for (input, expected) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE=")]
        {
            assert_eq!(base64(input.as_bytes()), expected);
        }
        let decoded = crate::security::clients::decode_base64(&base64(b"id:s3cr%2Bt")).unwrap();
        assert_eq!(decoded, b"id:s3cr%2Bt");
    }

    #[test]
    fn answers_are_read_as_rfc_6749_says() {
        let ok = br#"{"access_token":"at-1","token_type":"bearer","expires_in":1800,"refresh_token":"rt-2"}"#;
        let answer = parse_answer(StatusCode::OK, ok, &[]).unwrap();
        assert_eq!(answer.access_token, "at-1");
        assert_eq!(answer.lifetime, Some(Duration::from_secs(1800)));
        assert_eq!(answer.refresh_token.as_deref(), Some("rt-2"));
        let salesforce = br#"{"access_token":"00D!x","instance_url":"https://acme.my.salesforce.com","issued_at":"1"}"#;
        let answer = parse_answer(StatusCode::OK, salesforce, &[]).unwrap();
        assert_eq!((answer.lifetime, answer.instance_url.as_deref()), (None, Some("https://acme.my.salesforce.com")));
        let string = br#"{"access_token":"t","expires_in":"60"}"#;
        assert_eq!(parse_answer(StatusCode::OK, string, &[]).unwrap().lifetime, Some(Duration::from_secs(60)));
        for bad in [
            &br#"{"token_type":"bearer"}"#[..],
            b"<html>",
            br#"{"access_token":"a b"}"#,
            br#"{"access_token":"t","expires_in":-1}"#,
        ] {
            assert!(matches!(parse_answer(StatusCode::OK, bad, &[]), Err(ExchangeError::Malformed(_))), "{bad:?}");
        }
    }

    #[test]
    fn refusals_name_the_error_and_never_a_secret() {
        let body = br#"{"error":"invalid_grant","error_description":"refresh token rt-secret-1 is expired\r\n"}"#;
        let error = parse_answer(StatusCode::BAD_REQUEST, body, &["rt-secret-1"]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the token endpoint answered 400 invalid_grant: refresh token <redacted> is expired"
        );
        let error = parse_answer(StatusCode::SERVICE_UNAVAILABLE, b"down", &[]).unwrap_err();
        assert_eq!(error.to_string(), "the token endpoint answered 503");
    }
}
