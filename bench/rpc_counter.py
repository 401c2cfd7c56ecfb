"""A loopback proxy in front of the Firestore emulator that counts the RPCs passing through it.

Usage: rpc_counter.py UPSTREAM_HOST:PORT

It prints its own address (``127.0.0.1:PORT``) on the first line of stdout.
For each line ``count`` on stdin, it prints the number of RPCs forwarded so
far. It exits at the end of stdin. The proxy is tests/tcp_proxy.py, which
counts one RPC per HTTP/2 stream that a client opens. It runs in a process of
its own so that its forwarding threads do not compete for the GIL with the
benchmark's clients.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tcp_proxy import TcpProxy  # found through the path set above


def main(upstream: str) -> int:
    with TcpProxy(upstream) as proxy:
        print(proxy.address, flush=True)
        for line in sys.stdin:
            if line.strip() == "count":
                print(proxy.requests, flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: rpc_counter.py UPSTREAM_HOST:PORT", file=sys.stderr)
        sys.exit(64)
    sys.exit(main(sys.argv[1]))
