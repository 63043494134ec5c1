"""Replacing a function that an mlx_lm model module imported by name.

mlx_lm's model modules import shared helpers by name (`scaled_dot_product_attention`,
`swiglu`), so mlxtune routes a model through its own versions by replacing that name in
the model's own module; the architecture code is untouched. The replacement keeps the
original as `_mlxtune_original` (for the paths it does not cover, and for tests), and
routing twice wraps once.
"""

from __future__ import annotations

import sys
from typing import Callable

import mlx.nn as nn


def route(model: nn.Module, name: str, wrap: Callable[[Callable], Callable]) -> bool:
    """Replace `name` in the module that defines type(model) by wrap(original), once.
    Returns whether that module has the function (and so is covered)."""
    module = sys.modules.get(type(model).__module__)
    fn = getattr(module, name, None)
    if fn is None:
        return False
    if not hasattr(fn, "_mlxtune_original"):
        routed = wrap(fn)
        routed._mlxtune_original = fn
        setattr(module, name, routed)
    return True
