"""Request path normalization, as Istio's `meshConfig.pathNormalization` asks Envoy to do it.

What flows through: a request target as the client sent it goes in; the target every later step
sees comes out (authorization, VirtualService `uri` matching, the access log, and the request
forwarded upstream), or InvalidPath with a plain-words reason (the proxy answers 400). The node
proxy runs it on every HTTP request before anything reads the path, and `meshctl authz check
--path` runs the same function, so an explanation matches what traffic gets. Pure: no I/O.

Modes (https://istio.io/latest/docs/ops/best-practices/security/#path-normalization-in-authorization-policies
and https://istio.io/latest/docs/reference/config/security/normalization/), each one adding to
the one before:

- NONE: the target is left exactly as received (vulnerable to CVE-2021-31920: `/./admin`,
  `//admin` and `/%61dmin` do not match a policy on `/admin*` but reach `/admin` on most servers).
- BASE (Envoy's `normalize_path`): percent-encodings must be well formed (`%` and two hex digits)
  and not `%00`, else 400; the ones of unreserved characters (RFC 3986 section 2.3: letters,
  digits, `-` `.` `_` `~`) are decoded, the others kept with upper-case hex digits (RFC 3986
  section 6.2.2.1; Envoy keeps their case); a backslash becomes a slash; dot segments are removed
  (RFC 3986 section 5.2.4: `..` at the root stays at the root, as Envoy's default normalizer and
  the RFC do; it is not an error).
- MERGE_SLASHES: then runs of slashes become one (`//a///b` -> `/a/b`; a trailing slash stays).
- DECODE_AND_MERGE_SLASHES (our default, the strictest): first `%2F` and `%5C` (either case) are
  decoded to `/` and `\\` (so `%5C` ends up a slash too), then as MERGE_SLASHES. This is Envoy's
  `path_with_escaped_slashes_action: UNESCAPE_AND_FORWARD`.

Decoding happens once (`%252F` stays `%252F`, never `/`); the output is a fixed point (normalizing
it again changes nothing), so the destination's proxy normalizing what the source's proxy sent
is harmless. In every mode but NONE:

- the query (from the first `?`) is not part of the path and is left as received;
- a fragment (`#`) is refused: it has no business in a request target (Envoy refuses it too);
- an absolute-form target (`http://host:port/path?q`, RFC 9112 section 3.2.2) becomes its
  origin form (`/path?q`) and its authority replaces the Host header, as RFC 9112 asks of the
  receiver (otherwise `GET http://x/admin` would be matched as a path not starting with `/`);
- `*` (OPTIONS) is kept; CONNECT targets are not paths and the caller must not pass them;
- any other target not starting with `/` is refused.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import NamedTuple

__all__ = [
    "DEFAULT_MODE",
    "InvalidPath",
    "NormalizedTarget",
    "PathNormalization",
    "normalize_path",
    "normalize_target",
]


class PathNormalization(StrEnum):
    """Istio's `meshConfig.pathNormalization.normalization` values."""

    NONE = "NONE"
    BASE = "BASE"
    MERGE_SLASHES = "MERGE_SLASHES"
    DECODE_AND_MERGE_SLASHES = "DECODE_AND_MERGE_SLASHES"


DEFAULT_MODE = PathNormalization.DECODE_AND_MERGE_SLASHES


class InvalidPath(ValueError):
    """The request's path cannot be normalized; the message says why, in plain words."""


class NormalizedTarget(NamedTuple):
    target: str  # origin form: the normalized path, then "?query" as received
    authority: str | None = None  # from an absolute-form target: replaces the Host header


_HEX = "0123456789abcdefABCDEF"
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_SLASH_CODES = {0x2F: "/", 0x5C: "\\"}
_ABSOLUTE_FORM = re.compile(r"(?i:https?)://([^/?#]*)(.*)", re.DOTALL)
_SLASH_RUNS = re.compile(r"//+")


def _decode(path: str, decode_slashes: bool) -> str:
    """Check and normalize percent-encodings (one pass: decoded characters are never read
    again as the start of an encoding)."""
    out: list[str] = []
    start = 0
    i = path.find("%")
    while i >= 0:
        out.append(path[start:i])
        pair = path[i + 1 : i + 3]
        if len(pair) < 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            shown = path[i : i + 3]
            raise InvalidPath(
                f"invalid percent-encoding {shown!r} in the path: '%' must be followed by "
                "two hexadecimal digits (write '%25' for a literal '%')"
            )
        code = int(pair, 16)
        char = chr(code)
        if code == 0:
            raise InvalidPath("the path contains '%00' (an encoded NUL byte), which is refused")
        if char in _UNRESERVED:
            out.append(char)
        elif decode_slashes and code in _SLASH_CODES:
            out.append(_SLASH_CODES[code])
        else:
            out.append("%" + pair.upper())
        start = i + 3
        i = path.find("%", start)
    out.append(path[start:])
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4 for an absolute path: `.` segments go, `..` removes the segment
    before it (none at the root); a path ending in a dot segment keeps its trailing slash."""
    segments = path.split("/")[1:]
    last = len(segments) - 1
    out: list[str] = []
    for index, segment in enumerate(segments):
        if segment == ".":
            pass
        elif segment == "..":
            if out:
                out.pop()
        else:
            out.append(segment)
            continue
        if index == last:
            out.append("")  # "/a/." -> "/a/", "/a/b/.." -> "/a/"
    return "/" + "/".join(out)


def normalize_path(path: str, mode: PathNormalization = DEFAULT_MODE) -> str:
    """Normalize an absolute path (no query) per `mode`. Raises InvalidPath."""
    if mode is PathNormalization.NONE:
        return path
    if not path.startswith("/"):
        raise InvalidPath(f"the path {path[:64]!r} does not start with '/'")
    if "#" in path:
        raise InvalidPath("the request target contains a fragment ('#'), which is refused")
    if "%" in path:
        path = _decode(path, mode is PathNormalization.DECODE_AND_MERGE_SLASHES)
    if "\\" in path:
        path = path.replace("\\", "/")
    if "/." in path:
        path = _remove_dot_segments(path)
    if mode is not PathNormalization.BASE and "//" in path:
        path = _SLASH_RUNS.sub("/", path)
    return path


def normalize_target(target: str, mode: PathNormalization = DEFAULT_MODE) -> NormalizedTarget:
    """Normalize a request target (origin form, absolute form or `*`) per `mode`: the path is
    normalized, the query left as received. Raises InvalidPath."""
    if mode is PathNormalization.NONE or target == "*":
        return NormalizedTarget(target)
    authority = None
    if not target.startswith("/"):
        absolute = _ABSOLUTE_FORM.fullmatch(target)
        if absolute is None:
            raise InvalidPath(
                f"the request target {target[:64]!r} is neither a path starting with '/' "
                "nor an absolute http:// URL"
            )
        authority, target = absolute.group(1), absolute.group(2)
        if not authority:
            raise InvalidPath("the absolute URL in the request target has no host")
        if not target.startswith("/"):
            target = "/" + target  # "http://h" and "http://h?q" name the root
    cut = target.find("?")
    if cut < 0:
        return NormalizedTarget(normalize_path(target, mode), authority)
    if "#" in target:
        raise InvalidPath("the request target contains a fragment ('#'), which is refused")
    return NormalizedTarget(normalize_path(target[:cut], mode) + target[cut:], authority)
