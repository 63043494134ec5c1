"""The run configuration: YAML -> validated dataclasses.

Every error names the file and the dotted key. Unknown keys are rejected with a
"did you mean"; wrong types are named with the key. Relative paths in a config file are
relative to that file's folder, so a config works from any working directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import yaml

from mlxtune.config_read import apply_override, build
from mlxtune.config_rules import check as _check
from mlxtune.errors import ConfigError

PACKAGED_DEFAULT_MODEL = "smollm2-135m-instruct"


def _choices(*values, **extra):
    return {"choices": values, **extra}


@dataclass
class QuantizeConfig:
    # affine: MLX's group-wise format (bits, group_size); nf4: QLoRA's NormalFloat4 with
    # double quantization (block 64; bits and group_size do not apply).
    format: str = field(default="affine", metadata=_choices("affine", "nf4", "none"))
    bits: int = field(default=4, metadata=_choices(2, 3, 4, 5, 6, 8))
    group_size: int = field(default=64, metadata=_choices(32, 64, 128))


@dataclass
class ModelConfig:
    path: str = PACKAGED_DEFAULT_MODEL
    revision: Optional[str] = None
    quantize: Optional[QuantizeConfig] = None
    # 'auto': float32 on the CPU backend (no fast bf16 path there), bfloat16 on GPUs.
    dtype: str = field(default="auto", metadata=_choices("auto", "float32", "bfloat16", "float16"))
    # Start from an existing adapter folder (mlx-lm layout) instead of a fresh one.
    adapter: Optional[str] = None
    trust_remote_code: bool = False


@dataclass
class AdapterConfig:
    # lora: low-rank matrices A, B beside each target layer (W + scale * (A @ B).T);
    # dora: LoRA plus a trained magnitude per output row (Liu et al. 2024; mlx-lm's and
    # PEFT's DoRA); full: every weight of the adapted blocks trains (no rank, alpha,
    # dropout or targets; needs a dense base). See mlxtune.adapters.
    type: str = field(default="lora", metadata=_choices("lora", "dora", "full"))
    rank: int = field(default=8, metadata={"min": 1})
    # scale = alpha / rank, or alpha / sqrt(rank) with rslora.
    alpha: float = field(default=16.0, metadata={"min": 0.0})
    # rsLoRA (Kalajdzievski 2023): scale alpha / sqrt(rank), so that higher ranks keep learning.
    rslora: bool = False
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.99})
    # Module names inside each transformer block (e.g. self_attn.q_proj, mlp.down_proj) or
    # short names (q_proj). Empty: every linear layer of the block.
    targets: list[str] = field(default_factory=list)
    # Adapt the last N blocks; -1 for all.
    layers: int = field(default=-1, metadata={"min": -1})


@dataclass
class SplitConfig:
    # Field of each record whose value keeps examples together (e.g. the user who wrote them).
    by: Optional[str] = None
    valid: float = field(default=0.1, metadata={"min": 0.0, "max": 0.9})
    test: float = field(default=0.1, metadata={"min": 0.0, "max": 0.9})


@dataclass
class ColumnsConfig:
    # Which column of a table (Hugging Face dataset, parquet, csv, json) holds each field
    # of a record; unset fields keep their own names. A list joins several text columns
    # with a blank line (prompt: [instruction, input]).
    messages: Optional[str] = None
    prompt: list[str] = field(default_factory=list)
    completion: Optional[str] = None
    text: Optional[str] = None
    chosen: Optional[str] = None
    rejected: Optional[str] = None


@dataclass
class HubSplitsConfig:
    # The dataset's split (or split expression, e.g. "train[:90%]") for each of ours;
    # None: found by name (validation / valid / val / dev -> valid). Without a valid and a
    # test split, data.split divides train.
    train: Optional[str] = None
    valid: Optional[str] = None
    test: Optional[str] = None


@dataclass
class HubConfig:
    # A Hugging Face dataset, read with the `datasets` library (pip install
    # 'mlxtune-lora[hub]'); offline (HF_HUB_OFFLINE=1) from the local cache.
    id: Optional[str] = None
    config: Optional[str] = None  # the dataset's configuration (subset) name
    revision: Optional[str] = None
    splits: HubSplitsConfig = field(default_factory=HubSplitsConfig)
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)


@dataclass
class DedupConfig:
    # `mlxtune data`: two examples are near-duplicates when the Jaccard similarity of
    # their word shingles (after normalising case, whitespace and punctuation) is at least
    # `threshold` (found with MinHash + LSH, confirmed exactly).
    threshold: float = field(default=0.8, metadata={"min": 0.3, "max": 1.0})
    shingle: int = field(default=3, metadata={"min": 1, "max": 10})  # words per shingle


@dataclass
class DataConfig:
    train: Optional[str] = None
    valid: Optional[str] = None
    test: Optional[str] = None
    # One file split by `split` instead of train/valid/test files.
    path: Optional[str] = None
    split: SplitConfig = field(default_factory=SplitConfig)
    # A Hugging Face dataset instead of files (its splits, or one split divided by `split`).
    hub: Optional[HubConfig] = None
    # Column names for parquet / csv / json files (as data.hub.columns for the hub).
    columns: Optional[ColumnsConfig] = None
    # Near-duplicates for `mlxtune data` (None: DedupConfig's defaults).
    dedup: Optional[DedupConfig] = None
    max_seq_len: int = field(default=1024, metadata={"min": 8})
    # Loss on completion / assistant tokens only. None: on for chat and completions data.
    mask_prompt: Optional[bool] = None
    # Chat data: loss on the last assistant turn only, earlier ones being context (as
    # LLaMA-Factory's mask_history and mlx-lm's --mask-prompt); false: every assistant turn.
    mask_history: bool = False
    # Several examples per row of max_seq_len tokens (no attention across them): true,
    # false, or "auto" (pack when it costs fewer model FLOPs than the unpacked batches).
    packing: Union[bool, str] = field(default="auto", metadata=_choices("auto", True, False))
    # Batches of examples of similar length (little padding) instead of random examples.
    # None: false for SFT (its loss is a mean over a batch's tokens, and length-grouped
    # batches trained to a worse held-out loss: docs/performance.md), true for preference
    # pairs (a pair's loss does not depend on its batch). Ignored when rows are packed.
    group_by_length: Optional[bool] = None
    # Row widths of the training batches (a compiled step is traced and compiled for every
    # new shape): 0 pads each batch's rows to a multiple of 32 tokens; N: to a multiple of
    # 32 up to 32 x N tokens, then to one of N widths per doubling, so a row pads by less
    # than 1/N of its width and a run sees O(N log(max_seq_len)) widths; never wider than
    # a multiple of 32 would be at max_seq_len. None: 8 under the GPU profile (Metal,
    # CUDA: short steps, where compiling a shape costs as much as a step), 0 on the CPU
    # profile (steps of seconds: compiling a shape costs ~0.2 s, less than the padding
    # would). See docs/performance.md, "Shape buckets".
    shape_buckets: Optional[int] = field(default=None, metadata={"min": 0})


@dataclass
class RewardConfig:
    # One entry of objective.rewards (grpo): a built-in reward by name (json_valid,
    # json_schema, field_match, exact_match, regex, length) or a user function
    # 'file.py:function' with TRL's signature; see mlxtune.objectives.rewards.
    name: Optional[str] = None
    function: Optional[str] = None
    weight: float = 1.0
    schema: Optional[str] = None   # json_schema: a JSON Schema file
    pattern: Optional[str] = None  # regex: matched anywhere (re.search)
    target: Optional[int] = None   # length: completion tokens before the penalty starts
    lists: Optional[str] = None    # field_match: exact (default) | jaccard (partial credit)


@dataclass
class ObjectiveConfig:
    # sft | dpo | orpo | simpo (the last three train on preference pairs; see
    # mlxtune.objectives.preference for the formulas) | grpo (rollouts scored by
    # objective.rewards; mlxtune.objectives.grpo).
    type: str = field(default="sft", metadata=_choices("sft", "dpo", "orpo", "simpo", "grpo"))
    loss: str = field(default="sigmoid", metadata=_choices("sigmoid", "ipo", "hinge", "robust"))
    # None: the method's default (dpo 0.1, orpo 0.1 (its lambda), simpo 2.0).
    beta: Optional[float] = field(default=None, metadata={"min": 0.0})
    # Probability that a pair's preference label is flipped (sigmoid: conservative DPO;
    # robust: Chowdhury et al.; simpo).
    label_smoothing: float = field(default=0.0, metadata={"min": 0.0, "max": 0.49})
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    # DPO: weight of RPO's NLL term on the chosen answer (Pang et al. 2024; TRL's
    # rpo_alpha, whose paper uses 1.0); 0: plain DPO.
    rpo_alpha: float = field(default=0.0, metadata={"min": 0.0})
    # DPO: the reference policy's log-probs computed once before training and cached in
    # the run directory, instead of a reference forward pass every step.
    precompute_reference: bool = False
    # GRPO (TRL's GRPOTrainer keys): completions sampled per prompt (a group; >= 2), the
    # sampling temperature and top-p, the longest completion in tokens.
    group_size: int = field(default=8, metadata={"min": 1})
    temperature: float = field(default=1.0, metadata={"min": 0.0})
    top_p: float = field(default=1.0, metadata={"min": 0.0, "max": 1.0})
    max_completion_tokens: int = field(default=256, metadata={"min": 1})
    # The ratio's clip range [1 - epsilon, 1 + epsilon_high] (None: epsilon_high = epsilon).
    epsilon: float = field(default=0.2, metadata={"min": 0.0})
    epsilon_high: Optional[float] = field(default=None, metadata={"min": 0.0})
    # dapo: sum over tokens / tokens of the batch; grpo: per-sequence mean, then batch
    # mean; dr_grpo: sum / (sequences x max_completion_tokens).
    loss_type: str = field(default="dapo", metadata=_choices("dapo", "grpo", "dr_grpo"))
    # Advantages: reward - group mean, divided by the std of the group / the batch, or not.
    scale_rewards: str = field(default="group", metadata=_choices("group", "batch", "none"))
    # Completions that hit max_completion_tokens take no part in the loss.
    mask_truncated_completions: bool = False
    # Optimisation steps per rollout batch (TRL's num_iterations, mu).
    num_iterations: int = field(default=1, metadata={"min": 1})
    rewards: list[RewardConfig] = field(default_factory=list)
    # A quantized base dequantized once for the whole GRPO run (rollouts decode a token at a
    # time; the same function): auto: on the CPU profile, when the copy takes under a
    # quarter of the memory (as eval.dense_base).
    dense_base: Union[bool, str] = field(default="auto", metadata=_choices("auto", True, False))


@dataclass
class EarlyStoppingConfig:
    # Stop after this many validations without improvement; None disables.
    patience: Optional[int] = field(default=None, metadata={"min": 1})
    min_delta: float = field(default=0.0, metadata={"min": 0.0})


@dataclass
class TrainConfig:
    iters: Optional[int] = field(default=None, metadata={"min": 1})  # None: DEFAULT_ITERS
    # Alternative to iters: passes over the training set (iters is derived from it).
    epochs: Optional[float] = field(default=None, metadata={"min": 0.0})
    batch_size: int = field(default=4, metadata={"min": 1})
    grad_accumulation: int = field(default=1, metadata={"min": 1})
    learning_rate: float = field(default=1.0e-4, metadata={"min": 0.0})
    optimizer: str = field(default="adamw", metadata=_choices("adamw", "adam", "sgd"))
    weight_decay: float = field(default=0.0, metadata={"min": 0.0})
    momentum: float = field(default=0.9, metadata={"min": 0.0})  # sgd only
    schedule: str = field(default="constant", metadata=_choices("constant", "cosine", "linear"))
    warmup: int = field(default=0, metadata={"min": 0})
    min_lr: float = field(default=0.0, metadata={"min": 0.0})
    max_grad_norm: Optional[float] = field(default=1.0, metadata={"min": 0.0})
    seed: int = 0
    eval_every: int = field(default=50, metadata={"min": 0})  # 0: never
    val_batches: Optional[int] = field(default=None, metadata={"min": 1})  # None: whole split
    save_every: int = field(default=100, metadata={"min": 0})  # 0: only at the end
    keep_checkpoints: int = field(default=3, metadata={"min": 0})  # 0: keep all
    log_every: int = field(default=10, metadata={"min": 1})
    grad_checkpoint: bool = False
    # Positions per chunk of the output head + cross-entropy, recomputed in the backward
    # pass so the [positions x vocab] logits are never held whole; batches with fewer
    # positions compute it in one piece. 0: never chunk.
    loss_chunk: int = field(default=2048, metadata={"min": 0})
    # A batch whose rows x padded length exceed this many tokens runs as several
    # micro-batches of whole rows, their gradients summed before the one update: the same
    # step in less memory (activations scale with the tokens of one micro-batch). None: never.
    max_batch_tokens: Optional[int] = field(default=None, metadata={"min": 1})
    # CPU backend: split each (micro-)batch's rows over this many CPU streams, evaluated at
    # once on threads of their own (MLX runs a stream's elementwise ops on one core): the
    # same step. Faster for short rows, slower for long ones (docs/performance.md), so 1
    # unless asked; ignored off the CPU backend.
    cpu_streams: int = field(default=1, metadata={"min": 1})
    compile: bool = True
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # LoRA+ (Hayou et al. 2024): lora_b (and DoRA's magnitudes, as PEFT groups them)
    # learn at this many times learning_rate, lora_a at learning_rate. None: off.
    lora_plus_ratio: Optional[float] = field(default=None, metadata={"min": 1.0})
    # Experiment trackers fed from the same events as events.jsonl (rank 0 only): a name
    # or a list of tensorboard, wandb, mlflow, trackio; each an optional package
    # (mlxtune.train.tracking). [] or "none": events.jsonl alone.
    report_to: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    # Base (adapters off) vs tuned on a held-out split; see mlxtune.evaluate.
    split: str = field(default="test", metadata=_choices("test", "valid"))
    auto: bool = True  # at the end of `mlxtune run`, when the split has examples
    adapter: str = field(default="best", metadata=_choices("best", "final"))  # best/ if any
    # Generation: greedy, for the first N examples of the split (None: all of them).
    examples: Optional[int] = field(default=None, metadata={"min": 0})
    # None: twice the longest reference (in tokens) plus 16.
    max_new_tokens: Optional[int] = field(default=None, metadata={"min": 1})
    batch_size: int = field(default=16, metadata={"min": 1})
    schema: Optional[str] = None  # a JSON Schema file the outputs should match
    metric: Optional[str] = None  # 'module:function' or 'file.py:function'
    # Another data file to evaluate on (e.g. a DPO run on the SFT task data): its `split`
    # under this run's data.split rule and seed, or all of it when the run names its files.
    data: Optional[str] = None
    # Measure the base (adapters off) too; false skips that side, the slowest to decode
    # (an untuned model rambles to max_new_tokens) when its numbers are already known.
    base: bool = True
    # The few-shot side: the base with this many training examples (the nearest to each
    # request by word overlap) as earlier turns; 0 skips it. See mlxtune.evaluate.few_shot.
    shots: int = field(default=3, metadata={"min": 0})
    # The forgetting check: the tuned model on the base's own answers to general prompts.
    forgetting: bool = True
    # Its prompts: a JSONL file of {"prompt": ...} or {"messages": [...]} (None: the probe
    # shipped with mlxtune, mlxtune/evaluate/general_probe.jsonl).
    general: Optional[str] = None
    show: int = field(default=3, metadata={"min": 0})  # examples side by side
    # Dequantize a quantized base once for eval on the CPU backend (same weights, faster
    # decoding); auto: when its float32 copy takes under a quarter of the memory.
    dense_base: Union[bool, str] = field(default="auto", metadata=_choices("auto", True, False))


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Where the config came from; paths above are already absolute.
    source: Optional[str] = field(default=None, metadata={"internal": True})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d


# Keys whose values are paths, resolved against the config file's folder.
PATH_KEYS = ("model.path", "model.adapter", "data.train", "data.valid", "data.test", "data.path",
             "eval.schema", "eval.data", "eval.general")


# ----------------------------------------------------------------------------- loading


def load(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply --set overrides, validate, resolve paths."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    cfg = from_dict(raw, where=str(path))
    _resolve_paths(cfg, path.parent)
    cfg.source = str(path.resolve())
    return cfg


def from_dict(raw: dict, where: str = "<config>") -> Config:
    cfg = build(Config, raw, "", where)
    _check(cfg, where)
    return cfg


def _get(cfg: Config, dotted: str):
    node = cfg
    for p in dotted.split("."):
        node = getattr(node, p)
    return node


def _set(cfg: Config, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = cfg
    for p in parents:
        node = getattr(node, p)
    setattr(node, last, value)


def _resolve_paths(cfg: Config, base: Path) -> None:
    for key in PATH_KEYS:
        value = _get(cfg, key)
        if not value:
            continue
        p = Path(value).expanduser()
        if key == "model.path":
            # A hub id or a short name is not a path: resolve only what looks like one.
            candidate = p if p.is_absolute() else base / p
            if candidate.exists() or value.startswith((".", "/", "~")) or value.endswith(".gguf"):
                _set(cfg, key, str(candidate.resolve()))
            continue
        _set(cfg, key, str((p if p.is_absolute() else base / p).resolve()))
    for r in cfg.objective.rewards:  # grpo: reward files, as eval's
        if r.schema:
            p = Path(r.schema).expanduser()
            r.schema = str((p if p.is_absolute() else base / p).resolve())
        if r.function and ".py:" in r.function:
            file, _, func = r.function.rpartition(":")
            p = Path(file).expanduser()
            r.function = f"{(p if p.is_absolute() else base / p).resolve()}:{func}"
    # eval.metric may name a file (path/to/metrics.py:function) instead of a module.
    metric = cfg.eval.metric
    if metric and ".py:" in metric:
        file, _, func = metric.rpartition(":")
        p = Path(file).expanduser()
        cfg.eval.metric = f"{(p if p.is_absolute() else base / p).resolve()}:{func}"


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: a config dict as dotted keys."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
