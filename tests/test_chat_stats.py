"""``Chat.last`` and ``cached_tokens`` (what chat.py's /stats shows) describe the conversation as
it stands: after /undo the dropped reply's numbers are gone and the cache holds only what the
remaining messages reuse; after an interrupted reply its partial numbers are there."""

from mlx_lfm2.engine.session import Chat

GREEDY = dict(temperature=0.0, repetition_penalty=None)


def cache_spells_a_prefix_of(chat) -> bool:
    rendered = chat.tokenizer.apply_chat_template(chat.messages, add_generation_prompt=False) if chat.messages else ""
    pc = chat.prompt_cache
    return pc.offset == len(pc.tokens) and rendered.startswith(chat.tokenizer.decode(pc.tokens))


def test_undo_shows_the_previous_reply_and_a_cache_of_what_remains(chat_model):
    model, tok, _ = chat_model
    chat = Chat(model, tok, **GREEDY)
    first = list(chat.send("Tell me about the sea", max_tokens=6))[-1]
    after_first = chat.cached_tokens
    second = list(chat.send("And the rivers?", max_tokens=6))[-1]
    assert chat.last is second and chat.cached_tokens > after_first
    chat.undo()
    assert chat.last is first and len(chat.messages) == 2
    assert 0 < chat.cached_tokens <= after_first + 2 and cache_spells_a_prefix_of(chat)
    chat.undo()
    assert chat.last is None and chat.messages == [] and chat.cached_tokens == 0


def test_retry_replaces_the_stats_of_the_reply_it_regenerates(chat_model):
    model, tok, _ = chat_model
    chat = Chat(model, tok, **GREEDY)
    first = list(chat.send("Hello", max_tokens=6))[-1]
    again = list(chat.retry(max_tokens=6))[-1]
    assert chat.last is again and again is not first and len(chat.messages) == 2


def test_an_interrupted_reply_keeps_its_partial_numbers(chat_model):
    model, tok, _ = chat_model
    chat = Chat(model, tok, **GREEDY)
    list(chat.send("Hello", max_tokens=4))
    before = chat.cached_tokens
    stream = chat.send("Write a very long story", max_tokens=1000)
    for _ in range(3):
        next(stream)
    stream.close()  # what Ctrl-C in chat.py does
    assert chat.last.finish_reason == "interrupted" and chat.last.generation_tokens == 3
    assert chat.last.prompt_tokens > 0 and len(chat.messages) == 4
    assert chat.cached_tokens == before  # the interrupted turn is not in the cache; the next send prefills it


def test_ctrl_c_during_the_prefill_counts_as_an_interrupted_reply_of_no_tokens(chat_model):
    import pytest

    model, tok, _ = chat_model

    class Interrupted:  # the model, with Ctrl-C arriving during its first forward pass
        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, *a, **k):
            raise KeyboardInterrupt

    chat = Chat(Interrupted(), tok, **GREEDY)
    with pytest.raises(KeyboardInterrupt):
        list(chat.send("Hello", max_tokens=4))
    assert chat.last.finish_reason == "interrupted" and chat.last.generation_tokens == 0
    assert chat.last.prompt_tokens > 0 and len(chat.messages) == 2 and chat.cached_tokens == 0
