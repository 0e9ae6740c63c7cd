//! What a browser can and cannot make the API do: the `Host` allow-list (DNS rebinding),
//! JSON-only bodies (plain forms), no CORS headers, and the API served over TLS.

use std::net::SocketAddr;

use axum::extract::connect_info::ConnectInfo;
use tokio_rustls::rustls;

use super::*;
use crate::api::host::{ApiHost, LocalAddr};

fn get_with_host(uri: &str, host: Option<&str>, local: Option<&str>) -> Request<Body> {
    let mut builder = authed().method("GET").uri(uri);
    if let Some(host) = host {
        builder = builder.header("host", host);
    }
    let mut request = builder.body(Body::empty()).unwrap();
    if let Some(local) = local {
        let local: SocketAddr = local.parse().unwrap();
        request
            .extensions_mut()
            .insert(ConnectInfo(LocalAddr(Some(local))));
    }
    request
}

fn with_names(fake: &Arc<Fake>, names: &[&str]) -> Router {
    let config = ApiConfig {
        api_hosts: names.iter().map(|n| ApiHost::parse(n).unwrap()).collect(),
        ..ApiConfig::default()
    };
    app_with(fake, config)
}

#[tokio::test]
async fn a_host_not_on_the_allow_list_is_refused_with_bad_host() {
    let fake = Arc::new(Fake::new());
    let app = with_names(&fake, &["cairn.example.net"]);
    // The configured name, and the connection's own address (and localhost on loopback).
    for (host, local) in [
        ("cairn.example.net", None),
        ("cairn.example.net:7480", Some("127.0.0.1:7480")),
        ("127.0.0.1:7480", Some("127.0.0.1:7480")),
        ("localhost:7480", Some("127.0.0.1:7480")),
    ] {
        let (status, vms) = send(&app, get_with_host("/v1/vms", Some(host), local)).await;
        assert_eq!(status, StatusCode::OK, "{host}: {vms}");
        assert_eq!(vms[0]["name"], "web-01");
    }
    // A rebinding page's name, another port, and no Host at all.
    for (host, local, word) in [
        (
            Some("evil.example:7480"),
            Some("127.0.0.1:7480"),
            "evil.example:7480",
        ),
        (
            Some("127.0.0.1:9999"),
            Some("127.0.0.1:7480"),
            "127.0.0.1:9999",
        ),
        (Some("localhost:7480"), Some("192.0.2.1:7480"), "localhost"),
        (Some("127.0.0.1:7480"), None, "127.0.0.1:7480"),
        (None, Some("127.0.0.1:7480"), "no Host header"),
    ] {
        let answer = send(&app, get_with_host("/v1/vms", host, local)).await;
        assert_error(
            &answer,
            StatusCode::MISDIRECTED_REQUEST,
            "bad_host",
            &[word],
        );
    }
    // A command with a bad Host changes nothing.
    let mut post = request("POST", &format!("/v1/vms/{VM_WEB}/backup"), None);
    post.headers_mut()
        .insert("host", "evil.example".parse().unwrap());
    let answer = send(&app, post).await;
    assert_error(
        &answer,
        StatusCode::MISDIRECTED_REQUEST,
        "bad_host",
        &["--api-host"],
    );
    assert!(fake.submitted().is_empty());
    // Liveness stays open to probes by any name.
    let (status, health) = send(&app, get_with_host("/healthz", Some("10.9.9.9"), None)).await;
    assert_eq!(status, StatusCode::OK, "{health}");
}

#[tokio::test]
async fn an_in_memory_router_without_names_does_not_check_the_host() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    let (status, _) = send(&app, get_with_host("/v1/vms", Some("anything"), None)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(&app, get_with_host("/v1/vms", None, None)).await;
    assert_eq!(status, StatusCode::OK);
}

/// Every POST route of the table, with its path parameters filled in.
fn post_routes() -> Vec<String> {
    let posts: Vec<String> = routes()
        .iter()
        .filter(|r| r.method == "post")
        .map(|r| concrete(r.path))
        .collect();
    assert!(posts.len() >= 10, "{posts:?}");
    assert!(posts.iter().all(|p| !p.contains('{')), "{posts:?}");
    posts
}

