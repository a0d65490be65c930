//! The caller-control headers (`Sluice-Deadline`, `Sluice-Max-Wait`, `Sluice-Batch`,
//! `Sluice-Consumer`, `Sluice-Priority`), with any bytes a client can put in them, once or twice
//! each.
//!
//! Parsing never panics; what it accepts is clamped (a deadline at most `MAX_CONTROL` from now,
//! a wait at most `MAX_CONTROL`, a consumer at most `MAX_CONSUMER_BYTES`), and what it refuses
//! names the header at fault.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sluice::controls::{
    RequestControls, BATCH_HEADER, CONSUMER_HEADER, DEADLINE_HEADER, MAX_CONSUMER_BYTES, MAX_CONTROL, MAX_WAIT_HEADER,
    PRIORITY_HEADER,
};

fuzz_target!(|data: &[u8]| {
    // The first byte says which headers are present (bits 0-4), the second which are sent
    // twice (bits 0-4); the rest, split on 0xff, are their values in that order.
    let [select, twice, rest @ ..] = data else { return };
    let (select, twice) = (*select, *twice);
    let mut values = rest.split(|&byte| byte == 0xff);
    let mut headers = http::HeaderMap::new();
    let names = [DEADLINE_HEADER, MAX_WAIT_HEADER, BATCH_HEADER, CONSUMER_HEADER, PRIORITY_HEADER];
    for (bit, name) in names.into_iter().enumerate() {
        if select & (1 << bit) == 0 {
            continue;
        }
        let Some(value) = values.next() else { break };
        let Ok(value) = http::HeaderValue::from_bytes(value) else { continue };
        if twice & (1 << bit) != 0 {
            headers.append(name, value.clone());
        }
        headers.append(name, value);
    }
    let now = tokio::time::Instant::now();
    match RequestControls::parse(&headers, now) {
        Ok(mut controls) => {
            if let Some(deadline) = controls.deadline {
                assert!(deadline >= now && deadline - now <= MAX_CONTROL, "{controls:?}");
            }
            if let Some(wait) = controls.max_wait {
                assert!(wait <= MAX_CONTROL, "{controls:?}");
            }
            if let Some(consumer) = &controls.consumer {
                assert!(consumer.len() <= MAX_CONSUMER_BYTES, "{controls:?}");
            }
            let left = Duration::from_millis(u64::from(select));
            let before = controls.max_wait;
            controls.narrow_wait(left);
            assert!(controls.max_wait.is_some_and(|wait| wait <= left && before.is_none_or(|before| wait <= before)));
        }
        Err(error) => {
            assert!(
                ["Sluice-Deadline", "Sluice-Max-Wait", "Sluice-Batch", "Sluice-Consumer", "Sluice-Priority"]
                    .contains(&error.header),
                "{error}"
            );
            assert!(error.to_string().starts_with(error.header), "{error}");
        }
    }
});
