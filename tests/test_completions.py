"""/v1/completions as eval harnesses use it, checked against the model's own log-softmax
computed here in-process (one forward over the whole sequence, no server code)."""

import json

import httpx
import mlx.core as mx
import numpy as np
import pytest

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served(serve, chat_model):
    model, tok, folder = chat_model
    base, _ = serve(model, tok, max_batch=4)
    return base, openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0), model, tok, folder


def log_softmax(model, ids: list[int]) -> np.ndarray:
    """``[L, V]``: the model's next-token log-probabilities after each prefix of ``ids``."""
    logits = model(mx.array(ids)[None])[0].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def test_echo_scores_each_prompt_token_with_the_models_own_log_softmax(served):
    base, client, model, tok, _ = served
    prompts = [tok.encode("The capital of France is Paris", add_special_tokens=False),
               tok.encode("One two three four", add_special_tokens=False)]
    r = client.completions.create(model="m", prompt=prompts, echo=True, logprobs=2, max_tokens=0, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    for ids, c in zip(prompts, r.choices):
        lp = c.logprobs
        ref = log_softmax(model, ids)
        assert c.text == tok.decode(ids) and c.finish_reason == "length"
        assert lp.tokens == [tok.decode([i]) for i in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # no context for the first
        want = [float(ref[i - 1, t]) for i, t in enumerate(ids) if i]
        np.testing.assert_allclose(lp.token_logprobs[1:], want, atol=2e-4)
        for i, top in enumerate(lp.top_logprobs[1:], 1):
            best = np.argsort(-ref[i - 1])[:2]
            assert len(top) in (2, 3) and lp.tokens[i] in top  # the alternatives and the token itself
            assert max(top.values()) == pytest.approx(float(ref[i - 1, best[0]]), abs=2e-4)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    assert r.usage.completion_tokens == 0


def test_a_list_of_prompts_answers_each_in_order_as_if_alone(served):
    base, client, *_ = served
    prompts = ["Once upon a time", "The weather today", "In 1969", "Dear diary", "A B C"]
    together = client.completions.create(model="m", prompt=prompts, max_tokens=4, temperature=0, logprobs=0)
    assert [c.index for c in together.choices] == list(range(5))
    for p, c in zip(prompts, together.choices):
        alone = client.completions.create(model="m", prompt=p, max_tokens=4, temperature=0, logprobs=0).choices[0]
        assert c.text == alone.text
        assert c.logprobs.tokens == alone.logprobs.tokens and len(c.logprobs.tokens) == 4
        assert all(lp is not None for lp in c.logprobs.token_logprobs)  # logprobs 0: the tokens' own
        np.testing.assert_allclose(c.logprobs.token_logprobs, alone.logprobs.token_logprobs, atol=1e-4)
    assert together.usage.completion_tokens == 20


def test_echo_and_generation_continue_one_sequence(served):
    """With ``echo`` and ``max_tokens: 1`` (lm-eval's request) the generated token's logprob
    follows the prompt's; greedy, it is the top of the last position's distribution."""
    base, client, model, tok, _ = served
    ids = tok.encode("Hello there, friend", add_special_tokens=False)
    r = client.completions.create(model="m", prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1
    ref = log_softmax(model, ids)
    assert lp.token_logprobs[-1] == pytest.approx(float(ref[-1].max()), abs=2e-4)
    assert r.choices[0].text.startswith(tok.decode(ids))


def test_streamed_completion_ends_with_usage_when_asked(served):
    base, client, *_ = served
    chunks = list(client.completions.create(model="m", prompt="Once upon a time", max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.prompt_tokens > 0
    whole = client.completions.create(model="m", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    plain = list(client.completions.create(model="m", prompt="Once upon a time", max_tokens=2, stream=True))
    assert all(c.usage is None for c in plain)


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": ["a", ""]}, 422, ["empty"]),
    ({"prompt": [[1, 2], []]}, 422, ["empty"]),
    ({"prompt": [[1, 70000]]}, 422, ["70000"]),
    ({"prompt": ["x"] * 300}, 422, ["256"]),
    ({"prompt": ["a", "b"], "stream": True}, 400, ["one prompt"]),
    ({"prompt": "a", "max_tokens": -1}, 422, ["max_tokens"]),
])
def test_bad_prompts_are_refused_in_words(served, body, status, words):
    base = served[0]
    r = httpx.post(base + "/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert all(w in r.json()["error"]["message"] for w in words), r.text


@pytest.mark.slow
def test_lm_eval_local_completions_loglikelihood_equals_the_models_log_softmax(served):
    """lm-evaluation-harness's ``local-completions`` model scoring a tiny task through the
    server (token-id prompts, batched, echo + logprobs) gets the in-process numbers."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    base, _, model, tok, folder = served
    task = [("Question: What is the capital of France?\nAnswer:", " Paris"),
            ("Question: What is the capital of France?\nAnswer:", " Rome"),
            ("2 + 2 =", " 4"), ("The sky is", " blue today"), ("Roses are red, violets are", " blue")]
    lm = LocalCompletionsAPI(base_url=base + "/v1/completions", model="local-lfm2", tokenizer=str(folder),
                             tokenizer_backend="huggingface", batch_size=2, max_retries=1, max_length=512)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(task)]
    got = lm.loglikelihood(requests)
    for (ctx, cont), (logprob, greedy) in zip(task, got):
        ctx_ids, cont_ids = lm._encode_pair(ctx, cont)
        ids = ctx_ids + cont_ids
        ref = log_softmax(model, ids)
        positions = range(len(ctx_ids), len(ids))
        want = sum(float(ref[i - 1, ids[i]]) for i in positions)
        assert logprob == pytest.approx(want, abs=1e-3), (ctx, cont)
        assert greedy == all(ids[i] == int(ref[i - 1].argmax()) for i in positions)


def test_logprobs_are_the_models_own_while_sampling_keeps_the_penalties(served):
    """The model card's repetition penalty (applied by default), a request's penalties and
    its logit_bias shape what is sampled, not what is reported: each reported logprob is the
    model's own log-softmax at that position (vLLM's default)."""
    base, client, model, tok, _ = served
    prompt = tok.encode("la la la la la la", add_special_tokens=False)
    ref = log_softmax(model, prompt)[-1]
    greedy = int(ref.argmax())
    r = client.completions.create(model="m", prompt=prompt, max_tokens=1, temperature=0, logprobs=1,
                                  extra_body={"frequency_penalty": 1.0})
    assert r.choices[0].logprobs.token_logprobs[0] == pytest.approx(float(ref[greedy]), abs=2e-4)
    banned = client.completions.create(model="m", prompt=prompt, max_tokens=1, temperature=0, logprobs=2,
                                       logit_bias={str(greedy): -100})
    lp = banned.choices[0].logprobs
    second = int(np.argsort(-ref)[1])
    assert lp.tokens == [tok.decode([second])]  # the bias steered the sampling...
    assert lp.token_logprobs[0] == pytest.approx(float(ref[second]), abs=2e-4)  # ...not the report
    assert lp.top_logprobs[0][tok.decode([greedy])] == pytest.approx(float(ref[greedy]), abs=2e-4)
