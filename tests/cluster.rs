//! Several backup MX nodes sharing one queue on a real PostgreSQL 15 (issue 13, docs/cluster.md):
//! three bartleby daemons on their own loopback addresses (127.0.0.21, .22, .23), senders spread
//! over them, and a primary (Postfix, or the scriptable fake where a fault is needed).
//!
//! - every message that got a 250 is delivered once;
//! - a node killed in mid-delivery: the others deliver its messages within the lease;
//! - PostgreSQL stopped: 451 meanwhile, nothing acknowledged lost, recovery without a restart;
//! - `strict_order` across nodes: the primary sees the arrival order.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/fake_primary.rs"]
mod fake_primary;
#[path = "support/peers.rs"]
mod peers;
#[path = "support/postgres.rs"]
mod postgres;

use daemon::{Daemon, cli_with_config, free_port, queued_id, send_raw};
use fake_primary::{FakePrimary, Script, Stall};
use peers::Postfix;
use postgres::PgServer;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::{Duration, Instant};

/// The lease of these tests: short, so that a dead node's mail moves on quickly.
const LEASE_SECS: u64 = 4;

/// A node's configuration: relays example.test to `primary`, its queue in PostgreSQL at `url`.
fn node_config(n: usize, dir: &Path, smtp: SocketAddr, url: &str, primary: SocketAddr, extra: &str) -> String {
    format!(
        "hostname = \"backup{n}.example.test\"\n\
         [smtp]\nlisten = [\"{smtp}\"]\nsender_auth = false\n\n\
         [relay]\ndomains = [\"example.test\"]\n\n\
         [dns]\nnameservers = [\"127.0.0.1:1\"]\n\n\
         [queue]\ndir = \"{}\"\nmin_free = 0\nstore = \"postgres\"\nurl = \"{url}\"\nnode = \"node{n}\"\n\
         lease = \"{LEASE_SECS}s\"\ndb_timeout = \"3s\"\nfirst_retry = \"1s\"\nretry_interval = \"2s\"\n\n\
         [routes]\n\"example.test\" = \"{primary}\"\n\n\
         [web]\nlisten = \"127.0.0.1:{}\"\n{extra}",
        dir.join("spool").display(),
        free_port("127.0.0.1"),
    )
}

/// Node `n` (1, 2, 3) on 127.0.0.2n.
fn start_node(root: &Path, n: usize, url: &str, primary: SocketAddr, extra: &str) -> Daemon {
    let ip = format!("127.0.0.{}", 20 + n);
    let dir = root.join(format!("node{n}"));
    std::fs::create_dir_all(&dir).expect("node dir");
    let smtp: SocketAddr = format!("{ip}:{}", free_port(&ip)).parse().expect("addr");
    Daemon::start_with(&dir, &node_config(n, &dir, smtp, url, primary, extra), smtp)
}

/// Sends one message with `subject` through `node`; returns the reply to the end of data.
fn send(node: SocketAddr, to: &str, subject: &str) -> String {
    let data = format!("Subject: {subject}\r\nMessage-ID: <{subject}@sender.test>\r\n\r\nbody of {subject}\r\n");
    send_raw(node, "a@sender.test", &[to], data.as_bytes()).unwrap_or_else(|e| format!("error: {e}"))
}

/// The subject of a message as delivered.
fn subject(message: &[u8]) -> String {
    let text = String::from_utf8_lossy(message);
    text.lines().find_map(|l| l.strip_prefix("Subject: ")).map(str::to_string).unwrap_or_default()
}

fn queued_count(pg: &PgServer) -> usize {
    pg.psql("SELECT count(*) FROM bartleby_messages").unwrap_or_default().trim().parse().unwrap_or(usize::MAX)
}

/// Postfix as the primary on 127.0.0.2 at a free port, mailbox `alice`.
fn postfix_primary() -> Postfix {
    let ip = Ipv4Addr::new(127, 0, 0, 2);
    let port = peers::free_loopback_port(ip).expect("port");
    Postfix::start(SocketAddrV4::new(ip, port), "example.test", &["alice"]).expect("postfix primary")
}

