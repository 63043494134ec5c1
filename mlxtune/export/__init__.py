"""Export a run's adapter to the formats people serve with.

    gguf        LoRA adapter for llama.cpp / Ollama / LM Studio (gguf_adapter)
    peft        Hugging Face PEFT adapter folder (peft)
    mlx-fused   base + adapter merged, an mlx-lm folder (mlx_fused)
    gguf-fused  base + adapter merged, one GGUF file (gguf_fused)
    ollama      Modelfile + GGUF adapter folder (ollama)
    hub         a folder for the Hugging Face Hub: PEFT + mlx-lm + GGUF adapters, a model
                card; --push uploads it (hub)

`lora.read` checks the run and reads the adapter (LoRA, DoRA, or a full fine-tune's
weights); each format is one module with a `write`, and `_check_kind` refuses, in one
line, a format that cannot hold the run's adapter type. Output goes to a temporary sibling
first and is renamed into place when complete, so a failure leaves nothing behind, and an
existing output is replaced only with `force`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlxtune.export.lora import ExportError


@dataclass(frozen=True)
class Format:
    name: str
    is_folder: bool
    default_name: str           # under RUN_DIR/export/; {outtype} filled in
    outtypes: tuple             # first one is the default; () when not applicable


FORMATS = {
    "gguf": Format("gguf", False, "adapter-{outtype}.gguf", ("f32", "f16")),
    "peft": Format("peft", True, "peft", ()),
    "mlx-fused": Format("mlx-fused", True, "mlx-fused-{outtype}",
                        ("f16", "bf16", "f32", "q8", "q4")),
    "gguf-fused": Format("gguf-fused", False, "fused-{outtype}.gguf", ("f16", "q8_0", "f32")),
    "ollama": Format("ollama", True, "ollama", ()),
    "hub": Format("hub", True, "hub", ("f16", "f32")),   # outtype: the GGUF adapter's
}
ADAPTER_CHOICES = ("auto", "best", "final")


@dataclass
class Result:
    path: Path
    format: str
    adapter_dir: Path
    outtype: str | None
    note: str = ""


def export(run_dir: str | Path, to: str, out: str | Path | None = None,
           adapter: str = "auto", force: bool = False, outtype: str | None = None,
           push: str | None = None, private: bool = False) -> Result:
    from mlxtune.export import lora as lora_mod

    if to not in FORMATS:
        raise ExportError(f"--to: unknown format '{to}' (supported: {', '.join(FORMATS)})")
    if (push or private) and to != "hub":
        raise ExportError(f"--{'push' if push else 'private'}: only with --to hub")
    if private and not push:
        raise ExportError("--private: only with --push REPO_ID")
    fmt = FORMATS[to]
    if outtype is not None and outtype not in fmt.outtypes:
        supported = ", ".join(fmt.outtypes) if fmt.outtypes else "none: it takes no --outtype"
        raise ExportError(f"--outtype: '{outtype}' is not a type for {to} (supported: "
                          f"{supported})")
    outtype = outtype or (fmt.outtypes[0] if fmt.outtypes else None)
    if adapter not in ADAPTER_CHOICES:
        raise ExportError(f"--adapter: '{adapter}' (supported: {', '.join(ADAPTER_CHOICES)})")
    run_dir = Path(run_dir)
    path = Path(out) if out else run_dir / "export" / fmt.default_name.format(outtype=outtype)
    if (path.exists() or path.is_symlink()) and not force:
        raise ExportError(f"{path} already exists (use --force to replace it)")
    if path.exists() and fmt.is_folder != path.is_dir():
        raise ExportError(f"{path} exists and is a {'folder' if path.is_dir() else 'file'}; "
                          f"{to} writes a {'folder' if fmt.is_folder else 'file'}")

    lora = lora_mod.read(run_dir, adapter)
    _check_kind(lora, to)
    if push:
        from mlxtune.export import hub
        hub.check_push(push)   # a token and a Hub that answers, before anything is written
    note = ""
    with _staged(path, fmt.is_folder) as tmp:
        if to == "gguf":
            from mlxtune.export import gguf_adapter
            gguf_adapter.write(lora, tmp, outtype)
        elif to == "peft":
            from mlxtune.export import peft
            peft.write(lora, tmp)
            if peft.base_model_id(lora) is None:
                note = ("base_model_name_or_path is null (the base is a GGUF file): set it "
                        "to the base's Hugging Face id in adapter_config.json")
        elif to == "mlx-fused":
            from mlxtune.export import mlx_fused
            mlx_fused.write(lora, tmp, outtype)
        elif to == "gguf-fused":
            from mlxtune.export import gguf_fused
            gguf_fused.write(lora, tmp, outtype)
        elif to == "hub":
            from mlxtune.export import hub
            note = hub.write(lora, tmp, outtype, repo_id=push)
        else:
            from mlxtune.export import ollama
            family = ollama.write(lora, tmp)
            note = f"chat template: {family}" if family else \
                "chat template: not recognised, left to Ollama (see the Modelfile)"
    if push:
        url = hub.push(path, push, private)
        note = f"{note}; " if note else ""
        note += f"uploaded to {url}"
    return Result(path, to, lora.adapter_dir, outtype, note)


def _check_kind(lora, to: str) -> None:
    """What each format can hold: a GGUF LoRA adapter (gguf, ollama) only LoRA; a full
    fine-tune is a model, not an adapter (mlx-fused, gguf-fused)."""
    where = lora.adapter_dir
    if lora.kind == "full" and to not in ("mlx-fused", "gguf-fused"):
        raise ExportError(f"{where}: a full fine-tune is a whole model, not an adapter: export "
                          "it with --to mlx-fused (an mlx-lm folder) or --to gguf-fused (a "
                          "GGUF model)")
    if lora.kind == "dora" and to == "gguf":
        raise ExportError(f"{where}: a GGUF LoRA adapter cannot hold DoRA's magnitudes: "
                          "export --to gguf-fused (one GGUF model with it merged)")
    if lora.kind == "dora" and to == "ollama":
        raise ExportError(f"{where}: Ollama's ADAPTER is a GGUF LoRA adapter, which cannot "
                          "hold DoRA's magnitudes: export --to gguf-fused and use FROM "
                          "./fused.gguf in a Modelfile")


class _staged:
    """A temporary path next to `path`; on success it replaces `path`, on failure it is
    removed. Same folder, so the final rename is atomic for files."""

    def __init__(self, path: Path, is_folder: bool):
        self.path, self.is_folder = path, is_folder

    def __enter__(self) -> Path:
        self.made_parent = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                         dir=self.path.parent))
        os.chmod(self.tmp, 0o777 & ~_umask())   # mkdtemp makes it private
        return self.tmp if self.is_folder else self.tmp / self.path.name

    def __exit__(self, kind, value, tb):
        try:
            if kind is None:
                for f in self.tmp.rglob("*"):   # some writers create files 0600
                    if f.is_file():
                        os.chmod(f, 0o666 & ~_umask())
                if self.is_folder:
                    old = None
                    if self.path.exists():
                        old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
                        os.replace(self.path, old)
                    os.replace(self.tmp, self.path)
                    if old is not None:
                        shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(self.tmp / self.path.name, self.path)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if kind is not None and self.made_parent:
                try:
                    self.path.parent.rmdir()   # only if it is still empty
                except OSError:
                    pass
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
