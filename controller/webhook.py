"""The admission webhook: `kubectl apply` of an Istio resource the controller would refuse
fails at once, naming the field.

The API server sends an AdmissionReview (`admission.k8s.io/v1`) for every CREATE and UPDATE
of the four supported kinds (AuthorizationPolicy, PeerAuthentication, VirtualService,
DestinationRule; daemonset/base/webhook.yaml, ValidatingWebhookConfiguration
`meshagent-validation`) to ``POST /validate`` over HTTPS; the object goes through the same
`parse_resource` as the controller's own validation, so the webhook and `meshctl status`
give the same message. A refusal answers ``allowed: false`` with status 422 and a message
that starts with the field path, e.g. ``spec.foo: field is not supported by meshagent ...``;
kubectl prints it after ``admission webhook "validation.meshagent.io" denied the request:``.
A resource the mesh skips (bound to gateways only, narrow `exportTo`, hosts outside the
cluster) is allowed with an admission warning saying why, which kubectl prints as `Warning:`.

Every replica serves it (validation needs no state, so followers answer too). The serving
certificate is issued by the controller's CA (`StreamCertificate`, renewed at half life) for
the Service's names (``meshctl.<namespace>.svc``) and any ``--server-name``; the API server
trusts it through the configuration's ``caBundle``, which `keep_ca_bundle` sets to the
mesh root at start and keeps so (the configuration is applied without one), as istiod does;
with several replicas only the leader writes it.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import httpx2
import trio
from lightkube import ApiError, AsyncClient
from lightkube.resources.admissionregistration_v1 import ValidatingWebhookConfiguration
from lightkube.types import PatchType
from meshagent.common.httpserve import Request, Response, json_response, serve_http
from meshagent.common.istio import (
    SUPPORTED_KINDS,
    ResourceError,
    ResourceSkipped,
    parse_resource,
)
from meshagent.controller.validation import DEFAULT_NAMESPACE

if TYPE_CHECKING:
    from meshagent.controller.leader import LeaderElector

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/validate"
WEBHOOK_CONFIGURATION = "meshagent-validation"
WEBHOOK_PORT = 15017  # istiod's webhook port, behind the Service's 443
ADMISSION_API_VERSION = "admission.k8s.io/v1"
# An AdmissionReview carries the object (and the old one on UPDATE); Istio resources are
# small, but managedFields grow: allow the API server's own request limit for one object.
MAX_REVIEW_BYTES = 3 * 1024 * 1024
CA_BUNDLE_RECHECK = 60.0
CA_BUNDLE_RETRY = 5.0
INVALID = 422  # what the API server itself answers for an invalid object


def review_response(review: Any, entry_hosts: Collection[str] = ()) -> dict[str, Any]:
    """The AdmissionReview to answer ``review`` with (``entry_hosts``: those the cluster's
    ServiceEntries declare, see `judge`). Raises ValueError when ``review`` is not an
    AdmissionReview request (the server answers that with 400)."""
    if not isinstance(review, Mapping) or review.get("kind") != "AdmissionReview":
        raise ValueError("not an AdmissionReview")
    if review.get("apiVersion") != ADMISSION_API_VERSION:
        raise ValueError(f"unsupported AdmissionReview version {review.get('apiVersion')!r}")
    request = review.get("request")
    if not isinstance(request, Mapping) or not isinstance(request.get("uid"), str):
        raise ValueError("AdmissionReview without a request uid")
    response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
    warning: list[str] = []
    refusal = judge(request, warning, entry_hosts)
    if warning:
        response["warnings"] = warning
    if refusal is not None:
        response["allowed"] = False
        response["status"] = {
            "code": INVALID,
            "reason": "Invalid",
            "message": refusal,
        }
    return {"apiVersion": ADMISSION_API_VERSION, "kind": "AdmissionReview", "response": response}


def judge(
    request: Mapping[str, Any],
    warnings: list[str] | None = None,
    entry_hosts: Collection[str] = (),
) -> str | None:
    """Why the admission request must be refused, None to allow it. A VirtualService or
    DestinationRule naming a host of ``entry_hosts`` (the ServiceEntries the controller's
    model holds) is applied, not warned about as skipped.

    Only CREATE and UPDATE of a supported kind are judged: a DELETE (no object), a kind
    outside the subset or a subresource (status) is allowed, as the configuration's rules
    should not send them anyway."""
    if request.get("operation") not in ("CREATE", "UPDATE") or request.get("subResource"):
        return None
    obj = request.get("object")
    if not isinstance(obj, Mapping) or obj.get("kind") not in SUPPORTED_KINDS:
        return None
    namespace = request.get("namespace") or DEFAULT_NAMESPACE
    if isinstance(obj.get("metadata"), Mapping) and not obj["metadata"].get("name"):
        # generateName: the server names the object after admission; judge it by its prefix
        prefix = obj["metadata"].get("generateName") or "generated"
        obj = {**obj, "metadata": {**obj["metadata"], "name": f"{prefix}x"}}
    try:
        parse_resource(obj, namespace, entry_hosts)
    except ResourceSkipped as exc:
        if warnings is not None:
            warnings.append(f"meshagent skips this resource: {exc.path}: {exc.message}")
        return None
    except ResourceError as exc:
        return "; ".join(
            f"{path}: {message}" if path else message for path, message in exc.problems
        )
    return None


async def handle_review(
    request: Request, entry_hosts: Callable[[], Collection[str]] = frozenset
) -> Response:
    """``POST /validate``: an AdmissionReview in, an AdmissionReview out."""
    try:
        review = json.loads(request.body)
        answer = review_response(review, entry_hosts())
    except (ValueError, UnicodeDecodeError) as exc:
        return Response(400, f"bad AdmissionReview: {exc}\n".encode())
    refused = not answer["response"]["allowed"]
    if refused:
        req = review["request"]
        log.info(
            "admission refused %s %s/%s: %s",
            (req.get("kind") or {}).get("kind", "?"),
            req.get("namespace") or DEFAULT_NAMESPACE,
            req.get("name") or "?",
            answer["response"]["status"]["message"],
        )
    return json_response(json.dumps(answer))


async def serve_webhook(
    host: str,
    port: int,
    context: Any,
    *,
    entry_hosts: Callable[[], Collection[str]] = frozenset,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``POST /validate`` over TLS (``context``: an `ssl.SSLContext`, e.g. a
    `StreamCertificate`'s) on host:port until cancelled; says started with the TCP listeners
    (so a caller of port 0 learns the port)."""
    sockets = list(await trio.open_tcp_listeners(port, host=host))
    listeners = [trio.SSLListener(s, context, https_compatible=True) for s in sockets]
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_http(
                listeners,
                {},
                post_routes={WEBHOOK_PATH: partial(handle_review, entry_hosts=entry_hosts)},
                max_body=MAX_REVIEW_BYTES,
                task_status=task_status,
            )
        )
        log.info("admission webhook serving on %s:%d%s", host, port, WEBHOOK_PATH)
        task_status.started(sockets)


