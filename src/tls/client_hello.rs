//! Reading a client's TLS handshake without terminating it: what a blind tunnel checks.
//!
//! A blind tunnel is allowed by the CONNECT host, but the server on the far side picks the site
//! by the ClientHello's server name (SNI). On a shared edge (a CDN, a vendor's front door) the
//! same address serves many sites, so a tunnel to an allowed host could reach any other one by
//! naming it in SNI. [`HandshakeWatcher`] follows the client's side of the handshake record by
//! record and refuses a ClientHello whose server name is not the CONNECT host, or that hides it
//! (Encrypted Client Hello). It inspects every plaintext ClientHello, a second one after a
//! HelloRetryRequest included, and stops at the client's first encrypted record.
//!
//! The parser is written here rather than taken from a TLS parsing crate because it needs far
//! less than one offers and must do a few things they don't: it is fed bytes as they arrive
//! (handshake messages may be split over records, records over reads), holds at most one
//! ClientHello ([`MAX_CLIENT_HELLO`]), allocates nothing else, and is stricter than a server
//! (a duplicate extension, a second host name or any trailing byte is refused), so nothing it
//! lets through can name a different site to the server. It is fuzzed (`fuzz/`, target
//! `client_hello`) and tested on ClientHellos rustls writes.

/// Largest ClientHello accepted. Real ones are under 2 KiB (a post-quantum key share included);
/// 16 KiB leaves room for large padding and session tickets.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// Largest TLS record (RFC 8446 §5.2: a ciphertext of 2^14 + 256; TLS 1.2 allows 2^14 + 2048).
const MAX_RECORD: usize = 16 * 1024 + 2048;

const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXTENSION_SERVER_NAME: u16 = 0;
/// `encrypted_client_hello` (RFC 9849).
const EXTENSION_ECH: u16 = 0xfe0d;
/// The draft `encrypted_server_name` that preceded it.
const EXTENSION_ESNI: u16 = 0xffce;

/// What a ClientHello says about where it is going.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The `host_name` of the `server_name` extension, lower-cased, without a trailing dot.
    pub server_name: Option<String>,
    /// It carries Encrypted Client Hello (or the older ESNI): the real name is hidden.
    pub encrypted: bool,
}

/// Why a tunnel's handshake was refused. The `as_str` values are metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The first bytes are TLS, but the first handshake message is not a ClientHello.
    NotClientHello,
    /// A ClientHello or record that breaks the TLS grammar.
    Malformed,
    /// A ClientHello over [`MAX_CLIENT_HELLO`].
    Oversized,
    /// The ClientHello names another host than the CONNECT did.
    ServerNameMismatch,
    /// The ClientHello hides its server name (ECH or ESNI).
    EncryptedClientHello,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotClientHello | Refusal::Malformed | Refusal::Oversized => "bad_client_hello",
            Refusal::ServerNameMismatch => "sni_mismatch",
            Refusal::EncryptedClientHello => "encrypted_client_hello",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Refusal::NotClientHello => "the first TLS handshake message is not a ClientHello",
            Refusal::Malformed => "malformed TLS handshake",
            Refusal::Oversized => "ClientHello too large",
            Refusal::ServerNameMismatch => "the ClientHello names another server than the CONNECT host",
            Refusal::EncryptedClientHello => "the ClientHello hides its server name (Encrypted Client Hello)",
        }
    }
}

/// Whether the first byte a client sends through a tunnel starts a TLS handshake record.
pub fn starts_tls(first: u8) -> bool {
    first == CONTENT_HANDSHAKE
}

/// Where the watcher is in the record stream.
#[derive(Debug, Clone, Copy)]
enum Record {
    /// Reading a 5-byte record header; `have` bytes of it so far.
    Header { have: usize },
    /// Inside a record's payload, `remaining` bytes to go.
    Body { handshake: bool, remaining: usize },
}

/// Follows the client-to-server bytes of a TLS connection and checks every plaintext
/// ClientHello in them against the host the tunnel was opened for.
#[derive(Debug)]
pub struct HandshakeWatcher {
    expected_host: String,
    record: Record,
    header: [u8; 5],
    /// The handshake message being reassembled: its 4-byte header, and for a ClientHello its body.
    message: Vec<u8>,
    /// Bytes of a handshake message of another type still to pass over.
    skip: usize,
    /// The client sent ChangeCipherSpec: handshake records from here on may be encrypted.
    after_change_cipher_spec: bool,
    hellos_checked: usize,
    /// The client's encrypted traffic has begun: nothing more to inspect.
    done: bool,
}

