"""What one rank computes in one micro-batch of a configuration: the `Workload` the
estimate (mlxtune.memory.estimate) counts, built from a Config and a model shape before
anything loads."""

from __future__ import annotations

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
    # "mlx": MLX's own ops (Metal, CUDA; the CPU with MLXTUNE_FASTMATH=0 or without
    # mlxtune.native's kernels). "cpu": what a run on the CPU profile computes with
    # mlxtune's CPU kernels: fastmath's SwiGLU and loss, the native attention (float32)
    # and cross-entropy; counted with their own fitted counts (calibration.COEFFICIENTS_CPU).
    kernels: str = "mlx"
    # grpo: completions sampled per prompt (rows = prompts x group_size), the longest
    # completion, and whether a no-gradient pass scores the rollout before the step
    # (objective.beta > 0: the reference; num_iterations > 1: the rollout policy).
    group_size: int = 0
    rollout_rows: int = 0        # completions sampled at once on one rank (before micro-batches)
    completion_tokens: int = 0
    top_p: float = 1.0
    scored_before_step: bool = False
    # grpo: the step computes each prompt (less its last token) once for its group and the
    # group's rows from the prompt's last token on (objectives.grpo, "shared prompts"):
    # where the rows are not cut into parts and the family's cache is a plain KV cache.
    shared_prompts: bool = False
    notes: tuple = field(default=(), compare=False)

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def positions(self) -> int:
        return self.width - 1

    @property
    def prompt_positions(self) -> int:
        """grpo: a prompt's positions, at most (data.max_seq_len less the completion)."""
        return max(self.positions - self.completion_tokens, 1)

    @property
    def tokens(self) -> int:
        """Positions the model computes in one micro-batch (N): with shared prompts each
        prompt less its last token once, and every row from that token on."""
        if self.shared_prompts:
            prompts = self.rows // max(self.group_size, 1)
            return prompts * (self.prompt_positions - 1) + self.loss_tokens
        return self.rows * self.positions

    @property
    def loss_tokens(self) -> int:
        """Positions whose logits the loss computes (a shared prompt's pass has none)."""
        if self.shared_prompts:
            return self.rows * (self.completion_tokens + 1)
        return self.rows * self.positions

    @property
    def shared_kv(self) -> int:
        """grpo, shared prompts: elements per adapted block of the keys and values the
        rows attend to, kept for its backward pass: the prompt's, repeated for each row
        of its group, and those joined to the row's own (objectives.grpo._AfterPrompt)."""
        if not self.shared_prompts:
            return 0
        prompt, row = self.prompt_positions - 1, self.completion_tokens + 1
        return self.rows * (2 * prompt + row) * 2 * self.shape.kv_dim

    @property
    def reference_pass(self) -> bool:
        return self.objective == "dpo" or self.scored_before_step

    @property
    def grpo(self) -> bool:
        return self.objective == "grpo"

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
    def native_attention(self) -> bool:
        """Whether attention runs mlxtune.native's kernel (CPU kernels, float32, models
        using mlx_lm's shared attention function), which keeps no scores: only the
        log-sum-exp of each query row for its backward pass."""
        return (self.kernels == "cpu" and self.compute_bytes == 4
                and self.attention == "materialised" and _routable(self.shape.model_type))

    @property
    def blockwise(self) -> bool:
        """Whether attention runs a block of queries at a time (mlxtune.attention, on the
        CPU backend, for models using mlx_lm's shared attention function)."""
        return self.backend == "cpu" and self.attention == "materialised" and \
            not self.native_attention and \
            _blockwise_block(self.shape.model_type, self.positions) > 0

    @property
    def cpu_loss(self) -> bool:
        """Whether the loss runs on the CPU kernels' chunked form (fastmath, or the native
        cross-entropy): at most FAST_CHUNK positions' logits at a time, whatever
        train.loss_chunk says, unless it is 0 (mlxtune.forward.chunked_token_losses)."""
        return (self.kernels == "cpu" and self.loss_chunk > 0
                and self.shape.model_type in HEAD_FAMILIES)

    def head_weight(self):
        """The output head's stored weight (the embedding when tied), or None."""
        kind = "embedding" if self.shape.tie_embeddings else "head"
        return next((x for x in self.weights if x.kind == kind), None)

    @property
    def score_columns(self) -> float:
        """Attention scores per query position and head that are computed and kept."""
        return self._score_columns(self.positions)

    def _score_columns(self, L: int) -> float:
        """score_columns for rows of L positions that attend causally to themselves."""
        if self.attention == "fused" or self.native_attention:
            return 0.0
        block = _blockwise_block(self.shape.model_type, L) if self.backend == "cpu" else 0
        if not block:
            return float(L)
        total = sum((min(s + block, L) - s) * min(s + block, L) for s in range(0, L, block))
        return total / L

    @property
    def attention_scores(self) -> float:
        """Attention score elements (all heads) one block computes and keeps. With shared
        prompts the prompts' pass attends causally; the rows' pass, whose queries are
        fewer than its keys (the prompt's and its own), takes MLX's attention, which keeps
        every score unless it is fused (mlxtune.attention covers equal lengths only)."""
        heads = self.shape.num_heads
        if not self.shared_prompts:
            return self.tokens * heads * self.score_columns
        prompt, row = self.prompt_positions - 1, self.completion_tokens + 1
        prompts = self.rows // max(self.group_size, 1)
        rows = 0 if self.attention == "fused" else self.rows * row * (prompt + row)
        return heads * (prompts * prompt * self._score_columns(prompt) + rows)

    def activation_bytes(self, coefficients: dict | None = None) -> float:
        """Bytes per activation element. On the CPU backend a 16-bit dtype has no BLAS
        path: MLX converts to float32 around each matmul, which the fitted
        "cpu_half_bytes" accounts for."""
        if self.backend == "cpu" and self.compute_bytes == 2:
            return (coefficients or COEFFICIENTS)["cpu_half_bytes"]
        return float(self.compute_bytes)


