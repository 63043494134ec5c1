"""Near-duplicate texts: MinHash over word shingles, LSH banding, confirmed exactly.

The algorithm (Broder 1997, "On the resemblance and containment of documents"; banding as
in Leskovec, Rajaraman and Ullman, "Mining of Massive Datasets", chapter 3), in numpy over
all texts at once:

1. Shingles: each text's runs of `shingle` consecutive words (a shorter text is one
   shingle), hashed to 64 bits (a polynomial of the words' hashes, text.index, through
   splitmix64's finaliser).
2. Signatures: for each of NUM_PERM hash functions h_k(x) = a_k x mod 2^64 (a_k odd, x
   the shingle's well-mixed hash), the minimum over a text's shingles, top 32 bits kept. Two texts agree at position k
   with probability (close to) the Jaccard similarity J of their shingle sets.
3. Banding: the signature is cut into b bands of r positions; texts that agree on a whole
   band are candidates, with probability 1 - (1 - J^r)^b. r and b are picked for the
   threshold t: the steepest curve that still makes a pair at t a candidate with
   probability >= RECALL_AT_THRESHOLD (t = 0.8: 21 bands of 6, 99.8%; pairs at J = 0.5
   are candidates 28% of the time, at 0.3 1.5%).
4. Confirmation: candidates whose signatures agree on fewer than t - 0.2 of the positions
   are dropped (vectorised), the rest are kept when the exact Jaccard similarity of their
   shingle sets is >= t. Every pair reported is at or above the threshold (precision 1
   against this definition); a pair exactly at t is missed with probability <= 0.2%.

`datasketch` (MinHash + MinHashLSH) gives the same candidates, but hashes shingles one by
one in Python: on the 50,000-conversation benchmark it took several times as long as
this whole step (docs/design.md, "mlxtune data"), so it is not used.
"""

from __future__ import annotations

import numpy as np

from mlxtune.datacheck.text import mix

NUM_PERM = 128
RECALL_AT_THRESHOLD = 0.995
CHUNK = 2048  # shingles hashed against every permutation at once (x NUM_PERM x 8 bytes)
_SENTINEL = np.uint64(0x9E3779B97F4A7C15)  # the missing words of a short text's shingle
_POLY = np.uint64(0x100000001B3)


