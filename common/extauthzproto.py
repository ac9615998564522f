"""The messages of Envoy's gRPC ext_authz check API (envoy.service.auth.v3.Authorization/Check),
the parts the mesh sends and reads, declared once with protobuf's descriptor API.

Field names and numbers are those of Envoy's protos (envoy/service/auth/v3/external_auth.proto,
attribute_context.proto, envoy/config/core/v3/base.proto and address.proto,
envoy/type/v3/http_status.proto, google/rpc/status.proto), so any ext_authz server (OPA's Envoy
plugin, Istio's sample) parses what we send and we parse what it answers; fields we neither set
nor read are left out, which protobuf's wire format allows. Only `google.protobuf` is imported:
this file also serves the test's provider under Debian's python3-protobuf (tests/e2e/apps).
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"

_T = descriptor_pb2.FieldDescriptorProto
_STRING, _INT32, _UINT32, _BOOL, _MESSAGE = (
    _T.TYPE_STRING,
    _T.TYPE_INT32,
    _T.TYPE_UINT32,
    _T.TYPE_BOOL,
    _T.TYPE_MESSAGE,
)
_REPEATED, _OPTIONAL = _T.LABEL_REPEATED, _T.LABEL_OPTIONAL

# message name -> [(field name, number, type, message type or "", repeated)]
_MESSAGES: dict[str, list[tuple[str, int, int, str, bool]]] = {
    "google.rpc.Status": [("code", 1, _INT32, "", False), ("message", 2, _STRING, "", False)],
    "google.protobuf.BoolValue": [("value", 1, _BOOL, "", False)],
    "envoy.type.v3.HttpStatus": [("code", 1, _INT32, "", False)],
    "envoy.config.core.v3.HeaderValue": [
        ("key", 1, _STRING, "", False),
        ("value", 2, _STRING, "", False),
    ],
    "envoy.config.core.v3.HeaderValueOption": [
        ("header", 1, _MESSAGE, "envoy.config.core.v3.HeaderValue", False),
        ("append", 2, _MESSAGE, "google.protobuf.BoolValue", False),
    ],
    "envoy.config.core.v3.SocketAddress": [
        ("address", 2, _STRING, "", False),
        ("port_value", 3, _UINT32, "", False),
    ],
    "envoy.config.core.v3.Address": [
        ("socket_address", 1, _MESSAGE, "envoy.config.core.v3.SocketAddress", False),
    ],
    # Envoy's `map<string, string> headers`: on the wire a map is its repeated entries
    "envoy.service.auth.v3.HeaderEntry": [
        ("key", 1, _STRING, "", False),
        ("value", 2, _STRING, "", False),
    ],
    "envoy.service.auth.v3.Peer": [
        ("address", 1, _MESSAGE, "envoy.config.core.v3.Address", False),
        ("principal", 4, _STRING, "", False),
    ],
    "envoy.service.auth.v3.HttpRequest": [
        ("id", 1, _STRING, "", False),
        ("method", 2, _STRING, "", False),
        ("headers", 3, _MESSAGE, "envoy.service.auth.v3.HeaderEntry", True),
        ("path", 4, _STRING, "", False),
        ("host", 5, _STRING, "", False),
        ("scheme", 6, _STRING, "", False),
        ("protocol", 10, _STRING, "", False),
    ],
    "envoy.service.auth.v3.Request": [
        ("http", 2, _MESSAGE, "envoy.service.auth.v3.HttpRequest", False),
    ],
    "envoy.service.auth.v3.AttributeContext": [
        ("source", 1, _MESSAGE, "envoy.service.auth.v3.Peer", False),
        ("destination", 2, _MESSAGE, "envoy.service.auth.v3.Peer", False),
        ("request", 4, _MESSAGE, "envoy.service.auth.v3.Request", False),
    ],
    "envoy.service.auth.v3.CheckRequest": [
        ("attributes", 1, _MESSAGE, "envoy.service.auth.v3.AttributeContext", False),
    ],
    "envoy.service.auth.v3.DeniedHttpResponse": [
        ("status", 1, _MESSAGE, "envoy.type.v3.HttpStatus", False),
        ("headers", 2, _MESSAGE, "envoy.config.core.v3.HeaderValueOption", True),
        ("body", 3, _STRING, "", False),
    ],
    "envoy.service.auth.v3.OkHttpResponse": [
        ("headers", 2, _MESSAGE, "envoy.config.core.v3.HeaderValueOption", True),
        ("headers_to_remove", 5, _STRING, "", True),
    ],
    "envoy.service.auth.v3.CheckResponse": [
        ("status", 1, _MESSAGE, "google.rpc.Status", False),
        ("denied_response", 2, _MESSAGE, "envoy.service.auth.v3.DeniedHttpResponse", False),
        ("ok_response", 3, _MESSAGE, "envoy.service.auth.v3.OkHttpResponse", False),
    ],
}


def _classes() -> dict[str, type]:
    """The message classes, from one private descriptor pool (nothing global is touched)."""
    pool = descriptor_pool.DescriptorPool()
    by_package: dict[str, list[str]] = {}
    for full in _MESSAGES:
        package, _, _name = full.rpartition(".")
        by_package.setdefault(package, []).append(full)
    # a file per package, in dependency order (messages only refer to earlier packages or
    # their own)
    order = ["google.rpc", "google.protobuf", "envoy.type.v3", "envoy.config.core.v3"]
    order += [p for p in by_package if p not in order]
    done: list[str] = []
    for package in order:
        file = descriptor_pb2.FileDescriptorProto(
            name=f"meshagent/{package.replace('.', '/')}.proto",
            package=package,
            syntax="proto3",
            dependency=[f"meshagent/{d.replace('.', '/')}.proto" for d in done],
        )
        for full in by_package[package]:
            message = file.message_type.add(name=full.rpartition(".")[2])
            for name, number, kind, type_name, repeated in _MESSAGES[full]:
                field = message.field.add(
                    name=name,
                    number=number,
                    type=kind,
                    label=_REPEATED if repeated else _OPTIONAL,
                )
                if type_name:
                    field.type_name = f".{type_name}"
        pool.Add(file)
        done.append(package)
    make = getattr(message_factory, "GetMessageClass", None)
    if make is None:  # protobuf < 4 (Debian 12's python3-protobuf 3.21)
        make = message_factory.MessageFactory(pool).GetPrototype
    return {full: make(pool.FindMessageTypeByName(full)) for full in _MESSAGES}


_CLASSES = _classes()
CheckRequest = _CLASSES["envoy.service.auth.v3.CheckRequest"]
CheckResponse = _CLASSES["envoy.service.auth.v3.CheckResponse"]
