"""Rebuild a GGUF file's tokenizer as a Hugging Face fast tokenizer, wrapped for mlx_lm.

transformers can only convert GGUF tokenizers with PyTorch installed, so the
`tokenizers.Tokenizer` is built here from the metadata llama.cpp writes:
- "gpt2": byte-level BPE (tokens, merges). The pre-tokenizer follows
  `tokenizer.ggml.pre`, with the split regexes llama.cpp itself uses for that name.
- "llama": SentencePiece BPE (tokens, scores, byte fallback): merges are ranked by the
  score of the merged piece, which is how SentencePiece (and llama.cpp) pick the next merge.
"""

from __future__ import annotations

from mlxtune.errors import ModelError
from mlxtune.models.gguf_file import printable

# llama.cpp token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (regexes applied in turn, like llama.cpp's llm_tokenizer_bpe,
# ignore_merges, add_bos default). Names and regexes as in llama.cpp's llama-vocab.cpp.
_LLAMA3_PRE = ([_LLAMA3], True, True)
_QWEN2_PRE = ([_QWEN2], False, False)
_DIGITS_PRE = ([r"\p{N}", _GPT2], False, False)
_GPT2_PRE = ([_GPT2], False, False)
PRE_TOKENIZERS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2"], _LLAMA3_PRE),
    **dict.fromkeys(["dbrx", "smaug-bpe"], ([_LLAMA3], False, False)),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"], _QWEN2_PRE),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b"], _DIGITS_PRE),
    **dict.fromkeys(["gpt-2", "phi-2", "mpt", "olmo", "jais", "gigachat", "exaone4", "mellum",
                     "default"], _GPT2_PRE),
}


def _meta_ids(meta: dict) -> dict:
    ids = {}
    for role, key in [("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("unk", "unknown_token_id"), ("pad", "padding_token_id"),
                      ("eot", "eot_token_id"), ("eom", "eom_token_id")]:
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            ids[role] = int(value)
    return ids


def _byte_level_bpe(meta: dict, tokens: list[str], path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        known = ", ".join(sorted(PRE_TOKENIZERS))
        raise ModelError(f"{path}: GGUF pre-tokenizer '{printable(str(pre))}' "
                         f"(tokenizer.ggml.pre) is not supported yet (supported: {known})")
    regexes, ignore_merges, _ = PRE_TOKENIZERS[pre]
    merges_meta = meta.get("tokenizer.ggml.merges")
    if merges_meta is None:
        raise ModelError(f"{path}: required GGUF metadata key tokenizer.ggml.merges is missing")
    merges = []
    for line in merges_meta:
        cut = line.find(" ", 1)  # llama.cpp's rule: the first space after the first char
        if cut < 0:
            raise ModelError(f"{path}: bad entry in tokenizer.ggml.merges: {line!r}")
        merges.append((line[:cut], line[cut + 1:]))
    model = models.BPE(vocab=_vocab(tokens), merges=merges, ignore_merges=ignore_merges)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # llama.cpp pads with duplicates at times; first id wins
    return vocab


def _sentencepiece_bpe(meta: dict, tokens: list[str], types: list[int], ids: dict, path):
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ModelError(f"{path}: tokenizer.ggml.scores is missing or does not match "
                         "tokenizer.ggml.tokens")
    vocab = _vocab(tokens)
    merges = _merges_from_scores(tokens, scores, types, vocab)
    unk = tokens[ids["unk"]] if "unk" in ids else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk,
                               byte_fallback=True, fuse_unk=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("▁")] if prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tail = [decoders.Strip(" ", 1, 0)] if prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()] + tail)
    return tok, prefix


