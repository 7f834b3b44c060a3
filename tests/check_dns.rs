//! `bartleby check-dns` against good and broken zones served by the tests' DNS server: exit
//! status 0 when the records are right for a backup MX (a primary that is down is only a
//! warning), 1 with the reason in plain words when bartleby is missing, is the most preferred MX,
//! or a name does not resolve.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/dns_server.rs"]
mod dns_server;
#[path = "support/fake_primary.rs"]
mod fake_primary;

use dns_server::{DnsServer, Zone};
use fake_primary::{FakePrimary, Script};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

const DOMAINS: [&str; 6] = ["good.test", "missing.test", "best.test", "ghost.test", "gone.test", "down.test"];

fn zone() -> Zone {
    Zone::new()
        .mx("good.test", 10, "primary.good.test")
        .mx("good.test", 20, "backup.example.test")
        .mx("missing.test", 10, "primary.good.test")
        .mx("best.test", 10, "backup.example.test")
        .mx("best.test", 20, "primary.good.test")
        .mx("ghost.test", 10, "ghost.nowhere.test")
        .mx("ghost.test", 20, "backup.example.test")
        .mx("down.test", 10, "primary.down.test")
        .mx("down.test", 20, "backup.example.test")
        .addr("primary.good.test", "127.0.0.1")
        .addr("primary.down.test", "127.0.0.5")
        .addr("backup.example.test", "127.0.0.3")
}

/// bartleby as backup.example.test on 127.0.0.3, with MX hosts on `port` (the fake primary's).
fn write_config(dir: &Path, dns: SocketAddr, port: u16) -> PathBuf {
    let domains: Vec<String> = DOMAINS.iter().map(|d| format!("\"{d}\"")).collect();
    let config = format!(
        r#"hostname = "backup.example.test"

[smtp]
listen = ["127.0.0.3:{port}"]

[relay]
domains = [{}]

[dns]
nameservers = ["{dns}"]

[queue]
dir = "{}"

[delivery]
mx_port = {port}
dns_timeout = "1s"

[monitor]
probe_timeout = "2s"
"#,
        domains.join(", "),
        dir.join("spool").display()
    );
    let path = dir.join("bartleby.toml");
    std::fs::write(&path, config).unwrap();
    path
}

async fn check(config: &Path, domains: &[&str]) -> (Option<i32>, String) {
    let config = config.to_path_buf();
    let mut args = vec!["check-dns".to_string()];
    args.extend(domains.iter().map(|d| d.to_string()));
    let run = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        daemon::cli_with_config(&config, &args)
    });
    let out: Output = tokio::time::timeout(Duration::from_secs(60), run).await.expect("in time").unwrap();
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_and_broken_zones() {
    let primary = FakePrimary::start(Script::default()).await;
    let dns = DnsServer::start(zone()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), dns.addr, primary.addr.port());
    let port = primary.addr.port();

    let (code, out) = check(&config, &["good.test"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("ok       MX 10 primary.good.test -> 127.0.0.1\n"), "{out}");
    assert!(out.contains("ok       MX 20 backup.example.test -> 127.0.0.3 (bartleby)\n"), "{out}");
    assert!(
        out.contains(
            "bartleby is listed as backup.example.test (preference 20), which resolves to an address it listens on"
        ),
        "{out}"
    );
    assert!(out.contains("a primary is more preferred than bartleby (20): primary.good.test (10)"), "{out}");
    assert!(out.contains(&format!("primary primary.good.test [127.0.0.1]:{port} answers SMTP")), "{out}");
    assert!(out.contains("=> good.test records are right for a backup MX"), "{out}");
    assert!(!out.contains("PROBLEM"), "{out}");
    assert!(primary.commands().iter().any(|c| c.starts_with("EHLO backup.example.test")), "{:?}", primary.commands());

    let (code, out) = check(&config, &["missing.test"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("PROBLEM  bartleby (backup.example.test) is not in the MX list"), "{out}");
    assert!(out.contains("=> missing.test records are WRONG for a backup MX"), "{out}");

    let (code, out) = check(&config, &["best.test"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("PROBLEM  bartleby is the most preferred MX (preference 10)"), "{out}");

    let (code, out) = check(&config, &["ghost.test"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("PROBLEM  MX 10 ghost.nowhere.test: the name does not resolve to any address"), "{out}");

    let (code, out) = check(&config, &["gone.test"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("PROBLEM  gone.test does not exist in DNS (NXDOMAIN)"), "{out}");

    // A primary that is down is what a backup MX is for: a warning, not a wrong record.
    let (code, out) = check(&config, &["down.test"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("warning  primary primary.down.test [127.0.0.5]:{port} does not answer SMTP")),
        "{out}"
    );

    // Without arguments, every relay domain; one wrong domain makes the whole run fail.
    let (code, out) = check(&config, &[]).await;
    assert_eq!(code, Some(1), "{out}");
    for domain in DOMAINS {
        assert!(out.contains(&format!("\n{domain}:\n")) || out.starts_with(&format!("{domain}:\n")), "{domain}: {out}");
    }
}
