"""Export: GGUF LoRA adapters, PEFT adapters, merged models (mlx-lm folder, GGUF), Ollama.

Fast tests use tiny models written to GGUF by the tests (tests/tiny_gguf.py spells out
llama.cpp's conventions independently of the exporter) and read the exports back with
gguf-py and safetensors. The slow tests at the end run llama.cpp itself (llama-cpp-python)
on the packaged SmolLM2 and on a tiny qwen2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from export_helpers import make_run, mlxtune_logits, shift_agreement
from tiny import CHATML, build_model, byte_level_tokenizer, model_args
from tiny_gguf import interleave_qk, write_gguf

from mlxtune import adapters
from mlxtune.cli import main
from mlxtune.export import export

TOKENS = [1, 87, 85, 71, 84, 201, 74, 75, 261, 84, 71, 2, 201, 1, 67, 85, 90, 40, 41, 99]


def tiny_gguf(path: Path, model_type: str = "llama", types=None, seed: int = 0, **over):
    """A tiny model written as llama.cpp would; returns (path, args, source weights in
    Hugging Face layout as numpy)."""
    args = model_args(model_type, **over)
    model = build_model(args, seed)
    reference = write_gguf(path, model, args, byte_level_tokenizer(), types=types,
                           chat_template=CHATML)
    return path, args, reference


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export-llama")
    base, args, ref = tiny_gguf(tmp / "base.gguf")
    return make_run(tmp / "run", base), base, args, ref


@pytest.fixture(scope="module")
def llama_q8_run(tmp_path_factory):
    """A quantized base (kept quantized by the loader), so merging must dequantize."""
    from gguf import GGMLQuantizationType as T

    tmp = tmp_path_factory.mktemp("export-llama-q8")
    base, args, ref = tiny_gguf(tmp / "base.gguf", types={"proj": T.Q8_0})
    return make_run(tmp / "run", base), base, args, ref


def read_gguf(path):
    import gguf

    r = gguf.GGUFReader(str(path))
    meta = {k: (f.contents(), f.types[0]) for k, f in r.fields.items()
            if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in r.tensors}
    return meta, tensors


def lora_pairs(adapter_dir: Path) -> dict:
    w = {k: np.array(v.astype(mx.float32))
         for k, v in mx.load(str(adapter_dir / adapters.ADAPTER_FILE)).items()}
    return {k[:-len(".lora_a")]: (w[k], w[k[:-1] + "b"]) for k in w if k.endswith("lora_a")}


# -- GGUF adapter --------------------------------------------------------------------------

def test_gguf_adapter_metadata_names_and_shapes(llama_run, tmp_path):
    import gguf

    run, base, args, _ = llama_run
    out = export(run, "gguf", tmp_path / "a.gguf").path
    meta, tensors = read_gguf(out)
    assert meta["general.type"] == ("adapter", gguf.GGUFValueType.STRING)
    assert meta["adapter.type"] == ("lora", gguf.GGUFValueType.STRING)
    assert meta["adapter.lora.alpha"] == (8.0, gguf.GGUFValueType.FLOAT32)
    assert meta["general.architecture"][0] == "llama"
    _, base_tensors = read_gguf(base)
    names = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}
    expected = {f"blk.{i}.{n}.weight.lora_{ab}" for i in range(args["num_hidden_layers"])
                for n in names for ab in "ab"}
    assert set(tensors) == expected
    for name, t in tensors.items():
        w = base_tensors[name[:-len(".lora_a")]]          # GGML ne = [in, out]
        ne = [int(d) for d in t.shape]
        if name.endswith("lora_a"):
            assert ne == [int(w.shape[0]), 4]                # [in, r]
        else:
            assert ne == [4, int(w.shape[1])]                # [r, out]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_gguf_adapter_applied_in_file_layout_is_the_permuted_update(model_type, tmp_path):
    """base (file layout) + alpha/r * lora_b @ lora_a, all read back with gguf-py, equals
    llama.cpp's row order of (W + scale * (A @ B).T) built from the source weights: the
    Q/K interleave for llama (tiny_gguf's own copy of it), nothing for qwen2."""
    base, args, ref = tiny_gguf(tmp_path / "base.gguf", model_type)
    run = make_run(tmp_path / "run", base, rank=4, alpha=12.0)
    out = export(run, "gguf", tmp_path / "a.gguf").path
    meta, tensors = read_gguf(out)
    _, base_tensors = read_gguf(base)
    alpha = meta["adapter.lora.alpha"][0]
    pairs = lora_pairs(run / "adapters")
    checked = 0
    for module, (a, b) in pairs.items():
        key = module.split(".", 3)[3]
        layer = int(module.split(".")[2])
        gname = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}[key]
        name = f"blk.{layer}.{gname}.weight"
        la = np.array(tensors[f"{name}.lora_a"].data)
        lb = np.array(tensors[f"{name}.lora_b"].data)
        r = lb.shape[1]
        in_file = np.array(base_tensors[name].data) + alpha / r * (lb @ la)
        hf = ref[f"{module}.weight"] + (12.0 / 4) * (a @ b).T
        if model_type == "llama" and key == "self_attn.q_proj":
            hf = interleave_qk(hf, args["num_attention_heads"])
        elif model_type == "llama" and key == "self_attn.k_proj":
            hf = interleave_qk(hf, args["num_key_value_heads"])
        np.testing.assert_allclose(in_file, hf, rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked == 7 * args["num_hidden_layers"]


def test_gguf_adapter_f16_and_partial_targets(tmp_path):
    base, args, _ = tiny_gguf(tmp_path / "base.gguf")
    run = make_run(tmp_path / "run", base, targets=["q_proj", "v_proj"], layers=1)
    out = export(run, "gguf", tmp_path / "a.gguf", outtype="f16").path
    import gguf

    _, tensors = read_gguf(out)
    last = args["num_hidden_layers"] - 1
    assert set(tensors) == {f"blk.{last}.{n}.weight.lora_{ab}" for n in ("attn_q", "attn_v")
                            for ab in "ab"}
    assert {t.tensor_type for t in tensors.values()} == {gguf.GGMLQuantizationType.F16}


def test_gguf_adapter_from_an_mlx_folder_base_matches_the_gguf_base(tmp_path):
    """The same model as an mlx-lm folder and as a GGUF file: the exported adapter is the
    same (names and the llama Q/K order come from the config there)."""
    from mlx_lm.utils import save_config, save_model

    base, args, ref = tiny_gguf(tmp_path / "base.gguf")
    run = make_run(tmp_path / "run", base)
    folder = tmp_path / "mlx-base"
    model = build_model(args)
    model.load_weights([(k, mx.array(v)) for k, v in ref.items()])
    save_model(folder, model)
    save_config(dict(args), folder / "config.json")
    (run / "config.yaml").write_text(f"name: test\nmodel:\n  path: {base}\n")
    a = export(run, "gguf", tmp_path / "from-gguf.gguf").path
    (run / "config.yaml").write_text(f"name: test\nmodel:\n  path: {folder}\n")
    b = export(run, "gguf", tmp_path / "from-mlx.gguf").path
    _, ta = read_gguf(a)
    _, tb = read_gguf(b)
    assert set(ta) == set(tb)
    for name in ta:
        np.testing.assert_array_equal(np.array(ta[name].data), np.array(tb[name].data))


# -- merged models -------------------------------------------------------------------------

def test_gguf_fused_f32_gives_the_adapter_logits(llama_q8_run, tmp_path):
    """The merged GGUF, loaded by mlxtune's loader (which undoes the Q/K interleave), gives
    the logits of the quantized base with the adapter applied at run time."""
    run, base, _, _ = llama_q8_run
    out = export(run, "gguf-fused", tmp_path / "fused.gguf", outtype="f32").path
    plain, adapted = mlxtune_logits(base, run / "adapters", TOKENS)
    fused, _ = mlxtune_logits(out, None, TOKENS)
    assert np.abs(adapted - plain).max() > 0.05          # the adapter matters
    np.testing.assert_allclose(fused, adapted, atol=2e-4, rtol=1e-4)


def test_gguf_fused_types_metadata_and_q8_0(llama_q8_run, tmp_path):
    import gguf
    from gguf import GGMLQuantizationType as T

    run, base, _, _ = llama_q8_run
    base_meta, base_tensors = read_gguf(base)
    for outtype, want, file_type in (("f16", T.F16, 1), ("q8_0", T.Q8_0, 7)):
        out = export(run, "gguf-fused", tmp_path / f"{outtype}.gguf", outtype=outtype).path
        meta, tensors = read_gguf(out)
        assert list(tensors) == list(base_tensors)
        assert meta["general.file_type"] == (file_type, gguf.GGUFValueType.UINT32)
        for key, value in base_meta.items():   # tokenizer, template, hparams: as they were
            if key != "general.file_type":
                assert meta[key] == value, key
        for name, t in tensors.items():
            assert t.tensor_type == (want if len(t.shape) > 1 and t.shape[0] % 32 == 0
                                     else T.F16 if len(t.shape) > 1 else T.F32), name
        fused, _ = mlxtune_logits(out, None, TOKENS)
        _, adapted = mlxtune_logits(base, run / "adapters", TOKENS)
        corr, slope = shift_agreement(adapted, fused)
        assert corr > 0.999 and abs(slope - 1) < 0.01, (outtype, corr, slope)


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8"])
def test_mlx_fused_loads_in_mlx_lm_with_the_adapter_logits(llama_q8_run, tmp_path, outtype):
    from mlx_lm import load as mlx_lm_load

    run, base, _, _ = llama_q8_run
    out = export(run, "mlx-fused", tmp_path / "fused", outtype=outtype).path
    model, tokenizer = mlx_lm_load(str(out))
    config = json.loads((out / "config.json").read_text())
    assert ("quantization" in config) == (outtype == "q8")
    fused = np.array(model(mx.array([TOKENS]))[0].astype(mx.float32))
    plain, adapted = mlxtune_logits(base, run / "adapters", TOKENS)
    if outtype == "f32":
        np.testing.assert_allclose(fused, adapted, atol=2e-4, rtol=1e-4)
    corr, slope = shift_agreement(adapted - plain, fused - plain)
    assert corr > 0.995 and abs(slope - 1) < 0.02, (corr, slope)
    assert tokenizer.encode("the theme") == byte_level_tokenizer().encode("the theme").ids
    assert tokenizer.chat_template == CHATML


def test_mlx_fused_from_a_quantized_mlx_folder_base(tmp_path, tiny_quantized_model_dir):
    from mlx_lm import load as mlx_lm_load

    run = make_run(tmp_path / "run", tiny_quantized_model_dir)
    out = export(run, "mlx-fused", tmp_path / "fused", outtype="f32").path
    model, _ = mlx_lm_load(str(out))
    fused = np.array(model(mx.array([TOKENS]))[0].astype(mx.float32))
    plain, adapted = mlxtune_logits(tiny_quantized_model_dir, run / "adapters", TOKENS)
    assert np.abs(adapted - plain).max() > 0.05
    np.testing.assert_allclose(fused, adapted, atol=2e-4, rtol=1e-4)


# -- PEFT ----------------------------------------------------------------------------------

def test_peft_names_shapes_and_config(tmp_path):
    """PEFT's checkpoint layout: base_model.model.<module>.lora_A.weight (r x in) and
    lora_B.weight (out x r), lora_alpha / r the scale; module names are Hugging Face
    parameter names (checked against gguf-py's map of them)."""
    import gguf
    from safetensors.numpy import load_file

    base, args, _ = tiny_gguf(tmp_path / "base.gguf")
    run = make_run(tmp_path / "run", base, rank=4, alpha=6.0, targets=["q_proj", "down_proj"],
                   layers=1)
    out = export(run, "peft", tmp_path / "peft").path
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 6.0
    assert cfg["target_modules"] == ["down_proj", "q_proj"]
    last = args["num_hidden_layers"] - 1
    assert cfg["layers_to_transform"] == [last] and cfg["layers_pattern"] == "layers"
    assert not cfg["use_dora"] and not cfg["use_rslora"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    hf_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, args["num_hidden_layers"])
    pairs = lora_pairs(run / "adapters")
    assert len(tensors) == 2 * len(pairs) == 4
    for module, (a, b) in pairs.items():
        la = tensors[f"base_model.model.{module}.lora_A.weight"]
        lb = tensors[f"base_model.model.{module}.lora_B.weight"]
        assert la.shape == (4, a.shape[0]) and lb.shape == (b.shape[1], 4)
        assert hf_names.get_name(f"{module}.weight", try_suffixes=(".weight",)) is not None
        np.testing.assert_allclose(cfg["lora_alpha"] / cfg["r"] * (lb @ la),
                                   1.5 * (a @ b).T, rtol=1e-6, atol=1e-7)


def test_peft_base_model_id(tmp_path, tiny_model_dir):
    run = make_run(tmp_path / "run", tiny_model_dir)
    out = export(run, "peft", tmp_path / "peft").path
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir)
    assert cfg["layers_to_transform"] is None


