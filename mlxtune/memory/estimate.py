"""The arithmetic: a training step's peak memory, item by item.

Everything is a function of a `Workload` (the model's shape and stored weights, the
batch one rank computes, the adapter, the objective, the backend and compute dtype).
Each item says which assumption it rests on:

- base weights: every tensor as it sits in memory (mlxtune.memory.weights).
- adapter, gradients, optimizer state: rank * (in + out) parameters per adapted linear
  layer (DoRA: + out magnitudes, and the base's row norms, frozen), float32 whatever the
  compute dtype (mlxtune.adapters; mlx's Adam keeps two states like its parameters;
  gradient accumulation holds a second copy of the gradients).
- full fine-tuning (adapter.type full): every weight of the adapted blocks trains, as
  float32 master weights (in "base weights") with float32 gradients and optimizer state;
  under a 16-bit compute dtype each block computes with a copy of its weights in that
  dtype, kept for the backward pass (also "base weights": one block's with
  checkpointing, every adapted block's without); the optimizer update's temporaries
  (fitted) count where they exceed what the backward pass held (`update_excess`).
- activations: what the backward pass needs of each adapted block, plus the working set
  of the block whose backward is running. With train.grad_checkpoint a block keeps only
  its input and is recomputed when its backward runs. Blocks below the first adapted one
  keep nothing (no gradient flows there).
- attention: MLX computes attention under autodiff with scores and probabilities
  materialised ([heads, positions, positions] per row); "fused" assumes a kernel that
  keeps none (an option, not the default: see Workload.attention).
- logits and loss: [positions, vocab] float32 arrays of the output head and the
  cross-entropy, or train.loss_chunk positions at a time.
- packing: the block-diagonal mask, [rows, positions, positions] booleans.
- preference objectives: two rows (chosen, rejected) per pair; dpo also runs the
  reference policy's forward pass before each step.
- CPU path of a quantized base: layers are dequantized to the compute dtype for BLAS
  and again in the backward pass (mlxtune.quant); the dense copies are transient.
- framework: MLX's own small arrays (RoPE tables, masks) and allocator rounding.

How many copies of each size MLX holds at the peak is not derived by hand: MLX runs
ahead of the computation and frees a buffer only when the operations that read it have
run, so the peak depends on its scheduler. The counts (COEFFICIENTS) are fitted to peaks
measured with mx.get_peak_memory() over real training steps on the CPU backend
(scripts/calibrate_memory.py, which also checks them on configurations left out of the
fit; docs/memory.md). On Metal the same counts are applied in bfloat16: the graph and
the scheduler are MLX's, only the bytes per element change (an extrapolation the CPU
cannot check).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mlxtune.errors import ConfigError
from mlxtune.memory import weights as weights_mod
from mlxtune.memory.calibration import COEFFICIENTS
from mlxtune.memory.shapes import ModelShape

PAD_MULTIPLE = 32  # mlxtune.train.loop.PAD_MULTIPLE: rows are padded to a multiple of this
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Model families whose output head mlxtune can chunk (mlxtune.forward.HEAD_FAMILIES).
HEAD_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                 "phi3", "granite", "smollm3", "olmo2", "starcoder2"}

ITEMS = ("base weights", "LoRA adapter", "gradients", "optimizer state", "activations",
         "attention", "logits and loss", "packing mask", "dequantization (CPU)",
         "framework")




@dataclass(frozen=True)
class Workload:
    shape: ModelShape
    weights: tuple
    backend: str                 # "metal" | "cuda" | "cpu"
    dtype: str                   # compute dtype
    rows: int                    # rows of one micro-batch on one rank
    width: int                   # padded row width in tokens (the model sees width - 1)
    rank: int
    lora_modules: tuple          # (module path, in, out) adapted in each adapted block
    adapted_layers: int
    grad_checkpoint: bool = False
    loss_chunk: int = 2048
    objective: str = "sft"
    packed: bool = False
    optimizer_states: int = 2
    grad_accumulation: int = 1
    attention: str = "materialised"
    # adapter.type: lora | dora | full (every weight of the adapted blocks trains)
    adapter_type: str = "lora"
    # dpo from model.adapter: a frozen copy of it is the reference policy.
    reference_adapter: bool = False
    notes: tuple = field(default=(), compare=False)

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def positions(self) -> int:
        return self.width - 1

    @property
    def tokens(self) -> int:
        """Positions the model computes in one micro-batch (N)."""
        return self.rows * self.positions

    @property
    def reference_pass(self) -> bool:
        return self.objective == "dpo"

    @property
    def chunked(self) -> bool:
        return (self.loss_chunk > 0 and self.tokens > self.loss_chunk
                and self.shape.model_type in HEAD_FAMILIES)

    @property
    def full_finetune(self) -> bool:
        return self.adapter_type == "full"

    @property
    def dora(self) -> bool:
        return self.adapter_type == "dora"

    @property
    def first_adapted(self) -> int:
        return self.shape.num_layers - self.adapted_layers

    @property
    def lora_parameters(self) -> int:
        """Trainable adapter parameters: A and B, and DoRA's magnitudes."""
        if self.full_finetune:
            return 0
        per_block = sum((i + o) * self.rank + (o if self.dora else 0)
                        for _, i, o in self.lora_modules)
        return self.adapted_layers * per_block

    @property
    def adapter_frozen_parameters(self) -> int:
        """DoRA's base row norms, kept beside each adapted layer (float32)."""
        if not self.dora:
            return 0
        return self.adapted_layers * sum(o for _, _, o in self.lora_modules)

    def trained_weights(self) -> list:
        """Full fine-tuning: the base's weights in the adapted blocks."""
        if not self.full_finetune:
            return []
        return [w for w in self.weights if _in_blocks(w.name, self.first_adapted)]

    @property
    def trainable_parameters(self) -> int:
        if self.full_finetune:
            return sum(w.rows * w.cols for w in self.trained_weights())
        return self.lora_parameters

    @property
    def blockwise(self) -> bool:
        """Whether attention runs a block of queries at a time (mlxtune.attention, on the
        CPU backend, for models using mlx_lm's shared attention function)."""
        return self.backend == "cpu" and self.attention == "materialised" and \
            _blockwise_block(self.shape.model_type, self.positions) > 0

    @property
    def score_columns(self) -> float:
        """Attention scores per query position and head that are computed and kept."""
        if self.attention == "fused":
            return 0.0
        L = self.positions
        block = _blockwise_block(self.shape.model_type, L) if self.backend == "cpu" else 0
        if not block:
            return float(L)
        total = sum((min(s + block, L) - s) * min(s + block, L) for s in range(0, L, block))
        return total / L

    def activation_bytes(self, coefficients: dict | None = None) -> float:
        """Bytes per activation element. On the CPU backend a 16-bit dtype has no BLAS
        path: MLX converts to float32 around each matmul, which the fitted
        "cpu_half_bytes" accounts for."""
        if self.backend == "cpu" and self.compute_bytes == 2:
            return (coefficients or COEFFICIENTS)["cpu_half_bytes"]
        return float(self.compute_bytes)


