//! Issue 14, point 5: the running daemon keeps the promises of its own OpenAPI description.
//!
//! Starts the real `bartleby serve` with an account, a web listener and queued mail, logs in as a
//! browser would, and runs schemathesis (PyPI, installed into `target/schemathesis` by
//! `scripts/test`) with every check against `/api/openapi.json`: status codes, content types and
//! bodies as described, JSON errors, 405 for undescribed methods, refusals without credentials.
//! Its stateful phase follows the document's links from the listing to real messages, so it holds,
//! releases, retries and deletes them: the daemon and its queue are thrown away afterwards.

#[path = "support/daemon.rs"]
mod daemon;

use daemon::{Daemon, free_port, send_raw};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The version `scripts/test` installs; see there.
const SCHEMATHESIS: &str = "schemathesis==4.32.5";
/// schemathesis's own budget for fuzzing and stateful testing, and the bound on the whole run.
const BUDGET_SECONDS: u64 = 60;
const RUN_LIMIT: Duration = Duration::from_secs(240);

/// The schemathesis executable: `BARTLEBY_SCHEMATHESIS`, or the venv `scripts/test` makes.
fn schemathesis() -> PathBuf {
    let path = std::env::var_os("BARTLEBY_SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/schemathesis/bin/schemathesis"));
    assert!(
        path.is_file(),
        "{} is missing: scripts/test installs it, or by hand: python3 -m venv target/schemathesis && \
         target/schemathesis/bin/pip install {SCHEMATHESIS} (or set BARTLEBY_SCHEMATHESIS)",
        path.display()
    );
    path
}

/// One HTTP/1.1 exchange (Connection: close): status, headers (names lower-cased), body.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The session cookie this answer sets, if any.
    fn session(&self) -> Option<String> {
        let value = self.header("set-cookie")?.strip_prefix("bartleby_session=")?;
        value.split(';').next().map(str::to_string)
    }
}

fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to the web listener");
    stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request += &format!("{name}: {value}\r\n");
    }
    request += &format!("Content-Length: {}\r\n\r\n{body}", body.len());
    stream.write_all(request.as_bytes()).expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP head");
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).expect("status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply { status, headers, body: body.to_string() }
}

/// Logs in as `user` the way the login form does; returns the session cookie and its CSRF token.
fn log_in(web: SocketAddr, user: &str, password: &str) -> (String, String) {
    let form = http(web, "GET", "/login", &[], "");
    let cookie = form.session().expect("the login form starts a session");
    let at = form.body.find("name=\"csrf\" value=\"").expect("the form's CSRF field") + 19;
    let csrf = &form.body[at..at + 64];
    let jar = format!("bartleby_session={cookie}");
    let body = format!("csrf={csrf}&user={user}&password={password}");
    let headers = [("Cookie", jar.as_str()), ("Content-Type", "application/x-www-form-urlencoded")];
    let login = http(web, "POST", "/login", &headers, &body);
    assert_eq!(login.status, 303, "{}", login.body);
    let cookie = login.session().expect("the login replaces the session");
    let jar = format!("bartleby_session={cookie}");
    let status = http(web, "GET", "/api/status", &[("Cookie", &jar)], "");
    assert_eq!(status.status, 200, "{}", status.body);
    assert_eq!(status.json()["user"], user);
    let token = status.json()["csrf_token"].as_str().expect("csrf_token").to_string();
    (cookie, token)
}

/// Queues `count` messages over SMTP (deliveries fail: example.test routes to a closed port).
fn queue_mail(daemon: &Daemon, count: usize) {
    for n in 0..count {
        let rcpts: &[&str] =
            if n % 3 == 0 { &["bob@example.test", "carol@example.test"] } else { &["bob@example.test"] };
        let sender = if n % 4 == 0 { "" } else { "alice@sender.test" };
        let data =
            format!("From: alice@sender.test\r\nSubject: report {n}\r\nMessage-ID: <{n}@sender.test>\r\n\r\nHi.\r\n");
        let reply = send_raw(daemon.smtp, sender, rcpts, data.as_bytes()).expect("SMTP");
        assert!(reply.starts_with("250"), "{reply}");
    }
}

