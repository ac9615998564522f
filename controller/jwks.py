"""The controller fetches the JWKS of every RequestAuthentication rule, so agents never do.

As istiod does: the keys a `jwtRules[].jwksUri` names (or, without one, the `jwks_uri` of the
issuer's OpenID discovery document `<issuer>/.well-known/openid-configuration`) are fetched
here, cached, refreshed every REFRESH seconds (istiod's default
PILOT_JWT_PUB_KEY_REFRESH_INTERVAL is 20 minutes) and put into every node's snapshot
(`Snapshot.jwks`, by URL); agents verify tokens with them and make no outbound calls.

What flows through: accepted RequestAuthentications out of the cluster model in; for each
keys URL a FETCHED_KIND object back into the model (`{"metadata": {"name": url}, "jwks": text}`),
so a change of keys is a model change and reaches the agents like any other (compile_jwks
reads them). A URL that cannot be fetched (unreachable, not JSON, no usable key) is retried
every RETRY seconds with one WARNING per new problem; until it first succeeds the snapshot has
no keys for it and the agents refuse every token of that rule (fail closed); after a success,
a failed refresh keeps the last good keys (as istiod).
"""

from __future__ import annotations

import json
import logging
import math

import httpx2
import trio
from meshagent.common.istio.resource import ResourceError, parse_resource
from meshagent.common.istio.security import RequestAuthentication
from meshagent.common.jwtauth import load_keys
from meshagent.controller.model import ClusterModel

log = logging.getLogger(__name__)

FETCHED_KIND = "meshagent.io/FetchedJwks"  # internal: never read from a source
REFRESH = 20 * 60.0
RETRY = 5.0
TIMEOUT = 5.0
MAX_BYTES = 1 << 20


class FetchError(Exception):
    pass


def keys_urls(model: ClusterModel) -> set[str]:
    """The URLs the accepted RequestAuthentications need keys from."""
    urls = set()
    for obj in model.objects("RequestAuthentication"):
        try:
            resource = parse_resource(obj)
        except ResourceError:
            continue  # rejected: the validator reports it
        assert isinstance(resource, RequestAuthentication)
        urls |= {r.keys_url for r in resource.spec.jwt_rules if r.keys_url is not None}
    return urls


def compile_jwks(model: ClusterModel) -> dict[str, str]:
    """The fetched key sets for the snapshot, by URL (JwtRule.keys_url)."""
    return {
        obj["metadata"]["name"]: obj["jwks"]
        for obj in model.objects(FETCHED_KIND)
        if isinstance(obj.get("jwks"), str)
    }


async def _get_json(client: httpx2.AsyncClient, url: str) -> tuple[str, object]:
    try:
        response = await client.get(url)
    except httpx2.HTTPError as exc:
        raise FetchError(f"{type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise FetchError(f"HTTP {response.status_code}")
    if len(response.content) > MAX_BYTES:
        raise FetchError(f"larger than {MAX_BYTES} bytes")
    text = response.text
    try:
        return text, json.loads(text)
    except ValueError:
        raise FetchError("not JSON") from None


async def fetch_jwks(client: httpx2.AsyncClient, url: str) -> str:
    """The JWKS at `url` (following an OpenID discovery document to its `jwks_uri`);
    raises FetchError saying what went wrong."""
    text, doc = await _get_json(client, url)
    if url.endswith("/.well-known/openid-configuration"):
        jwks_uri = doc.get("jwks_uri") if isinstance(doc, dict) else None
        if not isinstance(jwks_uri, str):
            raise FetchError("the OpenID discovery document has no jwks_uri")
        text, doc = await _get_json(client, jwks_uri)
    if not load_keys(text):
        raise FetchError("no usable key in the JWKS")
    return text


class JwksFetcher:
    """Keeps FETCHED_KIND objects in the model in step with the keys URLs it needs."""

    def __init__(self, model: ClusterModel, *, refresh: float = REFRESH, retry: float = RETRY):
        self.model = model
        self.refresh = refresh
        self.retry = retry
        self.due: dict[str, float] = {}  # url -> when to fetch it next (trio clock)
        self.problems: dict[str, str] = {}  # url -> the last failure, logged once

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED):
        async with httpx2.AsyncClient(timeout=TIMEOUT, follow_redirects=True) as client:
            task_status.started()
            seen = -1
            while True:
                await self.run_once(client)
                wait = min(self.due.values(), default=math.inf) - trio.current_time()
                seen = self.model.generation
                with trio.move_on_after(max(wait, 0)):
                    await self.model.wait_changed(seen)

    async def run_once(self, client: httpx2.AsyncClient) -> None:
        """Fetch what is due, forget what is no longer needed."""
        wanted = keys_urls(self.model)
        for obj in list(self.model.objects(FETCHED_KIND)):
            if obj["metadata"]["name"] not in wanted:
                self.model.delete(FETCHED_KIND, obj)
        for url in set(self.due) - wanted:
            del self.due[url]
            self.problems.pop(url, None)
        now = trio.current_time()
        for url in sorted(wanted):
            if self.due.get(url, now) > now:
                continue
            try:
                text = await fetch_jwks(client, url)
            except FetchError as exc:
                self.due[url] = trio.current_time() + self.retry
                if self.problems.get(url) != str(exc):
                    self.problems[url] = str(exc)
                    kept = self.model.get(FETCHED_KIND, "", url) is not None
                    log.warning(
                        "cannot fetch JWKS %s: %s; %s",
                        url,
                        exc,
                        "keeping the keys fetched before"
                        if kept
                        else "tokens of its issuer are refused until it can be fetched",
                    )
                continue
            self.due[url] = trio.current_time() + self.refresh
            if self.problems.pop(url, None) is not None:
                log.info("fetched JWKS %s", url)
            self.model.upsert(FETCHED_KIND, {"metadata": {"name": url}, "jwks": text})
