//! The notifier's webhooks against a real HTTPS server on loopback (`cairn_tests::hook`),
//! through the real client: TLS with a test CA, the address refusal and its allow-list,
//! redirects, errors, bounds and the timeout.

use std::time::{Duration, Instant};

use cairn_tests::hook::TestCa;
use serde_json::json;

use super::address::AllowList;
use super::{Notice, Notifier, NotifyConfig, webhook};

const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

fn notice() -> Notice {
    Notice {
        subject: "cairn: recovery of VM alpha succeeded".into(),
        text: "Recovery job j succeeded.\n".into(),
        json: json!({"event": "recovery.finished", "job": "j", "state": "Succeeded"}),
    }
}

/// A notifier that trusts `ca` (when given) and allows `allow`; one attempt unless told.
fn notifier(ca: Option<&TestCa>, allow: &[&str], attempts: u32) -> Notifier {
    let mut config = NotifyConfig::new(None, "cairn@test.example".into());
    config.attempts = attempts;
    config.webhook_allow = AllowList::parse(allow).unwrap();
    if let Some(ca) = ca {
        let dir = tempfile::tempdir().unwrap();
        config.webhook_roots = webhook::read_ca_file(&ca.write_pem(dir.path())).unwrap();
    }
    Notifier::new(config)
}