impl HandshakeWatcher {
    /// Watches for the host a CONNECT named (any case, trailing dot ignored).
    pub fn new(expected_host: &str) -> Self {
        Self {
            expected_host: normalise_host(expected_host),
            record: Record::Header { have: 0 },
            header: [0; 5],
            message: Vec::new(),
            skip: 0,
            after_change_cipher_spec: false,
            hellos_checked: 0,
            done: false,
        }
    }

    /// How many ClientHellos have passed the check.
    pub fn hellos_checked(&self) -> usize {
        self.hellos_checked
    }

    /// Whether the watcher has stopped inspecting (the client's encrypted records began).
    pub fn done(&self) -> bool {
        self.done
    }

    /// Takes the next bytes the client sent. An error means the tunnel must be closed before
    /// these bytes reach the server: the last byte of a refused ClientHello is always in them.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), Refusal> {
        while !bytes.is_empty() && !self.done {
            match self.record {
                Record::Header { have } => {
                    let take = (5 - have).min(bytes.len());
                    self.header[have..have + take].copy_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if have + take < 5 {
                        self.record = Record::Header { have: have + take };
                        continue;
                    }
                    self.record = self.open_record()?;
                }
                Record::Body { handshake, remaining } => {
                    let take = remaining.min(bytes.len());
                    if handshake {
                        self.handshake(&bytes[..take])?;
                    }
                    bytes = &bytes[take..];
                    self.record = if take == remaining {
                        Record::Header { have: 0 }
                    } else {
                        Record::Body { handshake, remaining: remaining - take }
                    };
                }
            }
        }
        Ok(())
    }

    /// Reads a complete record header and says what follows.
    fn open_record(&mut self) -> Result<Record, Refusal> {
        let [content_type, major, _minor, high, low] = self.header;
        let length = usize::from(u16::from_be_bytes([high, low]));
        let first = self.hellos_checked == 0;
        if major != 3 || length == 0 || length > MAX_RECORD {
            // Before the first ClientHello this is not TLS a server would accept; after it, the
            // server is the judge, and the watcher has nothing more to read.
            if first {
                return Err(Refusal::Malformed);
            }
            self.done = true;
            return Ok(Record::Header { have: 0 });
        }
        match content_type {
            CONTENT_HANDSHAKE => Ok(Record::Body { handshake: true, remaining: length }),
            CONTENT_CHANGE_CIPHER_SPEC if !first => {
                self.after_change_cipher_spec = true;
                Ok(Record::Body { handshake: false, remaining: length })
            }
            _ if first => Err(Refusal::NotClientHello),
            // Application data, an alert, anything else: encrypted traffic has begun.
            _ => {
                self.done = true;
                Ok(Record::Header { have: 0 })
            }
        }
    }

    /// Handshake bytes from a record's payload: reassembles messages and checks ClientHellos.
    fn handshake(&mut self, mut chunk: &[u8]) -> Result<(), Refusal> {
        while !chunk.is_empty() && !self.done {
            if self.skip > 0 {
                let take = self.skip.min(chunk.len());
                self.skip -= take;
                chunk = &chunk[take..];
                continue;
            }
            if self.message.len() < 4 {
                let take = (4 - self.message.len()).min(chunk.len());
                self.message.extend_from_slice(&chunk[..take]);
                chunk = &chunk[take..];
                if self.message.len() < 4 {
                    return Ok(());
                }
                let length = u24(&self.message[1..4]);
                if self.message[0] != HANDSHAKE_CLIENT_HELLO {
                    if self.hellos_checked == 0 {
                        return Err(Refusal::NotClientHello);
                    }
                    self.skip = length;
                    self.message.clear();
                    continue;
                }
                if length > MAX_CLIENT_HELLO {
                    if self.after_change_cipher_spec {
                        // An encrypted Finished read as plaintext: the handshake is past hellos.
                        self.done = true;
                        return Ok(());
                    }
                    return Err(Refusal::Oversized);
                }
                self.message.reserve_exact(length);
            }
            let length = u24(&self.message[1..4]);
            let take = (4 + length - self.message.len()).min(chunk.len());
            self.message.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if self.message.len() == 4 + length {
                let hello = parse_client_hello(&self.message[4..]).ok_or(Refusal::Malformed)?;
                self.message = Vec::new();
                self.check(&hello)?;
                self.hellos_checked += 1;
            }
        }
        Ok(())
    }

    fn check(&self, hello: &ClientHello) -> Result<(), Refusal> {
        if hello.encrypted {
            return Err(Refusal::EncryptedClientHello);
        }
        match &hello.server_name {
            Some(name) if *name != self.expected_host => Err(Refusal::ServerNameMismatch),
            _ => Ok(()),
        }
    }
}

