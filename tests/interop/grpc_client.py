#!/usr/bin/env python3
"""gRPC interop peer: grpcio (C-core) client for the interop.Echo service.

Connects in plain text (h2c) to --target, optionally sending --authority as
the :authority header (e.g. a mesh name), runs the chosen --case (or all),
prints one JSON line per case: {"case": ..., "ok": ..., "detail": ...}, and
exits 1 if any case failed (2 on bad usage).
"""
import argparse
import json
import os
import queue
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

import echo_pb2  # noqa: E402
import echo_pb2_grpc  # noqa: E402

MAX_MESSAGE = 32 * 1024 * 1024


class CaseFailed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise CaseFailed(what)


def expect_error(fn, code):
    """Run fn, which must raise a grpc.RpcError with `code`; return the error."""
    try:
        fn()
    except grpc.RpcError as e:
        check(e.code() == code, f"expected {code.name}, got {e.code().name}: {e.details()}")
        return e
    raise CaseFailed(f"expected {code.name}, call succeeded")


def case_unary(stub, t):
    req = echo_pb2.EchoMessage(payload=os.urandom(1024), text="hello")
    resp = stub.Unary(req, timeout=t)
    check(resp.payload == req.payload and resp.text == req.text, "echo differs")
    return {"server_saw": dict(resp.metadata)}


def case_metadata(stub, t):
    resp, call = stub.Unary.with_call(
        echo_pb2.EchoMessage(text="md"), metadata=[("x-test", "abc-123")], timeout=t)
    initial = dict(call.initial_metadata())
    trailing = dict(call.trailing_metadata())
    check(initial.get("x-echo") == "abc-123", f"initial metadata x-echo missing: {initial}")
    check(trailing.get("x-trailer") == "done", f"trailing x-trailer missing: {trailing}")
    check(resp.metadata.get("x-test") == "abc-123", f"server did not see x-test: {dict(resp.metadata)}")
    return {"initial": initial, "trailing": trailing}


def case_server_stream(stub, t):
    n, size = 50, 1000
    msgs = list(stub.ServerStream(echo_pb2.StreamRequest(count=n, size=size), timeout=t))
    check(len(msgs) == n, f"got {len(msgs)} messages, want {n}")
    check([m.text for m in msgs] == [str(i) for i in range(n)], "messages out of order")
    check(all(len(m.payload) == size for m in msgs), "wrong payload size")
    return {"messages": n}


def case_client_stream(stub, t):
    sizes = [0, 1, 100, 4096, 65536, 300_000] * 3
    msgs = [echo_pb2.EchoMessage(payload=os.urandom(s)) for s in sizes]
    resp = stub.ClientStream(iter(msgs), timeout=t)
    check(resp.count == len(sizes), f"server counted {resp.count}, sent {len(sizes)}")
    check(resp.total_bytes == sum(sizes), f"server summed {resp.total_bytes}, sent {sum(sizes)}")
    return {"messages": resp.count, "bytes": resp.total_bytes}


def case_bidi(stub, t):
    # Ping-pong: the next request is only sent after the previous echo came
    # back, so a proxy that buffers a whole stream makes this time out.
    requests = queue.Queue()
    call = stub.BidiStream(iter(requests.get, None), timeout=t)
    try:
        for i in range(20):
            msg = echo_pb2.EchoMessage(text=f"ping-{i}", payload=os.urandom(i * 100))
            requests.put(msg)
            resp = next(call)
            check(resp.text == msg.text and resp.payload == msg.payload, f"echo {i} differs")
    finally:
        requests.put(None)  # half-close
    rest = list(call)
    check(not rest, f"{len(rest)} unexpected extra messages")
    check(call.code() == grpc.StatusCode.OK, f"stream ended with {call.code()}")
    return {"round_trips": 20}


def case_deadline(stub, t):
    start = time.monotonic()
    expect_error(lambda: stub.Sleep(echo_pb2.SleepRequest(millis=2000), timeout=0.3),
                 grpc.StatusCode.DEADLINE_EXCEEDED)
    elapsed = time.monotonic() - start
    check(elapsed < 1.0, f"deadline took {elapsed:.2f}s")
    return {"elapsed_s": round(elapsed, 3)}


