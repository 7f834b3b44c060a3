//! HTTP tests of the admin page, the JSON API, /metrics and /healthz against an in-process server
//! with a real spool and scheduler on 127.0.0.1.

#[path = "support/web_server.rs"]
mod web_server;

use std::time::Duration;
use web_server::TestWeb;

/// Every test's whole run is bounded.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// No accounts, and the allowed peers trusted on purpose: without this key (the packaged default)
/// the page is locked until an account exists.
const TRUSTED: &str = "trust_allowed_hosts = true";

async fn bounded<F: std::future::Future<Output = ()>>(test: F) {
    tokio::time::timeout(TEST_TIMEOUT, test).await.expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_and_api_route_answers() {
    bounded(async {
        let web = TestWeb::start(TRUSTED).await;
        let a = web.queue("alice@sender.test", &["bob@example.test"], "First");
        let b = web.queue("carol@sender.test", &["dave@other.test", "erin@example.test"], "=?UTF-8?B?R3LDvMOfZQ==?=");
        let _c = web.queue("", &["frank@other.test"], "Bounce");
        let mut client = web.client();

        let index = client.get("/").await;
        assert_eq!(index.status, 200);
        assert!(index.body.contains(&a) && index.body.contains(&b), "{}", index.body);
        assert!(index.body.contains("Grüße"), "RFC 2047 Subject decoded");
        assert!(index.body.contains("http-equiv=\"refresh\""));
        assert!(index.body.contains("Flush all"));
        let csp = index.header("content-security-policy").expect("CSP");
        assert!(csp.contains("frame-ancestors 'none'") && !csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(index.header("x-content-type-options"), Some("nosniff"));
        assert!(index.header("referrer-policy").is_some());
        let cookie = index.header("set-cookie").expect("session cookie");
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
        assert!(!cookie.contains("Secure"), "no Secure attribute without TLS: {cookie}");

        let filtered = client.get("/?domain=other.test&sender=&recipient=").await;
        assert!(filtered.body.contains(&b) && !filtered.body.contains(&a));
        assert!(filtered.body.contains("2 of 3 messages"), "{}", filtered.body);

        let list = client.get("/api/queue").await.json();
        assert_eq!(list["total"], 3);
        assert_eq!(list["messages"][0]["id"], a.as_str());
        assert_eq!(list["messages"][0]["subject"], "First");
        assert_eq!(list["messages"][1]["domains"], serde_json::json!(["example.test", "other.test"]));
        let by_sender = client.get("/api/queue?sender=CAROL").await.json();
        assert_eq!(by_sender["matched"], 1);
        let null_sender = client.get("/api/queue?sender=%3C%3E").await.json();
        assert_eq!(null_sender["matched"], 1);
        let by_rcpt = client.get("/api/queue?recipient=erin").await.json();
        assert_eq!(by_rcpt["messages"][0]["id"], b.as_str());
        let paged = client.get("/api/queue?per_page=2&page=2").await.json();
        assert_eq!((paged["pages"].as_u64(), paged["messages"].as_array().map(Vec::len)), (Some(2), Some(1)));

        let status = client.get("/api/status").await.json();
        assert_eq!(status["messages"], 3);
        assert_eq!(status["csrf_token"].as_str().map(str::len), Some(64));
        let domains: Vec<&str> =
            status["domains"].as_array().unwrap().iter().map(|d| d["domain"].as_str().unwrap()).collect();
        assert_eq!(domains, ["example.test", "other.test"]);
        assert_eq!(status["domains"][0]["primary"], "unknown");
        assert!(status["disk"]["total_bytes"].as_u64().unwrap() > 0);

        let one = client.get(&format!("/api/queue/{a}")).await;
        assert_eq!(one.status, 200);
        assert_eq!(one.json()["envelope"]["sender"], "alice@sender.test");
        assert!(one.json()["headers"].as_str().unwrap().contains("Subject: First"));
        assert_eq!(client.get("/api/queue/0000000000000000").await.status, 404);
        assert_eq!(client.get("/api/queue/nonsense").await.status, 400);

        let page = client.get(&format!("/message/{a}")).await;
        assert_eq!(page.status, 200);
        assert!(
            page.body.contains("Retry now") && page.body.contains("Hold") && page.body.contains("Delivery history")
        );
        let confirm = client.get(&format!("/message/{a}/delete")).await;
        assert!(confirm.body.contains("name=\"confirm\" value=\"yes\""));
        assert_eq!(client.get("/message/0000000000000000").await.status, 404);

        let css = client.get("/static/style.css").await;
        assert_eq!(css.header("content-type"), Some("text/css; charset=utf-8"));
        let svg = client.get("/chart.svg").await;
        assert!(svg.body.starts_with("<svg"), "{}", svg.body);
        let samples = client.get("/api/chart").await.json();
        assert!(samples["samples"].as_array().is_some());
        let health = web.client().get("/healthz").await;
        assert_eq!(health.status, 200);
        assert!(health.header("set-cookie").is_none(), "monitors get no session");

        let metrics = client.get("/metrics").await;
        assert!(metrics.body.contains("bartleby_queue_messages{domain=\"example.test\"} 2"), "{}", metrics.body);
        assert!(metrics.body.contains("bartleby_queue_messages{domain=\"other.test\"} 2"), "{}", metrics.body);
        assert!(metrics.body.contains("bartleby_messages_received_total 0"), "{}", metrics.body);
        assert!(metrics.body.contains("bartleby_spool_free_bytes"), "{}", metrics.body);
        assert!(metrics.body.contains("bartleby_queue_oldest_age_seconds"), "{}", metrics.body);
        web.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_outside_the_allowlist_get_403() {
    bounded(async {
        let web = TestWeb::start(&format!("{TRUSTED}\nallow = [\"127.0.0.1/32\"]")).await;
        let mut stranger = web.client();
        stranger.source = Some("127.0.0.9".parse().unwrap());
        for path in ["/", "/api/status", "/metrics", "/healthz", "/login"] {
            let reply = stranger.get(path).await;
            assert_eq!(reply.status, 403, "{path}");
            assert!(reply.body.contains("127.0.0.9"), "{}", reply.body);
        }
        let refused = stranger.post_form("/flush", "csrf=x").await;
        assert_eq!(refused.status, 403);
        let mut friend = web.client();
        friend.source = Some("127.0.0.1".parse().unwrap());
        assert_eq!(friend.get("/").await.status, 200);
        web.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_need_the_csrf_token_and_our_origin() {
    bounded(async {
        let web = TestWeb::start(TRUSTED).await;
        let id = web.queue("a@sender.test", &["b@example.test"], "x");
        let mut client = web.client();
        let csrf = client.get("/").await.csrf();
        let hold = format!("/message/{id}/hold");

        let none = client.post_form(&hold, "").await;
        assert_eq!(none.status, 403, "{}", none.body);
        assert!(none.body.contains("missing CSRF token"));
        let wrong = client.post_form(&hold, &format!("csrf={}", "0".repeat(64))).await;
        assert_eq!(wrong.status, 403);
        assert!(wrong.body.contains("wrong CSRF token"));
        let mut other_session = web.client();
        assert_eq!(
            other_session.post_form(&hold, &format!("csrf={csrf}")).await.status,
            403,
            "token of another session"
        );
        let cross = client
            .request(
                "POST",
                &hold,
                &[("Content-Type", "application/x-www-form-urlencoded"), ("Origin", "http://evil.test")],
                &format!("csrf={csrf}"),
            )
            .await;
        assert_eq!(cross.status, 403);
        let cross_site =
            client.request("POST", &hold, &[("Sec-Fetch-Site", "cross-site"), ("X-CSRF-Token", &csrf)], "").await;
        assert_eq!(cross_site.status, 403);
        let api = client.request("POST", &format!("/api/queue/{id}/hold"), &[], "").await;
        assert_eq!(api.status, 403);
        assert!(api.json()["error"].as_str().unwrap().contains("CSRF"));
        assert!(!web.spool.get(&id).unwrap().held, "nothing refused changed anything");
        let get = client.get(&hold).await;
        assert_eq!(get.status, 405, "a GET changes nothing");

        let origin = format!("http://{}", web.addr);
        let ok = client
            .request(
                "POST",
                &hold,
                &[
                    ("Content-Type", "application/x-www-form-urlencoded"),
                    ("Origin", &origin),
                    ("Sec-Fetch-Site", "same-origin"),
                ],
                &format!("csrf={csrf}"),
            )
            .await;
        assert_eq!(ok.status, 303, "{}", ok.body);
        assert!(web.spool.get(&id).unwrap().held);
        let next = client.get(&format!("/message/{id}")).await;
        assert!(next.body.contains("held: it will not be tried until released"), "the result shows on the next page");
        web.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_actions_through_page_and_api() {
    bounded(async {
        let web = TestWeb::start(TRUSTED).await;
        let a = web.queue("a@sender.test", &["b@example.test"], "a");
        let b = web.queue("a@sender.test", &["b@example.test"], "b");
        let c = web.queue("a@sender.test", &["b@example.test"], "c");
        let mut client = web.client();
        let csrf = client.get("/").await.csrf();
        let token = [("X-CSRF-Token", csrf.as_str())];

        let held = client.request("POST", &format!("/api/queue/{a}/hold"), &token, "").await;
        assert_eq!(held.status, 200, "{}", held.body);
        assert!(web.spool.get(&a).unwrap().held);
        let released = client.post_form(&format!("/message/{a}/release"), &format!("csrf={csrf}")).await;
        assert_eq!(released.status, 303);
        assert!(!web.spool.get(&a).unwrap().held);
        let retry = client.post_form(&format!("/message/{b}/retry"), &format!("csrf={csrf}")).await;
        assert_eq!((retry.status, retry.header("location")), (303, Some(format!("/message/{b}").as_str())));
        // Held messages are never in flight, so deleting them cannot race a delivery.
        for id in [&b, &c] {
            let hold = client.request("POST", &format!("/api/queue/{id}/hold"), &token, "").await;
            assert!(hold.status == 200 || hold.status == 409, "{}", hold.body);
        }
        let c_held = web.spool.get(&c).unwrap().held;
        assert!(c_held);

        let unconfirmed = client.post_form(&format!("/message/{c}/delete"), &format!("csrf={csrf}")).await;
        assert_eq!(unconfirmed.status, 303);
        assert!(web.spool.get(&c).is_some(), "delete needs the confirmation");
        let deleted = client.post_form(&format!("/message/{c}/delete"), &format!("csrf={csrf}&confirm=yes")).await;
        assert_eq!(deleted.status, 303);
        assert!(web.spool.get(&c).is_none());
        assert!(client.get("/").await.body.contains("deleted (no bounce sent)"));
        let again = client.request("POST", &format!("/api/queue/{c}/delete"), &token, "").await;
        assert_eq!(again.status, 404, "{}", again.body);
        let unknown = client.request("POST", &format!("/api/queue/{a}/explode"), &token, "").await;
        assert_eq!(unknown.status, 404);
        let d = web.queue("a@sender.test", &["b@example.test"], "d");
        let api_delete = client.request("POST", &format!("/api/queue/{d}/delete"), &token, "").await;
        assert_eq!(api_delete.status, 200, "{}", api_delete.body);
        assert!(web.spool.get(&d).is_none());
        web.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_has_a_cooldown() {
    bounded(async {
        let web = TestWeb::start(&format!("{TRUSTED}\nflush_cooldown = \"60s\"")).await;
        let id = web.queue("a@sender.test", &["b@example.test"], "x");
        bartleby::schedule::set_held(web.spool.as_ref(), &id, true).expect("hold");
        let mut client = web.client();
        let csrf = client.get("/").await.csrf();
        let first = client.post_form("/flush", &format!("csrf={csrf}&back=%2F%3Fdomain%3Dexample.test")).await;
        assert_eq!(first.status, 303, "{}", first.body);
        assert_eq!(first.header("location"), Some("/?domain=example.test"), "back to the filtered page");
        assert!(client.get("/").await.body.contains("Flush: 0 messages scheduled"), "held messages are not flushed");
        let second = client.post_form("/flush", &format!("csrf={csrf}&domain=example.test")).await;
        assert_eq!(second.status, 429, "{}", second.body);
        let retry_after: u64 = second.header("retry-after").expect("Retry-After").parse().unwrap();
        assert!((1..=60).contains(&retry_after));
        let api =
            client.request("POST", "/api/flush", &[("X-CSRF-Token", &csrf)], "{\"domain\":\"example.test\"}").await;
        assert_eq!(api.status, 429);
        web.stop().await;

        let web = TestWeb::start(&format!("{TRUSTED}\nflush_cooldown = \"1s\"")).await;
        let mut client = web.client();
        let csrf = client.get("/api/status").await.json()["csrf_token"].as_str().unwrap().to_string();
        let token = [("X-CSRF-Token", csrf.as_str())];
        assert_eq!(client.request("POST", "/api/flush", &token, "").await.status, 200);
        assert_eq!(client.request("POST", "/api/flush", &token, "").await.status, 429);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let later = client.request("POST", "/api/flush?domain=example.test", &token, "").await;
        assert_eq!(later.status, 200, "{}", later.body);
        assert!(later.json()["ok"].as_str().unwrap().contains("for example.test"));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let open_redirect = client.post_form("/flush", &format!("csrf={csrf}&back=%2F%2Fevil.test")).await;
        assert_eq!(open_redirect.status, 303);
        assert_eq!(open_redirect.header("location"), Some("/"), "never a redirect to another site");
        web.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_controlled_strings_are_inert_text() {
    bounded(async {
        let web = TestWeb::start(TRUSTED).await;
        let sender = "<script>alert(1)</script>\"><img src=x onerror=alert(2)>@evil.test";
        let subject = "<script>alert(3)</script> \"><img src=x onerror=alert(4)>";
        let id = web.queue(sender, &["\"><img src=x onerror=alert(5)>@example.test"], subject);
        // An encoded word hides the markup from a naive filter; it must still come out escaped.
        let encoded = web.queue("x@evil.test", &["y@example.test"], "=?UTF-8?Q?=3Cscript=3Ealert(6)=3C/script=3E?=");
        let mut envelope = web.spool.get(&id).unwrap();
        envelope.helo = "<script>alert(7)</script>".into();
        envelope.recipients[0].last_error = Some("RCPT TO: 550 <img src=x onerror=alert(8)>".into());
        web.spool.update(std::slice::from_ref(&envelope)).unwrap();
        let mut client = web.client();
        for path in
            ["/".to_string(), format!("/message/{id}"), format!("/message/{id}/delete"), format!("/message/{encoded}")]
        {
            let page = client.get(&path).await;
            assert_eq!(page.status, 200, "{path}");
            assert!(!page.body.contains("<script"), "{path}: {}", page.body);
            assert!(!page.body.contains("<img"), "{path}: {}", page.body);
            assert!(page.body.contains("&lt;script&gt;alert("), "{path} shows the text: {}", page.body);
        }
        let index = client.get("/").await;
        assert!(index.body.contains("&lt;script&gt;alert(6)&lt;/script&gt;"), "decoded, then escaped");
        assert!(index.body.contains("&quot;&gt;&lt;img src=x onerror=alert(4)&gt;"));
        let detail = client.get(&format!("/message/{id}")).await;
        assert!(detail.body.contains("alert(7)") && detail.body.contains("alert(8)"));
        web.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_need_a_login() {
    bounded(async {
        let hash = bartleby::web::auth::hash_password("s3cret").unwrap();
        let web = TestWeb::start(&format!("users = {{ admin = \"{hash}\" }}")).await;
        let mut client = web.client();
        let redirect = client.get("/").await;
        assert_eq!(redirect.status, 303);
        assert_eq!(redirect.header("location"), Some("/login"));
        assert_eq!(client.get("/api/status").await.status, 401);
        assert_eq!(client.get("/healthz").await.status, 200, "monitors need no account");
        let form = client.get("/login").await;
        assert_eq!(form.status, 200);
        let csrf = form.csrf();
        let anonymous = client.cookie.clone();

        let no_token = client.post_form("/login", "user=admin&password=s3cret").await;
        assert_eq!(no_token.status, 403, "the login form carries a CSRF token too");
        let wrong = client.post_form("/login", &format!("csrf={csrf}&user=admin&password=nope")).await;
        assert_eq!(wrong.header("location"), Some("/login"));
        assert!(client.get("/login").await.body.contains("Wrong user name or password"));
        assert_eq!(client.get("/api/status").await.status, 401);
        let right = client.post_form("/login", &format!("csrf={csrf}&user=admin&password=s3cret")).await;
        assert_eq!(right.status, 303, "{}", right.body);
        assert_eq!(right.header("location"), Some("/"));
        let cookie = right.header("set-cookie").expect("new session cookie");
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
        assert_ne!(client.cookie, anonymous, "the session ID changes at login");

        let page = client.get("/").await;
        assert_eq!(page.status, 200);
        assert!(page.body.contains("admin") && page.body.contains("Log out"));
        let status = client.get("/api/status").await.json();
        assert_eq!(status["user"], "admin");
        let mut planted = web.client();
        planted.cookie = anonymous;
        assert_eq!(planted.get("/api/status").await.status, 401, "the pre-login session is gone");

        let csrf = page.csrf();
        assert_eq!(client.post_form("/logout", &format!("csrf={csrf}")).await.status, 303);
        assert_eq!(client.get("/api/status").await.status, 401);
        web.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_https_with_secure_cookies() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    bounded(async {
        let certs = tempfile::tempdir().unwrap();
        let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let (cert_path, key_path) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
        std::fs::write(&cert_path, key.cert.pem()).unwrap();
        std::fs::write(&key_path, key.signing_key.serialize_pem()).unwrap();
        let web = TestWeb::start(&format!(
            "{TRUSTED}\ntls_cert = \"{}\"\ntls_key = \"{}\"",
            cert_path.display(),
            key_path.display()
        ))
        .await;

        let mut roots = rustls::RootCertStore::empty();
        roots.add(key.cert.der().clone()).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(web.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
        tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut raw = Vec::new();
        let _ = tls.read_to_end(&mut raw).await;
        let text = String::from_utf8_lossy(&raw);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        let cookie = text.lines().find(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).expect("cookie");
        assert!(cookie.contains("; Secure"), "{cookie}");

        // Plain HTTP on the TLS port gets no page.
        let mut stream = tokio::net::TcpStream::connect(web.addr).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut answer)).await;
        assert!(!String::from_utf8_lossy(&answer).contains("HTTP/1.1 200"));
        web.stop().await;
    })
    .await;
}

/// Issue 16, point 3: a page on an attacker's name re-pointed at 127.0.0.1 (DNS rebinding) sends
/// `Host: rebind.attacker.test:PORT` and a matching Origin. It gets 421 and nothing else: no
/// session, no CSRF token, no queue, and no action, even with a token stolen from a real session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_rebinding_gets_no_token_no_data_and_no_action() {
    bounded(async {
        let web = TestWeb::start(TRUSTED).await;
        let id = web.queue("alice@sender.test", &["bob@example.test"], "Secret plans");
        let rebound = format!("rebind.attacker.test:{}", web.addr.port());
        let origin = format!("http://{rebound}");
        let mut attacker = web.client();
        attacker.host = Some(rebound.clone());

        for path in ["/", "/api/status", "/api/queue", &format!("/api/queue/{id}"), &format!("/message/{id}")] {
            let reply = attacker.request("GET", path, &[("Origin", &origin)], "").await;
            assert_eq!(reply.status, 421, "{path}: {}", reply.body);
            assert!(reply.header("set-cookie").is_none(), "{path}: no session for a rebound page");
            assert!(!reply.body.contains(&id) && !reply.body.contains("Secret"), "{path}: {}", reply.body);
            assert!(!reply.body.contains("csrf"), "{path}: no token: {}", reply.body);
            assert!(reply.body.len() < 200, "{path}: a short body: {}", reply.body);
        }
        for path in ["/metrics", "/healthz", "/chart.svg", "/login"] {
            assert_eq!(attacker.get(path).await.status, 421, "{path}");
        }
        assert!(attacker.cookie.is_none());

        // Worst case: the attacker holds a real session's cookie and token. The name still gives it away.
        let mut admin = web.client();
        let csrf = admin.get("/").await.csrf();
        attacker.cookie = admin.cookie.clone();
        let form = [("Content-Type", "application/x-www-form-urlencoded"), ("Origin", origin.as_str())];
        let delete = attacker
            .request("POST", &format!("/message/{id}/delete"), &form, &format!("csrf={csrf}&confirm=yes"))
            .await;
        assert_eq!(delete.status, 421, "{}", delete.body);
        let api = [("X-CSRF-Token", csrf.as_str()), ("Origin", origin.as_str())];
        assert_eq!(attacker.request("POST", &format!("/api/queue/{id}/delete"), &api, "").await.status, 421);
        assert_eq!(attacker.request("POST", &format!("/api/queue/{id}/hold"), &api, "").await.status, 421);
        assert_eq!(attacker.request("POST", "/api/flush", &api, "").await.status, 421);
        let envelope = web.spool.get(&id).expect("the message is still queued");
        assert!(!envelope.held, "nothing refused changed anything");

        // Our names work: localhost and `hostname` by default, the listen address, loopback.
        let port = web.addr.port();
        for host in
            [format!("localhost:{port}"), format!("BACKUP.example.test:{port}"), "127.0.0.1".into(), "[::1]:9".into()]
        {
            let mut client = web.client();
            client.host = Some(host.clone());
            let page = client.get("/").await;
            assert_eq!(page.status, 200, "{host}: {}", page.body);
            assert!(page.body.contains(&id), "{host}");
        }
        // A request without Host cannot come from a browser, so it cannot be rebinding.
        let mut bare = web.client();
        bare.host = Some(String::new());
        assert_eq!(bare.get("/healthz").await.status, 200);

        // POSTs: the Origin must be ours too, and the one the request was sent to.
        let mut client = web.client();
        client.host = Some(format!("localhost:{port}"));
        let csrf = client.get("/").await.csrf();
        let foreign = [("X-CSRF-Token", csrf.as_str()), ("Origin", origin.as_str())];
        assert_eq!(client.request("POST", &format!("/api/queue/{id}/hold"), &foreign, "").await.status, 403);
        let ours_origin = format!("http://localhost:{port}");
        let ok = [("X-CSRF-Token", csrf.as_str()), ("Origin", ours_origin.as_str())];
        let deleted = client.request("POST", &format!("/api/queue/{id}/delete"), &ok, "").await;
        assert_eq!(deleted.status, 200, "{}", deleted.body);
        assert!(web.spool.get(&id).is_none());
        web.stop().await;
    })
    .await;
}

/// `web.hostnames` replaces the default names; IP literals of loopback still work (SSH tunnels).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_hostnames_replace_the_defaults() {
    bounded(async {
        let web = TestWeb::start(&format!("{TRUSTED}\nhostnames = [\"admin.example.test\"]")).await;
        let port = web.addr.port();
        for (host, status) in [
            (format!("admin.example.test:{port}"), 200),
            (format!("localhost:{port}"), 421),
            (format!("backup.example.test:{port}"), 421),
            (format!("127.0.0.1:{port}"), 200),
            (format!("admin.example.test.evil.test:{port}"), 421),
            ("admin.example.test:80:80".to_string(), 421),
        ] {
            let mut client = web.client();
            client.host = Some(host.clone());
            assert_eq!(client.get("/api/status").await.status, status, "{host}");
        }
        // A second Host header, or an absolute-form target naming another host, is refused too.
        let mut client = web.client();
        client.host = Some(format!("admin.example.test:{port}"));
        let two = client.request("GET", "/api/queue", &[("Host", "rebind.attacker.test")], "").await;
        assert_eq!(two.status, 421, "{}", two.body);
        let absolute = client.get(&format!("http://rebind.attacker.test:{port}/api/queue")).await;
        assert_eq!(absolute.status, 421, "{}", absolute.body);
        assert_eq!(client.get(&format!("http://admin.example.test:{port}/api/status")).await.status, 200);
        web.stop().await;
    })
    .await;
}

/// Issue 16, point 2: with the packaged defaults (`allow` = loopback, no accounts, no
/// `trust_allowed_hosts`) any local user could list, flush, hold and delete. Now the page is
/// locked: 403, no session, no data, no action; monitoring still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_accounts_the_page_is_locked_unless_hosts_are_trusted() {
    bounded(async {
        let web = TestWeb::start("").await;
        let id = web.queue("alice@sender.test", &["bob@example.test"], "Payroll");
        let mut local_user = web.client();
        for path in ["/", "/api/status", "/api/queue", &format!("/api/queue/{id}"), &format!("/message/{id}"), "/login"]
        {
            let reply = local_user.get(path).await;
            assert_eq!(reply.status, 403, "{path}: {}", reply.body);
            assert!(reply.body.contains("web.users") && reply.body.contains("hash-password"), "{}", reply.body);
            assert!(!reply.body.contains(&id) && !reply.body.contains("Payroll"), "{path}: {}", reply.body);
            assert!(reply.header("set-cookie").is_none(), "{path}: no session, so no CSRF token");
        }
        for (path, body) in [
            (format!("/api/queue/{id}/delete"), ""),
            (format!("/api/queue/{id}/hold"), ""),
            ("/api/flush".to_string(), ""),
            (format!("/message/{id}/delete"), "confirm=yes"),
            ("/flush".to_string(), ""),
        ] {
            let reply = local_user.post_form(&path, body).await;
            assert_eq!(reply.status, 403, "{path}: {}", reply.body);
        }
        assert!(!web.spool.get(&id).expect("still queued").held);
        assert_eq!(local_user.get("/healthz").await.status, 200, "monitors need no account");
        let metrics = local_user.get("/metrics").await;
        assert_eq!(metrics.status, 200);
        assert!(!metrics.body.contains(&id), "metrics are counts, not messages");
        web.stop().await;

        // Trusting the allowed peers is the operator's explicit choice, and opens the page again.
        let web = TestWeb::start(TRUSTED).await;
        let id = web.queue("alice@sender.test", &["bob@example.test"], "Payroll");
        assert!(web.client().get("/").await.body.contains(&id));
        web.stop().await;
    })
    .await;
}

/// Everything written to the log by the tests of this binary (one global subscriber).
fn captured_log() -> &'static std::sync::Mutex<Vec<u8>> {
    use std::sync::{Mutex, OnceLock};
    static LOG: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || LogWriter(log))
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");
        log
    })
}

struct LogWriter(&'static std::sync::Mutex<Vec<u8>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Log lines that mention `needle`.
fn log_lines(needle: &str) -> Vec<String> {
    let log = captured_log().lock().unwrap_or_else(|p| p.into_inner());
    String::from_utf8_lossy(&log).lines().filter(|l| l.contains(needle)).map(str::to_string).collect()
}

/// Issue 16, point 2: every action is logged with the account and the client address, refused
/// ones too, from the page and from the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_are_logged_with_account_and_client_address() {
    bounded(async {
        captured_log();
        let hash = bartleby::web::auth::hash_password("s3cret").unwrap();
        let web = TestWeb::start(&format!("users = {{ operator7 = \"{hash}\" }}\nflush_cooldown = \"1s\"")).await;
        let id = web.queue("a@sender.test", &["b@example.test"], "x");
        let mut client = web.client();
        client.source = Some("127.0.0.77".parse().unwrap());
        let csrf = client.get("/login").await.csrf();
        let login = client.post_form("/login", &format!("csrf={csrf}&user=operator7&password=s3cret")).await;
        assert_eq!(login.status, 303);
        let csrf = client.get("/").await.csrf();
        let token = [("X-CSRF-Token", csrf.as_str())];
        assert_eq!(client.post_form(&format!("/message/{id}/hold"), &format!("csrf={csrf}")).await.status, 303);
        assert_eq!(client.request("POST", &format!("/api/queue/{id}/release"), &token, "").await.status, 200);
        // The release made the message due, so an attempt (to a closed port, over at once) may be
        // under way: the hold and then the delete are refused with 409 meanwhile, and taken once it
        // is over. Flushed last for the same reason.
        let mut delete_requests = 1; // with the second delete, below
        for action in ["hold", "delete"] {
            let mut status = 0;
            for _ in 0..50 {
                status = client.request("POST", &format!("/api/queue/{id}/{action}"), &token, "").await.status;
                delete_requests += usize::from(action == "delete");
                if status != 409 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            assert_eq!(status, 200, "{action}");
        }
        assert_eq!(client.request("POST", &format!("/api/queue/{id}/delete"), &token, "").await.status, 404);
        assert_eq!(client.request("POST", "/api/flush?domain=example.test", &token, "").await.status, 200);

        let lines = log_lines("127.0.0.77");
        assert!(lines.iter().any(|l| l.contains("web login") && l.contains("operator7")), "{lines:#?}");
        let action = |name: &str| {
            lines
                .iter()
                .filter(|l| l.contains("web action") && l.contains("operator7") && l.contains(&format!("\"{name}\"")))
                .cloned()
                .collect::<Vec<_>>()
        };
        for name in ["hold", "release"] {
            assert!(action(name).iter().any(|l| l.contains(&id)), "{name}: {lines:#?}");
        }
        assert!(action("flush").iter().any(|l| l.contains("example.test")), "{lines:#?}");
        let deletes = action("delete");
        // Each delete request is logged, refused ones too.
        assert_eq!(deletes.len(), delete_requests, "{lines:#?}");
        assert!(deletes.iter().all(|l| l.contains(&id)));
        assert!(deletes.iter().any(|l| l.contains("web action failed") && l.contains("no message")), "{deletes:#?}");
        web.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_shape_in_the_api_the_page_and_metrics_and_paused_domains_on_the_page() {
    bounded(async {
        let web = TestWeb::start(TRUSTED).await;
        web.queue("alice@sender.test", &["bob@example.test"], "one");
        web.queue("alice@sender.test", &["bob@example.test", "carol@other.test"], "two");
        // A notice to a sender's domain: counted in the shape, but no relayed domain's series.
        web.queue("", &["alice@sender.test"], "notice");
        let mut client = web.client();

        let shape = client.get("/api/queue/shape").await;
        assert_eq!(shape.status, 200, "{}", shape.body);
        let shape = shape.json();
        assert_eq!(shape["buckets_minutes"], serde_json::json!([0, 5, 10, 20, 40, 80, 160, 320, 640, 1280]));
        assert_eq!(shape["domains"]["example.test"][0], 2);
        assert_eq!(shape["domains"]["other.test"][0], 1);
        assert_eq!(shape["total"][0], 4, "a message with two domains counts in both");

        let index = client.get("/").await.body;
        assert!(
            index.contains("Queue shape") && index.contains("0\u{2013}5 m") && index.contains("1280+ m"),
            "{index}"
        );
        assert!(index.contains("heat-1"), "cells coloured by count: {index}");

        let metrics = client.get("/metrics").await.body;
        assert!(metrics.contains("bartleby_queue_domain_oldest_age_seconds{domain=\"example.test\"} 0"), "{metrics}");
        assert!(metrics.contains("bartleby_queue_domain_oldest_age_seconds{domain=\"other.test\"}"), "{metrics}");
        assert!(!metrics.contains("oldest_age_seconds{domain=\"sender.test\"}"), "relayed domains only: {metrics}");
        assert!(metrics.contains("bartleby_queue_oldest_age_seconds 0"), "{metrics}");

        assert!(web.state.scheduler.pause("other.test", true).await.expect("pause"));
        let index = client.get("/").await.body;
        assert_eq!(index.matches("badge paused").count(), 1, "{index}");
        assert!(
            client.get("/api/status").await.json()["domains"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d["domain"] == "other.test" && d["paused"] == true))
        );
        let flush = client.get("/").await.csrf();
        let refused = client.request("POST", "/api/flush?domain=other.test", &[("X-CSRF-Token", &flush)], "").await;
        assert_eq!(refused.status, 409, "{}", refused.body);
        assert!(refused.body.contains("paused"), "{}", refused.body);
        web.stop().await;
    })
    .await;
}

/// In a shared store the message page names the node that accepted the message and the node that
/// holds its lease (docs/cluster.md).
#[tokio::test(flavor = "multi_thread")]
async fn the_message_page_names_the_nodes_of_a_shared_store() {
    bounded(async {
        let web = TestWeb::start(TRUSTED).await;
        let id = web.queue("a@sender.test", &["b@example.test"], "nodes");
        let mut client = web.client();
        let page = client.get(&format!("/message/{id}")).await;
        assert!(!page.body.contains("Accepted by"), "a local store has one node");
        let mut envelope = web.spool.get(&id).unwrap();
        envelope.accepted_by = Some("node7".into());
        envelope.leased_by = Some("node8".into());
        web.spool.update(&[envelope]).unwrap();
        let page = client.get(&format!("/message/{id}")).await;
        assert!(page.body.contains("Accepted by") && page.body.contains("node node7"), "{}", page.body);
        assert!(page.body.contains("Being delivered by") && page.body.contains("node node8"), "{}", page.body);
        let queue = client.get("/").await;
        assert!(queue.body.contains("via node7") && queue.body.contains("sending: node8"), "{}", queue.body);
    })
    .await;
}