def _merges_from_scores(tokens, scores, types, vocab) -> list[tuple[str, str]]:
    """Every split of a normal piece into two pieces in the vocabulary is a merge; the
    higher the merged piece's score, the earlier the merge (SentencePiece BPE)."""
    ranked = []
    for i, piece in enumerate(tokens):
        if types[i] != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _special_tokens(tok, tokens: list[str], types: list[int], ids: dict) -> None:
    """Control and unknown tokens (and bos/eos whatever their type) are special;
    user-defined ones are matched whole in the text but are not special, as in llama.cpp.
    pad/eot ids are not forced special: some files point them at ordinary tokens."""
    from tokenizers import AddedToken

    special_ids = {i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)}
    special_ids |= {ids[r] for r in ("bos", "eos") if r in ids}
    added = [AddedToken(tokens[i], special=True, normalized=False)
             for i in sorted(special_ids) if tokens[i]]
    added += [AddedToken(tokens[i], special=False, normalized=False)
              for i, t in enumerate(types) if t == USER_DEFINED and i not in special_ids
              and tokens[i]]
    tok.add_tokens(added)


def _post_processor(tok, tokens, ids: dict, add_bos: bool, add_eos: bool, path) -> None:
    from tokenizers import processors

    if not (add_bos or add_eos):
        return
    for role, wanted in (("bos", add_bos), ("eos", add_eos)):
        if wanted and role not in ids:
            raise ModelError(f"{path}: tokenizer.ggml.add_{role}_token is set but "
                             f"tokenizer.ggml.{role}_token_id is missing")
    bos = [tokens[ids["bos"]]] if add_bos else []
    eos = [tokens[ids["eos"]]] if add_eos else []
    single = " ".join(bos + ["$A"] + eos)
    pair = " ".join(bos + ["$A"] + eos + bos + ["$B:1"] + eos)
    special = [(tokens[ids[r]], ids[r]) for r, w in (("bos", add_bos), ("eos", add_eos)) if w]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                       special_tokens=special)


def build_tokenizer(meta: dict, path):
    """An mlx_lm TokenizerWrapper for the tokenizer described by the GGUF metadata."""
    try:
        return _build(meta, path)
    except ModelError:
        raise
    except Exception as e:  # tokenizers / transformers reject inconsistent vocabularies
        text = str(e).strip().splitlines()
        raise ModelError(f"{path}: cannot build the tokenizer from the GGUF metadata: "
                         f"{type(e).__name__}: {printable(text[0]) if text else ''}") from e


def _build(meta: dict, path):
    from functools import partial

    from mlx_lm.tokenizer_utils import (BPEStreamingDetokenizer, SPMStreamingDetokenizer,
                                        TokenizerWrapper)
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ModelError(f"{path}: the GGUF file has no tokenizer "
                         "(tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    tokens = list(tokens)
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ModelError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for "
                         f"{len(tokens)} tokens")
    ids = {r: i for r, i in _meta_ids(meta).items() if 0 <= i < len(tokens)}
    if kind == "gpt2":
        tok = _byte_level_bpe(meta, tokens, path)
        add_bos_default = PRE_TOKENIZERS[meta.get("tokenizer.ggml.pre", "default")][2]
        detokenizer = BPEStreamingDetokenizer
    elif kind == "llama":
        tok, prefix = _sentencepiece_bpe(meta, tokens, types, ids, path)
        add_bos_default = True
        detokenizer = partial(SPMStreamingDetokenizer, trim_space=prefix)
    else:
        raise ModelError(f"{path}: tokenizer model '{printable(str(kind))}' "
                         "(tokenizer.ggml.model) is not supported yet (supported: gpt2, llama)")
    _special_tokens(tok, tokens, types, ids)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    _post_processor(tok, tokens, ids, add_bos and "bos" in ids, add_eos, path)

    def token(role):
        return tokens[ids[role]] if role in ids else None

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=token("bos"), eos_token=token("eos"),
        unk_token=token("unk"), pad_token=token("pad"),
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False)  # decode must give back the text as is
    eos_ids = [ids[r] for r in ("eos", "eot", "eom") if r in ids]
    return TokenizerWrapper(fast, detokenizer, eos_token_ids=eos_ids)
