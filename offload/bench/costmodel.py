"""Cost model: what fits on a card and how fast batch-1 decode can go, from shapes and bandwidths alone.

Every number here is a roofline: time = bytes / bandwidth, no kernel or scheduling overheads, so a
projection is a ceiling that real systems reach ~60-70% of (the anchors' published numbers, `ANCHORS`):

  expert bytes     = 3 x hidden x expert_intermediate x bits_per_weight / 8   (gate, up, down)
  bytes per token  = (1 - h) x MoE layers x top-k x expert bytes              (misses cross the link)
  stream misses    t = (non-expert + active experts) / GPU bandwidth + miss bytes / link bandwidth
  compute on CPU   t = (non-expert + cached active experts) / GPU bandwidth + miss bytes / RAM bandwidth

Pure Python except `measure_local`, which times torch on this machine. Units: bytes and bytes/s, 1 GB = 1e9.
"""
from __future__ import annotations

import re
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
    vocab: int = 0              # 0: unknown (presets); used by the local CPU-engine model
    tied_embeddings: bool = False

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
                   expert_inter, float(non_expert), kv, vocab, bool(c.get("tie_word_embeddings")))

    @property
    def read_params_per_token(self) -> float:
        """Non-expert weights one decoded token reads: all of them except an untied input embedding
        table, of which it reads one row (the lm_head reads the whole [vocab, hidden] matrix)."""
        unread = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.non_expert_params - unread


# Real shapes from the HF config.json files; non-expert params counted from the same configs.
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
    named = re.fullmatch(r"int([2348])(?:-g(\d+))?", str(bits))  # the engine's names: int4-g32, int8
    if named:
        bits, group = int(named.group(1)), int(named.group(2) or group)
    if not str(bits).isdigit() or int(bits) not in (2, 3, 4, 8) and int(bits) < 16:
        raise ValueError(f"bits must be 16, 8, 4, 3, 2, a format like int4-g32, mxfp4 or ternary, got bits={bits!r}")
    bits = int(bits)
    if bits >= 16:
        return float(bits)
    return bits + scale_bits / group


def expert_bytes(shape: ModelShape, bits: int | str = 4) -> float:
    return shape.expert_params * bits_per_weight(bits) / 8


def non_expert_bytes(shape: ModelShape, bits: int | str = 4, dense_bits: int | None = None) -> float:
    """bf16 when the non-expert part is small (<= 2.5 B params), else quantized like the experts (4.4);
    with `dense_bits` (8 or 4), the linears at that width and the input embedding (vocab x hidden) in bf16."""
    if dense_bits is not None:
        embed = 0 if shape.tied_embeddings else shape.vocab * shape.hidden
        return embed * 2 + (shape.non_expert_params - embed) * bits_per_weight(dense_bits) / 8
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


def fit(shape: ModelShape, mach: Machine, bits: int | str = 4, context: int = 0,
        dense_bits: int | None = None) -> Fit:
    """Expert slots left on `mach` after the non-expert weights, `mach.reserve` and a KV cache of `context` tokens."""
    ne = non_expert_bytes(shape, bits, dense_bits)
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
    hybrid_tok_s: float = 0.0   # dynamic cache, each miss copied or computed on the CPU, whichever is faster

    @property
    def best(self) -> str:
        return "stream" if self.stream_tok_s >= self.cpu_tok_s else "cpu"

    @property
    def best_tok_s(self) -> float:
        return max(self.stream_tok_s, self.cpu_tok_s)


