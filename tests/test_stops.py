"""Stop strings: the linear matcher (engine/stops.py) under TextStream gives exactly what the
plain quadratic search gives, and its work per character is bounded whatever the stops."""

import random

from mlx_lfm2.engine.generation import TextStream
from mlx_lfm2.engine.stops import StopMatcher


def held_back(text, stops):
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


def naive(chunks, stops):
    """The reference: search every stop in the unshown text after each chunk
    -> (segments shown, the stop, all the text)."""
    text, shown, out = "", 0, []
    for c in chunks:
        text += c
        hits = [(i, s) for i, s in ((text.find(s, shown), s) for s in stops) if i >= 0]
        if hits:
            cut, stop = min(hits)
            text = text[:cut]
            out.append(text[shown:])
            return out, stop, text
        visible = len(text) - held_back(text, stops)
        out.append(text[shown:visible])
        shown = max(shown, visible)
    return out, None, text


class Pieces:
    """A tokenizer whose token i is the string ``pieces[i]`` (no eos)."""

    eos_token_ids = []

    def __init__(self, pieces):
        self.pieces = pieces

    def detokenizer(self):
        pieces = self.pieces

        class D:
            def add_token(self, t):
                return pieces[t]

            def finalize(self):
                return ""

        return D()


def streamed(chunks, stops):
    ts = TextStream(Pieces(chunks), stops, 1)
    out = []
    for i in range(len(chunks)):
        rs = ts.feed(i, None)
        out += [r.text for r in rs]
        if rs[-1].finish_reason:
            return out, rs[-1].stop_sequence, ts
    return out, None, ts


def test_the_linear_matcher_equals_the_plain_search_on_random_cases():
    rng = random.Random(0)
    for case in range(3000):
        alphabet = "ab" if case % 2 else "abc\u00e9"
        word = lambda n: "".join(rng.choice(alphabet) for _ in range(n))  # noqa: E731
        stops = [word(rng.randint(1, 6)) for _ in range(rng.randint(1, 4))]
        chunks = [word(rng.randint(0, 4)) for _ in range(rng.randint(1, 25))]
        want = naive(chunks, stops)
        got = streamed(chunks, stops)
        assert got[:2] == want[:2], (stops, chunks)
        assert got[2].text == want[2], (stops, chunks)


def test_stop_work_is_linear_in_the_text_whatever_the_stops():
    # Four 1024-character stops that almost match at every position: the plain search did
    # ~count x length^2 / 2 comparisons per token here; the automaton does at most two steps a character.
    stops = ["a" * 1023 + "b", "a" * 1022 + "bc", "ab" * 512, "a" * 1024]
    text = ("a" * 1000 + "c") * 20
    chunks = [text[i : i + 3] for i in range(0, len(text), 3)]
    out, stop, ts = streamed(chunks, stops[:3])
    assert stop is None and "".join(out) == text
    assert ts.matcher.work <= 2 * len(text)
    m = StopMatcher(stops)
    assert m.feed("a" * 5000) == (0, "a" * 1024) and m.work <= 2 * 5000


def test_the_earliest_starting_stop_wins_within_a_token():
    assert streamed(["xabcd"], ["bc", "abcd"])[:2] == (["x"], "abcd")
    assert streamed(["xabc", "d"], ["bc", "abcd"])[:2] == (["xa"], "bc")  # "abcd" was not complete yet
