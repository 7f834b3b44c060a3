//! SIGHUP re-reads the configuration; an invalid one is refused and the old one stays in force.

#[path = "support/daemon.rs"]
mod daemon;

use daemon::{Daemon, rcpt_reply};
use std::time::Duration;

#[test]
fn sighup_applies_a_good_config_and_refuses_a_bad_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bartleby = Daemon::start(dir.path(), "", "");
    assert!(rcpt_reply(bartleby.smtp, "bob@example.test").starts_with("250"));
    assert!(rcpt_reply(bartleby.smtp, "bob@new.test").starts_with("550 5.7.1"));

    bartleby
        .rewrite_config(|c| c.replace("domains = [\"example.test\"]", "domains = [\"example.test\", \"new.test\"]"));
    bartleby.hup();
    bartleby.wait_for_log("configuration reloaded", Duration::from_secs(10));
    assert!(rcpt_reply(bartleby.smtp, "bob@new.test").starts_with("250"), "the new domain is relayed");

    let good = std::fs::read_to_string(&bartleby.config_path).expect("config");
    bartleby.rewrite_config(|c| format!("{c}\n[smtp2]\nbogus = 1\n"));
    bartleby.hup();
    bartleby.wait_for_log("reload refused", Duration::from_secs(10));
    assert!(bartleby.log().contains("unknown field `smtp2`"), "the reason is logged:\n{}", bartleby.log());
    assert!(rcpt_reply(bartleby.smtp, "bob@new.test").starts_with("250"), "the old configuration stays");

    // A listener change cannot be applied live: it is reported and the old listener kept.
    let moved = good.replace(&bartleby.smtp.to_string(), "127.0.0.1:1");
    bartleby.rewrite_config(|_| moved);
    bartleby.hup();
    bartleby.wait_for_log("takes effect only after a restart", Duration::from_secs(10));
    assert!(bartleby.log().contains("smtp.listen"));
    assert!(rcpt_reply(bartleby.smtp, "bob@example.test").starts_with("250"));
}
