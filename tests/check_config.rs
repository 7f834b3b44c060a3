//! `check-config` catches what `serve` would reject, and every start-up problem the operator must
//! fix exits with status 2 (the unit's RestartPreventExitStatus), so systemd does not restart it
//! forever: a TLS key that does not parse, files the service user cannot read, relayed domains
//! that differ only in case, a port in use; and routes for domains that are not relayed warn.

#[path = "support/daemon.rs"]
mod daemon;

use daemon::{cli_with_config, free_port};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// A config listening on a free loopback port, with `extra` TOML after its `[relay]` table.
fn write_config(dir: &Path, relay: &str, smtp_extra: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join("bartleby.toml");
    let config = format!(
        "hostname = \"backup.example.test\"\n[smtp]\nlisten = [\"127.0.0.1:{}\"]\nsender_auth = false\n{smtp_extra}\n[relay]\ndomains = [{relay}]\n[dns]\nnameservers = [\"127.0.0.1:1\"]\n[queue]\ndir = \"{}\"\nmin_free = 0\n[web]\nlisten = \"127.0.0.1:{}\"\n{extra}\n",
        free_port("127.0.0.1"),
        dir.join("spool").display(),
        free_port("127.0.0.1")
    );
    std::fs::write(&path, config).expect("write config");
    path
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A certificate and its key in `dir`, world-readable, and the `[smtp]` lines naming them.
fn tls_files(dir: &Path, key_text: Option<&str>) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["backup.example.test".into()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    std::fs::write(dir.join("cert.pem"), cert.pem()).expect("cert");
    std::fs::write(dir.join("key.pem"), key_text.map(str::to_string).unwrap_or_else(|| key.serialize_pem()))
        .expect("key");
    for file in ["cert.pem", "key.pem"] {
        std::fs::set_permissions(dir.join(file), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    format!("tls_cert = \"{}\"\ntls_key = \"{}\"\n", dir.join("cert.pem").display(), dir.join("key.pem").display())
}

#[test]
fn a_tls_key_that_does_not_parse_stops_check_config_and_serve_with_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = tls_files(dir.path(), Some("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"));
    let config = write_config(dir.path(), "\"example.test\"", &tls, "");
    for command in ["check-config", "serve"] {
        let out = cli_with_config(&config, &[command]);
        assert_eq!(out.status.code(), Some(2), "{command}: {}", stderr(&out));
        assert!(stderr(&out).contains("key.pem"), "{command}: {}", stderr(&out));
    }
}

#[test]
fn files_the_service_user_cannot_read_are_errors() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root, to check files as another user");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = tls_files(dir.path(), None);
    let config = write_config(dir.path(), "\"example.test\"", &tls, "");
    let check = || cli_with_config(&config, &["check-config", "--user", "nobody"]);
    // A directory of root's that nobody may enter.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let out = check();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("may not enter the directory"), "{}", stderr(&out));
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = check();
    assert!(out.status.success(), "{}", stderr(&out));
    // A key readable by root only.
    std::fs::set_permissions(dir.path().join("key.pem"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let out = check();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("smtp.tls_key") && stderr(&out).contains("may not read it"), "{}", stderr(&out));
    // Root itself (no --user, no `user`) reads everything.
    let out = cli_with_config(&config, &["check-config"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn routes_and_domain_tables_for_domains_not_relayed_warn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = "[routes]\n\"other.test\" = \"127.0.0.1:2525\"\n[domain.\"third.test\"]\nrequire_tls = true\n";
    let config = write_config(dir.path(), "\"example.test\"", "", extra);
    let out = cli_with_config(&config, &["check-config"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("warning: routes.other.test: other.test is not in relay.domains"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("warning: domain.third.test"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("example.test"), "{}", stderr(&out));
}

#[test]
fn relayed_domains_that_differ_only_in_case_are_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "\"example.test\", \"Example.TEST\"", "", "");
    for command in ["check-config", "serve"] {
        let out = cli_with_config(&config, &[command]);
        assert_eq!(out.status.code(), Some(2), "{command}: {}", stderr(&out));
        assert!(stderr(&out).contains("relay.domains") && stderr(&out).contains("same domain"), "{}", stderr(&out));
    }
}

#[test]
fn a_port_in_use_exits_2_so_systemd_does_not_restart_forever() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let config = write_config(dir.path(), "\"example.test\"", "", "");
    let text = std::fs::read_to_string(&config).expect("read");
    let text = text.replacen("listen = [\"127.0.0.1:", &format!("listen = [\"127.0.0.1:{port}\"]\n#"), 1);
    std::fs::write(&config, text).expect("write");
    let out = cli_with_config(&config, &["serve"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot listen"), "{}", stderr(&out));
    drop(taken);
}