/// Subjects delivered to alice at the Postfix primary, in delivery order.
fn delivered(postfix: &Postfix) -> Vec<String> {
    postfix.maildir_messages("alice").unwrap_or_default().iter().map(|m| subject(m)).collect()
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}\n{}", context());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every message acknowledged by any node reaches the primary, and none twice: 60 messages from
/// 12 concurrent senders spread over three nodes, first with the primary down (queued, then
/// flushed from one node when it is back), then with it up.
#[test]
fn every_acknowledged_message_is_delivered_once_by_three_nodes() {
    let pg = PgServer::start("127.0.0.1").expect("postgres");
    let root = tempfile::tempdir().expect("tempdir");
    let mut postfix = postfix_primary();
    let primary = SocketAddr::V4(postfix.listen());
    postfix.stop().expect("primary down");
    let nodes: Vec<Daemon> = (1..=3).map(|n| start_node(root.path(), n, &pg.url(), primary, "")).collect();
    let addrs: Vec<SocketAddr> = nodes.iter().map(|d| d.smtp).collect();
    let send_round = |round: &str| -> Vec<String> {
        let senders: Vec<_> = (0..12)
            .map(|s| {
                let (addrs, round) = (addrs.clone(), round.to_string());
                std::thread::spawn(move || {
                    (0..5)
                        .map(|i| {
                            let subject = format!("{round}-{s}-{i}");
                            let reply = send(addrs[(s + i) % 3], "alice@example.test", &subject);
                            assert!(reply.starts_with("250"), "{subject}: {reply}");
                            subject
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        senders.into_iter().flat_map(|t| t.join().expect("sender")).collect()
    };
    let mut sent = send_round("down");
    assert_eq!(queued_count(&pg), 60, "all 60 are in the shared queue");
    let accepted_by =
        pg.psql("SELECT count(DISTINCT accepted_by) FROM bartleby_messages").unwrap_or_else(|e| e.to_string());
    assert_eq!(accepted_by.trim(), "3", "each node accepted some");
    // The node list shows the whole queue, whichever node is asked.
    let listed = nodes[2].queue();
    assert_eq!(listed.len(), 60, "node3 lists the shared queue");
    postfix.resume().expect("primary back");
    let flush = cli_with_config(&nodes[0].config_path, &["queue", "flush"]);
    assert!(flush.status.success(), "{}", String::from_utf8_lossy(&flush.stderr));
    sent.extend(send_round("up"));
    wait_for(
        "all 120 delivered",
        Duration::from_secs(90),
        || delivered(&postfix).len() >= 120,
        || format!("delivered {}; queued {}\n{}", delivered(&postfix).len(), queued_count(&pg), nodes[0].log()),
    );
    std::thread::sleep(Duration::from_secs(2));
    let mut counts: HashMap<String, usize> = HashMap::new();
    for s in delivered(&postfix) {
        *counts.entry(s).or_default() += 1;
    }
    for s in &sent {
        assert_eq!(counts.get(s), Some(&1), "{s} delivered once");
    }
    assert_eq!(counts.len(), sent.len(), "nothing else delivered: {counts:?}");
    wait_for(
        "the queue empty",
        Duration::from_secs(10),
        || queued_count(&pg) == 0,
        || pg.psql("SELECT * FROM bartleby_messages").unwrap_or_else(|e| e.to_string()),
    );
    for node in &nodes {
        assert!(!node.log().contains("panicked"), "{}", node.log());
    }
}

/// A node killed (SIGKILL) while it delivers: its leases expire and the other nodes deliver its
/// messages within the lease; no message is lost, and the only second copies are of deliveries
/// that were in flight at the kill.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_nodes_messages_are_delivered_by_the_others_within_the_lease() {
    let pg = PgServer::start("127.0.0.1").expect("postgres");
    let root = tempfile::tempdir().expect("tempdir");
    // A primary that takes the message and never answers: node1's deliveries hang in mid-flight.
    let stalling = FakePrimary::start(Script { stall: Some(Stall::AfterData), ..Script::default() }).await;
    let primary = stalling.addr;
    let url = pg.url();
    let mut node1 = {
        let (root, url) = (root.path().to_path_buf(), url.clone());
        tokio::task::spawn_blocking(move || start_node(&root, 1, &url, primary, "")).await.expect("node1")
    };
    let smtp = node1.smtp;
    let sent: Vec<String> = tokio::task::spawn_blocking(move || {
        (0..10)
            .map(|i| {
                let subject = format!("kill-{i}");
                let reply = send(smtp, "alice@example.test", &subject);
                assert!(reply.starts_with("250"), "{reply}");
                subject
            })
            .collect()
    })
    .await
    .expect("send");
    let deadline = Instant::now() + Duration::from_secs(20);
    while pg.psql("SELECT count(*) FROM bartleby_messages WHERE leased_by = 'node1'").unwrap_or_default().trim() == "0"
    {
        assert!(Instant::now() < deadline, "node1 never claimed a message\n{}", node1.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let in_flight = stalling.messages().len();
    assert!(in_flight >= 1, "a delivery is in flight at the kill");
    node1.kill();
    let killed_at = Instant::now();
    drop(stalling);
    // The stalled listener closes once its aborted task is dropped: wait for the address.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpListener::bind(primary).await.is_err() {
        assert!(Instant::now() < deadline, "the stalled primary's address stays taken");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let primary_addr = primary;
    let primary = FakePrimary::start_at(primary_addr, Script::default()).await;
    let others: Vec<Daemon> = {
        let (root, url) = (root.path().to_path_buf(), url.clone());
        tokio::task::spawn_blocking(move || (2..=3).map(|n| start_node(&root, n, &url, primary_addr, "")).collect())
            .await
            .expect("nodes 2 and 3")
    };
    let deadline = killed_at + Duration::from_secs(LEASE_SECS * 3 + 10);
    loop {
        let subjects: Vec<String> = primary.messages().iter().map(|m| subject(&m.body)).collect();
        if sent.iter().all(|s| subjects.contains(s)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node1's messages were not delivered by the others: got {subjects:?}\n{}",
            others[0].log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = killed_at.elapsed();
    assert!(took <= Duration::from_secs(LEASE_SECS * 3 + 10), "took {took:?}");
    let subjects: Vec<String> = primary.messages().iter().map(|m| subject(&m.body)).collect();
    for s in &sent {
        assert_eq!(subjects.iter().filter(|d| *d == s).count(), 1, "{s} once at the new primary: {subjects:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while queued_count(&pg) != 0 {
        assert!(
            Instant::now() < deadline,
            "queue not empty: {}",
            pg.psql("SELECT id, leased_by FROM bartleby_messages").unwrap_or_else(|e| e.to_string())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// PostgreSQL stopped for a while: the node answers 451 4.3.0 (never 250 without a commit), the
/// messages acknowledged before stay, and once the database is back the node accepts and delivers
/// again without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_outage_gives_451_and_the_node_recovers_by_itself() {
    let mut pg = PgServer::start("127.0.0.1").expect("postgres");
    let root = tempfile::tempdir().expect("tempdir");
    // The primary is unreachable at first (nothing listens there), so the mail stays queued.
    let primary: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1")).parse().expect("addr");
    let url = pg.url();
    let node = {
        let (root, url) = (root.path().to_path_buf(), url.clone());
        tokio::task::spawn_blocking(move || start_node(&root, 1, &url, primary, "")).await.expect("node")
    };
    let smtp = node.smtp;
    let before = tokio::task::spawn_blocking(move || send(smtp, "alice@example.test", "before")).await.expect("send");
    assert!(before.starts_with("250"), "{before}");
    pg.stop().expect("stop postgres");
    let during = tokio::task::spawn_blocking(move || send(smtp, "alice@example.test", "during")).await.expect("send");
    assert!(during.starts_with("451 4.3.0"), "while the database is down: {during}");
    pg.start_again().expect("start postgres again");
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let reply = tokio::task::spawn_blocking(move || send(smtp, "alice@example.test", "after")).await.expect("send");
        if reply.starts_with("250") {
            break reply;
        }
        assert!(Instant::now() < deadline, "not accepting after the database came back: {reply}\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let before_id = queued_id(&before).expect("id");
    let after_id = queued_id(&after).expect("id");
    let ids = pg.psql("SELECT id FROM bartleby_messages ORDER BY id").unwrap_or_else(|e| e.to_string());
    assert!(ids.contains(&before_id) && ids.contains(&after_id), "{ids}");
    assert_eq!(ids.lines().filter(|l| !l.trim().is_empty()).count(), 2, "the 451 left nothing queued: {ids}");
    let primary = FakePrimary::start_at(primary, Script::default()).await;
    let flush = cli_with_config(&node.config_path, &["queue", "flush"]);
    assert!(flush.status.success(), "{}", String::from_utf8_lossy(&flush.stderr));
    let deadline = Instant::now() + Duration::from_secs(30);
    while primary.messages().len() < 2 {
        assert!(Instant::now() < deadline, "not delivered after the outage\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut subjects: Vec<String> = primary.messages().iter().map(|m| subject(&m.body)).collect();
    subjects.sort();
    assert_eq!(subjects, ["after", "before"], "each acknowledged message once, the refused one never");
    assert!(!node.log().contains("panicked"), "{}", node.log());
}

/// `strict_order` across nodes: messages accepted alternately by three nodes while the primary is
/// down reach it, once it is back, in the order they were accepted.
#[test]
fn strict_order_holds_across_nodes() {
    let pg = PgServer::start("127.0.0.1").expect("postgres");
    let root = tempfile::tempdir().expect("tempdir");
    let mut postfix = postfix_primary();
    let primary = SocketAddr::V4(postfix.listen());
    postfix.stop().expect("primary down");
    let extra = "\n[domain.\"example.test\"]\nstrict_order = true\n";
    let nodes: Vec<Daemon> = (1..=3).map(|n| start_node(root.path(), n, &pg.url(), primary, extra)).collect();
    let mut sent = Vec::new();
    for i in 0..30 {
        let subject = format!("order-{i:02}");
        let reply = send(nodes[i % 3].smtp, "alice@example.test", &subject);
        assert!(reply.starts_with("250"), "{reply}");
        sent.push(subject);
    }
    postfix.resume().expect("primary back");
    // New mail while the backlog waits, through every node.
    for i in 30..36 {
        let subject = format!("order-{i:02}");
        let reply = send(nodes[i % 3].smtp, "alice@example.test", &subject);
        assert!(reply.starts_with("250"), "{reply}");
        sent.push(subject);
    }
    let flush = cli_with_config(&nodes[1].config_path, &["queue", "flush"]);
    assert!(flush.status.success(), "{}", String::from_utf8_lossy(&flush.stderr));
    wait_for(
        "all delivered",
        Duration::from_secs(90),
        || delivered(&postfix).len() >= sent.len(),
        || format!("{:?}\n{}", delivered(&postfix), nodes[0].log()),
    );
    assert_eq!(delivered(&postfix), sent, "the primary got the mail in arrival order");
}

/// The store's leases, through the library against the real server: a message claimed by one node
/// is neither claimed nor overwritten by another while the lease lives (fencing); once the holder
/// is silent for a lease, another node takes it and the first one's late outcome is refused. One
/// node at a time holds a `strict_order` domain's lane.
#[test]
fn leases_fence_outcomes_and_lanes_admit_one_node() {
    use bartleby::spool::postgres::{PgQueue, Role};
    use bartleby::spool::{Envelope, Queue, Recipient, SpoolError};
    use std::sync::Arc;
    let pg = PgServer::start("127.0.0.1").expect("postgres");
    let root = tempfile::tempdir().expect("tempdir");
    let config = |name: &str, lease: &str| {
        let text = format!(
            "[queue]\ndir = \"{}\"\nstore = \"postgres\"\nurl = \"{}\"\nnode = \"{name}\"\nlease = \"{lease}\"\ndb_timeout = \"5s\"\n",
            root.path().join(name).display(),
            pg.url()
        );
        bartleby::config::Config::parse(&text, "test.toml").expect("config")
    };
    // `a` is a tool (no heartbeat), so its 2 s lease lapses; `b` and `c` are nodes.
    let a: Arc<dyn Queue> = Arc::new(PgQueue::open(&config("a", "2s"), Role::Tool).expect("a"));
    let b = PgQueue::open(&config("b", "30s"), Role::Node).expect("b");
    let c = PgQueue::open(&config("c", "30s"), Role::Node).expect("c");
    let id = b.new_id();
    let mut incoming =
        Arc::new(PgQueue::open(&config("d", "30s"), Role::Node).expect("d")).incoming(&id).expect("incoming");
    incoming.write(b"Subject: x\r\n\r\nx\r\n").expect("write");
    let envelope = Envelope::new(id.clone(), "a@sender.test".into(), vec![Recipient::new("u@example.test".into())]);
    incoming.commit(envelope).expect("commit");

    let claimed = a.claim(std::slice::from_ref(&id), None);
    assert_eq!(claimed.len(), 1, "a claims the message");
    assert!(b.claim(std::slice::from_ref(&id), None).is_empty(), "b cannot claim it while a's lease lives");
    let mut changed = claimed[0].envelope.clone();
    changed.attempts = 7;
    assert!(matches!(b.update(std::slice::from_ref(&changed)), Err(SpoolError::Leased { .. })), "b is fenced");
    assert!(matches!(b.delete(&id), Err(SpoolError::Leased { .. })), "an operator on b hears who has it");
    let holder = b.get(&id).and_then(|e| e.leased_by).unwrap_or_default();
    assert!(holder.starts_with("tool-"), "listings name the holder (a tool here): {holder}");

    std::thread::sleep(Duration::from_millis(2500));
    let taken = b.claim(std::slice::from_ref(&id), None);
    assert_eq!(taken.len(), 1, "after a's lease lapsed, b takes the message");
    assert!(
        matches!(a.update(std::slice::from_ref(&changed)), Err(SpoolError::Leased { .. })),
        "a's late outcome is refused"
    );
    a.remove(std::slice::from_ref(&id)).expect("remove is not an error");
    assert!(b.get(&id).is_some(), "a's late removal did not remove b's message");
    b.remove(std::slice::from_ref(&id)).expect("b settles");
    assert!(c.get(&id).is_none(), "b's removal went through");

    assert!(b.claim_lane("example.test"), "b takes the lane");
    assert!(!c.claim_lane("Example.TEST"), "c waits while b holds it");
    assert!(b.claim_lane("example.test"), "the holder keeps it");
    b.release_lane("example.test");
    assert!(c.claim_lane("example.test"), "c takes it once b is done");
    assert!(!b.claim_lane("example.test"), "and b waits now");
}

/// The recipient cache lives in the shared store: an address one node records (here by the
/// operator; callout answers and addresses the primary accepted go the same way) is known to the
/// others.
#[test]
fn the_recipient_cache_is_shared_by_the_nodes() {
    let pg = PgServer::start("127.0.0.1").expect("postgres");
    let root = tempfile::tempdir().expect("tempdir");
    let primary: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let configs: Vec<std::path::PathBuf> = (1..=2)
        .map(|n| {
            let dir = root.path().join(format!("node{n}"));
            std::fs::create_dir_all(&dir).expect("dir");
            let path = dir.join("bartleby.toml");
            let smtp: SocketAddr = format!("127.0.0.{}:2525", 20 + n).parse().expect("addr");
            std::fs::write(&path, node_config(n, &dir, smtp, &pg.url(), primary, "")).expect("config");
            path
        })
        .collect();
    let added = cli_with_config(&configs[0], &["recipients", "add", "bob@example.test"]);
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    let listed = cli_with_config(&configs[1], &["recipients", "list"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success() && text.contains("bob@example.test"),
        "{text}{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let forgotten = cli_with_config(&configs[1], &["recipients", "forget", "bob@example.test"]);
    assert!(forgotten.status.success(), "{}", String::from_utf8_lossy(&forgotten.stderr));
    let listed = cli_with_config(&configs[0], &["recipients", "list"]);
    assert!(!String::from_utf8_lossy(&listed.stdout).contains("bob@example.test"), "forgotten everywhere");
    assert_eq!(
        pg.psql("SELECT count(*) FROM bartleby_documents WHERE name = 'recipients'").unwrap_or_default().trim(),
        "1"
    );
}

/// The alert rules' state and the chart's samples live in the shared store: with the primary
/// down, two nodes that both probe it send one `primary_down` alert between them, a node that
/// restarts does not send it again, and the chart has one series (a node samples only when no node
/// did for half an interval).
#[test]
fn alerts_and_the_chart_are_shared_by_the_nodes() {
    let pg = PgServer::start("127.0.0.1").expect("postgres");
    let root = tempfile::tempdir().expect("tempdir");
    // Nothing listens there: every probe finds the primary down.
    let primary: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let alerts = |n: usize| root.path().join(format!("alerts{n}.jsonl"));
    let extra = |n: usize| {
        format!(
            "sample_interval = \"10s\"\n\n[monitor]\nprobe_interval = \"1s\"\nprobe_timeout = \"1s\"\n\
             primary_down_after = \"2s\"\n\n[[monitor.command]]\nargv = [\"/bin/sh\", \"-c\", \"cat >> '{}'\"]\n",
            alerts(n).display()
        )
    };
    let firing = || {
        (1..=2)
            .map(|n| std::fs::read_to_string(alerts(n)).unwrap_or_default())
            .flat_map(|text| text.lines().map(str::to_string).collect::<Vec<_>>())
            .filter(|line| line.contains("\"rule\":\"primary_down\"") && line.contains("\"state\":\"firing\""))
            .count()
    };
    let mut node1 = start_node(root.path(), 1, &pg.url(), primary, &extra(1));
    let node2 = start_node(root.path(), 2, &pg.url(), primary, &extra(2));
    let stored = |name: &str| {
        pg.psql(&format!("SELECT convert_from(body, 'UTF8') FROM bartleby_documents WHERE name = '{name}'"))
            .unwrap_or_default()
    };
    wait_for("a primary_down alert", Duration::from_secs(30), || firing() >= 1, || stored("alerts"));
    // Both nodes go on probing and finding it down for several rounds.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(firing(), 1, "one alert between the nodes\n{}", stored("alerts"));
    assert!(stored("alerts").contains("primary_down example.test"), "{}", stored("alerts"));

    node1.kill();
    let node1 = start_node(root.path(), 1, &pg.url(), primary, &extra(1));
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(firing(), 1, "the restarted node knows the alert is out\n{}", stored("alerts"));

    let chart: serde_json::Value = serde_json::from_str(stored("chart").trim()).expect("the chart's document");
    let times: Vec<i64> = chart["samples"].as_array().expect("samples").iter().filter_map(|s| s[0].as_i64()).collect();
    assert!(!times.is_empty(), "{chart}");
    assert!(times.windows(2).all(|w| w[1] - w[0] >= 5_000_000), "one sample per half interval at most: {times:?}");
    drop((node1, node2));
}
