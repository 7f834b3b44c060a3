//! Alerts and the channels that carry them: a command (the JSON on stdin), a webhook (the JSON
//! POSTed), an e-mail through a smarthost. Every channel gets the same [`Alert`]; a failing channel
//! is logged and does not stop the others.

use super::{MonitorError, http};
use crate::config::{CommandChannel, Config, EmailChannel, WebhookChannel};
use crate::deliver::{ClientSettings, NextHop, RcptOutcome, Session, TlsMode};
use crate::spool::{BodyType, Envelope, MemoryQueue, Queue, Recipient, rfc3339, rfc5322_date, to_micros};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// One alert, as every channel receives it (the JSON keys are a contract for pager scripts).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Alert {
    /// The bartleby instance that raises it (its `hostname`).
    pub host: String,
    /// `primary_down`, `queue_size`, `queue_age`, `spool_space`, `check` or `test`.
    pub rule: String,
    /// What it is about: a domain, `queue`, `spool`, a check's name.
    pub subject: String,
    /// `firing`, `reminder`, `recovered` or `test`.
    pub state: String,
    /// One line for a pager or a subject line.
    pub summary: String,
    /// When the condition started (RFC 3339), while it is bad.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// When the alert was raised (RFC 3339).
    pub at: String,
}

impl Alert {
    /// An alert raised now.
    pub fn new(
        host: &str,
        rule: &str,
        subject: &str,
        state: &str,
        summary: String,
        since: Option<SystemTime>,
    ) -> Alert {
        Alert {
            host: host.to_string(),
            rule: rule.to_string(),
            subject: subject.to_string(),
            state: state.to_string(),
            summary,
            since: since.map(|t| rfc3339(to_micros(t))),
            at: rfc3339(to_micros(SystemTime::now())),
        }
    }

    /// The alert `bartleby alert-test` sends.
    pub fn test(host: &str) -> Alert {
        let summary = format!("test alert from bartleby on {host}: if you read this, the channel works");
        Alert::new(host, "test", "alert-test", "test", summary, None)
    }

    fn json(&self) -> Vec<u8> {
        let mut json = serde_json::to_vec(self).unwrap_or_default();
        json.push(b'\n');
        json
    }
}

/// Sends alerts through every configured channel.
pub struct Alerter {
    config: Arc<Config>,
}

impl Alerter {
    /// An alerter for the channels of `config.monitor`.
    pub fn new(config: Arc<Config>) -> Alerter {
        Alerter { config }
    }

    /// How many channels are configured.
    pub fn channels(&self) -> usize {
        let m = &self.config.monitor;
        m.command.len() + m.webhook.len() + m.email.len()
    }

    /// Sends `alert` through every channel, one after the other (each bounded by its own timeout);
    /// returns each channel's name and result, and logs them. A failing channel does not stop the
    /// others.
    pub async fn send(&self, alert: &Alert) -> Vec<(String, Result<(), MonitorError>)> {
        let m = &self.config.monitor;
        let json = alert.json();
        let commands = m.command.iter().map(|c| async {
            let name = format!("command {}", c.argv.first().map(String::as_str).unwrap_or(""));
            (name, run_command(c, json.clone()).await)
        });
        let hooks = m.webhook.iter().map(|w| async { (format!("webhook {}", w.url), post(w, &json).await) });
        let mails = m
            .email
            .iter()
            .map(|e| async { (format!("email {} via {}", e.to.join(","), e.smarthost), self.mail(e, alert).await) });
        let mut results = join_all(commands).await;
        results.extend(join_all(hooks).await);
        results.extend(join_all(mails).await);
        for (channel, result) in &results {
            match result {
                Ok(()) => {
                    tracing::info!(channel = %channel, rule = %alert.rule, subject = %alert.subject, state = %alert.state, "alert sent")
                }
                Err(err) => tracing::error!(channel = %channel, rule = %alert.rule, error = %err, "alert not sent"),
            }
        }
        results
    }

    /// RFC 5322 message to the channel's recipients through its smarthost (RFC 3834
    /// Auto-Submitted, so no vacation program answers it).
    async fn mail(&self, channel: &EmailChannel, alert: &Alert) -> Result<(), MonitorError> {
        let from = channel.from.clone().unwrap_or_else(|| format!("bartleby@{}", self.config.hostname));
        let message = mail_text(&self.config.hostname, &from, &channel.to, alert);
        let hop = smarthost_hop(channel).await?;
        let mut settings =
            ClientSettings::new(self.config.hostname.clone(), &self.config.delivery).map_err(MonitorError::Setup)?;
        settings.timeouts = bounded(settings.timeouts, channel.timeout.0);
        send_mail(&hop, &settings, &from, &channel.to, message.as_bytes()).await
    }
}

async fn join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut out = Vec::new();
    // Few channels: one after the other keeps this simple, and every channel has its own timeout.
    for future in futures {
        out.push(future.await);
    }
    out
}

/// The timeouts of delivery, each capped by the channel's timeout.
fn bounded(mut t: crate::deliver::client::Timeouts, cap: Duration) -> crate::deliver::client::Timeouts {
    for d in [&mut t.connect, &mut t.greeting, &mut t.command, &mut t.data_init, &mut t.data_block, &mut t.data_done] {
        *d = (*d).min(cap);
    }
    t
}

async fn smarthost_hop(channel: &EmailChannel) -> Result<NextHop, MonitorError> {
    let route = &channel.smarthost;
    let addr = tokio::net::lookup_host((route.host.as_str(), route.port))
        .await
        .map_err(|e| MonitorError::Mail(format!("smarthost {route}: {e}")))?
        .next()
        .ok_or_else(|| MonitorError::Mail(format!("smarthost {route}: no address")))?;
    Ok(NextHop { host: route.host.clone(), addr, preference: None })
}

