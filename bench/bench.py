#!/usr/bin/env python3
"""Side-by-side benchmark of bartleby, Postfix, Exim, OpenSMTPD and smtp-sink (issues 7 and 12).
Started by bench/run.

Five figures, each measured for the systems in the same run, on loopback only (Exim and OpenSMTPD
take part in accept, drain and memory; --peers picks the MTAs beside bartleby). --with-postgres adds
bartleby-pg to accept, drain and memory: bartleby with `[queue] store = "postgres"` against a
PostgreSQL 15 of its own (fsync and synchronous_commit on), started for its rounds only;
--check-postgres tries that PostgreSQL's start, login, stop and restart alone:

  accept   smtp-source, 20 sessions, N messages of 4 KiB; messages/s from start to exit.
           The primary is DOWN while filling, so the MTAs only queue (and try once, and defer).
  drain    the N messages queued by `accept`; the primary (smtp-sink) comes up, the MTA is
           flushed; messages/s from the flush until smtp-sink has counted all N.
  memory   peak RSS during accept (bartleby: VmHWM; the others: the largest sum of VmRSS over all
           processes of the instance, sampled every 200 ms) and RSS with idle sessions open
           (bartleby: 1,000; Postfix: 100, its default process limit; smtp-sink serves at most 256
           at once, so it has no idle figure).
  listing  with BIG messages queued: `bartleby queue list` and the admin page's first page
           against `postqueue -p` (wall time of the command, output to /dev/null).
  restart  with BIG messages queued: kill, start, time until the SMTP greeting answers.
           Then, for information, each server's RSS holding the BIG queue.

The ceiling is smtp-sink (no disk): for accept, smtp-source into it; for drain, smtp-source with
connection reuse (-d) into it, the best any client could do; for memory, its own RSS. It has no
queue, so listing and restart have no ceiling.

Every process started here is stopped on exit (also on Ctrl-C). Results: a table on stdout and a
JSON file (one object per figure with the medians and the ratios).
"""

import argparse
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BARTLEBY = ("127.0.0.11", 2525)
WEB = ("127.0.0.11", 8025)
POSTFIX = ("127.0.0.12", 2525)
CEILING = ("127.0.0.13", 2525)
PRIMARY = ("127.0.0.14", 2525)
BACKUP_EXIM = ("127.0.0.15", 2525)
BACKUP_OPENSMTPD = ("127.0.0.16", 2525)
# bartleby with its queue in PostgreSQL (--with-postgres), and that PostgreSQL.
BARTLEBY_PG = ("127.0.0.17", 2525)
WEB_PG = ("127.0.0.17", 8025)
POSTGRES = ("127.0.0.18", 5432)
SENDER, RECIPIENT = "a@sender.test", "b@example.test"
MESSAGE_SIZE = 4096


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


def addr(pair):
    return f"{pair[0]}:{pair[1]}"


# --- processes ------------------------------------------------------------------------------

STARTED = []  # Popen objects to stop at exit
CLEANUPS = []  # callables run at exit (Postfix, Exim and OpenSMTPD instances)


def cleanup():
    for fn in reversed(CLEANUPS):
        try:
            fn()
        except Exception as err:  # keep stopping the rest
            log("cleanup:", err)
    for proc in STARTED:
        if proc.poll() is None:
            proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log("process", proc.pid, "did not exit")


def start(cmd, **kw):
    proc = subprocess.Popen(cmd, **kw)
    STARTED.append(proc)
    return proc


def stop(proc, sig=signal.SIGTERM, timeout=30):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def run(cmd, timeout=600, **kw):
    return subprocess.run(cmd, timeout=timeout, check=True, **kw)


