//! Each alert channel end to end with `bartleby alert-test`: a command that writes the JSON it
//! gets on stdin to a file, a webhook to an HTTP server on loopback, and mail through a test SMTP
//! server standing in for the smarthost. A failing channel makes the command fail and says which.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/fake_primary.rs"]
mod fake_primary;
#[path = "support/monitor_peers.rs"]
mod monitor_peers;

use daemon::cli_with_config;
use fake_primary::{FakePrimary, Script};
use monitor_peers::WebhookServer;
use std::path::Path;
use std::process::Output;
use std::time::Duration;
use tokio::task::spawn_blocking;

const LIMIT: Duration = Duration::from_secs(60);

fn write_config(dir: &Path, monitor: &str) -> std::path::PathBuf {
    let path = dir.join("bartleby.toml");
    let config = format!(
        "hostname = \"backup.example.test\"\n\n[relay]\ndomains = [\"example.test\"]\n\n[queue]\ndir = \"{}\"\n\n{monitor}",
        dir.join("spool").display()
    );
    std::fs::write(&path, config).unwrap();
    path
}

async fn alert_test(config: std::path::PathBuf) -> Output {
    spawn_blocking(move || cli_with_config(&config, &["alert-test"])).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_channel_gets_the_test_alert() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let smarthost = FakePrimary::start(Script::default()).await;
        let hook = WebhookServer::start(204).await;
        let file = dir.path().join("pager.json");
        let monitor = format!(
            r#"[[monitor.command]]
argv = ["/bin/sh", "-c", "cat > '{}'"]

[[monitor.webhook]]
url = "{}"

[[monitor.email]]
to = ["admin@example.net", "oncall@example.net"]
smarthost = "{}"
"#,
            file.display(),
            hook.url("/hooks/bartleby"),
            smarthost.addr
        );
        let out = alert_test(write_config(dir.path(), &monitor)).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(stdout.matches("sent ").count(), 3, "{stdout}");

        // The command got the JSON on stdin.
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(json["rule"], "test");
        assert_eq!(json["state"], "test");
        assert_eq!(json["host"], "backup.example.test");

        // The webhook got the same JSON, POSTed.
        let requests = hook.requests();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].method, "POST");
        assert_eq!(requests[0].path, "/hooks/bartleby");
        assert!(requests[0].headers.to_ascii_lowercase().contains("content-type: application/json"));
        let posted: serde_json::Value = serde_json::from_slice(&requests[0].body).unwrap();
        assert_eq!(posted["summary"], json["summary"]);

        // The mail went through the smarthost to both admins.
        let messages = smarthost.messages();
        assert_eq!(messages.len(), 1);
        let mail = &messages[0];
        assert!(mail.mail.contains("<bartleby@backup.example.test>"), "{}", mail.mail);
        assert_eq!(mail.rcpts.len(), 2, "{:?}", mail.rcpts);
        let body = String::from_utf8_lossy(&mail.body);
        assert!(body.contains("Subject: [bartleby TEST] test alert from bartleby"), "{body}");
        assert!(body.contains("Auto-Submitted: auto-generated\r\n"), "{body}");
        assert!(body.contains("To: admin@example.net, oncall@example.net\r\n"), "{body}");
    })
    .await
    .expect("in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_channel_is_reported_and_the_others_still_run() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let hook = WebhookServer::start(500).await;
        let file = dir.path().join("pager.json");
        let monitor = format!(
            r#"[[monitor.command]]
argv = ["/bin/sh", "-c", "exit 3"]

[[monitor.webhook]]
url = "{}"

[[monitor.command]]
argv = ["/bin/sh", "-c", "cat > '{}'"]
"#,
            hook.url("/"),
            file.display()
        );
        let out = alert_test(write_config(dir.path(), &monitor)).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        assert!(stdout.contains("FAILED   command /bin/sh: command: /bin/sh: exited with exit status: 3"), "{stdout}");
        assert!(stdout.contains("HTTP status 500"), "{stdout}");
        assert!(std::fs::read_to_string(&file).unwrap().contains(r#""rule":"test""#));
        assert_eq!(hook.requests().len(), 1);
    })
    .await
    .expect("in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_channels_alert_test_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(LIMIT, alert_test(write_config(dir.path(), ""))).await.expect("in time");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no alert channels configured"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_is_refused_as_smarthost() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[routes]\n\"example.test\" = \"127.0.0.1:2526\"\n\n[[monitor.email]]\nto = [\"a@example.net\"]\nsmarthost = \"127.0.0.1:2526\"\n",
    );
    let out = tokio::time::timeout(LIMIT, alert_test(config)).await.expect("in time");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("monitor.email[0].smarthost") && stderr.contains("must not be a primary"), "{stderr}");
}
