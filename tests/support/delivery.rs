//! What the SMTP client tests share: a config routing example.test to a primary on loopback with
//! short timeouts, jobs whose bodies are files in a temporary directory, and a delivery of them.

use bartleby::config::{Config, HumanDuration, Route};
use bartleby::deliver::{Deliverer, Job, JobResult};
use bartleby::spool::{Envelope, MemoryQueue, Queue, Recipient};
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;

/// example.test routed to 127.0.0.1:`port`, every client timeout 2 s; then `tweak`.
pub fn config(port: u16, tweak: impl FnOnce(&mut Config)) -> Arc<Config> {
    let mut config = Config::demo();
    config.hostname = "backup.example.test".into();
    config.smtp.listen = vec!["127.0.0.3:25".parse().unwrap()];
    // Never asked: the route below bypasses DNS.
    config.dns.nameservers = vec!["127.0.0.1:9".parse().unwrap()];
    config.routes.clear();
    config.routes.insert("example.test".into(), Route { host: "127.0.0.1".into(), port });
    let short = HumanDuration(Duration::from_secs(2));
    let d = &mut config.delivery;
    (d.connect_timeout, d.greeting_timeout, d.command_timeout) = (short, short, short);
    (d.data_init_timeout, d.data_block_timeout, d.data_done_timeout) = (short, short, short);
    tweak(&mut config);
    Arc::new(config)
}

/// Queues `body` for `rcpts` under `id` in a queue of its own (in memory) and makes a job of it.
#[allow(dead_code)] // not every test binary that includes this module makes its jobs this way
pub fn job(_dir: &TempDir, id: &str, rcpts: &[&str], body: &[u8]) -> Job {
    let recipients = rcpts.iter().map(|r| Recipient::new(r.to_string())).collect();
    queued_job(id, Envelope::new(id.to_string(), "sender@origin.test".into(), recipients), body)
}

/// Queues `body` with `envelope` under `id` in a queue of its own (in memory); the job reads the
/// body through it, as the scheduler's do.
pub fn queued_job(id: &str, envelope: Envelope, body: &[u8]) -> Job {
    let queue = MemoryQueue::new();
    let mut message = Arc::clone(&queue).incoming(id).expect("incoming");
    message.write(body).expect("write");
    let envelope = message.commit(envelope).expect("commit");
    Job { envelope, queue }
}

/// Delivers `jobs` (at most 30 s), then closes the connections the deliverer keeps for the next
/// batch (with QUIT, as the daemon does at shutdown), so each test sees whole sessions.
#[allow(dead_code)] // not every test binary that includes this module delivers through it
pub async fn deliver(config: Arc<Config>, jobs: Vec<Job>) -> Vec<JobResult> {
    let deliverer = Deliverer::new(config).expect("deliverer");
    let work = async {
        let results = deliverer.deliver("example.test", jobs).await;
        deliverer.close_idle().await;
        results
    };
    tokio::time::timeout(Duration::from_secs(30), work).await.expect("delivery within the time limit")
}