fn normalise_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn u24(bytes: &[u8]) -> usize {
    (usize::from(bytes[0]) << 16) | (usize::from(bytes[1]) << 8) | usize::from(bytes[2])
}

/// A cursor over a byte slice that never reads past its end.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        if count > self.bytes.len() {
            return None;
        }
        let (head, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|bytes| bytes[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    /// A vector with a one-byte length.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let length = self.u8()?;
        self.take(usize::from(length))
    }

    /// A vector with a two-byte length.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let length = self.u16()?;
        self.take(usize::from(length))
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Parses a ClientHello body (after the 4-byte handshake header), RFC 8446 §4.1.2 and RFC 6066
/// §3. `None` when it breaks the grammar, repeats an extension, or names more than one host.
pub fn parse_client_hello(body: &[u8]) -> Option<ClientHello> {
    let mut reader = Reader { bytes: body };
    let _legacy_version = reader.u16()?;
    let _random = reader.take(32)?;
    let session_id = reader.vec8()?;
    if session_id.len() > 32 {
        return None;
    }
    let suites = reader.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return None;
    }
    if reader.vec8()?.is_empty() {
        return None;
    }
    let mut hello = ClientHello { server_name: None, encrypted: false };
    if reader.is_empty() {
        // A hello without extensions (SSL 3-era clients) names no server.
        return Some(hello);
    }
    let mut extensions = Reader { bytes: reader.vec16()? };
    if !reader.is_empty() {
        return None;
    }
    // At most a few dozen extensions fit in a bounded hello; a list of seen types is enough.
    let mut seen: Vec<u16> = Vec::new();
    while !extensions.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vec16()?;
        if seen.contains(&kind) {
            return None;
        }
        seen.push(kind);
        match kind {
            EXTENSION_SERVER_NAME => hello.server_name = server_name(data)?,
            EXTENSION_ECH | EXTENSION_ESNI => hello.encrypted = true,
            _ => {}
        }
    }
    Some(hello)
}

