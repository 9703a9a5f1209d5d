"""The agent's built-in tools: a calculator and a sandboxed Python code interpreter.

- ``calculator``: exact arithmetic on an expression (``+ - * / // % **``, parentheses, and the
  functions of :mod:`math`), evaluated over a parsed syntax tree, never ``eval``: a model cannot run
  code through it, and huge powers or factorials are refused instead of freezing the process.
- ``code_interpreter``: the model writes Python in a triple-backtick block (react_demo.py's
  ``args_format: code``); it runs in a :class:`qwen.sandbox.PythonSession` (a separate process with no
  network, a working directory it cannot leave, CPU / memory / time / output limits) that keeps its
  variables across calls like a notebook. The observation holds stdout, the last expression's value,
  the error, and the PNG files of the matplotlib figures the code drew (as Markdown images, so the
  web page shows them and the CLI prints their paths).

Both are registered by name (``qwen/agent/__init__.py``): ``Agent(backend, ["calculator",
"code_interpreter"])``. Each ``get_tool("code_interpreter")`` is a fresh session: close it with
``tool.close()`` (an agent's tools are closed by ``Agent.close``).
"""

from __future__ import annotations

import ast
import math
import operator
import os
from pathlib import Path
from typing import Any, Callable

from .tools import Tool, ToolParam

# ------------------------------------------------------------------------------------------- calculator
_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    name: getattr(math, name) for name in (
        "sqrt", "exp", "log", "log2", "log10", "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh",
        "cosh", "tanh", "floor", "ceil", "fabs", "factorial", "gcd", "lcm", "comb", "perm", "degrees", "radians",
        "hypot", "isqrt")
}
_FUNCTIONS.update(abs=abs, round=round, min=min, max=max, pow=pow)
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf}
_MAX_EXPONENT_BITS = 10_000  # 2 ** 10000 is fine; 10 ** 10 ** 10 would take the process down
_MAX_FACTORIAL = 5_000


class CalculatorError(ValueError):
    """An expression the calculator does not evaluate (named in the message)."""


def _evaluate(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, complex)) \
            and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise CalculatorError(f"unknown name {node.id!r}")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and isinstance(left, int) and isinstance(right, int) and right > 0 \
                and abs(left) > 1 and right * max(1, abs(left).bit_length()) > _MAX_EXPONENT_BITS:
            raise CalculatorError(f"{left} ** {right} is too large to compute exactly")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS \
            and not node.keywords:
        args = [_evaluate(a) for a in node.args]
        if node.func.id == "factorial" and args and isinstance(args[0], int) and args[0] > _MAX_FACTORIAL:
            raise CalculatorError(f"factorial({args[0]}) is too large")
        return _FUNCTIONS[node.func.id](*args)
    raise CalculatorError(f"unsupported syntax: {ast.unparse(node) if hasattr(ast, 'unparse') else node!r}")


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly; the result as text (integers stay integers)."""
    text = expression.strip().strip("`").replace("^", "**").replace("×", "*").replace("÷", "/")
    if text.endswith("="):
        text = text[:-1]
    if not text:
        raise CalculatorError("empty expression")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from e
    try:
        value = _evaluate(tree)
    except ZeroDivisionError as e:
        raise CalculatorError("division by zero") from e
    except (OverflowError, ValueError, TypeError) as e:
        if isinstance(e, CalculatorError):
            raise
        raise CalculatorError(f"{type(e).__name__}: {e}") from e
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))  # 6 / 3 -> "2": the model copies the number into its answer
    return repr(value) if isinstance(value, float) else str(value)


def calculator_tool() -> Tool:
    return Tool(
        "calculator",
        "Evaluates an arithmetic expression exactly and returns the number: + - * / // % ** and "
        "parentheses, constants pi and e, functions sqrt, log, exp, sin, cos, factorial, gcd, round ...",
        [ToolParam("expression", {"type": "string"}, "the expression, e.g. (12 + 7) * 3 / 2", True)],
        fn=calculate, name_for_human="Calculator",
    )


# ------------------------------------------------------------------------------------- code interpreter
class CodeInterpreter(Tool):
    """A notebook-like Python session in the sandbox, as a tool (state kept across calls)."""

    def __init__(self, workdir: str | os.PathLike | None = None, limits: Any = None) -> None:
        super().__init__(
            "code_interpreter",
            "A Python 3 sandbox (a Jupyter-like session: variables persist between calls). Use it for "
            "calculations, data processing, reading and writing files in its working directory, and plots "
            "with matplotlib (figures are saved and shown). It has no internet access. The output of print() "
            "and the value of the last expression are returned.",
            [ToolParam("code", {"type": "string"}, "the Python code to run", True)],
            name_for_human="Code Interpreter", args_format="code",
        )
        self._workdir = Path(workdir) if workdir is not None else None
        self._limits = limits
        self._session: Any = None

    @property
    def session(self) -> Any:
        if self._session is None:
            from ..sandbox import PythonSession, SandboxLimits

            limits = self._limits if self._limits is not None else SandboxLimits(timeout_s=30.0, memory_mb=2048)
            self._session = PythonSession(workdir=self._workdir, limits=limits)
        return self._session

    @property
    def workdir(self) -> Path:
        return Path(self.session.workdir)

    def run(self, code: str = "", **_: Any) -> str:
        if not code.strip():
            return "error: no code was given (write it in a ```py ... ``` block)"
        return format_run(self.session.run(code))

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self) -> "CodeInterpreter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def format_run(result: Any) -> str:
    """A sandbox RunResult as the Observation text the model reads."""
    parts: list[str] = []
    if result.stdout.strip():
        parts.append("stdout:\n" + result.stdout.rstrip())
    if result.status == "ok":
        if result.value is not None:
            parts.append("result: " + result.value)
    else:
        detail = result.error or result.status
        tail = result.stderr.strip().splitlines()[-6:] if result.status == "error" and result.stderr else []
        parts.append("error: " + detail + ("\n" + "\n".join(tail) if tail and detail not in tail[-1] else ""))
    for img in result.images:
        parts.append(f"![figure]({img})")
    if not parts:
        parts.append("(the code ran and printed nothing)")
    if result.truncated:
        parts.append("(output truncated)")
    return "\n".join(parts)


__all__ = ["CalculatorError", "calculate", "calculator_tool", "CodeInterpreter", "format_run"]