#[tokio::test]
async fn a_webhook_to_loopback_is_refused_unless_allow_listed() {
    let ca = TestCa::new();
    let server = ca.hook_server(OK);
    let url = server.url("/hooks/cairn");

    // Not allow-listed: refused before any connection, at once (not retried), naming the host
    // and the address.
    let refusing = notifier(Some(&ca), &[], 3);
    let started = Instant::now();
    let (delivered, detail) = refusing.deliver(&url, &notice()).await;
    assert!(!delivered, "{detail}");
    assert!(
        detail.contains("host 127.0.0.1 has address 127.0.0.1, a loopback address"),
        "{detail}"
    );
    assert!(detail.contains("webhook_allow"), "{detail}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a refusal is not retried with backoff"
    );
    // A name that resolves to loopback is refused the same way.
    let by_name = format!("https://localhost:{}/hooks/cairn", server.port);
    let (delivered, detail) = refusing.deliver(&by_name, &notice()).await;
    assert!(!delivered, "{detail}");
    assert!(detail.contains("host localhost has address "), "{detail}");
    assert!(detail.contains("a loopback address"), "{detail}");
    // Another allow-listed address or network does not open loopback.
    let elsewhere = notifier(Some(&ca), &["127.0.0.2", "10.0.0.0/8"], 1);
    let (delivered, detail) = elsewhere.deliver(&url, &notice()).await;
    assert!(!delivered, "{detail}");
    assert_eq!(server.connections(), 0, "nothing reached the server");

    // Allow-listed by address: delivered, with what a receiver needs.
    let allowing = notifier(Some(&ca), &["127.0.0.1"], 1);
    let (delivered, detail) = allowing.deliver(&url, &notice()).await;
    assert!(delivered, "{detail}");
    assert_eq!(detail, "HTTP/1.1 200 OK");
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert!(
        request.head.starts_with("POST /hooks/cairn HTTP/1.1\r\n"),
        "{}",
        request.head
    );
    assert_eq!(
        request.header("user-agent").as_deref(),
        Some(concat!("cairn/", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(
        request.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(
        request.header("host"),
        Some(format!("127.0.0.1:{}", server.port))
    );
    let body: serde_json::Value = serde_json::from_str(&request.body).unwrap();
    assert_eq!(body, notice().json);

    // Allow-listed by name: the name's addresses are tried in turn (localhost may resolve to
    // ::1 first, where nothing listens), and the certificate is checked for the name.
    let by_host = notifier(Some(&ca), &["localhost"], 1);
    let (delivered, detail) = by_host.deliver(&by_name, &notice()).await;
    assert!(delivered, "{detail}");
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn a_redirect_is_not_followed() {
    let ca = TestCa::new();
    let target = ca.hook_server(OK);
    let redirect = format!(
        "HTTP/1.1 302 Found\r\nLocation: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        target.url("/elsewhere")
    );
    let redirecting = ca.hook_server(&redirect);
    let notifier = notifier(Some(&ca), &["127.0.0.1"], 3);
    let (delivered, detail) = notifier
        .deliver(&redirecting.url("/hooks/cairn"), &notice())
        .await;
    assert!(!delivered, "{detail}");
    assert!(detail.contains("answered 302 Found"), "{detail}");
    assert!(
        detail.contains(&format!(
            "(to {}; redirects are not followed)",
            target.url("/elsewhere")
        )),
        "{detail}"
    );
    assert_eq!(redirecting.requests().len(), 1, "a 3xx is not retried");
    assert_eq!(
        target.connections(),
        0,
        "the redirect target received nothing"
    );
}

#[tokio::test]
async fn http_urls_and_untrusted_certificates_fail_without_sending() {
    let ca = TestCa::new();
    let server = ca.hook_server(OK);
    let plain = format!("http://127.0.0.1:{}/hooks/cairn", server.port);
    let trusting = notifier(Some(&ca), &["127.0.0.1"], 3);
    let (delivered, detail) = trusting.deliver(&plain, &notice()).await;
    assert!(!delivered, "{detail}");
    assert!(detail.contains("must use https://"), "{detail}");
    assert_eq!(server.connections(), 0);

    // Without the test CA the server's certificate is not trusted: no request is sent.
    let untrusting = notifier(None, &["127.0.0.1"], 3);
    let started = Instant::now();
    let (delivered, detail) = untrusting
        .deliver(&server.url("/hooks/cairn"), &notice())
        .await;
    assert!(!delivered, "{detail}");
    assert!(detail.contains("TLS with 127.0.0.1 failed"), "{detail}");
    assert!(detail.contains("UnknownIssuer"), "{detail}");
    assert!(started.elapsed() < Duration::from_secs(2), "not retried");
    assert!(server.requests().is_empty());

    // A certificate for other names does not do for a name it lacks.
    let other_ca = TestCa::new();
    let wrong = notifier(Some(&other_ca), &["127.0.0.1"], 1);
    let (delivered, detail) = wrong.deliver(&server.url("/"), &notice()).await;
    assert!(!delivered, "{detail}");
    assert!(server.requests().is_empty());
}

#[tokio::test]
async fn a_server_error_is_retried_and_quoted_briefly() {
    let ca = TestCa::new();
    let long_reason = "x".repeat(5000);
    let response = format!(
        "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        5 + long_reason.len(),
        format_args!("boom {long_reason}")
    );
    let server = ca.hook_server(&response);
    let notifier = notifier(Some(&ca), &["127.0.0.1"], 2);
    let (delivered, detail) = notifier.deliver(&server.url("/h"), &notice()).await;
    assert!(!delivered, "{detail}");
    assert!(
        detail.contains("answered 500 Internal Server Error: boom xxx"),
        "{detail}"
    );
    assert!(detail.len() < 400, "the answer is quoted briefly: {detail}");
    assert_eq!(server.requests().len(), 2, "a 5xx is tried again");
}

#[tokio::test]
async fn a_large_answer_is_read_only_up_to_the_bound() {
    let ca = TestCa::new();
    let body = "y".repeat(4 << 20);
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let server = ca.hook_server(&response);
    let notifier = notifier(Some(&ca), &["127.0.0.1"], 1);
    let (delivered, detail) = notifier.deliver(&server.url("/h"), &notice()).await;
    assert!(delivered, "{detail}");
    assert_eq!(detail, "HTTP/1.1 200 OK");
}

#[tokio::test]
async fn a_silent_server_times_out() {
    // Accepts connections and never answers (the kernel completes the TCP handshake).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut config = NotifyConfig::new(None, "cairn@test.example".into());
    config.attempts = 1;
    config.timeout = Duration::from_millis(300);
    config.webhook_allow = AllowList::parse(&["127.0.0.1"]).unwrap();
    let notifier = Notifier::new(config);
    let (delivered, detail) = notifier
        .deliver(&format!("https://127.0.0.1:{port}/h"), &notice())
        .await;
    assert!(!delivered, "{detail}");
    assert!(detail.contains("no answer within"), "{detail}");
    drop(listener);
}
