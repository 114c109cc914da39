"""Chat-template rendering is bounded (text/template_limits.py) and runs off the event loop:
a template that loops or builds a huge string is a clear error (a 400 from the server), and
a multi-MB body renders and tokenizes while /health keeps answering."""

import copy
import subprocess
import sys
import threading
import time

import httpx
import pytest

from mlx_lfm2.text import template_limits
from mlx_lfm2.text.chat_template import render
from mlx_lfm2.text.template_limits import TemplateLimitError

USER = [{"role": "user", "content": "hi"}]
LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
HUGE = [
    '{{ "x" * 1000000000 }}',
    '{{ [1] * 1000000000 }}',
    '{{ "x".ljust(1000000000) }}',
    '{% set ns = namespace(s="x") %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}',
    '{% for i in range(100000) %}{{ "x" * 1000 }}{% endfor %}',
]


def test_a_template_that_loops_stops_at_the_time_limit(monkeypatch):
    monkeypatch.setattr(template_limits, "RENDER_TIMEOUT", 0.5)
    tic = time.monotonic()
    with pytest.raises(TemplateLimitError, match="ran past the limit of 0.5 s"):
        render(LOOPS, USER)
    assert time.monotonic() - tic < 5
    assert render("{{ messages[0].content }}", USER) == "hi"  # nothing left pending in this thread
    time.sleep(0.6)
    assert render("{{ messages[0].content }}", USER) == "hi"


@pytest.mark.parametrize("source", HUGE)
def test_a_template_that_builds_a_huge_string_is_refused_before_it_does(source):
    tic = time.monotonic()
    with pytest.raises(TemplateLimitError, match="over the limit of 16777216"):
        render(source, USER)
    assert time.monotonic() - tic < 5


@pytest.fixture(scope="module")
def evil(serve, chat_model):
    model, tok, _ = chat_model
    bad = copy.copy(tok)
    bad.chat_template = HUGE[0]
    base, _ = serve(model, bad)
    return base


def test_the_server_answers_a_runaway_template_with_a_400_in_each_shape(evil):
    r = httpx.post(evil + "/v1/chat/completions", json={"model": "m", "messages": USER, "max_tokens": 2}, timeout=30)
    assert r.status_code == 400 and "over the limit of 16777216" in r.json()["error"]["message"], r.text
    r = httpx.post(evil + "/v1/messages", json={"model": "m", "messages": USER, "max_tokens": 2}, timeout=30)
    assert r.status_code == 400 and r.json()["type"] == "error", r.text
    assert "over the limit" in r.json()["error"]["message"]
    r = httpx.post(evil + "/api/chat", json={"model": "m", "messages": USER, "stream": False}, timeout=30)
    assert r.status_code == 400 and "over the limit" in r.json()["error"], r.text
    assert httpx.get(evil + "/health", timeout=5).status_code == 200


@pytest.fixture(scope="module")
def plain(serve, chat_model):
    model, tok, _ = chat_model
    base, _ = serve(model, tok)
    return base


@pytest.mark.parametrize("path,extra", [("/v1/chat/completions", {}), ("/v1/messages", {}),
                                        ("/v1/messages/count_tokens", {}), ("/api/chat", {"stream": False})])
def test_health_answers_while_a_multi_mb_body_is_rendered_and_tokenized(plain, path, extra):
    content = "word, " * 600_000  # 3.6 MB: rendered twice (spans), tokenized, then over the context
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}
    done = {}

    def big():
        tic = time.monotonic()
        done["status"] = httpx.post(plain + path, json=body, timeout=120).status_code
        done["s"] = time.monotonic() - tic

    t = threading.Thread(target=big)
    t.start()
    worst = 0.0
    while t.is_alive():
        tic = time.monotonic()
        assert httpx.get(plain + "/health", timeout=30).status_code == 200
        worst = max(worst, time.monotonic() - tic)
        time.sleep(0.02)
    t.join()
    assert done["status"] in (200, 400), done
    assert worst < max(0.5, done["s"] / 4), (worst, done)  # the loop never waited on the work


def test_a_long_text_tokenizes_as_the_tokenizer_itself_does(ours):
    text = "<|im_start|>user\n" + "Grüße, words and 12345 numbers. " * 4000 + "<|im_end|>\n"
    assert len(text) > 1 << 16
    assert ours.encode(text, add_special_tokens=False) == ours.backend.encode(text, add_special_tokens=False).ids


