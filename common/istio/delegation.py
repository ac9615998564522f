"""VirtualService delegation, merged as Istio merges it (pilot's mergeVirtualServicesIfNeeded):
a root VirtualService's `http[]` rule with `delegate` is replaced by the delegate's http rules,
each with the root rule's match conditions joined to its own, and the root rule's settings
(timeout, retries, fault, rewrite, headers, mirror, CORS, name) where the delegate's rule
leaves them unset. A delegate rule whose match cannot lie within the root rule's (another
exact path, a prefix outside the root's, a regex beside another uri match, another port or
source namespace) is dropped with a warning, as Istio drops it; a delegate that does not
exist drops the root rule. The data path then sees plain VirtualServices (agent/proxy/routing.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from meshagent.common.istio import networking as net

# The root rule's settings a delegate rule inherits when it has none of its own.
_INHERITED = (
    "rewrite",
    "direct_response",
    "timeout",
    "retries",
    "fault",
    "mirror",
    "mirror_percent",
    "mirror_percentage",
    "cors_policy",
    "mirrors",
    "headers",
)


def _string_conflict(root: net.StringMatch | None, leaf: net.StringMatch | None) -> bool:
    """True when no value can meet both (Istio's stringMatchConflict)."""
    if root is None or leaf is None:
        return False
    if root.regex is not None or leaf.regex is not None:
        return True  # a regex beside any other match of the same field
    if root.exact is not None:
        return leaf.exact != root.exact
    assert root.prefix is not None
    inner = leaf.prefix if leaf.prefix is not None else leaf.exact
    return inner is None or not inner.startswith(root.prefix)


def _conflict(root: net.HTTPMatchRequest, leaf: net.HTTPMatchRequest) -> bool:
    if _string_conflict(root.uri, leaf.uri) or _string_conflict(root.method, leaf.method):
        return True
    if any(_string_conflict(root.headers.get(k), v) for k, v in leaf.headers.items()):
        return True
    if root.ignore_uri_case != leaf.ignore_uri_case:
        return True
    if root.port is not None and leaf.port is not None and root.port != leaf.port:
        return True
    if root.source_namespace is not None and leaf.source_namespace != root.source_namespace:
        return True
    return any(
        k in root.source_labels and root.source_labels[k] != v
        for k, v in leaf.source_labels.items()
    )


def _joined(root: net.HTTPMatchRequest, leaf: net.HTTPMatchRequest) -> net.HTTPMatchRequest:
    """The leaf's conditions, with the root's where the leaf sets none."""
    return leaf.model_copy(
        update={
            "uri": leaf.uri or root.uri,
            "method": leaf.method or root.method,
            "headers": {**root.headers, **leaf.headers},
            "port": leaf.port if leaf.port is not None else root.port,
            "source_labels": {**root.source_labels, **leaf.source_labels},
            "source_namespace": leaf.source_namespace or root.source_namespace,
        }
    )


def _merged_matches(
    root: tuple[net.HTTPMatchRequest, ...], leaf: tuple[net.HTTPMatchRequest, ...]
) -> tuple[net.HTTPMatchRequest, ...] | None:
    """Every leaf entry joined with each root entry it can lie within; None on a conflict
    (a leaf entry within no root entry)."""
    if not root:
        return leaf
    if not leaf:
        return root
    out: list[net.HTTPMatchRequest] = []
    for entry in leaf:
        joined = [_joined(r, entry) for r in root if not _conflict(r, entry)]
        if not joined:
            return None
        out += joined
    return tuple(out)


def _merged_rule(root: net.HTTPRoute, leaf: net.HTTPRoute) -> net.HTTPRoute | None:
    matches = _merged_matches(root.match, leaf.match)
    if matches is None:
        return None
    update: dict = {"match": matches}
    if root.name:
        update["name"] = f"{root.name}-{leaf.name}" if leaf.name else root.name
    for name in _INHERITED:
        if getattr(leaf, name) in (None, ()):
            update[name] = getattr(root, name)
    return leaf.model_copy(update=update)


def merge_delegates(
    virtual_services: Iterable[net.VirtualService],
) -> tuple[list[net.VirtualService], list[str]]:
    """The VirtualServices with hosts, each root's delegating rules replaced by its delegates'
    merged rules (delegates themselves route nothing alone), and a warning per rule dropped."""
    all_vs = list(virtual_services)
    delegates = {(vs.namespace, vs.name): vs for vs in all_vs if vs.spec.is_delegate}
    out: list[net.VirtualService] = []
    warnings: list[str] = []
    for vs in all_vs:
        if vs.spec.is_delegate:
            continue
        if not any(rule.delegate is not None for rule in vs.spec.http):
            out.append(vs)
            continue
        rules: list[net.HTTPRoute] = []
        for i, rule in enumerate(vs.spec.http):
            if rule.delegate is None:
                rules.append(rule)
                continue
            key = (rule.delegate.namespace or vs.namespace, rule.delegate.name)
            delegate = delegates.get(key)
            if delegate is None:
                warnings.append(
                    f"VirtualService {vs.ref} http[{i}]: delegate {key[0]}/{key[1]} not found "
                    "(a VirtualService without hosts): the rule is ignored"
                )
                continue
            for j, leaf in enumerate(delegate.spec.http):
                merged = _merged_rule(rule, leaf)
                if merged is None:
                    warnings.append(
                        f"VirtualService {delegate.ref} http[{j}]: its match cannot lie within "
                        f"the match of {vs.ref} http[{i}] that delegates to it: ignored"
                    )
                else:
                    rules.append(merged)
        spec = vs.spec.model_copy(update={"http": tuple(rules)})
        out.append(vs.model_copy(update={"spec": spec}))
    return out, warnings
