"""Stop strings over streamed text.

Text arrives in deltas (one per token, or fewer: the detokenizer holds incomplete characters),
and a stop string can straddle any number of them. `StopChecker` emits text as soon as it is
certain not to belong to a stop string and holds back the shortest tail that still could:

    checker = StopChecker(["\\nUser:", "###"])
    for delta in deltas:
        text, stopped = checker.feed(delta)
        emit(text)
        if stopped:
            break
    else:
        emit(checker.flush())

Without a stop, everything fed comes out, in order: `"".join(texts) + flush()` is the input.
With one, the output is the input cut right before the first stop string to complete (where
generation would have stopped; of several ending together, the longest); nothing after it is
ever emitted. That outcome does not depend on how the text was split into deltas.
"""

from __future__ import annotations

from ..errors import InputError


class StopChecker:
    def __init__(self, stop_strings=()):
        if isinstance(stop_strings, str):
            stop_strings = (stop_strings,)
        if not isinstance(stop_strings, (list, tuple)) and stop_strings is not None:
            raise InputError(f"stop must be a list of strings, got {stop_strings!r}")
        stops = tuple(stop_strings or ())
        for i, s in enumerate(stops):
            if not isinstance(s, str) or not s:
                raise InputError(f"stop[{i}] must be a non-empty string, got {s!r}")
        self.stops = stops
        self._held = ""  # text not yet emitted: a tail that may start a stop string
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text, once stopped

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add `delta`; return (text safe to emit now, whether a stop string has completed)."""
        if not isinstance(delta, str):
            raise InputError(f"delta must be a str, got {type(delta).__name__}")
        if self.stopped:
            return "", True
        if not self.stops:
            return delta, False
        text = self._held + delta
        # A stop string ends the text where it completes: generation would have stopped there,
        # so of the matches in `text` the one ending first wins (the longest, if several end
        # together). Every match starts inside `text`, since the held tail is the only part of
        # the past that could begin one, so that is also the first to end in the whole stream.
        best = None
        for s in self.stops:
            i = text.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < (best[0] + len(best[1]), best[0])):
                best = (i, s)
        if best is not None:
            self.stopped, self.matched, self._held = True, best[1], ""
            return text[:best[0]], True
        keep = self._partial(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """End of stream: the held-back text, which turned out not to be a stop string."""
        text, self._held = self._held, ""
        return "" if self.stopped else text

    def _partial(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
