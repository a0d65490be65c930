#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `sluice probe`, the real binary, against the mock vendor in each of the dialects it must
//! tell apart (`support::dialects`): the profile, the windows and the over-limit answer it
//! finds, the config it suggests (checked by the real `sluice check`), the plot it draws, the
//! budget it keeps, the pause it waits out, and the errors it stops on. Windows are short and
//! limits small so each probe takes seconds.
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use support::dialects::{Counting, Dialect, DialectVendor};
use support::process::{run_sluice, Finished};
use support::MockCrm;

const WAIT: Duration = Duration::from_secs(90);
const TOKEN: &str = "probe-token";

/// The upstream every probe here targets: the mock, with the vendor's token injected.
fn upstream(mock: &MockCrm) -> String {
    format!(
        "  - name: vendor\n    prefix: /vendor\n    target: '{}'\n    probe_path: /crm/v3/objects/contacts\n    \
         credentials: {{ value_env: PROBE_TEST_TOKEN, prefix: 'Bearer ' }}\n",
        mock.url()
    )
}

fn write_config(dir: &Path, upstreams: &str) -> PathBuf {
    let path = dir.join("sluice.yaml");
    std::fs::write(&path, format!("listen: {{ proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }}\nupstreams:\n{upstreams}"))
        .unwrap();
    path
}

/// Runs `sluice probe -c CONFIG --upstream vendor ARGS...` with the vendor's token (or `token`),
/// off the runtime so the mock keeps answering.
async fn probe(config: &Path, args: &[&str], token: &str) -> Finished {
    let mut all: Vec<String> =
        ["probe", "-c", config.to_str().unwrap(), "--upstream", "vendor"].iter().map(|s| s.to_string()).collect();
    all.extend(args.iter().map(|s| s.to_string()));
    let cwd = config.parent().unwrap().to_path_buf();
    let token = token.to_owned();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        run_sluice(&args, &[("PROBE_TEST_TOKEN", token.as_str())], &cwd, WAIT)
    })
    .await
    .unwrap()
}

fn describe(finished: &Finished) -> String {
    format!("status {:?}\nstdout:\n{}\nstderr:\n{}", finished.status, finished.stdout, finished.stderr)
}

fn report(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("probe.json")).unwrap()).unwrap()
}

fn window<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["findings"]["windows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == name)
        .unwrap_or_else(|| panic!("no window {name}: {:#}", report["findings"]))
}

