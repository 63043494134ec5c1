"""A folder ready for the Hugging Face Hub (export --to hub), and its upload (--push).

    README.md                   the model card: YAML metadata (base_model,
                                base_model_relation: adapter, library_name: peft, tags,
                                datasets when the run read a hub dataset), the evaluation
                                table from eval.json (the sides it has: base, few-shot,
                                start, tuned), the training run, its config, and usage
                                for mlx-lm, transformers + PEFT, llama-server and Ollama
    adapter_config.json         PEFT's layout at the top, so that
    adapter_model.safetensors   PeftModel.from_pretrained(base, REPO) loads the repo
    mlx/adapters.safetensors    mlx-lm's layout (mlx_lm.generate --adapter-path DIR/mlx)
    mlx/adapter_config.json
    adapter.gguf                the GGUF LoRA (llama-server --lora, Ollama's ADAPTER),
    Modelfile                   and an Ollama Modelfile, for a base llama.cpp can load

Nothing private is copied: the card's config shows file names, not the local paths, and
no eval predictions or data. The upload is one commit (huggingface_hub.upload_folder):
the token and the Hub are checked before anything is written, and a repository this
command created is deleted again if the commit fails.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import yaml

from mlxtune import adapters, config as config_mod
from mlxtune.export import gguf_adapter, ollama, peft
from mlxtune.export.lora import ExportError, Lora

CARD = "README.md"
MLX_DIR = "mlx"
GGUF_FILE = "adapter.gguf"


def hub_base_id(lora: Lora) -> str | None:
    """The base's Hugging Face id when it has one (a hub id, or a packaged model's); a
    local folder or GGUF file has none that a card could name."""
    if lora.base.kind == "hub":
        return lora.base.given
    if lora.base.kind == "packaged":
        return peft.PACKAGED_HUB_IDS.get(lora.base.given)
    return None


# -- the folder --------------------------------------------------------------------------

def write(lora: Lora, folder: Path, outtype: str = "f16", repo_id: str | None = None) -> str:
    """Everything above into `folder`; returns a note for the command's output."""
    folder.mkdir(parents=True, exist_ok=True)
    peft.write(lora, folder)
    config_file = folder / peft.CONFIG_FILE   # a hub id or nothing, never a local path
    peft_config = json.loads(config_file.read_text())
    peft_config["base_model_name_or_path"] = hub_base_id(lora)
    config_file.write_text(json.dumps(peft_config, indent=2) + "\n")
    shutil.copytree(lora.adapter_dir, folder / MLX_DIR,
                    ignore=lambda d, names: [n for n in names if n not in
                                             (adapters.ADAPTER_FILE, adapters.CONFIG_FILE)])
    notes = []
    has_gguf = False
    try:
        gguf_adapter.write(lora, folder / GGUF_FILE, outtype)
        has_gguf = True
    except ExportError as e:
        notes.append(f"no GGUF adapter ({e})")
    has_modelfile = False
    if has_gguf and lora.base.is_gguf:
        text, _ = ollama.modelfile(lora, GGUF_FILE)
        (folder / ollama.MODELFILE).write_text(_portable_modelfile(text, lora))
        has_modelfile = True
    run = _run_facts(lora.run_dir)
    (folder / CARD).write_text(card(lora, run, repo_id, has_gguf, has_modelfile))
    if hub_base_id(lora) is None:
        notes.append(f"base_model unknown ({lora.base.given} has no Hugging Face id): add "
                     "it to README.md's metadata and adapter_config.json")
    if not run["eval"]:
        notes.append("no eval.json: the card has no evaluation table (mlxtune eval RUN_DIR)")
    return "; ".join(notes)


def _portable_modelfile(text: str, lora: Lora) -> str:
    """The Modelfile with FROM naming the base GGUF's file name, to be put beside it."""
    name = Path(lora.base.location).name
    lines = []
    for line in text.splitlines():
        if line.startswith("FROM "):
            lines += [f"# FROM: the base GGUF this adapter was trained on ({name}, sha256 "
                      f"{_sha256(lora.base.location)[:16]}...); put it in this folder or "
                      "change the path.", f"FROM ./{name}"]
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- what the run did ----------------------------------------------------------------------