def project(shape: ModelShape, mach: Machine, hit_rate: float, bits: int | str = 4, link: str = "pinned",
            cpu_hit_rate: float | None = None, dense_bits: int | None = None,
            cpu_bw: float | None = None) -> Projection:
    """Batch-1 decode ceilings at cache hit rate `hit_rate`. link: pinned, pageable or disk (misses read from NVMe).

    cpu_hit_rate: the GPU hit rate of the CPU-compute design (default `hit_rate`). Computing misses on the
    CPU moves no bytes, so its GPU set is static (Fiddler's hot set) and usually hits less than a dynamic
    cache; per missed byte, RAM (40-70 GB/s) beats the link (24 GB/s), so at equal hit rates it always wins.
    cpu_bw: the CPU's expert GEMV rate in bytes/s (default the RAM roofline `mach.ram_bw`); a measured rate
    says what this CPU's kernels reach. The hybrid (`miss='auto'`) keeps the dynamic cache's hit rate and
    sends each missed byte down the faster path: the link, or the CPU's GEMV."""
    links = {"pinned": mach.link_bw, "pageable": mach.pageable_bw, "disk": min(mach.link_bw, mach.disk_bw)}
    if link not in links:
        raise ValueError(f"link must be one of {', '.join(links)}, got {link!r}")
    miss = bytes_per_token(shape, hit_rate, bits)
    active = shape.active_experts * expert_bytes(shape, bits)
    ne = non_expert_bytes(shape, bits, dense_bits)
    t_stream = (ne + active) / mach.gpu_bw + miss / links[link]        # demand loads, no overlap
    cpu_miss = miss if cpu_hit_rate is None else bytes_per_token(shape, cpu_hit_rate, bits)
    cpu = cpu_bw or mach.ram_bw
    t_cpu = (ne + active - cpu_miss) / mach.gpu_bw + cpu_miss / cpu  # the CPU reads each missed expert once
    # a copied miss also runs on the GPU; a CPU-computed one is done once the CPU has read it
    t_hybrid = (ne + active - miss) / mach.gpu_bw + miss * min(1 / links[link] + 1 / mach.gpu_bw, 1 / cpu)
    ceiling = links[link] / miss if miss else float("inf")
    return Projection(shape.name, mach.name, str(bits), hit_rate, miss, 1 / t_stream, 1 / t_cpu, ceiling,
                      1 / t_hybrid)


def crossover_hit_rate(mach: Machine) -> float:
    """Hit rate above which streaming misses beats computing every expert on the CPU (llama.cpp --cpu-moe,
    no GPU expert cache): 1 - link / RAM bandwidth (~0.64 for PCIe 4 against dual-channel DDR5)."""
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



# --- the CPU engine on this machine, calibrated --------------------------------------------------
@dataclass(frozen=True)
class LocalProfile:
    """Constants of this machine's CPU engine, each from a microbenchmark (`calibrate_local`), none
    from the model being predicted. Seconds and bytes/s."""
    gemv_bw: dict                # bytes/s of batch-1 GEMVs by weight format: bf16, int8, int4 (DRAM-sized matrices)
    store_bw: dict               # bytes/s of one record read by tier ("ram": the checkpoint store's read_into)
    token_s: float               # per token: generate bookkeeping, embedding, final norm, lm_head call, argmax
    layer_s: float               # per decoder layer, experts aside: norms, attention, router, engine bookkeeping
    expert_s: float              # per expert call (fetch on a hit, slot views, 2 GEMV calls, combine)
    load_s: float = 0.0          # per miss beyond reading its bytes: cache eviction and bookkeeping
    copy_bw: float = 0.0         # memcpy, for reference
    gemv_s: dict = None          # {(N, K): seconds} of one bf16 F.linear at the model's own shapes (realistic reuse)
    note: str = ""

    def describe(self) -> str:
        bw = ", ".join(f"{k} {v / GB:.1f}" for k, v in self.gemv_bw.items())
        st = ", ".join(f"{k} {v / GB:.2f}" for k, v in self.store_bw.items())
        shapes = "; GEMV us at the model's shapes: " + ", ".join(
            f"{n}x{k} {1e6 * v:.0f}" for (n, k), v in self.gemv_s.items()) if self.gemv_s else ""
        return (f"GEMV GB/s {bw}{shapes}; store read GB/s {st}; memcpy {self.copy_bw / GB:.1f} GB/s; overheads: "
                f"{1e3 * self.token_s:.2f} ms/token + {1e6 * self.layer_s:.0f} us/layer + {1e6 * self.expert_s:.0f} "
                f"us/expert + {1e6 * self.load_s:.0f} us/miss")


