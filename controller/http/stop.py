"""Stop strings over streamed text: the text before the first stop string, with text
that might begin a stop string held back until the next piece decides it.

The workers stop on token ids only; a stop string can span tokens, so the HTTP layer,
which sees the decoded text, finds it and then cancels the rest of the request."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The text that can be sent now; sets `stopped` once a stop string appears."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return buf[:min(hits)]
        keep = 0  # the longest end of buf that begins some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """What was held back, at the end of the stream (no stop string completed it)."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out
