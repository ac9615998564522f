"""The agent's heartbeat in the datapath: how the connect programs tell a live agent from a
dead one.

What flows through it: the `heartbeat` map's one value (bpf/meshagent.h, `struct
mesh_heartbeat`), CLOCK_MONOTONIC nanoseconds of the last beat and the timeout. While it is
fresh, meshed pods' connects go to the node proxy; once it is older than the timeout (the
agent was killed, hangs, or stopped serving with nobody after it) bpf/redirect.c applies each
pod's fail mode instead: `open` pods connect straight to their destination, `closed` pods'
connects are refused at once (EPERM), never sent to a listener that is not there.

Who beats: only the agent that owns the node's maps, and only while its proxy serves: it is
ready, not draining, no newer agent has taken the node over (agent/handover.py), and with
proxy workers at least one of them runs. In a surge the new agent beats from the moment it is
ready, before the registry says it serves, so the old one stops only after the new one has
started: the beat never lapses.

A thread, not a trio task: a busy event loop (a flood of connections, a long snapshot
compile) must not make a live agent look dead, which would turn a pod's traffic unmeshed
(`open`) or refuse it (`closed`). Pods cannot beat for the agent: no program writes the map,
and its pin, like every pin, is root's (0600).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

INTERVAL_S = 0.25
TIMEOUT_S = 1.0


class Heartbeat:
    """Calls ``beat()`` every ``interval`` seconds in a thread of its own while ``should_beat()``
    holds; `stop` ends the thread (the beat then lapses after the timeout)."""

    def __init__(
        self, beat: Callable[[], None], should_beat: Callable[[], bool], interval: float
    ) -> None:
        self._beat = beat
        self._should_beat = should_beat
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.beating = False
        self.beats = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def beat_now(self) -> None:
        """One beat at once, if it should beat: called as the agent becomes ready, so the
        datapath sees a live agent before anyone can see the agent ready (the thread's next
        beat may be up to one interval away, and until then fail modes still hold)."""
        if self._should_beat():
            self._beat_once(failing=False)

    def _beat_once(self, *, failing: bool) -> bool:
        """One beat; True if it failed (logged unless it was `failing` already: once per
        outage, not four times a second)."""
        try:
            self._beat()
        except OSError as exc:
            if not failing:
                log.error("cannot write the heartbeat: %s", exc)
            return True
        self.beats += 1
        return False

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            beating = bool(self._should_beat())
            if beating != self.beating:
                log.info("heartbeat %s", "started" if beating else "stopped (not serving)")
                self.beating = beating
            if beating:
                failing = self._beat_once(failing=failing)
            self._stop.wait(self.interval)
