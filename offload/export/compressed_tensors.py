"""compressed-tensors `pack-quantized` (llm-compressor's format): our int8 experts, exactly.

Spec (per linear, W [N, K]): weight_packed int32 [N, K * bits / 32] (codes + 2^(bits-1), element k at bit
(k * bits) % 32), weight_scale [N, 1] for channel strategy, weight_shape [N, K]; w = code * scale.

Our int8 is symmetric per output row with a bf16 scale: the `channel` scheme with symmetric 8-bit weights, the
same codes and the same scales, so the export dequantizes to our weights bit for bit.

Our int4 (asymmetric, a float zero per group) is refused: vLLM's compressed-tensors MoE methods (Marlin and
Triton WNA16) assert symmetric weights, and transformers' fused-experts loader passes no zero points, so an
asymmetric int4 export would load in none of them; GPTQ (sym=false) holds it, with integer zero points.
"""
from __future__ import annotations

import torch

from offload.export import Encoded, ExportFormat, QMatrix, pack_le
from offload.formats.quant import QFormat


class CompressedTensors(ExportFormat):
    name = "compressed-tensors"

    def refusal(self, fmt: QFormat) -> str | None:
        if fmt.kind == "int8":
            return None
        if fmt.kind == "int4":
            return (f"compressed-tensors MoE loaders (vLLM, transformers) take symmetric int4 only and this store's "
                    f"{fmt} has a float zero per group; export it with --format gptq, or reconvert with --bits int8 "
                    f"for compressed-tensors")
        return (f"compressed-tensors export holds int8 experts, not {fmt}; reconvert the store with --bits int8 (or "
                f"--bits int4-g128 and --format gptq)")

    def encode(self, m: QMatrix) -> Encoded:
        N, K = m.shape
        return Encoded({"weight_packed": pack_le((m.codes.to(torch.int16) + 128).to(torch.uint8), 8),
                        "weight_scale": m.scale.view(N, 1).contiguous(),
                        "weight_shape": torch.tensor([N, K], dtype=torch.int64)}, m.dequantize())

    def quantization_config(self, fmt: QFormat, expert_regex: str) -> dict:
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None,
                   "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}
        return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": [f"re:{expert_regex}"], "weights": weights,
                                              "input_activations": None, "output_activations": None,
                                              "format": "pack-quantized"}},
                "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": None,
                "sparsity_config": {}}
