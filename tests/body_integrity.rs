#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Bodies are byte-exact, both ways, whatever they hold (security review M1).
//!
//! A property test: random bodies (binary; status-line-like and frame-like pieces, hyper's own
//! error head among them; sizes from 0 to several MiB), written in random pieces with random
//! pauses, go through sluice and must arrive exactly as sent: the request body at the vendor,
//! the response body at the client. Through all three doors (reverse, absolute-form,
//! intercepted CONNECT), over HTTP/1.1 and HTTP/2 on the client side, to a vendor speaking
//! HTTP/1.1 or HTTP/2, with `Content-Length` and chunked framing. After each exchange a second
//! request on the same connection must get its own answer: a desynced connection fails there.
//!
//! `PROPTEST_CASES` sets the number of random cases (default 48); `PROPTEST_RNG_SEED` replays a run.
mod support;

use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use rand::{Rng, SeedableRng};

use support::streaming::{Door, DoorClient, Plan, Proto, StreamingVendor};
use support::TestSluice;

/// Bytes that look like an HTTP/1 head: what sluice's guard used to rewrite, and hyper's own
/// error head byte for byte (the shape the guard still answers, when hyper writes it).
const HEAD_LIKE: &[&str] = &[
    "HTTP/1.1 500 X\r\n\r\n",
    "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 10:00:00 GMT\r\n\r\n",
    "HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
    "HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n\r\n",
    "HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\noops",
    "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
    "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "HTTP/1.1 100 Continue\r\n\r\n",
];

/// Bytes that look like framing: chunk lines, the h2 preface, h2 frame headers.
const FRAME_LIKE: &[&[u8]] = &[
    b"0\r\n\r\n",
    b"5\r\nhello\r\n",
    b"ffffffffffffffff\r\n",
    b"\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    b"\x00\x00\x08\x07\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02",
    b"\x00\x00\x04\x03\x00\x00\x00\x00\x01\x00\x00\x00\x08",
    b"\x00\x00\x05\x00\x01\x00\x00\x00\x01hello",
];

/// One piece of a body, before it is cut into writes.
#[derive(Debug, Clone)]
enum Segment {
    Binary(Vec<u8>),
    HeadLike(usize),
    FrameLike(usize),
    /// `len` pseudo-random bytes from `seed` (large bodies without a huge value tree).
    Blob {
        seed: u64,
        len: usize,
    },
}

impl Segment {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Segment::Binary(bytes) => bytes.clone(),
            Segment::HeadLike(at) => HEAD_LIKE[*at].as_bytes().to_vec(),
            Segment::FrameLike(at) => FRAME_LIKE[*at].to_vec(),
            Segment::Blob { seed, len } => {
                let mut bytes = vec![0u8; *len];
                rand::rngs::StdRng::seed_from_u64(*seed).fill(&mut bytes[..]);
                bytes
            }
        }
    }
}

/// A segment written in one or two writes, each after its pause.
#[derive(Debug, Clone)]
struct Write {
    segment: Segment,
    /// Where to cut the segment into two writes, if at all.
    split: Option<prop::sample::Index>,
    pauses: (u8, u8),
}

#[derive(Debug, Clone)]
struct BodySpec {
    writes: Vec<Write>,
    content_length: bool,
}

impl BodySpec {
    fn plan(&self) -> Plan {
        let mut pieces = Vec::new();
        for write in &self.writes {
            let bytes = write.segment.bytes();
            let pause = |ms: u8| Duration::from_millis(u64::from(ms));
            match write.split.as_ref().filter(|_| bytes.len() > 1) {
                Some(at) => {
                    let at = at.index(bytes.len());
                    pieces.push((pause(write.pauses.0), Bytes::copy_from_slice(&bytes[..at])));
                    pieces.push((pause(write.pauses.1), Bytes::copy_from_slice(&bytes[at..])));
                }
                None => pieces.push((pause(write.pauses.0), Bytes::from(bytes))),
            }
        }
        Plan { pieces, content_length: self.content_length }
    }
}

