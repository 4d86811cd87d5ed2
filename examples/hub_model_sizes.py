"""Disk, RAM and VRAM projections for gpt-oss-20b/120b and DeepSeek-V3/R1 as published (docs/real-models-hub.md).

    python examples/hub_model_sizes.py

Computed, not measured: the published configs' shapes (rebuilt with transformers' config classes), the packed
bytes of the hub formats (MXFP4: 4 bits + one e8m0 byte per 32; block FP8: 1 byte + one fp32 per 128 x 128),
and moe-offload's own record and slot sizes per store format (`RecordCodec`), KV cache per token from the
memory plan's formula. Non-expert weights are held at bf16 (DeepSeek's FP8 projections are decoded at load).
"""
from __future__ import annotations

import math

import torch
import transformers as tf

from offload.formats.record import RecordCodec, format_rule
from offload.errors import OffloadError
from offload.store.layout import ExpertLayout, TensorSpec
from offload.plan import kv_bytes_per_token

GB = 1e9
CONTEXT = 4096

GPT_OSS = dict(hidden_size=2880, intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
               vocab_size=201088, num_experts_per_tok=4, tie_word_embeddings=False)
MODELS = {
    "gpt-oss-20b": tf.GptOssConfig(**GPT_OSS, num_hidden_layers=24, num_local_experts=32,
                                   layer_types=["sliding_attention", "full_attention"] * 12),
    "gpt-oss-120b": tf.GptOssConfig(**GPT_OSS, num_hidden_layers=36, num_local_experts=128,
                                    layer_types=["sliding_attention", "full_attention"] * 18),
    "DeepSeek-V3/R1": tf.DeepseekV3Config(),  # the defaults are DeepSeek-V3's published config
}
FORMATS = (None, "int8", "int4-g128", "int4-g64", "int4-g32")


def expert_layout(c) -> tuple[ExpertLayout, bool]:
    """moe-offload's dense record of one expert (model dtype bf16) and whether it is transposed (GPT-OSS)."""
    if c.model_type == "gpt_oss":
        H, inter = c.hidden_size, c.intermediate_size
        return ExpertLayout((TensorSpec("gate_up", (H, 2 * inter), torch.bfloat16),
                             TensorSpec("down", (inter, H), torch.bfloat16),
                             TensorSpec("gate_up_bias", (2 * inter,), torch.bfloat16),
                             TensorSpec("down_bias", (H,), torch.bfloat16))), True
    H, inter = c.hidden_size, c.moe_intermediate_size
    return ExpertLayout((TensorSpec("gate_up", (2 * inter, H), torch.bfloat16),
                         TensorSpec("down", (H, inter), torch.bfloat16))), False


def hub_expert_bytes(c) -> int:
    """One expert's bytes in the published checkpoint."""
    if c.model_type == "gpt_oss":
        H, inter = c.hidden_size, c.intermediate_size
        params = 2 * inter * H + H * inter
        return params // 2 + params // 32 + 2 * (2 * inter + H)  # e2m1 codes, e8m0 scales, bf16 biases
    H, inter = c.hidden_size, c.moe_intermediate_size
    blocks = 3 * math.ceil(inter / 128) * math.ceil(H / 128)
    return 3 * inter * H + 4 * blocks


def non_expert_params(c) -> int:
    """Everything transformers loads: embeddings, lm_head, attention, routers, norms, dense and shared MLPs."""
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(c)
    return sum(p.numel() for n, p in model.named_parameters() if ".experts." not in n)


def moe_layers(c) -> int:
    return c.num_hidden_layers - getattr(c, "first_k_dense_replace", 0)


def experts_total(c) -> int:
    return moe_layers(c) * (getattr(c, "num_local_experts", None) or c.n_routed_experts)


def main() -> None:
    print("| model | format | one expert | all experts (disk store / checkpoint) | RAM slot (CPU) | "
          "VRAM slot (GPU, dense bf16) | one token's experts |")
    print("|---|---|---|---|---|---|---|")
    extra = []
    for name, c in MODELS.items():
        layout, transposed = expert_layout(c)
        n = experts_total(c)
        k = c.num_experts_per_tok
        hub = hub_expert_bytes(c)
        hub_fmt = "MXFP4 (hub)" if c.model_type == "gpt_oss" else "block FP8 (hub)"
        print(f"| {name} | {hub_fmt}, store=ram | {hub / 2**20:.1f} MiB | {n * hub / GB:.1f} GB | "
              f"{layout.nbytes / 2**20:.1f} MiB (decoded) | {layout.nbytes / 2**20:.1f} MiB | "
              f"{moe_layers(c) * k * hub / GB:.2f} GB |")
        for fmt in FORMATS:
            if fmt is None:
                record = slot = layout.nbytes
            else:
                codec = RecordCodec(layout, format_rule(fmt), transposed, torch.device("cpu"))
                try:
                    record, slot = codec.record_bytes, codec.slot_bytes
                except OffloadError:  # gpt-oss's 2880 inputs are no multiple of 128
                    print(f"| {name} | {fmt}, store=disk | not possible: inputs {c.hidden_size} | | | | |")
                    continue
            print(f"| {name} | {fmt or 'bf16'}, store=disk | {record / 2**20:.1f} MiB | {n * record / GB:.1f} GB | "
                  f"{slot / 2**20:.1f} MiB | {layout.nbytes / 2**20:.1f} MiB | "
                  f"{moe_layers(c) * k * record / GB:.2f} GB |")
        ne = non_expert_params(c)
        kv = kv_bytes_per_token(c, torch.bfloat16)
        extra.append(f"| {name} | {moe_layers(c)} x {n // moe_layers(c)} = {n} | top-{k} | {ne / 1e9:.2f} B -> "
                     f"{2 * ne / GB:.1f} GB | {kv / 2**10:.0f} KiB -> {kv * CONTEXT / GB:.2f} GB |")
    print()
    print(f"| model | experts | routed per token | non-expert params -> bf16 bytes | KV cache per token -> at "
          f"{CONTEXT} tokens |")
    print("|---|---|---|---|---|")
    print("\n".join(extra))


if __name__ == "__main__":
    main()
