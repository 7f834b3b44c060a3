use super::*;
use crate::config::Config;

/// A configuration with `fields` as the domain's `recipients_ldap` table.
fn parse(fields: &str) -> Result<Config, String> {
    let text = format!("[relay]\ndomains = [\"example.com\"]\n[domain.\"example.com\".recipients_ldap]\n{fields}\n");
    Config::parse(&text, "ldap.toml").map_err(|e| e.to_string())
}

/// The one-line error for `fields`, which must name `key` and say `problem`.
fn rejects(fields: &str, key: &str, problem: &str) {
    let line = parse(fields).expect_err(fields);
    assert!(line.contains(&format!("key `domain.example.com.recipients_ldap{key}`")), "{fields}: {line}");
    assert!(line.contains(problem), "{fields}: {line}");
    assert!(!line.contains('\n'), "{line}");
}

fn password_file(dir: &Path, content: &str) -> PathBuf {
    let path = dir.join("ldap.pw");
    std::fs::write(&path, content).expect("write password");
    path
}

#[test]
fn an_active_directory_source_parses_with_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = password_file(dir.path(), "s3cret\n");
    let config = parse(&format!(
        "url = \"ldaps://dc1.example.com\"\nbind_dn = \"CN=bartleby,CN=Users,DC=example,DC=com\"\n\
         password_file = {pw:?}\nbase = \"DC=example,DC=com\"\nfilter = \"(|(mail=%s)(proxyAddresses=smtp:%s))\"\n"
    ))
    .expect("valid");
    let policy = config.domain_policy("example.com");
    assert!(policy.verifies_recipients());
    let source = policy.recipients_ldap.expect("source");
    assert_eq!(source.timeout, HumanDuration::seconds(5));
    assert!(!source.starttls);
    assert_eq!(source.parsed_url(), Ok(LdapUrl { tls: true, host: "dc1.example.com".into(), port: 636 }));
    assert_eq!(read_password(&pw).as_deref(), Ok("s3cret"));
    // check-config prints the settings: the password itself is not among them.
    assert!(!config.to_toml().contains("s3cret"));
    assert!(config.to_toml().contains("recipients_ldap"));
}

#[test]
fn anonymous_starttls_source_with_inline_table() {
    let text = "[domain.\"example.com\"]\nrecipients_ldap = { url = \"ldap://[::1]:3389/\", base = \"o=x\", \
                starttls = true, timeout = \"2s\" }\n";
    let config = Config::parse(text, "t.toml").expect("valid");
    let source = config.domain_policy("example.com").recipients_ldap.expect("source");
    assert_eq!(source.filter, "(mail=%s)");
    assert_eq!(source.parsed_url(), Ok(LdapUrl { tls: false, host: "::1".into(), port: 3389 }));
}

#[test]
fn filter_escaping_follows_rfc_4515() {
    let source = LdapSource {
        url: "ldap://dc".into(),
        bind_dn: None,
        password_file: None,
        base: "dc=x".into(),
        filter: "(|(mail=%s)(proxyAddresses=smtp:%s))".into(),
        starttls: false,
        ca_file: None,
        timeout: HumanDuration::seconds(5),
    };
    assert_eq!(
        source.filter_for("alice@example.com"),
        "(|(mail=alice@example.com)(proxyAddresses=smtp:alice@example.com))"
    );
    // An injection: unescaped, `*)(mail=*` would close the assertion and match every entry.
    let injected = source.filter_for("*)(mail=*@example.com");
    assert_eq!(
        injected,
        "(|(mail=\\2a\\29\\28mail=\\2a@example.com)(proxyAddresses=smtp:\\2a\\29\\28mail=\\2a@example.com))"
    );
    assert!(ldap3::parse_filter(&injected).is_ok(), "still one well-formed filter");
    assert_eq!(source.filter_for("a\\b\0c@x"), "(|(mail=a\\5cb\\00c@x)(proxyAddresses=smtp:a\\5cb\\00c@x))");
    // UTF-8 (SMTPUTF8 addresses) needs no escaping in an RFC 4515 string filter.
    assert!(source.filter_for("jürgen@x").contains("mail=jürgen@x"));
}

