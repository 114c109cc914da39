"""One QLoRA step on the real LFM2-24B-A2B shapes, measured on a few of its layers and fitted
to all 40 (``bench/lora.py --full-shapes`` runs it).

The model is built in memory from the 40-layer preset's config, keeping only the chosen layer
indices (in the real order: layers 0-1 dense, the rest MoE; conv or attention as the preset's
``layer_types``), quantized layer by layer to 4 bits with bfloat16 scales (what conversion
writes), rank-``r`` LoRA on every matmul incl. the experts, ``--grad-checkpoint``, activations
in float32 (the CPU's compute dtype; bfloat16 on a GPU). One step, evaluated as the trainer
does it, reports MLX's peak and what is resident after it.

The fit: ``peak = resident + saved * L + transient``, where ``resident`` is the weights,
the adapters and Adam's two moments (their byte counts come from the shapes: ``bytes_of``),
``saved * L`` what grows with depth while the step runs (each block's checkpointed input and
its adapters' gradients), and ``transient`` one block's recompute + backward plus the loss
chunk (the costliest block: a MoE attention layer).
"""

from __future__ import annotations

import time

LAYERS = 40


def real_args(indices: list[int]):
    """``ModelArgs`` of the 24B-A2B layers ``indices`` (sorted), kinds as in the 40-layer model."""
    from mlx_lfm2.model.config import ModelArgs
    from mlx_lfm2.weights.random_checkpoint import PRESETS

    full = PRESETS["24b-a2b"](LAYERS)
    cfg = dict(full, num_hidden_layers=len(indices), layer_types=[full["layer_types"][i] for i in indices],
               num_dense_layers=sum(i < full["num_dense_layers"] for i in indices))
    return ModelArgs.from_dict(cfg)


def layer_kind(args, i: int) -> str:
    return ("moe" if args.is_moe(i) else "dense") + "-" + ("attn" if args.is_attention(i) else "conv")


def nbytes(tree) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(tree))


def build(indices: list[int], rank: int):
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_lfm2.model.blocks import Model
    from mlx_lfm2.model.lora import apply_lora, trainable_adapters

    args = real_args(indices)
    model = Model(args)
    quantizable = lambda p, m: hasattr(m, "to_quantized") and not p.endswith("gate")
    emb = model.model.embed_tokens
    emb.set_dtype(mx.bfloat16)
    model.model.embed_tokens = emb.to_quantized(64, 4)  # nn.quantize skips the module it is given
    del emb
    for layer in model.layers:  # one layer's float weights at a time
        layer.set_dtype(mx.bfloat16)
        nn.quantize(layer, 64, 4, class_predicate=quantizable)
        mx.eval(layer.parameters())
    model.model.embedding_norm.set_dtype(mx.bfloat16)
    model.compute_dtype = mx.float32
    apply_lora(model, -1, rank=rank)
    trainable_adapters(model)
    mx.eval(model.parameters())
    return args, model


