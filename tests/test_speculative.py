"""Rewindable caches and speculative decoding: exact rewinds, speculative == plain greedy,
the acceptance rule keeps the target distribution, and rewinds in the front ends."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import tiny_config
from mlx_lfm2 import load
from mlx_lfm2.model.cache import ConvCache, can_rewind, reachable, rewind
from mlx_lfm2.engine.decode import prefill


def _states(cache):
    return [np.array(a) for c in cache for a in c.state]


def _assert_same_cache(got, want, atol):
    assert [c.offset for c in got] == [c.offset for c in want]
    for a, b in zip(_states(got), _states(want)):
        np.testing.assert_allclose(a, b, atol=atol)


@pytest.fixture(scope="module", params=["tiny-dense-f32", "tiny-moe-f32", "tiny-moe-q4"])
def model(request, checkpoint, tmp_path_factory):
    kind, form = request.param.rsplit("-", 1)
    folder = checkpoint(tiny_config(kind), tokenizer=True)
    if form == "q4":
        from mlx_lfm2 import convert

        out = tmp_path_factory.mktemp("q4") / "model"
        convert(folder, out, quantize=True, q_bits=4, force=True, progress=False)
        folder = out
    return load(folder)[0]


@pytest.mark.parametrize("m", [1, 3, 7, ConvCache.window])
def test_decode_then_rewind_equals_a_fresh_prefill(model, m):
    rng = np.random.default_rng(m)
    tokens = rng.integers(10, 1000, 40).tolist()
    cache = model.make_cache()
    prefill(model, mx.array(tokens[:20]), cache)
    for t in tokens[20:]:  # decode token by token
        model(mx.array([[t]]), cache=cache)
    assert can_rewind(cache, m)
    rewind(cache, m)
    fresh = model.make_cache()
    prefill(model, mx.array(tokens[: 40 - m]), fresh)
    _assert_same_cache(cache, fresh, atol=1e-4)
    # ...and it keeps going like the fresh one.
    nxt = mx.array([[tokens[40 - m]]])
    np.testing.assert_allclose(np.array(model(nxt, cache=cache)), np.array(model(nxt, cache=fresh)), atol=1e-3)


def test_rewind_inside_a_block_and_to_a_checkpoint(model):
    tokens = list(range(100, 160))
    cache = model.make_cache()
    prefill(model, mx.array(tokens[:30]), cache, step_size=8)  # checkpoints at 8, 16, 24, 30
    model(mx.array([tokens[30:35]]), cache=cache)  # a verify-sized block
    for t in tokens[35:60]:
        model(mx.array([[t]]), cache=cache)
    far = 27  # before the window, between checkpoints
    assert not can_rewind(cache, 60 - far) and reachable(cache, far) == 24
    rewind(cache, 60 - 24)
    fresh = model.make_cache()
    prefill(model, mx.array(tokens[:24]), fresh)
    _assert_same_cache(cache, fresh, atol=1e-4)
    # Inside a multi-token block: 33 = 30 + 3 of the 5-token call.
    cache2 = model.make_cache()
    prefill(model, mx.array(tokens[:30]), cache2)
    model(mx.array([tokens[30:35]]), cache=cache2)
    rewind(cache2, 2)
    fresh2 = model.make_cache()
    prefill(model, mx.array(tokens[:33]), fresh2)
    _assert_same_cache(cache2, fresh2, atol=1e-4)


# ---- speculative decoding ----------------------------------------------------------------

from mlx_lfm2 import stream_generate  # noqa: E402
from mlx_lfm2.engine.speculative import accept_drafts  # noqa: E402


@pytest.fixture(autouse=True)
def no_timing(monkeypatch):
    """Tests decide from tokens, not timings: no back-off because plain decoding was faster."""
    import mlx_lfm2.engine.speculative as spec

    monkeypatch.setattr(spec, "MEASURE_SPEED", False)


@pytest.fixture(scope="module")
def pair(checkpoint, tmp_path_factory):
    """Target (tiny MoE, float32), a draft that mostly agrees (the target at 4 bits) and one
    that never does (another random checkpoint), all with the real tokenizer."""
    from mlx_lfm2 import convert

    folder = checkpoint(tiny_config("tiny-moe"), tokenizer=True)
    target, tok = load(folder)
    q4 = tmp_path_factory.mktemp("draft-q4") / "model"
    convert(folder, q4, quantize=True, q_bits=4, force=True, progress=False)
    close, _ = load(q4)
    other, _ = load(checkpoint(tiny_config("tiny-dense"), tokenizer=True, seed=1))
    return target, tok, close, other


def _run(model, tok, prompt, **kw):
    out = list(stream_generate(model, tok, prompt, max_tokens=kw.pop("max_tokens", 40), **kw))
    return [r.token for r in out if r.token is not None], out


PROMPTS = [[1, 300, 301, 302, 303, 300, 301, 302, 303, 300, 301], list(range(500, 530))]


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("how", ["close-draft", "other-draft", "lookup", "draft-k1"])
def test_speculative_greedy_is_plain_greedy_token_for_token(pair, prompt, how):
    target, tok, close, other = pair
    kw = {"close-draft": dict(draft_model=close, num_draft_tokens=4),
          "other-draft": dict(draft_model=other, num_draft_tokens=3),
          "draft-k1": dict(draft_model=close, num_draft_tokens=1),
          "lookup": dict(prompt_lookup=True)}[how]
    bias = {7: -1e9}  # no early EOS: compare all 40 tokens
    plain, _ = _run(target, tok, prompt, logit_bias=bias)
    spec, out = _run(target, tok, prompt, logit_bias=bias, **kw)
    assert spec == plain
    last = out[-1]
    assert last.draft_tokens >= last.accepted_tokens >= sum(r.from_draft for r in out)
    if how in ("close-draft", "draft-k1") or (how == "lookup" and prompt is PROMPTS[0]):
        assert any(r.from_draft for r in out) and last.acceptance > 0


def test_speculative_with_penalties_matches_plain(pair):
    target, tok, close, _ = pair
    kw = dict(logit_bias={7: -1e9}, repetition_penalty=1.3, frequency_penalty=0.5, max_tokens=30)
    plain, _ = _run(target, tok, PROMPTS[0], **kw)
    for extra in (dict(draft_model=close), dict(prompt_lookup=True)):
        spec, _ = _run(target, tok, PROMPTS[0], **kw, **extra)
        assert spec == plain


def test_speculative_continues_a_cache_exactly(pair):
    """After a speculative reply the cache (and the draft's) equals a fresh prefill."""
    target, tok, close, _ = pair
    cache, dcache = target.make_cache(), close.make_cache()
    toks, _ = _run(target, tok, PROMPTS[1], cache=cache, draft_model=close, draft_cache=dcache,
                   max_tokens=25, logit_bias={7: -1e9})
    held = cache[0].offset
    assert dcache[0].offset == held and held >= len(PROMPTS[1]) + len(toks) - 1
    fresh = target.make_cache()
    prefill(target, mx.array((PROMPTS[1] + toks)[:held]), fresh)
    _assert_same_cache(cache, fresh, atol=1e-3)


def test_speculative_sampling_runs_end_to_end_and_is_seeded(pair):
    target, tok, close, _ = pair
    kw = dict(temperature=0.8, top_k=50, seed=3, logit_bias={7: -1e9}, max_tokens=24)
    a, out = _run(target, tok, PROMPTS[0], draft_model=close, **kw)
    b, _ = _run(target, tok, PROMPTS[0], draft_model=close, **kw)
    assert a == b and len(a) == 24 and out[-1].draft_tokens > 0
    assert any(r.from_draft for r in out)  # the 4-bit draft agrees often enough to be kept


def test_bad_draft_arguments_are_clear_errors(pair, checkpoint):
    target, tok, close, _ = pair
    with pytest.raises(ValueError, match="num_draft_tokens"):
        _run(target, tok, [1, 2], draft_model=close, num_draft_tokens=99)
    small_vocab, _ = load(checkpoint(tiny_config("tiny-dense", vocab_size=1000), tokenizer=True))
    with pytest.raises(ValueError, match="vocabulary"):
        _run(target, tok, [1, 2], draft_model=small_vocab)


# ---- the sampling rule keeps the target distribution ------------------------------------

def test_acceptance_rule_output_follows_the_target_distribution():
    """Chi-square on the first and second emitted tokens over many draws: with drafts drawn
    from q, the rule's output must follow p (both for a draft model and a point mass)."""
    def chisquare(observed, expected):  # statistic, and whether it passes at p = 0.001 for 4 dof
        return ((observed - expected) ** 2 / expected).sum()

    CRITICAL = 18.47  # chi-square, 4 degrees of freedom, p = 0.001
    rng = np.random.default_rng(0)
    V, N = 5, 3000
    p = rng.dirichlet(np.ones(V), size=3).astype(np.float32)  # target rows for positions 0, 1, 2
    q = rng.dirichlet(np.ones(V), size=2).astype(np.float32)
    lp, lq = mx.log(mx.array(p)), mx.log(mx.array(q))
    key = mx.random.key(1)
    first, second = np.zeros(V), np.zeros(V)
    for i in range(N):
        key, k1, k2 = mx.random.split(key, 3)
        drafts = mx.random.categorical(lq, key=k1).tolist()
        a, nxt = accept_drafts(lp, drafts, lq, key=k2)
        out = drafts[:a] + [nxt]
        first[out[0]] += 1
        if out[0] == 0 and len(out) > 1:  # the second token, given the first is 0
            second[out[1]] += 1
    assert chisquare(first, p[0] * N) < CRITICAL
    assert chisquare(second, p[1] * second.sum()) < CRITICAL
    # A point-mass draft (prompt lookup) that proposes token 2 every time.
    counts = np.zeros(V)
    for i in range(N):
        key, k2 = mx.random.split(key)
        a, nxt = accept_drafts(lp[:2], [2], None, key=k2)
        counts[2 if a else nxt] += 1
    assert chisquare(counts, p[0] * N) < CRITICAL
    # A wrong rule (always keep the draft) must fail this test.
    assert chisquare(np.bincount(mx.random.categorical(lq[0], shape=(N,)).tolist(), minlength=V),
                     p[0] * N) > CRITICAL


# ---- rewinds in the front ends ----------------------------------------------------------

from mlx_lfm2 import Chat  # noqa: E402


def _next_logits(model, cache, ids):
    return np.array(model(mx.array(ids)[None], cache=cache)[0, -1])


def _cache_is_its_tokens(chat):
    """The chat's cache equals a fresh prefill of the tokens it claims to hold."""
    pc, model = chat.prompt_cache, chat.model
    assert pc.offset == len(pc.tokens)
    fresh = model.make_cache()
    prefill(model, mx.array(pc.tokens), fresh)
    _assert_same_cache(pc.cache, fresh, atol=1e-3)


def test_chat_retry_rewinds_to_the_prompt_instead_of_prefilling(chat_model):
    model, tok, _ = chat_model
    chat = Chat(model, tok, system="You are terse.", temperature=0.0, repetition_penalty=None)
    list(chat.send("First question, with some words in it", max_tokens=8))
    first = list(chat.send("Second question", max_tokens=8))
    full = first[-1].prompt_tokens
    again = list(chat.retry(max_tokens=8))
    assert "".join(r.text for r in again) == "".join(r.text for r in first)  # greedy: same reply
    assert again[-1].prompt_tokens == 1 < full  # only the prompt's last token, fed as the first step
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    _cache_is_its_tokens(chat)


def test_chat_undo_then_send_prefills_only_the_new_turn(chat_model):
    model, tok, _ = chat_model
    chat = Chat(model, tok, temperature=0.0, repetition_penalty=None)
    list(chat.send("Tell me about the sea and the mountains", max_tokens=8))
    list(chat.send("And the rivers?", max_tokens=8))
    dropped = chat.undo()
    assert [m["role"] for m in dropped] == ["user", "assistant"] and len(chat.messages) == 2
    out = list(chat.send("And the lakes?", max_tokens=8))
    new_turn = len(tok.encode("<|im_end|>\n<|im_start|>user\nAnd the lakes?<|im_end|>\n<|im_start|>assistant\n",
                              add_special_tokens=False))
    assert out[-1].prompt_tokens <= new_turn + 2  # + the last token of the kept reply, at most
    # Same reply as a fresh conversation with the same transcript.
    fresh = Chat(model, tok, temperature=0.0, repetition_penalty=None)
    fresh.messages = chat.messages[:3]
    assert "".join(r.text for r in fresh.reply(max_tokens=8)) == chat.messages[3]["content"]
    _cache_is_its_tokens(chat)
    with pytest.raises(ValueError, match="nothing to undo"):
        Chat(model, tok).undo()


def test_chat_with_a_draft_model_keeps_both_caches_in_step(chat_model, checkpoint):
    model, tok, _ = chat_model
    draft, _ = load(checkpoint(tiny_config("tiny-dense"), tokenizer=True, seed=1))
    plain = Chat(model, tok, temperature=0.0, repetition_penalty=None)
    spec = Chat(model, tok, draft_model=draft, temperature=0.0, repetition_penalty=None)
    for c in (plain, spec):
        list(c.send("Hello there", max_tokens=10))
        list(c.send("More please", max_tokens=10))
        list(c.retry(max_tokens=10))
    assert spec.messages == plain.messages
    pc = spec.prompt_cache
    assert pc.draft_cache[0].offset == pc.offset
    fresh = draft.make_cache()
    prefill(draft, mx.array(pc.tokens), fresh)
    _assert_same_cache(pc.draft_cache, fresh, atol=1e-3)


@pytest.mark.slow
def test_chat_cli_retry_undo_and_acceptance_stats(checkpoint, tmp_path):
    import re
    import sys

    from conftest import ROOT

    pexpect = pytest.importorskip("pexpect")
    folder = checkpoint(tiny_config("tiny-moe"), tokenizer=True)
    child = pexpect.spawn(sys.executable, [str(ROOT / "chat.py"), "--model", str(folder), "--max-tokens", "24",
                                           "--temperature", "0", "--prompt-lookup", "--no-markdown"],
                          encoding="utf-8", codec_errors="replace", timeout=60, dimensions=(50, 150),
                          cwd=str(tmp_path), env={"TERM": "xterm", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    try:
        child.expect(">>> ")
        child.sendline("one two three one two three one two three")
        child.expect(r"(\d+) prompt tokens @")
        first = int(child.match.group(1))
        child.expect(">>> ")
        child.sendline("/retry")
        child.expect(r"(\d+) prompt tokens @[^\n]*")
        assert int(child.match.group(1)) == 1 < first
        child.expect(">>> ")
        child.sendline("/undo")
        child.expect("dropped 2 messages")
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect("no reply yet")  # not the dropped reply's numbers
        child.expect(r"0 tokens in the cache, 0 messages")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)


@pytest.mark.slow
def test_server_reuses_the_longest_common_prefix(checkpoint):
    """An edited last message or a regenerated reply prefills only what changed."""
    openai = pytest.importorskip("openai")
    from conftest import start_server

    folder = checkpoint(tiny_config("tiny-moe"), tokenizer=True)
    proc, base, _ = start_server(folder, "--prompt-lookup")
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)

        def ask(messages):
            return client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0)

        first_msgs = [{"role": "user", "content": "Tell me about MLX and the CPU backend"}]
        first = ask(first_msgs)
        history = first_msgs + [{"role": "assistant", "content": first.choices[0].message.content}]
        second = ask(history + [{"role": "user", "content": "And about LFM2 models?"}])
        edited = ask(history + [{"role": "user", "content": "And about LFM2-MoE instead?"}])
        cached = edited.usage.prompt_tokens_details.cached_tokens
        assert cached >= first.usage.prompt_tokens + first.usage.completion_tokens - 1
        assert cached < second.usage.prompt_tokens
        again = ask(history + [{"role": "user", "content": "And about LFM2-MoE instead?"}])  # regenerate
        assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
        assert again.choices[0].message.content == edited.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(10)


def test_front_ends_load_a_draft_only_with_the_targets_vocabulary(checkpoint):
    from mlx_lfm2.weights.loader import load_draft, load_model

    target = load_model(checkpoint(tiny_config("tiny-moe")))
    assert load_draft(None, target) is None
    same = load_draft(checkpoint(tiny_config("tiny-dense")), target)
    assert same.args.vocab_size == target.args.vocab_size
    with pytest.raises(ValueError, match="vocabulary"):
        load_draft(checkpoint(tiny_config("tiny-dense", vocab_size=target.args.vocab_size // 2)), target)
    with pytest.raises(ValueError, match="exclude each other"):
        load_draft(checkpoint(tiny_config("tiny-dense")), target, prompt_lookup=True)
