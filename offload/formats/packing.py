"""Bit layouts: torch's CPU int4 kernel layout, and the compact code streams that expand into it.

Legend: N out features (rows), K in features, M = N*K codes. A *code* is an unsigned 4-bit value q in
0..15 that the kernel dequantizes as (q - 8) * scale + zero.

torch's CPU kernel (aten/src/ATen/native/cpu/int4mm_kernel.cpp, `weight_to_int4pack_kernel`) packs rows
in blocks of BLOCK_N = 4 * Vectorized<float>::size() and stores each block k-major: byte[block, k, j].
Inside a full block, rows j and j + BLOCK_N/2 share a byte ("half", the AVX2/AVX512 builds) or rows 2j
and 2j+1 do ("pair", the scalar build); a partial tail block (16, 32 or 48 rows) always uses pairs.
So the packed bytes depend on the CPU the process runs on. Everything we *store* uses one canonical
layout (the AVX512 one); `to_compute` repacks only on a machine whose kernel wants another.

Reading the packed bytes as a stream of nibbles (low nibble first) gives the *kernel order* of the
codes. int3/int2/ternary codes are stored in that order, bit-packed, so expanding them into kernel
bytes is one table lookup per byte (no transpose at load time).
"""
from __future__ import annotations

import functools
import sys

import torch

from offload.formats import compiled

# name -> (BLOCK_N, full blocks interleave rows j and j + BLOCK_N/2)
LAYOUTS: dict[str, tuple[int, bool]] = {"avx512": (64, True), "avx2": (32, True),
                                        "scalar32": (32, False), "scalar16": (16, False)}
CANONICAL = "avx512"
PACK_CHUNK = 1 << 18  # codes packed at a time by pack_int4 (kernel bytes by pack_low2 / pack_bit2)

if sys.byteorder != "little":  # the int16/int32 views below read bytes in little-endian order
    raise ImportError("offload.formats.packing assumes a little-endian CPU")


# ---- kernel order: a permutation of the N*K codes -------------------------------------------------

def _blocks(N: int, layout: str) -> tuple[int, int, bool]:
    block, half = LAYOUTS[layout]
    return N // block * block, block, half