/// What the daemon answers outside what schemathesis checks: the document itself, and the JSON
/// errors for paths and methods the API does not serve.
fn check_document_and_errors(web: SocketAddr, jar: &str) -> Value {
    let doc = http(web, "GET", "/api/openapi.json", &[], "");
    assert_eq!(doc.status, 200, "served without a session: {}", doc.body);
    assert_eq!(doc.header("content-type"), Some("application/json"));
    assert!(doc.header("set-cookie").is_none(), "the document starts no session");
    let spec = doc.json();
    assert!(spec["paths"]["/api/queue/{id}"]["get"].is_object(), "{}", doc.body);

    let unknown = http(web, "GET", "/api/no/such/path", &[("Cookie", jar)], "");
    assert_eq!((unknown.status, unknown.header("content-type")), (404, Some("application/json")));
    assert!(unknown.json()["error"].is_string(), "{}", unknown.body);
    let wrong = http(web, "PUT", "/api/status", &[("Cookie", jar)], "");
    assert_eq!((wrong.status, wrong.header("content-type")), (405, Some("application/json")));
    assert!(wrong.header("allow").is_some_and(|a| a.contains("GET")), "{:?}", wrong.headers);
    // The document's path is open, and only to GET: a POST is a 405 there, not a login prompt.
    let post = http(web, "POST", "/api/openapi.json", &[], "");
    assert_eq!((post.status, post.header("content-type")), (405, Some("application/json")), "{}", post.body);
    let bad_query = http(web, "GET", "/api/queue?page=x", &[("Cookie", jar)], "");
    assert_eq!((bad_query.status, bad_query.header("content-type")), (400, Some("application/json")));
    let anonymous = http(web, "GET", "/api/queue", &[], "");
    assert_eq!((anonymous.status, anonymous.header("content-type")), (401, Some("application/json")));
    spec
}

/// Runs schemathesis against the daemon; returns its exit status and output.
fn run_schemathesis(web: SocketAddr, cookie: &str, csrf: &str, work: &Path) -> (bool, String) {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schemathesis/schemathesis.toml");
    let output = work.join("schemathesis.out");
    let mut child = Command::new(schemathesis())
        .arg("--config-file")
        .arg(&config)
        .args(["run", &format!("http://{web}/api/openapi.json")])
        // The document's own operation is left out unless a filter names it.
        .args(["--include-path-regex", "^/api/", "--checks", "all", "--max-examples", "25"])
        .args(["--max-time", &BUDGET_SECONDS.to_string(), "--seed", "14", "--workers", "1"])
        .args(["--request-timeout", "10", "--report", "junit", "--report-dir"])
        .arg(work.join("report"))
        .env("BARTLEBY_SESSION", cookie)
        .env("BARTLEBY_CSRF", csrf)
        .env("NO_COLOR", "1")
        // Its caches (.hypothesis, .schemathesis) go to the test's directory.
        .current_dir(work)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&output).expect("output file"))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start schemathesis");
    let deadline = Instant::now() + RUN_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for schemathesis") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("schemathesis ran over {RUN_LIMIT:?}:\n{}", std::fs::read_to_string(&output).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    (status.success(), std::fs::read_to_string(&output).unwrap_or_default())
}

#[test]
fn the_running_api_keeps_its_openapi_description() {
    let tool = schemathesis();
    let dir = tempfile::tempdir().expect("tempdir");
    let web: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1")).parse().expect("addr");
    let hash = bartleby::web::auth::hash_password("s3cret").expect("hash");
    // A closed port for the primary: every attempt fails fast and the mail stays queued. A short
    // cooldown, so that schemathesis sees both a flush and the 429 with Retry-After.
    let extra = format!(
        "first_retry = \"10m\"\n[routes]\n\"example.test\" = \"127.0.0.1:{}\"\n[web]\nlisten = \"{web}\"\n\
         users = {{ admin = \"{hash}\" }}\nflush_cooldown = \"1s\"\n",
        free_port("127.0.0.1")
    );
    let mut daemon = Daemon::start(dir.path(), "", &extra);
    queue_mail(&daemon, 12);
    let (cookie, csrf) = log_in(web, "admin", "s3cret");
    let jar = format!("bartleby_session={cookie}");
    let spec = check_document_and_errors(web, &jar);

    let work = dir.path().join("schemathesis");
    std::fs::create_dir_all(&work).expect("work dir");
    let (passed, output) = run_schemathesis(web, &cookie, &csrf, &work);
    println!("{output}");
    assert!(passed, "schemathesis ({}) found failures:\n{output}\n\ndaemon log:\n{}", tool.display(), daemon.log());

    // Not a vacuous pass: every described operation was exercised.
    let report = std::fs::read_dir(work.join("report"))
        .expect("report dir")
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect::<String>();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            let label = format!("{} {path}", method.to_ascii_uppercase());
            assert!(report.contains(&format!("name=\"{label}\"")), "{label} not tested:\n{output}");
        }
    }
    // The stateful phase reached real messages through the links, and the daemon took it all.
    let log = daemon.log();
    let done = log.lines().filter(|l| l.contains("web action") && !l.contains("web action failed")).count();
    assert!(done > 0, "no action was carried out:\n{output}");
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(http(web, "GET", "/healthz", &[], "").status, 200);
    assert!(daemon.stop().success(), "{}", daemon.log());
}
