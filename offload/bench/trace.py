"""offload-bench trace: generate greedily and record which experts each token routed to."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from offload.bench.common import guard, out, prompt_ids, read_text_file


def trace(
    model_dir: Path = typer.Argument(..., help="Hugging Face checkpoint directory"),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", "-p", help="a prompt (repeatable)",
                                               show_default="random token ids"),
    prompts: Optional[Path] = typer.Option(None, help="a text file, one prompt per line", show_default="none"),
    max_new_tokens: int = typer.Option(32, min=1, help="tokens decoded greedily per prompt"),
    out_path: Path = typer.Option(Path("trace.npz"), "--out", "-o", help="where to write the .npz trace"),
    prompt_tokens: int = typer.Option(32, min=1, help="random prompt length when the model has no tokenizer"),
) -> None:
    """Generate greedily and record which experts each token routed to (as many experts resident as fit)."""
    import torch

    from offload.model import OffloadedModel

    def go():
        texts = list(prompt or [])
        if prompts is not None:
            texts += [line.strip() for line in read_text_file(prompts, "prompts file").splitlines() if line.strip()]
        model = OffloadedModel.from_pretrained(model_dir, trace=True)  # routing never depends on the cache size
        try:
            for i, text in enumerate(texts or [None]):
                ids = prompt_ids(model, text, prompt_tokens, seed=i)
                model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=0, attention_mask=torch.ones_like(ids))
            tr = model.trace()
        finally:
            model.close()
        tr.save(out_path)
        t = Table(title=f"routing trace -> {out_path}", show_header=False)
        for k, v in (("model", f"{model_dir} ({tr.model_type})"), ("tokens", tr.tokens),
                     ("prompts", len(tr.prompt_boundaries or [])), ("MoE layers", len(tr.moe_layers)),
                     ("experts per layer / top-k", f"{tr.num_experts} / {tr.top_k}"),
                     ("distinct experts used", f"{len(set(tr.keys()))} of {tr.num_experts * len(tr.moe_layers)}"),
                     ("expert bytes", tr.expert_bytes)):
            t.add_row(k, str(v))
        out.print(t)

    guard(go)


def register(app: typer.Typer) -> None:
    app.command("trace")(trace)
