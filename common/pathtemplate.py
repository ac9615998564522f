"""AuthorizationPolicy path templates (Istio 1.19+): `{*}` and `{**}` in `paths`/`notPaths`.

What flows through: a `paths` value goes in; `is_template` says whether Istio reads it as a
template, `compile_template` gives a matcher or raises ValueError saying what is wrong (the
schema refuses the policy with that reason). The matcher runs on the normalized request path
(`meshagent.common.pathnorm`), as Envoy's uri_template matcher runs on the normalized `:path`.

Istio's rules (https://istio.io/latest/docs/reference/config/security/authorization-policy/,
`Operation.paths`) and how Envoy matches what Istio hands it (Istio replaces `{*}` with `*` and
`{**}` with `**`; envoy source/extensions/path/uri_template_lib/uri_template_internal.cc):

- `{*}` matches one whole path segment of at least one character, never a `/`;
- `{**}` matches zero or more characters including `/`; no operator may follow it (literal
  segments may: `/foo/{**}/bar.tmp`);
- an operator fills its segment alone (`/foo/{*}.txt` is refused), and no `*`, `{` or `}` may
  appear outside one (`/*/baz/{*}`, `/{name}/x` are refused);
- literal segments hold RFC 3986 path characters only (Envoy refuses the template otherwise),
  and only the last segment may be empty (a trailing `/`);
- the query is not part of the match, and the whole path must match.

Istio's page says `/foo/{**}/` matches `/foo/bar/baz.txt`; Envoy's matcher, which decides in
Istio, requires the trailing `/` (`/foo/` then anything then `/`), and so does this one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MATCH_ONE = "{*}"
MATCH_ANY = "{**}"
# Envoy's kLiteral: RFC 3986 pchar without `*` (unreserved, pct-encoded, sub-delims, `:` `@`).
_LITERAL = "a-zA-Z0-9\\-._~%!$&'()+,;:@="
_LITERAL_RE = re.compile(f"[{_LITERAL}]+")
_ONE_SEGMENT = f"[{_LITERAL}]+"
_ANY_SEGMENTS = f"[{_LITERAL}/]*"


def is_template(path: str) -> bool:
    """True when Istio reads this `paths` value as a template rather than an exact, prefix or
    suffix match (it holds `{*}` or `{**}`)."""
    return MATCH_ONE in path or MATCH_ANY in path


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """A compiled template: call it with a request path (the query is ignored)."""

    template: str
    regex: re.Pattern[str]

    def __call__(self, path: str) -> bool:
        cut = path.find("?")
        return self.regex.fullmatch(path if cut < 0 else path[:cut]) is not None


def compile_template(template: str) -> PathTemplate:
    """The matcher of a path template. Raises ValueError naming the rule it breaks."""
    if not template.startswith("/"):
        raise ValueError(f"path template {template!r} must start with '/'")
    segments = template[1:].split("/")
    parts: list[str] = []
    seen_any = False
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment in (MATCH_ONE, MATCH_ANY):
            if seen_any:
                raise ValueError(
                    f"path template {template!r}: {MATCH_ANY} must be the last operator"
                )
            seen_any = segment == MATCH_ANY
            parts.append(_ANY_SEGMENTS if seen_any else _ONE_SEGMENT)
        elif MATCH_ONE in segment or MATCH_ANY in segment:
            raise ValueError(
                f"path template {template!r}: segment {segment!r} holds characters besides its "
                f"operator ({MATCH_ONE} and {MATCH_ANY} must fill a segment alone)"
            )
        elif any(c in segment for c in "*{}"):
            raise ValueError(
                f"path template {template!r}: segment {segment!r} has '*', '{{' or '}}' outside "
                f"{MATCH_ONE} / {MATCH_ANY}"
            )
        elif segment == "" and not last:
            raise ValueError(f"path template {template!r} has an empty segment ('//')")
        elif segment and not _LITERAL_RE.fullmatch(segment):
            raise ValueError(
                f"path template {template!r}: segment {segment!r} has characters a path "
                "segment cannot hold unencoded (RFC 3986 pchar)"
            )
        else:
            parts.append(re.escape(segment))
    return PathTemplate(template, re.compile("/" + "/".join(parts)))
