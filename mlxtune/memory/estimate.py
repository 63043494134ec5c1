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
cannot check). A step on mlxtune's CPU kernels (Workload.kernels == "cpu": native
attention, the loss a chunk at a time, fastmath's SwiGLU) holds other arrays and has its
own counts (COEFFICIENTS_CPU): MLX's, with those the kernels change refitted on real-width
models.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxtune.memory.calibration import COEFFICIENTS, COEFFICIENTS_CPU
from mlxtune.memory.workload import (  # noqa: F401  (the planner's API, re-exported)
    DTYPE_BYTES, HEAD_FAMILIES, PAD_MULTIPLE, Workload, block_index, micro_rows,
    resolve_targets, workload)

ITEMS = ("base weights", "LoRA adapter", "gradients", "optimizer state", "activations",
         "attention", "logits and loss", "packing mask", "dequantization (CPU)",
         "framework")


# ----------------------------------------------------------------------------- features


def coefficients_for(w: Workload) -> dict:
    """The fitted counts of the kernels `w` computes with: MLX's ops (Metal, CUDA, and
    the CPU without mlxtune's kernels) or mlxtune's CPU kernels."""
    return COEFFICIENTS_CPU if w.kernels == "cpu" else COEFFICIENTS


def features(w: Workload, coefficients: dict | None = None) -> dict[str, float]:
    """Sizes in bytes that the fitted COEFFICIENTS multiply: one copy of each kind of
    array the step holds (see the module docstring). Shared by the estimate and by
    scripts/calibrate_memory.py, which fits the coefficients."""
    s = w.shape
    N, c = w.tokens, w.activation_bytes(coefficients or coefficients_for(w))
    n = w.adapted_layers
    lora_out = sum(o for _, _, o in w.lora_modules)
    lora_r = w.rank * len(w.lora_modules)
    scores = w.attention_scores
    f = {
        # Kept for backward by each adapted block (without checkpointing).
        "saved_d": 0.0, "saved_qkv": 0.0, "saved_ffn": 0.0, "saved_lora": 0.0,
        "saved_att": 0.0,
        # Kept by each block with checkpointing: its input.
        "ckpt_d": 0.0,
        # The working set of the block whose backward runs.
        "work_d": N * c * s.hidden_size, "work_ffn": N * c * s.intermediate_size,
        "work_att": c * scores,
        # Logits and cross-entropy (float32): whole, or in chunks; on the CPU kernels
        # FAST_CHUNK positions at a time, and a quantized head dequantized once for them.
        "logits": 0.0, "logits_chunked": 0.0, "logits_cpu": 0.0, "head_dense": 0.0,
        # CPU kernels: the checkpointed block recomputed for its backward pass
        "ckpt_block": 0.0,
        # MLPs with a GELU (Gemma's, StarCoder2's) instead of SwiGLU: what the activation
        # keeps beyond SwiGLU's arrays
        "saved_gelu": 0.0,
        # Dense copies of quantized layers on the CPU path.
        "dequant_max": 0.0, "dequant_all": 0.0, "dequant_own": 0.0,
        "dequant_max_ckpt": 0.0, "dequant_all_ckpt": 0.0, "dequant_own_ckpt": 0.0,
        "dequant_block": 0.0, "dequant_block_ckpt": 0.0, "ckpt_own": 0.0,
        # DoRA: each adapted layer's output before its magnitude scaling, kept for the
        # magnitudes' gradient (per adapted block, like the saved_* above).
        "saved_dora": 0.0,
        "framework": 1e6,
    }
    if s.model_type in GELU_MLPS:
        # a GELU MLP keeps the activation's composed intermediates (MLX's ops on every
        # backend: fastmath replaces SwiGLU only), [positions, ffn] each
        per_gelu = N * c * s.intermediate_size
        f["saved_gelu"] = (n if not w.grad_checkpoint else 1) * per_gelu
    per_block = {"saved_d": N * c * s.hidden_size,
                 "saved_qkv": N * c * (s.q_dim + 2 * s.kv_dim),
                 "saved_ffn": N * c * s.intermediate_size,
                 "saved_lora": N * c * (lora_out + lora_r),
                 "saved_att": c * scores}
    kept = n if not w.grad_checkpoint else 1  # checkpointing: one block recomputed at a time
    for k, v in per_block.items():
        f[k] = kept * v
    if w.dora:
        f["saved_dora"] = kept * N * c * lora_out
    if w.grad_checkpoint:
        f["ckpt_d"] = n * N * c * s.hidden_size
        # the block being recomputed and its backward: the main arrays of one block
        f["ckpt_block"] = N * c * (s.hidden_size + s.q_dim + 2 * s.kv_dim + s.intermediate_size)
    head = w.head_weight() if w.cpu_loss else None
    if w.cpu_loss:
        f["logits_cpu"] = cpu_loss_scratch(w)
        if head is not None and head.quantized:
            f["head_dense"] = head.rows * head.cols * 4.0
    elif w.chunked:
        f["logits_chunked"] = w.loss_tokens * s.vocab_size * 4.0
    else:
        f["logits"] = w.loss_tokens * s.vocab_size * 4.0
    if w.backend == "cpu":  # dense copies of quantized matrices for BLAS (mlxtune.quant)
        # (the head's own copy is head_dense where the CPU kernels' loss takes it)
        q = [x for x in w.weights if x.quantized and x is not head]
        if q:
            # With checkpointing the blocks' copies are made again, one block at a time,
            # and MLX holds a different number of them: counted apart.
            tag = "_ckpt" if w.grad_checkpoint else ""
            f["dequant_max" + tag] = max(x.rows * x.cols for x in q) * w.compute_bytes
            f["dequant_all" + tag] = sum(x.rows * x.cols for x in q if x.kind == "linear"
                                         and x.format.kind == "affine") * w.compute_bytes
            # MLX's affine layers dequantize in one op; mlxtune's own formats (nf4,
            # q6_k) build theirs from several float32 arrays (quant.layouts).
            f["dequant_own" + tag] = sum(x.rows * x.cols for x in q if x.kind == "linear"
                                         and x.format.kind != "affine") * w.compute_bytes
            # One block's quantized layers, dense: what the CPU kernels' counts take
            # instead of every block's (a step holds the copies of the few blocks MLX has
            # scheduled ahead, not of the whole model: measured at 2-28 blocks)
            if w.grad_checkpoint:
                # mlxtune's own formats under checkpointing: about their stored size
                # again (measured on NF4 bases, which arrays is not known; MLX's affine
                # layers do not)
                f["ckpt_own"] = float(sum(x.nbytes for x in q if x.kind == "linear"
                                          and x.format.kind != "affine"))
            blocks = {block_index(x.name) for x in q if x.kind == "linear"} - {None}
            f["dequant_block" + tag] = (sum(x.rows * x.cols for x in q if x.kind == "linear")
                                        * w.compute_bytes / max(len(blocks), 1))
    return f


