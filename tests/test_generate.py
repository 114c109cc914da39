"""The generation engine: samplers and stop rules on mock models, then real tiny models."""

import threading
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from conftest import ScriptedModel as MockModel, reference_dir, tiny_config
from mlx_lfm2 import Chat, generate, load, stream_generate
from mlx_lfm2.engine.decode import generate_step
from mlx_lfm2.engine.request import PromptTooLongError
from mlx_lfm2.engine.sample import make_logits_processors, make_sampler


@pytest.fixture(scope="module")
def tok():
    from mlx_lfm2.text.tokenizer import load_tokenizer

    return load_tokenizer(reference_dir())


def run(model, tok, prompt_ids, **kw):
    return list(stream_generate(model, tok, prompt_ids, **kw))


def ids_of(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_greedy_follows_the_script_and_stops_at_eos(tok):
    words = ids_of(tok, " hello world")
    out = run(MockModel(words + [7, 99]), tok, [1, 2, 3], max_tokens=50)
    assert "".join(r.text for r in out) == " hello world"
    assert out[-1].finish_reason == "stop" and out[-1].token == 7
    assert out[-1].generation_tokens == len(words) + 1
    assert "<|im_end|>" not in "".join(r.text for r in out)


def test_max_tokens_gives_length(tok):
    out = run(MockModel(ids_of(tok, " a b c d e f g")), tok, [1], max_tokens=3)
    assert out[-1].finish_reason == "length" and out[-1].generation_tokens == 3


def test_stop_strings_across_tokens_are_never_shown(tok):
    script = ids_of(tok, " one two STOP three") + [7]
    out = run(MockModel(script), tok, [1], max_tokens=50, stop=["STOP", "never"])
    shown = [r.text for r in out]
    assert "".join(shown) == " one two "
    assert out[-1].finish_reason == "stop"
    assert not any("ST" in s for s in shown)


def test_held_back_prefix_is_released_when_not_a_stop(tok):
    script = ids_of(tok, " x <|endo but not end") + [7]
    out = run(MockModel(script), tok, [1], max_tokens=50, stop="<|endoftext|>")
    assert "".join(r.text for r in out) == " x <|endo but not end"


def test_stop_event_from_another_thread_cancels(tok):
    ev = threading.Event()
    model = MockModel(ids_of(tok, " a") * 1000)
    got = []
    for r in stream_generate(model, tok, [1], max_tokens=1000, stop_event=ev):
        got.append(r)
        if len(got) == 5:
            threading.Thread(target=ev.set).start()
            threading.Event().wait(0.05)
    assert got[-1].finish_reason == "cancelled" and got[-1].generation_tokens < 1000


def test_prompt_longer_than_context_is_a_clear_error(tok):
    with pytest.raises(PromptTooLongError, match="does not fit the model's context of 16 tokens"):
        run(MockModel([5], context=16), tok, list(range(20)))


def test_chunked_prefill_feeds_everything_but_the_last_token_first():
    model = MockModel([5, 6, 7])
    cache = model.make_cache()
    toks = [t for t, _ in generate_step(mx.arange(1300), model, cache, max_tokens=2, prefill_step_size=512)]
    assert model.calls[:3] == [512, 512, 275] and model.calls[3] == 1
    assert toks == [5, 6]


# ---- samplers and processors --------------------------------------------------------------

ROW = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))


def draws(sampler, n=300):
    return [sampler(ROW).item() for _ in range(n)]


def test_greedy_at_temperature_zero():
    assert set(draws(make_sampler(0.0), 5)) == {0}


def test_seeded_sampling_is_reproducible_and_covers_the_distribution():
    a, b = draws(make_sampler(1.0, seed=3)), draws(make_sampler(1.0, seed=3))
    assert a == b and set(a) == {0, 1, 2, 3}
    assert draws(make_sampler(1.0, seed=4)) != a
    assert abs(a.count(0) / len(a) - 0.5) < 0.1


def test_top_k_top_p_min_p_filter():
    assert set(draws(make_sampler(1.0, top_k=2, seed=0))) == {0, 1}
    assert set(draws(make_sampler(1.0, top_p=0.7, seed=0))) == {0, 1}  # 0.5 + 0.3 reaches 0.7
    assert set(draws(make_sampler(1.0, top_p=0.4, seed=0))) == {0}
    assert set(draws(make_sampler(1.0, min_p=0.25, seed=0))) == {0, 1, 2}  # 0.15 >= 0.125
    assert set(draws(make_sampler(1.0, min_p=0.5, seed=0))) == {0, 1}


def test_repetition_penalty_and_logit_bias():
    logits = mx.array([[2.0, 1.9, -1.0, 0.0]])
    (rep,) = make_logits_processors(repetition_penalty=1.5)
    out = rep(mx.array([0, 2]), mx.array(logits))
    np.testing.assert_allclose(np.array(out), [[2.0 / 1.5, 1.9, -1.5, 0.0]], rtol=1e-6)
    (bias,) = make_logits_processors(logit_bias={3: 5.0})
    assert mx.argmax(bias(mx.array([], dtype=mx.uint32), mx.array(logits)), axis=-1).item() == 3


