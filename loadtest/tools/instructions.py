#!/usr/bin/env python3
"""How many user-space instructions a proxy executes per new TLS connection or per keep-alive
request, counted by valgrind's callgrind: exact and repeatable where CPU time on this machine
varies by ±5 % between runs, so a change of a few hundred instructions shows.

    loadtest/tools/instructions.py egressgate [--scenario tls_connect|keepalive|http_rr] [--bin PATH]
    loadtest/tools/instructions.py nginx --scenario keepalive
    loadtest/tools/instructions.py haproxy

Runs `loadtest <scenario>` for that one path (root, the lab; build with `cargo build --release
-p loadtest -p egressgate` first) with the proxy under callgrind, counting nothing until the
run is warm; then counts for a window and divides by what the proxy did in it: the TCP
connections the lab's node opened (tls_connect), or half the proxy's sends (keepalive and
http_rr: one send each way per request). Everything the process executes counts, its other threads
included (egressgate's log writer). The kernel's side is not counted: see per_connection.py.
Under valgrind the proxy runs several times slower, so the load's rate is lower than in a
benchmark; the count per operation does not depend on it. Prints the count and the functions
that executed most of it.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from per_connection import ROOT, node_namespace, upstream_connections  # noqa: E402

# Valgrind starts slowly: the lab waits for the proxy to listen, then the load warms up.
WARM_UP_SECONDS = 12
# The C library calls by which the proxies send on a socket (nginx writev, the others send).
SENDS = ("send", "sendto", "sendmsg", "writev")


def wrapper(directory, real, output):
    """A script named like the proxy that runs it under callgrind, instrumentation off."""
    path = os.path.join(directory, os.path.basename(real))
    with open(path, "w") as script:
        script.write(
            "#!/bin/sh\n"
            f"exec valgrind --tool=callgrind --instr-atstart=no "
            f"--callgrind-out-file={output}.%p {real} \"$@\"\n")
    os.chmod(path, 0o755)
    return path


def callgrind_pid(real):
    """The callgrind process running `real` with the proxy's arguments (not a version check)."""
    listing = subprocess.run(["pgrep", "-af", "callgrind"],
                             capture_output=True, text=True).stdout
    for line in listing.splitlines():
        pid, command = line.split(" ", 1)
        if real in command and not re.search(r" -[vV]$", command):
            return pid
    sys.exit("instructions: the proxy under callgrind was not found (see the run log)")


def callgrind(pid, *command):
    subprocess.run(["callgrind_control", *command, pid], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def annotate(dump, *options):
    return subprocess.run(["callgrind_annotate", *options, dump], capture_output=True,
                          text=True, check=True).stdout


def total(listing):
    match = re.search(r"^\s*([\d,]+) .*PROGRAM TOTALS", listing, re.M)
    return int(match.group(1).replace(",", "")) if match else 0


def sends(dump):
    """Calls into the C library's send functions, from the callers' side of the call tree."""
    # Every function, however small its share (the default lists those making up 99 %).
    tree = annotate(dump, "--tree=caller", "--threshold=100")
    count = 0
    for block in tree.split("\n\n"):
        lines = block.strip().splitlines()
        head = next((line for line in lines if " *  " in line), "")
        inside = any(re.search(rf":{name} \[", head) for name in SENDS) and "libc" in head
        if inside:
            calls = re.findall(r"\(([\d,]+)x\)", block)
            count += sum(int(n.replace(",", "")) for n in calls)
    return count


def measure(path, scenario, binary, seconds, out):
    real = binary if path == "egressgate" else subprocess.run(
        ["which", path], capture_output=True, text=True, check=True).stdout.strip()
    bin_dir = os.path.join(out, "bin")
    os.makedirs(bin_dir)
    dump_base = os.path.join(out, "callgrind.out")
    wrapped = wrapper(bin_dir, real, dump_base)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    if path == "egressgate":
        env["EGRESSGATE_BIN"] = wrapped
    run_seconds = str(int(WARM_UP_SECONDS + seconds + 8))
    loadtest = os.path.join(ROOT, "target/release/loadtest")
    with open(os.path.join(out, "run.log"), "w") as log:
        run = subprocess.Popen(
            [loadtest, scenario, "--paths", path, "--rounds", "1", "--seconds", run_seconds,
             "--no-install", "--no-report", "--results", os.path.join(out, "results")],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(WARM_UP_SECONDS)
        pid = callgrind_pid(real)
        node = node_namespace()
        opened = upstream_connections(node)
        callgrind(pid, "--instr=on")
        time.sleep(seconds)
        callgrind(pid, "--instr=off")
        opened = upstream_connections(node) - opened
        callgrind(pid, "--dump")
    finally:
        if run.wait() != 0:
            sys.stderr.write(open(os.path.join(out, "run.log")).read())
            sys.exit("instructions: the loadtest failed")
    dump = f"{dump_base}.{pid}.1"
    operations = opened if scenario == "tls_connect" else sends(dump) // 2
    return dump, operations


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", choices=["egressgate", "haproxy", "nginx"])
    parser.add_argument("--scenario", choices=["tls_connect", "keepalive", "http_rr"],
                        default="tls_connect")
    parser.add_argument("--seconds", type=float, default=5.0, help="the counted window")
    parser.add_argument("--bin", default=os.path.join(ROOT, "target/release/egressgate"),
                        help="the egressgate binary")
    parser.add_argument("--top", type=int, default=15, help="functions listed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        dump, operations = measure(args.path, args.scenario, os.path.abspath(args.bin),
                                   args.seconds, out)
        listing = annotate(dump)
    if operations == 0:
        sys.exit("instructions: nothing done in the window")
    what = "new connection" if args.scenario == "tls_connect" else "request"
    print(f"{args.path}, {args.scenario}: {operations} per {args.seconds:g} s window")
    print(f"instructions per {what}: {total(listing) / operations:.0f}")
    functions = listing.split("file:function", 1)[-1].splitlines()
    for line in [line for line in functions if "(" in line][:args.top]:
        count, name = line.split(")", 1)
        print(f"  {int(count.split()[0].replace(',', '')) / operations:7.0f}  {name.strip()}")


if __name__ == "__main__":
    main()
