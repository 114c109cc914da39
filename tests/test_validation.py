"""Ids and configs from outside: refused at the boundary with a clear error, never read out of bounds."""

import json
import shutil
import tomllib
from importlib import import_module

import mlx.core as mx
import pytest

from conftest import ROOT, ScriptedModel, reference_dir, tiny_config
from mlx_lfm2 import TokenIdError, load, stream_generate
from mlx_lfm2.engine.decode import generate_step
from mlx_lfm2.engine.sample import make_logits_processors
from mlx_lfm2.model.config import ConfigError
from mlx_lfm2.text.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(reference_dir())


def test_prompt_ids_outside_the_embedding_are_refused(chat_model):
    model, tok, _ = chat_model  # 65,536 rows
    with pytest.raises(TokenIdError, match=r"prompt token id 70000 is out of range.*0\.\.65535"):
        next(stream_generate(model, tok, [5, 70000], max_tokens=2))
    for bad in ([5, -1], [5, 2.0], [5, True], [1 << 70]):
        with pytest.raises(TokenIdError):
            next(stream_generate(model, tok, bad, max_tokens=2))
    with pytest.raises(TokenIdError, match="65536"):  # the token loop checks too
        next(generate_step(mx.array([1, 65536]), model, model.make_cache()))
    assert isinstance(TokenIdError("x"), ValueError)  # front ends map ValueError to a 400
    # and the model still works after the refusals
    assert next(stream_generate(model, tok, [5, 6], max_tokens=1)).finish_reason is None


def test_logit_bias_keys_are_checked_in_the_processor_factory(tok):
    with pytest.raises(TokenIdError, match=r"logit_bias key 99999999 is out of range.*0\.\.64399"):
        make_logits_processors(logit_bias={99999999: 5.0}, vocab_size=64400)
    with pytest.raises(TokenIdError, match="logit_bias key -3"):
        make_logits_processors(logit_bias={-3: 1.0})
    with pytest.raises(ValueError, match="not finite"):
        make_logits_processors(logit_bias={3: float("inf")}, vocab_size=10)
    # Without vocab_size the processor still refuses ids past the logits it is applied to.
    (bias,) = make_logits_processors(logit_bias={12: 1.0})
    with pytest.raises(TokenIdError, match="12"):
        bias(mx.array([1]), mx.zeros((1, 10)))
    # Through the engine: the server passes the request's logit_bias straight in.
    model = ScriptedModel([3], vocab=64400)
    with pytest.raises(TokenIdError, match="99999999"):
        next(stream_generate(model, tok, [1, 2], logit_bias={99999999: 5}))
    out = list(stream_generate(model, tok, [1, 2], max_tokens=1, logit_bias={9: 100.0}))
    assert out[0].token == 9


def test_stop_ids_outside_the_embedding_are_refused(tok):
    model = ScriptedModel([3], vocab=5)  # eos 7 is no row of this model
    with pytest.raises(TokenIdError, match="stop token id 7"):
        next(stream_generate(model, tok, [1, 2]))


def test_a_tokenizer_larger_than_the_embedding_is_said_at_load_and_enforced(checkpoint):
    folder = checkpoint(tiny_config("tiny-moe", vocab_size=4096), tokenizer=True)
    with pytest.warns(UserWarning, match="tokenizer has 64400 ids but the model only 4096"):
        model, tok = load(folder)
    with pytest.raises(TokenIdError, match=r"0\.\.4095"):
        next(stream_generate(model, tok, "a sentence with words past id 4096: antidisestablishmentarianism"))


@pytest.mark.parametrize("key, value, message", [
    ("chat_template", [{"template": "{{ x }}"}], "'chat_template' must be"),
    ("chat_template", 42, "'chat_template' must be"),
    ("eos_token", ["<|im_end|>"], "'eos_token' must be"),
    ("bos_token", 1, "'bos_token' must be"),
    ("add_bos_token", "yes", "'add_bos_token'"),
])
def test_malformed_tokenizer_config_is_a_config_error_naming_file_and_key(tmp_path, key, value, message):
    for f in reference_dir().iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "chat_template.jinja").unlink()
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg[key] = value
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message) as e:
        load_tokenizer(tmp_path)
    assert "tokenizer_config.json" in str(e.value)


def test_malformed_generation_config_and_non_object_json(tmp_path):
    for f in reference_dir().iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "7"}))
    with pytest.raises(ConfigError, match="generation_config.json: 'eos_token_id'"):
        load_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_tokenizer(tmp_path)


def test_every_console_script_points_at_a_callable():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(import_module(module), attr)), f"{name} -> {target}"


def test_batched_generation_checks_ids_too(chat_model):
    from mlx_lfm2.engine.batch import BatchGenerator, batch_generate

    model, tok, _ = chat_model
    with pytest.raises(TokenIdError, match="70000"):
        BatchGenerator(model).insert([5, 70000])
    with pytest.raises(TokenIdError, match="99999999"):
        batch_generate(model, tok, [[5, 6]], max_tokens=2, logit_bias={99999999: 1.0})


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=-1), "temperature"),
    (dict(temperature=0.5, seed=-1), "seed"), (dict(temperature=0.5, seed=1 << 64), "seed"),
    (dict(temperature=0.5, seed=1.5), "seed"), (dict(top_p=float("inf")), "top_p"), (dict(min_p=2), "min_p"),
    (dict(top_k=-3), "top_k"), (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(frequency_penalty=float("inf")), "frequency_penalty"),
])
def test_sampling_arguments_are_checked_by_the_engine(kwargs, message, tok):
    model = ScriptedModel([3], vocab=64400)
    with pytest.raises(ValueError, match=message):
        next(stream_generate(model, tok, [1, 2], **kwargs))
    seeded = list(stream_generate(model, tok, [1, 2], max_tokens=2, temperature=0.5, seed=(1 << 64) - 1))
    assert seeded[-1].finish_reason == "length"


@pytest.mark.parametrize("change, message", [
    (dict(num_attention_heads=0), "'num_attention_heads' must be a whole number above 0, not 0"),
    (dict(num_key_value_heads=-2), "'num_key_value_heads' must be a whole number above 0, not -2"),
    (dict(hidden_size="64"), "'hidden_size' must be a whole number above 0, not '64'"),
    (dict(vocab_size=1.5), "'vocab_size' must be a whole number above 0, not 1.5"),
    (dict(layer_types="conv"), "'layer_types' must be a list, not str"),
    (dict(layer_types=None, full_attn_idxs=3), "'full_attn_idxs' must be a list, not int"),
    (dict(num_experts=0), "'num_experts' must be a whole number above 0, not 0"),
    (dict(num_dense_layers=-1), "'num_dense_layers' must be a whole number 0 or more, not -1"),
])
def test_bad_config_values_raise_config_error_naming_the_key(change, message):
    from conftest import tiny_config
    from mlx_lfm2.model.config import ModelArgs

    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        ModelArgs.from_dict({**tiny_config("tiny-moe"), **change})
