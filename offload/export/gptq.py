"""GPTQ (AutoGPTQ / GPTQModel checkpoint format, `checkpoint_format: gptq`): our int4 and int8 experts.

Spec (per linear, W [N, K], y = x @ W.T):
  qweight int32 [K * bits / 32, N]  codes packed along K, element k at bit (k * bits) % 32
  qzeros  int32 [K / G, N * bits / 32]  zero point minus one (the GPTQ "v1" convention loaders undo), along N
  scales  [K / G, N]
  g_idx   int32 [K]  group of each input feature (k // G: no activation reordering)
  w = (q - zero_point) * scale

int8 is exact: ours is symmetric per output row (w = c * scale, c in -127..127), which is GPTQ 8-bit with
group_size -1, q = c + 128 and zero point 128.

int4 is not: ours is w = (c - 8) * scale + zero with a float zero per group, GPTQ's zero point is an integer,
so zero_point = 8 - zero / scale (generally not an integer) is rounded to the nearest integer in 1..15 (a zero
point of 0 is not representable in the v1 convention: loaders add one to the stored nibble) and the codes are
re-rounded against it: c' = clamp(round(w / scale) + zero_point, 0, 15), the nearest point on the grid GPTQ
holds with our scale. Where the zero point needs no clamping that keeps every code (c' = c) and moves each group
by at most half a step (scale / 2); the exporter reports the change. Scales stay bf16, our stored values (loaders
cast them to the model dtype).

Served by vLLM's `moe_wna16` MoE method (`--quantization moe_wna16`): its GPTQ fallback without that flag reads
MoE experts as symmetric and would drop the zero points.
"""
from __future__ import annotations

import torch

from offload.export import Encoded, ExportFormat, QMatrix, pack_le
from offload.formats.quant import QFormat


class GPTQ(ExportFormat):
    name = "gptq"

    def refusal(self, fmt: QFormat) -> str | None:
        if fmt.kind in ("int4", "int8"):
            return None
        return (f"GPTQ holds int4 and int8 experts, not {fmt} (vLLM and SGLang have no {fmt.kind} kernels); "
                f"reconvert the store with --bits int4-g128 (or int4-g32, int4-g64, int8)")

    def encode(self, m: QMatrix) -> Encoded:
        N, K = m.shape
        if m.fmt.kind == "int8":
            q = (m.codes.to(torch.int16) + 128).to(torch.uint8)                   # 1..255
            zp = torch.full((1, N), 128, dtype=torch.int16)
            scales = m.scale.view(1, N)
            g_idx = torch.zeros(K, dtype=torch.int32)
            weight = m.dequantize()
            bits = 8
        else:
            G = m.fmt.group_size
            s = m.scale.float()                                                   # [N, K/G]
            zp = (8 - m.zero.float() / s).round_().clamp_(1, 15)                  # [N, K/G]
            w = m.dequantize().view(N, K // G, G)
            qf = (w / s[..., None]).round_().add_(zp[..., None]).clamp_(0, 15)
            weight = ((qf - zp[..., None]) * s[..., None]).view(N, K)
            q = qf.view(N, K).to(torch.uint8)
            zp, scales = zp.t().to(torch.int16), m.scale.t()
            g_idx = torch.arange(K, dtype=torch.int32) // G
            bits = 4
        return Encoded({"qweight": pack_le(q, bits).t().contiguous(),
                        "qzeros": pack_le((zp - 1).to(torch.uint8), bits),
                        "scales": scales.contiguous(),
                        "g_idx": g_idx}, weight)

    def quantization_config(self, fmt: QFormat, expert_regex: str) -> dict:
        return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": fmt.bits,
                "group_size": fmt.group_size if fmt.kind == "int4" else -1,
                "sym": fmt.kind == "int8", "desc_act": False, "static_groups": False, "true_sequential": True,
                "damp_percent": 0.01, "lm_head": False,
                # gptqmodel / vLLM `dynamic`: modules matching a "-:" pattern are not quantized (dense here)
                "dynamic": {f"-:^(?!{expert_regex}).*": {}}}
