"""The hand-over registry of daemonset/README.md "Upgrade and removal": registration, who is
live and newer, the preStop decision, and the poller that yields readiness to a newer agent.

Two agents are two registrations in one process: flock locks belong to the open file, so a
closed registration is exactly a dead agent."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner
from meshagent.agent import handover
from meshagent.agent.cli import main
from meshagent.agent.handover import (
    Phase,
    Recheck,
    Registration,
    RegistrationError,
    newer_live_agent,
    open_registration,
    open_registration_from_env,
    phase,
    registry_dir,
    serve_handover,
)

TIMEOUT = 5


def saved(state: Path, uid: str) -> dict:
    return json.loads((registry_dir(state) / f"{uid}.json").read_text())


def test_registration_holds_the_lock_and_writes_the_documented_json(tmp_path: Path) -> None:
    with open_registration(tmp_path, "uid-a", "meshagent-abcde"):
        data = saved(tmp_path, "uid-a")
        assert set(data) == {"registered_ns", "pod_uid", "pod_name", "serving"}
        assert data["pod_uid"] == "uid-a" and data["pod_name"] == "meshagent-abcde"
        assert data["serving"] is False
        assert handover.is_live(registry_dir(tmp_path) / "uid-a.lock")
        with pytest.raises(RegistrationError, match="uid-a"), open_registration(tmp_path, "uid-a"):
            pass
    assert not handover.is_live(registry_dir(tmp_path) / "uid-a.lock")


def test_a_restarted_container_keeps_its_place_and_starts_not_serving(tmp_path: Path) -> None:
    with open_registration(tmp_path, "uid-a") as first:
        first.set_serving(True)
        registered = saved(tmp_path, "uid-a")["registered_ns"]
        assert saved(tmp_path, "uid-a")["serving"] is True
    with open_registration(tmp_path, "uid-a"):
        assert saved(tmp_path, "uid-a")["registered_ns"] == registered
        assert saved(tmp_path, "uid-a")["serving"] is False


def test_without_pod_uid_nothing_is_registered(tmp_path: Path) -> None:
    with open_registration_from_env(tmp_path, env={}) as registration:
        assert registration is None
    assert not registry_dir(tmp_path).exists()
    with open_registration_from_env(tmp_path, env={"POD_UID": "u", "POD_NAME": "p"}) as reg:
        assert reg is not None and saved(tmp_path, "u")["pod_name"] == "p"


def test_only_a_live_agent_registered_later_is_a_successor(tmp_path: Path) -> None:
    registry = registry_dir(tmp_path)
    with open_registration(tmp_path, "old", "meshagent-old"):
        assert newer_live_agent(registry, "old") is None
        with open_registration(tmp_path, "new", "meshagent-new"):
            assert newer_live_agent(registry, "old") == "meshagent-new"
            assert newer_live_agent(registry, "new") is None  # the old one is not newer
        # the new agent died: its files stay, but it is no successor
        assert (registry / "new.json").exists()
        assert newer_live_agent(registry, "old") is None


def test_equal_timestamps_are_ordered_by_pod_uid(tmp_path: Path) -> None:
    registry = registry_dir(tmp_path)
    with open_registration(tmp_path, "aaa"), open_registration(tmp_path, "bbb"):
        for uid in ("aaa", "bbb"):
            (registry / f"{uid}.json").write_text(
                json.dumps({"registered_ns": 5, "pod_uid": uid, "pod_name": uid, "serving": False})
            )
        assert newer_live_agent(registry, "aaa") == "bbb"
        assert newer_live_agent(registry, "bbb") is None


def test_an_unreadable_registration_is_skipped(tmp_path: Path, caplog) -> None:
    registry = registry_dir(tmp_path)
    with open_registration(tmp_path, "old"):
        (registry / "junk.json").write_text("{not json")
        assert newer_live_agent(registry, "old") is None
    assert "junk.json" in caplog.text


@pytest.mark.parametrize(
    ("newer", "expected"),
    [
        ([], Phase.OWNER),
        ([Registration(2, "b", serving=False)], Phase.SUCCESSOR_STARTING),
        ([Registration(2, "b"), Registration(3, "c", serving=True)], Phase.HANDED_OVER),
    ],
)
def test_phase(newer: list[Registration], expected: Phase) -> None:
    assert phase(newer) is expected


# --- the preStop hook -------------------------------------------------------------------


def uninstall(tmp_path: Path, env: dict[str, str]) -> tuple[int, str]:
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"state_dir": str(tmp_path / "state")}))
    result = CliRunner().invoke(
        main, ["uninstall", "--config", str(config), "--unless-handed-over"], env=env
    )
    return result.exit_code, result.output


def test_pre_stop_without_pod_uid_is_an_error_naming_it(tmp_path: Path) -> None:
    code, output = uninstall(tmp_path, {"POD_UID": ""})
    assert code == 2 and "$POD_UID" in output


def test_pre_stop_leaves_everything_to_a_newer_live_agent(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with open_registration(state, "old", "meshagent-old"):
        with open_registration(state, "new", "meshagent-new"):
            code, output = uninstall(tmp_path, {"POD_UID": "old"})
        assert code == 0
        assert output.strip() == "handed over to meshagent-new; datapath left in place"
        assert {p.name for p in registry_dir(state).iterdir()} == {
            "old.lock",
            "old.json",
            "new.lock",
            "new.json",
        }


# --- the poller -------------------------------------------------------------------------


class FakeListener:
    """A readiness service that records whether it is open."""

    def __init__(self) -> None:
        self.open = False
        self.starts = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED):
        self.open, self.starts = True, self.starts + 1
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self.open = False


async def until(predicate: Callable[[], object]) -> None:
    while not predicate():
        await trio.sleep(0.01)


async def _serve_ready(
    nursery: trio.Nursery, registration, listener: FakeListener, phases: list, **options
) -> None:
    """`serve_handover` for an agent that is ready, its phases noted in ``phases``."""
    await nursery.start(
        lambda task_status: serve_handover(
            registration,
            lambda: True,
            listener.serve,
            on_phase=phases.append,
            task_status=task_status,
            **options,
        )
    )


async def test_an_old_agent_yields_to_its_successor_and_resumes_if_it_dies(tmp_path) -> None:
    listener, phases = FakeListener(), []
    with trio.fail_after(TIMEOUT), open_registration(tmp_path, "old", "old") as old:
        async with trio.open_nursery() as nursery:
            await _serve_ready(nursery, old, listener, phases, interval=0.01)
            assert listener.open
            await until(lambda: saved(tmp_path, "old")["serving"])

            with open_registration(tmp_path, "new", "new") as new:
                # a newer agent registered: the shared readiness port is its alone
                await until(lambda: not listener.open)
                assert phases == [Phase.SUCCESSOR_STARTING]
                assert saved(tmp_path, "old")["serving"] is False
                new.set_serving(True)
                await until(lambda: phases[-1:] == [Phase.HANDED_OVER])
                assert not listener.open
            # the newer agent died before this one was stopped: take the node back
            await until(lambda: listener.open)
            assert phases == [Phase.SUCCESSOR_STARTING, Phase.HANDED_OVER, Phase.OWNER]
            assert listener.starts == 2
            await until(lambda: saved(tmp_path, "old")["serving"])
            nursery.cancel_scope.cancel()


async def test_serving_waits_for_ready(tmp_path) -> None:
    listener, ready = FakeListener(), False
    with trio.fail_after(TIMEOUT), open_registration(tmp_path, "a") as reg:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: serve_handover(reg, lambda: ready, listener.serve, interval=0.01)
            )
            await trio.sleep(0.1)
            assert listener.open and saved(tmp_path, "a")["serving"] is False
            ready = True
            await until(lambda: saved(tmp_path, "a")["serving"])
            nursery.cancel_scope.cancel()


async def test_a_recheck_sees_a_successor_serving_before_the_next_tick(tmp_path) -> None:
    """SIGTERM in the second after a successor started serving: the stopping agent looks at
    once, so it stops in `handed-over` (and stops writing the maps) rather than one poll late."""
    listener, phases, recheck = FakeListener(), [], Recheck()
    with trio.fail_after(TIMEOUT), open_registration(tmp_path, "old", "old") as old:
        async with trio.open_nursery() as nursery:
            await _serve_ready(nursery, old, listener, phases, interval=3600, recheck=recheck)
            await until(lambda: saved(tmp_path, "old")["serving"])  # its first look is done
            with open_registration(tmp_path, "new", "new") as new:
                new.set_serving(True)
                await trio.sleep(0.05)
                assert phases == []  # the next tick is an hour away
                await recheck.now(timeout=TIMEOUT)
                assert phases == [Phase.HANDED_OVER]
                await until(lambda: not listener.open)
            nursery.cancel_scope.cancel()


async def test_a_recheck_without_a_registration_returns_at_once() -> None:
    """No $POD_UID (the lab's agents, or by hand): nothing polls, nothing to wait for."""
    with trio.fail_after(1):
        await Recheck().now(timeout=3600)


def test_live_agents_lists_every_live_registration_oldest_first(tmp_path: Path) -> None:
    """What `meshagent status` shows during an upgrade: the draining old agent too."""
    registry = registry_dir(tmp_path)
    assert handover.live_agents(registry) == []
    with open_registration(tmp_path, "old", "meshagent-old"):
        with open_registration(tmp_path, "new", "meshagent-new"):
            assert [r.name for r in handover.live_agents(registry)] == [
                "meshagent-old",
                "meshagent-new",
            ]
        assert [r.name for r in handover.live_agents(registry)] == ["meshagent-old"]


def test_an_old_agent_hands_over_to_the_sockets_of_its_serving_successor_only(
    tmp_path: Path,
) -> None:
    """agent/proxy/handoff.py: the successor's processes listen in its own folder."""
    with open_registration(tmp_path, "old") as old:
        assert handover.successor_handoff_sockets(old, tmp_path) == []  # no successor
        with open_registration(tmp_path, "new") as new:
            folder = handover.handoff_folder(tmp_path, "new")
            folder.mkdir(parents=True)
            sockets = [handover.handoff_socket(folder, pid) for pid in (41, 42)]
            for path in sockets:
                path.touch()
            # our own processes' folder is not where ours go
            handover.handoff_folder(tmp_path, "old").mkdir(parents=True)
            handover.handoff_socket(handover.handoff_folder(tmp_path, "old"), 7).touch()
            assert handover.successor_handoff_sockets(old, tmp_path) == []  # not serving yet
            new.set_serving(True)
            assert handover.successor_handoff_sockets(old, tmp_path) == sockets
            assert handover.successor_handoff_sockets(new, tmp_path) == []  # nobody newer
            assert handover.successor_handoff_sockets(None, tmp_path) == []  # no $POD_UID
            handover.clear_handoff(folder)  # the successor's next container starts clean
            assert handover.handoff_sockets(folder) == []
    assert handover.handoff_folder(tmp_path, None).name == "local"
