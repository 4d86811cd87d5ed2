"""Expert predictors: which experts will the next MoE layers want? (torch only; never imports offload/cache)

    p = make_predictor("gate", routers=find_routers(model), moe_layers=[...], num_experts=E, top_k=k)
    p.predict(layer, hidden)   -> {target_layer: [expert ids, best first]}
    p.observe(layer, experts)  # int [T, k] actually selected at `layer`
    p.reset()                  # new sequence
"""
from predictors.base import PREDICTORS, BasePredictor, NullPredictor, Predictor, make_predictor  # base first
from predictors.gate import GatePredictor, find_routers
from predictors.history import FrequencyPredictor, OraclePredictor, PreviousPredictor
from predictors.metrics import PredictorScore, precision, recall_at_k, useful_prefetch_rate

__all__ = ["PREDICTORS", "BasePredictor", "NullPredictor", "Predictor", "make_predictor", "GatePredictor",
           "find_routers", "FrequencyPredictor", "OraclePredictor", "PreviousPredictor", "PredictorScore",
           "precision", "recall_at_k", "useful_prefetch_rate"]
