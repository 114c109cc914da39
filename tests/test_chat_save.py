"""chat.py /save and /load keep the conversation's cache: a loaded long chat answers its next
turn without prefilling it again, and can still rewind to its turn ends."""

import pytest

from conftest import tiny_config
from mlx_lfm2.engine.session import Chat

LONG = " ".join(f"Fact {i}: the item numbered {i} is kept in drawer {i % 7}." for i in range(700))


@pytest.mark.slow
def test_a_loaded_10k_token_chat_answers_without_prefilling_it_again(chat_model, tmp_path):
    model, tok, _ = chat_model
    chat = Chat(model, tok, system=LONG, temperature=0.0, repetition_penalty=None)
    list(chat.send("Where is item 5?", max_tokens=4))
    assert chat.cached_tokens > 10_000
    chat.save(tmp_path / "long.chat")
    expected = [r.token for r in chat.send("And item 6?", max_tokens=6)]
    loaded = Chat(model, tok, temperature=0.0, repetition_penalty=None)
    loaded.load(tmp_path / "long.chat")
    replies = list(loaded.send("And item 6?", max_tokens=6))
    assert [r.token for r in replies] == expected
    assert replies[-1].prompt_tokens < 40  # only the new turn
    retried = list(loaded.retry(max_tokens=6))  # back to this turn's start: a saved checkpoint
    assert [r.token for r in retried] == expected and retried[-1].prompt_tokens < 40


def test_a_chat_saved_by_other_weights_loads_its_transcript_and_not_its_cache(chat_model, checkpoint, tmp_path):
    from mlx_lfm2 import load

    model, tok, _ = chat_model
    chat = Chat(model, tok, temperature=0.0)
    list(chat.send("hi", max_tokens=3))
    chat.save(tmp_path / "a.chat")
    twin, twin_tok = load(checkpoint(tiny_config("tiny-moe"), tokenizer=True, seed=5))  # same config
    other = Chat(twin, twin_tok, temperature=0.0)
    other.load(tmp_path / "a.chat")
    assert other.messages == chat.messages and other.cached_tokens == 0
    same = Chat(model, tok)
    same.load(tmp_path / "a.chat")
    assert same.cached_tokens == chat.cached_tokens > 0
