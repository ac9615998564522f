"""Typed schemas for the supported subset of Istio resources (AuthorizationPolicy,
PeerAuthentication, RequestAuthentication, VirtualService, DestinationRule, Telemetry).

Raw documents go in through `parse_resource` / `parse_documents`; validated immutable models
come out, or a ResourceError naming the resource and the exact field. Fields outside the subset
are refused, never ignored.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    """Imported on first use (PEP 562), so that importing one light submodule (`base`, for
    the agent's config) does not build every resource model first."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = "base" if name == "parse_duration" else "resource"
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
