"""The runtime: one MoE layer's decode step, and everything that brings its experts in.

step.Engine (route -> predict -> fetch -> FFN -> combine), prefetch.Prefetcher (the only mover of expert bytes),
workers (the thread, loader-process and CUDA backends behind one interface), slots.SlotPool (the resident
tier), experts (transformers' experts class without parameters), hooks (layer-entry hooks for predictors),
stats, tracer.
"""
from offload.engine.step import Engine

__all__ = ["Engine"]
