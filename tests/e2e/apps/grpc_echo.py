"""A stock gRPC server and client (Debian's python3-grpcio, no generated code) for the lab.

    python3 grpc_echo.py serve PORT [NAME]   # meshtest.Echo/Unary, /Stream, /Who on [::]:PORT
    python3 grpc_echo.py call TARGET [SIZE]  # one unary call, one 1,000-message stream: JSON
    python3 grpc_echo.py who TARGET N [KEY=VALUE]  # N /Who calls on one channel: {name: count}
    python3 grpc_echo.py methods TARGET      # /Unary then /Who on one channel: {method: code}
    python3 grpc_echo.py flaky TARGET N      # N /Flaky calls on one channel: {code: count}
    python3 grpc_echo.py unary TARGET        # one /Unary call: {"code": code}
    python3 grpc_echo.py stream TARGET N     # one /Stream call of N messages: {"messages": n}
    python3 grpc_echo.py busy TARGET THREADS STOP SECONDS  # /Who on one channel until STOP

/Who answers the server's NAME (default: the host name), so a test can tell which endpoint
served each call of one channel; KEY=VALUE is sent as call metadata. /Flaky fails with
UNAVAILABLE every other time a server is called (a one-shot failure a retry overcomes).

Runs under the system Python inside lab pods, so it imports only grpc and the stdlib. The
server prints one line per call, so a test can tell whether a call reached it. `busy` keeps
one channel busy (THREADS callers, each call bounded to 10 s) until the file STOP exists or
SECONDS pass: {"ok": {name: count}, "failed": {code: count}, "details": [the first failures]}
(a call answered OK without its message counts as failed, NO_MESSAGE).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections import Counter
from concurrent import futures

import grpc

SERVICE = "meshtest.Echo"
STREAM_MESSAGES = 1000


def serve(port: int, name: str) -> None:
    def who(request: bytes, context) -> bytes:
        return name.encode()

    flaky_calls = [0]

    def flaky(request: bytes, context) -> bytes:
        flaky_calls[0] += 1
        if flaky_calls[0] % 2:
            context.abort(grpc.StatusCode.UNAVAILABLE, "one-shot failure")
        return request

    def unary(request: bytes, context) -> bytes:
        print(f"unary {len(request)} bytes", flush=True)
        return request

    def stream(request: bytes, context):
        print("stream", flush=True)
        for i in range(int(request.decode() or "1")):
            yield b"message %d" % i

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Who": grpc.unary_unary_rpc_method_handler(who),
            "Flaky": grpc.unary_unary_rpc_method_handler(flaky),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"[::]:{port}")
    server.start()
    print(f"serving on {port}", flush=True)
    server.wait_for_termination()


def call(target: str, size: int) -> dict:
    with grpc.insecure_channel(target) as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        stream = channel.unary_stream(f"/{SERVICE}/Stream")
        try:
            payload = b"x" * size
            echoed = unary(payload, timeout=10)
            messages = list(stream(str(STREAM_MESSAGES).encode(), timeout=10))
        except grpc.RpcError as exc:
            return {"error": exc.code().name, "details": exc.details()}
    return {
        "unary_intact": echoed == payload,
        "stream_messages": len(messages),
        "stream_intact": messages == [b"message %d" % i for i in range(STREAM_MESSAGES)],
    }


def who(target: str, count: int, metadata: tuple) -> dict:
    names: Counter = Counter()
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(f"/{SERVICE}/Who")
        for _ in range(count):
            try:
                names[call(b"", timeout=10, metadata=metadata).decode()] += 1
            except grpc.RpcError as exc:
                names[f"error:{exc.code().name}"] += 1
    return dict(names)


def flaky(target: str, count: int) -> dict:
    codes: Counter = Counter()
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(f"/{SERVICE}/Flaky")
        for _ in range(count):
            try:
                call(b"x", timeout=10)
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
    return dict(codes)


def one_call(target: str, stream_messages: int | None) -> dict:
    """One /Unary call, or one /Stream call asking for `stream_messages` messages."""
    with grpc.insecure_channel(target) as channel:
        try:
            if stream_messages is None:
                channel.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=10)
                return {"code": "OK"}
            call = channel.unary_stream(f"/{SERVICE}/Stream")
            return {"messages": len(list(call(str(stream_messages).encode(), timeout=10)))}
        except grpc.RpcError as exc:
            return {"code": exc.code().name}


def busy(target: str, threads: int, stop: str, seconds: float) -> dict:
    ok: Counter = Counter()
    failed: Counter = Counter()
    details: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    with grpc.insecure_channel(target) as channel:
        who = channel.unary_unary(f"/{SERVICE}/Who")

        def caller() -> None:
            while time.monotonic() < deadline and not os.path.exists(stop):
                try:
                    reply = who(b"", timeout=10)
                except grpc.RpcError as exc:
                    code, detail = exc.code().name, exc.details()
                else:
                    if isinstance(reply, bytes):
                        with lock:
                            ok[reply.decode()] += 1
                        continue
                    # status OK without the response message (a lost DATA frame): a failure
                    code, detail = "NO_MESSAGE", repr(reply)
                with lock:
                    failed[code] += 1
                    if len(details) < 20:
                        details.append(f"{time.time():.3f} {code}: {detail}")

        running = [threading.Thread(target=caller) for _ in range(threads)]
        for t in running:
            t.start()
        for t in running:
            t.join()
    return {"ok": dict(ok), "failed": dict(failed), "details": details}


def methods(target: str) -> dict:
    codes = {}
    with grpc.insecure_channel(target) as channel:
        for method in ("Unary", "Who"):
            try:
                channel.unary_unary(f"/{SERVICE}/{method}")(b"x", timeout=10)
                codes[method] = "OK"
            except grpc.RpcError as exc:
                codes[method] = exc.code().name
    return codes


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else socket.gethostname())
    elif sys.argv[1] == "who":
        pairs = [arg.split("=", 1) for arg in sys.argv[4:]]
        print(json.dumps(who(sys.argv[2], int(sys.argv[3]), tuple(map(tuple, pairs)))))
    elif sys.argv[1] == "flaky":
        print(json.dumps(flaky(sys.argv[2], int(sys.argv[3]))))
    elif sys.argv[1] == "methods":
        print(json.dumps(methods(sys.argv[2])))
    elif sys.argv[1] == "unary":
        print(json.dumps(one_call(sys.argv[2], None)))
    elif sys.argv[1] == "busy":
        target, threads, stop, seconds = sys.argv[2:6]
        print(json.dumps(busy(target, int(threads), stop, float(seconds))))
    elif sys.argv[1] == "stream":
        print(json.dumps(one_call(sys.argv[2], int(sys.argv[3]))))
    else:
        size = int(sys.argv[3]) if len(sys.argv) > 3 else 16
        print(json.dumps(call(sys.argv[2], size)))
