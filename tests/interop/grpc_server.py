#!/usr/bin/env python3
"""gRPC interop peer: grpcio (C-core) server for the interop.Echo service.

Prints {"port": N} on stdout once bound (so --port 0 works), then serves
plain-text HTTP/2 (h2c) until SIGTERM/SIGINT. Also serves grpc.health.v1.Health
with "" and "interop.Echo" SERVING.
"""
import argparse
import collections
import json
import os
import signal
import sys
import threading
import time
from concurrent import futures

# The generated stubs sit next to this file and import each other by bare name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpc  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402

import echo_pb2  # noqa: E402
import echo_pb2_grpc  # noqa: E402

MAX_MESSAGE = 32 * 1024 * 1024
CODES = {code.value[0]: code for code in grpc.StatusCode}


class Echo(echo_pb2_grpc.EchoServicer):
    def __init__(self):
        self.lock = threading.Lock()
        self.cancelled = 0
        self.deadline = 0
        self.completed = 0
        # Bounded: a long-running server behind a mesh may see many tests.
        self.cancelled_tags = collections.deque(maxlen=100)

    def Unary(self, request, context):
        md = collections.defaultdict(list)
        for key, value in context.invocation_metadata():
            if not key.endswith("-bin"):
                md[key].append(value)
        x_test = ", ".join(md.get("x-test", []))
        if x_test:
            context.send_initial_metadata([("x-echo", x_test)])
        context.set_trailing_metadata([("x-trailer", "done")])
        return echo_pb2.EchoMessage(
            payload=request.payload,
            text=request.text,
            metadata={k: ", ".join(v) for k, v in md.items()},
        )

    def ServerStream(self, request, context):
        for i in range(request.count):
            yield echo_pb2.EchoMessage(text=str(i), payload=b"s" * request.size)

    def ClientStream(self, request_iterator, context):
        count = total = 0
        for msg in request_iterator:
            count += 1
            total += len(msg.payload) + len(msg.text.encode())
        return echo_pb2.ClientStreamSummary(count=count, total_bytes=total)

    def BidiStream(self, request_iterator, context):
        # Yield each echo as soon as its request arrives (no batching), so a
        # client doing ping-pong proves the path in between streams.
        for msg in request_iterator:
            yield echo_pb2.EchoMessage(payload=msg.payload, text=msg.text)

    def Sleep(self, request, context):
        start = time.monotonic()
        end = start + request.millis / 1000.0
        # Poll is_active() rather than block, so a client cancel (RST_STREAM)
        # or an expired deadline is noticed within ~10 ms and recorded.
        while time.monotonic() < end:
            if not context.is_active():
                # Remaining time <= 0 means the deadline ended the call;
                # otherwise the client (or a proxy on its behalf) cancelled it.
                remaining = context.time_remaining()
                with self.lock:
                    if remaining is not None and remaining <= 0:
                        self.deadline += 1
                    else:
                        self.cancelled += 1
                        self.cancelled_tags.append(request.tag)
                return echo_pb2.SleepResponse()  # nobody is listening
            time.sleep(0.01)
        with self.lock:
            self.completed += 1
        slept = int((time.monotonic() - start) * 1000)
        return echo_pb2.SleepResponse(slept_millis=slept)

    def Stats(self, request, context):
        with self.lock:
            return echo_pb2.StatsResponse(
                cancelled_sleeps=self.cancelled,
                deadline_sleeps=self.deadline,
                completed_sleeps=self.completed,
                cancelled_tags=list(self.cancelled_tags),
            )

    def Fail(self, request, context):
        code = CODES.get(request.code, grpc.StatusCode.UNKNOWN)
        context.abort(code, request.message)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--bind", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--workers", type=int, default=32,
                    help="handler threads; each open stream or Sleep holds one")
    args = ap.parse_args()

    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        # Fail loudly rather than silently share a port with a stale server.
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers),
                         options=options)
    echo_pb2_grpc.add_EchoServicer_to_server(Echo(), server)

    health_servicer = health.HealthServicer()
    for service in ("", "interop.Echo"):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    host = f"[{args.bind}]" if ":" in args.bind else args.bind
    try:
        port = server.add_insecure_port(f"{host}:{args.port}")
    except RuntimeError as e:  # recent grpcio raises; older ones returned 0
        port = 0
        print(e, file=sys.stderr)
    if port == 0:
        print(json.dumps({"error": f"cannot bind {host}:{args.port}"}), flush=True)
        sys.exit(1)
    server.start()
    print(json.dumps({"port": port}), flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=0).wait()


if __name__ == "__main__":
    main()