def local_decode_seconds(shape: ModelShape, prof: LocalProfile, hit_rate: float, fmt: str = "bf16",
                         tier: str = "ram", record_bytes: float | None = None, config: dict | None = None) -> float:
    """Seconds per decoded token of this project's CPU engine (batch 1):

      fixed        token_s + lm_head and other non-expert weights / bf16 GEMV bandwidth
      per layer    layers x layer_s
      per expert   active experts x (expert_s + expert bytes / GEMV bandwidth of `fmt`)
      per miss     (1 - h) x active experts x (record bytes / tier read bandwidth + load_s)

    record_bytes: what one miss reads (default: the expert's weights in `fmt`). config: the model's
    config.json; with it (and `prof.gemv_s` timed at its shapes) GEMVs cost their measured per-call time."""
    if not 0.0 <= hit_rate <= 1.0:
        raise ValueError(f"hit rate must be in [0, 1], got {hit_rate}")
    if fmt not in prof.gemv_bw or tier not in prof.store_bw:
        raise ValueError(f"no calibration for format {fmt!r} / tier {tier!r}: have {sorted(prof.gemv_bw)} / "
                         f"{sorted(prof.store_bw)}")
    bpw = {"bf16": 2.0, "fp16": 2.0, "fp32": 4.0, "int8": 1.0, "int4": 4.125 / 8}[fmt]
    e_bytes = shape.expert_params * bpw
    rec = e_bytes if record_bytes is None else record_bytes
    misses = (1.0 - hit_rate) * shape.active_experts
    plan = gemv_plan(config) if config is not None else None
    if plan and prof.gemv_s and all((n, k) in prof.gemv_s for _r, n, k, _c in plan):
        # per-call times measured at the model's own GEMV shapes; int experts scaled by the kernels' bandwidth
        scale = {"expert": prof.gemv_bw["bf16"] / prof.gemv_bw[fmt]}
        gemv = sum(c * prof.gemv_s[(n, k)] * scale.get(r, 1.0) for r, n, k, c in plan)
    else:  # bytes / bandwidth
        gemv = (shape.read_params_per_token * 2.0 / prof.gemv_bw["bf16"]
                + shape.active_experts * e_bytes / prof.gemv_bw[fmt])
    return (prof.token_s + gemv + shape.layers * prof.layer_s + shape.active_experts * prof.expert_s
            + misses * (rec / prof.store_bw[tier] + prof.load_s))