#[test]
fn password_file_trims_one_line_end_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert_eq!(read_password(&password_file(dir.path(), "pw\r\n")).as_deref(), Ok("pw"));
    assert_eq!(read_password(&password_file(dir.path(), " pw \n\n")).as_deref(), Ok(" pw \n"));
    assert!(read_password(&password_file(dir.path(), "\n")).expect_err("empty").contains("is empty"));
    let missing = read_password(&dir.path().join("nope")).expect_err("missing");
    assert!(missing.contains("cannot read"), "{missing}");
}

#[test]
fn every_bad_input_names_its_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = password_file(dir.path(), "pw\n");
    let empty_pw = dir.path().join("empty.pw");
    std::fs::write(&empty_pw, "").expect("write");
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate\n").expect("write");
    let ok = "base = \"dc=x\"\n";
    rejects(&format!("url = \"http://dc\"\n{ok}"), ".url", "must be ldap:// or ldaps://");
    rejects(&format!("url = \"dc1.example.com\"\n{ok}"), ".url", "is not ldap://host");
    rejects(&format!("url = \"ldap://\"\n{ok}"), ".url", "names no host");
    rejects(&format!("url = \"ldap://dc:0\"\n{ok}"), ".url", "bad port");
    rejects(&format!("url = \"ldap://dc:ldap\"\n{ok}"), ".url", "bad port");
    rejects(&format!("url = \"ldap://dc/dc=x??sub\"\n{ok}"), ".url", "have their own keys");
    rejects(&format!("url = \"ldap://[dc]\"\n{ok}"), ".url", "not an IPv6 address");
    rejects(&format!("url = \"ldaps://dc\"\nstarttls = true\n{ok}"), ".starttls", "ldaps:// is TLS already");
    rejects(&format!("url = \"ldap://dc\"\nbind_dn = \"cn=b\"\n{ok}"), ".password_file", "needs a password_file");
    rejects(&format!("url = \"ldap://dc\"\npassword_file = {pw:?}\n{ok}"), ".bind_dn", "needs a bind_dn");
    let missing = dir.path().join("missing.pw");
    rejects(
        &format!("url = \"ldap://dc\"\nbind_dn = \"cn=b\"\npassword_file = {missing:?}\n{ok}"),
        ".password_file",
        "cannot read",
    );
    rejects(
        &format!("url = \"ldap://dc\"\nbind_dn = \"cn=b\"\npassword_file = {empty_pw:?}\n{ok}"),
        ".password_file",
        "is empty",
    );
    rejects(
        &format!("url = \"ldap://dc\"\nbind_dn = \" \"\npassword_file = {pw:?}\n{ok}"),
        ".bind_dn",
        "must not be empty",
    );
    rejects("url = \"ldap://dc\"\nbase = \"\"\n", ".base", "must name where the search starts");
    rejects(&format!("url = \"ldap://dc\"\nfilter = \"(mail=alice)\"\n{ok}"), ".filter", "has no %s");
    rejects(&format!("url = \"ldap://dc\"\nfilter = \"(mail=%s\"\n{ok}"), ".filter", "not an RFC 4515 filter");
    rejects(&format!("url = \"ldap://dc\"\nfilter = \"mail=%s)(x=y\"\n{ok}"), ".filter", "not an RFC 4515 filter");
    rejects(&format!("url = \"ldap://dc\"\nca_file = {not_pem:?}\n{ok}"), ".ca_file", "no PEM certificate");
    rejects(
        &format!("url = \"ldap://dc\"\nca_file = \"/nonexistent/ca.pem\"\n{ok}"),
        ".ca_file",
        "/nonexistent/ca.pem",
    );
    rejects(&format!("url = \"ldap://dc\"\ntimeout = \"0s\"\n{ok}"), ".timeout", "longer than 0");
    // serde's own checks: a missing field, an unknown field, a bad duration.
    rejects("url = \"ldap://dc\"\n", "", "missing field `base`");
    rejects(&format!("url = \"ldap://dc\"\nbindn = \"x\"\n{ok}"), ".bindn", "unknown field `bindn`");
    rejects(&format!("url = \"ldap://dc\"\ntimeout = \"5 seconds\"\n{ok}"), ".timeout", "not a duration");
}