# -- Ollama --------------------------------------------------------------------------------

def test_ollama_modelfile_for_a_chatml_base(llama_run, tmp_path):
    run, base, _, _ = llama_run
    result = export(run, "ollama", tmp_path / "ollama")
    text = (result.path / "Modelfile").read_text()
    lines = text.splitlines()
    assert f"FROM {Path(base).resolve()}" in lines
    assert "ADAPTER ./adapter.gguf" in lines
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert "SYSTEM" not in text                    # this template inserts no default
    meta, _ = read_gguf(result.path / "adapter.gguf")
    assert meta["general.type"][0] == "adapter"


def _jinja(template):
    import jinja2

    t = jinja2.Environment().from_string(template)
    return lambda messages: t.render(messages=messages, add_generation_prompt=True,
                                     bos_token="<B>")


LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
          "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>"
          "\n\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if "
         "m['role'] == 'assistant' else m['role']) + '\n' + m['content'] + '<end_of_turn>\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
CHATML_DEFAULT_SYSTEM = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("template,family,system", [
    (LLAMA3, "llama3", None), (GEMMA, "gemma", None), (CHATML, "chatml", None),
    (CHATML_DEFAULT_SYSTEM, "chatml", "Be brief."),
    ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}", None, None),
])
def test_chat_families_are_matched_by_rendering(template, family, system):
    from mlxtune.export.ollama import match_family

    found = match_family(_jinja(template), "<B>")
    assert (found[0].name if found else None) == family
    if found:
        assert found[1] == system


