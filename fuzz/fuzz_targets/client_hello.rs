//! The blind-tunnel handshake watcher on arbitrary client bytes, fed whole and in pieces.
//!
//! It must never panic, must reach the same verdict however the bytes are split, and must never
//! pass a ClientHello that names another host than the one it watches for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::tls::client_hello::{parse_client_hello, HandshakeWatcher};

const HOST: &str = "api.hubapi.com";

fuzz_target!(|data: &[u8]| {
    let (split, bytes) = match data.split_first() {
        Some((split, bytes)) => (usize::from(*split).max(1), bytes),
        None => return,
    };
    let mut whole = HandshakeWatcher::new(HOST);
    let verdict = whole.feed(bytes);
    let mut pieces = HandshakeWatcher::new(HOST);
    let mut piecewise = Ok(());
    for chunk in bytes.chunks(split) {
        piecewise = pieces.feed(chunk);
        if piecewise.is_err() {
            break;
        }
    }
    assert_eq!(verdict, piecewise, "the verdict depends on how the bytes were split");
    assert_eq!(whole.hellos_checked(), pieces.hellos_checked());
    // One record holding exactly one ClientHello: if the watcher passed it, it names this host
    // or none, and does not hide its name.
    if verdict.is_ok() && whole.hellos_checked() > 0 && bytes.len() > 9 && bytes[0] == 22 && bytes[5] == 1 {
        let record = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
        let message = (usize::from(bytes[6]) << 16) | (usize::from(bytes[7]) << 8) | usize::from(bytes[8]);
        if record == bytes.len() - 5 && message == bytes.len() - 9 {
            let hello = parse_client_hello(&bytes[9..]).expect("a hello the watcher passed parses");
            assert!(!hello.encrypted, "{hello:?} passed");
            assert!(hello.server_name.as_deref().is_none_or(|name| name == HOST), "{hello:?} passed");
        }
    }
});
