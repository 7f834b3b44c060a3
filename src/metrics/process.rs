//! The process's own resources, read from Linux's /proc/self at scrape time (what the Go and
//! Python Prometheus clients report as `process_*`; proc(5) describes the files).

/// One reading; a field is `None` when its file could not be read or parsed.
#[derive(Debug, Default)]
pub(super) struct Process {
    /// VmRSS of /proc/self/status, in bytes.
    pub resident_bytes: Option<u64>,
    /// utime + stime of /proc/self/stat, in seconds.
    pub cpu_seconds: Option<f64>,
    /// Entries of /proc/self/fd.
    pub open_fds: Option<u64>,
    /// The soft "Max open files" limit of /proc/self/limits.
    pub max_fds: Option<u64>,
    /// Seconds since the epoch: now, less the time since boot (CLOCK_BOOTTIME), plus starttime of
    /// /proc/self/stat (ticks after boot). Not btime of /proc/stat, which the unit's
    /// `ProcSubset=pid` hides.
    pub start_time_seconds: Option<f64>,
}

pub(super) fn read() -> Process {
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    let fields = stat.as_deref().and_then(stat_fields);
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    let field = |n: usize| fields.as_ref().and_then(|f| f.get(n)?.parse::<u64>().ok());
    Process {
        resident_bytes: std::fs::read_to_string("/proc/self/status").ok().as_deref().and_then(resident),
        cpu_seconds: field(13).zip(field(14)).map(|(user, system)| (user + system) as f64 / ticks),
        open_fds: std::fs::read_dir("/proc/self/fd").ok().map(|dir| dir.count() as u64),
        max_fds: std::fs::read_to_string("/proc/self/limits").ok().as_deref().and_then(max_open_files),
        start_time_seconds: field(21).and_then(|start| Some(boot_time()? + start as f64 / ticks)),
    }
}

/// The fields of /proc/self/stat, numbered from 0 as proc(5) numbers them from 1. The command
/// name (field 2) is in parentheses and may hold spaces, so splitting starts after its last ')';
/// the returned vector is padded so that index 2 is the state field.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = vec!["", ""];
    fields.extend(rest.split_whitespace());
    Some(fields)
}

fn resident(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// When the machine booted, in seconds since the epoch.
fn boot_time() -> Option<f64> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64();
    let up = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    Some(now - (up.tv_sec as f64 + up.tv_nsec as f64 / 1e9))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_command_name_with_spaces_and_parentheses() {
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 12345 1000 200";
        let fields = stat_fields(stat).expect("fields");
        assert_eq!(fields[2], "S");
        assert_eq!(fields[13], "250");
        assert_eq!(fields[14], "50");
        assert_eq!(fields[21], "12345");
    }

    #[test]
    fn reads_this_process() {
        let process = read();
        assert!(process.resident_bytes.is_some_and(|b| b > 0));
        assert!(process.open_fds.is_some_and(|n| n > 0));
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
        let start = process.start_time_seconds.expect("start time");
        assert!(start <= now + 1.0 && start > now - 86400.0 * 365.0, "{start} vs {now}");
    }
}
