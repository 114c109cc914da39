"""Many LoRA adapters resident on one base model, chosen per batch row.

``attach(model)`` gives an unfused model an ``AdapterSet`` (``model.adapter_set``). Each
matmul layer an adapter targets becomes a slot layer (``DenseSlots``, ``ExpertSlots``) that
keeps its base as ``linear`` and the A/B of every resident adapter stacked: slot 0 is zeros
(the base), each other slot one adapter's or free (zeros where no adapter, or where the
slot's adapter leaves the layer alone; ranks zero-padded to the layer's largest). Before a forward the caller says which adapter each
batch row takes, ``adapter_set.use([name or None, ...])``; the model never learns who calls
it. A forward then runs in one of three modes:

* every row the base: the slot layers compute exactly as their base;
* every row one adapter n (a prefill, a batch of one adapter): ``base(x) + s_n (x A_n) B_n``,
  what ``LoRALinear`` / ``LoRASwitchLinear`` compute;
* rows on different adapters: the deltas are gathered per row (``lora.gathered_delta``). For
  experts the expert index and the row's slot are folded into one, ``expert * N + slot``
  (``RowsGLU``), and the stacks are laid out ``[E, N, ...]``: the sort by expert that long
  inputs take then sorts the folded index too, and each (token, expert) pair keeps its slot.

Adapters are added and removed between forwards (``add`` / ``remove``). The stacks are
allocated with spare slots (``AdapterSet.capacity``, doubled when full): an add writes its
adapter's slot in place and evaluates only that, a remove zeros the slot for reuse, so neither
copies the other adapters (whose outputs stay bit for bit what they were). DoRA (its norm is of the whole merged weight) and full fine-tunes cannot
share a base this way; ``weights.adapters.read_resident`` refuses them.

Dimensions: B rows, L tokens, N slots (``capacity``: the base, the adapters, free slots), E experts, r rank.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .experts import SwitchGLU
from .lora import (EXPERT_TYPES, adaptable_modules, expert_lora, gathered_delta, lora_delta, lora_shapes,
                   select_targets)


class NotLoaded(KeyError):
    """A row names an adapter that is not resident."""

    def __str__(self) -> str:
        return str(self.args[0])


class _Slots(nn.Module):
    """A base layer and its adapters' stacks (``stack_a`` / ``stack_b``, absent while no
    resident adapter targets it). A stack holds ``AdapterSet.capacity`` slots; writing one is
    an in-place update of that slot alone (MLX reuses the stack's buffer: nothing else holds it)."""

    stack_axis = 0  # where the slots lie in a stack
    rank_axes = (2, 1)  # the rank axis of stack_a, of stack_b

    def __init__(self, base: nn.Module, adapters: "AdapterSet"):
        super().__init__()
        self.linear = base
        self.adapters = adapters  # a plain attribute: not part of the parameter tree

    @property
    def rank(self) -> int:
        return self["stack_a"].shape[self.rank_axes[0]] if "stack_a" in self else 0

    def write(self, slot: int, a: mx.array, b: mx.array, capacity: int) -> None:
        """Put one adapter's ``a``/``b`` (``LoRALinear``'s / ``LoRASwitchLinear``'s layout) in
        ``slot``. The first adapter here makes the stacks (zeros, ``capacity`` slots); they are
        copied only for an adapter of a larger rank or another dtype than they hold."""
        ax = self.stack_axis
        ra, rb = self.rank_axes
        sa, sb = (r - 1 if r > ax else r for r in self.rank_axes)  # the rank axes of one slot
        if "stack_a" not in self:
            self.stack_a = mx.zeros((*a.shape[:ax], capacity, *a.shape[ax:]), a.dtype)
            self.stack_b = mx.zeros((*b.shape[:ax], capacity, *b.shape[ax:]), b.dtype)
        # One dtype per stack: the adapters' own, or float32 when they differ.
        dt = a.dtype if a.dtype == self["stack_a"].dtype else mx.float32
        rank = max(self.rank, a.shape[sa])
        if rank > self.rank or dt != self["stack_a"].dtype:
            self.stack_a = _pad(self["stack_a"], ra, rank).astype(dt)
            self.stack_b = _pad(self["stack_b"], rb, rank).astype(dt)
        at = (slice(None),) * ax + (slot,)
        self["stack_a"][at] = _pad(a, sa, rank).astype(dt)
        self["stack_b"][at] = _pad(b, sb, rank).astype(dt)

    def clear(self, slot: int) -> None:
        """Zeros in ``slot`` (in place): a free slot adds nothing, whoever takes it next."""
        if "stack_a" in self:
            at = (slice(None),) * self.stack_axis + (slot,)
            self["stack_a"][at] = 0
            self["stack_b"][at] = 0

    def grow(self, capacity: int) -> None:
        """Room for ``capacity`` slots, zeros in the new ones (a copy of the stacks)."""
        if "stack_a" in self:
            self.stack_a = _pad(self["stack_a"], self.stack_axis, capacity)
            self.stack_b = _pad(self["stack_b"], self.stack_axis, capacity)

    def stacks(self) -> list:
        return [self["stack_a"], self["stack_b"]] if "stack_a" in self else []


def _pad(x: mx.array, axis: int, size: int) -> mx.array:
    """``x`` zero-padded along ``axis`` to ``size``."""
    if x.shape[axis] >= size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return mx.pad(x, widths)


class DenseSlots(_Slots):
    """A dense (or quantized) layer with stacks ``[N, in, r]`` / ``[N, r, out]``."""

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        mode = self.adapters.mode
        if mode is None or "stack_a" not in self:
            return y
        if isinstance(mode, int):  # a slice, a view of the stack (an integer index would gather a copy)
            a, b = (mx.squeeze(s[mode:mode + 1], 0) for s in (self["stack_a"], self["stack_b"]))
            return y + lora_delta(x, a, b, self.adapters.scales[mode])
        aset = self.adapters
        return y + gathered_delta(x, self["stack_a"], self["stack_b"], mode, aset.lhs, aset.row_scale)


class ExpertSlots(_Slots):
    """Stacked experts with stacks ``[E, N, r, in]`` / ``[E, N, out, r]``. In the mixed mode its
    indices are folded (``expert * N + slot``, see ``RowsGLU``)."""

    stack_axis = 1
    rank_axes = (2, 3)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        aset = self.adapters
        mode = aset.mode
        mixed = isinstance(mode, mx.array)
        experts, scale = aset.unfold(indices) if mixed else (indices, None)
        y = self.linear(x, experts, sorted_indices=sorted_indices)
        if mode is None or "stack_a" not in self:
            return y
        a, b = self["stack_a"], self["stack_b"]
        if not mixed:
            z = expert_lora(x, a[:, mode], b[:, mode], indices, sorted_indices)
            return y + (aset.scales[mode] * z).astype(y.dtype)
        E, N = a.shape[:2]
        z = expert_lora(x, a.reshape(E * N, *a.shape[2:]), b.reshape(E * N, *b.shape[2:]), indices, sorted_indices)
        return y + (scale * z).astype(y.dtype)


class RowsGLU:
    """A ``SwitchGLU`` whose experts are ``ExpertSlots``: with rows on different adapters, each
    row's slot is folded into its expert indices before the experts run."""

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        mode = self.adapters.mode
        if isinstance(mode, mx.array):  # [B] slots
            indices = indices * self.adapters.capacity + mode.reshape(-1, *([1] * (indices.ndim - 1)))
        return super().__call__(x, indices)


class AdapterSet:
    """The resident adapters of one model and the rows' choice for the next forwards.

    Every stack holds ``capacity`` slots: slot 0 the base's zeros, the others an adapter's or
    free (zeros). A load takes a free slot and writes only the layers its adapter targets; an
    unload zeros its slot for the next load. Only when no slot is free do the stacks grow, to
    twice as many adapters (at most ``limit``), which copies them."""

    def __init__(self, model: nn.Module, limit: Optional[int] = None):
        if any("qkv_proj" in k or "w13" in k for k, _ in model.named_modules()):
            raise ValueError("the model is in a fused runtime layout; load it unfused to keep adapters resident")
        if any("_compiled" in m.__dict__ or type(m).__name__.startswith("Compiled") for _, m in model.named_modules()):
            raise ValueError("the model has compiled decode pieces; load it without them to keep adapters resident")
        self.model = model
        self.limit = limit  # the most adapters resident at once (None: no bound)
        self.blocks, self.top = adaptable_modules(model)  # the base layers, before any slot replaces them
        self.names: list[Optional[str]] = [None]  # slot -> adapter name (None: slot 0, the base, and free slots)
        self.scales: list[float] = [0.0]
        self.scale_array = mx.array([0.0])
        self.info: dict[str, dict] = {}  # name -> what the loader recorded (path, rank, fingerprint), in load order
        self.written: dict[str, list[str]] = {}  # name -> the slot layers its adapter wrote
        self.slots: dict[str, _Slots] = {}  # path from the root -> slot layer
        self.mode = None  # None: the base; int: every row that slot; mx.array [B]: a slot per row
        self._unfolded = None  # (folded indices, experts, scales) of the MoE layer that ran last

    @property
    def capacity(self) -> int:
        """Slots in every stack (the base's and the free ones included)."""
        return len(self.names)

    def __contains__(self, name) -> bool:
        return name in self.info

    @property
    def loaded(self) -> list[str]:
        return list(self.info)

    def slot(self, name: Optional[str]) -> int:
        if name is None:
            return 0
        if name not in self.info:
            raise NotLoaded(f"adapter {name!r} is not loaded (loaded: {', '.join(self.loaded) or 'none'})")
        return self.names.index(name)

    def use(self, names: Sequence[Optional[str]]) -> None:
        """The adapter of each row of the next forwards (None: the base)."""
        slots = [self.slot(n) for n in names]
        self._unfolded = None
        if not any(slots):
            self.mode = None
        elif len(set(slots)) == 1:
            self.mode = slots[0]
        else:  # what every slot layer of the next forwards shares, made once here
            self.mode = mx.array(slots, dtype=mx.uint32)
            self.lhs = mx.arange(len(slots), dtype=mx.uint32)
            self.row_scale = self.scale_array[self.mode].reshape(-1, 1, 1)

    def unfold(self, indices: mx.array) -> tuple[mx.array, mx.array]:
        """Folded expert indices (``expert * N + slot``) -> ``(expert, each pair's scale
        [..., 1, 1])``, worked out once per MoE layer: its w1, w3 and w2 take the same indices."""
        if self._unfolded is None or self._unfolded[0] is not indices:
            N = self.capacity
            self._unfolded = (indices, indices // N, self.scale_array[indices % N][..., None, None])
        return self._unfolded[1:]

    def targets(self, num_layers: int, keys, rank: int, expert_rank: Optional[int] = None) -> dict:
        """``{path from the root: (A shape, B shape)}`` of the layers an adapter config wraps
        (mlx-lm's rule, ``lora.select_targets``, over the base layers)."""
        out = {}
        for i, chosen in select_targets(self.blocks, self.top, num_layers, keys).items():
            prefix = "" if i is None else f"model.layers.{i}."
            for k, m in chosen.items():
                r = expert_rank or rank if isinstance(m, EXPERT_TYPES) else rank
                out[prefix + k] = lora_shapes(m, r)
        return out

    def reserve(self, adapters: int) -> None:
        """Room for ``adapters`` resident adapters without another copy of the stacks."""
        if adapters + 1 > self.capacity:
            for layer in self.slots.values():
                layer.grow(adapters + 1)
            self.names += [None] * (adapters + 1 - self.capacity)
            self.scales += [0.0] * (len(self.names) - len(self.scales))
            self.scale_array = mx.array(self.scales, dtype=mx.float32)
            mx.eval([layer.stacks() for layer in self.slots.values()])

    def _free_slot(self) -> int:
        free = [i for i, n in enumerate(self.names) if i and n is None]
        if not free:
            if self.limit is not None and len(self.info) >= self.limit:
                raise ValueError(f"{self.limit} adapters are resident already: unload one first")
            grown = max(1, 2 * len(self.info))
            self.reserve(grown if self.limit is None else min(grown, self.limit))
            return len(self.info) + 1
        return free[0]

    def add(self, name: str, arrays: dict, scale: float, info: Optional[dict] = None) -> None:
        """Make ``name`` resident: ``arrays`` ``{path from the root: (A, B)}`` (shapes as
        ``targets`` says, checked by the caller), ``scale`` its LoRA scale. Writes one free
        slot of the layers ``arrays`` names; every other slot is left as it was."""
        if not name or name in self.info:
            raise ValueError(f"adapter name {name!r} is empty or already loaded")
        slot = self._free_slot()
        modules = dict(self.model.named_modules())
        try:
            for path, (a, b) in arrays.items():
                self._slot_layer(path, modules)
                self.slots[path].write(slot, a, b, self.capacity)
            mx.eval([self.slots[p].stacks() for p in arrays])
        except BaseException:
            self._free(slot, list(arrays))  # a failed write leaves its slot free and zero
            raise
        self.names[slot] = name
        self.scales[slot] = float(scale)
        self.scale_array = mx.array(self.scales, dtype=mx.float32)
        self.info[name] = dict(info or {})
        self.written[name] = list(arrays)

    def remove(self, name: str) -> None:
        slot = self.slot(name)
        if slot == 0:
            raise ValueError("the base cannot be removed")
        del self.info[name]
        self._free(slot, self.written.pop(name))
        self.mode = None

    def _free(self, slot: int, paths: list) -> None:
        """Zero ``slot`` in ``paths`` and mark it free (the stacks stay, for the next load)."""
        for path in paths:
            if path in self.slots:
                self.slots[path].clear(slot)
        self.names[slot], self.scales[slot] = None, 0.0
        self.scale_array = mx.array(self.scales, dtype=mx.float32)
        mx.eval([self.slots[p].stacks() for p in paths if p in self.slots])

    def nbytes(self, name: Optional[str] = None) -> int:
        """Bytes the stacks hold, the free slots' included (``name``: one slot's share)."""
        total = sum(x.nbytes for l in self.slots.values() for x in l.stacks())
        return total if name is None else total // self.capacity

    def _slot_layer(self, path: str, modules: dict) -> None:
        """Replace the base layer at ``path`` by a slot layer (experts: all of the GLU's, and
        the GLU folds each row's slot into its indices)."""
        if path in self.slots:
            return
        parent_path, leaf = path.rsplit(".", 1) if "." in path else ("", path)
        parent = modules[parent_path] if parent_path else self.model
        base = parent[leaf]
        if not isinstance(base, EXPERT_TYPES):
            slot = DenseSlots(base, self)
            parent.update_modules({leaf: slot})
            self.slots[path] = slot
            return
        if not isinstance(parent, SwitchGLU):
            raise ValueError(f"{path}: experts outside a SwitchGLU cannot take per-row adapters")
        for sib in ("w1", "w2", "w3"):
            slot = ExpertSlots(parent[sib], self)
            parent.update_modules({sib: slot})
            self.slots[f"{parent_path}.{sib}"] = slot
        parent.adapters = self
        parent.__class__ = type("Rows" + type(parent).__name__, (RowsGLU, type(parent)), {})


def attach(model: nn.Module, limit: Optional[int] = None) -> AdapterSet:
    """The model's ``AdapterSet`` (made on first call; ``limit``: the most adapters resident)."""
    aset = adapter_set(model)
    if aset is None:
        aset = AdapterSet(model, limit)
        model.adapter_set = aset
    return aset


def adapter_set(model) -> Optional[AdapterSet]:
    """The model's resident adapters, None when it keeps none (``attach`` makes them)."""
    return model.__dict__.get("adapter_set")


def select(model, names: Sequence[Optional[str]]) -> None:
    """Say which adapter each row of the next forwards takes (None: the base); a model without
    resident adapters takes only None."""
    aset = adapter_set(model)
    if aset is not None:
        aset.use(names)
    elif any(n is not None for n in names):
        raise NotLoaded(f"adapter {next(n for n in names if n is not None)!r} is not loaded: "
                        "this model has no resident adapters")


def namespace(model, name: Optional[str]) -> str:
    """What a prompt cache computed with adapter ``name`` is filed under: "" for the base, else
    the adapter's content (its fingerprint), so a prefix cached under one adapter is never
    reused under another, even one loaded later under the same name."""
    if name is None:
        return ""
    aset = adapter_set(model)
    info = aset.info.get(name, {}) if aset is not None else {}
    return "lora:" + info.get("fingerprint", name)

