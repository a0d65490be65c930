//! `AdmissionReview` in, `AdmissionReview` out, in the shape of kube-rs'
//! `examples/admission_controller.rs`: parse the request, let [`inject`] decide, wrap its patch.
//!
//! The one rule here: **a pod is never refused**. Whatever goes wrong, whether an unreadable
//! object, a bug while building the patch, or a patch that does not serialise, the answer is
//! `allowed: true` with no patch and a warning the creator sees (`kubectl` prints it). Only a body
//! without a readable `request.uid` gets an HTTP error, because no valid answer can be written
//! for it; the API server then applies the webhook's `failurePolicy` (the chart defaults to
//! `Ignore`).

use kube_core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube_core::{DynamicObject, Status, TypeMeta};
use serde_json::Value;

use super::inject::{self, Decision, Settings};

/// What happened to one review, for the log line and the tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A patch was returned.
    Injected,
    /// The pod (or a non-pod object) was allowed unchanged, on purpose.
    Skipped(String),
    /// Something failed; the pod was allowed unchanged with a warning.
    Failed(String),
}

/// The body could not be answered at all: not JSON, or no `request.uid`.
#[derive(Debug, thiserror::Error)]
#[error("not an AdmissionReview: {0}")]
pub struct Unanswerable(String);

/// Answers one review body.
pub fn review(body: &[u8], settings: &Settings) -> Result<(AdmissionReview<DynamicObject>, Outcome), Unanswerable> {
    let parsed: Result<AdmissionReview<DynamicObject>, _> = serde_json::from_slice(body);
    let request: AdmissionRequest<DynamicObject> = match parsed.map_err(|e| e.to_string()).and_then(|review| {
        review.try_into().map_err(|error: kube_core::admission::ConvertAdmissionReviewError| error.to_string())
    }) {
        Ok(request) => request,
        Err(reason) => return allow_unparsed(body, &reason),
    };
    let (response, outcome) = answer(&request, settings);
    log(&request, &outcome);
    Ok((response.into_review(), outcome))
}

fn answer(request: &AdmissionRequest<DynamicObject>, settings: &Settings) -> (AdmissionResponse, Outcome) {
    let allow = AdmissionResponse::from(request);
    if request.kind.kind != "Pod" || !request.kind.group.is_empty() || request.sub_resource.is_some() {
        return (allow, Outcome::Skipped(format!("not a pod ({})", request.kind.kind)));
    }
    if request.operation != Operation::Create {
        return (allow, Outcome::Skipped(format!("operation {:?}", request.operation)));
    }
    let Some(object) = &request.object else {
        return (allow, Outcome::Skipped("no object".to_owned()));
    };
    let pod = match serde_json::to_value(object).and_then(serde_json::from_value::<k8s_openapi::api::core::v1::Pod>) {
        Ok(pod) => pod,
        Err(error) => return failed(allow, format!("cannot read the pod: {error}")),
    };
    match inject::inject(&pod, settings) {
        Ok(Decision::Skip(reason)) => (allow, Outcome::Skipped(reason.to_string())),
        Ok(Decision::Inject { patch, warnings }) => match allow.clone().with_patch(patch) {
            Ok(mut response) => {
                if !warnings.is_empty() {
                    response.warnings = Some(warnings);
                }
                (response, Outcome::Injected)
            }
            Err(error) => failed(allow, error.to_string()),
        },
        Err(error) => failed(allow, error.to_string()),
    }
}

fn log(request: &AdmissionRequest<DynamicObject>, outcome: &Outcome) {
    let namespace = request.namespace.as_deref().unwrap_or_default();
    // A pod created from a template has no name yet, only its `generateName` prefix.
    let metadata = request.object.as_ref().map(|object| &object.metadata);
    let name = metadata.and_then(|meta| meta.name.as_deref().or(meta.generate_name.as_deref())).unwrap_or_default();
    let uid = request.uid.as_str();
    match outcome {
        Outcome::Injected => tracing::info!(uid, namespace, name, "Sidecar injected."),
        Outcome::Skipped(reason) => tracing::info!(uid, namespace, name, reason = %reason, "Pod left unchanged."),
        Outcome::Failed(reason) => {
            tracing::warn!(uid, namespace, name, error = %reason, "Injection failed; pod allowed unchanged.")
        }
    }
}

