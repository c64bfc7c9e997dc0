#!/usr/bin/env python3
"""What one new TLS connection costs a proxy: its system calls by name and its CPU, user and
kernel, per connection.

    loadtest/tools/per_connection.py egressgate [--seconds 4] [--bin target/release/egressgate]
    loadtest/tools/per_connection.py haproxy
    loadtest/tools/per_connection.py nginx

Runs `loadtest tls_connect` for that one path (root, the lab; build with `cargo build --release
-p loadtest -p egressgate` first) and measures two windows mid-run: first the proxy's user and
system time from /proc, divided by the TCP connections the lab's node opened (the proxy's
upstream connections); then the system calls made on CPU 1 (where the loadtest pins the proxy
and nothing else) by name, with `perf stat` on the syscall tracepoints, divided by the
`connect` calls (every proxy opens one upstream connection per client connection). Not at
once: the tracepoints slow every call. The CPU total is exact, its user/kernel split the
kernel's tick-sampled one.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PROXY_CPU = "1"
# How long the loadtest needs to start its lab and reach the timed sample.
WARM_UP_SECONDS = 6
# The system calls a proxy's connection path makes, counted by name (every one of the kernel's
# takes perf over ten seconds to set up here); the rest show as `other`.
NAMED = (
    "accept accept4 epoll_wait epoll_pwait epoll_ctl recvfrom recvmsg read readv sendto sendmsg "
    "write writev splice pipe2 close shutdown socket connect setsockopt getsockopt getsockname "
    "getpeername ioctl fcntl clock_gettime futex madvise mmap munmap brk"
).split()


def proxy_pids(path, binary):
    """The proxy's processes: egressgate by its binary's path, the peers by name."""
    pattern = {
        "egressgate": ["-f", f"^{binary} run"],
        "haproxy": ["-x", "haproxy"],
        "nginx": ["-x", "nginx"],
    }[path]
    found = subprocess.run(["pgrep", *pattern], capture_output=True, text=True).stdout.split()
    if not found:
        sys.exit(f"per_connection: no {path} process found (did the lab start? see the run log)")
    return found


def cpu_seconds(pids):
    """(user, system) seconds of the processes so far, all threads of each."""
    ticks = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            # The command name may hold spaces: fields count from after its closing parenthesis.
            fields = stat.read().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    return user / ticks, system / ticks


def syscall_counts(output):
    """Counts by name, and `other` for the calls not named."""
    counts = {}
    for line in open(output):
        parts = line.strip().split(",")
        if len(parts) > 2 and parts[0].isdigit():
            name = re.sub(r"^(raw_)?syscalls:sys_enter_?", "", parts[2]) or "all"
            counts[name] = int(parts[0])
    counts["other"] = counts.pop("all", 0) - sum(counts.values())
    return counts


def node_namespace():
    """The lab's node namespace (where the proxy connects upstream from): the newest one."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    nodes = [line.split()[0] for line in names.splitlines() if line.split()[0].endswith("-node")]
    if not nodes:
        sys.exit("per_connection: no lab node namespace found")
    return max(nodes, key=lambda name: os.stat(f"/run/netns/{name}").st_mtime)


def upstream_connections(namespace):
    """TCP connections opened from the node so far: the proxy's upstream connections."""
    snmp = subprocess.run(["ip", "netns", "exec", namespace, "cat", "/proc/net/snmp"],
                          capture_output=True, text=True, check=True).stdout
    header, values = [line.split() for line in snmp.splitlines() if line.startswith("Tcp:")][:2]
    return int(values[header.index("ActiveOpens")])


def measure(path, binary, seconds, out):
    """Runs the loadtest and measures two windows of `seconds` each: the proxy's CPU first,
    then its system calls (the syscall tracepoints slow every call down, so not at once)."""
    loadtest = os.path.join(ROOT, "target/release/loadtest")
    # Warm-up, both windows, perf's second or so to set its counters up, and a margin.
    run_seconds = str(int(WARM_UP_SECONDS + 2 * seconds + 8))
    with open(os.path.join(out, "run.log"), "w") as log:
        run = subprocess.Popen(
            [loadtest, "tls_connect", "--paths", path, "--rounds", "1", "--seconds", run_seconds,
             "--no-install", "--no-report", "--results", os.path.join(out, "results")],
            cwd=ROOT, env=dict(os.environ, EGRESSGATE_BIN=binary), stdout=log,
            stderr=subprocess.STDOUT)
    try:
        time.sleep(WARM_UP_SECONDS)
        pids = proxy_pids(path, binary)
        node = node_namespace()
        opened, before = upstream_connections(node), cpu_seconds(pids)
        time.sleep(seconds)
        opened, after = upstream_connections(node) - opened, cpu_seconds(pids)
        counted = os.path.join(out, "calls")
        events = [f"syscalls:sys_enter_{name}" for name in NAMED] + ["raw_syscalls:sys_enter"]
        subprocess.run(
            ["perf", "stat", "-C", PROXY_CPU, "-x,", "-o", counted, "-e", ",".join(events), "--",
             "sleep", str(seconds)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        if run.wait() != 0:
            sys.stderr.write(open(os.path.join(out, "run.log")).read())
            sys.exit("per_connection: the loadtest failed")
    cpu = ((after[0] - before[0]) / opened, (after[1] - before[1]) / opened) if opened else None
    return syscall_counts(counted), cpu


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", choices=["egressgate", "haproxy", "nginx"])
    parser.add_argument("--seconds", type=float, default=4.0, help="the measured window")
    parser.add_argument("--bin", default=os.path.join(ROOT, "target/release/egressgate"),
                        help="the egressgate binary")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        counts, cpu = measure(args.path, os.path.abspath(args.bin), args.seconds, out)

    connections = counts.get("connect", 0)
    if connections == 0 or cpu is None:
        sys.exit("per_connection: no upstream connection in a window")
    user, system = cpu
    print(f"{args.path}, two windows of {args.seconds:g} s")
    print(f"CPU per connection: user {user * 1e6:.0f} µs, kernel {system * 1e6:.0f} µs")
    print(f"system calls per connection ({connections} connections): "
          f"{sum(counts.values()) / connections:.1f}")
    for name, count in sorted(counts.items(), key=lambda item: -item[1]):
        if count / connections >= 0.05:
            print(f"  {count / connections:6.2f}  {name}")


if __name__ == "__main__":
    main()
