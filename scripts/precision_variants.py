"""The packaged SmolLM2 (Q4_1 GGUF) as mlx-lm folders in other precisions, for
`mlxtune compare`: every weight dequantized to float32 (the same function as shipped), and
that float32 model re-quantized to MLX's 8-bit affine format (group size 64).

    .venv/bin/python scripts/precision_variants.py runs/variants
    .venv/bin/mlxtune compare configs/quickstart.yaml --models smollm2-135m-instruct \\
        runs/variants/smollm2-135m-f32 runs/variants/smollm2-135m-q8 --limit 40

No original (unquantized) SmolLM2 weights can be had offline here, so "float32" is the
Q4_1 model's own weights, exactly; "8-bit" adds 8-bit rounding on top of them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace


def main(out: Path) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map
    from mlx_lm.utils import save_config, save_model

    from mlxtune.export.mlx_fused import GROUP_SIZE, fuse
    from mlxtune.models import packaged_path
    from mlxtune.models.gguf import load_gguf

    for name, bits in (("smollm2-135m-f32", None), ("smollm2-135m-q8", 8)):
        model, tokenizer, config = load_gguf(packaged_path("smollm2-135m-instruct"))
        fuse(model, SimpleNamespace(pairs=[]))  # no adapter: dequantize every layer
        model.update(tree_map(lambda p: p.astype(mx.float32)
                              if mx.issubdtype(p.dtype, mx.floating) else p,
                              model.parameters()))
        for key in ("quantization", "quantization_config", "quantization_formats"):
            config.pop(key, None)
        if bits:
            nn.quantize(model, group_size=GROUP_SIZE, bits=bits,
                        class_predicate=lambda _, m: hasattr(m, "to_quantized")
                        and m.weight.shape[-1] % GROUP_SIZE == 0)
            config["quantization"] = {"group_size": GROUP_SIZE, "bits": bits,
                                      "mode": "affine"}
        mx.eval(model.parameters())
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        save_model(folder, model)
        save_config(dict(config), folder / "config.json")
        tokenizer.save_pretrained(str(folder))
        print(folder)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/variants"))
