"""Cost model: what fits on a card and how fast batch-1 decode can go, from shapes and bandwidths alone.

Every number here is a roofline: time = bytes / bandwidth, no kernel or scheduling overheads, so a
projection is a ceiling that real systems reach ~60-70% of (anchors-systems.md 4.5). The arithmetic
follows docs/background.md "The physical limits" and research/anchors-systems.md sections 4.1-4.5:

  expert bytes     = 3 x hidden x expert_intermediate x bits_per_weight / 8   (gate, up, down)
  bytes per token  = (1 - h) x MoE layers x top-k x expert bytes              (misses cross the link)
  stream misses    t = (non-expert + active experts) / GPU bandwidth + miss bytes / link bandwidth
  compute on CPU   t = (non-expert + cached active experts) / GPU bandwidth + miss bytes / RAM bandwidth

Pure Python except `measure_local`, which times torch on this machine. Units: bytes and bytes/s, 1 GB = 1e9.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

GB = 1e9


# --- model shapes --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int                 # decoder layers
    moe_layers: int             # layers with routed experts
    experts: int                # routed experts per MoE layer
    top_k: int
    hidden: int
    expert_intermediate: int    # one expert's intermediate size
    non_expert_params: float    # attention, embeddings, routers, shared experts, dense MLPs
    kv_bytes_per_token: int = 0  # bf16 KV cache (MLA: the compressed latent)

    def __post_init__(self) -> None:
        assert 0 < self.moe_layers <= self.layers, f"{self.name}: moe_layers {self.moe_layers} of {self.layers}"
        assert 0 < self.top_k <= self.experts, f"{self.name}: top_k {self.top_k} of {self.experts} experts"

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.expert_intermediate

    @property
    def total_experts(self) -> int:
        return self.moe_layers * self.experts

    @property
    def active_experts(self) -> int:
        """Experts each decoded token uses (MoE layers x top-k)."""
        return self.moe_layers * self.top_k

    @classmethod
    def from_config(cls, config: dict, name: str | None = None) -> ModelShape:
        """Shape of a Hugging Face `config.json` (as a dict); non-expert params estimated from the layer shapes."""
        c = config.get("text_config", config)
        get = lambda *keys, default=None: next((c[k] for k in keys if c.get(k) is not None), default)  # noqa: E731
        layers, hidden = int(c["num_hidden_layers"]), int(c["hidden_size"])
        experts = get("num_local_experts", "num_experts", "n_routed_experts")
        top_k = get("num_experts_per_tok", "num_experts_per_token", "moe_topk")
        if experts is None or top_k is None:
            raise ValueError(f"{name or c.get('model_type', 'config')}: not a Mixture-of-Experts config "
                             "(no num_local_experts / num_experts / n_routed_experts, or no num_experts_per_tok)")
        inter = int(get("intermediate_size", default=4 * hidden))
        expert_inter = int(get("moe_intermediate_size", "expert_intermediate_size", default=inter))
        dense = int(get("first_k_dense_replace", default=0))
        sparse_step = int(get("decoder_sparse_step", "moe_layer_freq", default=1) or 1)
        mlp_only = set(get("mlp_only_layers", default=[]) or [])
        moe = [i for i in range(dense, layers) if (i + 1) % sparse_step == 0 and i not in mlp_only] \
            if sparse_step > 1 else [i for i in range(dense, layers) if i not in mlp_only]
        heads = int(c["num_attention_heads"])
        kv_heads = int(get("num_key_value_heads", default=heads))
        head_dim = int(get("head_dim", default=hidden // heads))
        vocab = int(c.get("vocab_size", 32000))
        if c.get("kv_lora_rank"):  # MLA (DeepSeek-V2/V3)
            rope, nope, v = int(c["qk_rope_head_dim"]), int(c["qk_nope_head_dim"]), int(c["v_head_dim"])
            q_lora, kv_lora = c.get("q_lora_rank"), int(c["kv_lora_rank"])
            q = hidden * q_lora + q_lora * heads * (nope + rope) if q_lora else hidden * heads * (nope + rope)
            attn = q + hidden * (kv_lora + rope) + kv_lora * heads * (nope + v) + heads * v * hidden
            kv = (kv_lora + rope) * 2 * layers
        else:
            attn = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
            kv = 2 * kv_heads * head_dim * 2 * layers
        shared = int(get("n_shared_experts", default=0) or 0) * 3 * hidden * expert_inter
        shared += 3 * hidden * int(get("shared_expert_intermediate_size", default=0) or 0)
        embed = vocab * hidden * (1 if c.get("tie_word_embeddings") else 2)
        non_expert = (embed + layers * attn + len(moe) * (hidden * int(experts) + shared)
                      + (layers - len(moe)) * 3 * hidden * inter)
        return cls(name or c.get("model_type", "model"), layers, len(moe), int(experts), int(top_k), hidden,
                   expert_inter, float(non_expert), kv)


# Real shapes from the HF config.json files; non-expert params from anchors-systems.md 4.2.
PRESETS: dict[str, ModelShape] = {s.name: s for s in (
    ModelShape("Mixtral-8x7B", 32, 32, 8, 2, 4096, 14336, 1.6e9, 32 * 8 * 128 * 2 * 2),
    ModelShape("Mixtral-8x22B", 56, 56, 8, 2, 6144, 16384, 5.7e9, 56 * 8 * 128 * 2 * 2),
    ModelShape("Qwen3-30B-A3B", 48, 48, 128, 8, 2048, 768, 1.5e9, 48 * 4 * 128 * 2 * 2),
    ModelShape("Qwen3-235B-A22B", 94, 94, 128, 8, 4096, 1536, 8e9, 94 * 4 * 128 * 2 * 2),
    ModelShape("gpt-oss-120b", 36, 36, 128, 4, 2880, 2880, 2.1e9, 36 * 8 * 64 * 2 * 2),
    ModelShape("DeepSeek-V2-Lite", 27, 26, 64, 6, 2048, 1408, 1.3e9, 27 * (512 + 64) * 2),
    ModelShape("DeepSeek-V3", 61, 58, 256, 8, 7168, 2048, 17e9, 61 * (512 + 64) * 2),
)}


def preset(name: str) -> ModelShape:
    by_lower = {k.lower(): v for k, v in PRESETS.items()}
    if name.lower() not in by_lower:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return by_lower[name.lower()]


# --- formats -------------------------------------------------------------------------------------
def bits_per_weight(bits: int | str = 4, group: int = 128, scale_bits: int = 16) -> float:
    """Stored bits per weight including scales: int4 g128 = 4 + 16/128 = 4.125; mxfp4 = 4.25; 16 = bf16."""
    if bits in ("mxfp4", "MXFP4"):
        return 4.25  # 4-bit e2m1 + one 8-bit scale per 32
    if bits in ("ternary",):
        return 2.0 + scale_bits / group  # packed 2-bit codes; lz4 shrinks them further (not modelled)
    bits = int(bits)
    if bits >= 16:
        return float(bits)
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 16, 8, 4, 3, 2, 'mxfp4' or 'ternary', got {bits!r}")
    return bits + scale_bits / group


def expert_bytes(shape: ModelShape, bits: int | str = 4) -> float:
    return shape.expert_params * bits_per_weight(bits) / 8


def non_expert_bytes(shape: ModelShape, bits: int | str = 4) -> float:
    """bf16 when the non-expert part is small (<= 2.5 B params), else quantized like the experts (4.4)."""
    if shape.non_expert_params <= 2.5e9:
        return shape.non_expert_params * 2
    return shape.non_expert_params * bits_per_weight(bits) / 8


def bytes_per_token(shape: ModelShape, hit_rate: float, bits: int | str = 4) -> float:
    """Expert bytes that must cross the link per decoded token: (1 - h) x MoE layers x top-k x expert bytes."""
    if not 0.0 <= hit_rate <= 1.0:
        raise ValueError(f"hit rate must be in [0, 1], got {hit_rate}")
    return (1.0 - hit_rate) * shape.active_experts * expert_bytes(shape, bits)


# --- machines ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    name: str
    vram: float                 # bytes on the compute device
    gpu_bw: float               # device memory bandwidth (reads of resident weights)
    link_bw: float              # host -> device, pinned (what streaming misses gets)
    pageable_bw: float          # host -> device from pageable memory (no overlap possible)
    ram_bw: float               # effective RAM bandwidth for CPU expert compute
    disk_bw: float = 5 * GB     # NVMe, for misses that also miss RAM
    reserve: float = 3 * GB     # CUDA context, KV cache, activations, workspace (4.4)
    note: str = ""

    def __post_init__(self) -> None:
        for f in ("vram", "gpu_bw", "link_bw", "pageable_bw", "ram_bw", "disk_bw"):
            assert getattr(self, f) > 0, f"{self.name}: {f} must be positive"


MACHINES: dict[str, Machine] = {m.name: m for m in (
    Machine("rtx3090", 24 * GB, 936 * GB, 24 * GB, 14 * GB, 40 * GB, note="PCIe 4.0 x16, dual-channel DDR4-3200"),
    Machine("rtx4090", 24 * GB, 1008 * GB, 24 * GB, 14 * GB, 70 * GB, note="PCIe 4.0 x16, dual-channel DDR5-6000"),
    Machine("rtx4090-pcie5", 24 * GB, 1008 * GB, 50 * GB, 25 * GB, 70 * GB, note="PCIe 5.0 x16, dual-channel DDR5"),
)}


def machine(name: str) -> Machine:
    if name == "local":
        return measure_local()
    if name not in MACHINES:
        raise ValueError(f"unknown machine {name!r}; choose one of: {', '.join([*MACHINES, 'local'])}")
    return MACHINES[name]


def measure_local(seconds: float = 0.3, threads: int = 1) -> Machine:
    """A profile of this machine's CPU engine: memcpy bandwidth (a slot fill from RAM) and bf16 GEMV
    bandwidth (weights streamed through one token's matmul), each timed for about `seconds`."""
    import psutil
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
        dst = torch.empty_like(src)
        copy = _rate(lambda: dst.copy_(src), src.numel(), seconds)
        w = torch.randn(4096, 4096, dtype=torch.bfloat16)  # 32 MiB, larger than any cache
        x = torch.randn(1, 4096, dtype=torch.bfloat16)
        gemv = _rate(lambda: torch.nn.functional.linear(x, w), w.numel() * 2, seconds)
    finally:
        torch.set_num_threads(old)
    return Machine("local", float(psutil.virtual_memory().available), gemv, copy, copy, gemv, reserve=0.0,
                   note=f"measured: memcpy {copy / GB:.1f} GB/s, bf16 GEMV {gemv / GB:.1f} GB/s, {threads} thread(s)")


def _rate(fn, nbytes: int, seconds: float) -> float:
    fn()  # warm up
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or n < 3:
        fn()
        n += 1
    return n * nbytes / elapsed


# --- what fits -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fit:
    non_expert_bytes: float
    kv_bytes: float
    cache_bytes: float          # left for expert slots
    expert_bytes: float
    slots: int
    total_experts: int
    moe_layers: int

    @property
    def fraction(self) -> float:
        return min(1.0, self.slots / self.total_experts)

    @property
    def slots_per_layer(self) -> float:
        return min(self.slots, self.total_experts) / self.moe_layers


def fit(shape: ModelShape, mach: Machine, bits: int | str = 4, context: int = 0) -> Fit:
    """Expert slots left on `mach` after the non-expert weights, `mach.reserve` and a KV cache of `context` tokens."""
    ne = non_expert_bytes(shape, bits)
    kv = float(shape.kv_bytes_per_token * context)
    e = expert_bytes(shape, bits)
    cache = max(0.0, mach.vram - ne - kv - mach.reserve)
    return Fit(ne, kv, cache, e, min(shape.total_experts, int(cache // e)), shape.total_experts, shape.moe_layers)


# --- decode speed --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Projection:
    model: str
    machine: str
    bits: str
    hit_rate: float
    bytes_per_token: float      # expert bytes missing the cache, per token
    stream_tok_s: float         # misses copied over the link, computed on the GPU
    cpu_tok_s: float            # misses computed on the CPU from RAM
    link_ceiling_tok_s: float   # link bandwidth / bytes per token alone (the doc's ceiling)

    @property
    def best(self) -> str:
        return "stream" if self.stream_tok_s >= self.cpu_tok_s else "cpu"

    @property
    def best_tok_s(self) -> float:
        return max(self.stream_tok_s, self.cpu_tok_s)


def project(shape: ModelShape, mach: Machine, hit_rate: float, bits: int | str = 4, link: str = "pinned",
            cpu_hit_rate: float | None = None) -> Projection:
    """Batch-1 decode ceilings at cache hit rate `hit_rate`. link: pinned, pageable or disk (misses read from NVMe).

    cpu_hit_rate: the GPU hit rate of the CPU-compute design (default `hit_rate`). Computing misses on the
    CPU moves no bytes, so its GPU set is static (Fiddler's hot set) and usually hits less than a dynamic
    cache; per missed byte, RAM (40-70 GB/s) beats the link (24 GB/s), so at equal hit rates it always wins."""
    links = {"pinned": mach.link_bw, "pageable": mach.pageable_bw, "disk": min(mach.link_bw, mach.disk_bw)}
    if link not in links:
        raise ValueError(f"link must be one of {', '.join(links)}, got {link!r}")
    miss = bytes_per_token(shape, hit_rate, bits)
    active = shape.active_experts * expert_bytes(shape, bits)
    ne = non_expert_bytes(shape, bits)
    t_stream = (ne + active) / mach.gpu_bw + miss / links[link]        # demand loads, no overlap
    cpu_miss = miss if cpu_hit_rate is None else bytes_per_token(shape, cpu_hit_rate, bits)
    t_cpu = (ne + active - cpu_miss) / mach.gpu_bw + cpu_miss / mach.ram_bw  # the CPU reads each missed expert once
    ceiling = links[link] / miss if miss else float("inf")
    return Projection(shape.name, mach.name, str(bits), hit_rate, miss, 1 / t_stream, 1 / t_cpu, ceiling)


def crossover_hit_rate(mach: Machine) -> float:
    """Hit rate above which streaming misses beats computing every expert on the CPU (llama.cpp --cpu-moe,
    no GPU expert cache): 1 - link / RAM bandwidth (background.md: ~0.64 on DDR5)."""
    return max(0.0, 1.0 - mach.link_bw / mach.ram_bw)


def cpu_engine_tok_s(shape: ModelShape, local: Machine, hit_rate: float, bytes_per_weight: float = 2.0,
                     store_bw: float | None = None) -> float:
    """This project's CPU engine on `local` (from `measure_local`): every weight read once by a GEMV at
    `local.gpu_bw` (its bf16 GEMV rate), plus each miss copied into a slot at `local.link_bw` (or read
    from the disk store at `store_bw`). A ceiling: per-layer Python overheads are not modelled."""
    weights = (shape.non_expert_params + shape.active_experts * shape.expert_params) * bytes_per_weight
    miss = (1 - hit_rate) * shape.active_experts * shape.expert_params * bytes_per_weight
    t = weights / local.gpu_bw + miss / local.link_bw + (miss / store_bw if store_bw else 0.0)
    return 1 / t


# The anchors' published numbers (docs/background.md, research/anchors-systems.md 2), as their authors report them.
ANCHORS: list[tuple[str, str, str, str]] = [
    ("mixtral-offloading", "Mixtral-8x7B", "2.1-3.1 tok/s", "T4..A100, HQQ 2/3-bit experts, per-layer LRU"),
    ("accelerate device_map=auto", "Mixtral-8x7B", "0.66-1.39 tok/s", "naive layer offload"),
    ("Fiddler", "Mixtral-8x7B", ">3 tok/s", "bf16, one 24 GB GPU, CPU computes misses"),
    ("MoE-Infinity", "Mixtral-8x7B", "1.36 tok/s (0.735 s/tok)", "A5000, fp16"),
    ("MoE-Infinity", "Qwen3-30B-A3B", "6.7 tok/s (0.150 s/tok)", "A5000, fp16"),
    ("llama.cpp --cpu-moe", "gpt-oss-120b", "~25 tok/s", "8 GB GPU, DDR5, experts computed on CPU"),
    ("llama.cpp", "Mixtral-8x7B", "24 tok/s", "Q4 on a 3090, most layers on GPU"),
    ("kTransformers", "DeepSeek-V3", "9-14 tok/s", "Q4, server RAM, AMX"),
]


def with_vram(mach: Machine, vram_gb: float) -> Machine:
    return replace(mach, vram=vram_gb * GB, name=f"{mach.name}-{vram_gb:g}GB")


__all__ = ["ANCHORS", "Fit", "GB", "MACHINES", "Machine", "ModelShape", "PRESETS", "Projection", "bits_per_weight",
           "bytes_per_token", "cpu_engine_tok_s", "crossover_hit_rate", "expert_bytes", "fit", "machine",
           "measure_local", "non_expert_bytes", "preset", "project", "with_vram"]