def case_cancel(stub, t):
    # The tag makes this robust against other tests sharing the server.
    tag = uuid.uuid4().hex
    fut = stub.Sleep.future(echo_pb2.SleepRequest(millis=3000, tag=tag), timeout=t)
    time.sleep(0.2)
    check(fut.cancel(), "call had already finished when cancelled")
    check(fut.cancelled() and fut.code() == grpc.StatusCode.CANCELLED,
          f"future not cancelled: {fut.code()}")
    # The cancel must travel to the server (as RST_STREAM, through any proxy).
    start = time.monotonic()
    while time.monotonic() - start < 5.0:
        if tag in stub.Stats(echo_pb2.StatsRequest(), timeout=t).cancelled_tags:
            return {"server_saw_cancel_after_s": round(time.monotonic() - start, 3)}
        time.sleep(0.05)
    raise CaseFailed("server never saw the cancellation within 5s")


def case_health(stub, t, channel):
    health_stub = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", "interop.Echo"):
        resp = health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=t)
        check(resp.status == serving, f"service {service!r} status {resp.status}")
    expect_error(lambda: health_stub.Check(
        health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=t),
        grpc.StatusCode.NOT_FOUND)
    return {"serving": ["", "interop.Echo"]}


def case_large(stub, t):
    payload = os.urandom(16 * 1024 * 1024)
    start = time.monotonic()
    resp = stub.Unary(echo_pb2.EchoMessage(payload=payload), timeout=max(t, 30))
    check(resp.payload == payload, f"16 MiB payload changed (got {len(resp.payload)} bytes)")
    return {"bytes": len(payload), "elapsed_s": round(time.monotonic() - start, 3)}


def case_status(stub, t):
    message = "no such thing: widget/42"
    err = expect_error(lambda: stub.Fail(echo_pb2.StatusRequest(
        code=grpc.StatusCode.NOT_FOUND.value[0], message=message), timeout=t),
        grpc.StatusCode.NOT_FOUND)
    check(err.details() == message, f"message {err.details()!r}, want {message!r}")
    return {"code": "NOT_FOUND", "message": err.details()}


CASES = {
    "unary": case_unary,
    "server_stream": case_server_stream,
    "client_stream": case_client_stream,
    "bidi": case_bidi,
    "metadata": case_metadata,
    "deadline": case_deadline,
    "cancel": case_cancel,
    "health": case_health,
    "large": case_large,
    "status": case_status,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", required=True, help="host:port to dial")
    ap.add_argument("--authority", help=":authority to send, e.g. hello.demo.svc.clusterset.local:50051")
    ap.add_argument("--case", default="all", choices=[*CASES, "all"])
    ap.add_argument("--timeout", type=float, default=10.0, help="per-call deadline, seconds")
    ap.add_argument("--connect-timeout", type=float, default=5.0)
    args = ap.parse_args()

    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        # C-core honours http_proxy/grpc_proxy from the environment; the
        # target here is always the peer (or mesh) itself.
        ("grpc.enable_http_proxy", 0),
    ]
    if args.authority:
        options.append(("grpc.default_authority", args.authority))
    channel = grpc.insecure_channel(args.target, options=options)

    failed = False

    def report(case, ok, detail):
        print(json.dumps({"case": case, "ok": ok, "detail": detail}), flush=True)

    try:
        grpc.channel_ready_future(channel).result(timeout=args.connect_timeout)
    except grpc.FutureTimeoutError:
        report("connect", False, f"no connection to {args.target} within {args.connect_timeout}s")
        sys.exit(1)

    stub = echo_pb2_grpc.EchoStub(channel)
    for name in CASES if args.case == "all" else [args.case]:
        fn = CASES[name]
        try:
            extra = (channel,) if name == "health" else ()
            report(name, True, fn(stub, args.timeout, *extra))
        except CaseFailed as e:
            failed = True
            report(name, False, str(e))
        except grpc.RpcError as e:
            failed = True
            report(name, False, f"{e.code().name}: {e.details()}")
        except Exception as e:  # e.g. StopIteration: a stream ended early
            failed = True
            report(name, False, f"{type(e).__name__}: {e}")
    channel.close()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
