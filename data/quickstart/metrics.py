"""A user metric for `mlxtune eval` on the quickstart task (eval.metric / --metric):
data/quickstart/metrics.py:field_accuracy.

Exact match gives no credit to an answer with five fields right and the date wrong; this
metric does: the fraction of the reference's fields whose values the prediction has equal.
An answer that is not a JSON object scores 0.
"""

import json


def field_accuracy(prediction: str, reference: str) -> float:
    expected = json.loads(reference)
    try:
        got = json.loads(prediction.strip())
    except ValueError:
        return 0.0
    if not isinstance(got, dict):
        return 0.0
    return sum(got.get(k, object()) == v for k, v in expected.items()) / len(expected)
