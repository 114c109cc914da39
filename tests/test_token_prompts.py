"""/v1/completions with token ids: the model sees exactly the ids sent, never their text
re-tokenized, also when a cached prompt spells the same text with other ids."""

import json

import httpx
import pytest


class Recording:
    """The model, recording the ids of every forward call."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def __call__(self, inputs, cache=None):
        self.seen.append(inputs.tolist())
        return self.model(inputs, cache=cache)

    def __getattr__(self, name):
        return getattr(self.model, name)


def _fed(rec: Recording) -> list[int]:
    return [t for call in rec.seen for row in call for t in row]


@pytest.fixture(scope="module")
def served(serve, chat_model):
    model, tok, _ = chat_model
    rec = Recording(model)
    base, engine = serve(rec, tok)
    return base, rec, tok, engine


def split_ids(tok) -> list[int]:
    """Ids that decode to a text whose own tokens are other ids."""
    for word in ["hello", "information", "wonderful", "nevertheless"]:
        for k in range(1, len(word)):
            ids = tok.encode(" the " + word[:k], add_special_tokens=False) + tok.encode(word[k:], add_special_tokens=False)
            if tok.encode(tok.decode(ids), add_special_tokens=False) != ids:
                return ids
    pytest.fail("no split word found")


@pytest.mark.parametrize("stream", [False, True])
def test_token_id_prompts_reach_the_model_unchanged(served, stream):
    base, rec, tok, engine = served
    ids = split_ids(tok)
    engine.caches.clear()
    for first in ["text", "ids"]:  # the text first: a cached prompt spelling it with other ids
        rec.seen.clear()
        prompt = tok.decode(ids) if first == "text" else ids
        body = {"model": "m", "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        r = httpx.post(base + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
    if stream:
        chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        usage = chunks[-1]["usage"]
    else:
        usage = r.json()["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert usage["prompt_tokens"] == len(ids) and cached < len(ids)
    # What the cache held (the shared first token) and what was fed after it: the ids sent.
    assert _fed(rec)[: len(ids) - cached] == ids[cached:]
    assert tok.encode(tok.decode(ids), add_special_tokens=False)[:cached] == ids[:cached]