def _run_facts(run_dir: Path) -> dict:
    from mlxtune.train.events import read_events

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    events = read_events(run_dir)
    starts = [e for e in events if e["event"] == "start"]
    trains = [e for e in events if e["event"] == "train"]
    vals = [e for e in events if e["event"] == "val"]
    stops = [e for e in events if e["event"] == "stop"]
    result = None
    eval_file = run_dir / "eval.json"
    if eval_file.is_file():
        try:
            result = json.loads(eval_file.read_text())
        except ValueError:
            result = None
    return {"config": cfg, "start": starts[0] if starts else None,
            "last_train": trains[-1] if trains else None, "vals": vals,
            "stop": stops[-1] if stops else None,
            "seconds": (stops[-1]["time"] - starts[0]["time"]) if starts and stops else None,
            "eval": result}


def _public_config(cfg: dict) -> dict:
    """The resolved config with local paths cut to file names."""
    cfg = json.loads(json.dumps(cfg))
    for key in (*config_mod.PATH_KEYS, "eval.metric"):
        *parents, last = key.split(".")
        node = cfg
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or not isinstance(node.get(last), str):
            continue
        value = node[last]
        if key == "model.path" and not value.startswith("/"):
            continue   # a hub id or a packaged model's short name
        if key == "eval.metric" and ":" in value:
            file, _, func = value.rpartition(":")
            node[last] = f"{Path(file).name}:{func}" if file.endswith(".py") else value
        else:
            node[last] = Path(value).name
    return cfg


# -- the card ------------------------------------------------------------------------------

def metadata(lora: Lora, run: dict, has_gguf: bool) -> dict:
    cfg = run["config"]
    base_id = hub_base_id(lora)
    objective = ((cfg.get("objective") or {}).get("type")) or "sft"
    quantize = (cfg.get("model") or {}).get("quantize") or {}
    quantized = quantize.get("format", "none") != "none" or _quantized_gguf(lora)
    tags = ["mlxtune", "lora", "peft", "mlx", objective]
    if quantized:
        tags.append("qlora")
    if has_gguf:
        tags.append("gguf")
    meta = {}
    if base_id:
        meta["base_model"] = base_id
        meta["base_model_relation"] = "adapter"
    meta["library_name"] = "peft"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = tags
    hub = ((cfg.get("data") or {}).get("hub") or {}).get("id")
    if hub:
        meta["datasets"] = [hub]
    return meta


def _quantized_gguf(lora: Lora) -> bool:
    """A GGUF base whose weights are stored quantized (trained on as stored: QLoRA)."""
    if not lora.base.is_gguf:
        return False
    from mlxtune.models.gguf import read_gguf_info

    types = {t["type"] for t in read_gguf_info(lora.base.location)["tensors"]}
    return bool(types - {"F32", "F16", "BF16"})


def _side_label(name: str, result: dict) -> str:
    if name == "few_shot":
        shots = (result.get("few_shot_setup") or {}).get("shots")
        return f"{shots}-shot" if shots else "few-shot"
    return name


def eval_section(result: dict | None) -> list[str]:
    if not result:
        return ["No evaluation was run for this adapter (`mlxtune eval RUN_DIR` writes "
                "eval.json; export again to add its table here)."]
    from mlxtune.evaluate import report

    names = report.sides(result)
    lines = []
    split = result.get("split", "held-out")
    n = result.get("split_examples")
    where = f"the held-out {split} split" + (f" ({n} examples)" if n else "")
    lines.append(f"Measured by `mlxtune eval` on {where}, which training never saw; each "
                 "side generates greedily. Base: the same model with the adapter switched "
                 "off" + ("; few-shot: the base prompted with examples of the train split"
                          if "few_shot" in names else "")
                 + ("; start: the adapter the run started from" if "start" in names else "")
                 + "; tuned: with this adapter.")
    lines += ["", "| metric | " + " | ".join(_side_label(s, result) for s in names) + " |",
              "|---|" + "---|" * len(names)]
    lines += ["| " + " | ".join(r) + " |" for r in report.rows(result)]
    notes = [result.get("verdict")]
    forgetting = getattr(report, "forgetting_line", None)   # the forgetting probe's line
    if forgetting is not None:
        notes.append(forgetting(result))
    for note in filter(None, notes):
        lines += ["", note]
    return lines


