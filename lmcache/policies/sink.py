"""``sink``: StreamingLLM, the first ``sinks`` tokens pinned plus the recent window."""

from __future__ import annotations

from .window import Window


class Sink(Window):
    """StreamingLLM (Xiao et al., 2023): attention sinks plus a sliding window.

    The same choice as ``Window`` but it insists on at least one sink token: the point of
    StreamingLLM is that the first tokens absorb attention mass the model must put somewhere.
    """

    name = "sink"

    def min_budget(self, sinks: int) -> int:
        if sinks < 1:
            raise ValueError(f"the sink policy (StreamingLLM) needs sinks >= 1, got sinks={sinks}")
        return super().min_budget(sinks)
