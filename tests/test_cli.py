"""The `qwen` command: help everywhere, init/info/generate on a tiny checkpoint, the chat REPL commands."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qwen.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen", *args], capture_output=True, text=True, input=stdin,
                          cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def tiny_chat_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tinychat")
    proc = run_cli("init", "--preset", "tiny", str(path), "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    return path


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command):
    proc = run_cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert f"qwen {command}" in proc.stdout and "--" in proc.stdout


def test_unknown_command_fails_clearly(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_init_then_info(tiny_chat_dir):
    proc = run_cli("info", str(tiny_chat_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["config"]["hidden_size"] == 64 and info["dtypes"] == {"bfloat16": info["parameters"]}
    human = run_cli("info", str(tiny_chat_dir)).stdout
    assert "parameters" in human and "seq_length 64" in human


def test_init_rejects_unknown_preset(tmp_path):
    proc = run_cli("init", "--preset", "qwen-3t", str(tmp_path / "x"))
    assert proc.returncode != 0 and "unknown preset 'qwen-3t'" in proc.stderr


def test_generate_is_deterministic_when_greedy(tiny_chat_dir):
    a = run_cli("generate", "--model", str(tiny_chat_dir), "Hello", "--greedy", "--max-new-tokens", "8", "--stats")
    b = run_cli("generate", "--model", str(tiny_chat_dir), "Hello", "--greedy", "--max-new-tokens", "8")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and "8 generated" in a.stderr
    chat = run_cli("generate", "--model", str(tiny_chat_dir), "--chat", "你好", "--greedy", "--max-new-tokens", "4")
    assert chat.returncode == 0, chat.stderr


def test_default_model_chats_or_explains_how_to_point_at_a_checkpoint():
    from qwen.hub import demo_model_available

    proc = run_cli("chat", stdin="你好\n:q\n")
    if demo_model_available():  # `make chat` with no model argument: the embedded demo model answers
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip()
    else:
        assert proc.returncode == 1
        assert "qwen-demo" in proc.stderr and "--model" in proc.stderr


def test_chat_repl_commands_change_generation(tiny_chat_dir):
    script = "\n".join([":h", ":conf max_new_tokens=3 do_sample=False", ":seed 7", "你好", ":his", ":clh", ":his",
                        ":conf bogus_key=1", ":reset-conf", ":conf", ":q"]) + "\n"
    proc = run_cli("chat", "--model", str(tiny_chat_dir), stdin=script)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert ":clear-his" in out  # help text
    assert "max_new_tokens = 3" in out and "seed: 7" in out
    assert "User[0]: 你好" in out and "History cleared." in out and "(empty)" in out
    assert "unknown generation settings ['bogus_key']" in out
    assert out.rstrip().endswith("seed = 1234") or "max_new_tokens = 512" in out.split("restored")[-1]


def test_conf_really_limits_the_answer(tiny_chat_dir):
    from qwen import AutoModelForCausalLM, AutoTokenizer
    from qwen.chat import ChatSession
    from qwen.demos.cli_chat import handle_command

    model = AutoModelForCausalLM.from_pretrained(str(tiny_chat_dir), progress=False)
    tok = AutoTokenizer.from_pretrained(str(tiny_chat_dir))
    session = ChatSession(model, tok)
    defaults = session.generation_config.copy()
    handle_command(session, ":conf max_new_tokens=2 do_sample=False", defaults, out=io.StringIO())
    session.send("hello")
    assert session.last_response is not None and session.last_response.generation_tokens <= 2
    handle_command(session, ":reset-conf", defaults, out=io.StringIO())
    assert session.generation_config.max_new_tokens == defaults.max_new_tokens
