"""The offloaded experts module: transformers' own experts class, minus its parameters.

`offloaded_class(orig)` subclasses the architecture's experts class (so its flags `is_transposed`,
`has_bias`, its `_apply_gate` and `act_fn` stay exactly as transformers defines them), drops every
parameter (so `from_pretrained` never reads an expert tensor) and routes `forward` to the engine.
`expert_ffn` is transformers' eager expert math, reading weights from a resident slot instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def offloaded_class(orig: type[nn.Module]) -> type[nn.Module]:
    def __init__(self, config, *args, **kwargs) -> None:
        orig.__init__(self, config, *args, **kwargs)
        self._parameters.clear()          # nothing left for from_pretrained to fill: experts are never materialized
        self._is_hf_initialized = True    # and nothing for _init_weights to touch
        self.layer_idx: int | None = None
        self.engine = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None) -> torch.Tensor:
        if self.engine is None:
            raise RuntimeError("offloaded experts used before OffloadedModel bound them to an engine")
        return self.engine.run_layer(self, hidden_states, top_k_index, top_k_weights)

    return type("Offloaded" + orig.__name__, (orig,), {"__init__": __init__, "forward": forward,
                                                        "__module__": __name__})


def expert_ffn(module: nn.Module, w: dict[str, torch.Tensor], x: torch.Tensor, linear=None) -> torch.Tensor:
    """One expert on tokens x [t, H] -> [t, H], the same ops in the same order as transformers' eager path.

    `linear(x, w, name)` computes x @ W.T for quantized records; None means dense weights in the slot.
    """
    transposed = getattr(module, "is_transposed", False)
    if linear is not None:
        y = linear(x, w, "gate_up")
    elif transposed:
        y = x @ w["gate_up"]                              # [t, 2I]
    else:
        y = F.linear(x, w["gate_up"])                     # [t, 2I]
    if getattr(module, "has_bias", False):
        y = y + w["gate_up_bias"]
    y = module._apply_gate(y) if hasattr(module, "_apply_gate") else _llama4_gate(module, y)  # [t, I]
    if linear is not None:
        y = linear(y, w, "down")
    elif transposed:
        y = y @ w["down"]                                 # [t, H]
    else:
        y = F.linear(y, w["down"])
    if getattr(module, "has_bias", False):
        y = y + w["down_bias"]
    return y


def _llama4_gate(module: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return up * module.act_fn(gate)
