"""Fine-tuning: data formats and masks, packing exactness, the chunked loss, parity with
mlx-lm's step-0 loss, resume, overfitting a small set, the lora CLI."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from train_helpers import small_model
from mlx_lfm2 import load
from mlx_lfm2.model.lora import apply_lora, trainable_adapters
from mlx_lfm2.train.data import DataError, Encoder, Example, load_datasets
from mlx_lfm2.train.losses import full_logits_loss, hidden, sft_loss, token_logprobs
from mlx_lfm2.train.packing import collate
from mlx_lfm2.train.trainer import Batches, TrainConfig, evaluate, loss_fn, train

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "content": '{"temp": 3}'}, {"role": "assistant", "content": "3 C in Oslo."}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {k: small_model(root / k, k) for k in ("tiny-dense", "tiny-moe")}


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_mask_prompt_trains_every_assistant_turn_with_tool_calls(models):
    _, tok = load(models["tiny-moe"])
    ex = Encoder(tok, mask_prompt=True).encode({"messages": CHAT, "tools": TOOLS}, "x:1")
    trained = tok.decode([t for t, w in zip(ex.tokens, ex.weights) if w])
    assert trained == ('<|tool_call_start|>[get_weather(city="Oslo")]<|tool_call_end|><|im_end|>\n'
                       "3 C in Oslo.<|im_end|>\n")
    assert "List of tools" in tok.decode(ex.tokens)  # the tools reach the template's system prompt


def test_single_turn_mask_equals_mlx_lm_offsets(models):
    datasets = pytest.importorskip("mlx_lm.tuner.datasets")
    from mlx_lm.utils import load as mlx_lm_load

    _, theirs = mlx_lm_load(str(models["tiny-moe"]))
    _, tok = load(models["tiny-moe"])
    row = {"prompt": "Capital of Peru?", "completion": "Lima."}
    tokens, offset = datasets.CompletionsDataset([row], theirs, "prompt", "completion", True).process(row)
    ex = Encoder(tok, mask_prompt=True).encode(row, "x:1")
    assert ex.tokens == list(tokens) and ex.weights == [0] * offset + [1] * (len(tokens) - offset)


@pytest.mark.parametrize("line,message", [
    ("{not json", "train.jsonl:2: not valid JSON"),
    ("[1, 2]", "train.jsonl:2: expected a JSON object on each line, not list"),
    (b"\xff\xfe", "train.jsonl:2: not UTF-8 text"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "train.jsonl:2: messages[0] must be an object"),
    ('{"prompt": "a"}', "train.jsonl:2: 'completion' must be a string"),
    ('{"input": "a"}', "train.jsonl:2: a row needs 'messages'"),
])
def test_bad_rows_name_file_and_line(models, tmp_path, line, message):
    _, tok = load(models["tiny-dense"])
    line = line if isinstance(line, bytes) else line.encode()
    (tmp_path / "train.jsonl").write_bytes(b'{"text": "fine"}\n' + line + b"\n")
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_datasets(str(tmp_path), tok)


@pytest.mark.parametrize("kind", ["tiny-dense", "tiny-moe"])
def test_packed_rows_give_each_document_its_own_loss(models, kind):
    model, _ = load(models[kind])
    rng = np.random.default_rng(0)
    docs = [Example(rng.integers(0, 270, n).tolist(), [0] + rng.integers(0, 2, n - 1).tolist()) for n in (9, 17, 6)]
    docs = [d if any(d.weights) else Example(d.tokens, [0] + [1] * (len(d) - 1)) for d in docs]
    alone = [float(sft_loss(model, collate([[d]]))[0]) for d in docs]
    batch = collate([docs, docs[::-1]])
    lp = np.array(token_logprobs(model, hidden(model, batch), batch.targets, chunk=8))
    w, seg = np.array(batch.weights), np.array(batch.segments)
    for row, order in ((0, [0, 1, 2]), (1, [2, 1, 0])):
        got = [-(lp[row] * w[row])[seg[row] == d].sum() / w[row][seg[row] == d].sum() for d in range(3)]
        np.testing.assert_allclose(got, [alone[i] for i in order], rtol=1e-5)


@pytest.mark.parametrize("head", ["frozen", "frozen-split", "trained"])
def test_chunked_loss_equals_full_logits_loss_and_gradients(models, head, monkeypatch):
    """Frozen head: the fused cross-entropy (gradient in the forward pass), its float head
    split across CPU streams when large ("frozen-split": every head split here); a trained
    head (full fine-tune): the checkpointed chunks."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_lfm2.model import device

    splits = []
    if head == "frozen-split":
        if len(device.cpu_streams()) < 2:
            pytest.skip("one CPU stream: nothing to split across")
        monkeypatch.setattr(device, "MIN_WEIGHTS", 0)
        real = device.split
        monkeypatch.setattr(device, "split", lambda part, n, work, axis=-1: splits.append(n) or real(part, n, work, axis))
    model, _ = load(models["tiny-moe"])
    apply_lora(model, -1, rank=4)
    trainable_adapters(model)
    if head == "trained":
        model.unfreeze()
    rng = np.random.default_rng(1)
    batch = collate([[Example(rng.integers(0, 270, 40).tolist(), [0] + [1] * 39)]] * 2)
    (a, _), ga = nn.value_and_grad(model, lambda m, b: sft_loss(m, b, chunk=7))(model, batch)
    (b, _), gb = nn.value_and_grad(model, full_logits_loss)(model, batch)
    assert abs(float(a) - float(b)) < 1e-5
    for (k, x), (_, y) in zip(tree_flatten(ga), tree_flatten(gb)):
        np.testing.assert_allclose(np.array(x), np.array(y), atol=2e-5, rtol=1e-4, err_msg=k)
    assert bool(splits) == (head == "frozen-split")