# -- the command and bad input -------------------------------------------------------------

def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_cli_default_path_force_and_best(llama_run, capsys):
    run, _, _, _ = llama_run
    main(["export", str(run), "--to", "gguf"])
    out, err = capsys.readouterr()
    path = Path(out.strip())
    assert path == run / "export" / "adapter-f32.gguf" and path.is_file()
    assert "from" in err and "adapters" in err
    before = path.stat().st_mtime_ns
    code, _, err = run_cli(capsys, "export", str(run), "--to", "gguf")
    assert code != 0 and "already exists" in err and "--force" in err
    assert len(err.strip().splitlines()) == 1 and path.stat().st_mtime_ns == before
    main(["export", str(run), "--to", "gguf", "--force"])
    assert path.stat().st_mtime_ns != before
    code, _, err = run_cli(capsys, "export", str(run), "--to", "gguf", "--adapter", "best",
                           "--out", str(run / "x.gguf"))
    assert code != 0 and "best/" in err and "--adapter final" in err
    assert not (run / "x.gguf").exists() and leftovers(run / "export") == []


def _broken_run(tmp_path, base, weights: dict | None = None, config: dict | None = None):
    run = tmp_path / "run"
    (run / "adapters").mkdir(parents=True)
    (run / "config.yaml").write_text(f"name: test\nmodel:\n  path: {base}\n")
    cfg = {"fine_tune_type": "lora", "num_layers": 2,
           "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": []}}
    cfg.update(config or {})
    (run / "adapters" / "adapter_config.json").write_text(json.dumps(cfg))
    mx.save_safetensors(str(run / "adapters" / "adapters.safetensors"),
                        weights or {"model.layers.0.self_attn.q_proj.lora_a": mx.zeros((64, 4)),
                                    "model.layers.0.self_attn.q_proj.lora_b": mx.zeros((4, 64))})
    return run


