"""Trust-domain migration for authorization principals, as Istio's `meshConfig.trustDomainAliases`.

The mesh's trust domain and its aliases are one bundle: a workload `td1/ns/foo/sa/bar` is treated
as `td2/ns/foo/sa/bar` for every alias `td2` (Istio's reference, MeshConfig `trustDomainAliases`,
and task https://istio.io/latest/docs/tasks/security/authorization/authz-td-migration/). Istio
does not compare trust domains loosely at match time: istiod rewrites each policy principal
(`principals`, `notPrincipals`, the `source.principal` condition) into one principal per
trust domain of the bundle, and the proxy matches those exactly. `expand_principals` is that
rewrite, written after Istio's pilot/pkg/security/trustdomain `ReplaceTrustDomainAliases`:

- a principal whose trust domain is exactly `*` (`*/ns/foo/sa/bar`), or that is not of the
  form `<td>/ns/<ns>/sa/<sa>` (`*`, `*sa/bar`), does not name a trust domain: kept as it is;
- a principal whose trust domain is in the bundle (a `*x` or `x*` pattern on either side
  counts), or is `cluster.local` (which always means "the mesh's own domain"), becomes one
  principal per trust domain of the bundle, the mesh's first; a pattern such as `*-td` is kept
  as written for the trust domains it already matches, and duplicates are dropped;
- any other principal (a trust domain neither the mesh's nor an alias) is kept as it is, so
  it matches only peers of that very domain.

So with no alias and the default trust domain nothing changes, and a mesh whose trust domain is
not `cluster.local` still honours policies written for `cluster.local`, as Istio does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from meshagent.common.spiffe import DEFAULT_TRUST_DOMAIN

__all__ = ["expand_principals"]

_PARTS = 5  # <td>/ns/<namespace>/sa/<service-account>


def expand_principals(principals: Iterable[str], trust_domains: Sequence[str]) -> tuple[str, ...]:
    """``principals`` rewritten for ``trust_domains`` (the mesh's own first, then its aliases)."""
    out: list[str] = []
    for principal in principals:
        parts = principal.split("/")
        if len(parts) != _PARTS or parts[0] == "*":
            out.append(principal)  # no trust domain enforced
            continue
        domain = parts[0]
        if domain != DEFAULT_TRUST_DOMAIN and not any(_match(domain, t) for t in trust_domains):
            out.append(principal)
            continue
        rewritten: list[str] = []
        for trust_domain in trust_domains:
            if _suffix(trust_domain, domain):  # `*-td` already matches this domain
                candidate = principal
            else:
                candidate = "/".join((trust_domain, *parts[1:]))
            if candidate not in rewritten:
                rewritten.append(candidate)
        out += rewritten
    return tuple(out)


def _match(a: str, b: str) -> bool:
    """Istio's trustdomain stringMatch: equal, `*`, or a prefix/suffix pattern on either side."""
    return a == b or b == "*" or _prefix(a, b) or _prefix(b, a) or _suffix(a, b) or _suffix(b, a)


def _prefix(value: str, pattern: str) -> bool:
    return pattern.endswith("*") and value.startswith(pattern[:-1])


def _suffix(value: str, pattern: str) -> bool:
    return pattern.startswith("*") and value.endswith(pattern[1:])
