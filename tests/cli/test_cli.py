"""The real programs: typer's runner for one-shot runs and errors, a pseudo-terminal for streaming and Ctrl-C."""
from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from offload.cli.chat import chat_app
from offload.cli.convert import convert_app

runner = CliRunner()


def test_one_prompt_prints_answer_and_plan(tiny_dir):
    r = runner.invoke(chat_app, [str(tiny_dir("mixtral")), "--prompt", "w1 w2 w3", "--max-new-tokens", "8",
                                 "--temperature", "0", "--cache-experts", "4"])
    assert r.exit_code == 0, r.output
    assert "memory plan" in r.output and "resident experts" in r.output
    assert len(re.findall(r"\bw\d+\b", r.output)) >= 8


def test_seeded_sampling_is_reproducible(tiny_dir):
    args = [str(tiny_dir("qwen3_moe")), "--prompt", "w5 w6", "--max-new-tokens", "12", "--seed", "3",
            "--temperature", "1.0"]
    a, b = runner.invoke(chat_app, args), runner.invoke(chat_app, args)
    assert a.exit_code == b.exit_code == 0
    assert a.stdout.splitlines()[-1] == b.stdout.splitlines()[-1]


@pytest.mark.parametrize("args, message", [
    (["/definitely/missing"], "does not exist"),
    (["--cache-experts", "1"], "give --cache-experts 2 or more"),
    (["--cache-experts", "lots"], "--cache-experts lots is not a slot count or a share of all experts"),
    (["--cache-memory", "1KiB"], "give --cache-memory 72.0KiB or more"),
    (["--cache-experts", "2", "--cache-memory", "1GiB"], "either --cache-experts N or --cache-memory SIZE"),
    (["--store", "disk"], "--store disk needs --store-dir PATH"),
    (["--bits", "4"], "--bits 4 needs a converted store: add --store disk and --store-dir PATH"),
    (["--policy", "nope"], "unknown policy"),
    (["--device", "tpu"], "device must be cpu, cuda or cuda:N, got --device tpu"),
    (["--context", "0"], "got --context 0"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_dir, args, message):
    """Errors name the flags, never the Python API's options (store_dir=PATH, store='disk', raw bytes)."""
    if not args[0].startswith("/"):
        args = [str(tiny_dir("mixtral"))] + args
    r = runner.invoke(chat_app, args + ["--prompt", "w1"])
    assert r.exit_code == 2
    assert message in r.output, r.output
    assert "Traceback" not in r.output
    assert not re.search(r"\b(store_dir|store|device|bits|cache_experts|cache_memory|context)=", r.output), r.output
    assert not re.search(r"\d{4,} bytes", r.output), r.output


def test_error_on_a_store_of_other_settings_reads_plainly(tiny_dir, tmp_path):
    """A settings mismatch names the formats as written, with no JSON quoting, and offload-convert's flag."""
    path = tiny_dir("mixtral")
    assert runner.invoke(convert_app, [str(path), "--out", str(tmp_path / "s"), "--bits", "8"]).exit_code == 0
    r = runner.invoke(chat_app, [str(path), "--store", "disk", "--store-dir", str(tmp_path / "s"), "--bits",
                                 "int4-g32", "--prompt", "w1"])
    assert r.exit_code == 2, r.output
    assert "made with dtype bfloat16, format 8, not dtype bfloat16, format int4-g32" in r.output, r.output
    assert "use another --store-dir PATH" in r.output and "'" not in r.output and '"' not in r.output
    other = tiny_dir("olmoe")
    r = runner.invoke(convert_app, [str(other), "--out", str(tmp_path / "s"), "--bits", "8"])
    assert r.exit_code == 2 and "use another --out PATH" in r.output, r.output


def test_cli_wording_translates_through_one_table():
    from offload.cli.common import cli_wording

    assert cli_wording("store='disk' needs store_dir=PATH.") == "--store disk needs --store-dir PATH."
    assert cli_wording("give cache_memory=1.5MiB or more, direct_io=False") == \
        "give --cache-memory 1.5MiB or more, --no-direct-io"
    assert cli_wording("prefetch_worker='thread'") == "prefetch_worker='thread'"  # no flag: left as the API says


def test_api_errors_keep_the_api_wording():
    from offload import OffloadConfig, OffloadError

    with pytest.raises(OffloadError, match=r"store='disk' needs store_dir=PATH"):
        OffloadConfig(store="disk")


def test_a_message_longer_than_the_context_is_one_line(tiny_dir):
    r = runner.invoke(chat_app, [str(tiny_dir("mixtral")), "--context", "8", "--prompt", " ".join(["w3"] * 20)])
    assert r.exit_code == 2 and "this message is 20 tokens, longer than the context of 8" in r.output
    assert "raise --context N" in r.output and "Traceback" not in r.output


def test_a_conversation_that_outgrows_the_context_drops_its_oldest_turns(tiny_dir):
    """Past --context the oldest turns go (the system prompt stays), one dim line says so, and every turn answers."""
    import io

    from rich.console import Console

    from offload.cli.session import Chat, Settings
    from offload.model import OffloadedModel

    shown = io.StringIO()
    with OffloadedModel.from_pretrained(tiny_dir("mixtral"), context=48) as model:
        chat = Chat(model, Settings(max_new_tokens=6, temperature=0.0, system="w9 w9"),
                    console=Console(file=shown, width=200))
        for turn in range(8):
            chat.answer(" ".join(f"w{turn + i}" for i in range(8)), stream=io.StringIO())
            assert chat.prompt_for("w1").shape[1] + 6 <= 48
        assert 2 <= len(chat.history) < 16 and chat.history[-2]["content"].startswith("w7 ")
        assert len(model.tokenizer(chat.settings.system)["input_ids"]) > 0
    assert shown.getvalue().count("oldest turns are dropped") == 1, shown.getvalue()


def test_policy_help_lists_only_online_policies():
    r = runner.invoke(chat_app, ["--help"], env={"COLUMNS": "200"})
    line = next(x for x in r.output.splitlines() if "--policy" in x)
    assert "lru" in line and "score" in line and "belady" not in r.output


@pytest.mark.parametrize("app", [chat_app, convert_app])
def test_h_and_version(app):
    from importlib.metadata import version

    assert runner.invoke(app, ["-h"]).exit_code == 0
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"moe-offload {version('moe-offload')}"


def test_help_shows_every_default():
    """Every option shows its default, a None default says what happens instead."""
    r = runner.invoke(chat_app, ["--help"], env={"COLUMNS": "300"})
    text = re.sub(r"[│╭╮╰╯─]", " ", r.output)
    for flag, shown in (("--cache-experts", "what fits in memory"), ("--threads", "half the cores"),
                        ("--context", "the model's maximum"), ("--max-new-tokens", "200"), ("--store ", "ram")):
        line = next(x for x in text.splitlines() if flag in x)
        assert "[default: " in line and shown in line, line
    assert "page cache" in text and "mmap" in text  # what "ram" means


def test_quick_start_shows_offloading(capfd):
    """The README's first command: the demo model with a quarter of its experts resident, answered and planned."""
    r = runner.invoke(chat_app, ["--cache-experts", "25%", "--prompt", "Hello", "--max-new-tokens", "8",
                                 "--temperature", "0"])
    assert r.exit_code == 0, r.output
    assert re.search(r"resident experts\s*│\s*16 of 64 \(25%", r.output), r.output
    plan = r.output[:r.output.index("└")]
    assert plan.count("GiB available") == 1 and "GiB free" not in plan  # on CPU, free RAM is said once
    for row in ("expert format", "dense (bfloat16)", "cache policy", "lru", "predictor", "none", "CPU threads"):
        assert row in plan, row
    assert "Loading weights" not in r.output + capfd.readouterr().err  # transformers' bar stays off
    assert "<|" not in r.output  # no special tokens in the answer


def test_loading_leaves_transformers_switches_as_found(tiny_dir):
    from transformers.utils import logging as hf_logging

    from offload.model import OffloadedModel

    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    OffloadedModel.from_pretrained(tiny_dir("mixtral"), cache_experts=4).close()
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before


def test_stats_show_hits_bytes_moved_per_tier_and_residency(tiny_dir):
    from rich.console import Console

    from offload.cli.session import stats_table
    from offload.model import OffloadedModel
    import torch

    with OffloadedModel.from_pretrained(tiny_dir("mixtral"), cache_experts=4) as m:
        m.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
        console = Console(width=200, record=True, file=open(os.devnull, "w"))
        console.print(stats_table(m, rate=12.5))
        text = console.export_text()
    s = m.stats()
    assert f"{s['hits']} hits, {s['misses']} misses" in text and "hit rate" in text
    assert re.search(r"bytes moved\s*│\s*ram \d+\.\d MiB", text), text
    assert f"resident experts       │ 4 of {s['total_experts']}" in text or "4 of 24" in text
    assert "12.5" in text


def test_convert_then_chat_from_disk_store(tiny_dir, tmp_path):
    r = runner.invoke(convert_app, [str(tiny_dir("olmoe")), "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s" / "index.json").exists()
    r = runner.invoke(chat_app, [str(tiny_dir("olmoe")), "--store", "disk", "--store-dir", str(tmp_path / "s"),
                                 "--prompt", "w1", "--max-new-tokens", "4", "--cache-experts", "3"])
    assert r.exit_code == 0, r.output


def read_until(fd: int, pattern: str, timeout: float = 60.0) -> str:
    buf, end = "", time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096).decode(errors="replace")
            except OSError:
                break
            buf += chunk
            if re.search(pattern, buf):
                return buf
    raise AssertionError(f"timed out waiting for {pattern!r}; got:\n{buf[-2000:]}")


def test_terminal_session_streams_stats_and_ctrl_c(tmp_path):
    """A real pseudo-terminal: stream an answer, /stats, Ctrl-C mid-answer, then Ctrl-D exits cleanly."""
    from tiny_models import build

    # room for an answer long enough to interrupt, and no end-of-sequence token to end it early
    build("mixtral", tmp_path, max_position_embeddings=8192, eos_token_id=None)
    pid, fd = pty.fork()
    if pid == 0:  # child: the real program
        os.execvp(sys.executable, [sys.executable, "-c", "from offload.cli.chat import main; main()",
                                   str(tmp_path), "--max-new-tokens", "4000", "--temperature", "1.0",
                                   "--context", "8192", "--seed", "0"])
    try:
        read_until(fd, r"\n> ")
        os.write(fd, b"w1 w2\n")
        out = read_until(fd, r"(w\d+ ){6}")  # tokens stream in one by one
        os.kill(pid, signal.SIGINT)  # stop the first answer early too: 4000 tokens would take a while
        out += read_until(fd, r"\n> ")
        os.write(fd, b"/stats\n")
        out = read_until(fd, r"hit rate[\s\S]*\n> ")
        assert "resident experts" in out
        os.write(fd, b"w4 w5\n")
        read_until(fd, r"w\d+ w\d+ w\d+")  # streaming has started
        os.kill(pid, signal.SIGINT)
        out = read_until(fd, r"stopped[\s\S]*> ")
        os.write(fd, b"\x04")  # Ctrl-D
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


def test_entry_points_installed():
    for tool in ("offload-chat", "offload-convert", "offload-bench"):
        r = subprocess.run([tool, "--help"], capture_output=True, text=True)
        assert r.returncode == 0, (tool, r.stderr[-500:])


# --- one line, exit 2, for what a user's files and flags get wrong -------------------------------------
def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def assert_one_line_exit_2(r, *fragments: str) -> None:
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    (line,) = error_lines(r.output)
    for fragment in fragments:
        assert fragment in line, (fragment, line)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody can write: a read-only tmpfs mount for root (whom chmod does not stop), else mode 555."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


def chat_args(model, *more: str) -> list[str]:
    return [str(model), "--prompt", "w1", "--max-new-tokens", "2", "--cache-experts", "4", *more]


def test_store_of_a_fine_tune_is_refused(tiny_dir, tmp_path):
    from tiny_models import fine_tune

    store = str(tmp_path / "s")
    r = runner.invoke(chat_app, chat_args(tiny_dir("mixtral"), "--store", "disk", "--store-dir", store))
    assert r.exit_code == 0, r.output
    tuned = fine_tune(tiny_dir("mixtral"), tmp_path / "tuned")
    r = runner.invoke(chat_app, chat_args(tuned, "--store", "disk", "--store-dir", store))
    assert_one_line_exit_2(r, "different checkpoint", "--store-dir", "reconvert")


def test_truncated_safetensors_is_one_line(tiny_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_dir("mixtral"), tmp_path / "m")
    f = next((tmp_path / "m").glob("*.safetensors"))
    os.truncate(f, f.stat().st_size // 2)
    assert_one_line_exit_2(runner.invoke(chat_app, chat_args(tmp_path / "m")), "truncated", "re-download")
    r = runner.invoke(convert_app, [str(tmp_path / "m"), "--out", str(tmp_path / "s")])
    assert_one_line_exit_2(r, "truncated", "re-download")


@pytest.mark.parametrize("content", ["", '{"version": 3, "records": [[0,'])
def test_empty_or_truncated_store_index_is_one_line(tiny_dir, tmp_path, content):
    store = tmp_path / "s"
    assert runner.invoke(convert_app, [str(tiny_dir("mixtral")), "--out", str(store)]).exit_code == 0
    (store / "index.json").write_text(content)
    r = runner.invoke(chat_app, chat_args(tiny_dir("mixtral"), "--store-dir", str(store)))
    assert_one_line_exit_2(r, "index.json", "delete")
    assert_one_line_exit_2(runner.invoke(convert_app, [str(tiny_dir("mixtral")), "--out", str(store)]), "index.json")


def test_read_only_store_dir_is_one_line(tiny_dir, read_only_dir):
    store = str(read_only_dir / "s")
    r = runner.invoke(chat_app, chat_args(tiny_dir("mixtral"), "--store", "disk", "--store-dir", store))
    assert_one_line_exit_2(r, "cannot write the expert store", "--store-dir")
    r = runner.invoke(convert_app, [str(tiny_dir("mixtral")), "--out", store])
    assert_one_line_exit_2(r, "cannot write the expert store", store)


def test_corrupt_tokenizer_is_one_line(tiny_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_dir("mixtral"), tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_bytes(b"\xff\xfe not json")
    assert_one_line_exit_2(runner.invoke(chat_app, chat_args(tmp_path / "m")), "tokenizer", "re-download")


def test_store_dir_alone_uses_the_disk_store(tiny_dir, tmp_path):
    r = runner.invoke(chat_app, chat_args(tiny_dir("mixtral"), "--store-dir", str(tmp_path / "s")),
                      env={"COLUMNS": "300"})  # the plan table at full width
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s" / "index.json").exists() and "disk store" in r.output
    r = runner.invoke(chat_app, chat_args(tiny_dir("mixtral"), "--store", "ram", "--store-dir", str(tmp_path / "t")))
    assert_one_line_exit_2(r, "is for the disk store", "--store ram")
    assert not (tmp_path / "t").exists()


def test_cache_larger_than_the_model_says_it_was_capped(tiny_dir):
    r = runner.invoke(chat_app, [str(tiny_dir("mixtral")), "--prompt", "w1", "--max-new-tokens", "2",
                                 "--cache-experts", "1000"], env={"COLUMNS": "200"})  # the plan row unwrapped
    assert r.exit_code == 0, r.output
    assert "cache_experts=1000 capped to the model's 24" in r.output


def test_belady_is_refused_before_loading(tiny_dir):
    r = runner.invoke(chat_app, chat_args(tiny_dir("mixtral"), "--policy", "belady"))
    assert_one_line_exit_2(r, "belady", "offload-bench policies")
    assert "memory plan" not in r.output
