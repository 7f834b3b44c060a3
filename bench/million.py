#!/usr/bin/env python3
"""A million queued messages (issue 12, section 3): bartleby alone with a big queue, beside a Postfix
drain of a smaller queue measured in the same run. Started by bench/run-million.

  fill      smtp-source, 50 sessions, N messages of 4 KiB, the primary DOWN; messages/s.
  rss       bartleby's VmRSS once all N are queued and tried once (and its VmHWM).
  list      `bartleby queue list`: seconds to its first line and to its last (output read here).
  page      the admin page's first page and `/api/queue` (curl's time_total).
  restart   SIGKILL, start, seconds until the SMTP greeting answers (median of rounds), and the
            RSS 2 s after the last restart.
  drain     the primary (smtp-sink) comes up, `queue flush`; messages/s until smtp-sink has
            counted the LAST of the N. Postfix's drain of --postfix-messages (it fills at about a
            tenth of bartleby's rate, so a million would take it most of an hour) stands beside it.

Every process started here is stopped on exit. Results: a table and a JSON file.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the shared helpers: processes, smtp-source, smtp-sink, Postfix)


class Bartleby(bench.Bartleby):
    """bench.Bartleby, asked through /metrics whether a million are settled."""

    def metric(self, name):
        with urllib.request.urlopen(f"http://{bench.addr(bench.WEB)}/metrics", timeout=30) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def settled(self, n):
        """All n queued and each tried once (deferred), read from /metrics: no listing of a million."""
        return (self.metric("bartleby_queue_messages") >= n
                and self.metric("bartleby_messages_deferred_total") >= n)

    def list_times(self):
        """Seconds to the first line of `queue list` and to its end; the number of lines."""
        t0 = time.monotonic()
        proc = subprocess.Popen(self.cli("queue", "list"), stdout=subprocess.PIPE)
        first = None
        lines = 0
        for _ in proc.stdout:
            if first is None:
                first = time.monotonic() - t0
            lines += 1
        proc.wait(timeout=600)
        return first, time.monotonic() - t0, lines


def curl_time(path):
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}",
                          f"http://{bench.addr(bench.WEB)}{path}"], timeout=120, stdout=subprocess.PIPE)
    code, seconds = out.stdout.decode().split()
    if code != "200":
        raise RuntimeError(f"{path} answered {code}")
    return float(seconds)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", required=True)
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--postfix-messages", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    p.add_argument("--workdir", default="/var/tmp/bartleby-million")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    env = bench.environment(args.binary, {})
    r = {}
    try:
        postfix = bench.Postfix(args.workdir)
        pf = {"accept": [], "accept_rss_sum": [], "drain": []}
        pf_args = argparse.Namespace(messages=args.postfix_messages, only={"drain"})
        bench.accept_and_drain("postfix", postfix, pf_args, pf)
        r["postfix_drain"] = pf["drain"][0]
        r["postfix_drain_messages"] = args.postfix_messages

        b = Bartleby(args.binary, args.workdir)
        b.wipe()
        b.start()
        seconds = bench.smtp_source(bench.BARTLEBY, args.messages, 50)
        r["fill"] = args.messages / seconds
        bench.log(f"bartleby: filled {args.messages} in {seconds:.1f}s = {r['fill']:.0f}/s")
        bench.wait_for(lambda: b.settled(args.messages), 3600, "bartleby to queue and defer all", 5)
        time.sleep(2)
        r["rss_full"], r["hwm_full"] = b.rss(), b.hwm()
        bench.log(f"bartleby: RSS {r['rss_full'] / 1024:.0f} MiB, HWM {r['hwm_full'] / 1024:.0f} MiB")
        lists, pages, apis = [], [], []
        for _ in range(args.rounds):
            lists.append(b.list_times())
            pages.append(curl_time("/"))
            apis.append(curl_time("/api/queue"))
            bench.log(f"list first {lists[-1][0]:.3f}s all {lists[-1][1]:.2f}s ({lists[-1][2]} lines), "
                      f"page {pages[-1]:.3f}s, api {apis[-1]:.3f}s")
        r["list_first_line"] = statistics.median(x[0] for x in lists)
        r["list_all"] = statistics.median(x[1] for x in lists)
        r["list_lines"] = lists[-1][2]
        r["page_first"] = statistics.median(pages)
        r["api_first"] = statistics.median(apis)
        restarts = []
        for _ in range(args.rounds):
            b.stop(signal.SIGKILL)
            restarts.append(b.start())
            bench.log(f"restart: {restarts[-1]:.3f}s")
        r["restart"] = statistics.median(restarts)
        r["restart_samples"] = restarts
        time.sleep(2)
        r["rss_after_restart"] = b.rss()
        bench.wait_for(lambda: b.metric("bartleby_queue_messages") >= args.messages, 600, "the queue after restart", 1)
        sink = bench.Sink(bench.PRIMARY)
        t0 = time.monotonic()
        b.flush()
        bench.wait_for(lambda: sink.count >= args.messages, 3600, "the drain to reach smtp-sink", 0.05)
        r["drain"] = args.messages / (time.monotonic() - t0)
        sink.stop()
        bench.log(f"bartleby: drained {args.messages} at {r['drain']:.0f}/s")
        b.wipe()
    finally:
        bench.cleanup()
        shutil.rmtree(args.workdir, ignore_errors=True)
    r["drain_over_postfix"] = round(r["drain"] / r["postfix_drain"], 3)
    goals = {"rss_full_under_256_mib": r["rss_full"] < 256 * 1024,
             "rss_after_restart_under_256_mib": r["rss_after_restart"] < 256 * 1024,
             "restart_under_3_s": r["restart"] < 3, "list_first_line_under_0.1_s": r["list_first_line"] < 0.1,
             "list_all_under_5_s": r["list_all"] < 5, "page_first_under_0.1_s": r["page_first"] < 0.1,
             "drain_at_least_4x_postfix": r["drain_over_postfix"] >= 4}
    for k, v in r.items():
        print(f"{k:<28}{v}")
    for k, v in goals.items():
        print(f"{k:<36}{'met' if v else 'NOT met'}")
    result = {"environment": env, "settings": vars(args) | {"message_size": bench.MESSAGE_SIZE, "fill_sessions": 50},
              "figures": r, "goals": goals,
              "units": {"rss": "kB", "fill": "messages/s", "drain": "messages/s", "times": "s"}}
    path = args.json or f"bench/results/{time.strftime('%Y-%m-%d')}-{(env['commit'] or 'nogit')[:7]}-million.json"
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"results written to {path}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        bench.cleanup()
        sys.exit(130)
