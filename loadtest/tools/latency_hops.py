#!/usr/bin/env python3
"""Where a proxy's added latency goes, hop by hop, from a tcpdump of the node namespace.

While `loadtest tls_connect --paths <one path>` runs (one client, one connection at a time):

    ip netns exec <lab>-node tcpdump -i any -nn --time-stamp-precision=nano -s 128 \
        -w hops.pcap tcp          # a few seconds mid-run
    loadtest/tools/latency_hops.py hops.pcap

Pod-side packets are those to or from a pod address (198.18.0.0/16); upstream-side ones are
the proxy's own connections to port 5443. The n-th pod connection is paired with the n-th
upstream connection (the client is sequential), and each hop is the time between a packet
arriving on one side and its counterpart leaving on the other. The `c`/`s` lines are the
client's and the server's own turns between those packets (its CPU, shared in the lab): a proxy
can lengthen them too, by what it makes that CPU do or by when it does it. Medians and p90 in µs.
"""
import re
import statistics
import subprocess
import sys

PACKET = re.compile(
    r"^(\d+\.\d+) \S+\s+(?:In|Out|P|M|B)?\s*IP (\d+\.\d+\.\d+\.\d+)\.(\d+) > "
    r"(\d+\.\d+\.\d+\.\d+)\.(\d+): Flags \[([^\]]*)\].*length (\d+)"
)
POD_NET = "198.18."
UPSTREAM_PORT = "5443"


def connections(pcap):
    """Pod-side and upstream-side connections, each a list of (time, direction, kind)."""
    text = subprocess.run(
        ["tcpdump", "-r", pcap, "-nn", "-tt", "--time-stamp-precision=nano"],
        capture_output=True, text=True, check=True,
    ).stdout
    sides = {"pod": [], "up": []}
    current = {"pod": {}, "up": {}}  # the latest connection of each address and port
    for line in text.splitlines():
        m = PACKET.match(line)
        if not m:
            continue
        t, src, sport, dst, dport, flags, length = m.groups()
        if src.startswith(POD_NET):
            side, key, way = "pod", (src, sport), "up"
        elif dst.startswith(POD_NET):
            side, key, way = "pod", (dst, dport), "down"
        elif dport == UPSTREAM_PORT:
            side, key, way = "up", (src, sport), "up"
        elif sport == UPSTREAM_PORT:
            side, key, way = "up", (dst, dport), "down"
        else:
            continue
        kind = {"S": "syn", "S.": "synack"}.get(flags, "data" if int(length) else "ack")
        conn = current[side].get(key)
        # A SYN after data on the same address and port is a new connection (the port reused).
        if conn is None or (kind == "syn" and any(k == "data" for _, _, k in conn)):
            conn = current[side][key] = []
            sides[side].append(conn)
        conn.append((float(t), way, kind))
    # in the order they started
    return sides["pod"], sides["up"]


def hops(pod_conns, up_conns):
    found = {}

    def add(hop, seconds):
        found.setdefault(hop, []).append(seconds * 1e6)

    def times(conn, way, kind):
        return [t for t, w, k in conn if w == way and k == kind]

    # The first and last connections may be cut by the capture's start and end.
    for pod, up in list(zip(pod_conns, up_conns))[2:-2]:
        pod_up, pod_down = times(pod, "up", "data"), times(pod, "down", "data")
        up_up, up_down = times(up, "up", "data"), times(up, "down", "data")
        syn, synack = times(up, "up", "syn"), times(up, "down", "synack")
        if not (pod_up and up_up and syn and synack):
            continue
        add("1 first byte in -> SYN out", syn[0] - pod_up[0])
        add("2 SYN out -> SYN-ACK in", synack[0] - syn[0])
        add("3 SYN-ACK in -> first byte out", up_up[0] - synack[0])
        for k in range(min(len(up_down), len(pod_down), 3)):
            add(f"4 server data {k} in -> out", pod_down[k] - up_down[k])
        for k in range(1, min(len(pod_up), len(up_up), 3)):
            add(f"5 client data {k} in -> out", up_up[k] - pod_up[k])
        if pod_down:
            add("9 first byte in -> last server data out", pod_down[-1] - pod_up[0])
        pod_syn = times(pod, "up", "syn")
        if pod_syn:
            add("c1 client: SYN -> first byte", pod_up[0] - pod_syn[0])
        if pod_down and len(pod_up) > 1:
            add("c2 client: server's first data -> its next data", pod_up[1] - pod_down[0])
        if up_down:
            add("s1 server: first byte -> its first data", up_down[0] - up_up[0])
    # The client's turn from one connection's last byte to the next connection's SYN.
    for pod, following in zip(pod_conns[2:-3], pod_conns[3:-2]):
        last, syn = times(pod, "down", "data"), times(following, "up", "syn")
        if last and syn:
            add("c3 client: last server data -> next SYN", syn[0] - last[-1])
    return found


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for hop, values in sorted(hops(*connections(sys.argv[1])).items()):
        values.sort()
        p90 = values[int(len(values) * 0.9)]
        print(f"{hop:48} n={len(values):5} p50={statistics.median(values):7.1f} p90={p90:7.1f}")


if __name__ == "__main__":
    main()
