use super::*;
use crate::config::{DomainConfig, Route};
use std::path::Path;

fn config(dir: &Path, policy: DomainConfig) -> Arc<Config> {
    let mut config = Config::demo();
    config.queue.dir = dir.to_path_buf();
    config.relay.domains = vec!["example.test".into(), "open.test".into()];
    // A closed port: callouts find the primary down.
    config.routes.insert("example.test".into(), Route { host: "127.0.0.1".into(), port: 9 });
    config.domain.insert("example.test".into(), policy);
    config.smtp.callout_timeout = crate::config::HumanDuration::seconds(5);
    Arc::new(config)
}

#[test]
fn list_cache_and_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let list = dir.path().join("valid");
    std::fs::write(&list, "alice@example.test\n").expect("write");
    let policy = DomainConfig { recipients_file: Some(list), ..DomainConfig::default() };
    let recipients = Recipients::open(config(dir.path(), policy), dir.path()).expect("open");
    assert_eq!(recipients.lookup("Alice@example.test"), Decision::Accept);
    assert_eq!(recipients.lookup("bob@example.test"), Decision::TempFail, "unknown: tempfail by default");
    assert_eq!(recipients.lookup("anyone@open.test"), Decision::Accept, "no checks for this domain");
    add(&dir.path().into(), &["ghost@example.test".into()], false, Source::Operator, None).expect("add");
    add(&dir.path().into(), &["carol@example.test".into()], true, Source::Operator, None).expect("add");
    std::thread::sleep(REFRESH);
    assert_eq!(recipients.lookup("ghost@example.test"), Decision::Reject);
    assert_eq!(recipients.lookup("carol@example.test"), Decision::Accept);
    recipients.learn(&["dave@example.test".to_string()]);
    assert_eq!(recipients.lookup("dave@example.test"), Decision::Accept);
    let entries = super::list(&dir.path().into()).expect("list");
    assert_eq!(entries.len(), 3);
    assert!(forget(&dir.path().into(), "DAVE@example.test").expect("forget"));
    assert!(!forget(&dir.path().into(), "dave@example.test").expect("forget"));
    assert!(matches!(
        add(&dir.path().into(), &["no-at".into()], true, Source::Operator, None),
        Err(RecipientsError::BadAddress(_))
    ));
}

#[tokio::test]
async fn callout_with_the_primary_down_follows_the_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (policy, expected) in [
        (UnknownPolicy::Tempfail, Decision::TempFail),
        (UnknownPolicy::Accept, Decision::Accept),
        (UnknownPolicy::Hold, Decision::Hold),
    ] {
        let domain = DomainConfig { callout: true, unknown_recipient: policy, ..DomainConfig::default() };
        let recipients = Recipients::open(config(dir.path(), domain), dir.path()).expect("open");
        assert_eq!(recipients.lookup("x@example.test"), Decision::Callout);
        let decided = tokio::time::timeout(Duration::from_secs(20), recipients.callout("x@example.test")).await;
        assert_eq!(decided.expect("bounded"), expected, "{policy:?}");
    }
    assert!(super::list(&dir.path().into()).expect("list").is_empty(), "nothing cached while the primary is down");
}

#[test]
fn callout_budget_is_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = (*config(dir.path(), DomainConfig::default())).clone();
    c.smtp.callouts_per_minute = 2;
    let recipients = Recipients::open(Arc::new(c), dir.path()).expect("open");
    assert!(recipients.take_callout_budget());
    assert!(recipients.take_callout_budget());
    assert!(!recipients.take_callout_budget());
}

#[tokio::test]
async fn a_directory_that_cannot_answer_leaves_it_to_the_cache_then_the_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A closed port: the directory is down.
    let source: crate::config::LdapSource =
        toml::from_str("url = \"ldap://127.0.0.1:9\"\nbase = \"dc=example,dc=test\"\ntimeout = \"5s\"\n")
            .expect("source");
    let policy = DomainConfig { recipients_ldap: Some(source), ..DomainConfig::default() };
    let recipients = Recipients::open(config(dir.path(), policy), dir.path()).expect("open");
    assert_eq!(recipients.lookup("x@example.test"), Decision::Callout, "the directory is asked first");
    let bounded = |address: &'static str| tokio::time::timeout(Duration::from_secs(20), recipients.callout(address));
    assert_eq!(bounded("x@example.test").await.expect("bounded"), Decision::TempFail, "unknown: the policy");
    let ttl = Some(Duration::from_secs(3600));
    add(&dir.path().into(), &["known@example.test".into()], true, Source::Directory, ttl).expect("add");
    add(&dir.path().into(), &["gone@example.test".into()], false, Source::Directory, ttl).expect("add");
    add(&dir.path().into(), &["vip@example.test".into()], true, Source::Operator, None).expect("add");
    std::thread::sleep(REFRESH);
    assert_eq!(recipients.lookup("known@example.test"), Decision::Callout, "a cached answer is not the directory's");
    assert_eq!(recipients.lookup("vip@example.test"), Decision::Accept, "the operator's entries come first");
    assert_eq!(bounded("known@example.test").await.expect("bounded"), Decision::Accept);
    assert_eq!(bounded("gone@example.test").await.expect("bounded"), Decision::Reject);
}
