"""AuthorizationPolicy path templates (`{*}`, `{**}`), issue #21: the examples of Istio's
`Operation.paths` reference, matched as Envoy's uri_template matcher does, the templates Istio
refuses refused with their reason, and templates at work in ALLOW/DENY policies."""

from __future__ import annotations

import pytest
from meshagent.common.authz import PolicySet
from meshagent.common.istio import ResourceError
from meshagent.common.pathtemplate import compile_template, is_template

from tests.unit.test_authz_table import REVIEWS, allow, deny, http, op

# (template, path, matches): Istio's examples first, then Envoy's rules around them.
MATCHES = [
    # Istio: `/foo/{*}` matches `/foo/bar` but not `/foo/bar/baz`
    ("/foo/{*}", "/foo/bar", True),
    ("/foo/{*}", "/foo/bar/baz", False),
    ("/foo/{*}", "/foo/", False),  # `{*}` is at least one character
    ("/foo/{*}", "/foo", False),
    # Istio: `/foo/{**}/` matches `/foo/bar/` and `/foo//` but not `/foo/bar`
    ("/foo/{**}/", "/foo/bar/", True),
    ("/foo/{**}/", "/foo//", True),
    ("/foo/{**}/", "/foo/bar", False),
    ("/foo/{**}/", "/foo/a/b/c/", True),
    # Istio's page also lists `/foo/bar/baz.txt` here; Envoy's regex `/foo/[..]*/` (which
    # decides in Istio) needs the trailing slash: we follow Envoy.
    ("/foo/{**}/", "/foo/bar/baz.txt", False),
    # Istio: `/foo/{*}/bar/{**}` matches `/foo/buzz/bar/` and `/foo/buzz/bar/baz`
    ("/foo/{*}/bar/{**}", "/foo/buzz/bar/", True),
    ("/foo/{*}/bar/{**}", "/foo/buzz/bar/baz", True),
    ("/foo/{*}/bar/{**}", "/foo/buzz/bar", False),
    ("/foo/{*}/bar/{**}", "/foo/a/b/bar/x", False),
    # a literal may follow `{**}` (istio's template_test: `foo/{**}/bar.tmp`)
    ("/foo/{**}/bar.tmp", "/foo/a/b/bar.tmp", True),
    ("/foo/{**}/bar.tmp", "/foo/bar.tmp", False),  # `/foo/` + `` + `/bar.tmp` needs two slashes
    ("/foo/{**}/bar.tmp", "/foo//bar.tmp", True),
    ("/foo/{**}/bar.tmp", "/foo/a/barXtmp", False),  # `.` is a literal dot
    ("/{*}/foo/{**}", "/x/foo/y/z", True),
    ("/{**}", "/", True),
    ("/{**}", "/any/thing", True),
    # the query is no part of the path; literals are case-sensitive
    ("/foo/{*}", "/foo/bar?x=/y", True),
    ("/foo/{*}", "/FOO/bar", False),
    # a segment holds RFC 3986 pchar: pct-encoded, sub-delims, `:` `@` `=`
    ("/files/{*}", "/files/a%20b", True),
    ("/files/{*}", "/files/k=v;x,y:z@h", True),
    ("/files/{*}", "/files/a*b", False),  # `*` is no pchar Envoy's matcher accepts
]


@pytest.mark.parametrize(("template", "path", "matches"), MATCHES)
def test_a_template_matches_as_envoys_uri_template_matcher(template, path, matches):
    assert is_template(template)
    assert compile_template(template)(path) is matches


REFUSED = [
    # Istio's examples of invalid templates
    ("/*/baz/{*}", "outside"),
    ("/**/baz/{*}", "outside"),
    ("/{**}/foo/{*}", "must be the last operator"),
    ("/foo/{*}.txt", "alone"),
    # and the same rules elsewhere
    ("/foo/{**}/{**}", "must be the last operator"),
    ("/foo/a{**}", "alone"),
    ("/foo/{name}/{*}", "outside"),
    ("/foo/{}/{*}", "outside"),
    ("foo/{*}", "must start with '/'"),
    ("/foo//{*}", "empty segment"),
    ("/foo bar/{*}", "RFC 3986"),
    ("/foo/{*}/a#b", "RFC 3986"),
]


@pytest.mark.parametrize(("template", "reason"), REFUSED)
def test_a_template_istio_refuses_is_refused_with_its_reason(template, reason):
    with pytest.raises(ValueError, match=reason):
        compile_template(template)


@pytest.mark.parametrize("field", ["paths", "notPaths"])
def test_the_schema_refuses_a_bad_template_naming_the_field(field):
    with pytest.raises(ResourceError) as error:
        allow("p", op(**{field: ["/ok", "/{**}/foo/{*}"]}))
    assert error.value.path == f"spec.rules[0].to[0].operation.{field}"
    assert "/{**}/foo/{*}" in error.value.message


def test_plain_values_stay_istio_string_matches():
    for value in ("/api/*", "*/info", "*", "/exact"):
        assert not is_template(value)


def test_allow_and_deny_decide_per_request_path():
    policies = PolicySet(
        [
            allow("read", op(methods=["GET"], paths=["/foo/{*}/bar", "/static/{**}"])),
            deny("no-secret", op(paths=["/foo/secret/{**}"])),
        ]
    )

    def decide(path: str) -> bool:
        return policies.evaluate(REVIEWS, http(path=path)).allowed

    assert decide("/foo/a/bar")
    assert not decide("/foo/a/b/bar")  # `{*}` is one segment
    assert decide("/static/css/site.css")
    assert not decide("/foo/secret/x")  # no ALLOW template matches it
    assert not decide("/foo/secret/bar")  # the ALLOW matches, but the DENY wins
    assert not decide("/foo/bar")  # `{*}` is not empty: `/foo/{*}/bar` needs three segments


def test_not_paths_template_excludes_the_paths_it_matches():
    policies = PolicySet([allow("all-but-admin", op(notPaths=["/api/{*}/admin"]))])

    assert policies.evaluate(REVIEWS, http(path="/api/v1/users")).allowed
    assert not policies.evaluate(REVIEWS, http(path="/api/v1/admin")).allowed
    assert policies.evaluate(REVIEWS, http(path="/api/v1/x/admin")).allowed
