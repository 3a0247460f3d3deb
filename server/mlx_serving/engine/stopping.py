"""Stop strings matched on the decoded text, holding back what might still become a match.

A stop string can span several tokens or end inside one, so it is matched on text. While
streaming, any tail of the text that is a prefix of a stop string is held back, so a reader
never sees text that a later match would retract.
"""


class StopMatcher:
    def __init__(self, stops: tuple[str, ...], include_stop: bool = False):
        self.stops = stops
        self.include_stop = include_stop
        self._held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """The text that is safe to emit now, and the stop string if one matched."""
        text = self._held + text
        match = self._earliest_match(text)
        if match is not None:
            start, stop = match
            self._held = ""
            return text[: start + (len(stop) if self.include_stop else 0)], stop
        keep = self._partial_tail(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], None

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _earliest_match(self, text: str) -> tuple[int, str] | None:
        found = [(i, -len(s), s) for s in self.stops if (i := text.find(s)) != -1]
        if not found:
            return None
        start, _, stop = min(found)
        return start, stop

    def _partial_tail(self, text: str) -> int:
        """Length of the longest tail of text that some stop string starts with."""
        longest = min(len(text), max(len(s) for s in self.stops) - 1)
        for size in range(longest, 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self.stops):
                return size
        return 0
