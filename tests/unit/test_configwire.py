"""The controller <-> agent stream's framing (common/configwire.py): messages sent by
several tasks at once over one stream arrive whole, each on its own line."""

from __future__ import annotations

import json

import trio
import trio.testing
from meshagent.common.configwire import SEND_CHUNK, MessageStream


async def test_messages_sent_at_once_by_several_tasks_arrive_whole() -> None:
    left, right = trio.testing.memory_stream_pair()
    sender, receiver = MessageStream(left), MessageStream(right)
    # larger than a piece, so each is several sends that another task could get between
    bodies = {name: name * (3 * SEND_CHUNK) for name in ("a", "b", "c")}
    small = {"type": "ack", "version": "v1"}

    async def send(name: str) -> None:
        await sender.send_encoded(json.dumps({"type": name, "body": bodies[name]}).encode())

    got = []
    async with trio.open_nursery() as nursery:
        for name in bodies:
            nursery.start_soon(send, name)
        nursery.start_soon(sender.send, small)
        for _ in range(len(bodies) + 1):
            got.append(await receiver.receive())
    assert sorted(m["type"] for m in got) == ["a", "ack", "b", "c"]
    for message in got:
        if message["type"] != "ack":
            assert message["body"] == bodies[message["type"]]
