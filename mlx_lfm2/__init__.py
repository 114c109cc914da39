"""Liquid AI's LFM2 and LFM2-MoE models on MLX.

    from mlx_lfm2 import load, generate
    model, tokenizer = load("LiquidAI/LFM2-24B-A2B")   # or a local / converted folder
    print(generate(model, tokenizer, "Hello!", max_tokens=64))
"""

import sys
import types
from importlib import import_module

__version__ = "0.1.0"

# Names resolved on first use, so `import mlx_lfm2` stays cheap.
_EXPORTS = {
    "load": "weights.loader", "load_model": "weights.loader", "Model": "model.blocks",
    "ModelArgs": "model.config", "generate": "engine.generation", "stream_generate": "engine.generation",
    "GenerationResponse": "engine.generation", "convert": "weights.conversion",
    "parse_tool_calls": "text.tools", "get_json_schema": "text.chat_template", "Chat": "engine.session",
    "make_sampler": "engine.sample", "make_logits_processors": "engine.sample",
    "TokenIdError": "engine.validate",
    "batch_generate": "engine.batch", "BatchGenerator": "engine.batch",
    "ConstraintError": "text.constraints", "tool_call_grammar": "text.tool_grammar",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mlx_lfm2' has no attribute {name!r}")


class _Package(types.ModuleType):
    """``import mlx_lfm2.generate`` (the CLI module, named after mlx-lm's) would bind the
    module over ``mlx_lfm2.generate`` the function; the function keeps its name instead."""

    def __setattr__(self, name, value):
        if name == "generate" and isinstance(value, types.ModuleType):
            return  # the import system's setattr(parent, child, module): the CLI stays in sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