def _blockwise_block(model_type: str, positions: int) -> int:
    """mlxtune.attention's query block when it covers this model and length, else 0."""
    try:
        from mlxtune import attention
    except ImportError:
        return 0
    import importlib

    try:
        module = importlib.import_module(f"mlx_lm.models.{model_type}")
    except ImportError:
        return 0
    if not hasattr(module, "scaled_dot_product_attention"):
        return 0
    return attention.BLOCK if positions > attention.BLOCK else 0


def resolve_targets(shape: ModelShape, targets: list[str]) -> list[tuple[str, int, int]]:
    """adapter.targets against the block's linear layers, as mlxtune.adapters does: a full
    module path or its last part; empty means every linear layer of the block."""
    linears = shape.block_linears()
    if not targets:
        return linears
    out = []
    for t in targets:
        matched = [m for m in linears if m[0] == t or m[0].split(".")[-1] == t]
        if not matched:
            names = ", ".join(m[0] for m in linears)
            raise ConfigError(f"adapter.targets: '{t}' is not a linear layer of this model's "
                              f"blocks (available: {names})")
        out += [m for m in matched if m not in out]
    return out


def block_index(name: str) -> int | None:
    """The transformer block a weight belongs to, from its mlx_lm path or GGUF name."""
    import re

    m = re.search(r"(?:^|\.)(?:layers|blk)\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _in_blocks(name: str, first: int) -> bool:
    index = block_index(name)
    return index is not None and index >= first


def workload(cfg, shape: ModelShape, backend: str, ranks: int = 1,
             attention: str = "materialised", full_finetune: bool = False) -> Workload:
    """What one rank computes in one micro-batch of `cfg` (an mlxtune Config).
    `full_finetune` plans adapter.type full whatever the config says."""
    if ranks < 1:
        raise ConfigError(f"ranks: must be >= 1, got {ranks}")
    batch = cfg.train.batch_size
    if batch % ranks:
        raise ConfigError(f"{cfg.source or '<config>'}: train.batch_size: {batch} is not "
                          f"divisible by {ranks} ranks (each rank takes an equal share of "
                          "every global batch)")
    if attention not in ("materialised", "fused"):
        raise ValueError(f"attention must be 'materialised' or 'fused', not {attention!r}")
    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "float32" if backend == "cpu" else "bfloat16"
    from mlxtune import objectives

    preference = cfg.objective.type in objectives.PREFERENCE
    width = -(-cfg.data.max_seq_len // PAD_MULTIPLE) * PAD_MULTIPLE
    t = cfg.train
    n = shape.num_layers
    rank, targets, layers = cfg.adapter.rank, list(cfg.adapter.targets), cfg.adapter.layers
    kind = "full" if full_finetune else cfg.adapter.type
    start = _starting_adapter(cfg.model.adapter)
    if start is not None:  # training continues that adapter: its type, rank, layers, targets
        rank, targets, layers, kind = start
    adapted = n if layers == -1 else min(layers, n)
    states = 2 if t.optimizer in ("adam", "adamw") else (1 if t.momentum > 0 else 0)
    notes = []
    rows = (batch // ranks) * (2 if preference else 1)
    micro = micro_rows(rows, width, t.max_batch_tokens, preference)
    if micro < rows:
        notes.append(f"train.max_batch_tokens={t.max_batch_tokens}: micro-batches of {micro} "
                     f"of the {rows} rows, gradients summed")
    # Rows of several examples carry a block-diagonal mask: packed rows, and random batches
    # laid out several examples to a row (data.batcher); length-grouped rows do not.
    segmented = not preference and (cfg.data.packing is True or not cfg.data.group_by_length)
    if cfg.data.packing == "auto" and not preference and cfg.data.group_by_length:
        notes.append("data.packing is auto: decided from the data at run time; planned "
                     "without the packing mask (rows are full either way)")
    weights = tuple(weights_mod.base_weights(shape, cfg.model, DTYPE_BYTES[dtype]))
    if kind == "full":
        first = n - adapted
        quantized = [w for w in weights if w.quantized and _in_blocks(w.name, first)]
        if quantized:
            raise ConfigError(f"{cfg.source or '<config>'}: adapter.type: full trains every "
                              f"weight and needs a dense base; {cfg.model.path} has quantized "
                              f"weights ({quantized[0].name}: {quantized[0].format.label()})")
        if dtype != "float32":
            notes.append(f"full fine-tuning: float32 master weights, gradients and optimizer "
                         f"state; each block computes with a {dtype} copy of its weights")
    return Workload(
        shape=shape,
        weights=weights,
        backend=backend, dtype=dtype, rows=micro, width=width, rank=rank,
        lora_modules=() if kind == "full" else tuple(resolve_targets(shape, targets)),
        adapter_type=kind,
        reference_adapter=start is not None and cfg.objective.type == "dpo" and kind != "full",
        adapted_layers=adapted, grad_checkpoint=t.grad_checkpoint, loss_chunk=t.loss_chunk,
        objective=cfg.objective.type, packed=segmented,
        optimizer_states=states, attention=attention,
        # Gradients are summed over micro-batches (accumulation, max_batch_tokens splits)
        # and over ranks: a second copy of them is alive.
        grad_accumulation=t.grad_accumulation * (-(-rows // micro)) * ranks,
        notes=tuple(notes))


def _starting_adapter(path) -> tuple | None:
    """(rank, targets, layers, type) of model.adapter's adapter_config.json (mlx-lm's
    layout), or None when no adapter is given or it cannot be read (the run will say why)."""
    if not path:
        return None
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(path) / "adapter_config.json").read_text())
        kind = config.get("fine_tune_type", "lora")
        if kind == "full":
            return 0, [], int(config["num_layers"]), "full"
        lp = config["lora_parameters"]
        return int(lp["rank"]), list(lp.get("keys") or []), int(config["num_layers"]), kind
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def micro_rows(rows: int, width: int, max_tokens: int | None, pairs: bool) -> int:
    """Rows of one micro-batch under train.max_batch_tokens (mlxtune.train.loop.split_rows:
    whole rows, at least one; a pair's two rows stay together)."""
    if not max_tokens or rows * width <= max_tokens:
        return rows
    step = max(1, max_tokens // width)
    if pairs:
        return min(rows, 2 * max(1, step // 2))
    return min(rows, step)


# ----------------------------------------------------------------------------- features


def features(w: Workload, coefficients: dict | None = None) -> dict[str, float]:
    """Sizes in bytes that the fitted COEFFICIENTS multiply: one copy of each kind of
    array the step holds (see the module docstring). Shared by the estimate and by
    scripts/calibrate_memory.py, which fits the coefficients."""
    s = w.shape
    N, c = w.tokens, w.activation_bytes(coefficients)
    n = w.adapted_layers
    lora_out = sum(o for _, _, o in w.lora_modules)
    lora_r = w.rank * len(w.lora_modules)
    att = s.num_heads * w.score_columns
    f = {
        # Kept for backward by each adapted block (without checkpointing).
        "saved_d": 0.0, "saved_qkv": 0.0, "saved_ffn": 0.0, "saved_lora": 0.0,
        "saved_att": 0.0,
        # Kept by each block with checkpointing: its input.
        "ckpt_d": 0.0,
        # The working set of the block whose backward runs.
        "work_d": N * c * s.hidden_size, "work_ffn": N * c * s.intermediate_size,
        "work_att": N * c * att,
        # Logits and cross-entropy (float32): whole, or in chunks.
        "logits": 0.0, "logits_chunked": 0.0,
        # Dense copies of quantized layers on the CPU path.
        "dequant_max": 0.0, "dequant_all": 0.0, "dequant_own": 0.0,
        "dequant_max_ckpt": 0.0, "dequant_all_ckpt": 0.0,
        # DoRA: each adapted layer's output before its magnitude scaling, kept for the
        # magnitudes' gradient (per adapted block, like the saved_* above).
        "saved_dora": 0.0,
        "framework": 1e6,
    }
    per_block = {"saved_d": N * c * s.hidden_size,
                 "saved_qkv": N * c * (s.q_dim + 2 * s.kv_dim),
                 "saved_ffn": N * c * s.intermediate_size,
                 "saved_lora": N * c * (lora_out + lora_r),
                 "saved_att": N * c * att}
    kept = n if not w.grad_checkpoint else 1  # checkpointing: one block recomputed at a time
    for k, v in per_block.items():
        f[k] = kept * v
    if w.dora:
        f["saved_dora"] = kept * N * c * lora_out
    if w.grad_checkpoint:
        f["ckpt_d"] = n * N * c * s.hidden_size
    head = N * s.vocab_size * 4.0
    if w.chunked:
        f["logits_chunked"] = head
    else:
        f["logits"] = head
    if w.backend == "cpu":  # dense copies of quantized matrices for BLAS (mlxtune.quant)
        q = [x for x in w.weights if x.quantized]
        if q:
            # With checkpointing the blocks' copies are made again, one block at a time,
            # and MLX holds a different number of them: counted apart.
            tag = "_ckpt" if w.grad_checkpoint else ""
            f["dequant_max" + tag] = max(x.rows * x.cols for x in q) * w.compute_bytes
            f["dequant_all" + tag] = sum(x.rows * x.cols for x in q if x.kind == "linear"
                                         and x.format.kind == "affine") * w.compute_bytes
            # MLX's affine layers dequantize in one op; mlxtune's own formats (nf4,
            # q6_k) build theirs from several float32 arrays (quant.layouts).
            f["dequant_own"] = sum(x.rows * x.cols for x in q if x.kind == "linear"
                                   and x.format.kind != "affine") * w.compute_bytes
    return f


# Which report item each fitted feature belongs to.
_ITEM_OF = {"saved_d": "activations", "saved_qkv": "activations", "saved_ffn": "activations",
            "saved_lora": "activations", "ckpt_d": "activations", "work_d": "activations",
            "work_ffn": "activations", "saved_att": "attention", "work_att": "attention",
            "logits": "logits and loss", "logits_chunked": "logits and loss",
            "dequant_max": "dequantization (CPU)", "dequant_all": "dequantization (CPU)",
            "dequant_own": "dequantization (CPU)", "dequant_max_ckpt": "dequantization (CPU)",
            "dequant_all_ckpt": "dequantization (CPU)",
            "saved_dora": "activations",
            "framework": "framework"}


@dataclass
class Breakdown:
    workload: Workload
    items: dict[str, float]          # item -> bytes (they sum to `peak`)
    reference_pass: float | None     # dpo: peak of the reference forward pass, bytes

    @property
    def peak(self) -> float:
        step = sum(self.items.values())
        return max(step, self.reference_pass or 0.0)

    def gb(self) -> dict[str, float]:
        return {k: round(v / 1e9, 3) for k, v in self.items.items() if v}


def fixed_bytes(w: Workload) -> dict[str, float]:
    """The items that are counted exactly (not fitted): weights, adapter, gradients,
    optimizer state, the causal / packing masks, and the 16-bit copy of the logits.
    Trainable parameters, their gradients and optimizer state are float32 whatever the
    compute dtype (mlxtune.adapters: LoRA / DoRA weights, a full fine-tune's master
    weights)."""
    c = w.compute_bytes
    p = w.trainable_parameters
    L = w.positions
    items = dict.fromkeys(ITEMS, 0.0)
    items["base weights"] = float(sum(x.nbytes for x in w.weights))
    if w.full_finetune:
        trained = w.trained_weights()
        n = sum(x.rows * x.cols for x in trained)
        items["base weights"] += float(n * 4 - sum(x.nbytes for x in trained))  # float32
        if c != 4:
            # The compute-dtype copy each block computes with, kept for its backward pass:
            # every adapted block's, or with checkpointing the one being recomputed.
            held = n / max(w.adapted_layers, 1) if w.grad_checkpoint else n
            items["base weights"] += float(held * c)
    adapter = w.lora_parameters * (2 if w.reference_adapter else 1) + w.adapter_frozen_parameters
    items["LoRA adapter"] = float(adapter * 4)
    items["gradients"] = float(p * 4 * (2 if w.grad_accumulation > 1 else 1))
    items["optimizer state"] = float(p * 4 * w.optimizer_states)
    if w.attention == "materialised" and not w.blockwise:
        items["attention"] += float(L * L)  # MLX's causal mask: [positions, positions] bools
    if w.packed:
        items["packing mask"] = float(w.rows * L * L)
    if c != 4:  # the head's output in the compute dtype before the float32 cast
        chunk = min(w.tokens, w.loss_chunk) if w.chunked else w.tokens
        items["logits and loss"] += float(chunk * w.shape.vocab_size * c)
    return items


def estimate(w: Workload, coefficients: dict | None = None) -> Breakdown:
    coef = COEFFICIENTS if coefficients is None else coefficients
    items = fixed_bytes(w)
    for name, value in features(w, coef).items():
        items[_ITEM_OF[name]] += coef[name] * value
    if w.full_finetune:
        items["optimizer state"] += update_excess(w, items, coef)
    ref = None
    if w.reference_pass:
        ref = reference_pass_bytes(w, coef)
    return Breakdown(w, items, ref)


RESIDENT = ("base weights", "LoRA adapter", "gradients", "optimizer state")


def update_excess(w: Workload, items: dict, coef: dict) -> float:
    """Full fine-tuning: the optimizer update's float32 temporaries (the clipped
    gradients, the new moments and weights while the old ones are alive: fitted,
    COEFFICIENTS["full_update"] copies of the trained weights) come after the backward
    pass has freed the activations, so the step's peak is the larger of the two; what
    the update holds beyond the activations' items is added to "optimizer state"."""
    update = coef["full_update"] * 4.0 * w.trainable_parameters
    backward = sum(v for k, v in items.items() if k not in RESIDENT)
    return max(0.0, update - backward)


def reference_pass_bytes(w: Workload, coef: dict) -> float:
    """Peak of dpo's reference forward pass (no gradient, evaluated before the step):
    the resident state plus the forward pass's arrays, which MLX's scheduler also holds
    for a while (COEFFICIENTS["reference"] of the step's activations)."""
    items = fixed_bytes(w)
    f = features(w, coef)
    resident = sum(items[k] for k in ("base weights", "LoRA adapter", "optimizer state"))
    act = sum(coef[k] * f[k] for k in f if _ITEM_OF[k] in ("activations", "attention"))
    head = coef["logits"] * (f["logits"] + f["logits_chunked"])
    return resident + coef["reference"] * act + head + coef["framework"] * f["framework"]


def describe_assumptions(w: Workload) -> list[str]:
    s = w.shape
    if w.full_finetune:
        adapter = (f"full fine-tuning of the last {w.adapted_layers} of {s.num_layers} blocks "
                   f"({w.trainable_parameters:,} trained weights)")
    else:
        adapter = (f"{'DoRA' if w.dora else 'LoRA'} rank {w.rank} on {len(w.lora_modules)} "
                   f"linear layers of the last {w.adapted_layers} of {s.num_layers} blocks")
    out = [
        f"{w.rows} rows x {w.width} tokens per micro-batch on each rank"
        + (" (pairs: chosen and rejected rows)" if w.objective != "sft" else "")
        + "; every row as long as data.max_seq_len (the worst case)",
        f"compute dtype {w.dtype} on the {w.backend} backend",
        adapter,
        "gradient checkpointing " + ("on" if w.grad_checkpoint else "off"),
        "attention scores " + ("materialised (MLX's attention under autodiff)"
                               if w.attention == "materialised" else "fused (not kept)"),
        ("logits and loss in chunks of %d positions" % w.loss_chunk) if w.chunked
        else "logits and loss over all positions at once",
    ]
    if w.reference_pass:
        out.append("dpo: the reference policy's forward pass runs before each step")
    return out + list(w.notes)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)
