//! Mail loops: a message carrying more Received headers than allowed bounces (RFC 5321 6.3).

use super::*;

/// Takes out the messages that carry more Received headers than `max` besides our own: they are
/// in a mail loop and bounce (RFC 5321 6.3) instead of going round again. Only messages never tried
/// are read: the count cannot change later.
pub(super) async fn split_loops(domain: &str, jobs: Vec<Job>, max: usize) -> (Vec<Job>, Vec<JobResult>) {
    let mut keep = Vec::with_capacity(jobs.len());
    let mut looped = Vec::new();
    for job in jobs {
        let hops = if job.envelope.attempts == 0 { received_count(&job).await } else { 0 };
        if hops <= max + 1 {
            keep.push(job);
            continue;
        }
        let detail = Detail {
            status: "5.4.6".into(),
            text: format!("mail loop: the message carries {} Received headers (more than {max})", hops - 1),
            remote_mta: None,
            diagnostic: None,
            session: false,
        };
        let outcomes = job
            .envelope
            .pending()
            .filter(|r| r.domain() == domain)
            .map(|r| (r.address.clone(), RcptOutcome::PermFail(detail.clone())))
            .collect();
        looped.push(JobResult { id: job.envelope.id.clone(), outcomes });
    }
    (keep, looped)
}

/// Received headers in a stored message's header section (read up to 256 KiB).
pub(super) async fn received_count(job: &Job) -> usize {
    let (queue, id) = (Arc::clone(&job.queue), job.envelope.id.clone());
    let read = tokio::task::spawn_blocking(move || queue.read_headers(&id, 256 * 1024));
    let Ok(Ok(head)) = read.await else { return 0 };
    let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(head.len());
    head[..end]
        .split(|&b| b == b'\n')
        .filter(|line| line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:"))
        .count()
}
