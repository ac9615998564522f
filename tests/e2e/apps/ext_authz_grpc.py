"""A small gRPC ext-authz server (Envoy's envoy.service.auth.v3.Authorization/Check), as
Istio's sample (samples/extauthz) answers it: a request with `x-ext-authz: allow` is allowed,
with `x-ext-authz-check-result: allowed` and `x-ext-authz-source: <the source principal it was
told>` set on the request going on and `x-strip-me` removed; any other is denied with 403,
`x-ext-authz-check-result: denied` and a body saying why.

    python3 ext_authz_grpc.py PORT

Runs under the system Python with Debian's python3-grpcio; the messages are the mesh's own
declaration of Envoy's protos (common/extauthzproto.py), loaded by path.
"""

from __future__ import annotations

import importlib.util
import sys
from concurrent import futures
from pathlib import Path

import grpc

_PROTO = Path(__file__).resolve().parents[3] / "common" / "extauthzproto.py"
_spec = importlib.util.spec_from_file_location("extauthzproto", _PROTO)
proto = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(proto)

PERMISSION_DENIED = 7


def check(request, context):
    http = request.attributes.request.http
    headers = {h.key: h.value for h in http.headers}
    response = proto.CheckResponse()
    if headers.get("x-ext-authz") == "allow":
        response.status.code = 0
        for key, value in (
            ("x-ext-authz-check-result", "allowed"),
            ("x-ext-authz-source", request.attributes.source.principal),
            ("x-ext-authz-path", http.path),
        ):
            option = response.ok_response.headers.add()
            option.header.key, option.header.value = key, value
        response.ok_response.headers_to_remove.append("x-strip-me")
    else:
        response.status.code = PERMISSION_DENIED
        denied = response.denied_response
        denied.status.code = 403
        option = denied.headers.add()
        option.header.key, option.header.value = "x-ext-authz-check-result", "denied"
        denied.body = "denied by ext_authz for not found header `x-ext-authz: allow`"
    return response


def main() -> None:
    handler = grpc.method_handlers_generic_handler(
        "envoy.service.auth.v3.Authorization",
        {
            "Check": grpc.unary_unary_rpc_method_handler(
                check,
                request_deserializer=proto.CheckRequest.FromString,
                response_serializer=proto.CheckResponse.SerializeToString,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"[::]:{int(sys.argv[1])}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
