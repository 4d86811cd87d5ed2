"""Tiny real checkpoints for every supported architecture, built from transformers' config classes.

Nothing is downloaded: each model is randomly initialised, saved with `save_pretrained` (safetensors,
legacy per-expert names on disk) next to a small word-level tokenizer.
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
              max_position_embeddings=256, tie_word_embeddings=False)

# arch name -> (config class, model class, config kwargs). 8 experts and 3 layers everywhere, so 100% = 24 experts.
TINY: dict[str, tuple[str, str, dict]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=96, num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=64,
                       num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=3, num_experts=8,
                       num_experts_per_tok=2, norm_topk_prob=True, head_dim=16)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=48, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=4, n_routed_experts=8,
                         n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
                         q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                         topk_method="greedy", n_group=1, topk_group=1)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=4, n_routed_experts=8,
                         n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
                         q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=2,
                         topk_group=1, routed_scaling_factor=2.5)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM",
               dict(intermediate_size=96, num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM",
                   dict(intermediate_size=48, num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(intermediate_size=48, num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2,
                     head_dim=16, sliding_window=32, layer_types=["sliding_attention", "full_attention"] * 1
                     + ["sliding_attention"])),
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM",
                    dict(intermediate_size=48, intermediate_size_mlp=96, num_hidden_layers=3, num_local_experts=8,
                         num_experts_per_tok=1, head_dim=16, interleave_moe_layer_step=1, no_rope_layers=[1, 1, 1],
                         attention_chunk_size=64)),
}


def tiny_tokenizer(vocab_size: int = 96) -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer over a fixed vocabulary: enough for the engine's tokenizer plumbing."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build(arch: str, out: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> Path:
    """Save a tiny random `arch` checkpoint (config.json, safetensors, tokenizer) into `out`."""
    cfg_name, model_name, kwargs = TINY[arch]
    cfg = getattr(tf, cfg_name)(**{**COMMON, **kwargs, **overrides})
    torch.manual_seed(seed)
    model = getattr(tf, model_name)(cfg).to(dtype)
    with torch.no_grad():  # random init leaves some weights tiny; make routing and experts non-trivial
        for name, p in model.named_parameters():
            if "experts" in name or "gate" in name or "router" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    tiny_tokenizer(cfg.vocab_size).save_pretrained(out)
    return out


def fine_tune(src: Path, out: Path, scale: float = 0.01) -> Path:
    """A copy of checkpoint `src` whose expert values differ (+ scale * randn) while config.json, tensor names,
    shapes and dtypes - every safetensors header byte - stay the same: what a fine-tune of the experts looks like."""
    import shutil

    from safetensors.torch import load_file, save_file

    from offload.store.safetensors_file import SafetensorsFile

    src, out = Path(src), Path(out)
    shutil.copytree(src, out)
    g = torch.Generator().manual_seed(0)
    for f in sorted(out.glob("*.safetensors")):
        tensors = load_file(f)
        for name, t in tensors.items():
            if ".experts." in name:
                tensors[name] = (t.float() + scale * torch.randn(t.shape, generator=g)).to(t.dtype)
        save_file(tensors, f, metadata={"format": "pt"})
        assert SafetensorsFile(f).tensors == SafetensorsFile(src / f.name).tensors  # names, dtypes, shapes, offsets
    return out
