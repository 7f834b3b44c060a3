//! `recipients_ldap` against a real OpenLDAP slapd (tests/support/slapd.rs) and the real daemon,
//! with Python's smtplib as the sender: users known to the directory get 250 at RCPT (by `mail` or
//! by an Exchange-style `proxyAddresses` alias), others 550 5.1.1, filter injections match
//! nothing; over LDAPS, StartTLS and plain LDAP. With slapd stopped, the durable cache answers for
//! the addresses it knows, even after a restart of the daemon, and the others get 451 4.4.3; with
//! slapd back, the daemon asks it again without a restart.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/peers.rs"]
mod peers;
#[path = "support/slapd.rs"]
mod slapd;

use daemon::{Daemon, cli_with_config, free_port};
use slapd::{SUFFIX, Slapd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const BIND_DN: &str = "cn=bartleby,ou=services,dc=example,dc=test";
const BIND_PASSWORD: &str = "bind-secret";
/// The filter Active Directory with Exchange needs: the primary address or any `smtp:` alias.
const AD_FILTER: &str = "(|(mail=%s)(proxyAddresses=smtp:%s))";

fn entries() -> String {
    let person = |cn: &str, mail: &str, aliases: &[&str]| {
        let mut entry = format!(
            "dn: cn={cn},ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nobjectClass: mailRecipient\n\
             cn: {cn}\nsn: {cn}\nmail: {mail}\nproxyAddresses: SMTP:{mail}\n"
        );
        for alias in aliases {
            entry.push_str(&format!("proxyAddresses: smtp:{alias}\n"));
        }
        entry
    };
    [
        format!("dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n"),
        format!("dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people\n"),
        format!("dn: ou=services,{SUFFIX}\nobjectClass: organizationalUnit\nou: services\n"),
        format!("dn: {BIND_DN}\nobjectClass: person\ncn: bartleby\nsn: service\nuserPassword: {BIND_PASSWORD}\n"),
        person("alice", "alice@example.test", &["a.smith@example.test"]),
        person("bob", "bob@example.test", &[]),
        person("dave", "dave@example.test", &[]),
        person("carol", "carol@starttls.test", &[]),
        person("erin", "erin@plain.test", &[]),
    ]
    .join("\n")
}

/// A CA and a certificate it signed for 127.0.0.41: (CA file, server certificate, server key).
fn make_tls(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "bartleby test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate().expect("server key");
    let server_params = rcgen::CertificateParams::new(vec![slapd::ADDRESS.to_string()]).expect("server params");
    let server_cert = server_params.signed_by(&server_key, &issuer).expect("server certificate");
    let paths = (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&paths.0, ca_cert.pem()).expect("write CA");
    std::fs::write(&paths.1, server_cert.pem()).expect("write certificate");
    std::fs::write(&paths.2, server_key.serialize_pem()).expect("write key");
    paths
}

/// The daemon's configuration: example.test over LDAPS, starttls.test over StartTLS, plain.test
/// over plain LDAP, all with the Active Directory filter and a bind.
fn config(dir: &Path, smtp: std::net::SocketAddr, slapd: &Slapd, ca: &Path, password_file: &Path) -> String {
    let source = |url: String, tls: &str| {
        format!(
            "recipients_ldap = {{ url = \"{url}\", bind_dn = \"{BIND_DN}\", password_file = {password_file:?}, \
             base = \"{SUFFIX}\", filter = \"{AD_FILTER}\", timeout = \"3s\"{tls} }}\n"
        )
    };
    let ca_file = format!(", ca_file = {ca:?}");
    format!(
        "hostname = \"backup.example.test\"\n\
         [smtp]\nlisten = [\"{smtp}\"]\nsender_auth = false\n\
         [relay]\ndomains = [\"example.test\", \"starttls.test\", \"plain.test\"]\n\
         [dns]\nnameservers = [\"127.0.0.1:1\"]\n\
         [queue]\ndir = {:?}\nmin_free = 0\n\
         [web]\nlisten = \"127.0.0.1:{}\"\n\
         [domain.\"example.test\"]\n{}\
         [domain.\"starttls.test\"]\n{}\
         [domain.\"plain.test\"]\n{}",
        dir.join("spool"),
        free_port("127.0.0.1"),
        source(slapd.ldaps_url(), &ca_file),
        source(slapd.ldap_url(), &format!("{ca_file}, starttls = true")),
        source(slapd.ldap_url(), ""),
    )
}

/// Python's smtplib sends `RCPT TO` for each address in a session of its own; the replies, as
/// "250 2.1.5 Ok", in order.
const RCPT_SCRIPT: &str = r#"
import smtplib, sys
for address in sys.argv[2:]:
    with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("sender@sender.test")
        code, text = smtp.rcpt(address)
        print(code, text.decode().replace("\n", " "))
"#;

fn rcpt(daemon: &Daemon, addresses: &[&str]) -> Vec<String> {
    let out = peers::run_bounded(
        Command::new("python3").arg("-c").arg(RCPT_SCRIPT).arg(daemon.smtp.port().to_string()).args(addresses),
        Duration::from_secs(60),
    )
    .expect("python3");
    assert!(out.status.success(), "smtplib: {}\n{}", String::from_utf8_lossy(&out.stderr), daemon.log());
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// Asserts the reply to each address starts with its expected code.
fn expect_replies(daemon: &Daemon, cases: &[(&str, &str)]) {
    let addresses: Vec<&str> = cases.iter().map(|(address, _)| *address).collect();
    let replies = rcpt(daemon, &addresses);
    for ((address, expected), reply) in cases.iter().zip(&replies) {
        assert!(reply.starts_with(expected), "RCPT {address}: want {expected}, got {reply:?}\n{}", daemon.log());
    }
    assert_eq!(replies.len(), cases.len(), "{replies:?}");
}

#[test]
fn recipients_from_openldap_with_a_durable_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = make_tls(dir.path());
    let mut slapd = Slapd::start(&dir.path().join("ldap"), &entries(), &cert, &key).unwrap_or_else(|e| panic!("{e}"));
    let password_file = dir.path().join("ldap.pw");
    std::fs::write(&password_file, format!("{BIND_PASSWORD}\n")).expect("password file");
    let mut daemon =
        Daemon::start_on_free_port(dir.path(), |smtp| config(dir.path(), smtp, &slapd, &ca, &password_file));

    expect_replies(
        &daemon,
        &[
            ("alice@example.test", "250 2.1.5"),
            ("ALICE@Example.TEST", "250 2.1.5"),
            ("a.smith@example.test", "250 2.1.5"), // only a proxyAddresses alias
            ("bob@example.test", "250 2.1.5"),
            ("ghost@example.test", "550 5.1.1"),
            // Injections: unescaped, each would match every entry (RFC 4515 3 escaping stops it).
            ("*@example.test", "550 5.1.1"),
            ("\"*)(mail=*\"@example.test", "550 5.1.1"),
            ("\"*)(|(mail=*\"@example.test", "550 5.1.1"),
            ("carol@starttls.test", "250 2.1.5"),
            ("nobody@starttls.test", "550 5.1.1"),
            ("erin@plain.test", "250 2.1.5"),
            ("nobody@plain.test", "550 5.1.1"),
        ],
    );
    let cache = daemon.cli(&["recipients", "list", "--json"]);
    let cache: serde_json::Value = serde_json::from_slice(&cache.stdout).expect("recipients list --json");
    let entry = |address: &str| cache.as_array().and_then(|a| a.iter().find(|e| e["address"] == address)).cloned();
    let alice = entry("alice@example.test").expect("alice cached");
    assert_eq!((alice["valid"].as_bool(), alice["source"].as_str()), (Some(true), Some("directory")));
    assert_eq!(entry("ghost@example.test").map(|e| e["valid"].clone()), Some(serde_json::Value::Bool(false)));

    // `recipients check` asks the directory itself.
    let check = daemon.cli(&["recipients", "check", "bob@example.test", "ghost@example.test"]);
    let said = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(check.status.success(), "{said}{}", String::from_utf8_lossy(&check.stderr));
    assert!(said.contains("bob@example.test: in the directory"), "{said}");
    assert!(said.contains("ghost@example.test: not in the directory"), "{said}");

    // The directory goes away: the cache answers for what it knows, the rest waits (451).
    slapd.stop();
    let down = [
        ("alice@example.test", "250 2.1.5"),
        ("ghost@example.test", "550 5.1.1"),
        ("dave@example.test", "451 4.4.3"),
        ("carol@starttls.test", "250 2.1.5"),
    ];
    expect_replies(&daemon, &down);
    assert!(daemon.log().contains("directory lookup failed"), "{}", daemon.log());
    let check = daemon.cli(&["recipients", "check", "bob@example.test"]);
    assert!(!check.status.success(), "a directory that cannot answer fails the check");
    assert!(String::from_utf8_lossy(&check.stdout).contains("cannot answer"));
    // The cache is on disk: a restarted daemon still knows.
    daemon.stop();
    daemon.restart();
    expect_replies(&daemon, &down);

    // The directory is back: asked again, no restart of the daemon needed.
    slapd.restart().unwrap_or_else(|e| panic!("{e}"));
    expect_replies(&daemon, &[("dave@example.test", "250 2.1.5"), ("ghost@example.test", "550 5.1.1")]);
    daemon.stop();
}

/// A certificate the client cannot verify, or a wrong password, is a failed lookup (the policy
/// answers), never a yes; an unreadable password file stops check-config.
#[test]
fn tls_verification_bind_errors_and_a_bad_password_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = make_tls(dir.path());
    let slapd = Slapd::start(&dir.path().join("ldap"), &entries(), &cert, &key).unwrap_or_else(|e| panic!("{e}"));
    let password_file = dir.path().join("ldap.pw");
    std::fs::write(&password_file, format!("{BIND_PASSWORD}\n")).expect("password file");
    let smtp = "127.0.0.1:1".parse().expect("addr");
    let good = config(dir.path(), smtp, &slapd, &ca, &password_file);
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write config");
        path
    };
    let check = |config: &Path, address: &str| {
        let out = cli_with_config(config, &["recipients", "check", address]);
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, said) = check(&write("good.toml", &good), "alice@example.test");
    assert_eq!(code, Some(0), "{said}");

    // Without the site's CA the directory's certificate is not trusted, over LDAPS and StartTLS.
    let untrusted = write("untrusted.toml", &good.replace(&format!(", ca_file = {ca:?}"), ""));
    for address in ["alice@example.test", "carol@starttls.test"] {
        let (code, said) = check(&untrusted, address);
        assert_eq!(code, Some(1), "{said}");
        assert!(said.contains("cannot answer") && said.to_lowercase().contains("certificate"), "{said}");
    }

    let wrong = dir.path().join("wrong.pw");
    std::fs::write(&wrong, "not-the-password\n").expect("write");
    let wrong_password = write("wrong.toml", &good.replace(&format!("{password_file:?}"), &format!("{wrong:?}")));
    let (code, said) = check(&wrong_password, "alice@example.test");
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("bind as") && said.contains("refused"), "{said}");

    let missing = dir.path().join("missing.pw");
    let unreadable = write("missing.toml", &good.replace(&format!("{password_file:?}"), &format!("{missing:?}")));
    let out = cli_with_config(&unreadable, &["check-config"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("key `domain.example.test.recipients_ldap.password_file`"), "{said}");
    assert!(said.contains("cannot read"), "{said}");
}