def test_a_long_text_encoded_in_pieces_gives_the_whole_texts_ids(ours, monkeypatch):
    """Long texts are encoded in pieces (text/tokenizer.py ``_CUT``), here of 40 characters
    so that thousands of cuts meet every kind of character (spaces, newline runs, tabs, \\r,
    contractions, digits, punctuation, accents, CJK, emoji, template tokens): the ids are
    the same as one encode's."""
    import random

    from mlx_lfm2.text import tokenizer

    monkeypatch.setattr(tokenizer, "LONG_TEXT", 40)
    rnd = random.Random(26)
    parts = ["word", "Grüße", "naïve", "東京", "🙂", "12345", "7", "'s", "'LL", ",", "...", "!\n", "-", "_x",
             " ", "  ", "\t", "\n", "\n\n", " \n", "\r\n", "\u00a0", "\u3000", "<|im_end|>", "x\u0301", "²"]
    text = "".join(rnd.choice(parts) for _ in range(40_000))
    for add in (False, True):
        assert ours.encode(text, add_special_tokens=add) == ours.backend.encode(text, add_special_tokens=add).ids
    rendered = ours.apply_chat_template([{"role": "user", "content": text}])  # specials inside content: plain text
    whole = ours._splitting().encode(text, add_special_tokens=False).ids
    ids = ours.encode(rendered, add_special_tokens=False)
    assert len(ids) > len(whole) and any(ids[i : i + len(whole)] == whole for i in range(8))



@pytest.mark.parametrize("change", ["another split", "normalizer"])
def test_a_tokenizer_that_is_not_lfm2s_encodes_long_texts_whole(ours, monkeypatch, change):
    """The piece cuts hold for LFM2's pre-tokenizer only. With another split rule (here: every
    3 characters) or a normalizer that reads across a cut, cutting would change the ids; such
    a tokenizer is encoded whole and its ids are its own."""
    import json

    from tokenizers import Tokenizer as HF

    from mlx_lfm2.text import tokenizer

    spec = json.loads(ours.backend.to_str())
    if change == "another split":  # a piece of 3k+1 characters shifts the next piece's triples
        spec["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {"Regex": "[\\s\\S]{1,3}"}
        text = "words,and.12\n" * 1000
    else:  # cut only before " b": the normalizer would never see "a b"
        spec["normalizer"] = {"type": "Replace", "pattern": {"String": "a b"}, "content": "ab"}
        text = "a b " * 3000
    other = tokenizer.Tokenizer(HF.from_str(json.dumps(spec)), ours.config, ours.chat_template)
    assert tokenizer.splits_at_cuts(ours.backend) and not tokenizer.splits_at_cuts(other.backend)
    monkeypatch.setattr(tokenizer, "LONG_TEXT", 40)
    assert other.encode(text, add_special_tokens=False) == other.backend.encode(text, add_special_tokens=False).ids
    monkeypatch.setattr(other, "_pieces", True)  # what cutting would have given: not the same ids
    assert other.encode(text, add_special_tokens=False) != other.backend.encode(text, add_special_tokens=False).ids

PEAK_OF_A_4MIB_PROMPT = r"""
import sys
from mlx_lfm2.text.tokenizer import load_tokenizer

def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

tok = load_tokenizer(sys.argv[1])
text = "A sentence of words, and 12 numbers.\n" * (4 * 2**20 // 37)
before = peak_mb()
ids = tok.encode(text, add_special_tokens=False)
assert len(ids) > 900_000
print(peak_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_tokenizing_a_4_mib_prompt_peaks_at_tens_of_mb_not_hundreds():
    """tokenizers holds some 500 bytes a character while it encodes: a 4 MiB body peaked at
    +630 MB; in pieces the peak is one piece's plus the ids."""
    from conftest import ROOT

    p = subprocess.run([sys.executable, "-c", PEAK_OF_A_4MIB_PROMPT, str(ROOT / "tests/fixtures/LFM2-350M")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert float(p.stdout) < 100, p.stdout  # MB of peak RSS above the tokenizer's


RSS_AFTER_LONG_PROMPTS = r"""
import sys
from mlx_lfm2.text.tokenizer import load_tokenizer

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

tok = load_tokenizer(sys.argv[1])
tok.encode("warm up " * 1000)
before = rss_mb()
for n in (350_000, 200_000, 350_000):  # 2.1, 1.2, 2.1 MB: the soak's large bodies
    assert len(tok.encode("word, " * n)) > 2 * n
print(rss_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_multi_mb_prompt_gives_its_tokenizer_memory_back():
    """tokenizers works with some 400 bytes a token (300 MB for 2 MB of text); glibc kept
    what its arenas freed, so RSS stayed ~230-280 MB up after such prompts (the soak's growth)."""
    from conftest import ROOT

    p = subprocess.run([sys.executable, "-c", RSS_AFTER_LONG_PROMPTS, str(ROOT / "tests/fixtures/LFM2-350M")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert float(p.stdout) < 48, p.stdout  # MB held after three multi-MB prompts were tokenized and freed
