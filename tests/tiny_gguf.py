"""Tiny GGUF files written the way llama.cpp's converter writes them, from tiny mlx_lm
models (tests/tiny.py), with an independent reference for every tensor.

Names, metadata keys and the two layout changes (Q/K row interleave for llama, 1 + w for
Gemma's norms) are spelled out here on purpose rather than taken from the loader, so the
tests check the loader against a second reading of llama.cpp's conventions.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from mlx.utils import tree_flatten

from tiny import CHATML, SPECIAL

GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
             "gemma2": "gemma2", "gemma3_text": "gemma3"}
GEMMA = {"gemma", "gemma2", "gemma3_text"}

_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}

# Pre-tokenizers as the Hugging Face tokenizer.json files of these families have them.
HF_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
             r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
HF_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
            r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say WE'VE done it; don't you think? It's 2024-06-01 at 13:45.",
    "Numbers: 0 1 12 123 1234 12345 3.14159 -42 1,000,000 and 007.",
    "def add(x, y):\n    return x + y  # two spaces\n\n\tTabbed line\r\n",
    "Unicode: héllo wörld, naïve café, Ελληνικά, русский, 日本語のテキスト, 😀🚀 emoji.",
    "the theory of the thing: there, then, these, those, other, another, brother.",
]


def gguf_name(param: str, model_type: str) -> str:
    module, leaf = param.rsplit(".", 1)
    if module in _TOP:
        return f"{_TOP[module]}.{leaf}"
    _, _, index, rest = module.split(".", 3)   # model.layers.N.rest
    if rest == "post_attention_layernorm":
        name = "post_attention_norm" if model_type in ("gemma2", "gemma3_text") else "ffn_norm"
    else:
        name = _LAYER[rest]
    return f"blk.{index}.{name}.{leaf}"


def interleave_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permute for llama-family Q/K rows (convert_hf_to_gguf.py)."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _to_file_layout(param: str, w: np.ndarray, args: dict) -> np.ndarray:
    if args["model_type"] == "llama" and ".self_attn.q_proj." in param:
        return interleave_qk(w, args["num_attention_heads"])
    if args["model_type"] == "llama" and ".self_attn.k_proj." in param:
        return interleave_qk(w, args["num_key_value_heads"])
    if args["model_type"] in GEMMA and param.endswith("norm.weight"):
        return w + 1.0
    return w


def _kept():
    from gguf import GGMLQuantizationType as T

    return {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.BF16}


KEPT = _kept()   # types the loader keeps as stored (every other type becomes float16)


def _encode(param: str, w: np.ndarray, qtype, args: dict):
    """(array to write in the file's layout, reference the loader should reproduce)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    stored = _to_file_layout(param, w, args)
    if qtype == T.F32:
        return stored, w
    if qtype == T.F16:
        return stored.astype(np.float16), w.astype(np.float16).astype(np.float32)
    def encode(x):
        if qtype == T.Q2_K:  # nothing quantizes Q2_K here: blocks derived from the weights
            return q2_k_blocks(x)
        try:
            return quantize(x, qtype)
        except NotImplementedError:  # gguf-py cannot quantize K-quants: our round-to-nearest
            from mlxtune.quant.formats import quantize as ours

            return ours(x, qtype.name).reshape(*x.shape[:-1], -1)

    # Rows are quantized independently, so the layout change and quantization commute.
    ref = dequantize(encode(w), qtype).astype(np.float32)
    if qtype not in KEPT:
        ref = ref.astype(np.float16).astype(np.float32)  # the loader keeps these as fp16
    return encode(stored), ref


def q2_k_blocks(w: np.ndarray) -> np.ndarray:
    """Valid Q2_K blocks (84 bytes per 256 weights) whose codes come from the weights' bits
    and whose float16 d/dmin are small, so gguf-py can decode them as a reference."""
    rows = int(np.prod(w.shape[:-1]))
    n = w.size // 256
    raw = np.frombuffer(np.ascontiguousarray(w, np.float32).tobytes(), np.uint8)
    blocks = np.resize(raw, n * 84).reshape(n, 84).copy()
    blocks[:, 80:82] = np.full(n, 0.01, np.float16).view(np.uint8).reshape(n, 2)
    blocks[:, 82:84] = np.full(n, 0.005, np.float16).view(np.uint8).reshape(n, 2)
    return blocks.reshape(*w.shape[:-1], -1) if rows else blocks


def write_gguf(path: Path, model, args: dict, tokenizer=None, types: dict | None = None,
               pre: str = "gpt-2", chat_template: str = CHATML, arch: str | None = None,
               drop_keys: tuple = (), extra: dict | None = None) -> dict:
    """Write `model` (an mlx_lm model built from `args`) to `path` as a GGUF file.

    `types`: substring of the mlx_lm parameter name -> GGMLQuantizationType (first match
    wins, default F32). Returns the reference weights: the source weights as the file holds
    them, decoded independently (gguf-py's dequantize), in Hugging Face layout."""
    import gguf
    from gguf import GGMLQuantizationType as T

    model_type = args["model_type"]
    arch = arch or GGUF_ARCH[model_type]
    writer = gguf.GGUFWriter(str(path), arch)
    reference = {}
    for param, value in tree_flatten(model.parameters()):
        w = np.array(value, dtype=np.float32)
        qtype = next((t for key, t in (types or {}).items() if key in param), T.F32)
        if w.ndim == 1:
            qtype = T.F32  # llama.cpp keeps 1-D tensors in F32
        stored, reference[param] = _encode(param, w, qtype, args)
        writer.add_tensor(gguf_name(param, model_type), stored,
                          raw_dtype=None if qtype in (T.F32, T.F16) else qtype)
    _write_hparams(writer, arch, args, drop_keys)
    if tokenizer is not None:
        _write_byte_level_tokenizer(writer, tokenizer, pre, chat_template)
    for key, value in (extra or {}).items():
        kind = {str: "string", bool: "bool", float: "float32", int: "uint32"}[type(value)]
        getattr(writer, f"add_{kind}")(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def _write_hparams(writer, arch: str, args: dict, drop_keys: tuple) -> None:
    head_dim = args.get("head_dim") or args["hidden_size"] // args["num_attention_heads"]
    keys = {
        "context_length": ("uint32", args["max_position_embeddings"]),
        "embedding_length": ("uint32", args["hidden_size"]),
        "block_count": ("uint32", args["num_hidden_layers"]),
        "feed_forward_length": ("uint32", args["intermediate_size"]),
        "attention.head_count": ("uint32", args["num_attention_heads"]),
        "attention.head_count_kv": ("uint32", args["num_key_value_heads"]),
        "attention.layer_norm_rms_epsilon": ("float32", args["rms_norm_eps"]),
        "rope.freq_base": ("float32", args.get("rope_theta", 10000.0)),
    }
    if arch == "llama":
        keys["rope.dimension_count"] = ("uint32", head_dim)
        keys["vocab_size"] = ("uint32", args["vocab_size"])
    if arch in ("qwen3", "gemma", "gemma2", "gemma3") or args.get("head_dim"):
        keys["attention.key_length"] = ("uint32", head_dim)
        keys["attention.value_length"] = ("uint32", head_dim)
    if arch == "gemma2":
        keys["attn_logit_softcapping"] = ("float32", args.get("attn_logit_softcapping", 50.0))
        keys["final_logit_softcapping"] = ("float32", args.get("final_logit_softcapping", 30.0))
        keys["attention.sliding_window"] = ("uint32", 4096)
    if arch == "gemma3" and args.get("sliding_window_pattern", 6) > 1:
        keys["attention.sliding_window"] = ("uint32", args.get("sliding_window", 512))
    for key, (kind, value) in keys.items():
        if key not in drop_keys:
            getattr(writer, f"add_{kind}")(f"{arch}.{key}", value)


def write_tokenizer_only(path: Path, tok, pre: str, chat_template: str = CHATML,
                         add_bos: bool = False) -> None:
    """A GGUF holding only a byte-level BPE tokenizer's metadata."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    _write_byte_level_tokenizer(writer, tok, pre, chat_template, add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_byte_level_tokenizer(writer, tok, pre: str, chat_template: str,
                                add_bos: bool = False) -> None:
    model = json.loads(tok.to_str())["model"]
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    special = set(SPECIAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(chat_template)


def trained_tokenizer(family: str, vocab_size: int = 700):
    """A byte-level BPE trained on CORPUS with the pre-tokenizer of a model family as
    its Hugging Face tokenizer.json has it ('smollm', 'llama3', 'qwen2', 'gpt-2')."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    byte_level = pre_tokenizers.ByteLevel
    if family == "smollm":
        pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                       byte_level(add_prefix_space=False, use_regex=True)])
    elif family in ("llama3", "qwen2"):
        regex = HF_LLAMA3 if family == "llama3" else HF_QWEN2
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"),
                                       byte_level(add_prefix_space=False, use_regex=False)])
    else:
        pre = byte_level(add_prefix_space=False, use_regex=True)
    tok = Tokenizer(models.BPE(ignore_merges=family == "llama3"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=byte_level.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


def sentencepiece_model(add_dummy_prefix: bool = True, user_defined=("<|im_start|>",)):
    """A SentencePiece BPE model with byte fallback, trained on CORPUS."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=out, model_type="bpe",
        vocab_size=400, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=add_dummy_prefix,
        user_defined_symbols=list(user_defined), split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=out.getvalue())


def write_sentencepiece_tokenizer(path: Path, sp, add_space_prefix: bool = True,
                                  user_defined=("<|im_start|>",)) -> None:
    """A tokenizer-only GGUF holding `sp` the way convert_hf_to_gguf.py writes
    SentencePiece vocabularies (tokens, scores, token types)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        tokens.append(piece)
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else
                     6 if sp.is_byte(i) else 4 if piece in user_defined else 1)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_space_prefix(add_space_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