def test_frequency_and_presence_penalties_count_only_generated_tokens():
    logits = mx.array([[2.0, 1.9, -1.0, 0.0]])
    (pen,) = make_logits_processors(frequency_penalty=0.5, presence_penalty=0.25, prompt_tokens=2)
    history = mx.array([1, 1, 0, 0, 2])  # prompt [1, 1], then 0 twice and 2 once
    np.testing.assert_allclose(np.array(pen(history, mx.array(logits))),
                               [[2.0 - 1.0 - 0.25, 1.9, -1.0 - 0.5 - 0.25, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(np.array(pen(history[:2], mx.array(logits))), np.array(logits))


def test_presence_penalty_changes_greedy_choice_after_the_first_token(tok):
    row = np.full(64400, -10.0, np.float32)
    row[100], row[101] = 2.0, 1.5
    out = run(MockModel([0], spread=row), tok, [100], max_tokens=3, presence_penalty=1.0)
    assert [r.token for r in out[:3]] == [100, 101, 100]  # 2 - 1 > 1.5 - 1 once both were used
    out = run(MockModel([0], spread=row), tok, [100], max_tokens=3)
    assert [r.token for r in out[:3]] == [100, 100, 100]  # the prompt's 100 is not penalized


def test_repetition_penalty_changes_greedy_choice_in_the_loop(tok):
    row = np.full(64400, -10.0, np.float32)
    row[100], row[101] = 2.0, 1.9
    model = MockModel([0], spread=row)
    out = run(model, tok, [100], max_tokens=1, repetition_penalty=1.2)
    assert out[0].token == 101


# ---- real tiny models ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tiny-moe", "tiny-dense"])
def test_greedy_generate_equals_transformers(checkpoint, kind):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = checkpoint(tiny_config(kind), tokenizer=True)
    model, tok = load(folder)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me a story"}], tokenize=True)
    ours = []
    for r in stream_generate(model, tok, prompt, max_tokens=32, stop=None):
        if r.token is not None:
            ours.append(r.token)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    ref = out[0, len(prompt):].tolist()
    n = len(ours)
    assert ours == ref[:n] and (n == 32 or ref[n - 1] in tok.eos_token_ids)


def test_generate_accepts_text_ids_and_messages(chat_model):
    model, tok, _ = chat_model
    msgs = [{"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs)
    a = generate(model, tok, msgs, max_tokens=8)
    assert a == generate(model, tok, text, max_tokens=8) == generate(model, tok, tok.encode(text), max_tokens=8)


def test_multi_turn_prefills_only_the_new_turn(chat_model):
    model, tok, _ = chat_model
    chat = Chat(model, tok, system="Be brief.", temperature=0.0, repetition_penalty=None)
    first = list(chat.send("What is MLX?", max_tokens=12))
    before = chat.prompt_cache.text
    second = list(chat.send("And LFM2?", max_tokens=12))
    full = tok.apply_chat_template(chat.messages[:-1])
    assert full.startswith(before)
    new = tok.encode(full[len(before):], add_special_tokens=False)
    assert second[-1].prompt_tokens == len(new) < len(tok.encode(full, add_special_tokens=False)) // 2 + 12
    assert first[-1].prompt_tokens == len(tok.apply_chat_template(chat.messages[:2], tokenize=True))


def _next_logits(model, cache, ids):
    return np.array(model(mx.array([ids]), cache=cache)[0, -1])


def test_interrupted_reply_leaves_a_cache_equal_to_a_fresh_prefill(chat_model):
    model, tok, _ = chat_model
    chat = Chat(model, tok, temperature=0.0, repetition_penalty=None)
    list(chat.send("First question", max_tokens=6))

    class Boom(Exception):
        pass

    calls = {"n": 0}
    real_call = type(model).__call__

    def exploding(self, inputs, cache=None):
        calls["n"] += 1
        if calls["n"] == 4:  # mid-reply, inside a model step
            raise KeyboardInterrupt
        return real_call(self, inputs, cache)

    type(model).__call__ = exploding
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in chat.send("Second question", max_tokens=20):
                pass
    finally:
        type(model).__call__ = real_call
    assert chat.messages[-1]["role"] == "assistant"  # partial reply kept
    # The cache must equal a fresh prefill of the tokens it claims to hold, which spell
    # a prefix of the transcript; the next turn then extends it.
    pc = chat.prompt_cache
    assert pc.offset == len(pc.tokens) > 0 and tok.decode(pc.tokens) == pc.text
    chat.messages.append({"role": "user", "content": "Third"})
    prompt = tok.apply_chat_template(chat.messages)
    assert prompt.startswith(pc.text)
    new = pc.new_tokens(tok, prompt)
    assert pc.offset == len(pc.tokens)  # not reset: only the new turn is prefilled
    held = list(pc.tokens)
    np.testing.assert_allclose(_next_logits(model, pc.cache, new),
                               _next_logits(model, model.make_cache(), held + new), atol=1e-4)


def test_session_save_and_load_round_trip(chat_model, tmp_path):
    model, tok, _ = chat_model
    chat = Chat(model, tok, temperature=0.0, repetition_penalty=None)
    list(chat.send("Remember the number 42.", max_tokens=6))
    chat.save(tmp_path / "s.chat")
    expected = "".join(r.text for r in chat.send("What number?", max_tokens=8))
    other = Chat(model, tok, temperature=0.0, repetition_penalty=None)
    other.load(tmp_path / "s.chat")
    assert other.cached_tokens > 0 and other.messages == chat.messages[:2]
    replies = list(other.send("What number?", max_tokens=8))
    assert "".join(r.text for r in replies) == expected
    assert replies[-1].prompt_tokens < 15
    (tmp_path / "bad.chat").write_text("nope")
    with pytest.raises(ValueError, match="not a saved mlx_lfm2 chat"):
        other.load(tmp_path / "bad.chat")