@pytest.mark.parametrize("case,match", [
    ("dora-config", "q_proj has no DoRA magnitude m of 64 values"),
    ("dora-weights", "is a DoRA magnitude, but the adapter config says fine_tune_type lora"),
    ("unknown-type", "fine_tune_type 'qlora' cannot be exported (supported: lora, dora, full)"),
    ("embedding", "embeddings or the output layer cannot be exported (supported: linear"),
    ("target", "target module mlp.fc1 cannot be exported (supported: q_proj, k_proj"),
    ("no-adapter", "the run has no adapter in adapters/"),
    ("not-a-run", "not a run directory"),
    ("format", "unknown format 'onnx' (supported: gguf, peft, mlx-fused, gguf-fused, ollama, "
               "hub)"),
    ("outtype", "'q4_k' is not a type for gguf-fused (supported: f16, q8_0, f32)"),
    ("shape", "adapts a 64x32 weight"),
    ("rank", "rank 4, but the adapter's matrices have rank 2"),
])
def test_bad_input_is_one_line_and_leaves_nothing(case, match, tmp_path, capsys):
    base, _, _ = tiny_gguf(tmp_path / "base.gguf")
    lin = {"model.layers.0.self_attn.q_proj.lora_a": mx.zeros((64, 4)),
           "model.layers.0.self_attn.q_proj.lora_b": mx.zeros((4, 64))}
    to, outtype = "gguf", []
    if case == "dora-config":
        run = _broken_run(tmp_path, base, config={"fine_tune_type": "dora"})
    elif case == "unknown-type":
        run = _broken_run(tmp_path, base, config={"fine_tune_type": "qlora"})
    elif case == "dora-weights":
        run = _broken_run(tmp_path, base, {**lin, "model.layers.0.self_attn.q_proj.m":
                                           mx.ones((64,))})
    elif case == "embedding":
        run = _broken_run(tmp_path, base, {**lin, "model.embed_tokens.lora_a": mx.zeros((9, 4)),
                                           "model.embed_tokens.lora_b": mx.zeros((4, 64))})
    elif case == "target":
        run = _broken_run(tmp_path, base, {"model.layers.0.mlp.fc1.lora_a": mx.zeros((64, 4)),
                                           "model.layers.0.mlp.fc1.lora_b": mx.zeros((4, 8))})
    elif case == "no-adapter":
        run = _broken_run(tmp_path, base)
        os.remove(run / "adapters" / "adapters.safetensors")
    elif case == "not-a-run":
        run = tmp_path / "run"
        run.mkdir()
    elif case == "format":
        run, to = _broken_run(tmp_path, base), "onnx"
    elif case == "outtype":
        run, to, outtype = _broken_run(tmp_path, base), "gguf-fused", ["--outtype", "q4_k"]
    elif case == "rank":
        run = _broken_run(tmp_path, base, {"model.layers.0.self_attn.q_proj.lora_a":
                                           mx.zeros((64, 2)),
                                           "model.layers.0.self_attn.q_proj.lora_b":
                                           mx.zeros((2, 64))})
    else:
        run = _broken_run(tmp_path, base, {"model.layers.0.self_attn.q_proj.lora_a":
                                           mx.zeros((32, 4)),
                                           "model.layers.0.self_attn.q_proj.lora_b":
                                           mx.zeros((4, 64))})
    code, out, err = run_cli(capsys, "export", str(run), "--to", to, *outtype,
                             "--out", str(tmp_path / "out" / "x"))
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and match in err, err
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_and_non_gguf_base(tmp_path, capsys, tiny_model_dir):
    run = make_run(tmp_path / "run", tiny_model_dir)
    code, _, err = run_cli(capsys, "export", str(run), "--to", "gguf-fused")
    assert code != 0 and "gguf-fused needs a GGUF base" in err
    code, _, err = run_cli(capsys, "export", str(run), "--to", "ollama")
    assert code != 0 and "ollama needs a GGUF base" in err
    odd = tmp_path / "phi"
    odd.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "model_type": "phi3"}))
    (run / "config.yaml").write_text(f"name: test\nmodel:\n  path: {odd}\n")
    code, _, err = run_cli(capsys, "export", str(run), "--to", "gguf")
    assert code != 0 and "model_type 'phi3' cannot be exported (supported: llama, mistral" in err
    assert not (run / "export").exists()