def webhook_names(namespace: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The names the webhook certificate carries: the Service's (what the API server dials
    through ``clientConfig.service``) and any other name or IP given."""
    names = [f"meshctl.{namespace}.svc", f"meshctl.{namespace}.svc.cluster.local", *extra]
    return tuple(dict.fromkeys(names))


def ca_bundle_patch(current: Any, pem: str) -> dict[str, Any] | None:
    """The strategic merge patch that sets every webhook's ``clientConfig.caBundle`` of
    ``current`` (a ValidatingWebhookConfiguration) to ``pem``; None when all already have it."""
    bundle = base64.b64encode(pem.encode()).decode()
    patches = []
    for webhook in current.webhooks or []:
        have = webhook.clientConfig.caBundle if webhook.clientConfig else None
        if have != bundle:
            patches.append({"name": webhook.name, "clientConfig": {"caBundle": bundle}})
    return {"webhooks": patches} if patches else None


async def keep_ca_bundle(
    client: AsyncClient,
    pem: str,
    name: str = WEBHOOK_CONFIGURATION,
    *,
    leader: LeaderElector | None = None,
    retry: float = CA_BUNDLE_RETRY,
    recheck: float = CA_BUNDLE_RECHECK,
) -> None:
    """Keep the caBundle of ValidatingWebhookConfiguration ``name`` equal to the mesh root
    ``pem`` (re-applying the manifest, which carries none, would clear it); never returns.
    A missing configuration is logged once and looked for again. With ``leader``, only
    while this replica leads: followers serve the webhook but write nothing."""
    missing_logged = False
    while True:
        if leader is not None and not leader.is_leader:
            with trio.move_on_after(retry):
                await leader.wait_changed()
            continue
        wait = recheck
        try:
            current = await client.get(ValidatingWebhookConfiguration, name)
            patch = ca_bundle_patch(current, pem)
            if patch is not None:
                await client.patch(
                    ValidatingWebhookConfiguration, name, patch, patch_type=PatchType.STRATEGIC
                )
                log.info("set the caBundle of ValidatingWebhookConfiguration %s", name)
            missing_logged = False
        except ApiError as exc:
            wait = retry
            if exc.status is not None and exc.status.code == 404:
                if not missing_logged:
                    log.warning(
                        "ValidatingWebhookConfiguration %s does not exist: no admission"
                        " check (apply daemonset/)",
                        name,
                    )
                    missing_logged = True
                wait = recheck
            else:
                log.warning("setting the caBundle of %s: %s", name, exc)
        except httpx2.HTTPError as exc:
            wait = retry
            log.warning("setting the caBundle of %s: %s", name, exc)
        await trio.sleep(wait)