#[tokio::test]
async fn a_form_cannot_post_to_any_route_even_with_an_empty_body() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    for path in post_routes() {
        for content_type in [
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=----x",
            "text/plain",
            "text/plain;charset=UTF-8",
        ] {
            for body in ["", "reason=x", "{}"] {
                let form = Request::builder()
                    .method("POST")
                    .uri(&path)
                    .header("content-type", content_type)
                    .body(Body::from(body))
                    .unwrap();
                let answer = send(&app, form).await;
                assert_error(
                    &answer,
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    &["is not application/json"],
                );
            }
        }
        // A body without a content type (a no-cors `fetch` with a Blob) is refused too.
        let untyped = Request::builder()
            .method("POST")
            .uri(&path)
            .body(Body::from("{}"))
            .unwrap();
        let answer = send(&app, untyped).await;
        assert_error(
            &answer,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &["needs Content-Type: application/json"],
        );
    }
    assert!(fake.submitted().is_empty(), "{:?}", fake.submitted());

    // Without body and content type, and with JSON, a command still goes through.
    let cancel = format!("/v1/jobs/{JOB_RUNNING}/cancel");
    let (status, _) = call(&app, "POST", &cancel, None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let json = authed()
        .method("POST")
        .uri(format!("/v1/vms/{VM_WEB}/check"))
        .header("content-type", "application/json; charset=utf-8")
        .body(Body::empty())
        .unwrap();
    let (status, body) = send(&app, json).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(fake.submitted().len(), 2);
}

#[tokio::test]
async fn no_cors_headers_not_even_for_a_preflight() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    let preflight = Request::builder()
        .method("OPTIONS")
        .uri(format!("/v1/jobs/{JOB_RUNNING}/cancel"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .body(Body::empty())
        .unwrap();
    let simple = Request::builder()
        .method("GET")
        .uri("/v1/vms")
        .header("origin", "https://evil.example")
        .body(Body::empty())
        .unwrap();
    for request in [preflight, simple] {
        let response = app.clone().oneshot(request).await.unwrap();
        let cors: Vec<_> = response
            .headers()
            .keys()
            .filter(|name| name.as_str().starts_with("access-control-"))
            .collect();
        assert!(cors.is_empty(), "{cors:?}");
    }
    assert!(fake.submitted().is_empty());
}

/// One request over a fresh plain TCP connection with the given `Host` line; the status.
async fn status_with_host(addr: SocketAddr, host: &str) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /v1/vms HTTP/1.1\r\n{host}Authorization: Bearer {}\r\nConnection: close\r\n\r\n",
        secret(Role::Admin)
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8(response).unwrap();
    text.split(' ').nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_real_server_always_checks_the_host() {
    let fake = Arc::new(Fake::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, fake.clone(), async move {
        let _ = stopped.await;
    }));
    let port = addr.port();
    assert_eq!(
        status_with_host(addr, &format!("Host: {addr}\r\n")).await,
        200
    );
    let localhost = format!("Host: localhost:{port}\r\n");
    assert_eq!(status_with_host(addr, &localhost).await, 200);
    let evil = format!("Host: evil.example:{port}\r\n");
    assert_eq!(status_with_host(addr, &evil).await, 421);
    assert_eq!(status_with_host(addr, "").await, 421);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// A test CA and a server certificate for `localhost`, 127.0.0.1 and ::1 signed by it,
/// written to `dir` as `ca.pem`, `cert.pem` and `key.pem` (0600).
fn test_pki(dir: &std::path::Path) -> cairn_tests::hook::ServerFiles {
    cairn_tests::hook::TestCa::new().write_server_files(dir)
}

fn tls_connector(ca_pem: &[u8]) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// One HTTP/1.1 request over TLS; the status and the JSON body.
async fn https(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    target: &str,
) -> (u16, Value) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = connector.connect(name, tcp).await.unwrap();
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: localhost:{}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        addr.port(),
        secret(Role::Admin)
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    // A server that closes without close_notify is an error for rustls; the bytes are there.
    let _ = stream.read_to_end(&mut response).await;
    let text = String::from_utf8(response).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap())
}