fn segment() -> impl Strategy<Value = Segment> {
    prop_oneof![
        6 => prop::collection::vec(any::<u8>(), 0..2048).prop_map(Segment::Binary),
        6 => (0..HEAD_LIKE.len()).prop_map(Segment::HeadLike),
        4 => (0..FRAME_LIKE.len()).prop_map(Segment::FrameLike),
        1 => (any::<u64>(), 0usize..=3 * 1024 * 1024).prop_map(|(seed, len)| Segment::Blob { seed, len }),
    ]
}

fn pause() -> impl Strategy<Value = u8> {
    prop_oneof![6 => Just(0u8), 2 => Just(1u8), 1 => Just(5u8), 1 => Just(25u8)]
}

fn body() -> impl Strategy<Value = BodySpec> {
    let write = (segment(), prop::option::weighted(0.3, any::<prop::sample::Index>()), (pause(), pause()))
        .prop_map(|(segment, split, pauses)| Write { segment, split, pauses });
    (prop::collection::vec(write, 0..12), any::<bool>())
        .prop_map(|(writes, content_length)| BodySpec { writes, content_length })
}

/// Which way a case goes: door, client protocol, vendor protocol.
#[derive(Debug, Clone, Copy)]
struct Route {
    door: Door,
    client: Proto,
    vendor: Proto,
}

fn routes() -> Vec<Route> {
    let mut all = Vec::new();
    for door in [Door::Reverse, Door::Absolute, Door::Intercept] {
        for client in [Proto::Http1, Proto::Http2] {
            for vendor in [Proto::Http1, Proto::Http2] {
                all.push(Route { door, client, vendor });
            }
        }
    }
    all
}

/// sluice with one upstream per vendor protocol, each reachable through every door.
struct Bench {
    sluice: TestSluice,
    plain: StreamingVendor,
    tls: StreamingVendor,
}

impl Bench {
    async fn start() -> Self {
        let plain = StreamingVendor::start().await;
        let tls = StreamingVendor::start_tls().await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vendor-ca.pem"), tls.ca_pem.as_ref().unwrap()).unwrap();
        let sluice = TestSluice::start_in(
            dir,
            &format!(
                "intercept: {{ ca_cert: $DIR/ca.crt, ca_key: $DIR/ca.key }}
limits: {{ max_body_bytes: 67108864 }}
upstreams:
  - {{ name: plain, hosts: [plain.test], prefix: /plain, target: '{}', intercept: true, timeouts: {{ request: 60s }} }}
  - {{ name: tls, hosts: [tls.test], prefix: /tls, target: '{}', intercept: true, timeouts: {{ request: 60s }}, tls: {{ extra_ca: $DIR/vendor-ca.pem }} }}
",
                plain.url(),
                tls.url()
            ),
        )
        .await;
        Self { sluice, plain, tls }
    }

    /// One case: `request` up and `response` down, then a second exchange on the same connection.
    async fn exchange(&self, case: &str, route: Route, request: &Plan, response: &Plan) -> Result<(), String> {
        let (vendor, host, prefix) = match route.vendor {
            Proto::Http1 => (&self.plain, "plain.test", "/plain"),
            Proto::Http2 => (&self.tls, "tls.test", "/tls"),
        };
        vendor.plan(case, response.clone());
        let ca = self.sluice.ca_pem();
        let addr = self.sluice.running().proxy_addr;
        let mut client = DoorClient::connect(addr, route.door, route.client, host, prefix, &ca).await?;
        let answer = client.send(case, "/files/download", request).await?;
        if answer.status != 200 {
            return Err(format!(
                "status {} ({:?}): {}",
                answer.status,
                answer.headers,
                String::from_utf8_lossy(&answer.body)
            ));
        }
        let received = vendor.received(case).ok_or("the vendor saw no request")?;
        let wanted_version = match route.vendor {
            Proto::Http1 => http::Version::HTTP_11,
            Proto::Http2 => http::Version::HTTP_2,
        };
        if received.version != wanted_version {
            return Err(format!("the vendor was reached over {:?}", received.version));
        }
        if received.body != request.bytes() {
            return Err(format!(
                "request body changed: sent {} bytes, vendor got {}: {}",
                request.len(),
                received.body.len(),
                first_difference(&request.bytes(), &received.body)
            ));
        }
        if answer.body != response.bytes() {
            return Err(format!(
                "response body changed: vendor sent {} bytes, client got {}: {}",
                response.len(),
                answer.body.len(),
                first_difference(&response.bytes(), &answer.body)
            ));
        }
        if answer.headers.contains_key("proxy-status") {
            return Err(format!("a vendor answer carries sluice's Proxy-Status: {:?}", answer.headers));
        }
        // The same connection is still in step: the next answer is the next answer.
        let next = format!("{case}-next");
        let ping = Plan { pieces: vec![(Duration::ZERO, Bytes::from_static(b"ping"))], content_length: true };
        let answer = client.send(&next, "/ping", &ping).await.map_err(|e| format!("second exchange: {e}"))?;
        if answer.status != 200 || answer.body != b"pong" {
            return Err(format!("second exchange got {} {:?}", answer.status, String::from_utf8_lossy(&answer.body)));
        }
        Ok(())
    }
}