def bands_for(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows per band) for a threshold (see the module's docstring)."""
    for r in range(num_perm, 0, -1):
        b = num_perm // r
        if 1.0 - (1.0 - threshold ** r) ** b >= RECALL_AT_THRESHOLD:
            return b, r
    return num_perm, 1


def shingles(words: np.ndarray, offsets: np.ndarray, size: int) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    """Shingle hashes of texts given as word hashes (text i's words are
    words[offsets[i]:offsets[i + 1]]): (hashes, their offsets, likewise)."""
    lengths = np.diff(offsets)
    n_texts = len(lengths)
    counts = np.where(lengths >= size, lengths - size + 1, np.minimum(lengths, 1))
    out_offsets = np.zeros(n_texts + 1, np.int64)
    np.cumsum(counts, out=out_offsets[1:])
    n = int(out_offsets[-1])
    text = np.repeat(np.arange(n_texts), counts)
    pos = np.arange(n, dtype=np.int64) - out_offsets[:-1][text] + offsets[:-1][text]
    end = offsets[1:][text]
    padded = np.concatenate([words, np.zeros(size, np.uint64)])
    with np.errstate(over="ignore"):
        h = np.zeros(n, np.uint64)
        for o in range(size):
            idx = pos + o
            word = np.where(idx < end, padded[np.minimum(idx, len(words))], _SENTINEL)
            h = h * _POLY + mix(word + np.uint64(o + 1))
        return mix(h), out_offsets


def signatures(hashes: np.ndarray, offsets: np.ndarray, num_perm: int = NUM_PERM,
               seed: int = 1) -> np.ndarray:
    """[texts, num_perm] uint32 MinHash signatures (texts without shingles: all ones).
    Permutation k is x -> a_k x mod 2^64 (a_k odd; top 32 bits kept), computed
    [num_perm, shingles] a chunk of texts at a time (numpy's multiply of uint64 is not
    vectorised; this layout keeps it and the minimum in cache)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    n = len(offsets) - 1
    out = np.full((num_perm, n), np.iinfo(np.uint64).max, np.uint64)
    nonempty = np.flatnonzero(offsets[1:] > offsets[:-1])
    ends = offsets[nonempty + 1]
    buffer = np.empty((num_perm, CHUNK), np.uint64)
    i = 0
    with np.errstate(over="ignore"):
        while i < len(nonempty):
            # Whole texts per chunk, about CHUNK shingles (one long text may exceed it).
            lo = offsets[nonempty[i]]
            j = max(int(np.searchsorted(ends, lo + CHUNK, side="right")), i + 1)
            docs = nonempty[i:j]
            hi = offsets[docs[-1] + 1]
            values = buffer[:, :hi - lo] if hi - lo <= CHUNK else \
                np.empty((num_perm, hi - lo), np.uint64)
            np.multiply(a[:, None], hashes[None, lo:hi], out=values)
            out[:, docs] = np.minimum.reduceat(values, offsets[docs] - lo, axis=1)
            i = j
    return (out >> np.uint64(32)).astype(np.uint32).T.copy()


def candidates(sig: np.ndarray, bands: int, rows: int, seed: int = 2) -> np.ndarray:
    """[pairs, 2] (i < j) of texts that agree on at least one whole band."""
    n = len(sig)
    rng = np.random.default_rng(seed)
    weights = rng.integers(0, 2**63, rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    found = []
    with np.errstate(over="ignore"):
        for band in range(bands):
            block = sig[:, band * rows:(band + 1) * rows].astype(np.uint64)
            key = mix((block * weights[None, :]).sum(axis=1, dtype=np.uint64))
            order = np.argsort(key, kind="stable")
            sorted_key = key[order]
            starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
            sizes = np.diff(np.r_[starts, n])
            two = starts[sizes == 2]
            found.append(np.stack([order[two], order[two + 1]], axis=1))
            for s, m in zip(starts[sizes > 2], sizes[sizes > 2]):
                members = order[s:s + m]
                i, j = np.triu_indices(m, 1)
                found.append(np.stack([members[i], members[j]], axis=1))
    if not found:
        return np.zeros((0, 2), np.int64)
    pairs = np.sort(np.concatenate(found).astype(np.int64), axis=1)
    code = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([code // n, code % n], axis=1)


def near_pairs(words: np.ndarray, offsets: np.ndarray, threshold: float, shingle: int,
               num_perm: int = NUM_PERM) -> list[tuple[int, int, float]]:
    """(i, j, Jaccard) for every pair of texts (i < j; text i's word hashes are
    words[offsets[i]:offsets[i + 1]]) whose word-shingle sets have a Jaccard similarity
    >= threshold (up to the banding's miss rate; see above)."""
    if len(offsets) < 3:
        return []
    hashes, offsets = shingles(words, offsets, shingle)
    sig = signatures(hashes, offsets, num_perm)
    empty = offsets[1:] == offsets[:-1]
    bands, rows = bands_for(threshold, num_perm)
    pairs = candidates(sig, bands, rows)
    if len(pairs):
        pairs = pairs[~(empty[pairs[:, 0]] | empty[pairs[:, 1]])]
    keep = []
    for lo in range(0, len(pairs), 1 << 16):  # signature agreement, a first filter
        chunk = pairs[lo:lo + (1 << 16)]
        agree = (sig[chunk[:, 0]] == sig[chunk[:, 1]]).mean(axis=1)
        keep.append(chunk[agree >= threshold - 0.2])
    pairs = np.concatenate(keep) if keep else pairs
    sets: dict[int, frozenset] = {}

    def shingle_set(i: int) -> frozenset:
        if i not in sets:
            sets[i] = frozenset(hashes[offsets[i]:offsets[i + 1]].tolist())
        return sets[i]

    out = []
    for i, j in pairs.tolist():
        a, b = shingle_set(i), shingle_set(j)
        inter = len(a & b)
        jac = inter / (len(a) + len(b) - inter)
        if jac >= threshold - 1e-12:
            out.append((i, j, jac))
    return out