FAST_CHUNK = 64  # mlxtune.forward.FAST_CHUNK: positions per chunk of the CPU kernels' loss
# mlx_lm families whose MLP activation is a GELU (exact or tanh-approximated), not SwiGLU.
GELU_MLPS = {"gemma", "gemma2", "gemma3_text", "gemma3", "starcoder2"}
# Families whose head has a final soft cap or scaling: the native cross-entropy does not
# take them (mlxtune.forward._native_head_weight), fastmath's chunks do.
_SCALED_HEADS = {"gemma2", "granite"}


def cpu_loss_scratch(w: Workload) -> float:
    """Bytes of one chunk of the CPU kernels' loss: the native cross-entropy's scratch
    buffer (mlxtune/native/cross_entropy.cpp: chunk_rows(V) rows of V logits and two
    hidden-sized rows, at most 64 MB of logits) where it takes the head (float32, no
    final scaling), else fastmath's [FAST_CHUNK, V] logits."""
    V, d = w.shape.vocab_size, w.shape.hidden_size
    if w.compute_bytes == 4 and w.shape.model_type not in _SCALED_HEADS:
        rows = max(8, min(256, (64 << 20) // (4 * V)))
        return rows * (V + 2 * d) * 4.0
    return min(w.loss_tokens, FAST_CHUNK) * V * 4.0

# Which report item each fitted feature belongs to.
_ITEM_OF = {"saved_d": "activations", "saved_qkv": "activations", "saved_ffn": "activations",
            "saved_lora": "activations", "ckpt_d": "activations", "work_d": "activations",
            "work_ffn": "activations", "saved_att": "attention", "work_att": "attention",
            "logits": "logits and loss", "logits_chunked": "logits and loss",
            "logits_cpu": "logits and loss", "head_dense": "logits and loss",
            "ckpt_block": "activations", "saved_gelu": "activations",
            "dequant_max": "dequantization (CPU)", "dequant_all": "dequantization (CPU)",
            "dequant_own": "dequantization (CPU)", "dequant_max_ckpt": "dequantization (CPU)",
            "dequant_all_ckpt": "dequantization (CPU)",
            "dequant_own_ckpt": "dequantization (CPU)",
            "dequant_block": "dequantization (CPU)", "dequant_block_ckpt": "dequantization (CPU)",
            "ckpt_own": "dequantization (CPU)",
            "saved_dora": "activations",
            "framework": "framework"}


@dataclass
class Breakdown:
    workload: Workload
    items: dict[str, float]          # item -> bytes (they sum to `peak`)
    reference_pass: float | None     # dpo: peak of the reference forward pass, bytes
    rollout: float | None = None     # grpo: peak of sampling the rollout, bytes

    @property
    def peak(self) -> float:
        step = sum(self.items.values())
        return max(step, self.reference_pass or 0.0, self.rollout or 0.0)

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
    if w.attention == "materialised" and not w.blockwise and not w.native_attention:
        items["attention"] += float(L * L)  # MLX's causal mask: [positions, positions] bools
    if w.packed:
        items["packing mask"] = float(w.rows * L * L)
    if c != 4:  # the head's output in the compute dtype before the float32 cast
        chunk = min(w.loss_tokens, w.loss_chunk) if w.chunked else w.loss_tokens
        items["logits and loss"] += float(chunk * w.shape.vocab_size * c)
    # grpo, shared prompts: each adapted block's prompt keys and values, repeated for the
    # group's rows, are kept for its backward pass (counted, not fitted)
    items["attention"] += float(w.adapted_layers * w.shared_kv * c)
    return items


# With mlxtune's CPU kernels and checkpointing, two phases of the step do not overlap:
# the loss (the head's float32 copy and the loss's scratch, freed once the native kernel
# has computed the hidden states' gradient beside the loss) and the recomputation of a
# checkpointed block for its backward pass; the step holds the larger of the two.
LOSS_PHASE = ("logits_cpu", "head_dense")
RECOMPUTE_PHASE = ("ckpt_block", "dequant_max_ckpt", "dequant_block_ckpt")


def phase_overlap(w: Workload, f: dict, coef: dict) -> tuple[str, float]:
    """(the phase the step does not hold at its peak, its bytes) where the CPU kernels'
    checkpointed step has two phases, else ("", 0)."""
    if w.kernels != "cpu" or not w.grad_checkpoint:
        return "", 0.0
    loss = sum(coef[k] * f[k] for k in LOSS_PHASE)
    recompute = sum(coef[k] * f[k] for k in RECOMPUTE_PHASE)
    return ("loss", loss) if loss <= recompute else ("recompute", recompute)


def estimate(w: Workload, coefficients: dict | None = None) -> Breakdown:
    coef = coefficients_for(w) if coefficients is None else coefficients
    items = fixed_bytes(w)
    f = features(w, coef)
    smaller, _ = phase_overlap(w, f, coef)
    for name, value in f.items():
        if (smaller == "loss" and name in LOSS_PHASE) or \
                (smaller == "recompute" and name in RECOMPUTE_PHASE):
            continue  # not alive at the step's peak
        items[_ITEM_OF[name]] += coef[name] * value
    if w.full_finetune:
        items["optimizer state"] += update_excess(w, items, coef)
    ref = None
    if w.reference_pass:
        ref = reference_pass_bytes(w, coef)
    return Breakdown(w, items, ref, rollout_bytes(w, coef) if w.grpo else None)


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
    head = (coef["logits"] * (f["logits"] + f["logits_chunked"])
            + coef["logits_cpu"] * f["logits_cpu"] + coef["head_dense"] * f["head_dense"])
    return resident + coef["reference"] * act + head + coef["framework"] * f["framework"]


# Sampling's [rows, vocab] float32 arrays alive at once: the logits and the probabilities;
# with top_p < 1 also the sorted probabilities and their cumulative sum.
SAMPLING_COPIES = {False: 2, True: 4}
# mlxtune.decode drops finished rows from its cache (a copy of the rest) only when they
# are a quarter of the batch: the copy holds at most 3/4 of the cache beside it.
CACHE_COMPACTION = 1.75


def rollout_bytes(w: Workload, coef: dict) -> float:
    """grpo: the peak of sampling a rollout (mlxtune.decode, before the step), counted
    from what the decoder allocates rather than fitted: the resident state (weights,
    adapter, optimizer state); the KV cache preallocated for every row's prompt and
    completion (keys and values of every layer in the compute dtype), with room for
    the copy that drops finished rows; the sampling's [rows, vocab] float32 arrays; and
    the prompts' prefill (each distinct prompt once) through one block at a time, with the
    step's fitted working-set counts over the prompt tokens."""
    s, c = w.shape, w.activation_bytes(coef)
    items = fixed_bytes(w)
    resident = sum(items[k] for k in ("base weights", "LoRA adapter", "optimizer state"))
    rows, length = w.rollout_rows, w.positions
    kv = rows * length * s.num_layers * 2 * s.kv_dim * w.compute_bytes * CACHE_COMPACTION
    sampling = rows * s.vocab_size * 4.0 * SAMPLING_COPIES[w.top_p < 1]
    prompt_tokens = (rows // max(w.group_size, 1)) * max(length - w.completion_tokens, 1)
    prefill = prompt_tokens * c * (coef["work_d"] * s.hidden_size
                                   + coef["work_ffn"] * s.intermediate_size)
    f = features(w, coef)
    dequant = sum(coef[k] * f[k] for k in ("dequant_max", "dequant_max_ckpt"))
    return resident + kv + sampling + prefill + dequant + coef["framework"] * f["framework"]


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
        + (" (completions: prompts x objective.group_size)" if w.grpo else
           " (pairs: chosen and rejected rows)" if w.objective != "sft" else "")
        + "; every row as long as data.max_seq_len (the worst case)",
        f"compute dtype {w.dtype} on the {w.backend} backend",
        adapter,
        "gradient checkpointing " + ("on" if w.grad_checkpoint else "off"),
        "attention scores " + ("materialised (MLX's attention under autodiff)"
                               if w.attention == "materialised" else "fused (not kept)"),
        ("logits and loss in chunks of %d positions" % w.loss_chunk) if w.chunked
        else "logits and loss over all positions at once",
    ]
    if w.objective == "dpo":
        out.append("dpo: the reference policy's forward pass runs before each step")
    if w.grpo:
        out.append(f"grpo: {w.rollout_rows} completions ({w.rollout_rows // w.group_size} "
                   f"prompts x {w.group_size}) sampled at once, up to {w.completion_tokens} "
                   "tokens each, the prompt and completion within data.max_seq_len; the KV "
                   "cache and sampling counted from what the decoder allocates"
                   + ("; a no-gradient pass scores the rollout before the step"
                      if w.scored_before_step else ""))
        if w.shared_prompts:
            out.append(f"grpo step: each prompt ({w.prompt_positions} positions at most) "
                       f"computed once for its group, the rows from its last token on "
                       f"({w.completion_tokens + 1} positions), its keys and values repeated "
                       "for the group")
    return out + list(w.notes)


def describe_kernels(w: Workload) -> str:
    """Which kernels the step is planned with, for the plan's text."""
    if w.kernels == "cpu":
        return ("mlxtune's CPU kernels (fastmath's SwiGLU and loss, 64 positions of logits at "
                "a time; the native attention" + (", no scores kept" if w.native_attention
                                                  else " only in float32") + ")")
    if w.backend == "cpu":
        return ("MLX's ops (MLXTUNE_FASTMATH=0, the GPU profile, or mlxtune's CPU kernels "
                "unavailable: an upper bound where they would run)")
    return "MLX's ops"