/// The `host_name` of a `server_name` extension; `Some(None)` for an empty extension (which a
/// server sends back, and which names nothing).
fn server_name(data: &[u8]) -> Option<Option<String>> {
    if data.is_empty() {
        return Some(None);
    }
    let mut reader = Reader { bytes: data };
    let mut list = Reader { bytes: reader.vec16()? };
    if !reader.is_empty() || list.is_empty() {
        return None;
    }
    let mut name = None;
    while !list.is_empty() {
        let name_type = list.u8()?;
        let value = list.vec16()?;
        // host_name (0) is the only type there is, and there may be one (RFC 6066 §3).
        if name_type != 0 || name.is_some() {
            return None;
        }
        let valid = !value.is_empty()
            && value.len() <= 255
            && value.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !valid {
            return None;
        }
        name = Some(normalise_host(std::str::from_utf8(value).ok()?));
    }
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The first flight rustls writes as a client for `name` (a DNS name, or an IP: no SNI).
    fn rustls_hello(name: &str) -> Vec<u8> {
        crate::tls::install_crypto_provider();
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let server = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut connection = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
        let mut out = Vec::new();
        while connection.wants_write() {
            connection.write_tls(&mut out).unwrap();
        }
        out
    }

    /// A hand-made ClientHello record with these extensions (`(type, data)`).
    fn hello_with(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one suite
        body.extend([1, 0]); // null compression
        let mut list = Vec::new();
        for (kind, data) in extensions {
            list.extend(kind.to_be_bytes());
            list.extend(u16::try_from(data.len()).unwrap().to_be_bytes());
            list.extend(data);
        }
        body.extend(u16::try_from(list.len()).unwrap().to_be_bytes());
        body.extend(list);
        record(&handshake_message(HANDSHAKE_CLIENT_HELLO, &body))
    }

    fn handshake_message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut message = vec![kind];
        message.extend(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        message.extend(body);
        message
    }

    fn record(payload: &[u8]) -> Vec<u8> {
        record_of(CONTENT_HANDSHAKE, payload)
    }

    fn record_of(content_type: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![content_type, 3, 1];
        out.extend(u16::try_from(payload.len()).unwrap().to_be_bytes());
        out.extend(payload);
        out
    }

    fn sni(names: &[&str]) -> Vec<u8> {
        let mut list = Vec::new();
        for name in names {
            list.push(0);
            list.extend(u16::try_from(name.len()).unwrap().to_be_bytes());
            list.extend(name.as_bytes());
        }
        let mut data = u16::try_from(list.len()).unwrap().to_be_bytes().to_vec();
        data.extend(list);
        data
    }

    fn watch(host: &str, bytes: &[u8]) -> Result<usize, Refusal> {
        let mut watcher = HandshakeWatcher::new(host);
        watcher.feed(bytes)?;
        Ok(watcher.hellos_checked())
    }

    #[test]
    fn rustls_hellos_pass_for_their_own_host_only() {
        let hello = rustls_hello("api.hubapi.com");
        assert_eq!(watch("api.hubapi.com", &hello), Ok(1));
        assert_eq!(watch("API.HubAPI.com.", &hello), Ok(1), "case and a trailing dot do not matter");
        assert_eq!(watch("other.example", &hello), Err(Refusal::ServerNameMismatch));
        // An IP address is never sent as SNI: absent, so any CONNECT host passes.
        assert_eq!(watch("api.hubapi.com", &rustls_hello("127.0.0.1")), Ok(1));
    }

    #[test]
    fn byte_by_byte_is_the_same_as_all_at_once() {
        let hello = rustls_hello("other.example");
        let mut watcher = HandshakeWatcher::new("api.hubapi.com");
        let mut refused_at = None;
        for (at, byte) in hello.iter().enumerate() {
            if let Err(refusal) = watcher.feed(std::slice::from_ref(byte)) {
                refused_at = Some((at, refusal));
                break;
            }
        }
        assert_eq!(refused_at, Some((hello.len() - 1, Refusal::ServerNameMismatch)), "refused on the last byte");
    }

    #[test]
    fn a_hello_split_over_records_is_reassembled() {
        let whole = hello_with(&[(EXTENSION_SERVER_NAME, sni(&["evil.example"]))]);
        let message = &whole[5..];
        let mut split = record(&message[..10]);
        split.extend(record(&message[10..]));
        assert_eq!(watch("api.test", &split), Err(Refusal::ServerNameMismatch));
        let good = hello_with(&[(EXTENSION_SERVER_NAME, sni(&["api.test"]))]);
        let mut split = record(&good[5..15]);
        split.extend(record(&good[15..]));
        assert_eq!(watch("api.test", &split), Ok(1));
    }

    #[test]
    fn a_second_hello_after_hello_retry_request_is_checked_too() {
        let first = hello_with(&[(EXTENSION_SERVER_NAME, sni(&["api.test"]))]);
        let second = hello_with(&[(EXTENSION_SERVER_NAME, sni(&["evil.example"]))]);
        let mut watcher = HandshakeWatcher::new("api.test");
        watcher.feed(&first).unwrap();
        // The middlebox-compatibility ChangeCipherSpec may come between them (RFC 8446 §D.4).
        watcher.feed(&record_of(CONTENT_CHANGE_CIPHER_SPEC, &[1])).unwrap();
        assert_eq!(watcher.feed(&second), Err(Refusal::ServerNameMismatch));
    }

    #[test]
    fn encrypted_traffic_ends_the_inspection() {
        let mut watcher = HandshakeWatcher::new("api.test");
        watcher.feed(&hello_with(&[(EXTENSION_SERVER_NAME, sni(&["api.test"]))])).unwrap();
        watcher.feed(&record_of(CONTENT_CHANGE_CIPHER_SPEC, &[1])).unwrap();
        // A TLS 1.2 Finished: a handshake record whose bytes are ciphertext.
        watcher.feed(&record(&[0x01, 0xff, 0xff, 0xff, 9, 9, 9])).unwrap();
        assert!(watcher.done(), "an impossible length after ChangeCipherSpec is ciphertext");
        let mut watcher = HandshakeWatcher::new("api.test");
        watcher.feed(&hello_with(&[])).unwrap();
        watcher.feed(&record_of(23, &[0xaa; 40])).unwrap();
        assert!(watcher.done());
        // Whatever follows is not read.
        watcher.feed(&hello_with(&[(EXTENSION_SERVER_NAME, sni(&["evil.example"]))])).unwrap();
    }

    #[test]
    fn client_key_exchange_and_other_messages_pass() {
        let mut flight = hello_with(&[(EXTENSION_SERVER_NAME, sni(&["api.test"]))]);
        flight.extend(record(&handshake_message(16, &[0x55; 70])));
        let mut watcher = HandshakeWatcher::new("api.test");
        watcher.feed(&flight).unwrap();
        assert!(!watcher.done());
    }

    #[test]
    fn hidden_or_ambiguous_names_are_refused() {
        let named = (EXTENSION_SERVER_NAME, sni(&["api.test"]));
        assert_eq!(
            watch("api.test", &hello_with(&[named.clone(), (EXTENSION_ECH, vec![0; 8])])),
            Err(Refusal::EncryptedClientHello)
        );
        assert_eq!(watch("api.test", &hello_with(&[(EXTENSION_ESNI, vec![0; 8])])), Err(Refusal::EncryptedClientHello));
        assert_eq!(
            watch("api.test", &hello_with(&[named.clone(), named.clone()])),
            Err(Refusal::Malformed),
            "duplicate SNI extension"
        );
        assert_eq!(
            watch("api.test", &hello_with(&[(0, sni(&["api.test", "evil.example"]))])),
            Err(Refusal::Malformed),
            "two host names"
        );
        assert_eq!(watch("api.test", &hello_with(&[(0, sni(&["api.test\0evil"]))])), Err(Refusal::Malformed));
        assert_eq!(watch("api.test", &hello_with(&[])), Ok(1), "no SNI at all passes");
        assert_eq!(watch("api.test", &hello_with(&[(0, Vec::new())])), Ok(1), "an empty SNI extension names nothing");
    }

    #[test]
    fn broken_framing_is_refused_before_the_first_hello() {
        assert_eq!(watch("api.test", &record_of(23, &[0; 10])), Err(Refusal::NotClientHello));
        assert_eq!(watch("api.test", &record(&handshake_message(2, &[0; 40]))), Err(Refusal::NotClientHello));
        assert_eq!(watch("api.test", &[22, 2, 0, 0, 5]), Err(Refusal::Malformed), "not TLS 1.x");
        assert_eq!(watch("api.test", &[22, 3, 1, 0, 0]), Err(Refusal::Malformed), "empty record");
        assert_eq!(watch("api.test", &[22, 3, 1, 0xff, 0xff]), Err(Refusal::Malformed), "record too long");
        let oversized = record(&[1, 0, 0x80, 0]);
        assert_eq!(watch("api.test", &oversized), Err(Refusal::Oversized));
        // Trailing bytes after the extensions.
        let mut hello = hello_with(&[]);
        hello.push(0);
        let fixed_record_length = u16::try_from(hello.len() - 5).unwrap().to_be_bytes();
        hello[3..5].copy_from_slice(&fixed_record_length);
        let message_length = u32::try_from(hello.len() - 9).unwrap().to_be_bytes();
        hello[6..9].copy_from_slice(&message_length[1..]);
        assert_eq!(watch("api.test", &hello), Err(Refusal::Malformed));
        // Incomplete input is neither passed nor refused.
        let partial = rustls_hello("api.test");
        assert_eq!(watch("other.test", &partial[..partial.len() - 1]), Ok(0));
    }

    #[test]
    fn parse_never_reads_past_the_end() {
        let hello = rustls_hello("api.hubapi.com");
        let body = &hello[9..];
        for end in 0..body.len() {
            let _ = parse_client_hello(&body[..end]);
        }
        assert_eq!(parse_client_hello(body).unwrap().server_name.as_deref(), Some("api.hubapi.com"));
    }
}
