"""Expert predictors: which experts will the next MoE layers want? (torch only; never imports offload/cache)

    p = make_predictor("gate", routers=find_routers(model), moe_layers=[...], num_experts=E, top_k=k)
    p.predict(layer, hidden)   -> {target_layer: [expert ids, best first]}
    p.observe(layer, experts)  # int [T, k] actually selected at `layer`
    p.reset()                  # new sequence
"""
import inspect
from typing import Callable

from predictors.base import BasePredictor, NullPredictor, Predictor
from predictors.gate import GatePredictor, find_routers
from predictors.history import FrequencyPredictor, OraclePredictor, PreviousPredictor
from predictors.metrics import PredictorScore, precision, recall_at_k, useful_prefetch_rate

PREDICTORS: dict[str, Callable[..., Predictor]] = {
    "none": NullPredictor, "gate": GatePredictor, "previous": PreviousPredictor, "frequency": FrequencyPredictor,
    "oracle": OraclePredictor,
}


def make_predictor(name: str, **kw) -> Predictor:
    """Build the predictor registered as `name`.

    Keyword arguments that this predictor does not take but another registered one does (e.g. `routers`
    for `previous`, `trace` for `gate`) are dropped, so an engine can pass one superset of context to any
    name. A keyword no registered predictor takes is a TypeError (a typo, not context).
    """
    if name not in PREDICTORS:
        raise ValueError(f"unknown predictor {name!r}; choose one of {sorted(PREDICTORS)}")
    ctor = PREDICTORS[name]
    accepted = _params(ctor)
    known = set().union(*(_params(c) for c in PREDICTORS.values()))
    unknown = sorted(set(kw) - known)
    if unknown:
        raise TypeError(f"no predictor takes {unknown}; {name!r} takes {sorted(accepted)}")
    return ctor(**{k: v for k, v in kw.items() if k in accepted})


def _params(ctor) -> set[str]:
    sig = inspect.signature(ctor)
    return {p.name for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}


__all__ = ["PREDICTORS", "BasePredictor", "NullPredictor", "Predictor", "make_predictor", "GatePredictor",
           "find_routers", "FrequencyPredictor", "OraclePredictor", "PreviousPredictor", "PredictorScore",
           "precision", "recall_at_k", "useful_prefetch_rate"]
