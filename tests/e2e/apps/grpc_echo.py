"""A stock gRPC server and client (Debian's python3-grpcio, no generated code) for the lab.

    python3 grpc_echo.py serve PORT          # meshtest.Echo/Unary and /Stream on [::]:PORT
    python3 grpc_echo.py call TARGET [SIZE]  # one unary call, one 1,000-message stream: JSON

Runs under the system Python inside lab pods, so it imports only grpc and the stdlib. The
server prints one line per call, so a test can tell whether a call reached it.
"""

from __future__ import annotations

import json
import sys
from concurrent import futures

import grpc

SERVICE = "meshtest.Echo"
STREAM_MESSAGES = 1000


def serve(port: int) -> None:
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


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        size = int(sys.argv[3]) if len(sys.argv) > 3 else 16
        print(json.dumps(call(sys.argv[2], size)))