def timed(cmd, timeout=600):
    """Wall time of a command with its output discarded."""
    t0 = time.monotonic()
    subprocess.run(cmd, timeout=timeout, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def wait_for(predicate, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def greeting_after(pair, timeout=120):
    """Seconds until a 220 greeting is read at `pair` (connection refused is retried)."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(pair, timeout=deadline - time.monotonic()) as sock:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                line = sock.makefile("rb").readline()
                if line.startswith(b"220"):
                    return time.monotonic() - t0
        except (ConnectionRefusedError, ConnectionResetError):
            pass
        except OSError:
            pass
        time.sleep(0.005)
    raise TimeoutError(f"no SMTP greeting at {addr(pair)} within {timeout}s")


def assert_free(pair):
    """Refuses to start a server on an address something already answers on: its greeting would
    be taken for ours and the load sent into somebody else's server."""
    try:
        with socket.create_connection(pair, timeout=2):
            pass
    except OSError:
        return
    raise RuntimeError(f"{addr(pair)} is already in use by another process")


def smtp_source(pair, messages, sessions, reuse=False):
    """smtp-source from first connection to exit (it exits after the last reply); returns s."""
    cmd = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(MESSAGE_SIZE)]
    cmd += ["-d"] if reuse else []
    cmd += ["-f", SENDER, "-t", RECIPIENT, addr(pair)]
    t0 = time.monotonic()
    done = subprocess.run(cmd, timeout=3600, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    elapsed = time.monotonic() - t0
    if done.returncode != 0 or done.stdout:
        log("smtp-source said:", done.stdout.decode(errors="replace")[-500:])
    if done.returncode != 0:
        raise RuntimeError(f"smtp-source into {addr(pair)} failed (exit {done.returncode})")
    return elapsed


# --- memory ---------------------------------------------------------------------------------


def proc_status(pid, key):
    """A kB value from /proc/PID/status, 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def pss_kb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def descendants(root):
    """root and every process below it."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


class Sampler:
    """Samples a kB figure every 200 ms in a thread and keeps the largest (rarely enough not to
    take much CPU from the servers on a 2-core machine)."""

    def __init__(self, measure):
        self.measure, self.peak, self.running = measure, 0, True
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while self.running:
            self.peak = max(self.peak, self.measure())
            time.sleep(0.2)

    def finish(self):
        self.running = False
        self.thread.join()
        return self.peak


def open_idle(pair, count):
    """Opens `count` sessions that read the greeting and then wait; returns the sockets."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(pair, timeout=30)
        sock.settimeout(60)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(512)
            if not chunk:
                raise ConnectionError(f"{addr(pair)} closed an idle session after {len(socks)}")
            data += chunk
        if not data.startswith(b"220"):
            raise ConnectionError(f"{addr(pair)} refused session {len(socks) + 1}: {data[:80]!r}")
        socks.append(sock)
    return socks


def close_all(socks):
    for sock in socks:
        sock.close()


# --- the three systems ----------------------------------------------------------------------


class Sink:
    """smtp-sink, counting messages (`-c` prints mesg=N, separated by carriage returns)."""

    def __init__(self, pair):
        self.pair, self.count = pair, 0
        cmd = ["smtp-sink", "-c", "-u", "nobody", addr(pair), "2000"]
        self.proc = start(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self.read, daemon=True).start()
        greeting_after(pair, 30)

    def read(self):
        tail = b""
        while True:
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                return
            tail = (tail + chunk)[-256:]
            counts = re.findall(rb"mesg=(\d+)", tail)
            if counts:
                self.count = int(counts[-1])

    def rss(self):
        return proc_status(self.proc.pid, "VmRSS")

    def stop(self):
        stop(self.proc)


class Bartleby:
    """bartleby with the local store (queue_extra adds lines to its [queue] table)."""

    def __init__(self, binary, work, name="bartleby", smtp=BARTLEBY, web=WEB, queue_extra=""):
        self.binary, self.dir, self.proc = binary, os.path.join(work, name), None
        self.smtp = smtp
        self.spool, self.conf = os.path.join(self.dir, "spool"), os.path.join(self.dir, "bartleby.toml")
        os.makedirs(self.dir, exist_ok=True)
        with open(self.conf, "w") as f:
            # Retries an hour apart (as for Postfix below), so nothing but the flush delivers.
            f.write(f"""hostname = "bartleby.bench.test"
[smtp]
listen = ["{addr(smtp)}"]
max_sessions = 2000
# One loopback client stands for the whole internet here, so the per-client limits are lifted, as
# Postfix exempts $mynetworks from its anvil limits by default (smtpd_client_event_limit_exceptions).
max_sessions_per_ip = 2000
max_messages_per_ip_per_minute = 1000000000
max_recipients_per_ip_per_minute = 1000000000
# SPF/DKIM at accept time would query DNS beyond loopback; Postfix checks neither by default.
sender_auth = false
[relay]
domains = ["example.test"]
[queue]
dir = "{self.spool}"
first_retry = "1h"
retry_interval = "1h"
{queue_extra}[routes]
"example.test" = "{addr(PRIMARY)}"
[web]
listen = "{addr(web)}"
# The page without a login for the timing: loopback, and only this benchmark's own instance.
trust_allowed_hosts = true
""")

    def cli(self, *args):
        return [self.binary, "--config", self.conf, *args]

    def start(self):
        """Starts the daemon; returns seconds until its greeting."""
        logf = open(os.path.join(self.dir, "bartleby.log"), "ab")
        t0 = time.monotonic()
        self.proc = start(self.cli("serve"), stdout=logf, stderr=logf)
        logf.close()
        greeting_after(self.smtp, 300)
        elapsed = time.monotonic() - t0
        if self.proc.poll() is not None:
            # The greeting came from another process on our address: never measure (or load) that.
            raise RuntimeError(f"bartleby exited (exit {self.proc.returncode}; address in use?), "
                               f"see {self.dir}/bartleby.log")
        return elapsed

    def stop(self, sig=signal.SIGTERM):
        stop(self.proc, sig)

    def wipe(self):
        self.stop()
        shutil.rmtree(self.spool, ignore_errors=True)

    def rss(self):
        return proc_status(self.proc.pid, "VmRSS")

    def hwm(self):
        return proc_status(self.proc.pid, "VmHWM")

    def listing(self):
        out = subprocess.run(self.cli("queue", "list", "--json"), timeout=600, check=True, stdout=subprocess.PIPE)
        return json.loads(out.stdout)

    def count(self):
        return len(self.listing())

    def settled(self, n):
        """All n queued and each tried once (deferred), so the flush is the only thing left."""
        listed = self.listing()
        return len(listed) >= n and all(m["attempts"] >= 1 for m in listed)

    def flush(self):
        run(self.cli("queue", "flush"), stdout=subprocess.DEVNULL)

    def list_time(self):
        return timed(self.cli("queue", "list"))


class PostgreSQL:
    """PostgreSQL 15 from Debian (postgresql-15) for bartleby-pg, in the work directory: a fresh
    cluster made by initdb as the postgres system user (initdb refuses root), on its own loopback
    address, with a database and a role `bartleby` that logs in over TCP with a random password
    (SCRAM). Durable as the other MTAs' queues: fsync and synchronous_commit on, full_page_writes
    on. Only the Unix socket in the directory trusts, for psql as the superuser. Started with
    bartleby-pg's rounds and stopped (fast shutdown) with them, so it takes nothing from the
    other systems' measurements."""

    BIN = "/usr/lib/postgresql/15/bin"
    USER = "postgres"
    SETTINGS = """
# bench.py
max_connections = 200
shared_buffers = 128MB
max_wal_size = 1GB
fsync = on
synchronous_commit = on
full_page_writes = on
password_encryption = scram-sha-256
logging_collector = off
log_min_messages = warning
"""
    HBA = "local all all trust\nhost all all 127.0.0.0/8 scram-sha-256\n"

    def __init__(self, work, pair=POSTGRES):
        self.pair, self.dir = pair, os.path.join(work, "postgresql")
        self.data = os.path.join(self.dir, "data")
        self.password = secrets.token_hex(16)
        self.proc, self.initialised = None, False

    def url(self):
        return f"postgres://bartleby:{self.password}@{addr(self.pair)}/bartleby"

    def as_postgres(self, cmd, timeout=120, **kw):
        """Runs a command of BIN as the postgres user (no supplementary groups) in its directory."""
        env = {"PATH": "/usr/bin:/bin", "HOME": self.dir, "LC_ALL": "C"}
        return subprocess.run([os.path.join(self.BIN, cmd[0]), *cmd[1:]], timeout=timeout, check=True,
                              user=self.USER, group=self.USER, extra_groups=[], cwd=self.dir, env=env, **kw)

    def psql(self, *commands, database="bartleby"):
        """Each command with its own -c (CREATE DATABASE refuses a transaction); the output
        unaligned and without headers."""
        args = ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", self.dir, "-p", str(self.pair[1]),
                "-U", self.USER, "-d", database]
        for command in commands:
            args += ["-c", command]
        return self.as_postgres(args, stdout=subprocess.PIPE).stdout.decode().strip()

    def version(self):
        try:
            out = subprocess.run([os.path.join(self.BIN, "postgres"), "--version"], timeout=30,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            return out.stdout.decode().strip() or None
        except OSError:
            return None

    def init(self):
        if not os.access(os.path.join(self.BIN, "initdb"), os.X_OK):
            sys.exit("bench: PostgreSQL 15 is missing (bench/run --with-postgres installs postgresql-15)")
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        # The postgres user must reach its directory through the work directory.
        for d in (os.path.dirname(self.dir), self.dir):
            os.chmod(d, 0o755)
        shutil.chown(self.dir, self.USER, self.USER)
        # --no-sync: initdb's own files need not survive a crash during set-up; the server fsyncs.
        self.as_postgres(["initdb", "-D", self.data, "-U", self.USER, "-E", "UTF8", "--locale=C",
                          "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "--no-instructions"],
                         stdout=subprocess.DEVNULL)
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(self.SETTINGS)
        hba = os.path.join(self.data, "pg_hba.conf")
        with open(hba, "w") as f:
            f.write(self.HBA)
        shutil.chown(hba, self.USER, self.USER)
        self.initialised = True

    def start(self):
        """Starts the server (making the cluster the first time); returns once it accepts."""
        if self.running():
            return
        first = not self.initialised
        if first:
            self.init()
        assert_free(self.pair)
        logf = open(os.path.join(self.dir, "postgres.log"), "ab")
        env = {"PATH": "/usr/bin:/bin", "HOME": self.dir, "LC_ALL": "C"}
        self.proc = start([os.path.join(self.BIN, "postgres"), "-D", self.data, "-k", self.dir,
                           "-h", self.pair[0], "-p", str(self.pair[1])],
                          stdout=logf, stderr=logf, user=self.USER, group=self.USER, extra_groups=[],
                          cwd=self.dir, env=env)
        logf.close()
        if self.stop not in CLEANUPS:
            CLEANUPS.append(self.stop)
        wait_for(self.accepting, 30, f"PostgreSQL on {addr(self.pair)} (see {self.dir}/postgres.log)", 0.05)
        if first:
            self.psql(f"CREATE ROLE bartleby LOGIN PASSWORD '{self.password}'",
                      "CREATE DATABASE bartleby OWNER bartleby", database="postgres")

    def accepting(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"postgres exited (exit {self.proc.returncode}), see {self.dir}/postgres.log")
        done = subprocess.run([os.path.join(self.BIN, "pg_isready"), "-q", "-t", "2", "-h", self.pair[0],
                               "-p", str(self.pair[1])], timeout=10)
        return done.returncode == 0

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        """Fast shutdown (SIGINT); the data stays."""
        stop(self.proc, signal.SIGINT, timeout=60)

    def reset(self):
        """An empty database for the next round (bartleby makes its schema itself), checkpointed
        so that no round inherits the last one's dirty pages."""
        self.psql("DROP DATABASE IF EXISTS bartleby WITH (FORCE)", "CREATE DATABASE bartleby OWNER bartleby",
                  "CHECKPOINT", database="postgres")

    def pids(self):
        return descendants(self.proc.pid) if self.running() else []

    def rss(self):
        return sum(proc_status(pid, "VmRSS") for pid in self.pids())


class BartlebyPostgres(Bartleby):
    """bartleby with its queue in PostgreSQL (issue 13): the same configuration as bartleby's on
    its own address, plus `store` and `url` in [queue] (its queue.dir keeps only the control socket
    and the node identity). Its memory is its own RSS plus the PostgreSQL processes' (summed, as for
    the multi-process MTAs)."""

    def __init__(self, binary, work, postgres):
        self.postgres = postgres
        extra = f'store = "postgres"\nurl = "{postgres.url()}"\n'
        super().__init__(binary, work, "bartleby-pg", BARTLEBY_PG, WEB_PG, extra)

    def start(self):
        self.postgres.start()
        return super().start()

    def wipe(self):
        super().wipe()
        if self.postgres.running():
            self.postgres.reset()
            self.postgres.stop()

    def rss(self):
        return super().rss() + self.postgres.rss()


def check_postgres(work):
    """--check-postgres: the PostgreSQL part of bartleby-pg on its own (no bartleby needed)."""
    pg = PostgreSQL(work)
    pg.start()
    assert pg.psql("SHOW fsync") == "on" and pg.psql("SHOW synchronous_commit") == "on"
    login = [os.path.join(PostgreSQL.BIN, "psql"), "-X", "-q", "-A", "-t", "-w", "-d", pg.url()]
    env = dict(os.environ, PGPASSFILE="/dev/null", PGCONNECT_TIMEOUT="5")
    env.pop("PGPASSWORD", None)

    def as_bartleby(sql):
        return subprocess.run(login + ["-c", sql], timeout=30, check=True, env=env,
                              stdout=subprocess.PIPE).stdout.decode().strip()
    assert as_bartleby("CREATE TABLE t (x int); INSERT INTO t VALUES (1); SELECT current_user") == "bartleby"
    no_password = login[:-1] + [pg.url().replace(f":{pg.password}@", "@")]
    assert subprocess.run(no_password + ["-c", "SELECT 1"], timeout=30, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0
    pg.stop()
    try:
        socket.create_connection(pg.pair, timeout=2).close()
        raise AssertionError("PostgreSQL still accepts after stop")
    except ConnectionRefusedError:
        pass
    pg.start()
    assert as_bartleby("SELECT x FROM t") == "1", "data lost over a restart"
    pg.reset()
    assert pg.psql("SELECT count(*) FROM pg_tables WHERE tablename = 't'") == "0", "reset left the table"
    assert pg.rss() > 0
    pg.stop()
    log(f"check-postgres: {pg.version()} on {addr(pg.pair)}: start, login, stop, start, reset: ok")


class Postfix:
    """Postfix 3.7 as a backup-MX relay for example.test in its own directory, fsync as shipped."""

    def __init__(self, work):
        self.dir = os.path.join(work, "postfix")
        self.etc, self.queue = os.path.join(self.dir, "etc"), os.path.join(self.dir, "queue")
        self.data = os.path.join(self.dir, "data")
        self.configured = False

    def configure(self):
        os.makedirs(self.etc, exist_ok=True)
        shutil.copy("/etc/postfix/master.cf", self.etc)
        with open(os.path.join(self.etc, "main.cf"), "w") as f:
            f.write(self.main_cf())
        # The smtpd listener on its own address; no chroot (the queue directory has no /etc copy).
        master = os.path.join(self.etc, "master.cf")
        with open(master) as f:
            text = re.sub(r"(?m)^smtp\s+inet\s.*$", f"{addr(POSTFIX)} inet n - n - - smtpd", f.read())
        with open(master, "w") as f:
            f.write(text)
        run(["postconf", "-c", self.etc, "-F", "*/*/chroot = n"])
        self.configured = True

    def main_cf(self):
        # Retries an hour apart, so nothing but `postqueue -f` delivers; everything else as shipped.
        return f"""compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.data}
maillog_file = {self.dir}/maillog
maillog_file_prefixes = {self.dir}
inet_interfaces = loopback-only
inet_protocols = ipv4
myhostname = postfix.bench.test
mydestination =
mynetworks = 127.0.0.0/8
relay_domains = example.test
transport_maps = inline:{{ example.test=smtp:[{PRIMARY[0]}]:{PRIMARY[1]} }}
disable_dns_lookups = yes
alias_maps =
alias_database =
local_recipient_maps =
minimal_backoff_time = 1h
maximal_backoff_time = 1h
queue_run_delay = 1h
"""

    def pctl(self, *args):
        run(["postfix", "-c", self.etc, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def master_pid(self):
        try:
            with open(os.path.join(self.queue, "pid", "master.pid")) as f:
                pid = int(f.read().split()[0])
            os.kill(pid, 0)
            return pid
        except (FileNotFoundError, ValueError, IndexError, ProcessLookupError):
            return None

    def start(self):
        """Starts the instance; returns seconds until its greeting."""
        if not self.configured:
            self.configure()
        for d in (self.queue, self.data):
            os.makedirs(d, exist_ok=True)
        shutil.chown(self.data, "postfix")
        t0 = time.monotonic()
        self.pctl("post-install", "create-missing")
        self.pctl("start")
        if self.stop not in CLEANUPS:
            CLEANUPS.append(self.stop)
        greeting_after(POSTFIX, 300)
        return time.monotonic() - t0

    def stop(self):
        if self.master_pid() is None:
            return
        subprocess.run(["postfix", "-c", self.etc, "stop"], timeout=60, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.master_pid() is None, 60, "Postfix to stop", 0.1)

    def wipe(self):
        self.stop()
        shutil.rmtree(self.queue, ignore_errors=True)
        shutil.rmtree(self.data, ignore_errors=True)

    def pids(self):
        master = self.master_pid()
        return descendants(master) if master else []

    def rss(self):
        return sum(proc_status(pid, "VmRSS") for pid in self.pids())

    def pss(self):
        return sum(pss_kb(pid) for pid in self.pids())

    def queue_files(self, *subdirs):
        total = 0
        for sub in subdirs:
            for _, _, files in os.walk(os.path.join(self.queue, sub)):
                total += len(files)
        return total

    def settled(self, n):
        """All n deferred and nothing on its way in or being tried."""
        busy = self.queue_files("maildrop", "incoming", "active")
        return busy == 0 and self.queue_files("deferred") >= n

    def flush(self):
        run(["postqueue", "-c", self.etc, "-f"], stdout=subprocess.DEVNULL)

    def list_time(self):
        return timed(["postqueue", "-c", self.etc, "-p"])


def processes_with(needle):
    """PIDs whose command line contains `needle` (an instance's own config path)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle.encode() in f.read():
                    found.append(int(entry))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def kill_if_named(pid, needle):
    """SIGKILL to pid if its command line still contains needle (so never to a reused PID)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if needle.encode() in f.read():
                os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass


def with_package_version(version, binary):
    """A peer's own version string, with the Debian package's that bench/run noted beside the
    unpacked files (PACKAGE/VERSION, three levels above PACKAGE/usr/sbin/BINARY)."""
    try:
        with open(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(binary))), "VERSION")) as f:
            return f"{version} (Debian {f.read().strip()})"
    except OSError:
        return version


class Exim:
    """Exim 4 (Debian's exim4-daemon-light, unpacked by bench/run) as a backup-MX relay for
    example.test, private to its directory: `-C` names its own configuration, which sets the spool,
    the logs and the pid file under the work directory. Debian's exim accepts -C from root (and
    from its own user, though then without root privilege, which a relay does not need).
    Everything not set below is Exim's default, fsync of the spool files included.

    One cost no option lifts: after QUIT, Exim 4.96 waits up to 200 ms for the client to close
    first (smtp_in.c, "hoping client will FIN first"), its 221 not yet on the wire meanwhile (the
    socket is corked and the write comes after the wait), and smtp-source waits for that 221. A session of one message thus takes 200 ms more, which
    holds 20 sessions near 100 messages/s whatever the CPU; clients that close without waiting
    for the 221 (Postfix's smtp_skip_quit_response) do not pay it."""

    def __init__(self, work, binary):
        self.binary, self.dir = binary, os.path.join(work, "exim")
        self.conf, self.spool = os.path.join(self.dir, "exim.conf"), os.path.join(self.dir, "spool")
        self.logs = os.path.join(self.dir, "log")
        self.proc = self.runner = None
        os.makedirs(self.dir, exist_ok=True)
        with open(self.conf, "w") as f:
            f.write(self.config())

    def config(self):
        host, port = PRIMARY
        return f"""# bench.py's Exim: a backup MX for example.test, relaying to the primary at {addr(PRIMARY)}.
primary_hostname = exim.bench.test
# Deliveries re-execute this binary (it is not at the compiled-in /usr/sbin/exim4).
exim_path = {self.binary}
# Debian's build runs as Debian-exim (bench/run creates the user when exim4-base is absent).
exim_user = Debian-exim
exim_group = Debian-exim
spool_directory = {self.spool}
log_file_path = {self.logs}/%slog
pid_file_path = {self.spool}/exim.pid
keep_environment =
local_interfaces = <; {BACKUP_EXIM[0]}.{BACKUP_EXIM[1]}
# Default 20, exactly the 20 sessions of accept: a new session arriving before the daemon has
# reaped the last one's process could be refused with 421. 2000 as for bartleby's max_sessions.
smtp_accept_max = 2000
# Default 20: the listen queue as long as Postfix's (its process limit, 100), so that no SYN is
# dropped while the daemon forks.
smtp_connect_backlog = 100
# Left at their defaults, which throttle nothing: queue_only_load, deliver_queue_load_max and
# smtp_load_reserve are unset (the 2 shared cores run at load 5 to 15), smtp_accept_max_per_host
# is unset, host_lookup is unset (no reverse DNS) and rfc1413_query_timeout is 0 (no ident).
acl_smtp_rcpt = acl_rcpt

begin acl
acl_rcpt:
  accept domains = example.test
  deny   message = relaying denied

begin routers
# Postfix's transport_maps and bartleby's [routes]: the primary by address, no DNS.
primary:
  driver = manualroute
  domains = example.test
  route_list = * {host}
  transport = remote_smtp

begin transports
remote_smtp:
  driver = smtp
  port = {port}

begin retry
# Retries an hour apart, as for Postfix and bartleby, so nothing but the flush delivers.
*  *  F,1h,1h
"""

    def exim(self, *args):
        return [self.binary, "-C", self.conf, *args]

    def version(self):
        out = subprocess.run(self.exim("-bV"), timeout=30, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        lines = out.stdout.decode(errors="replace").splitlines()
        return with_package_version(lines[0] if lines else None, self.binary)

    def start(self):
        """Starts the daemon in the foreground (-bdf); returns seconds until its greeting."""
        for d in (self.spool, self.logs):
            os.makedirs(d, exist_ok=True)
            shutil.chown(d, "Debian-exim", "Debian-exim")
        assert_free(BACKUP_EXIM)
        logf = open(os.path.join(self.dir, "exim.stderr"), "ab")
        t0 = time.monotonic()
        self.proc = start(self.exim("-bdf"), stdout=logf, stderr=logf)
        logf.close()
        if self.stop not in CLEANUPS:
            CLEANUPS.append(self.stop)
        greeting_after(BACKUP_EXIM, 120)
        if self.proc.poll() is not None:
            raise RuntimeError(f"exim exited (exit {self.proc.returncode}), see {self.dir}")
        return time.monotonic() - t0

    def pids(self):
        """The daemon, its receiving processes and the delivery processes they start (which
        leave the daemon's tree): every process run with this configuration."""
        return processes_with(self.conf)

    def stop(self):
        stop(self.runner)
        stop(self.proc)
        # Delivery processes outlive the daemon; each is ours (it names our configuration).
        for pid in self.pids():
            kill_if_named(pid, self.conf)
        wait_for(lambda: not self.pids(), 30, "Exim's processes to exit", 0.1)

    def wipe(self):
        self.stop()
        shutil.rmtree(self.spool, ignore_errors=True)
        shutil.rmtree(self.logs, ignore_errors=True)

    def rss(self):
        return sum(proc_status(pid, "VmRSS") for pid in self.pids())

    def settled(self, n):
        """All n in the queue (a -H file each) and no process but the daemon, so each message has
        been received and tried once (the first against the closed port, the rest deferred by the
        host's retry record)."""
        try:
            queued = sum(1 for name in os.listdir(os.path.join(self.spool, "input")) if name.endswith("-H"))
        except FileNotFoundError:
            return False
        return queued >= n and set(self.pids()) <= {self.proc.pid}

    def flush(self):
        """`exim -qff`: one queue runner, forced past the retry times, which sends the messages
        waiting for the primary down its connection one after another (Exim's own way of
        flushing a queue for one host). Started in the background, as `postqueue -f` returns at once."""
        logf = open(os.path.join(self.dir, "exim.stderr"), "ab")
        self.runner = start(self.exim("-qff"), stdout=logf, stderr=logf)
        logf.close()


class OpenSMTPD:
    """OpenSMTPD 6.8 (Debian's opensmtpd, unpacked by bench/run) as a backup-MX relay for
    example.test. Its queue (/var/spool/smtpd), control socket (/var/run/smtpd.sock) and pid file
    are compiled in, so it runs in a mount namespace of its own (unshare -m) where the work
    directory is bind-mounted over /var/spool and /run: the queue lives under the work directory
    and the machine's /var/spool and /run are never touched. smtpctl joins that namespace
    (nsenter -m). Durability is the default (queue_fs writes and fsyncs envelope and message)."""

    def __init__(self, work, smtpd, smtpctl, shim):
        self.smtpd, self.smtpctl_bin, self.shim = smtpd, smtpctl, shim
        self.dir = os.path.join(work, "opensmtpd")
        self.conf, self.var_spool = os.path.join(self.dir, "smtpd.conf"), os.path.join(self.dir, "var-spool")
        self.run_dir, self.resolv = os.path.join(self.dir, "run"), os.path.join(self.dir, "resolv.conf")
        self.proc = None
        os.makedirs(self.dir, exist_ok=True)
        # smtpd refuses a configuration that others may write.
        fd = os.open(self.conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.config())
        # Its own resolver (libasr) looks a client's address up in /etc/hosts first; a nameserver
        # on a closed loopback port answers at once should anything reach DNS.
        with open(self.resolv, "w") as f:
            f.write("nameserver 127.0.0.1\nlookup file bind\n")

    def config(self):
        return f"""# bench.py's OpenSMTPD: a backup MX for example.test, relaying to the primary at {addr(PRIMARY)}.
listen on {BACKUP_OPENSMTPD[0]} port {BACKUP_OPENSMTPD[1]} hostname opensmtpd.bench.test
# Politeness delays, lifted: by default a second connection to one route waits 5 s
# (conn-delay-route), one relay 2 s (conn-delay-relay), a reconnection 3 s (reconn-delay-route),
# and one route carries 5 connections (max-conn-per-route); 10 here, as bartleby's default per
# destination. Postfix has no such delays.
mta limit conn-delay-route 0 conn-delay-relay 0 reconn-delay-route 0 max-conn-per-route 10
# By default the transfer process holds back envelopes past 50 tasks per relay (task-hiwat) and
# releases 10 at a time; after `smtpctl schedule all` the held ones go back to their retry time
# (400 s after arrival), so a flush delivers about 50 and stops. Above any queue measured here.
mta limit task-hiwat 1000000 task-lowat 900000
action "relay" relay host smtp+notls://{addr(PRIMARY)}
match from any for domain example.test action "relay"
"""

    def version(self):
        out = subprocess.run([self.smtpd, "-h"], timeout=30, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        match = re.search(r"OpenSMTPD \S+", out.stdout.decode(errors="replace"))
        return with_package_version(match.group(0) if match else None, self.smtpd)

    def start(self):
        """Starts smtpd in the foreground (-d) in its namespace; returns seconds until its greeting."""
        for d in (self.var_spool, self.run_dir):
            os.makedirs(d, exist_ok=True)
        # OpenSMTPD listens with a backlog of 5 (SMTPD_BACKLOG, compiled in): with 20 clients
        # connecting at once the kernel drops SYNs and each drop costs a client a 1 s retransmit,
        # which held accept near 10 messages/s here. The preloaded shim (built by bench/run) makes
        # listen() ask for 100, Postfix's backlog; nothing else in the process changes.
        preload = f"LD_PRELOAD={self.shim} " if self.shim else ""
        script = (f"mount --bind {self.var_spool} /var/spool && mount --bind {self.run_dir} /run && "
                  f"mount --bind {self.resolv} /etc/resolv.conf && "
                  f"exec env {preload}{self.smtpd} -d -f {self.conf}")
        assert_free(BACKUP_OPENSMTPD)
        logf = open(os.path.join(self.dir, "smtpd.log"), "ab")
        t0 = time.monotonic()
        # unshare and sh exec, so the Popen's PID is smtpd's parent process.
        self.proc = start(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          stdout=logf, stderr=logf)
        logf.close()
        if self.stop not in CLEANUPS:
            CLEANUPS.append(self.stop)
        greeting_after(BACKUP_OPENSMTPD, 120)
        if self.proc.poll() is not None:
            raise RuntimeError(f"smtpd exited (exit {self.proc.returncode}), see {self.dir}/smtpd.log")
        return time.monotonic() - t0

    def smtpctl(self, *args):
        out = subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m", self.smtpctl_bin, *args],
                             timeout=120, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return out.stdout.decode(errors="replace")

    def stats(self):
        values = {}
        for line in self.smtpctl("show", "stats").splitlines():
            key, _, value = line.partition("=")
            if value.isdigit():
                values[key] = int(value)
        return values

    def pids(self):
        return descendants(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        children = self.pids()
        stop(self.proc)  # SIGTERM: the parent stops its processes and exits
        for pid in children:
            kill_if_named(pid, "smtpd")

    def wipe(self):
        self.stop()
        shutil.rmtree(self.var_spool, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def rss(self):
        return sum(proc_status(pid, "VmRSS") for pid in self.pids())

    def settled(self, n):
        """All n queued, nothing incoming or in flight, and each envelope tried once: the
        scheduler counts an envelope in delivery.tempfail when the transfer failed and in
        envelope.updated when it was held and handed back, so the two add up to n."""
        s = self.stats()
        tried = s.get("scheduler.delivery.tempfail", 0) + s.get("scheduler.envelope.updated", 0)
        return (s.get("scheduler.envelope", 0) >= n and s.get("scheduler.envelope.incoming", 0) == 0
                and s.get("scheduler.envelope.inflight", 0) == 0 and tried >= n)

    def flush(self):
        """What an administrator does when the primary is back: resume the route to it, which
        OpenSMTPD disabled after the refused connections (15 s and longer with each failure;
        envelopes sent to a disabled route fail again and wait for their next retry, 400 s and
        more), then `smtpctl schedule all`. (`resume route` wants an ID, from `show routes`.)"""
        for line in self.smtpctl("show", "routes").splitlines():
            match = re.match(r"(\d+)\. .* [A-Z-]*D[A-Z-]* nconn=", line)
            if match:
                self.smtpctl("resume", "route", match.group(1))
        self.smtpctl("schedule", "all")


# --- figures --------------------------------------------------------------------------------


def accept_and_drain(name, mta, args, results):
    """One round of accept (primary down) then drain (primary up, flush) for one MTA. The drain
    needs the accepted queue, so accept always runs; the drain is skipped unless asked for."""
    mta.wipe()
    mta.start()
    sampler = Sampler(mta.rss)
    seconds = smtp_source(mta_addr(name), args.messages, 20)
    # bartleby is one process; the others are many, so theirs is a sum (see the memory figure).
    results["accept_rss" if name == "bartleby" else "accept_rss_sum"].append(sampler.finish())
    if name == "bartleby":
        results["accept_hwm"].append(mta.hwm())
    results["accept"].append(args.messages / seconds)
    log(f"{name}: accepted {args.messages} in {seconds:.2f}s = {args.messages / seconds:.0f}/s")
    wait_for(lambda: mta.settled(args.messages), 600, f"{name} to queue and defer all", 0.5)
    if "drain" in args.only:
        drain(name, mta, args, results)
    mta.wipe()


def drain(name, mta, args, results):
    """The primary comes up and the MTA is flushed; messages/s until smtp-sink counted them all."""
    log(f"{name}: draining, load average {os.getloadavg()[0]:.2f}")
    sink = Sink(PRIMARY)
    t0 = time.monotonic()
    mta.flush()
    wait_for(lambda: sink.count >= args.messages, 1800, f"{name}'s drain to reach smtp-sink", 0.01)
    seconds = time.monotonic() - t0
    sink.stop()
    results["drain"].append(args.messages / seconds)
    log(f"{name}: drained {args.messages} in {seconds:.2f}s = {args.messages / seconds:.0f}/s")


def mta_addr(name):
    return {"bartleby": BARTLEBY, "bartleby-pg": BARTLEBY_PG, "postfix": POSTFIX, "exim": BACKUP_EXIM,
            "opensmtpd": BACKUP_OPENSMTPD, "ceiling": CEILING}[name]


def ceiling_round(args, results):
    sink = Sink(CEILING)
    if args.only & {"accept", "memory"}:
        sampler = Sampler(sink.rss)
        seconds = smtp_source(CEILING, args.messages, 20)
        results["accept_rss"].append(sampler.finish())
        results["accept"].append(args.messages / seconds)
        log(f"ceiling: accept {results['accept'][-1]:.0f}/s")
    if "drain" in args.only:
        seconds = smtp_source(CEILING, args.messages, 20, reuse=True)
        results["drain"].append(args.messages / seconds)
        log(f"ceiling: with reuse {results['drain'][-1]:.0f}/s")
    sink.stop()


def idle_round(name, mta, sessions, results):
    """RSS of a freshly started, empty MTA with idle sessions open (each read its greeting)."""
    mta.wipe()
    mta.start()
    socks = []
    try:
        for count in sessions:
            socks += open_idle(mta_addr(name), count - len(socks))
            time.sleep(1)
            results[f"idle_rss_{count}"].append(mta.rss())
            if name == "postfix":
                results[f"idle_pss_{count}"].append(mta.pss())
            log(f"{name}: {count} idle sessions, RSS {results[f'idle_rss_{count}'][-1] / 1024:.1f} MiB")
    finally:
        close_all(socks)
    mta.wipe()


def fill(name, mta, args):
    """Queues args.big messages (primary down), with many sessions to be quick about it."""
    mta.wipe()
    mta.start()
    seconds = smtp_source(mta_addr(name), args.big, 50)
    log(f"{name}: filled {args.big} in {seconds:.1f}s = {args.big / seconds:.0f}/s")
    wait_for(lambda: mta.settled(args.big), 1800, f"{name} to queue and defer {args.big}", 2)
    return args.big / seconds


def web_first_page():
    """Seconds for the admin page's first page, None when the binary serves no admin page."""
    try:
        out = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", f"http://{addr(WEB)}/"],
            timeout=120, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        code, seconds = out.stdout.decode().split()
        return float(seconds) if code == "200" else None
    except (subprocess.TimeoutExpired, ValueError):
        return None


def big_queue(bartleby, postfix, args, results):
    """Listing and restart with args.big queued; postfix is None when --peers leaves it out."""
    results["fill_rate_bartleby"].append(fill("bartleby", bartleby, args))
    if postfix:
        results["fill_rate_postfix"].append(fill("postfix", postfix, args))
    for _ in range(args.rounds):
        results["list_bartleby"].append(bartleby.list_time())
        if postfix:
            results["list_postfix"].append(postfix.list_time())
        page = web_first_page()
        if page is not None:
            results["web_first_page"].append(page)
        log(f"listing {args.big}: bartleby {results['list_bartleby'][-1]:.3f}s, "
            f"postfix {median(results['list_postfix'][-1:])}s, web {page}")
    for _ in range(args.rounds):
        bartleby.stop(signal.SIGKILL)
        results["restart_bartleby"].append(bartleby.start())
        if postfix:
            postfix.stop()
            results["restart_postfix"].append(postfix.start())
        log(f"restart with {args.big}: bartleby {results['restart_bartleby'][-1]:.3f}s, "
            f"postfix {median(results['restart_postfix'][-1:])}s")
    # Just restarted: what holding the big queue costs (bartleby keeps an index of every envelope).
    time.sleep(2)
    results["big_rss_bartleby"].append(bartleby.rss())
    bartleby.wipe()
    if postfix:
        results["big_rss_postfix"].append(postfix.rss())
        postfix.wipe()


# --- report ---------------------------------------------------------------------------------


def median(values):
    return statistics.median(values) if values else None


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def figure(name, unit, better, b, p, c, e=(), o=(), g=(), **extra):
    """One JSON object: medians of bartleby, Postfix, Exim (e), OpenSMTPD (o), bartleby-pg (g,
    bartleby on PostgreSQL) and the ceiling (c), bartleby's ratio to each and bartleby-pg's to
    Postfix, bartleby and the ceiling (None where a system was not measured)."""
    b, p, c, e, o, g = median(b), median(p), median(c), median(e), median(o), median(g)
    obj = {"figure": name, "unit": unit, "better": better, "bartleby": b, "bartleby-pg": g, "postfix": p,
           "exim": e, "opensmtpd": o, "ceiling": c, "bartleby_over_postfix": ratio(b, p),
           "bartleby_over_exim": ratio(b, e), "bartleby_over_opensmtpd": ratio(b, o),
           "bartleby_over_ceiling": ratio(b, c), "bartleby_pg_over_postfix": ratio(g, p),
           "bartleby_pg_over_bartleby": ratio(g, b), "bartleby_pg_over_ceiling": ratio(g, c)}
    obj.update(extra)
    return obj


def samples(r, key):
    return {"bartleby": r["b." + key], "bartleby-pg": r["g." + key], "postfix": r["p." + key],
            "exim": r["e." + key], "opensmtpd": r["o." + key], "ceiling": r["c." + key]}


def figures(r, args):
    return [
        figure("accept", "messages/s", "higher", r["b.accept"], r["p.accept"], r["c.accept"],
               r["e.accept"], r["o.accept"], r["g.accept"], samples=samples(r, "accept"),
               exim_note="Exim 4.96 holds its 221 reply to QUIT up to 200 ms waiting for the client to "
                         "close; smtp-source waits for it, so 20 one-message sessions stay near 100/s",
               goal="bartleby >= 4x postfix and >= 0.5x ceiling", bartleby_pg_goal="bartleby-pg >= 2x postfix"),
        figure("drain", "messages/s", "higher", r["b.drain"], r["p.drain"], r["c.drain"],
               r["e.drain"], r["o.drain"], r["g.drain"], samples=samples(r, "drain"),
               ceiling_is="smtp-source -d (connection reuse) into smtp-sink", goal="bartleby >= 4x postfix",
               bartleby_pg_goal="bartleby-pg >= 2x postfix"),
        figure("memory_accept_peak", "kB", "lower", r["b.accept_hwm"], r["p.accept_rss_sum"], r["c.accept_rss"],
               r["e.accept_rss_sum"], r["o.accept_rss_sum"], r["g.accept_rss_sum"],
               note="bartleby VmHWM; postfix, exim, opensmtpd: largest sum of VmRSS over their processes "
                    "(shared pages counted in each), sampled every 200 ms; bartleby-pg: the same over bartleby "
                    "and its PostgreSQL's processes; ceiling: smtp-sink VmRSS",
               bartleby_sampled_rss=median(r["b.accept_rss"])),
        figure("memory_idle", "kB", "lower", r[f"b.idle_rss_{args.idle}"], r["p.idle_rss_100"], [],
               note=f"bartleby with {args.idle} idle sessions, postfix with 100 (default process limit; "
                    f"RSS summed over its processes); no ceiling: smtp-sink serves at most 256 sessions at once",
               bartleby_100_sessions=median(r["b.idle_rss_100"]), postfix_pss_100=median(r["p.idle_pss_100"]),
               goal=f"bartleby with {args.idle} < postfix with 100"),
        figure("listing", "s", "lower", r["list_bartleby"], r["list_postfix"], [],
               queued=args.big, web_first_page_s=median(r["web_first_page"]),
               note="`bartleby queue list` vs `postqueue -p`, output to /dev/null; web n/a when the "
                    "binary serves no admin page",
               goal="list < 1 s, admin page first page < 0.1 s"),
        figure("restart", "s", "lower", r["restart_bartleby"], r["restart_postfix"], [],
               queued=args.big, note="bartleby: SIGKILL then start; postfix: stop then start; "
                                     "until the 220 greeting",
               goal="< 2 s"),
        figure("memory_big_queue", "kB", "lower", r["big_rss_bartleby"], r["big_rss_postfix"], [],
               queued=args.big, note="RSS 2 s after the last restart, the queue full (postfix: summed)"),
        figure("fill_big", "messages/s", "higher", r["fill_rate_bartleby"], r["fill_rate_postfix"], [],
               note=f"filling {args.big} for listing/restart: smtp-source, 50 sessions, primary down"),
    ]


def fmt(value, unit):
    if value is None:
        return "n/a"
    if unit == "kB":
        return f"{value / 1024:.1f} MiB"
    if unit == "s":
        return f"{value:.3f} s"
    return f"{value:.0f}/s"


def print_table(figs, with_postgres=False):
    systems = ["bartleby"] + (["bartleby-pg"] if with_postgres else []) + ["postfix", "exim", "opensmtpd", "ceiling"]
    others = ["postfix", "exim", "opensmtpd", "ceiling"]
    pg = [f"{'pg/postfix':>12}"] if with_postgres else []
    print("\n" + f"{'figure':<20}" + "".join(f"{name:>12}" for name in systems)
          + "".join(f"{'b/' + name:>12}" for name in others) + "".join(pg))
    for f in figs:
        u = f["unit"]
        pg = [f"{f['bartleby_pg_over_postfix'] or 'n/a':>12}"] if with_postgres else []
        print(f"{f['figure']:<20}" + "".join(f"{fmt(f[name], u):>12}" for name in systems)
              + "".join(f"{f['bartleby_over_' + name] or 'n/a':>12}" for name in others) + "".join(pg))
        if f["figure"] == "listing":
            print(f"{'  admin first page':<20}{fmt(f['web_first_page_s'], 's'):>12}")


def environment(binary, peers):
    def out(cmd):
        try:
            return subprocess.run(cmd, timeout=30, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  cwd=os.path.dirname(os.path.abspath(__file__))).stdout.decode().strip()
        except (OSError, subprocess.TimeoutExpired):
            return None
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": out(["git", "rev-parse", "HEAD"]),
            "dirty": bool(out(["git", "status", "--porcelain", "--untracked-files=no"])),
            "bartleby": out([binary, "--version"]), "postfix": out(["postconf", "-dh", "mail_version"]),
            "exim": peers["exim"].version() if "exim" in peers else None,
            "opensmtpd": peers["opensmtpd"].version() if "opensmtpd" in peers else None,
            "postgresql": peers["bartleby-pg"].postgres.version() if "bartleby-pg" in peers else None,
            "cpus": os.cpu_count(), "kernel": os.uname().release,
            "load_at_start": os.getloadavg()}


# --- main -----------------------------------------------------------------------------------


# What --only selects, and the JSON figures each of them reports.
FIGURES = {
    "accept": ["accept"],
    "drain": ["drain"],
    "memory": ["memory_accept_peak"],
    "idle": ["memory_idle"],
    "listing": ["listing", "memory_big_queue", "fill_big"],
    "restart": ["restart"],
}


# The MTAs beside bartleby, in the order they run; --peers picks some. bartleby-pg (bartleby with
# its queue in PostgreSQL) runs only when asked for (--with-postgres, or named in --peers).
PEERS = ["postfix", "exim", "opensmtpd", "bartleby-pg"]
DEFAULT_PEERS = ["postfix", "exim", "opensmtpd"]
PEER_DIR = "/var/cache/bartleby-bench/peers"


def peer_binary(args, package, path):
    """A peer's binary as bench/run unpacked it, else the system's (the package installed)."""
    for candidate in (os.path.join(args.peer_dir, package, path.lstrip("/")), path):
        if os.access(candidate, os.X_OK):
            return candidate
    sys.exit(f"bench: {path} not found (bench/run unpacks {package} into {args.peer_dir}; or leave it out "
             f"with --peers)")


def make_peers(args):
    peers = {}
    if "postfix" in args.peers:
        peers["postfix"] = Postfix(args.workdir)
    if "exim" in args.peers:
        peers["exim"] = Exim(args.workdir, peer_binary(args, "exim4-daemon-light", "/usr/sbin/exim4"))
    if "opensmtpd" in args.peers:
        shim = os.path.join(args.peer_dir, "listen-backlog.so")
        peers["opensmtpd"] = OpenSMTPD(args.workdir, peer_binary(args, "opensmtpd", "/usr/sbin/smtpd"),
                                       peer_binary(args, "opensmtpd", "/usr/sbin/smtpctl"),
                                       shim if os.path.exists(shim) else None)
    if "bartleby-pg" in args.peers:
        peers["bartleby-pg"] = BartlebyPostgres(args.binary, args.workdir, PostgreSQL(args.workdir))
    return peers


# Each system's prefix in the results (b.accept, p.accept, ...).
PREFIX = {"bartleby": "b.", "bartleby-pg": "g.", "postfix": "p.", "exim": "e.", "opensmtpd": "o.", "ceiling": "c."}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", help="the bartleby binary (required unless --check-postgres)")
    p.add_argument("--quick", action="store_true", help="2,000 messages, 10,000 queued, 1 round")
    p.add_argument("--rounds", type=int, help="rounds per figure (default 3; --quick 1)")
    p.add_argument("--messages", type=int, help="messages for accept/drain (default 10000)")
    p.add_argument("--big", type=int, help="queued messages for listing/restart (default 100000)")
    p.add_argument("--idle", type=int, default=1000, help="idle sessions for bartleby and the ceiling")
    p.add_argument("--skip-big", action="store_true", help="skip listing and restart (no 100,000 fill)")
    p.add_argument("--json", help="where to write the results (default target/bench/RESULT.json)")
    p.add_argument("--workdir", default="/var/tmp/bartleby-bench", help="queues live here (wiped)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--only", default=",".join(FIGURES),
                   help=f"comma list of the figures to measure (default all: {','.join(FIGURES)}); "
                        "drain includes the accept that fills the queue, without reporting it")
    p.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                   help=f"comma list of the MTAs to measure beside bartleby (default {','.join(DEFAULT_PEERS)}; "
                        f"any of {','.join(PEERS)}); Exim, OpenSMTPD and bartleby-pg take part in accept, drain "
                        "and memory only")
    p.add_argument("--with-postgres", action="store_true",
                   help=f"add bartleby-pg: bartleby with [queue] store = \"postgres\", against its own "
                        f"PostgreSQL 15 on {addr(POSTGRES)} (fsync and synchronous_commit on)")
    p.add_argument("--check-postgres", action="store_true",
                   help="only start, log in to, stop, restart and reset bartleby-pg's PostgreSQL, then exit")
    p.add_argument("--peer-dir", default=PEER_DIR,
                   help=f"where bench/run unpacked exim4-daemon-light and opensmtpd (default {PEER_DIR})")
    args = p.parse_args()
    args.only = {f.strip() for f in args.only.split(",") if f.strip()}
    if not args.only or args.only - set(FIGURES):
        p.error(f"--only takes a comma list of {','.join(FIGURES)}")
    peers = {f.strip() for f in args.peers.split(",") if f.strip()}
    if peers - set(PEERS):
        p.error(f"--peers takes a comma list of {','.join(PEERS)}")
    if args.with_postgres:
        peers.add("bartleby-pg")
    args.peers = [name for name in PEERS if name in peers]
    args.with_postgres = "bartleby-pg" in args.peers
    if args.check_postgres:
        return args
    if not args.binary:
        p.error("--binary is required")
    args.binary = os.path.abspath(args.binary)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.messages = args.messages or (2000 if args.quick else 10000)
    args.big = args.big or (10000 if args.quick else 100000)
    return args


def main():
    args = parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root (Postfix and smtp-sink need it)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Idle sessions need descriptors here and in the servers (they inherit the limit).
    wanted = 4 * args.idle + 1024
    if hard != resource.RLIM_INFINITY and hard < wanted:
        sys.exit(f"bench: the open files limit ({hard}) is below {wanted}; raise it (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.check_postgres:
        work = tempfile.mkdtemp(prefix="bartleby-bench-pg-", dir="/var/tmp")
        try:
            check_postgres(work)
        finally:
            cleanup()
            shutil.rmtree(work, ignore_errors=True)
        return
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    bartleby, peers = Bartleby(args.binary, args.workdir), make_peers(args)
    postfix = peers.get("postfix")
    env = environment(args.binary, peers)
    from collections import defaultdict
    r = defaultdict(list)
    sub = lambda name: _Prefixed(r, PREFIX[name])  # noqa: E731
    try:
        for i in range(args.rounds):
            if args.only & {"accept", "drain", "memory"}:
                log(f"round {i + 1}/{args.rounds}: accept and drain, {args.messages} messages, "
                    f"load average {os.getloadavg()[0]:.2f}")
                ceiling_round(args, sub("ceiling"))
                for name, mta in peers.items():
                    accept_and_drain(name, mta, args, sub(name))
                accept_and_drain("bartleby", bartleby, args, sub("bartleby"))
            if "idle" in args.only:
                if postfix:
                    idle_round("postfix", postfix, [100], sub("postfix"))
                idle_round("bartleby", bartleby, [100, args.idle], sub("bartleby"))
        if not args.skip_big and args.only & {"listing", "restart"}:
            log(f"filling {args.big} messages for listing and restart")
            big_queue(bartleby, postfix, args, r)
    finally:
        cleanup()
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    wanted = {name for figure_name in args.only for name in FIGURES[figure_name]}
    figs = [f for f in figures(r, args) if f["figure"] in wanted]
    print_table(figs, args.with_postgres)
    result = {"environment": env, "settings": {"rounds": args.rounds, "messages": args.messages,
                                               "message_size": MESSAGE_SIZE, "accept_sessions": 20,
                                               "big": args.big, "idle": args.idle,
                                               "only": sorted(args.only), "peers": args.peers},
              "figures": figs}
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(args.binary)), "..", "bench",
                                     f"{time.strftime('%Y%m%dT%H%M%S')}-{(env['commit'] or 'nogit')[:10]}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nresults written to {os.path.abspath(path)}")


class _Prefixed:
    """A view of the results dict that prefixes keys (b. p. e. o. c.)."""

    def __init__(self, r, prefix):
        self.r, self.prefix = r, prefix

    def __getitem__(self, key):
        return self.r[self.prefix + key]


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        cleanup()
        sys.exit(130)
