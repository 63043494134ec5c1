"""Fitted counts of mlxtune.memory.estimate: written by scripts/calibrate_memory.py --fit.

Each value multiplies one of estimate.features() (bytes of one array of that kind), so
it reads "how many such arrays MLX holds at the peak of a training step" (framework:
megabytes). Fitted on the `fit` part of the grid only, measured with MLX 0.32.4 on the
cpu backend (Linux x86_64); docs/memory.md checks them on the rest.
"""

COEFFICIENTS = {
    "saved_d": 1.146,
    "saved_qkv": 1.35,
    "saved_ffn": 4.315,
    "saved_lora": 0.462,
    "saved_att": 1.265,
    "ckpt_d": 1.0,
    "work_d": 14.258,
    "work_ffn": 5.519,
    "work_att": 0.0,
    "logits": 3.927,
    "logits_chunked": 4.189,
    "dequant_max": 1.694,
    "dequant_block": 0.0,
    "framework": 0.681,
    "reference": 1.0,
    "cpu_half_bytes": 4.04,
}

FITTED_ON = (
    "fit-b1-6l",
    "fit-b8-2l",
    "fit-base-2l",
    "fit-base-6l",
    "fit-bf16-2l",
    "fit-bf16-6l",
    "fit-chunked-2l",
    "fit-chunked-6l",
    "fit-chunked4-2l",
    "fit-ckpt-2l",
    "fit-ckpt-6l",
    "fit-ckpt-ffn1024-6l",
    "fit-ckpt-seq512-6l",
    "fit-ckpt-vocab32k-6l",
    "fit-d512-2l",
    "fit-d512-6l",
    "fit-ffn1024-2l",
    "fit-ffn1024-6l",
    "fit-headdim128-6l",
    "fit-kv4-6l",
    "fit-last2-6l",
    "fit-nf4-6l",
    "fit-odown-6l",
    "fit-orpo-6l",
    "fit-q4-2l",
    "fit-q4-6l",
    "fit-qv-6l",
    "fit-rank64-6l",
    "fit-seq1024-b1-6l",
    "fit-seq512-2l",
    "fit-seq512-6l",
    "fit-vocab32k-2l",
    "fit-vocab32k-6l",
    "fit-vocab512-6l",
)