fn first_difference(sent: &[u8], got: &[u8]) -> String {
    let at = sent.iter().zip(got).position(|(a, b)| a != b).unwrap_or(sent.len().min(got.len()));
    let show =
        |bytes: &[u8]| String::from_utf8_lossy(&bytes[at.min(bytes.len())..(at + 80).min(bytes.len())]).into_owned();
    format!("first difference at byte {at}: sent {:?}, got {:?}", show(sent), show(got))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// The review's own reproduction, and the worst shapes, on every route and both framings:
/// a head-like write after a pause, hyper's exact error head alone in a write, an empty body,
/// and a several-MiB body with heads in the middle.
#[test]
fn known_hostile_bodies_are_byte_exact_on_every_route() {
    let rt = runtime();
    let bench = rt.block_on(Bench::start());
    let pause = Duration::from_millis(60);
    let piece = |text: &str| Bytes::copy_from_slice(text.as_bytes());
    let big = Segment::Blob { seed: 7, len: 3 * 1024 * 1024 + 17 }.bytes();
    let bodies = |content_length: bool| {
        vec![
            Plan {
                pieces: vec![
                    (Duration::ZERO, piece("hello")),
                    (pause, piece("HTTP/1.1 500 X\r\n\r\nAAAAAAAAAAAAAAAAAAAAAAAA")),
                ],
                content_length,
            },
            Plan { pieces: vec![(Duration::ZERO, piece("x")), (pause, piece(HEAD_LIKE[1]))], content_length },
            Plan { pieces: vec![(pause, piece(HEAD_LIKE[1]))], content_length },
            Plan { pieces: vec![], content_length },
            Plan {
                pieces: vec![
                    (Duration::ZERO, Bytes::copy_from_slice(&big[..1 << 20])),
                    (pause, piece(HEAD_LIKE[2])),
                    (pause, Bytes::copy_from_slice(&big[1 << 20..])),
                    (pause, Bytes::from_static(FRAME_LIKE[0])),
                ],
                content_length,
            },
        ]
    };
    let mut failures = Vec::new();
    let mut count = 0;
    for route in routes() {
        for content_length in [true, false] {
            for (index, plan) in bodies(content_length).iter().enumerate() {
                count += 1;
                let case = format!("known-{count}");
                if let Err(error) = rt.block_on(bench.exchange(&case, route, plan, plan)) {
                    failures.push(format!("{route:?} content_length={content_length} body #{index}: {error}"));
                }
            }
        }
    }
    rt.block_on(bench.sluice.shutdown());
    assert!(failures.is_empty(), "{} of {count} exchanges failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn random_bodies_round_trip_byte_exact_through_every_door() {
    let rt = runtime();
    let bench = rt.block_on(Bench::start());
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48);
    let config = Config { cases, failure_persistence: None, max_shrink_iters: 64, ..Config::default() };
    let mut runner = TestRunner::new(config);
    let all = routes();
    let strategy = (0..all.len(), body(), body());
    let serial = std::sync::atomic::AtomicU64::new(0);
    let result = runner.run(&strategy, |(route, request, response)| {
        let case = format!("random-{}", serial.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let route = all[route];
        rt.block_on(bench.exchange(&case, route, &request.plan(), &response.plan()))
            .map_err(|error| TestCaseError::fail(format!("{route:?}: {error}")))
    });
    rt.block_on(bench.sluice.shutdown());
    if let Err(error) = result {
        panic!("{error}");
    }
}