def _fmt(v, spec: str = "{:.4f}") -> str:
    return "-" if v is None else spec.format(v)


def training_section(lora: Lora, run: dict) -> list[str]:
    cfg, start, last, stop = run["config"], run["start"], run["last_train"], run["stop"]
    train = cfg.get("train") or {}
    rows = [("base", _base_text(lora)),
            ("objective", ((cfg.get("objective") or {}).get("type")) or "sft"),
            ("LoRA", f"rank {lora.rank}, alpha {lora.alpha:g} (scale {lora.scale:g}), "
                     f"{', '.join(t.split('.')[-1] for t in lora.keys)}; "
                     f"{len(lora.layers)} of {lora.base.n_layers} blocks"),
            ("adapter", f"{lora.adapter_dir.name}/ ("
                        + ("best validation loss" if lora.adapter_dir.name == "best"
                           else "the last step") + ")")]
    if start:
        rows.append(("trainable parameters", f"{start.get('trainable_params', 0):,} of "
                                             f"{start.get('total_params', 0):,}"))
        rows.append(("examples", f"{start.get('train_examples')} train, "
                                 f"{start.get('valid_examples')} validation"))
        rows.append(("compute", f"{start.get('backend')}, {start.get('compute_dtype')}"))
    if stop:
        rows.append(("steps", f"{stop.get('step')} ({stop.get('reason')}), batch "
                              f"{train.get('batch_size')}, learning rate "
                              f"{train.get('learning_rate')}"))
    if last:
        rows.append(("final train loss", f"{_fmt(last.get('loss'))} (tokens seen: "
                                         f"{last.get('tokens', 0):,})"))
    if run["vals"]:
        best = min(run["vals"], key=lambda v: v["loss"])
        rows.append(("validation loss", f"{_fmt(run['vals'][0]['loss'])} at step "
                                        f"{run['vals'][0]['step']}, best "
                                        f"{_fmt(best['loss'])} at step {best['step']}"))
    if run["seconds"]:
        rows.append(("wall time", f"{run['seconds'] / 60:.1f} min"))
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "<details><summary>The run's config (mlxtune; local paths cut to file "
              "names)</summary>", "", "```yaml",
              yaml.safe_dump(_public_config(cfg), sort_keys=False).rstrip(), "```", "",
              "</details>"]
    return lines


def _base_link(lora: Lora) -> str:
    base_id = hub_base_id(lora)
    if base_id:
        return f"[{base_id}](https://huggingface.co/{base_id})"
    return _base_text(lora)


def _base_text(lora: Lora) -> str:
    base_id = hub_base_id(lora)
    link = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else None
    if lora.base.is_gguf:
        gguf = f"the GGUF file `{Path(lora.base.location).name}`"
        return f"{link}, trained on {gguf} (weights as stored)" if link else gguf
    return link or f"`{lora.base.given}`"