#[tokio::test]
async fn serves_over_tls_refuses_plain_http_and_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    let pki = test_pki(dir.path());
    let tls = tls::TlsFiles::load(&pki.cert, &pki.key).unwrap();
    let fake = Arc::new(Fake::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tls::serve_tls(
        listener,
        tls,
        fake.clone(),
        ApiConfig::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    let connector = tls_connector(&std::fs::read(&pki.ca).unwrap());
    let (status, vms) = https(&connector, addr, "/v1/vms").await;
    assert_eq!(status, 200, "{vms}");
    assert_eq!(vms[1]["name"], "db-01");

    // A plain HTTP client gets no answer, and the server goes on serving.
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(
            format!(
                "GET /v1/vms HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\r\n",
                secret(Role::Admin)
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer).await;
    assert!(!String::from_utf8_lossy(&answer).contains("web-01"));
    // A client that connects and says nothing holds nobody up.
    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (status, _) = https(&connector, addr, "/healthz").await;
    assert_eq!(status, 200);

    // A long poll in flight ends at shutdown, and the port closes.
    let poll_connector = connector.clone();
    let poll = tokio::spawn(async move {
        https(&poll_connector, addr, "/v1/events?from=1&wait_ms=30000").await
    });
    fake.waiting.notified().await;
    stop.send(()).unwrap();
    let (status, page) = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .expect("the long poll should end at shutdown")
        .unwrap();
    assert_eq!((status, page["events"].clone()), (200, json!([])));
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server should stop")
        .unwrap()
        .unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[test]
fn bad_certificate_and_key_files_are_refused_naming_the_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pki = test_pki(dir.path());
    let other = tempfile::tempdir().unwrap();
    let other_pki = test_pki(other.path());
    let missing = dir.path().join("missing.pem");
    let not_pem = dir.path().join("not-pem.txt");
    std::fs::write(&not_pem, "hello").unwrap();
    std::fs::set_permissions(&not_pem, std::fs::Permissions::from_mode(0o600)).unwrap();
    let expect =
        |cert: &std::path::Path, key: &std::path::Path, named: &std::path::Path, words: &[&str]| {
            let err = tls::TlsFiles::load(cert, key).unwrap_err().to_string();
            assert!(err.contains(&named.display().to_string()), "{err}");
            for word in words {
                assert!(err.contains(word), "{err:?} should contain {word:?}");
            }
        };
    expect(
        &missing,
        &pki.key,
        &missing,
        &["certificate", "No such file"],
    );
    expect(&pki.cert, &missing, &missing, &["key", "No such file"]);
    expect(&not_pem, &pki.key, &not_pem, &["no PEM certificate"]);
    expect(&pki.cert, &not_pem, &not_pem, &["no PEM private key"]);
    // A certificate where the key belongs, and a key that is not the certificate's.
    let cert_as_key = dir.path().join("cert-as-key.pem");
    std::fs::copy(&pki.cert, &cert_as_key).unwrap();
    std::fs::set_permissions(&cert_as_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    expect(
        &pki.cert,
        &cert_as_key,
        &cert_as_key,
        &["no PEM private key"],
    );
    expect(&pki.cert, &other_pki.key, &other_pki.key, &[]);
    expect(dir.path(), &pki.key, dir.path(), &["not a regular file"]);
    // A key that others can read is refused, with the fix.
    for (mode, who) in [
        (0o644, "readable by others"),
        (0o640, "readable by its group"),
        (0o620, "group or others"),
    ] {
        std::fs::set_permissions(&pki.key, std::fs::Permissions::from_mode(mode)).unwrap();
        expect(&pki.cert, &pki.key, &pki.key, &[who, "chmod 600"]);
    }
    std::fs::set_permissions(&pki.key, std::fs::Permissions::from_mode(0o400)).unwrap();
    tls::TlsFiles::load(&pki.cert, &pki.key).unwrap();
}
