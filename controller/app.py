"""The controller process: a source feeding the model, validation, the push server, and 15014.

Everything runs in one nursery; `serve_controller` says started once the agent
port listens and the source has delivered its first full view (validated, so
`/status` lists rejected resources from the start).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import prometheus_client
import trio
from meshagent.common.httpserve import Response, json_response, serve_http
from meshagent.controller.model import ClusterModel
from meshagent.controller.push import PushServer
from meshagent.controller.sources.files import FileSource
from meshagent.controller.validation import Validator, reason, resource_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControllerSettings:
    listen_host: str = "0.0.0.0"
    listen_port: int = 15012
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 15014
    manifest_dir: Path | None = None


class Controller:
    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = settings
        self.model = ClusterModel()
        self.push = PushServer(self.model)
        self.files: FileSource | None = None
        self.validator = Validator()

    def status(self) -> dict:
        return {
            "generation": self.model.generation,
            "agents": [
                s.as_dict() for s in sorted(self.push.sessions.values(), key=lambda s: s.node)
            ],
            "rejected": self.rejected(),
        }

    def rejected(self) -> list[dict[str, str]]:
        """Manifest files that do not parse (no field path: the whole file is kept out), then
        Istio resources refused by validation, with the field at fault."""
        files = sorted((self.files.errors if self.files else {}).items())
        return [{"resource": file, "path": "", "reason": why} for file, why in files] + [
            {"resource": resource_name(e), "path": e.path, "reason": reason(e)}
            for e in self.validator.rejected
        ]

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        async with trio.open_nursery() as nursery:
            if s.manifest_dir is not None:
                self.files = FileSource(s.manifest_dir, self.model)
                await nursery.start(self.files.serve)
            await nursery.start(self.validator.serve, self.model)
            await nursery.start(self.push.serve, s.listen_host, s.listen_port)

            async def status(_query: str) -> Response:
                return json_response(json.dumps(self.status(), indent=2))

            async def metrics(_query: str) -> Response:
                return Response(
                    200, prometheus_client.generate_latest(), prometheus_client.CONTENT_TYPE_LATEST
                )

            routes = {"/status": status, "/metrics": metrics}
            await nursery.start(serve_http, s.metrics_host, s.metrics_port, routes)
            log.info("controller serving agents on %s:%d", s.listen_host, s.listen_port)
            task_status.started()