def usage_section(lora: Lora, repo: str, has_gguf: bool, has_modelfile: bool) -> list[str]:
    base_id = hub_base_id(lora)
    local = repo.rpartition("/")[2]
    base_ref = base_id or "BASE_MODEL"
    lines = ["Download the repository first where a tool needs local files:", "", "```bash",
             f"hf download {repo} --local-dir {local}", "```", "",
             "### mlx-lm", "", "```bash",
             f"mlx_lm.generate --model {base_ref} --adapter-path {local}/{MLX_DIR} \\",
             '    --prompt "..."', "```", "",
             "### transformers + PEFT", "", "```python",
             "from peft import PeftModel",
             "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    if base_id:
        lines += [f'base = AutoModelForCausalLM.from_pretrained("{base_id}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{base_id}")']
    else:
        name = Path(lora.base.location).name
        lines += ["# the base is a GGUF file: transformers reads it (dequantized)",
                  f'base = AutoModelForCausalLM.from_pretrained("DIR", gguf_file="{name}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("DIR", gguf_file="{name}")']
    lines += [f'model = PeftModel.from_pretrained(base, "{repo}")', "```"]
    if lora.base.is_gguf and base_id:
        lines += ["", "The adapter was trained on the GGUF weights named above; here it is "
                  "applied to the dense base."]
    if has_gguf:
        gguf_base = Path(lora.base.location).name if lora.base.is_gguf else "BASE.gguf"
        lines += ["", "### llama.cpp", "", "```bash",
                  f"llama-server -m {gguf_base} --lora {local}/{GGUF_FILE}", "```"]
    if has_modelfile:
        lines += ["", "### Ollama", "",
                  f"Put the base GGUF (`{Path(lora.base.location).name}`) in `{local}/` "
                  "(or change the Modelfile's FROM), then:", "", "```bash",
                  f"cd {local} && ollama create {local.lower()} -f Modelfile && "
                  f"ollama run {local.lower()}", "```"]
    return lines


def card(lora: Lora, run: dict, repo_id: str | None, has_gguf: bool,
         has_modelfile: bool) -> str:
    repo = repo_id or f"USER/{lora.run_dir.name}"
    meta = metadata(lora, run, has_gguf)
    name = (run["config"] or {}).get("name") or lora.run_dir.name
    files = [f"- `adapter_model.safetensors`, `adapter_config.json`: PEFT",
             f"- `{MLX_DIR}/`: mlx-lm's adapter layout"]
    if has_gguf:
        files.append(f"- `{GGUF_FILE}`: GGUF LoRA for llama.cpp and Ollama")
    if has_modelfile:
        files.append("- `Modelfile`: Ollama (FROM the base GGUF, ADAPTER the GGUF LoRA, the "
                     "chat template)")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {repo.rpartition('/')[2]}", "",
             f"A LoRA adapter for {_base_link(lora)}, trained with "
             f"[mlxtune](https://pypi.org/project/mlxtune-lora/) (run `{name}`).", "",
             "## Evaluation", "", *eval_section(run["eval"]), "",
             "## Training", "", *training_section(lora, run), "",
             "## Files", "", *files, "",
             "## Usage", "", *usage_section(lora, repo, has_gguf, has_modelfile)]
    return "\n".join(lines) + "\n"


def read_card_metadata(text: str) -> dict:
    """The YAML metadata block of a card (for tests and checks)."""
    if not text.startswith("---\n"):
        return {}
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end]) or {}


# -- the upload ----------------------------------------------------------------------------

def check_push(repo_id: str) -> None:
    """Before anything is written: a plausible repo id, a token, and a Hub that answers."""
    import huggingface_hub

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ExportError(f"--push: '{repo_id}' is not a repository id (USER/NAME or "
                          "ORG/NAME)")
    if not huggingface_hub.get_token():
        raise ExportError("--push: no Hugging Face token (run `hf auth login` or set "
                          "HF_TOKEN); nothing was written or uploaded")
    try:
        huggingface_hub.HfApi().whoami()
    except Exception as e:  # noqa: BLE001  (offline, unreachable, or a bad token)
        raise ExportError(f"--push: the Hub did not accept the token or could not be "
                          f"reached ({_first_line(e)}); nothing was written or uploaded")


def push(folder: Path, repo_id: str, private: bool) -> str:
    """One commit with the whole folder; returns the repository's URL."""
    import huggingface_hub

    api = huggingface_hub.HfApi()
    created = False
    try:
        existed = api.repo_exists(repo_id)
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        created = not existed
        api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                          commit_message="mlxtune export --to hub")
    except Exception as e:  # noqa: BLE001
        if created:
            try:
                api.delete_repo(repo_id)
            except Exception:  # noqa: BLE001
                pass
        raise ExportError(f"--push: the upload to {repo_id} failed ({_first_line(e)}); "
                          f"nothing was committed; the folder is complete at {folder} "
                          f"(upload it later: hf upload {repo_id} {folder})")
    return str(url)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