/// The review as JSON for the API server. kube-core serialises `response.patch` (bytes) as an
/// array of numbers; the API documents it as base64, which is what is sent here.
pub fn encode(review: &AdmissionReview<DynamicObject>) -> serde_json::Result<Vec<u8>> {
    let mut json = serde_json::to_value(review)?;
    if let Some(patch) = review.response.as_ref().and_then(|response| response.patch.clone()) {
        if let Some(slot) = json.pointer_mut("/response/patch") {
            *slot = serde_json::to_value(k8s_openapi::ByteString(patch))?;
        }
    }
    serde_json::to_vec(&json)
}

/// Allowed unchanged, with the reason as a warning to the pod's creator.
fn failed(mut response: AdmissionResponse, reason: String) -> (AdmissionResponse, Outcome) {
    response.warnings = Some(vec![format!("sluice: sidecar not injected: {reason}")]);
    (response, Outcome::Failed(reason))
}

/// The typed parse failed (e.g. an object kube-core cannot read): answer by the raw `uid`.
fn allow_unparsed(body: &[u8], reason: &str) -> Result<(AdmissionReview<DynamicObject>, Outcome), Unanswerable> {
    let raw: Value = serde_json::from_slice(body).map_err(|error| Unanswerable(error.to_string()))?;
    let uid = raw
        .pointer("/request/uid")
        .and_then(Value::as_str)
        .ok_or_else(|| Unanswerable(format!("{reason}; and no request.uid")))?;
    let api_version =
        raw.get("apiVersion").and_then(Value::as_str).unwrap_or(kube_core::admission::META_API_VERSION_V1).to_owned();
    // `invalid` is the one constructor that needs no parsed request; turn it into an allow.
    let mut response = AdmissionResponse::invalid(reason);
    response.types = TypeMeta { api_version, kind: kube_core::admission::META_KIND.to_owned() };
    response.uid = uid.to_owned();
    response.allowed = true;
    response.result = Status::success();
    let (response, outcome) = failed(response, format!("unreadable review: {reason}"));
    tracing::warn!(uid, error = %reason, "Unreadable review; allowed unchanged.");
    Ok((response.into_review(), outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review_json(object: Value, operation: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "crm",
                "operation": operation,
                "userInfo": {"username": "admin"},
                "object": object,
                "oldObject": null,
                "dryRun": false
            }
        }))
        .unwrap()
    }

    fn pod() -> Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "app", "namespace": "crm"},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}
        })
    }

    #[test]
    fn a_pod_gets_a_patch_and_the_uid_back() {
        let (review, outcome) = review(&review_json(pod(), "CREATE"), &Settings::default()).unwrap();
        assert_eq!(outcome, Outcome::Injected);
        let response = review.response.clone().unwrap();
        assert!(response.allowed);
        assert_eq!(response.uid, "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert!(response.patch.is_some());
        let json: Value = serde_json::from_slice(&encode(&review).unwrap()).unwrap();
        assert_eq!(json["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(json["kind"], "AdmissionReview");
        assert_eq!(json["response"]["patchType"], "JSONPatch");
        let patch: k8s_openapi::ByteString = serde_json::from_value(json["response"]["patch"].clone()).unwrap();
        assert!(patch.0.starts_with(b"[{\"op\":\"add\""), "{}", String::from_utf8_lossy(&patch.0));
    }

    #[test]
    fn updates_are_allowed_untouched() {
        let (review, outcome) = review(&review_json(pod(), "UPDATE"), &Settings::default()).unwrap();
        assert!(matches!(outcome, Outcome::Skipped(_)));
        assert!(review.response.unwrap().patch.is_none());
    }

    #[test]
    fn an_unreadable_pod_is_allowed_with_a_warning() {
        let broken = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
            "spec": {"containers": "not a list"}
        });
        let (review, outcome) = review(&review_json(broken, "CREATE"), &Settings::default()).unwrap();
        assert!(matches!(outcome, Outcome::Failed(_)), "{outcome:?}");
        let response = review.response.unwrap();
        assert!(response.allowed);
        assert!(response.patch.is_none());
        assert!(response.warnings.unwrap()[0].contains("not injected"));
    }

    #[test]
    fn a_review_kube_core_cannot_read_is_still_allowed_by_uid() {
        let body = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"abc","operation":"CREATE"}}"#;
        let (review, outcome) = review(body, &Settings::default()).unwrap();
        assert!(matches!(outcome, Outcome::Failed(_)));
        let json = serde_json::to_value(&review).unwrap();
        assert_eq!(json["response"]["uid"], "abc");
        assert_eq!(json["response"]["allowed"], true);
        assert_eq!(json["apiVersion"], "admission.k8s.io/v1");
    }

    #[test]
    fn garbage_has_no_answer() {
        assert!(review(b"not json", &Settings::default()).is_err());
        assert!(review(b"{}", &Settings::default()).is_err());
    }
}
