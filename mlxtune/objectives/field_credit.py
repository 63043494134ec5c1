"""Per-field advantages (`objective.advantages: fields`): each JSON field's tokens are
credited for that field alone.

With one advantage per completion, every token of a completion shares the group-relative
advantage of its total reward. For structured output that rewards the wrong tokens: a
completion that gets the due date right and drops the tags is pushed up as a whole, its
`"tags": []` included, and a field that no completion of the group gets differently from
the others still moves with whichever field did vary (the quickstart's GRPO runs lost
their explicit tags and collapsed priorities onto the majority value that way; README,
"The quickstart's last mile").

Here, for a completion i that parses as a JSON object and a reference object with field
k, the field's reward is

    r_ik = (total_i - w * field_match_i) + w * credit_ik

(the other rewards as they are, `field_match`'s weight w on this field's credit alone:
1 when equal to the reference's value, the Jaccard index for lists with `lists:
jaccard`, 0 when missing), and its advantage A_ik is r_ik less the group's mean, divided
as `scale_rewards` says: by the std of r_.k over the group (`group`), by the std of the
totals over the whole batch (`batch`: one scale for every advantage of the batch), or
not (`none`). The tokens of field k's value in the completion take A_ik; every other
token (braces, keys, the stop token, a completion that is not an object, a field the
reference does not have) takes the completion's own advantage. A field whose credit does
not vary in a group, with nothing else varying, gets 0: its tokens are left where they
are.

Which tokens hold a value: the characters each token ends at (the decoded prefixes'
lengths) against the value's span in the decoded text; a token that overlaps the span
belongs to it.
"""

from __future__ import annotations

import json
from json.decoder import scanstring

import numpy as np

from mlxtune.objectives import rewards as reward_fns

_DECODER = json.JSONDecoder()
_WS = " \t\n\r"


def value_spans(text: str) -> dict[str, tuple[int, int]]:
    """key -> (start, end) character span of each top-level value, where the text (less
    surrounding whitespace) is one JSON object; else {}. A repeated key keeps its last
    value, as json.loads does."""
    i = _skip(text, 0)
    if i >= len(text) or text[i] != "{":
        return {}
    try:
        obj, end = _DECODER.raw_decode(text, i)
    except ValueError:
        return {}
    if not isinstance(obj, dict) or text[end:].strip(_WS):
        return {}
    spans, j = {}, _skip(text, i + 1)
    while text[j] != "}":
        key, j = scanstring(text, j + 1)
        j = _skip(text, _skip(text, j) + 1)  # past the colon
        _, end = _DECODER.raw_decode(text, j)
        spans[key] = (j, end)
        j = _skip(text, end)
        if text[j] == ",":
            j = _skip(text, j + 1)
    return spans


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def token_ends(tokenizer, ids: list[int], text: str) -> list[int]:
    """The character of `text` (the ids decoded) that each token ends at: the length of
    the decoded prefix, clipped to the text and made non-decreasing (a prefix that ends
    inside a multi-byte character decodes to a replacement character)."""
    ends, last = [], 0
    for t in range(len(ids)):
        last = max(last, min(len(tokenizer.decode(ids[:t + 1])), len(text)))
        ends.append(last)
    return ends


def credits(text: str, reference: str | None, lists: str) -> dict[str, float] | None:
    """Each reference field's credit for a completion (field_match's per field); None
    where the reference is not a JSON object (field_match does not apply)."""
    ref = reward_fns._parse(reference)
    if not isinstance(ref, dict) or not ref:
        return None
    return reward_fns.field_credits(reward_fns._parse(text), ref, lists)


def token_advantages(tokenizer, texts: list[str], token_ids: list[list[int]],
                     references: list[str | None], field_match: np.ndarray,
                     total: np.ndarray, completion_adv: np.ndarray, weight: float,
                     lists: str, group: int, scale: str, batch_std: float
                     ) -> tuple[list[np.ndarray], list[dict[str, float]]]:
    """Per completion (rows of `group` consecutive completions of one prompt): the
    advantage of each of its tokens (len(token_ids[i]); the caller adds the stop token
    with the completion's advantage), and its fields' advantages (module docstring).
    field_match: the reward's column (NaN where it did not apply), total: the weighted
    sums, completion_adv: the completions' own advantages, batch_std: the totals' std over
    the whole batch (scale batch)."""
    from mlxtune.objectives.grpo import STD_EPS

    n = len(texts)
    per_token = [np.full(len(ids), completion_adv[i], np.float64)
                 for i, ids in enumerate(token_ids)]
    per_field: list[dict[str, float]] = [{} for _ in range(n)]
    for g in range(0, n, group):
        rows = range(g, g + group)
        got = [credits(texts[i], references[i], lists) for i in rows]
        if got[0] is None or any(np.isnan(field_match[i]) for i in rows):
            continue
        other = np.array([total[i] - weight * field_match[i] for i in rows])
        for key in got[0]:
            r = other + weight * np.array([c[key] for c in got])
            a = r - r.mean()
            if scale == "group":
                a = a / (r.std(ddof=1) + STD_EPS)
            elif scale == "batch":
                a = a / (batch_std + STD_EPS)
            for j, i in enumerate(rows):
                per_field[i][key] = float(a[j])
        for i in rows:
            spans = {k: s for k, s in value_spans(texts[i]).items() if k in per_field[i]}
            if not spans:
                continue
            start = 0
            for t, end in enumerate(token_ends(tokenizer, token_ids[i], texts[i])):
                for key, (a0, a1) in spans.items():
                    if start < a1 and end > a0:  # the token overlaps the value
                        per_token[i][t] = per_field[i][key]
                        break
                start = end
    return per_token, per_field


def field_match_entry(rewards) -> tuple[int, float, str]:
    """(column, weight, lists) of the one field_match reward of objective.rewards."""
    for j, e in enumerate(rewards.entries):
        if e.fn is reward_fns.field_match:
            return j, e.weight, e.options.get("lists", "exact")
    raise ValueError("objective.advantages: fields needs a field_match reward")