def gemv_plan(config: dict) -> list[tuple[str, int, int, float]]:
    """(role, N, K, calls per token) of every batch-1 matmul a decoded token makes: attention q/k/v/o,
    dense MLPs, routers, shared experts, top-k x routed experts (fused gate_up [2I, H], down [H, I]),
    lm_head. Empty for layouts it does not know (MLA): then bytes / bandwidth is used."""
    c = config.get("text_config", config)
    if c.get("kv_lora_rank"):
        return []
    shape = ModelShape.from_config(config)
    H, L, moe = shape.hidden, shape.layers, shape.moe_layers
    heads = int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    hd = int(c.get("head_dim") or H // heads)
    I, inter = shape.expert_intermediate, int(c.get("intermediate_size") or 4 * H)
    plan = [("dense", heads * hd, H, L), ("dense", kv * hd, H, 2 * L), ("dense", H, heads * hd, L),
            ("dense", shape.experts, H, moe), ("expert", 2 * I, H, shape.active_experts),
            ("expert", H, I, shape.active_experts), ("dense", shape.vocab or 32000, H, 1)]
    if L > moe:
        plan += [("dense", inter, H, 2 * (L - moe)), ("dense", H, inter, L - moe)]
    si = int(c.get("shared_expert_intermediate_size") or 0) + int(c.get("n_shared_experts") or 0) * I
    if si:
        plan += [("dense", si, H, 2 * moe), ("dense", H, si, moe)]
    return plan


def gemv_seconds(plan, ring_bytes: float, seconds: float = 0.05) -> dict:
    """{(N, K): seconds of one bf16 F.linear(x [1, K], W [N, K])}, cycling through copies of W that add up to
    `ring_bytes` (beyond the last-level cache: weights stream from DRAM; small: cache-resident)."""
    import torch
    import torch.nn.functional as F

    out = {}
    for _r, n, k, _c in plan:
        if (n, k) in out:
            continue
        copies = int(min(8192, max(2, ring_bytes // (n * k * 2))))
        x = torch.randn(1, k, dtype=torch.bfloat16)
        out[(n, k)] = _ring_call([torch.empty(n, k, dtype=torch.bfloat16).fill_(0.01) for _ in range(copies)],
                                 lambda w, x=x: F.linear(x, w), seconds)
    return out


def local_tok_s(shape: ModelShape, prof: LocalProfile, hit_rate: float, **kw) -> float:
    return 1.0 / local_decode_seconds(shape, prof, hit_rate, **kw)


def _per_call(fn, seconds: float, min_calls: int = 1) -> float:
    """Median-of-5 seconds per call of fn, about `seconds` in all (at least `min_calls` calls per run)."""
    import statistics

    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    n = max(min_calls, int(seconds / 5 / once))
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n)
    return statistics.median(runs)


def _ring_call(ws: list, fn, seconds: float) -> float:
    """Seconds per fn(w), w cycling through `ws` in a shuffled order (no stride the prefetcher could follow)."""
    import torch

    order = torch.randperm(len(ws), generator=torch.Generator().manual_seed(0)).tolist()
    it = iter(range(1 << 62))
    return _per_call(lambda: fn(ws[order[next(it) % len(ws)]]), seconds)


def gemv_bandwidths(seconds: float = 0.2) -> dict:
    """bytes/s of batch-1 matmuls over weights larger than the caches (a ring of 4096x4096 matrices):
    bf16 F.linear, int8 `_weight_int8pack_mm`, int4 `_weight_int4pack_mm_for_cpu` (group 128)."""
    import torch
    import torch.nn.functional as F

    N = K = 4096
    ring = DRAM_RING
    x = torch.randn(1, K, dtype=torch.bfloat16)
    out = {"bf16": N * K * 2 / _ring_call([torch.empty(N, K, dtype=torch.bfloat16).fill_(0.01)
                                            for _ in range(ring // (N * K * 2))],
                                           lambda w: F.linear(x, w), seconds)}
    try:
        s8 = torch.rand(N, dtype=torch.bfloat16)
        out["int8"] = N * K / _ring_call([torch.empty(N, K, dtype=torch.int8).fill_(3) for _ in range(ring // (N * K))],
                                         lambda w: torch._weight_int8pack_mm(x, w, s8), seconds)
    except (RuntimeError, AttributeError):
        pass
    G = 128
    try:
        qsz = torch.rand(K // G, N, 2, dtype=torch.bfloat16)
        out["int4"] = N * K * 4.125 / 8 / _ring_call(
            [torch.empty(N, K // 2, dtype=torch.uint8).fill_(0x35) for _ in range(ring // (N * K // 2))],
            lambda w: torch._weight_int4pack_mm_for_cpu(x, w, G, qsz), seconds)
    except (RuntimeError, AttributeError):
        pass
    return out


def store_read_seconds(store, keys, seconds: float = 0.2, slots: int = 4) -> float:
    """Seconds to read one record of `store` (its real `read_into`), cycling over `keys` into `slots`
    record buffers in turn, as misses land in different slots."""
    from offload.store.disk import aligned_buffer

    bufs = [aligned_buffer(store.buffer_bytes) for _ in range(slots)]
    keys = list(keys)
    it = iter(range(1 << 62))

    def read():
        i = next(it)
        store.read_into(keys[i % len(keys)], bufs[i % slots])

    return _per_call(read, seconds, min_calls=3)


DRAM_RING = 256 << 20  # bytes of weights a GEMV microbenchmark cycles through: far beyond any last-level cache
PROBE_PARAMS = 48e6  # largest probe (5 layers, all widths of the model) timed at the model's own width


def _probe_config(config: dict, layers: int, top_k: int, real_width: bool = False) -> dict:
    """The model's config.json with `layers` layers, top-k `top_k` and vocab 512: same architecture, experts
    and generate path. Toy width (hidden 64) makes a decode step all fixed overheads; `real_width` keeps
    the model's hidden and intermediate sizes, so the probe also pays what scales with width outside the
    GEMVs (norms, attention, activations, the GEMVs' own in-model cost beyond their microbenchmark)."""
    c = dict(config)
    small = {"vocab_size": 512} if real_width else {
        "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64, "expert_intermediate_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "first_k_dense_replace": 0,
        "mlp_only_layers": [], "decoder_sparse_step": 1, "q_lora_rank": None, "kv_lora_rank": 32,
        "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16}
    if real_width:
        small.update({"first_k_dense_replace": 0, "mlp_only_layers": [], "decoder_sparse_step": 1})
    for k, v in small.items():
        if k in c:
            c[k] = v
    c["num_hidden_layers"] = layers
    for k in ("num_experts_per_tok", "num_experts_per_token", "moe_topk"):
        if k in c:
            c[k] = top_k
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):  # kept: generate's stopping checks cost time
        ids = c.get(k) if isinstance(c.get(k), list) else [c.get(k)]
        if any(i is not None and not 0 <= int(i) < 512 for i in ids):
            c[k] = None
    c.pop("quantization_config", None)
    return c


def _fits_real_width(config: dict, layers: int) -> bool:
    """Whether a `layers`-deep probe at the model's own width stays under PROBE_PARAMS (MLA layouts never:
    their GEMV plan is unknown, so toy probes and bytes/bandwidth are used)."""
    if not gemv_plan(config):
        return False
    shape = ModelShape.from_config(config)
    per_layer = (shape.experts * shape.expert_params + 4 * shape.hidden ** 2) * shape.moe_layers / shape.layers
    return layers * per_layer + 512 * shape.hidden * 2 <= PROBE_PARAMS


def timed_generate(model, ids, n: int, cold: bool) -> tuple[float, dict]:
    """Seconds to greedily generate exactly `n` tokens from `ids`, and the model's stats for that run; `cold`
    empties the expert cache first (else only the counters restart)."""
    import torch

    if cold:
        model.reset_cache()
    else:
        model.reset_stats()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                   attention_mask=torch.ones_like(ids))
    return time.perf_counter() - t0, model.stats()


def _probe_decode(models: dict, n: int, repeats: int) -> dict:
    """{name: (seconds per decoded token, misses per token)} of OffloadedModels given as
    {name: (model, cold)}, measured as `offload-bench run` does (N+1 tokens minus 1), interleaved
    round-robin so a load change on a shared machine hits every probe alike; medians."""
    import statistics

    import torch

    ids = torch.randint(3, 500, (1, 32), generator=torch.Generator().manual_seed(0))

    samples = {name: [] for name in models}
    for name, (m, cold) in models.items():
        timed_generate(m, ids, 2, cold)
    for _ in range(repeats):
        for name, (m, cold) in models.items():
            t1, s1 = timed_generate(m, ids, 1, cold)
            tn, sn = timed_generate(m, ids, n + 1, cold)
            samples[name].append(((tn - t1) / n, (sn["misses"] - s1["misses"]) / n))
    return {name: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
            for name, v in samples.items()}


def calibrate_local(config: dict, store=None, store_keys=None, seconds: float = 0.2, threads: int = 1,
                    probe_tokens: int = 24, probe_repeats: int = 5) -> LocalProfile:
    """Calibrate the CPU-engine model on this machine, for a model of `config`'s architecture:

    - GEMV bandwidths: `gemv_bandwidths` (bf16 / int8 / int4 kernels on 4096x4096 weights);
    - store read: `store_read_seconds` on `store` (the model's own expert store), if given;
    - overheads: probes of the same architecture with 1 and 5 layers and vocab 512, at the model's own
      width when 5 such layers stay under PROBE_PARAMS, else at toy width (hidden 64), decoded through
      OffloadedModel exactly as `offload-bench run` does: 1 vs 5 layers gives the per-layer cost and the
      per-token intercept, top-k vs top-1 the per-expert cost, and a probe at a small capacity the per-miss
      bookkeeping. Each probe's own GEMVs, timed as the prediction times the model's, are subtracted, so
      what GEMVs cost in a model beyond their microbenchmark stays in the overheads. The probes have random
      weights and other depths; the model being predicted is never timed."""
    import contextlib
    import json
    import tempfile
    from pathlib import Path

    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        bw = gemv_bandwidths(seconds)
        copy = _copy_bw(seconds)
        from offload.model import OffloadedModel

        c = config.get("text_config", config)
        k = int(next(c[x] for x in ("num_experts_per_tok", "num_experts_per_token", "moe_topk") if c.get(x)))
        k_lo = 1 if k > 1 else 2
        LH = 5  # probe depths 1 and LH: per-layer cost = slope
        E = int(next(c[x] for x in ("num_local_experts", "num_experts", "n_routed_experts") if c.get(x)))
        real = _fits_real_width(c, LH)
        with tempfile.TemporaryDirectory(prefix="offload-probe-") as tmp:
            dirs = {}
            for layers, kk in ((1, k), (LH, k), (LH, k_lo)):
                d = Path(tmp) / f"L{layers}k{kk}"
                d.mkdir()
                cfg = _probe_config(c, layers, kk, real)
                (d / "config.json").write_text(json.dumps(cfg))
                if kk == k:
                    _save_probe(d)
                else:
                    (d / "model.safetensors").symlink_to(dirs[(LH, k)] / "model.safetensors")
                dirs[(layers, kk)] = d
            gemv = {}
            ring = DRAM_RING if real else (1 << 20)  # real width: from DRAM, as the prediction times them
            for key, d in dirs.items():  # the probes' own GEMVs, taken out below
                plan = gemv_plan(json.loads((d / "config.json").read_text()))
                g = gemv_seconds(plan, ring, seconds / 10) if plan else {}
                gemv[key] = sum(cnt * g[(n, kk)] for _r, n, kk, cnt in plan)
            total = LH * E
            with contextlib.ExitStack() as stack:
                probes = {key: (stack.enter_context(OffloadedModel.from_pretrained(
                    d, cache_experts=key[0] * E, policy="lru")), False) for key, d in dirs.items()}
                probes["miss"] = (stack.enter_context(OffloadedModel.from_pretrained(
                    dirs[(LH, k)], cache_experts=max(k + 1, total // 4), policy="lru")), True)
                res = _probe_decode(probes, probe_tokens, probe_repeats)
                store0 = probes[(LH, k)][0].engine.store
                probe_read = store_read_seconds(store0, store0.keys(), seconds / 4)
            t = {key: res[key][0] - gemv[key] for key in dirs}  # overheads only
            t_miss, misses = res["miss"][0] - gemv[(LH, k)], res["miss"][1]
        per_layer = (t[(LH, k)] - t[(1, k)]) / (LH - 1)
        expert = (t[(LH, k)] - t[(LH, k_lo)]) / (LH * (k - k_lo))
        layer = per_layer - k * expert
        token = t[(1, k)] - per_layer
        load = max(0.0, (t_miss - t[(LH, k)]) / misses - probe_read) if misses else 0.0
        plan = gemv_plan(config)
        # weights come from DRAM: on a shared machine the last-level cache does not survive one token
        gs = gemv_seconds(plan, DRAM_RING, seconds / 2) if plan else None
        stores = {}
        if store is not None:
            stores[getattr(store, "tier", "ram")] = store.record_bytes / store_read_seconds(
                store, store_keys or store.keys()[:8], seconds)
    finally:
        torch.set_num_threads(old)
    return LocalProfile(bw, stores, token, layer, expert, load, copy, gs,
                        note=f"{threads} thread(s); {'model' if real else 'toy'}-width probe overheads per token: "
                             + ", ".join(f"L{a}k{b} {1e3 * v:.2f} ms" for (a, b), v in t.items()))


def _copy_bw(seconds: float) -> float:
    import torch

    src = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    return src.numel() / _per_call(lambda: dst.copy_(src), seconds)


def _save_probe(d) -> None:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(d)
    torch.manual_seed(0)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
        with torch.no_grad():  # spread the routing as a trained router would
            for name, p in model.named_parameters():
                if "experts" in name or "gate" in name or "router" in name:
                    p.normal_(0, 0.2)
        model.save_pretrained(d)
    finally:
        transformers.logging.set_verbosity(verbosity)

# The anchors' published numbers, as their authors report them.
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


__all__ = ["ANCHORS", "GB", "MACHINES", "PRESETS", "Fit", "LocalProfile", "Machine", "ModelShape", "Projection",
           "bits_per_weight", "bytes_per_token", "calibrate_local", "cpu_engine_tok_s", "crossover_hit_rate",
           "expert_bytes", "fit", "local_decode_seconds", "local_tok_s", "machine", "measure_local",
           "non_expert_bytes", "preset", "project", "with_vram"]
