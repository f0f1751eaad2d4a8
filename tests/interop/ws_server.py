#!/usr/bin/env python3
"""WebSocket interop peer: echo server built on the `websockets` library.

Prints {"port": N} on stdout once listening (so --port 0 works). Echoes every
text and binary message back unchanged, except the text message "whoami",
which is answered with JSON {"path": ..., "headers": {lower-name: value}} of
the handshake request it received (repeated headers joined with ", "), so a
test can check what a proxy added (e.g. x-isthmus-client-id) or rewrote (Host).
"""
import argparse
import asyncio
import json
import signal

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosedError

MAX_MESSAGE = 32 * 1024 * 1024


async def handler(ws):
    try:
        async for message in ws:
            if message == "whoami":
                headers = {}
                for name, value in ws.request.headers.raw_items():
                    name = name.lower()
                    headers[name] = f"{headers[name]}, {value}" if name in headers else value
                await ws.send(json.dumps({"path": ws.request.path, "headers": headers}))
            else:
                await ws.send(message)  # str stays a text frame, bytes binary
    except ConnectionClosedError:
        pass  # peer went away without a clean close: its problem, not ours


async def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--bind", default="127.0.0.1", help="address to listen on")
    args = ap.parse_args()

    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))

    async with serve(handler, args.bind, args.port, max_size=MAX_MESSAGE) as server:
        port = server.sockets[0].getsockname()[1]
        print(json.dumps({"port": port}), flush=True)
        await stop


if __name__ == "__main__":
    asyncio.run(main())
