//! The config parser and validator on arbitrary UTF-8: an error naming a key is fine, a panic
//! (or a hang) is not. `Config::from_yaml` does no I/O: files named in the config are read later.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(error) = sluice::config::Config::from_yaml(text) {
            // Rendering the error walks every problem and its line: it must not panic either.
            let _ = error.to_string();
        }
    }
});
