"""Typed schemas for the supported subset of Istio resources (AuthorizationPolicy,
PeerAuthentication, RequestAuthentication, VirtualService, DestinationRule, Telemetry).

Raw documents go in through `parse_resource` / `parse_documents`; validated immutable models
come out, or a ResourceError naming the resource and the exact field. Fields outside the subset
are refused, never ignored.
"""

from meshagent.common.istio.base import parse_duration
from meshagent.common.istio.resource import (
    SUPPORTED_KINDS,
    IstioResource,
    ResourceError,
    ResourceSkipped,
    parse_documents,
    parse_resource,
)

__all__ = [
    "SUPPORTED_KINDS",
    "IstioResource",
    "ResourceError",
    "ResourceSkipped",
    "parse_documents",
    "parse_duration",
    "parse_resource",
]