async fn send_mail(
    hop: &NextHop,
    settings: &ClientSettings,
    from: &str,
    to: &[String],
    body: &[u8],
) -> Result<(), MonitorError> {
    let recipients: Vec<Recipient> = to.iter().map(|a| Recipient::new(a.clone())).collect();
    let mut envelope = Envelope::new(String::new(), from.to_string(), recipients.clone());
    if !body.is_ascii() {
        envelope.body = BodyType::EightBitMime;
    }
    // An alert is not queued mail: it goes through a queue of its own, in memory, so the SMTP
    // client reads it as it reads every body (by queue ID, through a queue).
    let queue = MemoryQueue::new();
    let mut message = Arc::clone(&queue).incoming(&queue.new_id()).map_err(|e| MonitorError::Mail(e.to_string()))?;
    message.write(body).map_err(|e| MonitorError::Mail(e.to_string()))?;
    let envelope = message.commit(envelope).map_err(|e| MonitorError::Mail(e.to_string()))?;
    let queue: Arc<dyn Queue> = queue;
    let mut session =
        Session::open(hop, settings, TlsMode::Opportunistic).await.map_err(|e| MonitorError::Mail(e.to_string()))?;
    let refs: Vec<&Recipient> = recipients.iter().collect();
    let transaction = session.send(&envelope, &refs, &queue).await;
    session.quit().await;
    let refused: Vec<String> = transaction
        .outcomes
        .iter()
        .filter(|o| !matches!(o, RcptOutcome::Delivered(_)))
        .map(|o| o.detail().text.clone())
        .collect();
    if refused.is_empty() { Ok(()) } else { Err(MonitorError::Mail(refused.join("; "))) }
}

/// The alert as a plain-text message with CRLF line endings.
pub fn mail_text(hostname: &str, from: &str, to: &[String], alert: &Alert) -> String {
    let state = alert.state.to_uppercase();
    // Header values come from our own configuration and probe errors; strip line breaks anyway.
    let clean = |s: &str| s.replace(['\r', '\n'], " ");
    let mut text = String::new();
    text += &format!("From: bartleby <{}>\r\n", clean(from));
    text += &format!("To: {}\r\n", clean(&to.join(", ")));
    text += &format!("Subject: [bartleby {state}] {}\r\n", clean(&alert.summary));
    text += &format!("Date: {}\r\n", rfc5322_date(SystemTime::now()));
    text += &format!("Message-ID: <alert.{:016x}@{hostname}>\r\n", fastrand::u64(..));
    text += "Auto-Submitted: auto-generated\r\nMIME-Version: 1.0\r\n";
    text += "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n";
    text += &format!("{}\r\n\r\n", clean(&alert.summary));
    text += &format!("rule:    {}\r\nsubject: {}\r\nstate:   {}\r\n", alert.rule, clean(&alert.subject), alert.state);
    if let Some(since) = &alert.since {
        text += &format!("since:   {since}\r\n");
    }
    text += &format!("at:      {}\r\nhost:    {hostname}\r\n\r\n", alert.at);
    text += &String::from_utf8_lossy(&alert.json()).replace('\n', "\r\n");
    text
}

async fn post(channel: &WebhookChannel, json: &[u8]) -> Result<(), MonitorError> {
    let status = http::request("POST", &channel.url, Some(("application/json", json)), channel.timeout.0).await?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(MonitorError::Http(format!("POST {}: HTTP status {status}", channel.url)))
    }
}

/// Runs the command with the JSON on stdin, on a blocking thread, killed after its timeout.
async fn run_command(channel: &CommandChannel, json: Vec<u8>) -> Result<(), MonitorError> {
    let channel = channel.clone();
    tokio::task::spawn_blocking(move || run_command_blocking(&channel, &json))
        .await
        .map_err(|e| MonitorError::Command(e.to_string()))?
}

fn run_command_blocking(channel: &CommandChannel, json: &[u8]) -> Result<(), MonitorError> {
    let program = channel.argv.first().ok_or_else(|| MonitorError::Command("no program".into()))?;
    let fail = |what: String| MonitorError::Command(format!("{program}: {what}"));
    let mut child = Command::new(program)
        .args(&channel.argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A program that does not read its input is still run; a broken pipe is not its failure.
        let _ = stdin.write_all(json);
    }
    let deadline = Instant::now() + channel.timeout.0;
    loop {
        match child.try_wait().map_err(|e| fail(e.to_string()))? {
            Some(status) if status.success() => return Ok(()),
            Some(status) => return Err(fail(format!("exited with {status}"))),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!("killed after {}", channel.timeout)));
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mail_text_is_crlf_and_auto_submitted() {
        let alert = Alert::new("mx2.test", "primary_down", "example.test", "firing", "down\r\nBcc: x".into(), None);
        let text = mail_text("mx2.test", "b@mx2.test", &["admin@example.net".into()], &alert);
        assert!(text.contains("Subject: [bartleby FIRING] down  Bcc: x\r\n"), "{text}");
        assert!(text.contains("Auto-Submitted: auto-generated\r\n"));
        assert!(!text.replace("\r\n", "").contains('\n'));
        assert!(!text.contains("\r\nBcc:"));
    }

    #[test]
    fn alert_json_keys() {
        let alert = Alert::test("mx2.test");
        let value: serde_json::Value = serde_json::from_slice(&alert.json()).unwrap();
        assert_eq!(value["rule"], "test");
        assert_eq!(value["state"], "test");
        assert_eq!(value["host"], "mx2.test");
        assert!(value.get("since").is_none());
    }
}
