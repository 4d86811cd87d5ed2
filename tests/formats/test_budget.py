"""The bits budget's spelling and allocation: refused spellings name the fix, the allocation stays within its
bytes and is the brute-force optimum on small problems, and rarely routed matrices take the most zeros."""
from __future__ import annotations

import itertools
import random

import pytest

from offload.config import OffloadConfig
from offload.errors import OffloadError
from offload.formats.budget import ZEROS, BitsBudget, Costs, allocate
from offload.formats.record import format_of, format_rule


def test_spelling():
    assert BitsBudget.of("ternary-b1.0") == BitsBudget(1.0) and str(BitsBudget(1.0)) == "ternary-b1.0"
    assert BitsBudget.of("Ternary-B0.75").bits == 0.75
    assert BitsBudget.of("ternary-z80") is None and BitsBudget.of(4) is None
    assert format_of("ternary-b1.0").kind == "ternary"  # records and slots sized as any ternary-zNN


@pytest.mark.parametrize("text", ["ternary-b", "ternary-bx", "ternary-b2.0", "ternary-b0.1", "ternary-b1.0-z80"])
def test_invalid_spellings_are_one_line_naming_the_fix(text):
    with pytest.raises(OffloadError, match=r"ternary-bX with X bits/param from 0.4 to 1.5, e.g. 'ternary-b1.0'") as e:
        format_of(text)
    assert "\n" not in str(e.value)


def test_budget_needs_calibration_and_lzma(tmp_path):
    with pytest.raises(OffloadError, match=r"add calibration=FILE \(--calibration FILE\)"):
        OffloadConfig(store="disk", store_dir=str(tmp_path / "s"), bits="ternary-b1.0")
    text = tmp_path / "c.txt"
    text.write_text("w1 w2")
    with pytest.raises(OffloadError, match=r"keep entropy_coder='lzma'"):
        OffloadConfig(store="disk", store_dir=str(tmp_path / "s"), bits="ternary-b1.0", calibration=str(text),
                      entropy_coder="dict16")


def random_costs(mats: int, seed: int = 0) -> Costs:
    """Convex-ish costs: more zeros, fewer bytes and more error, each matrix at its own sensitivity."""
    rng = random.Random(seed)
    error, nbytes = {}, {}
    for i in range(mats):
        x, s = ((i, 0), "gate_up"), rng.uniform(0.1, 10)
        nbytes[x] = [int(1000 * (1.6 - z / 70) + rng.randrange(20)) for z in ZEROS]
        error[x] = [s * (z / 100) ** 2 * (1 + rng.uniform(0, 0.1)) for z in ZEROS]
    return Costs(error, nbytes)


@pytest.mark.parametrize("seed", range(3))
def test_allocation_fits_and_is_the_optimum_on_small_problems(seed):
    costs = random_costs(3, seed)
    mats = list(costs.error)
    target = sum(costs.nbytes[x][4] for x in mats)  # what 80% zeros everywhere costs
    picked = allocate(costs, target)
    assert sum(costs.nbytes[x][j] for x, j in picked.items()) <= target
    best = min(sum(costs.error[x][j] for x, j in zip(mats, js)) for js in itertools.product(range(len(ZEROS)), repeat=3)
               if sum(costs.nbytes[x][j] for x, j in zip(mats, js)) <= target)
    assert sum(costs.error[x][j] for x, j in picked.items()) <= best * 1.02


def scanned_allocation(costs: Costs, target: int) -> dict:
    """The allocation by its definition, in plain Python: the Lagrangian choice, then each time the upgrade of
    most error saved per byte that fits, scanning every matrix and share (first matrix, then first share, on ties)."""
    mats = list(costs.error)

    def pick(lam):
        return {x: min(range(len(ZEROS)), key=lambda j: costs.error[x][j] + lam * costs.nbytes[x][j]) for x in mats}

    def size(choice):
        return sum(costs.nbytes[x][j] for x, j in choice.items())

    lo, hi = 0.0, 1.0
    while size(pick(hi)) > target:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if size(pick(mid)) <= target else (mid, hi)
    choice = pick(hi)
    left = target - size(choice)
    while True:
        best = None
        for x, j in choice.items():
            for k in range(len(ZEROS)):
                extra = costs.nbytes[x][k] - costs.nbytes[x][j]
                gain = costs.error[x][j] - costs.error[x][k]
                if gain > 0 and extra <= left and (best is None or gain / max(extra, 1) > best[0]):
                    best = (gain / max(extra, 1), x, k, extra)
        if best is None:
            return choice
        _, x, k, extra = best
        choice[x], left = k, left - extra


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("share", [2, 4, 6])
def test_allocation_is_the_scanned_greedy_choice(seed, share):
    costs = random_costs(60, seed)
    if seed % 2:  # shares of equal bytes or equal error: the tie rules decide
        for x in list(costs.error)[::3]:
            costs.nbytes[x][3] = costs.nbytes[x][4]
            costs.error[x][6] = costs.error[x][5]
    target = sum(costs.nbytes[x][share] for x in costs.error) + 137
    assert allocate(costs, target) == scanned_allocation(costs, target)


def test_less_sensitive_matrices_take_more_zeros():
    costs = random_costs(40)
    mats = list(costs.error)
    picked = allocate(costs, sum(costs.nbytes[x][4] for x in mats))
    by_sensitivity = sorted(mats, key=lambda x: costs.error[x][-1])
    low, high = by_sensitivity[:10], by_sensitivity[-10:]
    assert sum(ZEROS[picked[x]] for x in low) > sum(ZEROS[picked[x]] for x in high)


def test_an_impossible_budget_is_one_line():
    costs = random_costs(4)
    with pytest.raises(OffloadError, match=r"over the budget's .*; give a larger budget \(ternary-bX\)"):
        allocate(costs, 10)


@pytest.mark.parametrize("bits", [{"default": "ternary-b1.0"}, {"default": "ternary-z80", "layers[0]": "ternary-b0.8"}])
def test_a_budget_is_for_the_whole_model(bits):
    with pytest.raises(OffloadError, match=r"is a bits budget for the whole model; give it as bits='ternary-b"):
        format_rule(bits)(0, 0)
