"""Adapters: LoRA, DoRA and full fine-tuning of chosen blocks; count, save and load them.

Saved in mlx-lm's layout (`adapters.safetensors` + `adapter_config.json`, its
`fine_tune_type` lora / dora / full) so that `mlx_lm.load(base, adapter_path=...)` applies
them unchanged: parameter names `<module>.lora_a` (in x r) and `<module>.lora_b` (r x out),
DoRA's magnitudes `<module>.m` (out), the wrapped layer under `.linear`, and mlx-lm's
`scale` holding our alpha / rank (alpha / sqrt(rank) with rsLoRA); a full fine-tune saves
every weight of its blocks under their own names. Weights are in Hugging Face row order
because every model source is converted to it on load.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlxtune import quant
from mlxtune.config import AdapterConfig
from mlxtune.errors import ConfigError, ModelError

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


class LoRALinear(nn.Module):
    """y = linear(x) + scale * dropout(x) @ A @ B. Same parameter names, math and dtypes as
    mlx-lm's LoRALinear (A and B in float32, the update added in x's dtype); `enabled`
    switches the adapter off (a reference pass).

    For preference tuning from an existing adapter, the layer can also hold a frozen copy
    of that adapter (`ref_lora_a`, `ref_lora_b`, see `freeze_reference`): with
    `use_reference` set, the layer computes base + that copy instead of base + the
    trainable adapter. Two small adapters share one base; no second model is loaded."""

    def __init__(self, linear: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        out_dims, in_dims, _ = quant.linear_geometry(linear)
        self.linear = linear
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        self.enabled = True
        self.use_reference = False
        # float32 whatever the compute dtype, as mlx-lm keeps them: the optimizer's state
        # follows the parameters' dtype, and bfloat16 (8 bits of mantissa) would drop
        # updates smaller than 1/256 of a weight.
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank), dtype=mx.float32)
        self.lora_b = mx.zeros((rank, out_dims), dtype=mx.float32)

    def __call__(self, x):
        if not self.enabled:
            return self.linear(x)
        if self.use_reference:
            if "ref_lora_a" not in self:  # no frozen copy: the reference is the base
                return self.linear(x)
            # The reference is deterministic: no dropout.
            return self._with(x, x @ self.ref_lora_a, self.ref_lora_b)
        return self._with(x, self.dropout(x) @ self.lora_a, self.lora_b)

    def _with(self, x, xa, b):
        if hasattr(self.linear, "with_lora"):  # our formats: LoRA fused into the kernel
            return self.linear.with_lora(x, xa, b, self.scale)
        y = self.linear(x)
        if y.dtype == xa.dtype == b.dtype:
            # One BLAS call adds the update into y's buffer (beta = 1): no separate
            # [tokens x out] product and add, here or in the backward pass; measured on the
            # CPU for a 576 -> 1,536 layer over 1,216 tokens, forward and backward: 29.8 ms
            # against 34.0 (the frozen layer alone: 27.2).
            return mx.addmm(y, xa, b, alpha=self.scale)
        return y + (self.scale * (xa @ b)).astype(x.dtype)


def _row_norms_sq(linear: nn.Module) -> mx.array:
    """Squared norm of each output row of a linear layer's weight, float32 (out,),
    whatever its format (quantized weights as their float32 dequantization)."""
    if isinstance(linear, quant.QuantLinear):
        w = linear.dense_weight(mx.float32)
    elif isinstance(linear, nn.QuantizedLinear):
        biases = linear.get("biases")
        w = mx.dequantize(linear["weight"], linear["scales"].astype(mx.float32),
                          None if biases is None else biases.astype(mx.float32),
                          linear.group_size, linear.bits, linear.mode)
    else:
        w = linear["weight"].astype(mx.float32)
    return (w * w).sum(axis=1)


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024), as mlx-lm's DoRALinear computes it and with its parameter
    names: y = m / ||W + scale (A @ B).T||_row * (x W.T + scale * x @ A @ B) + bias, the
    norm per output row, treated as a constant in the backward pass (the paper's section
    4.3, as mlx-lm and PEFT do), `m` (float32) starting at the base's row norms.

    The norm is computed without a dense copy of W (which a quantized base does not
    have): ||W_i + dW_i||^2 = ||W_i||^2 + 2 scale <(W A)_i, B_:,i> + scale^2 ||A B_:,i||^2,
    with ||W_i||^2 kept from the start (frozen, `weight_norm_sq`), W A from the layer
    itself applied to the r rows of A.T, and A.T A an r x r product."""

    def __init__(self, linear: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__(linear, rank, scale, dropout)
        self.weight_norm_sq = _row_norms_sq(linear)
        self.m = mx.sqrt(self.weight_norm_sq)
        self.freeze(keys=["weight_norm_sq"], recurse=False)
        mx.eval(self.weight_norm_sq, self.m)  # one dense copy at a time, if any

    def __call__(self, x):
        if not self.enabled:
            return self.linear(x)
        if self.use_reference:
            if "ref_lora_a" not in self:
                return self.linear(x)
            a, b = self.ref_lora_a, self.ref_lora_b
            return self._dora(x, x @ a, a, b, self.ref_m)
        return self._dora(x, self.dropout(x) @ self.lora_a, self.lora_a, self.lora_b, self.m)

    def _dora(self, x, xa, a, b, m):
        y = self._with(x, xa, b)  # x W.T + bias + scale x A B
        g = (m / mx.stop_gradient(self.adapted_norm(a, b, x.dtype))).astype(x.dtype)
        if "bias" in self.linear:
            bias = self.linear["bias"].astype(x.dtype)
            return g * (y - bias) + bias
        return g * y

    def adapted_norm(self, a: mx.array, b: mx.array, dtype=mx.float32) -> mx.array:
        """||W + scale (A @ B).T|| per output row, float32 (out,). W A comes from the layer
        in the compute dtype `dtype` (exact enough: it enters a cross term only)."""
        p = self.linear(a.T.astype(dtype))  # (r, out): (W A).T
        if "bias" in self.linear:
            p = p - self.linear["bias"].astype(p.dtype)
        p = p.astype(mx.float32)
        s = self.scale
        cross = (p * b).sum(axis=0)
        quad = (b * ((a.T @ a) @ b)).sum(axis=0)
        return mx.sqrt(mx.maximum(self.weight_norm_sq + 2 * s * cross + s * s * quad, 0.0))


def _linear_keys(block: nn.Module) -> list[str]:
    return [k for k, m in block.named_modules()
            if isinstance(m, (nn.Linear, nn.QuantizedLinear, quant.QuantLinear)) and k]


def resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Module paths inside a transformer block to adapt. Short names (q_proj) match the
    path's last part; an empty list means every linear layer of the block."""
    layers = getattr(model, "layers", None)
    if not layers:
        raise ModelError("this model has no transformer blocks (model.layers) to adapt")
    available = _linear_keys(layers[0])
    if not targets:
        return available
    keys = []
    for t in targets:
        matched = [k for k in available if k == t or k.split(".")[-1] == t]
        if not matched:
            raise ConfigError(f"adapter.targets: '{t}' is not a linear layer of this model's "
                              f"blocks (available: {', '.join(available)})")
        keys += [k for k in matched if k not in keys]
    return keys


def scale_of(cfg: AdapterConfig) -> float:
    """The update's multiplier: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
    return cfg.alpha / (math.sqrt(cfg.rank) if cfg.rslora else cfg.rank)


def apply(model: nn.Module, cfg: AdapterConfig) -> dict:
    """Make the last `cfg.layers` blocks (all for -1) trainable as `cfg.type` says and
    freeze everything else: lora / dora wrap the target layers (LoRALinear, DoRALinear),
    full unfreezes every weight of those blocks (`apply_full`). Returns the mlx-lm adapter
    config describing what was done."""
    if cfg.type == "full":
        return apply_full(model, cfg.layers)
    keys = resolve_targets(model, cfg.targets)
    num_layers = len(model.layers) if cfg.layers == -1 else min(cfg.layers, len(model.layers))
    scale = scale_of(cfg)
    layer_cls = DoRALinear if cfg.type == "dora" else LoRALinear
    model.freeze()
    for block in model.layers[len(model.layers) - num_layers:]:
        modules = dict(block.named_modules())
        wrapped = [(k, layer_cls(modules[k], cfg.rank, scale, cfg.dropout))
                   for k in keys if k in modules]
        block.update_modules(tree_unflatten(wrapped))
    return {
        "fine_tune_type": cfg.type,
        "num_layers": num_layers,
        "lora_parameters": {"rank": cfg.rank, "scale": scale, "dropout": cfg.dropout,
                            "keys": keys},
        # Ours, for the exporters (mlx-lm ignores extra keys).
        "alpha": cfg.alpha,
        "rslora": cfg.rslora,
    }


apply_lora = apply  # the name callers have used


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """The LoRA and DoRA layers (DoRALinear is a LoRALinear)."""
    return [(k, m) for k, m in model.named_modules() if isinstance(m, LoRALinear)]


# ----------------------------------------------------------------------------- full


class _Full:
    """What a fully fine-tuned model keeps beside its blocks (a plain object, so that
    nn.Module stores it as an attribute, not as parameters): which blocks train, and for
    evaluation, other sets of their weights to swap in (`base`: the weights before an
    adapter was loaded; `start`: the starting point of a preference run), each a list of
    the blocks' parameter trees."""

    def __init__(self, first: int):
        self.first = first            # index of the first trained block
        self.sets: dict[str, list] = {}
        self.active = "tuned"


def _full(model: nn.Module) -> _Full | None:
    return getattr(model, "_mlxtune_full", None)


def is_full(model: nn.Module) -> bool:
    return _full(model) is not None


def _block_weights(model: nn.Module, first: int) -> list[dict]:
    """The trained blocks' parameters (trees sharing the blocks' arrays), block by block."""
    return [block.parameters() for block in model.layers[first:]]


def _check_dense(model: nn.Module, first: int) -> None:
    for i in range(first, len(model.layers)):
        for path, m in model.layers[i].named_modules():
            if isinstance(m, quant.QUANTIZED_TYPES):
                raise ConfigError(
                    f"adapter.type: full trains every weight and needs a dense base, but this "
                    f"model's layers.{i}.{path} is quantized ({type(m).__name__}); use a "
                    "float16/32 model (a quantized GGUF decodes to F32 with "
                    "mlxtune.export.gguf_fused.write_merged: README, adapter types), or "
                    "adapter.type lora / dora")


class _MasterBlock:
    """Mixed in by `_master_class`: the block's weights are float32 (master weights:
    AdamW's updates of ~lr stay visible next to weights of ~1e-2, which bfloat16's
    8-bit mantissa would round away); each call computes with a copy cast to the
    compute dtype, so activations keep the compute dtype. The gradient flows through
    the cast back to the float32 weights."""


_MASTER: dict[type, type] = {}


def _master_class(cls: type) -> type:
    if issubclass(cls, _MasterBlock):
        return cls
    if cls not in _MASTER:
        def __call__(self, *args, **kwargs):
            master = self.parameters()
            dtype = self._mlxtune_compute_dtype
            self.update(tree_map(lambda p: p.astype(dtype)
                                 if mx.issubdtype(p.dtype, mx.floating) else p, master))
            try:
                return cls.__call__(self, *args, **kwargs)
            finally:
                self.update(master)
        _MASTER[cls] = type(cls.__name__, (cls, _MasterBlock), {"__call__": __call__})
    return _MASTER[cls]


def _use_master_weights(model: nn.Module, first: int) -> None:
    """Blocks computing in a 16-bit dtype train float32 master weights (`_MasterBlock`)."""
    for block in model.layers[first:]:
        floats = [v for _, v in tree_flatten(block.parameters())
                  if mx.issubdtype(v.dtype, mx.floating)]
        dtype = floats[0].dtype if floats else mx.float32
        if dtype == mx.float32 and not isinstance(block, _MasterBlock):
            continue
        if not isinstance(block, _MasterBlock):
            block._mlxtune_compute_dtype = dtype
            block.__class__ = _master_class(type(block))
        block.update(tree_map(lambda p: p.astype(mx.float32)
                              if mx.issubdtype(p.dtype, mx.floating) else p, block.parameters()))
    mx.eval(model.parameters())


def apply_full(model: nn.Module, layers: int = -1) -> dict:
    """Full fine-tuning of the last `layers` blocks (all for -1), as mlx-lm's
    fine_tune_type full: every weight of those blocks trains (attention, MLP, norms);
    the embeddings, the final norm and the output layer stay frozen. Weights and
    optimizer state are float32 whatever the compute dtype (`_MasterBlock`)."""
    num_layers = len(model.layers) if layers == -1 else min(layers, len(model.layers))
    first = len(model.layers) - num_layers
    _check_dense(model, first)
    model.freeze()
    _use_master_weights(model, first)
    for block in model.layers[first:]:
        block.unfreeze()
    object.__setattr__(model, "_mlxtune_full", _Full(first))
    return {"fine_tune_type": "full", "num_layers": num_layers, "lora_parameters": None}


def _activate(model: nn.Module, name: str) -> None:
    """Swap the weight set `name` into a fully fine-tuned model's blocks."""
    st = _full(model)
    if st.active == name:
        return
    st.sets[st.active] = _block_weights(model, st.first)
    for block, params in zip(model.layers[st.first:], st.sets[name]):
        block.update(params)
    st.active = name


def release_kept_weights(model: nn.Module) -> None:
    """Drop the weight sets a full fine-tune keeps for evaluation (training needs none:
    its reference log-probs are computed before the first update)."""
    st = _full(model)
    if st is not None:
        if st.active != "tuned":
            _activate(model, "tuned")
        st.sets.clear()


# ----------------------------------------------------------------------------- switching


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Adapters on (the tuned model) or off (the base). A full fine-tune swaps the base's
    weights in, which `load` kept (a second copy of the trained blocks)."""
    st = _full(model)
    if st is not None:
        if not enabled and "base" not in st.sets:
            raise ModelError("this full fine-tune does not keep its base weights (load it "
                             "with adapters.load to compare against the base)")
        _activate(model, "tuned" if enabled else "base")
        return
    for _, m in lora_layers(model):
        m.enabled = enabled


def freeze_reference(model: nn.Module) -> int:
    """Keep a frozen copy of every adapter's current weights as the reference policy (see
    LoRALinear); training then moves only the trainable copy. Returns the layers copied.
    A full fine-tune keeps its current weights as the `start` set (shared until they
    change; training releases it, see release_kept_weights)."""
    st = _full(model)
    if st is not None:
        st.sets["start"] = _block_weights(model, st.first)
        return len(model.layers) - st.first
    layers = lora_layers(model)
    for _, m in layers:
        m.ref_lora_a = mx.array(m.lora_a)
        m.ref_lora_b = mx.array(m.lora_b)
        keys = ["ref_lora_a", "ref_lora_b"]
        if isinstance(m, DoRALinear):
            m.ref_m = mx.array(m.m)
            keys.append("ref_m")
        m.freeze(keys=keys, recurse=False)
    mx.eval([[m[k] for k in m if k.startswith("ref_")] for _, m in layers])
    return len(layers)


def has_reference_copy(model: nn.Module) -> bool:
    st = _full(model)
    if st is not None:
        return "start" in st.sets
    return any("ref_lora_a" in m for _, m in lora_layers(model))


@contextlib.contextmanager
def reference_pass(model: nn.Module):
    """Inside the block the model computes the reference policy: the base plus the frozen
    reference copy when there is one, else the base alone (adapter off). A full
    fine-tune swaps in its `start` (else `base`) weights when it keeps them, else it is
    its current weights: training computes its reference before the first update."""
    st = _full(model)
    if st is not None:
        before = st.active
        target = "start" if "start" in st.sets else "base" if "base" in st.sets else before
        _activate(model, target)
        try:
            yield model
        finally:
            _activate(model, before)
        return
    layers = lora_layers(model)
    for _, m in layers:
        m.use_reference = True
    try:
        yield model
    finally:
        for _, m in layers:
            m.use_reference = False


def describe(model: nn.Module, adapter_config: dict) -> str:
    """One line on what trains, for `mlxtune run`'s output."""
    kind = adapter_config.get("fine_tune_type", "lora")
    blocks = adapter_config.get("num_layers", len(model.layers))
    st = _full(model)
    if st is not None:
        n = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        masters = [b for b in model.layers[st.first:] if isinstance(b, _MasterBlock)]
        how = (f"float32 master weights, computed in "
               f"{str(masters[0]._mlxtune_compute_dtype).split('.')[-1]}" if masters
               else "float32")
        return (f"adapter: full fine-tuning of the last {blocks} blocks ({n:,} weights, {how}; "
                "embeddings, final norm and output layer frozen)")
    layers = lora_layers(model)
    if not layers:
        return "adapter: none"
    lp = adapter_config.get("lora_parameters") or {}
    rank, scale = lp.get("rank", "?"), layers[0][1].scale
    name = {"dora": "DoRA"}.get(kind, "LoRA")
    if adapter_config.get("rslora"):
        name = "rs" + name
    line = (f"adapter: {name} r{rank}, scale {scale:g}, on {len(layers)} linear layers of the "
            f"last {blocks} blocks")
    if kind == "dora" and any(isinstance(m.linear, quant.QUANTIZED_TYPES) for _, m in layers):
        line += ("; the base is quantized: the magnitudes start at its dequantized rows' "
                 f"norms, and each step sends {rank} rows per layer through it for the "
                 "adapted norms")
    return line


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); quantized weights count as the values they stand for."""
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = 0
    for _, m in model.named_modules():
        if isinstance(m, (quant.QuantLinear, quant.QuantEmbedding)):
            total += quant.dense_size(m) + (m["bias"].size if "bias" in m else 0)
            continue
        for name, v in m.items():
            if not isinstance(v, mx.array) or name == "weight_norm_sq":
                continue
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
                if name == "weight":
                    total += v.size * 32 // m.bits
                elif name in ("scales", "biases"):
                    continue
                else:
                    total += v.size
            else:
                total += v.size
    return trainable, total


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save(model: nn.Module, adapter_config: dict, path: Path) -> None:
    """Write adapters.safetensors + adapter_config.json into the folder `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / ADAPTER_FILE), adapter_weights(model))
    (path / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")


FINE_TUNE_TYPES = ("lora", "dora", "full")


def read_config(path: Path) -> dict:
    """An adapter folder's adapter_config.json (mlx-lm's: fine_tune_type lora, dora or
    full; lora_parameters for the first two), checked."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_FILE, path / ADAPTER_FILE
    if not cfg_file.exists() or not weights.exists():
        raise ModelError(f"{path}: not an adapter folder (needs {CONFIG_FILE} and {ADAPTER_FILE})")
    try:
        config = json.loads(cfg_file.read_text())
        kind = config.get("fine_tune_type", "lora")
        int(config["num_layers"])
        if kind != "full":
            config["lora_parameters"]["rank"], config["lora_parameters"]["scale"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"{cfg_file}: not an mlx-lm adapter config ({type(e).__name__}: {e})")
    if kind not in FINE_TUNE_TYPES:
        raise ModelError(f"{cfg_file}: fine_tune_type {kind!r} is not supported (supported: "
                         f"{', '.join(FINE_TUNE_TYPES)})")
    config["fine_tune_type"] = kind
    return config


def load(model: nn.Module, path: Path) -> dict:
    """Apply the adapter saved at `path` to `model` (wrapping its layers, or for a full
    fine-tune replacing its blocks' weights); returns its config."""
    config = read_config(path)
    if config["fine_tune_type"] == "full":
        return _load_full(model, Path(path), config)
    lp = config["lora_parameters"]
    keys = lp.get("keys") or _linear_keys(model.layers[0])
    num_layers = len(model.layers) if config["num_layers"] < 0 else config["num_layers"]
    layer_cls = DoRALinear if config["fine_tune_type"] == "dora" else LoRALinear
    for block in model.layers[len(model.layers) - num_layers:]:
        modules = dict(block.named_modules())
        missing = [k for k in keys if k not in modules]
        if missing:
            raise ModelError(f"{path}: adapter targets {missing} do not exist in this model")
        block.update_modules(tree_unflatten(
            [(k, layer_cls(modules[k], lp["rank"], lp["scale"], lp.get("dropout", 0.0)))
             for k in keys]))
    _load_weights(model, Path(path), cast=True)
    config.setdefault("alpha", lp["scale"] * lp["rank"])
    return config


def _load_weights(model: nn.Module, path: Path, cast: bool) -> None:
    weights = mx.load(str(path / ADAPTER_FILE))
    params = dict(tree_flatten(model.parameters()))
    for name, w in weights.items():
        if name not in params or params[name].shape != w.shape:
            raise ModelError(f"{path}: adapter tensor {name} {tuple(w.shape)} does not fit "
                             "this model (another base model?)")
        if cast or not mx.issubdtype(w.dtype, mx.floating):
            weights[name] = w.astype(params[name].dtype)
    model.load_weights(list(weights.items()), strict=False)


def _load_full(model: nn.Module, path: Path, config: dict) -> dict:
    """A full fine-tune's weights into the blocks it trained, as float32 master weights
    (see apply_full); the base's weights are kept for evaluation's base side (a second
    copy of those blocks until release_kept_weights)."""
    n = len(model.layers)
    num_layers = n if config["num_layers"] < 0 else min(config["num_layers"], n)
    first = n - num_layers
    _check_dense(model, first)
    base = _block_weights(model, first)
    model.freeze()
    _use_master_weights(model, first)
    for block in model.layers[first:]:
        block.unfreeze()
    _load_weights(model, path, cast=False)
    mx.eval(model.parameters())
    st = _Full(first)
    st.sets["base"] = base
    object.__setattr__(model, "_mlxtune_full", st)
    return config
