"""Where each architecture keeps its experts: data, not subclasses. Adding a model is a few lines here.

Expert tensors are addressed by a regex over checkpoint tensor names. `roles` maps the name's last
group to a record tensor: per-expert checkpoints store `gate` and `up` separately (we concatenate them,
gate rows first, exactly as transformers' loader fuses them); fused checkpoints hold all experts of a
layer in one tensor and we slice expert `e` out with `get_slice(name)[e]`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from offload.errors import OffloadError


@dataclass(frozen=True)
class Arch:
    experts_class: str                  # transformers class we replace before construction
    pattern: str                        # regex over tensor names: groups (layer, expert, role) or (layer, role)
    roles: dict[str, str]               # name fragment -> record tensor (gate, up, gate_up, down, *_bias)
    num_experts: str = "num_local_experts"  # config attribute
    transposed: bool = False            # weights kept as [in, out] (x @ W) in memory, not [out, in]
    replicated_input: bool = False      # Llama-4: experts get every token for every expert, pre-scaled
    quantized_markers: tuple[str, ...] = field(default=())  # suffixes of packed expert tensors (offload.store.hub_formats)

    @property
    def fused(self) -> bool:
        return re.compile(self.pattern).groups == 2


_PER_EXPERT_W = r"layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w3|w2)\.weight$"
_PER_EXPERT_PROJ = r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"
_W_ROLES = {"w1": "gate", "w3": "up", "w2": "down"}
_PROJ_ROLES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

# transformers v5's in-memory layout, [E, 2I, H] / [E, H, I], for checkpoints saved without reverting the fusion
V5_FUSED = r"layers\.(\d+)\.(?:mlp|block_sparse_moe|feed_forward)\.experts\.(gate_up_proj|down_proj)$"
V5_FUSED_ROLES = {"gate_up_proj": "gate_up", "down_proj": "down"}

ARCHS: dict[str, Arch] = {
    "mixtral": Arch("MixtralExperts", _PER_EXPERT_W, _W_ROLES),
    "phimoe": Arch("PhimoeExperts", _PER_EXPERT_W, _W_ROLES),
    "qwen2_moe": Arch("Qwen2MoeExperts", _PER_EXPERT_PROJ, _PROJ_ROLES, num_experts="num_experts"),
    "qwen3_moe": Arch("Qwen3MoeExperts", _PER_EXPERT_PROJ, _PROJ_ROLES, num_experts="num_experts"),
    "olmoe": Arch("OlmoeExperts", _PER_EXPERT_PROJ, _PROJ_ROLES, num_experts="num_experts"),
    "deepseek_v2": Arch("DeepseekV2Experts", _PER_EXPERT_PROJ, _PROJ_ROLES, num_experts="n_routed_experts"),
    "deepseek_v3": Arch("DeepseekV3Experts", _PER_EXPERT_PROJ, _PROJ_ROLES, num_experts="n_routed_experts",
                        quantized_markers=("weight_scale_inv",)),
    "granitemoe": Arch("GraniteMoeExperts", r"layers\.(\d+)\.block_sparse_moe\.(input_linear|output_linear)\.weight$",
                       {"input_linear": "gate_up", "output_linear": "down"}),
    "gpt_oss": Arch("GptOssExperts", r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj|gate_up_proj_bias|down_proj_bias)$",
                    {"gate_up_proj": "gate_up", "down_proj": "down", "gate_up_proj_bias": "gate_up_bias",
                     "down_proj_bias": "down_bias"}, transposed=True, quantized_markers=("_blocks", "_scales")),
    "llama4_text": Arch("Llama4TextExperts", r"layers\.(\d+)\.feed_forward\.experts\.(gate_up_proj|down_proj)$",
                        {"gate_up_proj": "gate_up", "down_proj": "down"}, transposed=True, replicated_input=True),
}

# config attributes that mark a model as MoE, to tell "dense model" from "MoE we don't support yet"
_MOE_HINTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")


def arch_for(hf_config) -> Arch:
    """The Arch of a transformers config, or an OffloadError saying why the model can't be offloaded."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "llama4" and hasattr(hf_config, "text_config"):
        model_type = "llama4_text"
    if model_type in ARCHS:
        return ARCHS[model_type]
    supported = ", ".join(sorted(ARCHS))
    if not any(getattr(hf_config, h, None) for h in _MOE_HINTS):
        raise OffloadError(f"{model_type!r} is a dense model (no experts); moe-offload runs Mixture-of-Experts "
                           f"models: {supported}")
    raise OffloadError(f"MoE architecture {model_type!r} is not supported yet; supported: {supported} "
                       f"(adding one is a few lines in offload/store/arch.py)")