def _routable(model_type: str) -> bool:
    """Whether the family's attention goes through mlx_lm's shared attention function,
    which mlxtune.attention routes to its CPU forms."""
    import importlib

    try:
        module = importlib.import_module(f"mlx_lm.models.{model_type}")
    except ImportError:
        return False
    return hasattr(module, "scaled_dot_product_attention")


def cpu_kernels(backend: str) -> str:
    """The kernels a run here computes with: "cpu" where it takes mlxtune's CPU forms
    (the CPU profile with fastmath on, and the native extension built or buildable: a run
    builds it on first use), else "mlx". Nothing is built or loaded to decide."""
    if backend != "cpu":
        return "mlx"
    from mlxtune import fastmath, native

    return "cpu" if fastmath.enabled() and native.expected() else "mlx"


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
             attention: str = "materialised", full_finetune: bool = False,
             kernels: str | None = None) -> Workload:
    """What one rank computes in one micro-batch of `cfg` (an mlxtune Config).
    `full_finetune` plans adapter.type full whatever the config says; `kernels` ("mlx" or
    "cpu") defaults to what a run on `backend` here would take (cpu_kernels)."""
    if kernels is None:
        kernels = cpu_kernels(backend)
    if kernels not in ("mlx", "cpu"):
        raise ValueError(f"kernels must be 'mlx' or 'cpu', not {kernels!r}")
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
    o = cfg.objective
    grpo = o.type == "grpo"
    # grpo: each prompt's group of completions is a row of the step (prompt + completion,
    # at most data.max_seq_len); a rollout micro-batch holds train.batch_size prompts
    rows = (batch // ranks) * (2 if preference else (o.group_size if grpo else 1))
    micro = micro_rows(rows, width, t.max_batch_tokens, preference)
    if micro < rows:
        notes.append(f"train.max_batch_tokens={t.max_batch_tokens}: micro-batches of {micro} "
                     f"of the {rows} rows, gradients summed")
    # As grpo_loop decides: rows cut into parts (max_batch_tokens, CPU streams) or a
    # cache that is not a plain KV cache compute every row whole.
    streams = t.cpu_streams if backend == "cpu" else 1
    shared = grpo and not t.max_batch_tokens and streams <= 1 and shape.plain_kv_cache
    if grpo and not shared:
        notes.append("grpo: every row computes its prompt (rows cut into parts, or a model "
                     "whose cache is not a plain KV cache)")
    # Rows of several examples carry a block-diagonal mask: packed rows, and random batches
    # laid out several examples to a row (data.batcher); length-grouped rows do not.
    segmented = not preference and not grpo and (cfg.data.packing is True
                                                 or not cfg.data.group_by_length)
    if cfg.data.packing == "auto" and not preference and not grpo and cfg.data.group_by_length:
        notes.append("data.packing is auto: decided from the data at run time; planned "
                     "without the packing mask (rows are full either way)")
    weights = tuple(weights_mod.base_weights(shape, cfg.model, DTYPE_BYTES[dtype]))
    if grpo and any(w.quantized for w in weights):  # objective.dense_base, as the run
        from mlxtune import quant

        dense = weights_mod.densified(list(weights), DTYPE_BYTES[dtype])
        copy = sum(d.nbytes for d, w in zip(dense, weights) if w.quantized)
        if quant.dense_copy_wanted(o.dense_base, True, copy,
                                   profile="cpu" if backend == "cpu" else "gpu"):
            extra = sum(w.nbytes for w in dense) - sum(w.nbytes for w in weights)
            weights = tuple(dense)
            notes.append(f"objective.dense_base: {o.dense_base}: the quantized base is "
                         f"dequantized for the run (+{extra / 1e9:.2f} GB)")
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
        optimizer_states=states, attention=attention, kernels=kernels,
        group_size=o.group_size if grpo else 0, rollout_rows=rows if grpo else 0,
        completion_tokens=min(o.max_completion_tokens, width) if grpo else 0,
        top_p=o.top_p if grpo else 1.0,
        scored_before_step=grpo and (bool(o.beta) or o.num_iterations > 1),
        shared_prompts=shared,
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