def test_failure_midway_leaves_the_old_output(llama_run, tmp_path, monkeypatch):
    """A writer that fails after writing part of its output: the existing output is kept
    and no temporary file is left."""
    from mlxtune.export import peft

    run, _, _, _ = llama_run
    out = export(run, "peft", tmp_path / "peft").path
    before = (out / "adapter_config.json").read_text()

    def broken(lora, folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(peft, "write", broken)
    with pytest.raises(OSError):
        export(run, "peft", out, force=True)
    assert (out / "adapter_config.json").read_text() == before
    assert leftovers(tmp_path) == []


# -- llama.cpp as the client (slow: llama-cpp-python builds llama.cpp) ---------------------

LONG_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published four "
    "papers that changed physics: on the photoelectric effect, Brownian motion, special "
    "relativity, and the equivalence of mass and energy. Meanwhile, in the kitchen, Sam "
    "was trying to remember whether the domain renewal was due on Friday or on Monday; "
    "the reminder said 'urgent', which, as everyone knows, means 'sometime next week'. "
    "def add(x, y):\n    return x + y  # 3.14159, 2024-06-01 at 13:45\n" * 2)


def llama_cpp_logits(model: Path, tokens: list[int], lora: Path | None = None):
    """Logits at every position from llama.cpp, positions x vocab."""
    if os.environ.get("CI"):        # CI installs it (.ci/run): never skip there
        import llama_cpp
    else:
        llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(model), lora_path=str(lora) if lora else None,
                          logits_all=True, n_ctx=256, n_batch=256, n_threads=2,
                          verbose=False)
    llm.eval(tokens)
    scores = np.array(llm._scores, dtype=np.float32)
    llm.close()
    return scores


def check_against_llama_cpp(base: Path, run: Path, adapter: Path, tokens: list[int]):
    """The adapter shifts llama.cpp's next-token logits as it shifts mlxtune's: correlation
    of the shifts >= 0.99, slope within 5% of 1, over >= 100 positions. Returns (corr,
    slope) for the record."""
    assert len(tokens) >= 100
    plain, adapted = mlxtune_logits(base, run / "adapters", tokens)
    cpp_plain = llama_cpp_logits(base, tokens)
    cpp_adapted = llama_cpp_logits(base, tokens, adapter)
    # Same base model on both sides first (else the shifts mean nothing).
    base_corr, _ = shift_agreement(plain, cpp_plain)
    assert base_corr > 0.9999, base_corr
    ours, theirs = adapted - plain, cpp_adapted - cpp_plain
    assert ours.std() > 0.1 * plain.std()          # the adapter moves the logits
    corr, slope = shift_agreement(ours, theirs)
    print(f"\n{base.name}: {len(tokens)} positions, shift correlation {corr:.6f}, "
          f"slope {slope:.5f}")
    assert corr >= 0.99 and abs(slope - 1) <= 0.05, (corr, slope)
    return corr, slope