/// The suggested quotas as (name, limit, per, window).
fn quotas(report: &Value) -> Vec<(String, u64, String, String)> {
    report["suggested"]["quotas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            (
                q["name"].as_str().unwrap().to_owned(),
                q["limit"].as_u64().unwrap(),
                q["per"].as_str().unwrap().to_owned(),
                q["window"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn quota(name: &str, limit: u64, per: &str, window: &str) -> (String, u64, String, String) {
    (name.to_owned(), limit, per.to_owned(), window.to_owned())
}

/// The real `sluice check` accepts a config whose upstream carries `suggested.yaml` as written.
async fn assert_sluice_check_accepts(out: &Path, mock: &MockCrm) {
    let block = std::fs::read_to_string(out.join("suggested.yaml")).unwrap();
    let indented: String = block.lines().map(|line| format!("    {line}\n")).collect();
    let config = out.join("with-suggestion.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: {{ proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }}\nupstreams:\n  - name: vendor\n    prefix: /vendor\n    target: '{}'\n{indented}",
            mock.url()
        ),
    )
    .unwrap();
    let cwd = out.to_path_buf();
    let finished =
        tokio::task::spawn_blocking(move || run_sluice(&["check", "-c", config.to_str().unwrap()], &[], &cwd, WAIT))
            .await
            .unwrap();
    assert!(finished.success(), "sluice check refused the suggestion:\n{block}\n{}", describe(&finished));
}

/// `probe.svg` is well-formed XML with an `<svg>` root in the SVG namespace, and draws the
/// requests sent and (when there were any) the over-limit answers.
fn assert_valid_svg(out: &Path, over_limit: bool) {
    let text = std::fs::read_to_string(out.join("probe.svg")).unwrap();
    let document = roxmltree::Document::parse(&text).unwrap_or_else(|error| panic!("{error}:\n{text}"));
    let root = document.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(root.tag_name().namespace(), Some("http://www.w3.org/2000/svg"));
    let with_class = |class: &str| root.descendants().filter(|node| node.attribute("class") == Some(class)).count();
    assert_eq!(with_class("sent"), 1, "the requests-sent line");
    if over_limit {
        assert!(with_class("over-limit") >= 1, "over-limit answers are marked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubspot_rolling_limit_with_daily_headers() {
    let mock = MockCrm::start().await;
    let vendor = DialectVendor::new(Dialect::Hubspot { daily: 1000 }, Counting::Rolling, 10, Duration::from_secs(2));
    vendor.install(&mock);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &upstream(&mock));
    let out = dir.path().join("out");
    let finished = probe(&config, &["--out", out.to_str().unwrap()], TOKEN).await;
    assert_eq!(finished.status.code(), Some(0), "{}", describe(&finished));
    let report = report(&out);

    assert_eq!(report["findings"]["profile"]["kind"], "hubspot", "{:#}", report["findings"]["profile"]);
    let rolling = window(&report, "rolling");
    assert_eq!(rolling["limit"], 10);
    assert_eq!(rolling["length"], 2000);
    assert_eq!(rolling["counting"], "rolling", "{}", rolling["counting_evidence"]);
    assert_eq!(rolling["counting_observed"], true);
    assert_eq!(rolling["exhausted"], true);
    assert_eq!(window(&report, "daily")["limit"], 1000);
    assert_eq!(
        quotas(&report),
        [quota("rolling", 9, "2s", "rolling"), quota("daily", 900, "1d", "fixed")],
        "{}",
        report["suggested"]["yaml"]
    );
    assert_eq!(report["suggested"]["limit_headers"], "hubspot");
    assert!(report["suggested"]["problem"].is_null());
    let yaml = std::fs::read_to_string(out.join("suggested.yaml")).unwrap();
    assert!(yaml.contains("\nlimit_headers: hubspot\n"), "{yaml}");
    assert!(yaml.contains("leaves 1 of the vendor's 10 per window"), "the margin is stated: {yaml}");

    let over = &report["findings"]["over_limit"];
    assert_eq!(over["status"], 429);
    assert_eq!(over["retry_after"], "none", "HubSpot sends no Retry-After");
    assert!(over["body"].as_str().unwrap().contains("policyName=TEN_SECONDLY_ROLLING"), "{over:#}");

    // Every request the vendor saw was a GET with the injected credential, within the budget.
    let arrivals = vendor.arrivals();
    assert_eq!(arrivals.len() as u64, report["sent"].as_u64().unwrap());
    assert!(arrivals.len() <= 100);
    assert!(arrivals.iter().all(|a| a.method == "GET" && a.status != 401 && a.status != 404), "{arrivals:?}");
    // No Retry-After: the probe held off for the profile's pause, the 2 s interval.
    assert!(report["hold"]["source"].as_str().unwrap().contains("hubspot profile"), "{:#}", report["hold"]);
    assert_eq!(report["hold"]["wait_ms"], 2000);
    let refused = arrivals.iter().find(|a| !a.accepted).unwrap();
    let recovery = arrivals.last().unwrap();
    assert!(recovery.accepted && recovery.at >= refused.at + Duration::from_secs(2), "{arrivals:?}");
    assert_eq!(report["findings"]["recovery"]["accepted"], true);

    assert!(finished.stdout.contains("Profile: hubspot"), "{}", finished.stdout);
    assert!(finished.stdout.contains("limit_headers: hubspot"), "{}", finished.stdout);
    assert!(finished.stderr.contains("probe: step 1: 1 rps"), "progress on stderr: {}", finished.stderr);
    assert!(finished.stderr.contains("over-limit answer: 429"), "{}", finished.stderr);
    assert!(out.join("summary.txt").exists());
    assert_sluice_check_accepts(&out, &mock).await;
    assert_valid_svg(&out, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salesforce_daily_counter_with_a_403_over_limit_answer() {
    let mock = MockCrm::start().await;
    let vendor = DialectVendor::new(Dialect::Salesforce, Counting::Rolling, 15, Duration::from_secs(86_400));
    vendor.install(&mock);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &upstream(&mock));
    let out = dir.path().join("out");
    let finished = probe(&config, &["--out", out.to_str().unwrap()], TOKEN).await;
    assert_eq!(finished.status.code(), Some(0), "{}", describe(&finished));
    let report = report(&out);

    assert_eq!(report["findings"]["profile"]["kind"], "salesforce");
    let usage = window(&report, "api-usage");
    assert_eq!((usage["limit"].as_u64(), usage["length"].as_u64()), (Some(15), Some(86_400_000)));
    assert_eq!(usage["exhausted"], true);
    assert_eq!(usage["measured"], 15, "{}", usage["measured_evidence"]);
    assert_eq!(quotas(&report), [quota("api-usage", 14, "1d", "rolling")], "{}", report["suggested"]["yaml"]);
    assert_eq!(report["suggested"]["limit_headers"], "salesforce");
    let over = &report["findings"]["over_limit"];
    assert_eq!((over["status"].as_u64(), over["class"].as_str()), (Some(403), Some("daily")));
    assert!(over["body"].as_str().unwrap().contains("errorCode=REQUEST_LIMIT_EXCEEDED"), "{over:#}");
    // Salesforce says nothing of when to come back, so nothing more was sent.
    assert!(report["hold"]["skipped"].as_str().unwrap().contains("said nothing"), "{:#}", report["hold"]);
    assert_eq!(vendor.arrivals().len(), 16, "15 accepted, one refused, no recovery request");
    assert_sluice_check_accepts(&out, &mock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ietf_ratelimit_fields_with_fixed_windows() {
    let mock = MockCrm::start().await;
    let vendor = DialectVendor::new(Dialect::Ietf, Counting::Fixed, 10, Duration::from_secs(2));
    vendor.install(&mock);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &upstream(&mock));
    let out = dir.path().join("out");
    let finished = probe(&config, &["--out", out.to_str().unwrap()], TOKEN).await;
    assert_eq!(finished.status.code(), Some(0), "{}", describe(&finished));
    let report = report(&out);

    assert_eq!(report["findings"]["profile"]["kind"], "ietf");
    assert!(report["findings"]["reset"]["form"].as_str().unwrap().starts_with("seconds from now"));
    let default = window(&report, "default");
    assert_eq!((default["limit"].as_u64(), default["length"].as_u64()), (Some(10), Some(2000)));
    assert_eq!(default["counting"], "fixed", "{}", default["counting_evidence"]);
    assert_eq!(default["epoch_aligned"], true);
    assert_eq!(quotas(&report), [quota("default", 9, "2s", "fixed")], "{}", report["suggested"]["yaml"]);
    assert_eq!(report["suggested"]["limit_headers"], "ietf");
    assert!(report["findings"]["over_limit"]["retry_after"].as_str().unwrap().starts_with("delta-seconds"));
    assert!(report["findings"]["recovery"]["description"].as_str().unwrap().contains("back whole"));
    assert_sluice_check_accepts(&out, &mock).await;
    assert_valid_svg(&out, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_ratelimit_with_a_reset_timestamp() {
    let mock = MockCrm::start().await;
    let vendor = DialectVendor::new(Dialect::XRateLimit, Counting::Fixed, 10, Duration::from_secs(2));
    vendor.install(&mock);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &upstream(&mock));
    let out = dir.path().join("out");
    let finished = probe(&config, &["--out", out.to_str().unwrap()], TOKEN).await;
    assert_eq!(finished.status.code(), Some(0), "{}", describe(&finished));
    let report = report(&out);

    assert_eq!(report["findings"]["profile"]["kind"], "x-ratelimit");
    assert_eq!(report["findings"]["reset"]["unit"], "epoch", "{:#}", report["findings"]["reset"]);
    let default = window(&report, "default");
    assert_eq!(default["limit"], 10);
    assert_eq!(default["length"], 2000, "from the resets' spacing: {}", default["length_evidence"]);
    assert_eq!(default["counting"], "fixed", "{}", default["counting_evidence"]);
    assert_eq!(report["suggested"]["limit_headers"], "{ profile: x-ratelimit, reset: epoch }");
    assert_eq!(quotas(&report), [quota("default", 9, "2s", "fixed")], "{}", report["suggested"]["yaml"]);
    // No Retry-After: the probe waited for the reset the vendor announced.
    let arrivals = vendor.arrivals();
    let refused = arrivals.iter().find(|a| !a.accepted).unwrap();
    let recovery = arrivals.last().unwrap();
    assert!(recovery.at >= refused.come_back.unwrap(), "{arrivals:?}");
    assert!(recovery.accepted);
    assert_sluice_check_accepts(&out, &mock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_sent_until_retry_after_has_passed() {
    let mock = MockCrm::start().await;
    let vendor = DialectVendor::new(Dialect::Ietf, Counting::Rolling, 10, Duration::from_secs(3));
    vendor.install(&mock);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &upstream(&mock));
    let out = dir.path().join("out");
    let finished = probe(&config, &["--out", out.to_str().unwrap()], TOKEN).await;
    assert_eq!(finished.status.code(), Some(0), "{}", describe(&finished));
    let report = report(&out);
    let arrivals = vendor.arrivals();
    let first_refusal = arrivals.iter().position(|a| !a.accepted).unwrap();
    let announced = arrivals[first_refusal].come_back.expect("the refusal carried Retry-After");
    assert!(report["hold"]["source"].as_str().unwrap().starts_with("Retry-After: "), "{:#}", report["hold"]);

    // The probe sent one request after it had the over-limit answer: the recovery request.
    let samples = report["samples"].as_array().unwrap();
    let over_seq = report["findings"]["over_limit"]["seq"].as_u64().unwrap();
    let over = samples.iter().find(|s| s["seq"] == over_seq).unwrap();
    let answered = over["answered_ms"].as_f64().unwrap();
    let after: Vec<&Value> = samples.iter().filter(|s| s["sent_ms"].as_f64().unwrap() > answered).collect();
    assert_eq!(after.len(), 1, "{after:#?}");
    assert_eq!(after[0]["phase"], "recovery");
    // It reached the vendor after the instant Retry-After named, and so did nothing else but
    // what was already in flight when the answer came.
    let in_flight = samples
        .iter()
        .filter(|s| s["seq"].as_u64() > Some(over_seq) && s["sent_ms"].as_f64().unwrap() <= answered)
        .count();
    let inside: Vec<_> = arrivals[first_refusal + 1..].iter().filter(|a| a.at < announced).collect();
    assert!(inside.len() <= in_flight, "sent during the pause: {inside:?}");
    let recovery = arrivals.last().unwrap();
    assert!(recovery.at >= announced, "the recovery request came {:?} early", announced - recovery.at);
    assert_eq!(arrivals.len(), samples.len());
    assert_eq!(
        window(&report, "default")["counting"],
        "rolling",
        "{}",
        window(&report, "default")["counting_evidence"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_is_never_exceeded() {
    let mock = MockCrm::start().await;
    let vendor =
        DialectVendor::new(Dialect::Hubspot { daily: 100_000 }, Counting::Rolling, 1000, Duration::from_secs(10));
    vendor.install(&mock);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &upstream(&mock));
    let out = dir.path().join("out");
    let finished = probe(&config, &["--budget", "12", "--out", out.to_str().unwrap()], TOKEN).await;
    assert_eq!(finished.status.code(), Some(3), "the budget ran out first: {}", describe(&finished));
    assert_eq!(vendor.arrivals().len(), 12, "the vendor saw exactly the budget");
    let report = report(&out);
    assert_eq!(report["sent"], 12);
    assert_eq!(report["stopped"]["reason"], "budget");
    assert!(report["findings"]["over_limit"].is_null());
    // What the headers said is still reported, and still makes a valid block.
    assert_eq!(quotas(&report)[0], quota("rolling", 900, "10s", "rolling"), "{}", report["suggested"]["yaml"]);
    assert!(finished.stdout.contains("budget of 12 requests ran out"), "{}", finished.stdout);
    assert_sluice_check_accepts(&out, &mock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_exit_non_zero_with_a_clear_message() {
    let mock = MockCrm::start().await;
    let vendor = DialectVendor::new(Dialect::Hubspot { daily: 1000 }, Counting::Rolling, 10, Duration::from_secs(2));
    vendor.install(&mock);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &upstream(&mock));

    let bad_path = probe(&config, &["--path", "/crm/v3/objects/nope"], TOKEN).await;
    assert_eq!(bad_path.status.code(), Some(1), "{}", describe(&bad_path));
    assert!(bad_path.stderr.contains("404") && bad_path.stderr.contains("--path"), "{}", describe(&bad_path));

    let bad_token = probe(&config, &[], "wrong-token").await;
    assert_eq!(bad_token.status.code(), Some(1), "{}", describe(&bad_token));
    assert!(bad_token.stderr.contains("authentication failed: the vendor answered 401"), "{}", describe(&bad_token));
    assert_eq!(vendor.arrivals().len(), 2, "each stopped at its first answer");

    let method = probe(&config, &["--method", "TRACE"], TOKEN).await;
    assert_eq!(method.status.code(), Some(1), "{}", describe(&method));
    assert!(method.stderr.contains("never forwards TRACE"), "{}", describe(&method));

    // A host the egress guard refuses (it resolves to loopback, and no `target` names it).
    let guarded = write_config(
        dir.path(),
        "  - name: vendor\n    hosts: [localhost]\n    probe_path: /crm/v3/objects/contacts\n",
    );
    let denied = probe(&guarded, &[], TOKEN).await;
    assert_eq!(denied.status.code(), Some(1), "{}", describe(&denied));
    assert!(denied.stderr.contains("egress denied"), "{}", describe(&denied));

    let pathless =
        write_config(dir.path(), &format!("  - name: vendor\n    prefix: /vendor\n    target: '{}'\n", mock.url()));
    let no_path = probe(&pathless, &[], TOKEN).await;
    assert_eq!(no_path.status.code(), Some(1), "{}", describe(&no_path));
    assert!(
        no_path.stderr.contains("no path to probe") && no_path.stderr.contains("upstreams[0].probe_path"),
        "{}",
        describe(&no_path)
    );
    assert_eq!(vendor.arrivals().len(), 2, "none of these reached the vendor");
}
