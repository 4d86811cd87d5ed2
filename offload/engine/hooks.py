"""Layer-entry hooks: the residual stream entering a decoder layer, before its attention, and what that
attention adds to it.

Lookahead-0 predictors read both (`Engine.enter`, `Engine.attended`). A forward pre-hook on transformers' own
decoder layer module, `<...>.layers.<i>`, sees the stream as its first positional argument or as
`hidden_states`, the name every architecture we load uses; a forward hook on its `self_attn` child sees the
attention output as the first value returned (every architecture we load names the child so).
"""
from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

_DECODER_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")


def decoder_layers(model: nn.Module) -> dict[int, nn.Module]:
    """{layer index: decoder layer module} of a transformers decoder (the `layers.<i>` modules)."""
    found = {}
    for name, module in model.named_modules():
        m = _DECODER_LAYER.search(name)
        if m is not None:
            found.setdefault(int(m.group(1)), module)
    return found


def hook_layer_entries(model: nn.Module, layers: list[int], fn: Callable[[int, torch.Tensor], None]) -> list:
    """Call fn(layer, hidden [B, T, H]) as each decoder layer in `layers` starts; returns the hook handles."""
    modules = decoder_layers(model)
    missing = sorted(set(layers) - set(modules))
    if missing:
        raise ValueError(f"no decoder layer module `layers.<i>` for layers {missing}")

    def hook(layer: int):
        def pre(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor):
                fn(layer, hidden)
        return pre

    return [modules[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in layers]


def hook_attention_outputs(model: nn.Module, layers: list[int], fn: Callable[[int, torch.Tensor], None]) -> list:
    """Call fn(layer, attention output [B, T, H]) as the `self_attn` of each decoder layer in `layers` returns;
    layers without one are skipped. Returns the hook handles."""
    modules = decoder_layers(model)

    def hook(layer: int):
        def post(module, args, out):
            out = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(out, torch.Tensor):
                fn(layer, out)
        return post

    return [modules[i].self_attn.register_forward_hook(hook(i)) for i in layers
            if i in modules and isinstance(getattr(modules[i], "self_attn", None), nn.Module)]
