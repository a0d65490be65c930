//! The CONNECT target parser on every request target `http::Uri` accepts.
//!
//! Whatever it accepts must be a usable destination: a non-empty host without credentials,
//! brackets or uppercase, and a non-zero port.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::listen::connect::parse_authority;

fuzz_target!(|data: &[u8]| {
    let Ok(uri) = http::Uri::try_from(data) else { return };
    if let Ok((host, port)) = parse_authority(&uri) {
        assert!(!host.is_empty(), "{uri}");
        assert_ne!(port, 0, "{uri}");
        assert!(!host.contains('@'), "{uri}: credentials in {host}");
        assert!(!host.starts_with('[') && !host.ends_with(']'), "{uri}: {host}");
        assert!(!host.bytes().any(|b| b.is_ascii_uppercase()), "{uri}: {host}");
        assert!(uri.scheme().is_none(), "{uri}: absolute-form accepted");
    }
});
