"""Memory: what a request will need at its peak, predicted from the model's config alone, and
the budget the server admits requests against.

Only what a request adds is predicted; the weights are counted once, from the loaded arrays
(``serve.metrics.model_bytes``). A request runs as the server runs it (engine/batch.py): its
prompt is prefilled alone in chunks into an ordinary cache (model/cache.py), then joins the
batched cache (model/batch_cache.py) and decodes one token a step. Its peak is the largest of

* prefill: the chunk that ends the prompt, when the cache holds the whole prefix. Live then:
  the KV buffer (grown in steps of ``KVCache.step`` positions; growing copies the old buffer,
  so one layer holds both for a moment), each conv layer's state, checkpoints (every chunk's
  end and every ``ConvCache.block``) and the chunk's conv inputs that ``ConvCache.recent``
  keeps (views of whole-chunk arrays), and the activations of the layer at work: where
  attention has no fused kernel (``attention_scores``) its scores against the prefix, all
  heads at once, ``H x chunk x T`` in the activations' dtype (MLX masks and softmaxes them in
  place: one copy, measured) and the causal mask's ``chunk x T`` booleans; a feed-forward's
  ``chunk x F`` buffers, or the MoE's routed copies ``chunk x K x (D, F)`` (tokens sorted by
  expert) and, for a quantized model on float32 activations, its scales and biases cast to
  float32. A chunk before the last token evaluates only the caches: the last layer's output
  is never needed, so that layer only writes its cache (no scores, no feed-forward);
* join and decode: the batched KV buffer at ``prompt + max_tokens`` positions (rounded up to
  the step) and one layer's buffer more (joining copies the single cache in a layer at a time,
  growing copies a layer), and the step's logits (``vocab`` float32 per row).

A batch (``batch_peak``, what ``serve.admission`` reserves) is not the sum of its rows: the
batched cache left-pads every row to the longest (model/batch_cache.py), so each row takes the
longest row's positions; and one row prefills at a time beside the others' decode.

Dimensions: P prompt tokens, M max_tokens, T = P + M, C prefill chunk, D hidden, H / H_kv
query / key-value heads, Dh head dim, F FFN width, E experts, K experts per token, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..model.batch_cache import BatchKVCache
from ..model.cache import ConvCache, KVCache
from ..model.config import ModelArgs
from .disk_cache import parse_bytes

# Head dims of MLX's fused attention kernels (mlx/backend/{metal,cuda}/scaled_dot_product_attention.cpp,
# ml-explore/mlx 846d176): Metal's full kernel (more than 8 queries; 192 and 256 exist but MLX runs
# those unfused, as faster) and vector kernel (at most 8 queries, queries x GQA factor at most 32);
# CUDA's cuDNN kernel (float16/bfloat16, multiples of 8 up to 128, Ampere or later) and vector
# kernel (fewer than 4 queries, no array mask).
METAL_FULL, METAL_VECTOR, CUDA_VECTOR = (64, 72, 80, 96, 128), (64, 96, 128, 256), (64, 96, 128)

# MLX's temporaries beyond a feed-forward's named buffers (copies made by split matmuls and
# their concatenation across CPU streams, casts): a multiple of them, measured with
# bench/memory_predict.py (24B-A2B-narrow: 0.98 of the measured peak at 1k tokens).
TEMPORARIES = 1.5
SCORES = 1  # score matrices alive at once in unfused attention (masked and softmaxed in place)


def default_budget() -> int:
    """Bytes the server may use: the same memory probe the first run sizes the model by
    (``weights.provision.machine``: the GPU's recommended working set, else system memory)."""
    from ..weights.provision import GB, machine

    return int(machine().working_set_gb * GB)


def budget_bytes(text: Optional[str]) -> int:
    """``--memory-budget``: ``"24G"``, ``"512M"``, a number of bytes, or None for
    ``default_budget()``."""
    if text is None:
        return default_budget()
    return parse_bytes(text)


@dataclass(frozen=True)
class Shapes:
    """How a model runs, beyond its config: activation bytes (the KV cache's too), the
    prefill chunk, the backend whose attention kernels run (``device.runtime``,
    ``attention_scores``), whether MoE scales are cast."""

    act_bytes: int = 2
    prefill_step: int = 2048
    backend: str = "metal"  # "cpu", "metal", "cuda", or "cuda-old" (before Ampere: no cuDNN attention)
    float32_scales: bool = False  # quantized weights, float32 activations: scales cast per call
    group_size: int = 64

    @classmethod
    def of(cls, model, prefill_step: Optional[int] = None) -> "Shapes":
        """The shapes of a loaded ``model`` on this device."""
        import mlx.core as mx

        from ..model import device
        from .decode import default_prefill_step

        emb = model.model.embed_tokens
        dtype = model.compute_dtype or (emb["scales"].dtype if "scales" in emb else emb["weight"].dtype)
        q = model.args.quantization or {}
        return cls(dtype.size, prefill_step or default_prefill_step(), device.runtime(),
                   bool(q) and dtype == mx.float32, int(q.get("group_size", 64)))


def attention_scores(args: ModelArgs, shapes: Shapes, rows: int, queries: int, keys: int) -> int:
    """Bytes MLX holds for attention's scores when ``rows`` x ``queries`` attend to ``keys``
    positions: none where a fused kernel runs, else (``mx.fast.scaled_dot_product_attention``'s
    fallback, the CPU's only path) every head's ``queries x keys`` scores at once in the
    activations' dtype, masked and softmaxed in place, beside the boolean mask."""
    Dh, gqa = args.head_dim, args.num_attention_heads // args.num_key_value_heads
    if shapes.backend == "metal":
        fused = Dh in METAL_FULL if queries > 8 else Dh in METAL_VECTOR and queries * gqa <= 32
    elif shapes.backend.startswith("cuda"):
        cudnn = shapes.backend == "cuda" and shapes.act_bytes == 2 and Dh % 8 == 0 and Dh <= 128
        # one query: the vector kernel takes no array mask (a batch's is one), cuDNN only some caches
        fused = queries >= 4 and cudnn or queries < 4 and rows == 1 and Dh in CUDA_VECTOR
    else:
        fused = False
    if fused:
        return 0
    return SCORES * rows * args.num_attention_heads * queries * keys * shapes.act_bytes + rows * queries * keys


def kv_capacity(tokens: int, step: int = KVCache.step) -> int:
    """Positions a KV buffer holds once ``tokens`` are written (grown in ``step``s)."""
    return -(-tokens // step) * step


def _prefill_capacity(body: int, chunk: int, step: int = KVCache.step) -> int:
    """Positions of the single-sequence KV buffer after ``body`` tokens in ``chunk``s (as
    ``KVCache.update_and_fetch`` grows it: by whole steps covering the chunk)."""
    cap = pos = 0
    while pos < body:
        L = min(chunk, body - pos)
        if pos + L > cap:
            cap += -(-L // step) * step
        pos += L
    return cap


def predict(args: ModelArgs, prompt_tokens: int, max_tokens: int, shapes: Shapes = Shapes()) -> int:
    """Peak bytes one request adds while it prefills ``prompt_tokens`` (all of them, cached
    ones included: the batch holds their KV) and decodes ``max_tokens`` (see the module
    docstring); the weights are not included."""
    return max(phases(args, prompt_tokens, max_tokens, shapes).values())


@dataclass(frozen=True)
class Row:
    """One request of a batch: its prompt's tokens (cached ones included), its reply's limit,
    and whether it decodes already (False: its prefill may still be ahead)."""

    prompt: int
    max_tokens: int
    decoding: bool = False


def phases(args: ModelArgs, prompt_tokens: int, max_tokens: int, shapes: Shapes = Shapes()) -> dict:
    """``{"prefill": bytes, "decode": bytes}``: the peak of each phase (``predict``: the larger)."""
    row = Row(max(1, prompt_tokens), max(0, max_tokens))
    return {"prefill": _prefill(args, row, shapes), "decode": _decode(args, [row], shapes)}


def batch_peak(args: ModelArgs, rows: list, shapes: Shapes = Shapes()) -> int:
    """Peak bytes a batch of ``rows`` (``Row``) adds, as engine/batch.py runs it: every row
    in the batched KV cache at the longest row's length (left padding, model/batch_cache.py:
    a short row beside a long one takes the long one's positions), while one row at a time
    prefills beside the others. One row: ``predict``."""
    if not rows:
        return 0
    peak = _decode(args, rows, shapes)
    for i, r in enumerate(rows):
        if not r.decoding:
            peak = max(peak, _prefill(args, r, shapes) + _decode(args, rows[:i] + rows[i + 1 :], shapes))
    return int(peak)


def _sizes(args: ModelArgs, a: int) -> tuple[int, int, int]:
    """Attention layers, conv layers, one attention layer's KV bytes per position."""
    n_attn = sum(args.is_attention(i) for i in range(args.num_hidden_layers))
    return n_attn, args.num_hidden_layers - n_attn, 2 * args.num_key_value_heads * args.head_dim * a


def _conv(args: ModelArgs, P: int, shapes: Shapes) -> int:
    """A row's conv states with the checkpoints its prefill leaves (every chunk's end, every block)."""
    _, n_conv, _ = _sizes(args, shapes.act_bytes)
    body = P - 1
    kept = min(ConvCache.max_checkpoints, body // shapes.prefill_step + body // ConvCache.block + 1)
    return n_conv * (args.conv_L_cache - 1) * args.hidden_size * shapes.act_bytes * (1 + kept)


def _prefill(args: ModelArgs, row: Row, shapes: Shapes) -> int:
    """The prefill's peak: its last chunk against the whole prefix (module docstring)."""
    a, C, P, D = shapes.act_bytes, shapes.prefill_step, row.prompt, args.hidden_size
    n_attn, n_conv, kv_token = _sizes(args, a)
    body = P - 1
    chunk = min(C, body) if body else 1
    single_cap = max(_prefill_capacity(body, C), kv_capacity(P))
    single = n_attn * kv_token * single_cap
    recent = n_conv * (2 * chunk + args.conv_L_cache - 1) * D * a  # the last chunk's conv inputs (module docstring)
    grow = kv_token * single_cap  # one layer's buffer copied (as it grows, or written in place of a view)
    # a chunk evaluates the caches only; the last token's step is decode-sized
    return int(single + _conv(args, P, shapes) + recent + grow + _layer_peak(args, shapes, 1, chunk, P, cache_only=True))


def _decode(args: ModelArgs, rows: list, shapes: Shapes) -> int:
    """Decoding ``rows`` together: the batched KV buffer, every row at the longest row's end
    (rounded up to the step), and one layer's buffer more (growing copies a layer, and so does
    the first row's join); a row joining others costs a layer's buffer more again and its own
    cache's layer (measured: tests/test_admission.py); each row's conv state and logits; one
    layer's activations for a token per row."""
    if not rows:
        return 0
    n_attn, _, kv_token = _sizes(args, shapes.act_bytes)
    T = max(r.prompt + r.max_tokens for r in rows)
    cap = max(kv_capacity(T, BatchKVCache.step), max(r.prompt for r in rows) + 1)
    logits = args.vocab_size * 4 * 3  # float32 logits, log-probabilities, the sampler's copy
    kv = (n_attn + 1) * kv_token * cap * len(rows)
    if len(rows) > 1:  # a row joining others: per layer, the old rows and the new one placed at the
        # batch's capacity beside their concatenation, and the new row's own cache of that layer
        kv += kv_token * (cap * len(rows) + max(kv_capacity(r.prompt) for r in rows))
    conv = sum(_conv(args, r.prompt, shapes) for r in rows)
    return int(kv + conv + logits * len(rows) + _layer_peak(args, shapes, len(rows), 1, T))


def _layer_peak(args: ModelArgs, shapes: Shapes, rows: int, queries: int, T: int, cache_only: bool = False) -> int:
    """The largest of one layer's activations for ``rows`` x ``queries`` new tokens against
    ``T`` positions; ``cache_only``: only the caches are evaluated, so the last layer stops
    at its cache's inputs (its attention and feed-forward never run)."""
    a, D, L = shapes.act_bytes, args.hidden_size, rows * queries
    H, H_kv, Dh = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    run = range(args.num_hidden_layers - 1 if cache_only else args.num_hidden_layers)  # layers run whole
    hidden = 4 * L * D * a  # the residual stream, its norm, the layer's output, the op's output
    attn = L * (H + 2 * H_kv) * Dh * a  # q, k, v
    if any(args.is_attention(i) for i in run):
        attn += attention_scores(args, shapes, rows, queries, T)
    conv = 4 * L * D * a  # in_proj's three outputs, B * x
    dense = 3 * L * args.intermediate_size * a if any(not args.is_moe(i) for i in run) else 0  # gate, up, product
    moe = 0
    if any(args.is_moe(i) for i in run):
        E, K, F = args.num_experts, args.num_experts_per_tok, args.moe_intermediate_size
        moe = 4 * L * E * 4 + L * K * (3 * D + 3 * F) * a  # router (float32); routed copies
        if shapes.float32_scales:  # scales and biases of one matrix pair, cast to float32
            moe += 2 * 2 * E * F * (D // shapes.group_size) * 4
    return hidden + max(attn, conv, TEMPORARIES * max(dense, moe))  # the op's buffers are gone when the FFN runs
