"""Stop strings matched on streamed text, across token boundaries.

The matcher holds back the shortest tail of the text that could still become a stop string and releases
it as soon as it cannot, so no part of a stop string reaches the client and nothing else waits longer
than it must. (Blocked terms are the safety layer's job: llmmesh.common.safety.)
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["StopMatcher"]


class StopMatcher:
    """Finds the first of several stop strings in a text that arrives piece by piece."""

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    def push(self, text: str) -> tuple[str, str | None]:
        """Returns (text safe to release, matched stop string or None). After a match, stop pushing."""
        if not self._stops:
            return text, None
        buf = self._held + text
        best: tuple[int, str] | None = None
        for stop in self._stops:
            at = buf.find(stop)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        if best is not None:
            self._held = ""
            return buf[: best[0]], best[1]
        keep = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), keep, -1):
                if stop.startswith(buf[-k:]):
                    keep = k
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        """At end of stream the held tail did not become a stop string: release it."""
        held, self._held = self._held, ""
        return held
