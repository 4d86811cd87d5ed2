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
    (["--cache-experts", "1"], "cache_experts to >= 2"),
    (["--store", "disk"], "needs store_dir"),
    (["--policy", "nope"], "unknown policy"),
    (["--device", "tpu"], "device must be"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_dir, args, message):
    if not args[0].startswith("/"):
        args = [str(tiny_dir("mixtral"))] + args
    r = runner.invoke(chat_app, args + ["--prompt", "w1"])
    assert r.exit_code == 2
    assert message in r.output
    assert "Traceback" not in r.output


def test_prompt_longer_than_context(tiny_dir):
    r = runner.invoke(chat_app, [str(tiny_dir("mixtral")), "--context", "8", "--prompt", " ".join(["w3"] * 20)])
    assert r.exit_code == 2 and "longer than the context of 8" in r.output


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
    r = runner.invoke(chat_app, chat_args(tiny_dir("mixtral"), "--store-dir", str(tmp_path / "s")))
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
