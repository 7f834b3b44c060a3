//! Domains an operator paused (`bartleby queue pause DOMAIN`, like `smtpctl pause` or Postfix's
//! `defer_transports`): their messages stay in the store, untried, until the domain is resumed.
//! The set survives a reload (the scheduler keeps it) and a restart (a file in the queue
//! directory, replaced atomically on every change).

use super::*;
use std::path::{Path, PathBuf};

/// The paused set as the file holds it: one lower-case domain per line. A missing file is an
/// empty set; an unreadable one is logged and read as empty, so that a damaged file never stops
/// deliveries from starting.
pub fn load_paused(path: &Path) -> BTreeSet<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_paused(&text),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
        Err(err) => {
            tracing::error!(path = %path.display(), error = %err, "cannot read the paused domains; none paused");
            BTreeSet::new()
        }
    }
}

/// One domain per line; blank lines and `#` comments are skipped.
pub fn parse_paused(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(|l| l.trim().trim_end_matches('.').to_ascii_lowercase())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

fn render_paused(paused: &BTreeSet<String>) -> String {
    let mut text = String::from("# Domains paused by `bartleby queue pause`; `bartleby queue resume DOMAIN` undoes.\n");
    for domain in paused {
        text.push_str(domain);
        text.push('\n');
    }
    text
}

/// What the scheduler keeps of paused domains.
#[derive(Default)]
pub(super) struct Paused {
    /// The domains, lower case.
    pub(super) domains: BTreeSet<String>,
    /// A copy for the handle (status page, `queue list`), updated on every change.
    pub(super) shared: Arc<std::sync::Mutex<BTreeSet<String>>>,
    /// Where the set is kept across restarts; None for a scheduler without a queue directory
    /// (unit tests over the in-memory store).
    pub(super) file: Option<PathBuf>,
}

impl Paused {
    /// Does a message with pending recipients in `domains` wait for a paused domain? A message
    /// with recipients in a paused and another domain waits whole: its batches are per domain,
    /// and settling expects an outcome from each.
    pub(super) fn blocks(&self, domains: &[String]) -> bool {
        !self.domains.is_empty() && domains.iter().any(|d| self.domains.contains(d))
    }

    /// Pauses (`true`) or resumes a domain and writes the set down; returns whether it changed.
    /// The write happens on the scheduler's loop: a rare operator action on a small file, and the
    /// reply must not say "paused" before a restart would keep it.
    pub(super) fn set(&mut self, domain: &str, paused: bool) -> Result<bool, ScheduleError> {
        let mut next = self.domains.clone();
        let changed = if paused { next.insert(domain.to_string()) } else { next.remove(domain) };
        if !changed {
            return Ok(false);
        }
        if let Some(file) = &self.file {
            spool::atomic_write(file, render_paused(&next).as_bytes())?;
        }
        self.domains = next;
        *lock(&self.shared) = self.domains.clone();
        Ok(true)
    }
}

impl Scheduler {
    /// Keeps paused domains in `dir` (the queue directory), starting from what is there.
    pub fn pausing_in(mut self, dir: &Path) -> Scheduler {
        let file = spool::Spool::paused_domains_path(dir);
        self.paused.domains = load_paused(&file);
        if !self.paused.domains.is_empty() {
            tracing::info!(domains = ?self.paused.domains, "deliveries paused for some domains");
        }
        *lock(&self.paused.shared) = self.paused.domains.clone();
        self.paused.file = Some(file);
        self
    }

    /// `queue pause` / `queue resume`: only our destinations; resuming reads the timetable again,
    /// so that the domain's messages (left in the store, due) are tried at once.
    pub(super) fn pause(&mut self, domain: &str, paused: bool) -> Result<bool, ScheduleError> {
        let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
        if !self.config.is_destination(&domain) {
            return Err(ScheduleError::NotRelayed(domain));
        }
        if !paused && !self.paused.domains.contains(&domain) {
            return Err(ScheduleError::NotPaused(domain));
        }
        let changed = self.paused.set(&domain, paused)?;
        if changed {
            tracing::info!(domain = %domain, "{}", if paused { "deliveries paused" } else { "deliveries resumed" });
            if !paused {
                self.reread();
            }
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_one_domain_a_line() {
        let set = parse_paused("# comment\nExample.test.\n\n  other.test \n");
        assert_eq!(set.into_iter().collect::<Vec<_>>(), ["example.test", "other.test"]);
        let written: BTreeSet<String> = ["a.test".to_string()].into();
        assert_eq!(parse_paused(&render_paused(&written)), written);
    }

    #[test]
    fn a_message_waits_whole_for_a_paused_domain() {
        let mut paused = Paused::default();
        assert!(!paused.blocks(&["a.test".into()]));
        assert!(paused.set("a.test", true).expect("no file"));
        assert!(!paused.set("a.test", true).expect("no file"), "already paused");
        assert!(paused.blocks(&["b.test".into(), "a.test".into()]));
        assert!(!paused.blocks(&["b.test".into()]));
        assert_eq!(*lock(&paused.shared), paused.domains);
        assert!(paused.set("a.test", false).expect("no file"));
        assert!(!paused.blocks(&["a.test".into()]));
    }
}