def _block_pairs(codes: torch.Tensor, block: int, half: bool) -> torch.Tensor:
    """Codes of whole blocks [n, K] -> [n/block, lo/hi, block/2, K]: the rows that share a byte, side by side."""
    n, K = codes.shape
    return codes.view(n // block, 2, block // 2, K) if half else \
        codes.view(n // block, block // 2, 2, K).transpose(1, 2)


def _pack_blocks(c: torch.Tensor) -> torch.Tensor:
    """[B, lo/hi, h, K] -> the blocks' kernel bytes [B, K, h] (k-major within a block)."""
    return (c[:, 0] | c[:, 1] << 4).transpose(1, 2).contiguous()


def pack_int4(codes: torch.Tensor, layout: str = CANONICAL, fused: bool = True) -> torch.Tensor:
    """Codes [N, K] 0..15 -> uint8 [N, K/2] exactly as `_convert_weight_to_int4pack_for_cpu` packs on `layout`;
    `fused`: a large matrix's whole blocks by the compiled `_pack_blocks` (conversion), else eager."""
    N, K = codes.shape
    full, block, half = _blocks(N, layout)
    pack = compiled.for_matrix(_pack_blocks, codes) if fused and full == N else None
    if pack is not None:
        with compiled.recompiles():
            return pack(_block_pairs(codes, block, half)).view(N, K // 2)
    out = torch.empty(N * K // 2, dtype=torch.uint8, device=codes.device)
    step = max(1, PACK_CHUNK // (block * K)) * block  # rows per step: temporaries stay small (no page faults)
    for r in range(0, full, step):
        n = min(step, full - r)
        out[r * K // 2:(r + n) * K // 2].view(n // block, K, block // 2).copy_(
            _pack_blocks(_block_pairs(codes[r:r + n], block, half)))
    if N > full:  # tail block: pairs of adjacent rows
        t = codes[full:].view((N - full) // 2, 2, K)
        out[full * K // 2:].view(K, (N - full) // 2).copy_((t[:, 0] | t[:, 1] << 4).t())
    return out.view(N, K // 2)


def unpack_int4(packed: torch.Tensor, N: int, K: int, layout: str = CANONICAL) -> torch.Tensor:
    """Inverse of `pack_int4`: kernel bytes -> codes [N, K]."""
    full, block, half = _blocks(N, layout)
    flat = packed.reshape(-1)
    codes = torch.empty(N, K, dtype=torch.uint8, device=packed.device)
    parts = []
    if full:
        c = codes[:full].view(full // block, 2, block // 2, K) if half else \
            codes[:full].view(full // block, block // 2, 2, K).transpose(1, 2)
        parts.append((flat[:full * K // 2].view(full // block, K, block // 2).transpose(1, 2), c[:, 0], c[:, 1]))
    if N > full:
        t = codes[full:].view((N - full) // 2, 2, K)
        parts.append((flat[full * K // 2:].view(K, (N - full) // 2).t(), t[:, 0], t[:, 1]))
    for b, lo, hi in parts:
        torch.bitwise_and(b, 15, out=lo)
        torch.bitwise_right_shift(b, 4, out=hi)
    return codes


def pack_low2(kernel: torch.Tensor) -> torch.Tensor:
    """Kernel bytes [M/2] -> the low two bits of each code in kernel order, four to a byte [M/4]: equal to
    `pack_bits(kernel_order(codes) & 3, 2)`, computed on 16-bit words (two kernel bytes -> one byte) instead of
    a nibble stream, PACK_CHUNK bytes at a time (its temporaries stay in cache)."""
    flat = kernel.reshape(-1)
    out = torch.empty(flat.numel() // 2, dtype=torch.uint8, device=kernel.device)
    for i in range(0, flat.numel(), PACK_CHUNK):
        x = flat[i:i + PACK_CHUNK].view(torch.int16) & 0x3333  # per nibble: its low two bits (bit 15 clear: no sign)
        x |= x >> 2                                             # per byte: lo | hi << 2 in its low nibble
        x &= 0x0F0F
        x |= x >> 4                                             # low byte: byte 0's nibble | byte 1's << 4
        out[i // 2:(i + PACK_CHUNK) // 2] = x                   # narrowed: keeps the low byte
    return out


def pack_bit2(kernel: torch.Tensor) -> torch.Tensor:
    """Kernel bytes [M/2] -> bit 2 of each code in kernel order, eight to a byte [M/8]: equal to
    `pack_bits((kernel_order(codes) >> 2) & 1, 1)` (int3's high plane), on 32-bit words, PACK_CHUNK bytes at a time."""
    flat = kernel.reshape(-1)
    out = torch.empty(flat.numel() // 4, dtype=torch.uint8, device=kernel.device)
    for i in range(0, flat.numel(), PACK_CHUNK):
        x = (flat[i:i + PACK_CHUNK].view(torch.int32) >> 2) & 0x11111111  # nibble m's bit at 4m (sign masked off)
        x |= x >> 3                                                        # pairs at bits 8j, 8j + 1
        x &= 0x03030303
        x |= x >> 6                                                        # quads at bits 0-3 and 16-19
        x &= 0x000F000F
        x |= x >> 12
        out[i // 4:(i + PACK_CHUNK) // 4] = x
    return out


def nibbles_to_bytes(stream: torch.Tensor) -> torch.Tensor:
    s = stream.view(-1, 2)
    return s[:, 0] | (s[:, 1] << 4)


def bytes_to_nibbles(b: torch.Tensor) -> torch.Tensor:
    out = torch.empty(b.numel(), 2, dtype=torch.uint8, device=b.device)
    torch.bitwise_and(b.reshape(-1), 15, out=out[:, 0])
    torch.bitwise_right_shift(b.reshape(-1), 4, out=out[:, 1])
    return out.view(-1)


def kernel_order(codes: torch.Tensor, layout: str = CANONICAL) -> torch.Tensor:
    """Codes [N, K] -> the same codes [N*K] in the order of the layout's nibbles (low nibble first)."""
    return bytes_to_nibbles(pack_int4(codes, layout))


def from_kernel_order(stream: torch.Tensor, N: int, K: int, layout: str = CANONICAL) -> torch.Tensor:
    return unpack_int4(nibbles_to_bytes(stream), N, K, layout)


def relayout_int4(packed: torch.Tensor, N: int, K: int, src: str, dst: str) -> torch.Tensor:
    """Kernel bytes in layout `src` -> layout `dst`."""
    if src == dst:
        return packed
    return pack_int4(unpack_int4(packed, N, K, src), dst, fused=False)  # on a miss, maybe a worker thread: no builds


@functools.lru_cache(maxsize=None)
def native_layout() -> str:
    """The layout this process's CPU int4 kernel uses, found by packing a probe (tail block included)."""
    probe = torch.arange(80 * 4, dtype=torch.int32).remainder(16).view(80, 4)
    probe = probe.roll(3, 0).contiguous()  # not symmetric under any pair/half swap
    got = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).view(-1)
    for name in LAYOUTS:
        if torch.equal(pack_int4(probe.to(torch.uint8), name).view(-1), got):
            return name
    raise RuntimeError("this torch build packs int4 weights in a layout moe-offload does not know; "
                       "use int8 or bf16 experts on this machine")


# ---- compact code streams -> kernel bytes -----------------------------------------------------------

def pack_bits(stream: torch.Tensor, bits: int) -> torch.Tensor:
    """Values [M] < 2**bits (bits 1 or 2) -> uint8 [M*bits/8], first value in the lowest bits."""
    per = 8 // bits
    s = stream.view(-1, per)
    out = s[:, 0].clone()
    for i in range(1, per):
        out |= s[:, i] << (bits * i)
    return out


@functools.lru_cache(maxsize=None)
def _lut_2bit(offset: int, device: torch.device) -> torch.Tensor:
    """One byte of four 2-bit codes -> two kernel bytes (as int16), each code + offset in a nibble."""
    v = torch.arange(256)
    lo = ((v & 3) + offset) | (((v >> 2) & 3) + offset) << 4
    hi = (((v >> 4) & 3) + offset) | (((v >> 6) & 3) + offset) << 4
    return (lo | hi << 8).to(torch.int16).to(device)


@functools.lru_cache(maxsize=None)
def _lut_1bit(device: torch.device) -> torch.Tensor:
    """One byte of eight 1-bit values -> four kernel bytes (as int32) with the bit at value 4 of each nibble."""
    v = torch.arange(256)
    out = torch.zeros(256, dtype=torch.int64)
    for m in range(8):
        out |= ((v >> m) & 1) << (4 * m + 2)
    return out.to(torch.int32).to(device)


@functools.lru_cache(maxsize=None)
def _lut_base3(offset: int, device: torch.device) -> torch.Tensor:
    """Two bytes of five base-3 digits each (little-endian int16 index) -> five kernel bytes."""
    v = torch.arange(65536)
    digits = []
    for byte in (v & 255, v >> 8):
        for _ in range(5):
            digits.append(byte % 3 + offset)
            byte = byte // 3
    d = torch.stack(digits, 1)                                       # [65536, 10]
    return (d[:, 0::2] | d[:, 1::2] << 4).to(torch.uint8).to(device)  # [65536, 5]


def _view(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    try:
        return t.view(dtype)
    except RuntimeError:  # misaligned or odd-sized view: caller falls back to a temporary
        return None


def expand_2bit(packed: torch.Tensor, offset: int, out: torch.Tensor) -> torch.Tensor:
    """2-bit codes [M/4 bytes] -> kernel bytes `out` [M/2] (flat uint8), code + offset per nibble."""
    lut = _lut_2bit(offset, packed.device)
    dst = _view(out, torch.int16)
    if dst is None:
        out.copy_(lut[packed.int()].view(torch.uint8))
    else:
        torch.index_select(lut, 0, packed.int(), out=dst)
    return out


def add_high_bit(plane: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Add 4 to every nibble of kernel bytes `out` whose bit is set in `plane` [M/8 bytes] (int3's third bit)."""
    add = torch.index_select(_lut_1bit(plane.device), 0, plane.int())
    dst = _view(out, torch.int32)
    if dst is None:
        out += add.view(torch.uint8)  # same sum byte by byte: nothing carries
    else:
        dst += add  # no carries: the nibble's value-4 bit is clear before this (codes + offset <= 11)
    return out


def pack_base3(stream: torch.Tensor) -> torch.Tensor:
    """Digits [M] in 0..2 -> uint8 [2 * ceil(M/10)], five digits per byte (1.6 bits each)."""
    M = stream.numel()
    padded = torch.zeros(-(-M // 10) * 10, dtype=torch.uint8, device=stream.device)
    padded[:M] = stream
    d = padded.view(-1, 5)
    return d[:, 0] + 3 * d[:, 1] + 9 * d[:, 2] + 27 * d[:, 3] + 81 * d[:, 4]


def expand_base3(packed: torch.Tensor, offset: int, out: torch.Tensor) -> torch.Tensor:
    """Base-3 digits (`pack_base3`) -> kernel bytes `out` [M/2], digit + offset per nibble."""
    lut = _lut_base3(offset, packed.device)
    pairs = _view(packed, torch.int16)  # two packed bytes -> ten digits -> five kernel bytes
    idx = pairs.int() & 0xFFFF if pairs is not None else \
        packed.view(-1, 2)[:, 0].int() | packed.view(-1, 2)[:, 1].int() << 8
    n = out.numel()
    full = n // 5
    torch.index_select(lut, 0, idx[:full], out=out[:full * 5].view(full, 5))
    if n > full * 5:
        out[full * 5:] = lut[idx[full]][:n - full * 5]
    return out