def rows(n=20):
    return [{"prompt": f"key {i}?", "completion": f"value {i * 7 % 13}."} for i in range(n)]


def test_step_zero_loss_equals_mlx_lm(models, tmp_path):
    """Same folder, same rows, mlx-lm's evaluate with a fresh LoRA (the identity). Rows are cut
    to 24 tokens: mlx-lm's mask also counts one padding target after each shorter row."""
    trainer = pytest.importorskip("mlx_lm.tuner.trainer")
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load as mlx_lm_load
    from types import SimpleNamespace

    theirs, their_tok = mlx_lm_load(str(models["tiny-moe"]))
    theirs.freeze()
    linear_to_lora_layers(theirs, 4, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    data = rows(8) + [{"text": "plain text row number %d" % i} for i in range(4)] + \
        [{"messages": CHAT[:2] + [{"role": "assistant", "content": "Cold."}]}] * 4
    want = []
    for part in (data[:8], data[8:12], data[12:]):
        ds = CacheDataset(create_dataset(part, their_tok, SimpleNamespace(mask_prompt=False)))
        want.append(float(trainer.evaluate(theirs, ds, batch_size=4, num_batches=-1, max_seq_length=24)))
    model, tok = load(models["tiny-moe"])
    apply_lora(model, 4)
    cfg = TrainConfig(batch_size=4, max_seq_length=24)
    enc = Encoder(tok, max_seq_length=24)
    got = [evaluate(model, Batches([enc.encode(r, "x") for r in part], cfg, 0), -1, loss_fn(cfg))
           for part in (data[:8], data[8:12], data[12:])]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def adapted(folder):
    model, tok = load(folder)
    mx.random.seed(0)  # the LoRA A init: the same in every run
    apply_lora(model, -1, rank=8, scale=10.0)
    trainable_adapters(model)
    return model, tok


def train_run(folder, data_dir, adapter_dir, **kw):
    model, tok = adapted(folder)
    data = load_datasets(str(data_dir), tok, mask_prompt=True, max_seq_length=256)
    cfg = TrainConfig(**{"batch_size": 4, "iters": 6, "learning_rate": 3e-3, "steps_per_report": 100,
                         "steps_per_eval": 1000, "save_every": 3, "adapter_path": str(adapter_dir),
                         "max_grad_norm": 1.0, **kw})
    from mlx_lfm2.weights.adapters import adapter_config

    result = train(model, cfg, data["train"], data["valid"], 0,
                   adapter_config(model, "lora", -1, {"rank": 8, "scale": 10.0}), out=lambda s: None)
    return model, tok, result


def test_grad_checkpoint_gives_the_same_loss_and_gradients_on_a_packed_batch(models):
    """The recompute in the backward pass keeps the documents apart (it runs after the forward's
    packing context has exited)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lfm2.train.trainer import checkpointed_blocks

    model, _ = adapted(models["tiny-moe"])
    rng = np.random.default_rng(1)
    batch = collate([[Example(rng.integers(14, 270, n).tolist(), [0] + [1] * (n - 1)) for n in (7, 12)]])
    grad = nn.value_and_grad(model, lambda m, b: sft_loss(m, b)[0])
    runs = []
    for on in (False, True):
        with checkpointed_blocks(model, on):
            value, g = grad(model, batch)
        mx.eval(value, g)
        runs.append((float(value), dict(tree_flatten(g))))
    (v0, g0), (v1, g1) = runs
    assert abs(v0 - v1) < 1e-5 and g0.keys() == g1.keys()
    bad = [(k, float(np.abs(np.array(g0[k]) - np.array(g1[k])).max()), float(np.abs(np.array(g0[k])).max())) for k in g0
           if not np.allclose(np.array(g0[k]), np.array(g1[k]), rtol=1e-4, atol=1e-6)]
    assert not bad, bad
    assert sum(float(mx.abs(g).sum()) for g in g0.values()) > 0


def test_resume_takes_the_same_steps_as_an_uninterrupted_run(models, tmp_path):
    write_jsonl(tmp_path / "data/train.jsonl", rows(12))
    whole, _, _ = train_run(models["tiny-dense"], tmp_path / "data", tmp_path / "whole", pack=True, max_seq_length=128)
    train_run(models["tiny-dense"], tmp_path / "data", tmp_path / "half", iters=3, pack=True, max_seq_length=128)
    from mlx_lfm2.train.trainer import TrainConfig as C, train as run
    from mlx_lfm2.weights.adapters import adapter_config, read_weights

    model, tok = adapted(models["tiny-dense"])
    model.load_weights(list(read_weights(tmp_path / "half/adapters.safetensors").items()), strict=False)
    data = load_datasets(str(tmp_path / "data"), tok, mask_prompt=True)
    cfg = C(batch_size=4, iters=6, learning_rate=3e-3, save_every=3, adapter_path=str(tmp_path / "half"),
            max_grad_norm=1.0, pack=True, max_seq_length=128, steps_per_report=100)
    result = run(model, cfg, data["train"], [], 0, adapter_config(model, "lora", -1, {"rank": 8, "scale": 10.0}),
                 resume=tmp_path / "half/adapters.safetensors", out=lambda s: None)
    assert result["step"] == 6
    a, b = mx.load(str(tmp_path / "whole/adapters.safetensors")), mx.load(str(tmp_path / "half/adapters.safetensors"))
    assert sorted(a) == sorted(b) and (tmp_path / "half/0000006_adapters.safetensors").exists()
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-6, err_msg=k)


def greedy(model, tok, prompt, n):
    from mlx_lfm2 import generate

    return generate(model, tok, prompt, max_tokens=n, verbose=False)


def test_dpo_starts_at_log2_and_raises_the_chosen_margin(models, tmp_path):
    """The reference is the model with adapters off: at step 0 the policy equals it (loss ln 2)."""
    from mlx_lfm2.train.losses import sequence_logprobs
    from mlx_lfm2.weights.adapters import adapter_config

    pairs = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(8)]
    write_jsonl(tmp_path / "data/train.jsonl", pairs)
    model, tok = adapted(models["tiny-moe"])
    data = load_datasets(str(tmp_path / "data"), tok)
    cfg = TrainConfig(batch_size=4, iters=8, learning_rate=3e-3, train_mode="dpo", adapter_path=str(tmp_path / "a"),
                      steps_per_report=100, save_every=100)
    batches = Batches(data["train"], cfg, 0)
    assert abs(evaluate(model, batches, -1, loss_fn(cfg)) - np.log(2)) < 1e-5

    def margin():
        return sum(float((sequence_logprobs(model, c) - sequence_logprobs(model, r)).sum())
                   for c, r in (batches[i] for i in range(batches.per_epoch())))

    before = margin()
    train(model, cfg, data["train"], [], 0, adapter_config(model, "lora", -1, {"rank": 8, "scale": 10.0}),
          out=lambda s: None)
    assert margin() > before + 1.0
    assert evaluate(model, batches, -1, loss_fn(cfg)) < np.log(2) - 0.05


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tiny-dense", "tiny-moe", "tiny-moe-4bit"])
def test_overfitting_twenty_rows_then_greedy_reproduces_them(models, tmp_path, kind):
    folder = models[kind.replace("-4bit", "")]
    if kind.endswith("4bit"):
        from mlx_lfm2.weights.conversion import convert

        folder = convert(folder, tmp_path / "q4", quantize=True, q_group_size=32, dtype="float32", progress=False)
    data = rows(20)
    write_jsonl(tmp_path / "data/train.jsonl", data)
    model, tok = load(folder)
    mx.random.seed(0)
    apply_lora(model, -1, rank=16, scale=20.0)
    trainable_adapters(model)
    sets = load_datasets(str(tmp_path / "data"), tok, mask_prompt=True)
    # lr 3e-4 at scale 20: at 1e-3 and above Adam's steps grow the adapters' output until the
    # residual stream is ~1e11 (this random base's tied head predicts the input token; swamping the
    # residual before the final norm is the quickest way off that), the key's signal drowns in the
    # float32 norm and every key gets one value. mlx_lm.lora does the same on this data at 1e-2
    # (residual 8e10, one value for every key) and learns it at 3e-4 (docs/BENCHMARKS.md).
    cfg = TrainConfig(batch_size=4, iters=80, learning_rate=3e-4, max_grad_norm=1.0, pack=True, max_seq_length=128,
                      adapter_path=str(tmp_path / "a"), steps_per_report=1000, save_every=1000)
    batches = Batches(sets["train"], cfg, 0, pack=False)
    start = evaluate(model, batches, -1, loss_fn(cfg))
    from mlx_lfm2.weights.adapters import adapter_config

    train(model, cfg, sets["train"], [], 0, adapter_config(model, "lora", -1, {"rank": 16, "scale": 20.0}),
          out=lambda s: None)
    end = evaluate(model, batches, -1, loss_fn(cfg))
    # Below log(13)/10, the plateau of a model that learned everything but which value a key maps to.
    assert end < 0.05 < np.log(13) / 10 and start > 20, (start, end)
    from mlx_lfm2 import generate

    def reply(r):  # greedy (the default without a generation_config)
        prompt = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
        return generate(model, tok, prompt, max_tokens=12)

    replies = [reply(r) for r in data]
    assert sum(a == r["completion"] for a, r in zip(replies, data)) >= 19, replies


def test_lora_cli_with_yaml_config_trains_on_the_tool_calling_fixture(models, tmp_path):
    """The README's example: mlx-lm's flags and YAML, the fixture data, an adapter mlx-lm can read."""
    from conftest import ROOT

    data = ROOT / "tests/fixtures/tool_calls_sft"
    _, tok = load(models["tiny-moe"])
    sets = load_datasets(str(data), tok, mask_prompt=True)
    assert len(sets["train"]) == 10 and len(sets["valid"]) == 2 and all(sum(e.weights) for e in sets["train"])
    (tmp_path / "cfg.yaml").write_text(
        f"model: {models['tiny-moe']}\ntrain: true\ndata: {data}\nmask_prompt: true\nbatch_size: 2\n"
        "iters: 3\nlearning_rate: 1.0e-3\nlora_parameters: {rank: 4, scale: 10.0, dropout: 0.0, expert_rank: 2}\n"
        f"adapter_path: {tmp_path / 'ad'}\nsteps_per_report: 1\nsteps_per_eval: 2\nval_batches: -1\n")
    out = subprocess.run([sys.executable, "-m", "mlx_lfm2.lora", "-c", str(tmp_path / "cfg.yaml"), "--num-layers", "2",
                          "--max-grad-norm", "1.0", "--pack", "--max-seq-length", "1024"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if l.startswith("step ")]
    assert lines[0].startswith("step 1/3 | loss ") and " tok/s " in lines[0] and " peak " in lines[0] and "ETA" in lines[0]
    cfg = json.loads((tmp_path / "ad/adapter_config.json").read_text())
    assert cfg["num_layers"] == 2 and cfg["lora_parameters"]["expert_rank"] == 2 and cfg["fine_tune_type"] == "lora"
    model, _ = load(models["tiny-moe"], adapter_path=tmp_path / "ad")
    assert model.layers[3].feed_forward.experts.w1.lora_a.shape[1] == 2
    bad = subprocess.run([sys.executable, "-m", "mlx_lfm2.lora", "--model", str(models["tiny-moe"]), "--train",
                          "--data", str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "neither a folder" in bad.stderr
