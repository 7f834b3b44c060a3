//! Static recipient lists: a file per domain, one entry per line, reloaded when it changes.
//!
//! An entry is an address (`alice@example.test`), a whole domain (`@example.test`) or a pattern with
//! `*` for any run of characters (`sales-*@example.test`). `#` starts a comment. Comparison ignores
//! case: RFC 5321 2.4 lets a server treat local parts case-sensitively, but no real mailbox
//! service does, and a false "unknown" would cost real mail.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// One domain's list as last read.
#[derive(Debug, Default)]
pub struct StaticList {
    path: PathBuf,
    /// Modification time and length when read: a change of either reloads the file.
    stamp: Option<(SystemTime, u64)>,
    entries: Vec<String>,
}

impl StaticList {
    /// A list read from `path` at the first lookup.
    pub fn new(path: &Path) -> StaticList {
        StaticList { path: path.to_path_buf(), stamp: None, entries: Vec::new() }
    }

    /// Reads the file again if it changed. A file that cannot be read keeps the previous entries
    /// (an editor's rename-into-place must not empty the list for a moment).
    pub fn refresh(&mut self) {
        let Ok(meta) = std::fs::metadata(&self.path) else { return };
        let stamp = (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len());
        if self.stamp == Some(stamp) {
            return;
        }
        match std::fs::read_to_string(&self.path) {
            Ok(text) => {
                self.entries = parse(&text);
                self.stamp = Some(stamp);
                tracing::info!(file = %self.path.display(), entries = self.entries.len(), "recipient list loaded");
            }
            Err(err) => tracing::warn!(file = %self.path.display(), error = %err, "cannot read recipient list"),
        }
    }

    /// Does the list vouch for `address`?
    pub fn contains(&self, address: &str) -> bool {
        let address = address.to_ascii_lowercase();
        self.entries.iter().any(|entry| matches(entry, &address))
    }
}

/// The entries of a list file, lower-cased, without comments and blank lines.
pub fn parse(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or("").trim().to_ascii_lowercase())
        .filter(|line| !line.is_empty())
        .collect()
}

/// Does one (lower-case) entry match a (lower-case) address?
pub fn matches(entry: &str, address: &str) -> bool {
    if let Some(domain) = entry.strip_prefix('@') {
        return address.rsplit_once('@').is_some_and(|(_, d)| d == domain);
    }
    if entry.contains('*') { glob(entry.as_bytes(), address.as_bytes()) } else { entry == address }
}

/// `*` matches any run of octets; iterative, so a hostile pattern cannot recurse deeply.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_and_patterns() {
        let entries = parse("# staff\nAlice@Example.test\n@all.test  # catch-all\nsales-*@example.test\n\n");
        assert_eq!(entries, vec!["alice@example.test", "@all.test", "sales-*@example.test"]);
        let list = StaticList { path: PathBuf::new(), stamp: None, entries };
        assert!(list.contains("ALICE@example.test"));
        assert!(list.contains("anyone@all.test"));
        assert!(!list.contains("anyone@sub.all.test"));
        assert!(list.contains("sales-eu@example.test"));
        assert!(!list.contains("bob@example.test"));
        assert!(!list.contains("sales@example.test"));
    }

    #[test]
    fn glob_edge_cases() {
        assert!(glob(b"*", b""));
        assert!(glob(b"a*b*c", b"aXXbYYc"));
        assert!(!glob(b"a*b*c", b"aXXbYY"));
        assert!(glob(b"**@x", b"q@x"));
    }

    #[test]
    fn reloads_when_the_file_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("list");
        std::fs::write(&path, "a@example.test\n").expect("write");
        let mut list = StaticList::new(&path);
        list.refresh();
        assert!(list.contains("a@example.test"));
        std::fs::write(&path, "a@example.test\nbb@example.test\n").expect("write");
        list.refresh();
        assert!(list.contains("bb@example.test"));
        std::fs::remove_file(&path).expect("remove");
        list.refresh();
        assert!(list.contains("bb@example.test"), "a vanished file keeps the last entries");
    }
}