def step(indices: list[int], rank: int, seq: int) -> dict:
    """One step on layers ``indices``; byte counts per layer and the measured peak."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from mlx_lfm2.train.losses import sft_loss
    from mlx_lfm2.train.packing import Batch
    from mlx_lfm2.train.trainer import checkpointed_blocks

    args, model = build(indices, rank)
    adapters = nbytes(model.trainable_parameters())
    per_layer = [{"index": i, "kind": layer_kind(args, n), "weights": nbytes(layer.parameters()) - nbytes(
        layer.trainable_parameters()), "adapters": nbytes(layer.trainable_parameters())}
        for n, (i, layer) in enumerate(zip(indices, model.layers))]
    before = mx.get_active_memory()
    ids = mx.random.randint(0, args.vocab_size, (1, seq + 1))
    batch = Batch(ids[:, :-1], ids[:, 1:], mx.ones((1, seq)))
    mx.eval(batch.inputs, batch.targets, batch.weights)
    opt = optim.Adam(learning_rate=1e-5)
    opt.init(model.trainable_parameters())  # Adam's moments resident from the start: the steady state
    mx.eval(opt.state)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    with checkpointed_blocks(model, True):  # --grad-checkpoint, as mlx_lfm2.train.trainer.train
        (loss, _), grads = nn.value_and_grad(model, sft_loss)(model, batch)
        opt.update(model, grads)
        mx.eval(model.trainable_parameters(), opt.state, loss)
    dt = time.perf_counter() - t0
    del grads
    return {"indices": indices, "seq": seq, "rank": rank, "layers": per_layer,
            "weights_total": nbytes(model.parameters()) - adapters, "adapters": adapters,
            "opt_state": nbytes(opt.state), "active_before": before, "active_after": mx.get_active_memory(),
            "peak": mx.get_peak_memory(), "step_s": dt, "loss": float(loss)}


def shapes_bytes(rank: int) -> dict:
    """Weights and adapter bytes of each of the 40 layers and of the rest, from the shapes only
    (layers are built one at a time; nothing is run)."""
    import mlx.core as mx

    out = {}
    args = real_args(list(range(LAYERS)))
    kinds = {layer_kind(args, i): i for i in range(LAYERS)}
    for kind, i in kinds.items():
        _, model = build([i], rank)
        layer = model.layers[0]
        out[kind] = {"count": sum(layer_kind(args, j) == kind for j in range(LAYERS)),
                     "weights": nbytes(layer.parameters()) - nbytes(layer.trainable_parameters()),
                     "adapters": nbytes(layer.trainable_parameters())}
        out["rest"] = nbytes(model.parameters()) - nbytes(layer.parameters())  # embedding + final norm
        del model, layer
        mx.clear_cache()
    return out


def block_transient(index: int, rank: int, seq: int) -> dict:
    """What one checkpointed block's forward, recompute and backward add at ``seq`` tokens
    (layer ``index`` of the 40, alone): MLX's peak over what was resident before."""
    import mlx.core as mx

    from mlx_lfm2.train.trainer import checkpointed_blocks

    args, model = build([index], rank)
    block = model.layers[0]
    x = mx.random.normal((1, seq, args.hidden_size))
    cot = mx.random.normal((1, seq, args.hidden_size))
    mx.eval(x, cot)

    def f(params, x):
        block.update(params)
        return (block(x, None, "causal") * cot).sum()

    before = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    with checkpointed_blocks(model, True):
        value, (g_params, g_x) = mx.value_and_grad(f, argnums=(0, 1))(block.trainable_parameters(), x)
        mx.eval(value, g_params, g_x)
    return {"index": index, "kind": layer_kind(args, 0), "seq": seq, "rank": rank, "active_before": before,
            "peak": mx.get_peak_memory(), "transient": mx.get_peak_memory() - before,
            "grads": nbytes(g_params), "step_s": time.perf_counter() - t0}


def law(points: list[dict], block: dict, shapes: dict, seq: int) -> dict:
    """The 40-layer peak at ``seq`` tokens from the measured terms (bytes; see the module doc).

    ``points``: two or more ``step`` runs at one length, each adding a MoE layer to the last;
    ``block``: ``block_transient`` of the costliest block at ``seq``; ``shapes``: ``shapes_bytes``.
    """
    D = 2048
    kinds = {k: v for k, v in shapes.items() if k != "rest"}
    resident = shapes["rest"] + sum(v["count"] * (v["weights"] + 3 * v["adapters"]) for v in kinds.values())
    # Per layer while the step runs, beyond the resident: measured between runs one MoE layer apart.
    a, b = points[-2], points[-1]
    grow = ((b["peak"] - b["active_after"]) - (a["peak"] - a["active_after"])) / (len(b["indices"]) - len(a["indices"]))
    added = b["layers"][-1]["adapters"]  # the added layer's adapter gradients
    per_layer_counted = a["seq"] * D * 4 + added
    # What the measured runs' step adds beyond the resident and the per-layer terms: the loss chunk
    # and the (short) blocks' transient at the runs' length.
    loss_part = b["peak"] - b["active_after"] - grow * len(b["indices"])
    layers = sum(v["count"] for v in kinds.values())
    saved = layers * (seq * D * 4)  # each block's checkpointed input, float32
    grads = sum(v["count"] * v["adapters"] for v in kinds.values())
    peak = resident + saved + grads + max(block["transient"], loss_part)
    return {"seq": seq, "layers": layers, "resident": resident, "saved_inputs": saved, "adapter_grads": grads,
            "block_transient": block["transient"], "loss_part_at_run_seq": loss_part,
            "per_layer_measured": grow, "per_layer_counted": per_layer_counted, "peak": peak}
