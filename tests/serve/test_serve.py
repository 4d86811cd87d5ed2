"""offload-serve end to end: the real server (a subprocess on 127.0.0.1) and the real `openai` client.

Two servers start in parallel: the main one (API key, 8-sequence batches) and a tiny one (one running
sequence, one waiting) for the full queue and SIGTERM. Greedy answers are compared token for token with
`OffloadedModel.generate` run alone in this process. Both run in float32: in bfloat16 a batched matmul
(B rows) rounds differently from the same row alone, and about one answer in six flips a near-tie
(docs/serve.md, "Batching").
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

import offload
from offload import OffloadedModel

DEMO = Path(offload.__file__).parent / "demo_model"
MODEL = "demo_model"
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
COMMON = ["--port", "0", "--threads", "1", "--cache-experts", "16", "--log-level", "warning"]


class Proc:
    def __init__(self, tmp: Path, name: str, *args: str) -> None:
        self.log = tmp / f"{name}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "offload.serve", *COMMON, *args],
                                         stdout=out, stderr=subprocess.STDOUT)
        self.url = ""

    def ready(self, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", self.log.read_text())
            if m:
                try:
                    if httpx.get(m.group(1) + "/health", timeout=2).status_code == 200:
                        self.url = m.group(1)
                        return self.url
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        raise AssertionError(f"server did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    started = {"main": Proc(tmp, "main", "--api-key", KEY, "--max-batch", "8", "--max-queue", "32",
                            "--dtype", "float32"),
               "small": Proc(tmp, "small", "--max-batch", "1", "--max-queue", "1", "--drain-timeout", "1")}
    yield started
    for p in started.values():
        p.stop()


@pytest.fixture(scope="module")
def main(procs) -> str:
    return procs["main"].ready()


@pytest.fixture(scope="module")
def client(main) -> OpenAI:
    return OpenAI(base_url=main + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference():
    with OffloadedModel.from_pretrained(DEMO, cache_experts=16, dtype="float32") as m:
        yield m


def alone(ref: OffloadedModel, ids: list[int], max_tokens: int) -> list[int]:
    """What greedy `generate` makes of `ids` on its own (no sampling, no repetition penalty)."""
    import torch

    x = torch.tensor([ids])
    out = ref.generate(x, max_new_tokens=max_tokens, do_sample=False, repetition_penalty=1.0,
                       pad_token_id=ref.tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


def scrape(url: str) -> dict[str, float]:
    """/metrics as {'name{labels}': value}."""
    text = httpx.get(url + "/metrics", headers=AUTH).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def delta(before: dict, after: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def chat_ids(ref: OffloadedModel, text: str) -> list[int]:
    return ref.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             return_dict=True)["input_ids"]


# --- the API ---------------------------------------------------------------------------------------
def test_models_health_and_api_key(main, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(main + "/health").json()["status"] == "ok"  # the one route without a key
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(main + "/v1/completions", headers=headers, json={"model": MODEL, "prompt": "a"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=main + "/v1", api_key="wrong", max_retries=0).models.list()


def test_greedy_batched_equals_generate_alone(main, client, reference):
    prompts = ["Tell me a story", "Who are you?", "What is the king doing", "Say something",
               "Where is the castle", "Good morning, my lord"]
    before = scrape(main)
    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda p: client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=24,
            extra_body={"return_token_ids": True}), prompts))
    after = scrape(main)
    eos = set(reference.model.generation_config.eos_token_id)
    for p, r in zip(prompts, replies):
        ids = chat_ids(reference, p)
        want = alone(reference, ids, 24)
        choice = r.choices[0]
        assert r.model_extra["prompt_token_ids"] == ids
        assert choice.model_extra["token_ids"] == want, p
        assert choice.message.content == reference.tokenizer.decode(want, skip_special_tokens=True)
        assert choice.finish_reason == ("stop" if want[-1] in eos else "length")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
            (len(ids), len(want), len(ids) + len(want))
    steps = delta(before, after, "offload_decode_steps_total")
    assert delta(before, after, "offload_decode_tokens_total") > 1.5 * steps  # they really shared forwards


def test_completion_greedy_equals_generate(client, reference):
    prompt = "Once upon a time"
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12)
    want = alone(reference, reference.tokenizer(prompt)["input_ids"], 12)
    assert r.choices[0].text == reference.tokenizer.decode(want, skip_special_tokens=True)
    assert r.usage.completion_tokens == len(want)
    by_ids = client.completions.create(model=MODEL, prompt=reference.tokenizer(prompt)["input_ids"], temperature=0,
                                       max_tokens=12)
    assert by_ids.choices[0].text == r.choices[0].text


def test_streaming_equals_non_streaming(client):
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=20, seed=7)
    whole = client.chat.completions.create(**chat)
    chunks = list(client.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1

    comp = dict(model=MODEL, prompt="The king said", max_tokens=10, temperature=0.8, seed=3)
    whole = client.completions.create(**comp)
    chunks = list(client.completions.create(**comp, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_strings_cut_the_answer(client):
    free = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=16)
    text = free.choices[0].text
    stop = text.strip()[len(text.strip()) // 2:][:3]  # something the greedy answer is known to contain
    cut = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=16,
                                    stop=[stop, "@@never@@"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]
    streamed = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=16,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_sixteen_concurrent_streams(client, reference):
    def run(i: int):
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Tell me story number {i}"}], max_tokens=8, seed=i,
            stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        return text, finish, chunks[-1].usage

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(16)))
    for i, (text, finish, use) in enumerate(results):
        prompt = len(chat_ids(reference, f"Tell me story number {i}"))
        assert use.prompt_tokens == prompt and use.total_tokens == prompt + use.completion_tokens
        assert use.completion_tokens == 8 if finish == "length" else 1 <= use.completion_tokens <= 8
    for i in (0, 5, 15):  # a seed samples the same answer alone as it did in the batch
        alone_reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Tell me story number {i}"}], max_tokens=8, seed=i)
        assert (alone_reply.choices[0].message.content, alone_reply.usage) == (results[i][0], results[i][2])


LONG = "word " * 1500  # > the demo's 1024-token context
BAD = [
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3},
     400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": LONG}, 400, "prompt"),
    ("/v1/chat/completions", b'{"model": "demo_model", "messages": [', 400, None),
    ("/v1/chat/completions", b"", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 3.5}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
]


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[f"{b[2]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_request_is_an_openai_error(main, client, path, body, status, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(main + path, headers={**AUTH, "Content-Type": "application/json"}, timeout=30, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param
    assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=2).choices[0].finish_reason


def test_wrong_route_and_method_are_openai_errors(main):
    for r, status in ((httpx.get(main + "/v1/nothing", headers=AUTH), 404),
                      (httpx.get(main + "/v1/completions", headers=AUTH), 405)):
        assert r.status_code == status and r.json()["error"]["message"]


def test_metrics_count_the_requests(main, client, reference):
    before = scrape(main)
    for _ in range(3):
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=3)
    for body in ({"model": "nope", "prompt": "a"}, {"model": MODEL, "prompt": "a", "max_tokens": 0}):
        httpx.post(main + "/v1/completions", headers=AUTH, json=body)
    httpx.post(main + "/v1/completions", json={"model": MODEL, "prompt": "a"})
    after = scrape(main)
    for code, n in ((200, 3), (404, 1), (400, 1), (401, 1)):
        assert delta(before, after, f'offload_requests_total{{route="/v1/completions",code="{code}"}}') == n
    assert delta(before, after, "offload_generated_tokens_total") >= 3
    assert delta(before, after, "offload_prompt_tokens_total") == 3 * len(reference.tokenizer("Hello")["input_ids"])
    assert 0.0 <= after["offload_expert_cache_hit_rate"] <= 1.0
    assert after['offload_expert_bytes_loaded_total{tier="ram"}'] > 0
    uses = sum(v for k, v in after.items() if k.startswith("offload_expert_uses_total"))
    assert uses == after["offload_expert_cache_hits_total"] + after["offload_expert_cache_misses_total"] > 0
    assert after['offload_link_bytes_total{link="ram->device"}'] == after['offload_expert_bytes_loaded_total{tier="ram"}']
    assert after["offload_queue_depth"] == 0 and after["offload_tokens_per_second"] > 0


def test_client_disconnect_cancels_generation(main):
    before = scrape(main)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 800, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", main + "/v1/completions", headers=AUTH, json=body) as r:
        lines = r.iter_lines()
        got = [line for line, _ in zip(filter(None, lines), range(3))]
    assert len(got) == 3
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = scrape(main)
        if delta(before, after, "offload_requests_cancelled_total") == 1 and after["offload_running_sequences"] == 0:
            break
        time.sleep(0.1)
    assert delta(before, after, "offload_requests_cancelled_total") == 1
    assert delta(before, after, "offload_generated_tokens_total") < 400


def test_load_nothing_lost_nothing_hangs(client):
    def one(i: int) -> tuple[str, int]:
        if i % 2:
            r = client.completions.create(model=MODEL, prompt=f"Line {i}:", max_tokens=3, seed=i)
            return r.choices[0].finish_reason, r.usage.completion_tokens
        chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"q{i}"}],
                                                     max_tokens=3, seed=i, stream=True,
                                                     stream_options={"include_usage": True}))
        return [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage.completion_tokens

    pool = ThreadPoolExecutor(16)
    futures = [pool.submit(one, i) for i in range(100)]
    done, pending = wait(futures, timeout=45)
    pool.shutdown(wait=False, cancel_futures=True)
    assert not pending, f"{len(pending)} of 100 requests still open after 45 s"
    for f in done:
        finish, tokens = f.result()
        assert finish in ("stop", "length") and 1 <= tokens <= 3


# --- the small server: full queue, then SIGTERM ------------------------------------------------------
def test_full_queue_is_429_and_sigterm_exits_cleanly(procs):
    small = procs["small"]
    url = small.ready()
    long_body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 900, "stream": True, "temperature": 0}
    outcome: dict[str, object] = {}

    def waiting_request() -> None:
        try:
            outcome["b"] = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
                                      timeout=30).status_code
        except httpx.HTTPError as e:  # an answer of any kind is fine; a hang is not
            outcome["b"] = type(e).__name__

    with httpx.stream("POST", url + "/v1/completions", json=long_body, timeout=30) as a:
        lines = filter(None, a.iter_lines())
        next(lines)  # A is running: the one batch slot is taken
        b = threading.Thread(target=waiting_request)
        b.start()
        deadline = time.monotonic() + 10
        while scrape(url).get("offload_queue_depth") != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        full = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"

        small.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rest = list(lines)  # A streams on through the 1 s drain, then ends with an error chunk and [DONE]
    assert len(rest) > 5 and rest[-1] == "data: [DONE]" and "shutting down" in rest[-2]
    assert 1.0 <= time.monotonic() - t0 < 10
    b.join(timeout=10)
    assert outcome == {"b": 503}  # B never got a batch slot: refused, not left hanging
    assert small.proc.wait(timeout=20) == 0
    assert "Traceback" not in small.log.read_text()


# --- the command line --------------------------------------------------------------------------------
def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    import socket

    from typer.testing import CliRunner

    from offload.serve.cli import app

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    cases = [([str(tmp_path)], "no config.json"), (["--store", "disk", "--port", "0"], "store_dir"),
             (["--port", str(taken.getsockname()[1])], "choose another --port")]
    for args, message in cases:
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    taken.close()



def test_ignore_eos_decodes_past_the_end_of_sequence_token(reference):
    from offload.serve.sequence import Sequence, SamplingParams

    eos = reference.tokenizer.eos_token_id
    for ignore, want in ((False, "stop"), (True, None)):
        events = []
        seq = Sequence([eos], SamplingParams(max_tokens=8, ignore_eos=ignore), reference.tokenizer,
                       frozenset() if ignore else frozenset({eos}), events.append)
        seq.push(eos)
        assert seq.done == (want is not None) and (events[-1].finish_reason if events else None) == want
