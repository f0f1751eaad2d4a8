#!/usr/bin/env python3
"""WebSocket interop peer: client for ws_server.py, built on `websockets`.

Opens the TCP connection itself (to --connect-to, else to the URL's host:port)
and hands the socket to websockets, so the Host header can name a mesh service
while the bytes go to an IP: the Host header is the URL's host:port, or --host.
Sends "whoami" first, then --messages text and binary messages (one of them a
1 MiB binary frame), spread over --seconds, and checks every echo. Prints one
JSON summary line and exits 1 on any failure.
"""
import argparse
import asyncio
import json
import os
import socket
import sys
import time
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import connect

MAX_MESSAGE = 32 * 1024 * 1024
BIG = 1024 * 1024


def split_host_port(value, default_port):
    """'1.2.3.4:80' / '[::1]:80' / 'name' -> (host, port)."""
    u = urlsplit("//" + value)
    return u.hostname, u.port or default_port


def message(i):
    """The i-th message: alternating text and binary; message 1 is 1 MiB."""
    if i % 2 == 0:
        return f"text-{i}-" + os.urandom(8).hex()
    return os.urandom(BIG if i == 1 else 64 * i)


async def run(args, summary):
    url = urlsplit(args.url)
    if url.scheme != "ws":
        raise ValueError("only ws:// URLs are supported")
    dial = split_host_port(args.connect_to or url.netloc, 80)
    uri = urlunsplit(url._replace(netloc=args.host)) if args.host else args.url
    host = f"[{dial[0]}]" if ":" in dial[0] else dial[0]
    summary.update(dial=f"{host}:{dial[1]}", uri=uri)

    sock = socket.create_connection(dial, timeout=args.timeout)
    # sock= also disables websockets' own proxy lookup from the environment.
    async with connect(uri, sock=sock, max_size=MAX_MESSAGE,
                       open_timeout=args.timeout, close_timeout=args.timeout) as ws:
        await ws.send("whoami")
        seen = json.loads(await asyncio.wait_for(ws.recv(), args.timeout))
        summary["server_saw"] = seen
        for spec in args.expect_header:
            name, _, want = spec.partition("=")
            got = seen["headers"].get(name.lower())
            if got is None or (want and got != want):
                raise AssertionError(f"server saw {name}: {got!r}, want {want or 'present'!r}")

        interval = args.seconds / args.messages if args.messages else 0
        start = time.monotonic()
        for i in range(args.messages):
            sent = message(i)
            await ws.send(sent)
            got = await asyncio.wait_for(ws.recv(), args.timeout)
            if type(got) is not type(sent) or got != sent:
                raise AssertionError(f"echo {i} differs ({type(sent).__name__} "
                                     f"{len(sent)} sent, {type(got).__name__} {len(got)} back)")
            summary["echoed"] += 1
            summary["bytes"] += len(sent)
            # Pace against the start time so slow echoes don't stretch the run.
            await asyncio.sleep(max(0.0, start + (i + 1) * interval - time.monotonic()))
        summary["elapsed_s"] = round(time.monotonic() - start, 3)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", required=True, help="ws://host:port/path")
    ap.add_argument("--host", help="Host header to send instead of the URL's host:port")
    ap.add_argument("--connect-to", help="ip:port to dial instead of the URL's host:port")
    ap.add_argument("--messages", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=0.0,
                    help="spread the messages over this long")
    ap.add_argument("--expect-header", action="append", default=[], metavar="NAME[=VALUE]",
                    help="fail unless the server saw this handshake header")
    ap.add_argument("--timeout", type=float, default=10.0, help="per step, seconds")
    args = ap.parse_args()
    if args.messages < 2:
        ap.error("--messages must be at least 2 (message 1 is the 1 MiB frame)")

    summary = {"ok": False, "echoed": 0, "bytes": 0}
    try:
        asyncio.run(run(args, summary))
        summary["ok"] = True
    except Exception as e:
        summary["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(summary), flush=True)
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
