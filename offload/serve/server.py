"""Server: what one serving process holds - the model, its engine thread, metrics and settings - and the
checks that turn a parsed request into a prompt and sampling parameters the model can honour."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable

from offload import OffloadError
from offload.serve.batcher import Batcher
from offload.serve.metrics import Metrics
from offload.serve.protocol import APIError, ChatRequest, CompletionRequest
from offload.serve.sequence import Event, SamplingParams, Sequence

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the room left


class Server:
    def __init__(self, model, name: str, api_key: str | None = None, max_batch: int = 8,
                 max_queue: int = 64) -> None:
        if model.tokenizer is None:
            raise OffloadError("this checkpoint has no tokenizer files; offload-serve needs its tokenizer")
        self.model, self.name, self.api_key = model, name, api_key
        self.context = model.plan.context
        self.created = int(time.time())
        self.metrics = Metrics()
        self.batcher = Batcher(model, self.metrics, max_batch=max_batch, max_queue=max_queue)
        self._tokenizer = model.tokenizer
        # The engine thread decodes with its own copy: a fast tokenizer borrowed by two threads at once
        # raises "Already borrowed".
        self._decoder = copy.deepcopy(model.tokenizer)
        eos = model.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self._tokenizer.eos_token_id is not None:
            eos.add(self._tokenizer.eos_token_id)
        self._eos = frozenset(eos)

    def start(self) -> None:
        self.batcher.start()

    def close(self) -> None:
        self.batcher.close()
        self.model.close()

    # --- requests --------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name != self.name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")

    def chat_prompt(self, req: ChatRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        tok = self._tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"]
        else:  # no chat template: plain continuation of the conversation text, as offload-chat does
            ids = tok("\n".join(m["content"] for m in messages))["input_ids"]
        return self._fits(list(ids), "messages")

    def completion_prompt(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt[0] if isinstance(req.prompt, list) and isinstance(req.prompt[0], str) else req.prompt
        if isinstance(prompt, str):
            return self._fits(self._tokenizer(prompt)["input_ids"], "prompt")
        vocab = len(self._tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        return self._fits(prompt, "prompt")

    def _fits(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        if len(ids) >= self.context:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this server's context is {self.context} tokens "
                                f"(offload-serve --context)", param=param, code="context_length_exceeded")
        return ids

    def sampling(self, req: ChatRequest | CompletionRequest, prompt_tokens: int) -> SamplingParams:
        room = self.context - prompt_tokens
        asked = req.max_tokens
        if isinstance(req, ChatRequest):
            asked = req.max_completion_tokens or asked
        if asked is not None and asked > room:
            raise APIError(400, f"max_tokens={asked} does not fit: the context is {self.context} tokens and the "
                                f"prompt takes {prompt_tokens}, leaving {room}", param="max_tokens",
                           code="context_length_exceeded")
        default = room if isinstance(req, ChatRequest) else min(COMPLETION_MAX_TOKENS, room)
        return SamplingParams(max_tokens=asked or default,
                              temperature=1.0 if req.temperature is None else req.temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=req.stops(),
                              ignore_eos=req.ignore_eos)

    def sequence(self, prompt: list[int], params: SamplingParams, emit: Callable[[Event], None]) -> Sequence:
        return Sequence(prompt, params, self._decoder, frozenset() if params.ignore_eos else self._eos, emit)
