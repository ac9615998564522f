"""The fake API server answers as kube-apiserver does where the source depends on it."""

from __future__ import annotations

import json

import httpx2
import trio

from tests.fakes.kube_apiserver import open_fake_apiserver

TIMEOUT = 10


def _pod(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "shop"}}


async def test_pages_share_one_snapshot_until_compaction() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_fake_apiserver(tls=False, token="t") as api:
            for i in range(3):
                api.create(_pod(f"p{i}"))
            auth = {"Authorization": "Bearer t"}
            async with httpx2.AsyncClient(base_url=api.url, headers=auth) as http:
                first = (await http.get("/api/v1/pods", params={"limit": 2})).json()
                api.create(_pod("later"))  # not in the snapshot being paged
                token = first["metadata"]["continue"]
                rest = (
                    await http.get("/api/v1/pods", params={"limit": 2, "continue": token})
                ).json()
                assert [i["metadata"]["name"] for i in first["items"] + rest["items"]] == [
                    "p0",
                    "p1",
                    "p2",
                ]
                assert rest["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
                assert "kind" not in first["items"][0]  # typed lists omit it

                again = await http.get("/api/v1/pods", params={"limit": 1})
                api.compact()
                token = again.json()["metadata"]["continue"]
                expired = await http.get("/api/v1/pods", params={"limit": 1, "continue": token})
                assert expired.status_code == 410
                assert expired.json()["reason"] == "Expired"


async def test_watch_from_a_compacted_version_gets_a_410_error_event() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_fake_apiserver(tls=False, token="t") as api:
            old = api.create(_pod("a"))["metadata"]["resourceVersion"]
            api.create(_pod("b"))
            api.compact()
            auth = {"Authorization": "Bearer t"}
            params = {"watch": "true", "resourceVersion": old}
            async with (
                httpx2.AsyncClient(base_url=api.url, headers=auth) as http,
                http.stream("GET", "/api/v1/pods", params=params) as response,
            ):
                assert response.status_code == 200
                lines = [json.loads(line) async for line in response.aiter_lines()]
            assert [e["type"] for e in lines] == ["ERROR"]
            assert lines[0]["object"]["code"] == 410


async def test_missing_group_and_bad_token_answer_with_a_status() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            open_fake_apiserver(
                tls=False, token="t", missing_groups=["networking.istio.io"]
            ) as api,
            httpx2.AsyncClient(base_url=api.url) as http,
        ):
            denied = await http.get("/api/v1/pods", headers={"Authorization": "Bearer x"})
            assert (denied.status_code, denied.json()["kind"]) == (401, "Status")
            missing = await http.get(
                "/apis/networking.istio.io/v1/virtualservices",
                headers={"Authorization": "Bearer t"},
            )
            assert (missing.status_code, missing.json()["reason"]) == (404, "NotFound")
            assert missing.headers["content-type"] == "application/json"
