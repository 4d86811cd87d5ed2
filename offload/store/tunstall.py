"""A Tunstall dictionary over base-3 digits: variable-length digit words, fixed 16-bit codewords (QMoE's coder).

Tunstall (1967): start from the three one-digit words and replace the most probable word by its three
extensions until the dictionary holds 2^16 - 1 words; every word is then a leaf of a complete ternary tree,
so any digit stream parses greedily into words. Decoding is one table lookup per codeword (a row of the
[words, longest] digit table) and a mask of the word lengths, vectorised in numpy (no loop over digits);
encoding walks the tree for LANE digits in each of many lanes in lockstep. Lanes are independent (each ends
on a word boundary, its last word completed with PAD digits), so the coded form is [words per lane, uint16]
+ [codewords, uint16].

The dictionary is stored as its tree shape alone: node flags in preorder (1 internal, 0 leaf), one bit each
(~12 KiB); codewords number the leaves in preorder. The shape does not depend on float rounding once built.
"""
from __future__ import annotations

import heapq

import numpy as np

from offload.errors import OffloadError

WORDS = (1 << 16) - 1  # a complete ternary tree has an odd number of leaves: 3 + 2 * expansions
LANE = 4096            # digits per independently parsed lane: the lockstep width of the encoder
MAGIC = b"TUN3"
PAD = 1                # completes a lane's last word: the zero code, the likeliest digit of a sparse stream


class TunstallDictionary:
    """2^16 - 1 words over the digits 0, 1, 2; `encode` digits -> uint16 stream, `decode` back."""

    def __init__(self, flags: np.ndarray) -> None:
        """`flags` [nodes] bool in preorder (True: internal); raises OffloadError if it is no complete tree of WORDS
        leaves."""
        flags = np.asarray(flags, dtype=bool)
        n = len(flags)
        child = np.full((n, 3), -1, dtype=np.int32)
        stack: list[list[int]] = []  # [node, children seen so far]
        for i in range(n):
            if stack:
                parent = stack[-1]
                child[parent[0], parent[1]] = i
                parent[1] += 1
                if parent[1] == 3:
                    stack.pop()
            elif i:
                raise OffloadError("the dictionary's tree ends before its last node")
            if flags[i]:
                stack.append([i, 0])
        leaves = np.flatnonzero(~flags)
        if stack or len(leaves) != WORDS:
            raise OffloadError(f"the dictionary is no complete ternary tree of {WORDS} words")
        self.flags, self.child = flags, child
        self.code = np.full(n, -1, dtype=np.int32)
        self.code[leaves] = np.arange(WORDS)
        digit = np.zeros(n, dtype=np.uint8)
        parent = np.zeros(n, dtype=np.int32)
        depth = np.zeros(n, dtype=np.int64)
        inner = np.flatnonzero(flags)
        for d in range(3):
            parent[child[inner, d]] = inner
            digit[child[inner, d]] = d
        for i in range(1, n):  # preorder: a parent precedes its children
            depth[i] = depth[parent[i]] + 1
        self.lengths = depth[leaves]                                          # [WORDS]
        # table [WORDS, longest]: word w's digits, left-aligned; filled from the leaves up, one level a step
        table = np.zeros((WORDS, int(self.lengths.max())), dtype=np.uint8)
        node, k = leaves.copy(), self.lengths - 1
        while (live := k >= 0).any():
            table[live, k[live]] = digit[node[live]]
            node, k = np.where(live, parent[node], 0), k - 1
        self.table = table

    @classmethod
    def build(cls, p: tuple[float, float, float]) -> TunstallDictionary:
        """The Tunstall dictionary for digit probabilities `p` (digits 0, 1, 2)."""
        p = np.asarray(p, dtype=np.float64) / sum(p)
        kids: dict[int, tuple[int, int, int]] = {}
        heap = [(-p[d], d + 1) for d in range(3)]  # (-probability, node id): ties go to the older node
        nodes, leaves = 4, 3
        heapq.heapify(heap)
        while leaves + 2 <= WORDS:
            q, node = heapq.heappop(heap)
            kids[node] = (nodes, nodes + 1, nodes + 2)
            for d in range(3):
                heapq.heappush(heap, (q * p[d], nodes + d))
            nodes, leaves = nodes + 3, leaves + 2
        kids[0] = (1, 2, 3)
        flags, stack = [], [0]
        while stack:  # preorder
            node = stack.pop()
            inner = node in kids
            flags.append(inner)
            if inner:
                stack.extend(reversed(kids[node]))
        return cls(np.array(flags, dtype=bool))

    def to_bytes(self) -> bytes:
        return MAGIC + len(self.flags).to_bytes(4, "little") + np.packbits(self.flags).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> TunstallDictionary:
        if data[:4] != MAGIC or len(data) < 8:
            raise OffloadError("the dictionary does not start with its magic bytes")
        n = int.from_bytes(data[4:8], "little")
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, offset=8))
        if len(bits) < n or len(bits) - n >= 8:
            raise OffloadError("the dictionary's length does not match its node count")
        return cls(bits[:n].astype(bool))

    def encode(self, digits: np.ndarray) -> np.ndarray:
        """digits [M] uint8 in 0..2 -> uint16 [lanes + codewords]: words per lane, then the codewords."""
        M = len(digits)
        lanes = -(-M // LANE)
        d = np.full(lanes * LANE, PAD, dtype=np.uint8)
        d[:M] = digits
        d = d.reshape(lanes, LANE)
        out = np.empty((lanes, LANE + 1), dtype=np.uint16)  # at most one word per digit, plus the flush
        count = np.zeros(lanes, dtype=np.int64)
        node = np.zeros(lanes, dtype=np.int32)
        rows = np.arange(lanes)
        for step in range(LANE):
            node = self.child[node, d[:, step]]
            self._emit(rows[~self.flags[node]], node, out, count)
        while (open_ := np.flatnonzero(node)).size:  # lanes ending mid-word: complete it with PAD digits
            node[open_] = self.child[node[open_], PAD]
            self._emit(open_[~self.flags[node[open_]]], node, out, count)
        words = out[np.arange(LANE + 1) < count[:, None]]  # row-major: lane by lane
        return np.concatenate([count.astype(np.uint16), words])

    def _emit(self, done: np.ndarray, node: np.ndarray, out: np.ndarray, count: np.ndarray) -> None:
        """Lanes `done` reached a leaf: write its codeword, go back to the root."""
        out[done, count[done]] = self.code[node[done]]
        count[done] += 1
        node[done] = 0

    def decode(self, coded: np.ndarray, M: int) -> np.ndarray:
        """uint16 [lanes + codewords] from `encode` -> digits [M] uint8; ValueError where they do not fit."""
        lanes = -(-M // LANE)
        counts = coded[:lanes].astype(np.int64)
        if len(coded) < lanes or (counts == 0).any() or lanes + counts.sum() != len(coded):
            raise ValueError("lane counts do not add up to the codewords")
        words = coded[lanes:]
        lengths = self.lengths[words]                                          # [W]
        last = np.cumsum(counts) - 1                                           # each lane's last word
        ends = np.cumsum(lengths)
        lane_len = ends[last] - np.concatenate([[0], ends[last[:-1]]])
        if (lane_len < LANE).any():
            raise ValueError("a lane decodes to fewer digits than it holds")
        lengths[last] -= lane_len - LANE                                       # drop each lane's padding
        out = self.table[words][np.arange(self.table.shape[1]) < lengths[:, None]]  # [lanes * LANE]
        return out[:M]
