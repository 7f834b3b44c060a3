//! A reload (SIGHUP) keeps the monitor's state: an alert that is firing stays firing, with no
//! second notice and its start time kept, and its recovery after the reload is announced.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/fake_primary.rs"]
mod fake_primary;
#[path = "support/monitor_peers.rs"]
mod monitor_peers;

use daemon::{Daemon, free_port};
use fake_primary::{FakePrimary, Script};
use monitor_peers::WebhookServer;
use std::time::{Duration, Instant};

/// The alerts the webhook got so far, as JSON.
fn alerts(hook: &WebhookServer) -> Vec<serde_json::Value> {
    hook.requests().iter().map(|r| serde_json::from_slice(&r.body).expect("alert JSON")).collect()
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firing_alert_survives_sighup_and_its_recovery_is_announced() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let hook = WebhookServer::start(204).await;
        // Nothing listens at the primary's address yet: its probes fail.
        let primary_addr: std::net::SocketAddr =
            format!("127.0.0.1:{}", free_port("127.0.0.1")).parse().expect("addr");
        let extra = format!(
            "[routes]\n\"example.test\" = \"{primary_addr}\"\n[monitor]\nspool_min_free_percent = 0\nprobe_interval = \"1s\"\nprobe_timeout = \"1s\"\nprimary_down_after = \"1s\"\nreminder_interval = \"1d\"\n[[monitor.webhook]]\nurl = \"{}\"\n",
            hook.url("/")
        );
        let bartleby = Daemon::start(dir.path(), "", &extra);
        wait_for("the firing alert", Duration::from_secs(20), || !alerts(&hook).is_empty()).await;
        let fired = alerts(&hook);
        assert_eq!(fired.len(), 1, "{fired:?}");
        assert_eq!((fired[0]["rule"].as_str(), fired[0]["state"].as_str()), (Some("primary_down"), Some("firing")));
        let since = fired[0]["since"].clone();
        assert!(since.is_string(), "{fired:?}");

        bartleby.hup();
        bartleby.wait_for_log("configuration reloaded", Duration::from_secs(10));
        // Several probe rounds of the new monitor, all still down: no second notice.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(alerts(&hook).len(), 1, "a second notice after the reload: {:?}", alerts(&hook));

        let _primary = FakePrimary::start_at(primary_addr, Script::default()).await;
        wait_for("the recovery", Duration::from_secs(20), || alerts(&hook).len() >= 2).await;
        let all = alerts(&hook);
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!((all[1]["rule"].as_str(), all[1]["state"].as_str()), (Some("primary_down"), Some("recovered")));
        assert_eq!(all[1]["since"], since, "the alert's start time is kept: {all:?}");
    })
    .await
    .expect("in time");
}
