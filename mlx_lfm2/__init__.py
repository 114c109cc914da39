"""Liquid AI's LFM2 and LFM2-MoE models on MLX.

    from mlx_lfm2 import load, generate
    model, tokenizer = load("LiquidAI/LFM2-24B-A2B")   # or a local / converted folder
    print(generate(model, tokenizer, "Hello!", max_tokens=64))
"""

from importlib import import_module

__version__ = "0.1.0"

# Names resolved on first use, so `import mlx_lfm2` stays cheap.
_EXPORTS = {
    "load": "loader", "load_model": "loader", "Model": "model", "ModelArgs": "config",
    "generate": "generation", "stream_generate": "generation", "GenerationResponse": "generation",
    "convert": "conversion", "parse_tool_calls": "tools", "get_json_schema": "chat_template",
    "Chat": "session", "make_sampler": "sample", "make_logits_processors": "sample",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mlx_lfm2' has no attribute {name!r}")
