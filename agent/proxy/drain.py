"""The data plane's drain signal: once set (SIGTERM), idle keep-alive connections close.

HTTP/1.1 lets a server close a keep-alive connection while it is idle (RFC 9112 9.3) and
clients retry then, so a draining proxy closes every HTTP connection that waits for its next
request, and each busy one after its current response. Opaque TCP cannot be ended politely:
those connections are waited for (up to the drain timeout).

A drain can also be one connection's own (`Drain(parent)`): it starts with its parent, or
alone when that connection should close politely, e.g. when the server behind it closed the
keep-alive connection that carried its requests (inbound.py), so the close reaches the client.
"""

from __future__ import annotations

import weakref

import trio


class Drain:
    def __init__(self, parent: Drain | None = None) -> None:
        self.draining = False
        self._idle: set[trio.CancelScope] = set()
        self._children: weakref.WeakSet[Drain] = weakref.WeakSet()
        if parent is not None:
            parent._children.add(self)
            self.draining = parent.draining

    def start(self) -> None:
        self.draining = True
        for scope in list(self._idle):
            scope.cancel()
        for child in list(self._children):
            child.start()

    def watch(self, scope: trio.CancelScope) -> None:
        """``scope`` waits for a next request: cancel it when draining starts (now if it has).
        `unwatch` it when the wait ends."""
        if self.draining:
            scope.cancel()
        self._idle.add(scope)

    def unwatch(self, scope: trio.CancelScope) -> None:
        self._idle.discard(scope)