@pytest.fixture(scope="module")
def smollm2_f32(tmp_path_factory):
    """An F32 (dequantized) copy of the packaged SmolLM2 GGUF: llama.cpp's quantized dot
    products would add noise that hides real errors."""
    from mlxtune.export import gguf_fused
    from mlxtune.models import packaged_path

    path = tmp_path_factory.mktemp("smollm2") / "smollm2-f32.gguf"
    gguf_fused.write_merged(packaged_path("smollm2-135m-instruct"), path, "f32")
    return path


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_llama_cpp_applies_the_exported_adapter_to_smollm2(smollm2_f32, tmp_path, monkeypatch):
    """SmolLM2 is llama family: llama.cpp holds its Q/K rows interleaved. Every linear
    layer of all 30 blocks adapted. An export without the lora_b row permutation is
    checked too, and must fail the same test (so the test can see that mistake)."""
    from mlxtune import models
    from mlxtune.config import ModelConfig
    from mlxtune.export import gguf_adapter

    run = make_run(tmp_path / "run", smollm2_f32, rank=8, alpha=16.0, b_scale=0.05)
    adapter = export(run, "gguf", tmp_path / "adapter.gguf").path
    tokens = models.load(ModelConfig(path=str(smollm2_f32))).tokenizer.encode(LONG_TEXT)[:128]
    check_against_llama_cpp(smollm2_f32, run, adapter, tokens)

    monkeypatch.setattr(gguf_adapter, "to_gguf_rows", lambda rows, key, base: rows)
    unpermuted = export(run, "gguf", tmp_path / "unpermuted.gguf").path
    with pytest.raises(AssertionError):
        check_against_llama_cpp(smollm2_f32, run, unpermuted, tokens)


@pytest.mark.slow
@pytest.mark.llama_cpp
@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_llama_cpp_applies_the_exported_adapter_to_a_tiny_model(model_type, tmp_path):
    """A second architecture written to GGUF by the test (qwen2: no Q/K interleave, q/k/v
    biases, untied output), and a tiny llama for good measure."""
    from tiny_gguf import trained_tokenizer

    tok = trained_tokenizer("qwen2" if model_type == "qwen2" else "llama3")
    args = model_args(model_type, vocab_size=tok.get_vocab_size(), hidden_size=128,
                      intermediate_size=256)
    model = build_model(args, seed=3)
    base = tmp_path / f"tiny-{model_type}.gguf"
    write_gguf(base, model, args, tok, pre="qwen2" if model_type == "qwen2" else "llama-bpe")
    run = make_run(tmp_path / "run", base, rank=8, alpha=16.0, b_scale=0.05)
    adapter = export(run, "gguf", tmp_path / "adapter.gguf").path
    tokens = tok.encode(LONG_TEXT).ids[:160]
    check_against_llama_cpp(base, run, adapter, tokens)


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_llama_cpp_runs_the_fused_gguf_like_the_adapter(smollm2_f32, tmp_path):
    """gguf-fused (f32) in llama.cpp gives the logits of base + adapter in llama.cpp."""
    from mlxtune import models
    from mlxtune.config import ModelConfig

    run = make_run(tmp_path / "run", smollm2_f32, rank=8, alpha=16.0,
                   targets=["q_proj", "k_proj", "down_proj"], b_scale=0.05)
    adapter = export(run, "gguf", tmp_path / "adapter.gguf").path
    fused = export(run, "gguf-fused", tmp_path / "fused.gguf", outtype="f32").path
    tokens = models.load(ModelConfig(path=str(smollm2_f32))).tokenizer.encode(LONG_TEXT)[:100]
    with_adapter = llama_cpp_logits(smollm2_f32, tokens, adapter)
    merged = llama_cpp_logits(fused, tokens)
    plain = llama_cpp_logits(smollm2_f32, tokens)
    corr, slope = shift_agreement(with_adapter - plain, merged - plain)
    assert corr > 0.9999 and abs(slope - 1) < 0.005, (corr, slope)
    np.testing.assert_allclose(merged, with_adapter, atol=2e-3 * np.abs(plain).max())


# -- end to end, under each compute profile -----------------------------------------------

