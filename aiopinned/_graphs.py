"""Blocks that a captured CUDA graph may read: kept until the graph is gone.

Work queued on a stream that is *capturing* a graph does not run: it becomes the graph's nodes,
and runs at each replay, for as long as the graph (or an executable made from it) lives.  An
event recorded during the capture is a node too, and says nothing about the replays to come.  So
where a buffer is recorded on a capturing stream (``record_stream``), or freed while one of its
recorded streams is capturing, the block is *held for the graph*: the backend ties a callback
to the graph being captured (a CUDA user object), CUDA runs it once the graph and its executable
graphs are destroyed and their launches have ended, and only then does the freed block go on to
its streams' events and the free list.  The caller does nothing more: ``record_stream`` is the
whole API, as in the seed.

Counting (``Block.graphs``) is on the loop thread only; a record from another thread posts its
increment before it asks the backend, so a release can never arrive before its hold is counted.
A backend without graphs (the host backend, a custom one) makes all of this a no-op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from functools import partial
from threading import get_ident

from ._block import ALLOCATED, Block
from ._loopport import LoopPort
from .backends.base import GraphCapture

log = logging.getLogger("aiopinned")


class GraphHolds:
    __slots__ = ("_capture", "_done", "_port", "_thread_id")

    def __init__(self, done: Callable[[Block], None]) -> None:
        #: loop thread: ``block`` was freed and the last graph holding it is gone
        self._done = done
        self._capture: GraphCapture | None = None

    def start(self, backend: object, port: LoopPort, thread_id: int) -> None:
        """The pool opened on ``port``'s loop (thread ``thread_id``) with ``backend``."""
        self._capture = backend if isinstance(backend, GraphCapture) else None
        self._port, self._thread_id = port, thread_id

    def check_not_capturing(self, key: Hashable) -> None:
        """``RuntimeError`` where stream ``key`` is capturing a graph (nothing to wait for)."""
        if self._capture is not None and self._capture.capture_of(key) is not None:
            raise RuntimeError(
                "this stream is capturing a CUDA graph: its work runs only when the graph is "
                "replayed; synchronize the stream the graph is replayed on, after the replay"
            )

    def record(self, block: Block, key: Hashable) -> None:
        """Any thread: ``block`` is used by work queued on stream ``key``; if ``key`` is
        capturing, hold the block for the graph."""
        capture = None if self._capture is None else self._capture.capture_of(key)
        if capture is not None:
            self._hold(block, capture)

    def held_at_free(self, block: Block) -> bool:
        """Loop thread, ``block`` just freed: whether a graph holds it, holding it for each
        recorded stream that is capturing now (their events would be graph nodes)."""
        if self._capture is not None:
            for key in block.streams:
                try:
                    capture = self._capture.capture_of(key)
                    if capture is not None:
                        self._hold(block, capture)
                except Exception:  # (an invalidated capture: recording an event will fail, and
                    # the block comes back once the stream can be waited on, as for any stream)
                    log.warning("aiopinned: no graph could hold %r", block, exc_info=True)
        return block.graphs > 0

    def _hold(self, block: Block, capture: object) -> None:
        assert self._capture is not None
        count: Callable[[int], object] = partial(_count, block)  # (on the loop; else posted)
        if get_ident() != self._thread_id:
            count = partial(self._port.post, _count, block)
        count(1)
        try:
            self._capture.hold_for_graph(capture, partial(self._port.post, self._ended, block))
        except BaseException:
            count(-1)
            raise

    def _ended(self, block: Block) -> None:
        """Loop thread: a graph that held ``block`` is gone (and its launches have ended)."""
        block.graphs -= 1
        if not block.graphs and block.state != ALLOCATED:  # (freed meanwhile: it goes on now)
            self._done(block)


def _count(block: Block, by: int) -> None:
    block.graphs += by
