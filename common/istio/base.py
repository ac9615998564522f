"""Building blocks shared by the Istio resource schemas.

Wire documents (dicts from YAML manifests or the Kubernetes API) flow through these types into
immutable snake_case Python objects: the model base (camelCase aliases on the wire, unknown
fields forbidden), Kubernetes object metadata, and the field types several kinds use (ports,
durations, IP blocks, workload selectors). Forbidding unknown fields is what makes a field
outside meshagent's supported subset an error instead of silently doing nothing.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)
from pydantic.alias_generators import to_camel

DRY_RUN_ANNOTATION = "istio.io/dry-run"

# Go's strconv.ParseBool spellings: Istio parses the dry-run annotation with it.
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})

_DURATION_RE = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ms|h|m|s))+")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_MIN_DURATION = 0.001  # Istio rejects durations below 1ms (ValidateDuration)

_DNS1123_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def parse_duration(text: str) -> float:
    """Parse a duration as Istio manifests write it ("1.5s", "100ms", "2m", "1h30m") into seconds.

    Istio carries protobuf Durations as strings on the wire; operators also write Go-style
    units, so ms/s/m/h and sequences of them are accepted. Raises ValueError naming the text.
    """
    if not isinstance(text, str) or not _DURATION_RE.fullmatch(text):
        raise ValueError(
            f"invalid duration {text!r}: expected a number with a unit ms, s, m or h "
            "(for example '100ms', '1.5s', '2m')"
        )
    return sum(
        float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART_RE.findall(text)
    )


def _duration_field(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds < _MIN_DURATION:
        raise ValueError(f"duration {value!r} is too short: Istio requires at least 1ms")
    return seconds


def _port_field(value: Any) -> int:
    # Istio writes ports as strings of digits in some places and numbers in others.
    if isinstance(value, bool):
        raise ValueError(f"port must be a number from 1 to 65535, got {value!r}")
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"port must be a number from 1 to 65535, got {value!r}")
    return value


def check_ip_block(value: str) -> str:
    """Accept an IP address or CIDR block (host bits may be set, as Istio allows)."""
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR block") from None
    return value


def _dns_label(value: str) -> str:
    if not _DNS1123_LABEL_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid name: use lower-case letters, digits and '-' "
            "(at most 63 characters, starting and ending with a letter or digit)"
        )
    return value


# Seconds, parsed from a duration string; at least 1ms like Istio's own validation.
Duration = Annotated[float, BeforeValidator(_duration_field)]
# A TCP port 1..65535, given as a number or a string of digits.
Port = Annotated[int, BeforeValidator(_port_field)]
# An IP address or CIDR, kept as written; compile with ipaddress.ip_network(strict=False).
IpBlock = Annotated[str, StringConstraints(min_length=1), AfterValidator(check_ip_block)]
# Istio rejects empty strings in its match lists.
NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]
DnsLabel = Annotated[str, AfterValidator(_dns_label)]
Percent = Annotated[float, Field(ge=0, le=100)]


class IstioModel(BaseModel):
    """Base of every schema model: camelCase on the wire, snake_case in Python, strict fields."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        validate_by_alias=True,
        validate_by_name=True,
        frozen=True,
    )


class ObjectMeta(IstioModel):
    """Kubernetes object metadata. The server-managed fields are accepted (resources read from
    the Kubernetes API carry them) but not interpreted."""

    name: NonEmptyStr
    namespace: str | None = None
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: Any = None
    deletion_timestamp: Any = None
    deletion_grace_period_seconds: int | None = None
    generate_name: str | None = None
    self_link: str | None = None
    finalizers: list[str] = []
    owner_references: list[Any] = []
    managed_fields: list[Any] = []


class WorkloadSelector(IstioModel):
    """`selector.matchLabels`: the workloads (by pod labels) a policy applies to."""

    match_labels: dict[str, str] = {}

    def matches(self, labels: Any) -> bool:
        """True when every selector label is present with the same value in `labels`."""
        return all(labels.get(key) == value for key, value in self.match_labels.items())


class IstioResource(IstioModel):
    """Fields every supported Istio resource has: apiVersion, kind, metadata (and the status the
    Istio controllers write, which is accepted and ignored)."""

    API_VERSIONS: ClassVar[frozenset[str]] = frozenset()

    api_version: str
    metadata: ObjectMeta
    status: Any = None

    @field_validator("api_version")
    @classmethod
    def _check_api_version(cls, value: str) -> str:
        if value not in cls.API_VERSIONS:
            accepted = ", ".join(sorted(cls.API_VERSIONS))
            raise ValueError(
                f"apiVersion {value!r} is not supported for {cls.__name__} (use one of: {accepted})"
            )
        return value

    @field_validator("metadata")
    @classmethod
    def _check_dry_run_annotation(cls, value: ObjectMeta) -> ObjectMeta:
        if DRY_RUN_ANNOTATION in value.annotations and not cls._supports_dry_run():
            raise ValueError(
                f"annotation {DRY_RUN_ANNOTATION} is only supported on AuthorizationPolicy"
            )
        return value

    @classmethod
    def _supports_dry_run(cls) -> bool:
        return False

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        """The resource's namespace (parse_resource fills in the default when absent)."""
        return self.metadata.namespace or ""

    @property
    def ref(self) -> str:
        """ "namespace/name", the form used in logs, decisions and errors."""
        return f"{self.namespace}/{self.name}"


def parse_go_bool(value: str) -> bool | None:
    """Go's strconv.ParseBool: True/False, or None when the text is not a boolean."""
    if value in _GO_TRUE:
        return True
    if value in _GO_FALSE:
        return False
    return None