def test_every_export_of_a_trained_run(tmp_path, capsys, profile):
    """`mlxtune run` on a quantized GGUF base (Q8_0 projections: MLX's quantized layers
    under the GPU profile, dequantize-then-BLAS under the CPU's), then every export. Each
    is read back; the merged ones give the adapter's logits (computed here in float32,
    so the comparison is as tight whichever profile trained the adapter)."""
    import yaml
    from gguf import GGMLQuantizationType as T

    from mlxtune.train.events import read_events
    from tiny import write_jsonl

    base, _, _ = tiny_gguf(tmp_path / "base.gguf", types={"proj": T.Q8_0})
    write_jsonl(tmp_path / "train.jsonl", [
        {"messages": [{"role": "user", "content": f"n {i}?"},
                      {"role": "assistant", "content": f"the number is {i % 5}"}]}
        for i in range(16)])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "model": {"path": str(base)}, "adapter": {"rank": 4, "alpha": 8},
        "data": {"train": "train.jsonl", "max_seq_len": 48},
        "train": {"iters": 4, "batch_size": 4, "learning_rate": 1e-2, "eval_every": 0,
                  "save_every": 0, "log_every": 2}}))
    run = tmp_path / "run"
    main(["run", str(tmp_path / "c.yaml"), "--run-dir", str(run), "-q", "--no-eval"])
    start = read_events(run)[0]
    assert start["profile"] == profile
    assert start["compute_dtype"] == ("bfloat16" if profile == "gpu" else "float32")
    capsys.readouterr()
    outs = {}
    for fmt in ("gguf", "peft", "mlx-fused", "gguf-fused", "ollama"):
        main(["export", str(run), "--to", fmt, "--outtype", "f32"] if fmt in
             ("gguf", "mlx-fused", "gguf-fused") else ["export", str(run), "--to", fmt])
        outs[fmt] = Path(capsys.readouterr().out.strip())
        assert outs[fmt].exists(), fmt
    plain, adapted = mlxtune_logits(base, run / "adapters", TOKENS)
    assert np.abs(adapted - plain).max() > 1e-3  # it trained
    _, tensors = read_gguf(outs["gguf"])
    assert any(n.endswith(".lora_a") for n in tensors)
    assert (outs["peft"] / "adapter_config.json").is_file()
    assert "ADAPTER" in (outs["ollama"] / "Modelfile").read_text()
    for fused_path in (outs["gguf-fused"], outs["mlx-fused"]):
        fused, _ = mlxtune_logits(fused_path, None, TOKENS)
        np.testing.assert_allclose(fused, adapted, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_gguf_base_logits_against_llama_cpp_under_each_profile(monkeypatch):
    """The packaged SmolLM2 (Q4_1, float16 scales, as shipped) in llama.cpp and in mlxtune,
    at 128 positions: under the GPU profile (MLX's quantized layers, scales kept float16)
    in float32 the agreement is the CPU path's (the same function; llama.cpp's own
    quantized dot products set the floor). In bfloat16 it is measured and bounded; with
    the scales rounded through bfloat16 as before (the check that this test sees that
    mistake) float32 compute misses by more than the CPU path does."""
    from mlxtune import models, quant
    from mlxtune.config import ModelConfig
    from mlxtune.models import packaged_path

    base = packaged_path("smollm2-135m-instruct")
    loaded = models.load(ModelConfig(path=str(base), dtype="float32"))
    tokens = loaded.tokenizer.encode(LONG_TEXT)[:128]
    del loaded
    cpp = llama_cpp_logits(base, tokens)

    def gap(profile: str, dtype: str, round_scales: bool = False):
        monkeypatch.setenv("MLXTUNE_PROFILE", profile)
        model = models.load(ModelConfig(path=str(base), dtype=dtype)).model
        if round_scales:
            for _, m in model.named_modules():
                if "scales" in m and isinstance(m, (quant.nn.QuantizedLinear,
                                                    quant.nn.QuantizedEmbedding)):
                    m.scales = m.scales.astype(mx.bfloat16).astype(m.scales.dtype)
                    m.biases = m.biases.astype(mx.bfloat16).astype(m.biases.dtype)
        ours = np.array(model(mx.array([tokens]))[0].astype(mx.float32))
        corr, _ = shift_agreement(ours, cpp)
        return np.abs(ours - cpp).max(), corr

    cpu = gap("cpu", "float32")
    gpu = gap("gpu", "float32")
    bf16 = gap("gpu", "bfloat16")
    rounded = gap("gpu", "float32", round_scales=True)
    print(f"\nmax |logit - llama.cpp| (correlation), logits' spread "
          f"{cpp.max() - cpp.min():.1f}: cpu float32 {cpu[0]:.4f} ({cpu[1]:.7f}); "
          f"gpu float32 {gpu[0]:.4f} ({gpu[1]:.7f}); gpu bfloat16 {bf16[0]:.4f} "
          f"({bf16[1]:.7f}); gpu float32, scales rounded to bfloat16 {rounded[0]:.4f} "
          f"({rounded[1]:.7f})")
    # The same function as the CPU path: float32 rounding apart, llama.cpp's noise is the
    # whole gap on both.
    assert gpu[0] <= 1.05 * cpu[0] + 1e-3 and gpu[1] >= cpu[1] - 1e-6
    assert rounded[0] > 1.05 * cpu[0]
    # bfloat16 activations (8-bit mantissa) through 30 blocks: correlation still >= 0.999.
    assert bf16[1] >= 0.999


# -- DoRA, rsLoRA, full fine-tuning ---------------------------------------------------------

@pytest.fixture(scope="module")
def dora_q8_run(tmp_path_factory):
    """A DoRA adapter on a quantized GGUF base (Q8_0 projections): QDoRA."""
    from gguf import GGMLQuantizationType as T

    tmp = tmp_path_factory.mktemp("export-dora")
    base, args, ref = tiny_gguf(tmp / "base.gguf", types={"proj": T.Q8_0})
    return make_run(tmp / "run", base, kind="dora"), base


def test_dora_fused_exports_give_the_adapter_logits(dora_q8_run, tmp_path):
    """gguf-fused (rows rescaled in the file's Q/K order) and mlx-fused (loaded by
    mlx-lm) of a DoRA adapter compute what the adapter computes at run time."""
    from mlx_lm import load as mlx_lm_load

    run, base = dora_q8_run
    plain, adapted = mlxtune_logits(base, run / "adapters", TOKENS)
    assert np.abs(adapted - plain).max() > 0.05
    fused_gguf = export(run, "gguf-fused", tmp_path / "fused.gguf", outtype="f32").path
    fused, _ = mlxtune_logits(fused_gguf, None, TOKENS)
    np.testing.assert_allclose(fused, adapted, atol=2e-4, rtol=1e-4)
    folder = export(run, "mlx-fused", tmp_path / "fused", outtype="f32").path
    model, _ = mlx_lm_load(str(folder))
    fused = np.array(model(mx.array([TOKENS]))[0].astype(mx.float32))
    np.testing.assert_allclose(fused, adapted, atol=2e-4, rtol=1e-4)


def test_dora_peft_names_config_and_refusals(dora_q8_run, tmp_path, capsys):
    from safetensors.numpy import load_file

    run, _ = dora_q8_run
    out = export(run, "peft", tmp_path / "peft").path
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is False
    tensors = load_file(str(out / "adapter_model.safetensors"))
    ours = mx.load(str(run / "adapters" / "adapters.safetensors"))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    np.testing.assert_array_equal(tensors[f"{prefix}.lora_magnitude_vector"],
                                  np.array(ours["model.layers.0.self_attn.q_proj.m"]))
    assert len([k for k in tensors if k.endswith("lora_magnitude_vector")]) == \
        len([k for k in ours if k.endswith(".m")])
    for fmt, match in (("gguf", "a GGUF LoRA adapter cannot hold DoRA's magnitudes: export "
                                "--to gguf-fused"),
                       ("ollama", "Ollama's ADAPTER is a GGUF LoRA adapter")):
        code, _, err = run_cli(capsys, "export", str(run), "--to", fmt, "--out",
                               str(tmp_path / fmt))
        assert code != 0 and match in err, err
        assert len(err.strip().splitlines()) == 1
        assert not (tmp_path / fmt).exists() and leftovers(tmp_path) == []


def test_rslora_scale_in_gguf_and_peft(tmp_path):
    """rsLoRA's scale alpha / sqrt(r): llama.cpp applies alpha / r, so the GGUF adapter's
    alpha is scale * r; PEFT gets use_rslora with the run's alpha."""
    base, _, _ = tiny_gguf(tmp_path / "base.gguf")
    run = make_run(tmp_path / "run", base, rank=16, alpha=8.0, rslora=True)
    meta, _ = read_gguf(export(run, "gguf", tmp_path / "a.gguf").path)
    assert meta["adapter.lora.alpha"][0] == pytest.approx(8.0 / 4 * 16)
    config = json.loads((export(run, "peft", tmp_path / "peft").path /
                         "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["lora_alpha"] == 8.0 and config["r"] == 16
    # The merged model still equals the adapter at run time.
    plain, adapted = mlxtune_logits(base, run / "adapters", TOKENS)
    fused, _ = mlxtune_logits(export(run, "gguf-fused", tmp_path / "f.gguf",
                                     outtype="f32").path, None, TOKENS)
    np.testing.assert_allclose(fused, adapted, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_full_fine_tune_exports_as_a_model(model_type, tmp_path, capsys):
    """A full fine-tune is a whole model: gguf-fused (its block tensors in the file's own
    layout: Q/K interleave, norms) and mlx-fused reproduce it; adapter formats refuse."""
    from mlx_lm import load as mlx_lm_load

    base, _, _ = tiny_gguf(tmp_path / "base.gguf", model_type=model_type)
    run = make_run(tmp_path / "run", base, kind="full")
    plain, tuned = mlxtune_logits(base, run / "adapters", TOKENS)
    assert np.abs(tuned - plain).max() > 0.05
    fused, _ = mlxtune_logits(export(run, "gguf-fused", tmp_path / "f.gguf",
                                     outtype="f32").path, None, TOKENS)
    np.testing.assert_allclose(fused, tuned, atol=2e-4, rtol=1e-4)
    model, _ = mlx_lm_load(str(export(run, "mlx-fused", tmp_path / "m", outtype="f32").path))
    fused = np.array(model(mx.array([TOKENS]))[0].astype(mx.float32))
    np.testing.assert_allclose(fused, tuned, atol=2e-4, rtol=1e-4)
    for fmt in ("gguf", "peft", "ollama"):
        code, _, err = run_cli(capsys, "export", str(run), "--to", fmt)
        assert code != 0 and "a full fine-tune is a whole model, not an adapter: export it " \
            "with --to mlx-fused" in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (run / "export").exists() or leftovers(run / "export") == []
