//! What the probe keeps of one exchange: the vendor's answer (its status, the fields some vendor
//! profile reads, the body of a refusal) and when it was sent and answered. The leaf of the probe
//! room: sending fills it in, inference, the report and the plot read it.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use crate::vendor;

/// The vendor's answer, as much of it as the probe keeps.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    /// The fields some vendor profile reads ([`vendor::is_rate_limit_field`]), and
    /// `content-type`. Nothing else: the probe records no cookies, ids or account data.
    pub headers: HeaderMap,
    /// The first [`MAX_KEPT_BODY`] bytes of an answer that is not a success, to tell an over-limit
    /// answer by its body (HubSpot's `policyName`, Salesforce's `errorCode`). A successful
    /// answer's body is account data and is never kept.
    pub body: Option<Bytes>,
}

/// The most of a refusal's body kept: what the profiles read to classify one (as the Feedback
/// layer does).
pub const MAX_KEPT_BODY: usize = 64 * 1024;

impl Answer {
    /// Keeps what the probe records of a response head: the rate-limit fields and content-type.
    pub fn new(status: StatusCode, headers: &HeaderMap, body: Option<Bytes>) -> Self {
        let mut kept = HeaderMap::new();
        for (name, value) in headers {
            if vendor::is_rate_limit_field(name.as_str()) || name == http::header::CONTENT_TYPE {
                kept.append(name.clone(), value.clone());
            }
        }
        Self { status, headers: kept, body }
    }

    /// 2xx or 3xx.
    pub fn is_success(&self) -> bool {
        self.status.is_success() || self.status.is_redirection()
    }
}

/// Which part of the probe sent a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// The doubling ramp.
    Ramp,
    /// The one request after the vendor's pause, to see how it recovers.
    Recovery,
}

/// One request and its answer.
#[derive(Debug, Clone)]
pub struct Sample {
    /// 1 for the first request sent, and so on (send order).
    pub seq: u64,
    /// The ramp step it was sent in (1 for the first); the recovery request keeps the last.
    pub step: u32,
    /// The step's rate, requests per second.
    pub rate: f64,
    pub phase: Phase,
    /// When it was sent and answered, from the probe's start.
    pub sent: Duration,
    pub answered: Duration,
    /// Wall time when the answer arrived: what a vendor's reset timestamps are read against.
    pub wall: SystemTime,
    pub answer: Answer,
}

impl Sample {
    /// The answer as the vendor profiles read it.
    pub fn response(&self) -> vendor::Response<'_> {
        vendor::Response {
            status: self.answer.status,
            headers: &self.answer.headers,
            body: self.answer.body.as_deref(),
            now: self.wall,
        }
    }
}
