"""The import graph of qwen/ follows docs/architecture.md: layers, imports only downwards, no cycles.

Every ``import`` / ``from ... import`` statement counts, also those inside functions (a lazy import
is still a dependency). Read from the source with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qwen"

# (layer, module prefixes), lowest first: a module may import its own layer and the layers below.
LAYERS = [
    ("core", ["qwen.config", "qwen.cache", "qwen.model", "qwen.generate", "qwen.sampling", "qwen.generation_config",
              "qwen.checkpoint", "qwen.hub", "qwen.transforms", "qwen.compiled"]),
    ("text", ["qwen.chat_template", "qwen.tokenizer", "qwen.data", "qwen.chat", "qwen.sandbox"]),
    ("kernels", ["qwen.kernels", "qwen.cpu_pack"]),
    ("quant", ["qwen.quant", "qwen.kernels.decode"]),
    ("training", ["qwen.finetune", "qwen.interop", "qwen.export_gguf"]),
    ("serving", ["qwen.serve", "qwen.agent"]),
    ("tools", ["qwen.bench", "qwen.eval", "qwen.demos", "qwen.commands", "qwen.auto", "qwen.cli", "qwen.__main__", "qwen"]),
]
CORE_MUST_NOT_IMPORT = ("qwen.quant", "qwen.kernels", "qwen.finetune", "qwen.serve", "qwen.chat", "qwen.tokenizer",
                        "qwen.cpu_pack")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from pkg import sub` depends on the submodule when there is one, else on pkg itself.
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in mods else source for a in node.names]
            else:
                continue
            edges[name] |= {t for t in targets if t in mods and t != name}
    return edges


def layer_of(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} is in no layer of docs/architecture.md"
    return best[0]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_every_import_goes_down_the_layers() -> None:
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) -> {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in import_graph().items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert upward == []


def test_the_core_knows_no_adapter() -> None:
    edges = import_graph()
    core = [m for m in edges if layer_of(m) == 0]
    assert {"qwen.model", "qwen.checkpoint", "qwen.generate", "qwen.cache", "qwen.config"} <= set(core)
    bad = [f"{m} -> {t}" for m in core for t in sorted(edges[m]) if t.startswith(CORE_MUST_NOT_IMPORT)]
    assert bad == []


def test_the_graph_checker_sees_real_edges() -> None:
    """Guard against a checker that finds nothing: known edges must be there, lazy ones included."""
    edges = import_graph()
    assert "qwen.model" in edges["qwen.checkpoint"]
    assert "qwen.quant.linear" in edges["qwen.kernels.decode"]  # imported inside FusedDecoder.build
    assert "qwen.kernels" in edges["qwen.cpu_pack"]  # `from . import kernels`
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_docs_architecture_lists_the_same_layers() -> None:
    """docs/architecture.md's layer table is this file's LAYERS: the picture cannot drift from the check."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d) \| (\w+) \| (.+?) \|", text, flags=re.M)
    documented = [(name, sorted(re.findall(r"`(qwen[\w.]*)`", mods))) for _, name, mods in rows]
    assert documented == [(name, sorted(prefixes)) for name, prefixes in LAYERS]
