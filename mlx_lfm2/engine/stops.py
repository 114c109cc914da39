"""Stop strings found in linear time: an Aho-Corasick automaton over all of a request's stops.

``StopMatcher.feed(chunk)`` reads each new character once (amortized O(1) per character,
whatever the number or length of the stops), and reports the stop that starts first among
those the chunk completes; ``held`` is how many trailing characters could still begin a stop
(the automaton's depth), which the text layer holds back. So the cost per token is
proportional to the new text, never to the text so far or to count x length^2.
``work`` counts the automaton's steps (tests bound it).
"""

from __future__ import annotations

from collections import deque
from typing import Optional, Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]):
        self.goto: list[dict] = [{}]
        self.fail = [0]
        self.depth = [0]
        self.longest: list[Optional[str]] = [None]  # the longest stop ending at this state
        for stop in stops:
            node = 0
            for c in stop:
                if c not in self.goto[node]:
                    self.goto.append({})
                    self.fail.append(0)
                    self.depth.append(self.depth[node] + 1)
                    self.longest.append(None)
                    self.goto[node][c] = len(self.goto) - 1
                node = self.goto[node][c]
            self.longest[node] = stop
        self._link()
        self.state = self.pos = self.work = 0

    def _link(self) -> None:
        """Failure links, breadth first; each state's longest stop includes its suffixes'."""
        todo = deque(self.goto[0].values())
        while todo:
            node = todo.popleft()
            for c, child in self.goto[node].items():
                f = self.fail[node]
                while f and c not in self.goto[f]:
                    f = self.fail[f]
                self.fail[child] = self.goto[f][c] if node and c in self.goto[f] else 0
                if self.longest[child] is None:
                    self.longest[child] = self.longest[self.fail[child]]
                todo.append(child)

    @property
    def held(self) -> int:
        """Trailing characters that could still begin a stop."""
        return self.depth[self.state]

    def feed(self, chunk: str) -> Optional[tuple[int, str]]:
        """Read ``chunk``: the earliest-starting stop it completes as (start, stop), where start
        counts every character fed so far; None when it completes none."""
        if len(self.goto) == 1:
            self.pos += len(chunk)
            return None
        hit, state, goto, fail = None, self.state, self.goto, self.fail
        for c in chunk:
            while state and c not in goto[state]:
                state = fail[state]
                self.work += 1
            state = goto[state].get(c, 0)
            self.work += 1
            self.pos += 1
            stop = self.longest[state]
            if stop is not None and (hit is None or self.pos - len(stop) < hit[0]):
                hit = (self.pos - len(stop), stop)
        self.state = state
        return hit
