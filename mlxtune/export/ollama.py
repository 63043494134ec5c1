"""An Ollama Modelfile: FROM the base GGUF, ADAPTER the GGUF LoRA, the chat template and
stop tokens (`ollama create NAME -f Modelfile`).

Ollama's TEMPLATE is a Go template, not the Jinja template a GGUF carries, and Jinja cannot
be translated in general. So the base's Jinja template is rendered on probe conversations
and compared with the formats of known families (ChatML, Llama 3, Gemma); when one matches
exactly, its Go template is written, with a default system prompt if the Jinja template
inserts one. Otherwise TEMPLATE is left out (Ollama then picks one from the GGUF's own
metadata) and the Modelfile says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlxtune.export import gguf_adapter
from mlxtune.export.lora import ExportError, Lora

MODELFILE = "Modelfile"
ADAPTER_FILE = "adapter.gguf"


@dataclass(frozen=True)
class Family:
    name: str
    open: str          # per message: open.format(role=...) + content + close
    close: str
    generation: str    # what add_generation_prompt appends
    roles: dict        # our role -> the family's
    template: str      # Ollama's Go template
    stops: tuple
    system_role: bool = True


FAMILIES = (
    Family("chatml", "<|im_start|>{role}\n", "<|im_end|>\n", "<|im_start|>assistant\n", {},
           "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
           "{{ end }}<|im_start|>assistant\n", ("<|im_start|>", "<|im_end|>")),
    Family("llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>",
           "<|start_header_id|>assistant<|end_header_id|>\n\n", {},
           "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
           "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>"
           "\n\n", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    Family("gemma", "<start_of_turn>{role}\n", "<end_of_turn>\n", "<start_of_turn>model\n",
           {"assistant": "model"},
           "{{- range .Messages }}<start_of_turn>"
           "{{ if eq .Role \"assistant\" }}model{{ else }}user{{ end }}\n"
           "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
           ("<start_of_turn>", "<end_of_turn>"), system_role=False),
)


def _render(family: Family, messages: list[dict]) -> str:
    return "".join(family.open.format(role=family.roles.get(m["role"], m["role"]))
                   + m["content"] + family.close for m in messages)


def match_family(apply_template, bos: str = "") -> tuple[Family, str | None] | None:
    """(family, default system prompt or None) whose format `apply_template(messages)`
    (with the generation prompt) reproduces exactly; None when no family does."""
    convo = [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
             {"role": "user", "content": "U2"}]
    try:
        got = apply_template(convo)
    except Exception:
        return None
    for family in FAMILIES:
        body = _render(family, convo) + family.generation
        if not got.endswith(body):
            continue
        prefix = got[:len(got) - len(body)]
        # The template may start with the BOS token (which llama.cpp adds by itself), and
        # may insert a default system prompt when the conversation has none.
        head = family.open.format(role=family.roles.get("system", "system"))
        for rest in (prefix, prefix[len(bos):] if bos and prefix.startswith(bos) else None):
            if rest == "":
                return family, None
            if rest and family.system_role and rest.startswith(head) and \
                    rest.endswith(family.close):
                return family, rest[len(head):len(rest) - len(family.close)]
    return None


def _chat_template_probe(lora: Lora):
    from mlxtune.models import gguf_file
    from mlxtune.models.gguf_tokenizer import build_tokenizer

    meta = gguf_file.read(lora.base.location).metadata
    if not meta.get("tokenizer.chat_template"):
        return None, "", meta
    tok = build_tokenizer(meta, lora.base.location)

    def apply(messages):
        return tok._tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
    return apply, tok._tokenizer.bos_token or "", meta


def _quote(text: str) -> str:
    if '"""' in text:
        raise ExportError('the default system prompt contains """, which a Modelfile '
                          "cannot quote")
    return f'"""{text}"""'


def modelfile(lora: Lora, adapter_name: str = ADAPTER_FILE) -> tuple[str, str | None]:
    """(Modelfile text, the matched family's name or None)."""
    apply, bos, meta = _chat_template_probe(lora)
    found = match_family(apply, bos) if apply else None
    lines = [f"# Ollama Modelfile for the mlxtune run {lora.run_dir.name}",
             f"# ollama create {lora.run_dir.name.lower()} -f {MODELFILE}",
             f"FROM {Path(lora.base.location).resolve()}",
             f"ADAPTER ./{adapter_name}"]
    stops: list[str] = []
    if found:
        family, system = found
        lines.append(f"TEMPLATE {_quote(family.template)}")
        if system:
            lines.append(f"SYSTEM {_quote(system)}")
        stops += family.stops
    else:
        lines.append("# No TEMPLATE: the base's chat template is not one mlxtune can write "
                     "as a Go template (ChatML, Llama 3, Gemma); Ollama uses the one it "
                     "derives from the GGUF metadata.")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if isinstance(eos, int) and 0 <= eos < len(tokens) and tokens[eos] not in stops:
        stops.append(tokens[eos])
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n", found[0].name if found else None


def write(lora: Lora, folder: Path) -> str | None:
    """Modelfile + adapter.gguf into `folder`; returns the chat family written (or None)."""
    if not lora.base.is_gguf:
        raise ExportError(f"ollama needs a GGUF base for FROM (this run's base is "
                          f"{lora.base.given}, a {lora.base.kind} model); export --to "
                          "mlx-fused and import that folder into Ollama instead")
    folder.mkdir(parents=True, exist_ok=True)
    gguf_adapter.write(lora, folder / ADAPTER_FILE)
    text, family = modelfile(lora)
    (folder / MODELFILE).write_text(text)
    return family
