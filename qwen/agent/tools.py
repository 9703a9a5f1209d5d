"""Tools for the ReAct agent: plain objects built from Python functions, and a registry by name.

A :class:`Tool` has a name, a description and a list of :class:`ToolParam`; it renders itself in
the two shapes Qwen meets tools in: the plugin dict of the official ``react_demo.py`` (parameters
as a list of ``{"name", "description", "required", "schema"}``) and the OpenAI ``tools=`` entry
(parameters as a JSON-schema object). :meth:`Tool.call` takes the model's ``Action Input`` text
(or a dict), parses it leniently (json5 when installed, as the official tutorial recommends, else
json; a lone parameter may receive the raw text), checks and coerces the arguments against the
parameter schemas, and returns the result as a string (non-strings are dumped as JSON with
``ensure_ascii=False``, as the demo asks plugins to do). Problems with the input raise
:class:`ToolInputError` with a message written for the model to read.

Built-in tools (the code interpreter, for example) register themselves by name with
:func:`register_tool`, lazily as ``"module:attribute"`` strings so that importing this module stays
cheap; :func:`get_tool` resolves a name to a fresh :class:`Tool`.
"""

from __future__ import annotations

import collections.abc as cabc
import enum
import importlib
import inspect
import json
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

ARGS_FORMATS = ("json", "code")


class ToolInputError(ValueError):
    """The Action Input could not be turned into valid arguments (the message is for the model)."""


# ---------------------------------------------------------------------------------------------- parameters
@dataclass
class ToolParam:
    """One parameter: ``schema`` is the JSON schema of its value (type, items, enum, default)."""

    name: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})
    description: str = ""
    required: bool = True

    def to_qwen(self) -> dict[str, Any]:
        """The parameter as react_demo.py declares one."""
        return {"name": self.name, "description": self.description, "required": self.required,
                "schema": dict(self.schema)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ToolParam":
        """From the Qwen-style dict ``{"name", "description", "required", "schema"}``."""
        if not isinstance(d.get("name"), str) or not d["name"]:
            raise ValueError(f"a tool parameter needs a 'name': {dict(d)!r}")
        return cls(d["name"], dict(d.get("schema") or {"type": "string"}), str(d.get("description", "")),
                   bool(d.get("required", True)))


def _is_optional(annotation: Any) -> tuple[bool, Any]:
    """(True, X) for Optional[X] / X | None, else (False, annotation)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) < len(typing.get_args(annotation)):
            return True, (args[0] if len(args) == 1 else typing.Union[tuple(args)])
    return False, annotation


def schema_for(annotation: Any, default: Any = inspect.Parameter.empty) -> dict[str, Any]:
    """The JSON schema of a type hint (an unannotated parameter is described by its default, else a string)."""
    if annotation is inspect.Parameter.empty:
        if default is inspect.Parameter.empty or default is None:
            return {"type": "string"}
        annotation = type(default)
    _, annotation = _is_optional(annotation)
    if annotation is Any:
        return {}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        values = list(args)
        out = schema_for(type(values[0])) if values and all(type(v) is type(values[0]) for v in values) else {}
        return {**out, "enum": values}
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return {"anyOf": [schema_for(a) for a in args]}
    base = origin or annotation
    if isinstance(base, type) and issubclass(base, enum.Enum):
        values = [m.value for m in base]
        return {**schema_for(type(values[0])), "enum": values} if values else {}
    if base is bool:
        return {"type": "boolean"}
    if base is int:
        return {"type": "integer"}
    if base is float:
        return {"type": "number"}
    if base is str:
        return {"type": "string"}
    if isinstance(base, type) and not issubclass(base, (str, bytes)) and issubclass(
            base, (list, tuple, set, frozenset, cabc.Sequence)):
        out: dict[str, Any] = {"type": "array"}
        if args and args[0] is not Ellipsis:
            item = schema_for(args[0])
            if item:
                out["items"] = item
        return out
    if isinstance(base, type) and issubclass(base, cabc.Mapping):
        return {"type": "object"}
    return {"type": "string"}


# ---------------------------------------------------------------------------------------------- docstrings
_SECTION_NAMES = {
    "args": "params", "arguments": "params", "parameters": "params", "params": "params",
    "keyword args": "params", "keyword arguments": "params", "other parameters": "params",
    "returns": "other", "return": "other", "yields": "other", "yield": "other", "raises": "other",
    "examples": "other", "example": "other", "notes": "other", "note": "other", "see also": "other",
    "references": "other", "attributes": "other", "warnings": "other", "warning": "other", "todo": "other",
}
_GOOGLE_ENTRY = re.compile(r"^\*{0,2}(\w+)\s*(?:\(([^)]*)\))?\s*:\s*(.*)$")
_NUMPY_ENTRY = re.compile(r"^\*{0,2}(\w+(?:\s*,\s*\*{0,2}\w+)*)\s*(?::\s*(.*))?$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _words(parts: Sequence[str]) -> str:
    return " ".join(" ".join(parts).split())


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) from a Google- or NumPy-style docstring.

    The description is the text before the first section, on one line (it goes inside one line of
    the ReAct prompt). Parameters come from ``Args:`` / ``Parameters`` sections: Google entries
    ``name (type): text`` or ``name: text``, NumPy entries ``name : type`` with the text indented below.
    """
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    summary: list[str] = []
    params: dict[str, list[str]] = {}
    section: str | None = None
    style = "google"
    base: int | None = None
    current: list[str] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        key = stripped.rstrip(":").strip().lower()
        numpy_header = (i + 1 < len(lines) and key in _SECTION_NAMES and not stripped.endswith(":")
                        and re.fullmatch(r"-{3,}", lines[i + 1].strip()) is not None)
        google_header = stripped.endswith(":") and key in _SECTION_NAMES and _indent(line) == 0
        if numpy_header or google_header:
            section, style, base, current = _SECTION_NAMES[key], "numpy" if numpy_header else "google", None, None
            i += 2 if numpy_header else 1
            continue
        i += 1
        if section is None:
            summary.append(stripped)
            continue
        if section != "params" or not stripped:
            continue
        if base is None:
            base = _indent(line)
        if _indent(line) < base:  # dedented text after a Google section: back to prose
            section = None
            summary.append(stripped)
            continue
        if _indent(line) == base:
            m = (_NUMPY_ENTRY if style == "numpy" else _GOOGLE_ENTRY).match(stripped)
            if m:
                current = []
                for name in re.split(r"\s*,\s*", m.group(1)):
                    params[name.lstrip("*")] = current
                if style == "google" and m.group(3):
                    current.append(m.group(3))
                continue
        if current is not None:
            current.append(stripped)
    return _words(summary), {k: _words(v) for k, v in params.items()}


# ---------------------------------------------------------------------------------------------- arguments
def _loads(text: str) -> Any:
    """json5.loads when json5 is installed (it accepts single quotes, trailing commas, bare keys), else json."""
    try:
        import json5
    except ImportError:
        return json.loads(text)
    return json5.loads(text)


def _first_object(text: str) -> str | None:
    """The first balanced ``{...}`` in text (quotes respected), or None."""
    start = text.find("{")
    if start < 0:
        return None
    depth, quote, escaped = 0, "", False
    for pos in range(start, len(text)):
        ch = text[pos]
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:pos + 1]
    return None


_NOT_PARSED = object()


def parse_json_arguments(text: str) -> Any:
    """The value of an Action Input, or ``_NOT_PARSED``: the whole text, else its first ``{...}``
    (the model often writes more after the object, or wraps it in a code fence)."""
    for candidate in (text, _first_object(text)):
        if candidate:
            try:
                return _loads(candidate)
            except (ValueError, RecursionError):
                pass
    return _NOT_PARSED


def extract_code(text: str) -> str:
    """The body of the first triple-backtick block (language tag dropped), or the text itself."""
    start = text.find("```")
    if start < 0:
        return text.strip()
    body = text[start + 3:]
    newline = body.find("\n")
    if newline >= 0 and re.fullmatch(r"[\w+#.-]*", body[:newline].strip()):
        body = body[newline + 1:]
    end = body.find("```")
    return (body if end < 0 else body[:end]).strip("\n")


_TYPE_WORDS = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "a boolean (true/false)",
               "array": "a list", "object": "an object"}


def _coerce(value: Any, schema: Mapping[str, Any], path: str, tool: str) -> Any:
    """value checked against schema, converting what is unambiguous ("3" -> 3 for an integer)."""
    kind = schema.get("type")
    where = f"argument {path!r} of tool {tool!r}"

    def fail() -> ToolInputError:
        return ToolInputError(f"{where} must be {_TYPE_WORDS.get(kind, kind)}, got {json.dumps(value, ensure_ascii=False)}")

    if "anyOf" in schema:
        for option in schema["anyOf"]:
            try:
                return _coerce(value, option, path, tool)
            except ToolInputError:
                pass
        raise ToolInputError(f"{where} has the wrong type: {json.dumps(value, ensure_ascii=False)}")
    if kind == "string":
        if isinstance(value, str):
            out: Any = value
        elif isinstance(value, (bool, int, float)):
            out = json.dumps(value)
        elif isinstance(value, (list, dict)):
            out = json.dumps(value, ensure_ascii=False)
        else:
            raise fail()
    elif kind == "integer":
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int):
            out = value
        elif isinstance(value, float) and value.is_integer():
            out = int(value)
        elif isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
            out = int(value)
        else:
            raise fail()
    elif kind == "number":
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                raise fail() from None
        else:
            raise fail()
    elif kind == "boolean":
        if isinstance(value, bool):
            out = value
        elif isinstance(value, int) and value in (0, 1):
            out = bool(value)
        elif isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            out = value.strip().lower() in ("true", "yes", "1")
        else:
            raise fail()
    elif kind == "array":
        if isinstance(value, str):
            parsed = parse_json_arguments(value)
            value = parsed if isinstance(parsed, list) else value
        if not isinstance(value, (list, tuple)):
            raise fail()
        items = schema.get("items")
        out = [_coerce(v, items, f"{path}[{n}]", tool) for n, v in enumerate(value)] if items else list(value)
    elif kind == "object":
        if isinstance(value, str):
            parsed = parse_json_arguments(value)
            value = parsed if isinstance(parsed, dict) else value
        if not isinstance(value, dict):
            raise fail()
        out = value
    else:
        out = value
    if "enum" in schema and out not in schema["enum"]:
        choices = ", ".join(json.dumps(v, ensure_ascii=False) for v in schema["enum"])
        raise ToolInputError(f"{where} must be one of {choices}, got {json.dumps(value, ensure_ascii=False)}")
    return out


# ---------------------------------------------------------------------------------------------- Tool
class Tool:
    """A tool the agent can call: ``fn(**arguments)`` (or override :meth:`run`) behind a schema.

    ``args_format`` is how the model writes the input, as react_demo.py's plugin ``args_format``:
    ``"json"`` (a JSON object; the prompt says so) or ``"code"`` (a triple-backtick block, passed
    whole to the tool's single parameter: the shape a code interpreter wants).
    """

    def __init__(self, name: str, description: str = "", parameters: Sequence[ToolParam | Mapping[str, Any]] = (),
                 fn: Callable[..., Any] | None = None, *, name_for_human: str | None = None,
                 args_format: str = "json", accepts_extra: bool = False) -> None:
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise ValueError(f"a tool name must be a non-empty string without spaces, got {name!r}")
        if args_format not in ARGS_FORMATS:
            raise ValueError(f"args_format must be one of {ARGS_FORMATS}, got {args_format!r}")
        self.name = name
        self.description = description
        self.parameters = [p if isinstance(p, ToolParam) else ToolParam.from_dict(p) for p in parameters]
        names = [p.name for p in self.parameters]
        if len(set(names)) != len(names):
            raise ValueError(f"tool {name!r} declares a parameter twice: {names}")
        self.fn = fn
        self.name_for_human = name_for_human or name
        self.args_format = args_format
        self.accepts_extra = accepts_extra

    def __repr__(self) -> str:
        return f"Tool({self.name!r}, parameters={[p.name for p in self.parameters]})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped function itself (a decorated function stays callable)."""
        if self.fn is None:
            return self.run(**kwargs)
        return self.fn(*args, **kwargs)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_function(cls, fn: Callable[..., Any], name: str | None = None, description: str | None = None,
                      name_for_human: str | None = None, args_format: str = "json") -> "Tool":
        """A tool from a function's signature (type hints, defaults) and docstring (``Args:`` entries)."""
        doc_description, doc_params = parse_docstring(inspect.getdoc(fn))
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # an unresolvable forward reference: fall back to the raw annotations
            hints = {}
        params: list[ToolParam] = []
        accepts_extra = False
        for p in inspect.signature(fn).parameters.values():
            if p.kind is p.VAR_KEYWORD:
                accepts_extra = True
                continue
            if p.kind is p.VAR_POSITIONAL:
                continue
            if p.kind is p.POSITIONAL_ONLY:
                raise ValueError(f"{fn!r}: positional-only parameter {p.name!r} cannot be passed by name")
            annotation = hints.get(p.name, p.annotation)
            schema = schema_for(annotation, p.default)
            if p.default is not p.empty and p.default is not None:
                try:
                    json.dumps(p.default)
                    schema["default"] = p.default.value if isinstance(p.default, enum.Enum) else p.default
                except (TypeError, ValueError):
                    pass
            params.append(ToolParam(p.name, schema, doc_params.get(p.name, ""), p.default is p.empty))
        return cls(name or getattr(fn, "__name__", "tool"), doc_description if description is None else description,
                   params, fn, name_for_human=name_for_human, args_format=args_format, accepts_extra=accepts_extra)

    @classmethod
    def from_qwen(cls, info: Mapping[str, Any], fn: Callable[..., Any]) -> "Tool":
        """From a react_demo.py plugin dict (name_for_model, name_for_human, description_for_model, parameters)."""
        name = info.get("name_for_model", info.get("name"))
        return cls(name, info.get("description_for_model", info.get("description", "")),
                   info.get("parameters") or [], fn, name_for_human=info.get("name_for_human"),
                   args_format=info.get("args_format", "json"))

    # ------------------------------------------------------------------ schemas
    def to_qwen(self) -> dict[str, Any]:
        """The plugin dict of react_demo.py (also accepted by ``qwen serve``'s ``functions=``)."""
        return {"name_for_human": self.name_for_human, "name_for_model": self.name,
                "description_for_model": self.description,
                "parameters": [p.to_qwen() for p in self.parameters], "args_format": self.args_format}

    def json_schema(self) -> dict[str, Any]:
        """The parameters as one JSON-schema object."""
        props = {}
        for p in self.parameters:
            props[p.name] = {**p.schema, **({"description": p.description} if p.description else {})}
        return {"type": "object", "properties": props, "required": [p.name for p in self.parameters if p.required]}

    def to_openai(self) -> dict[str, Any]:
        """An entry of the OpenAI API's ``tools=`` list."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.json_schema()}}

    # ------------------------------------------------------------------ calling
    def _primary(self) -> ToolParam | None:
        """The parameter a bare (non-object) input goes to: the only one, else the only required one."""
        if len(self.parameters) == 1:
            return self.parameters[0]
        required = [p for p in self.parameters if p.required]
        return required[0] if len(required) == 1 else None

    def _example(self) -> str:
        return "{" + ", ".join(f'"{p.name}": ...' for p in self.parameters) + "}"

    def parse_arguments(self, arguments: str | Mapping[str, Any] | None) -> dict[str, Any]:
        """Checked keyword arguments from the model's Action Input (text or an already parsed dict)."""
        if arguments is None:
            arguments = ""
        if isinstance(arguments, Mapping):
            raw: Any = dict(arguments)
        elif isinstance(arguments, str):
            raw = self._parse_text(arguments)
        else:
            raise ToolInputError(f"the input of tool {self.name!r} must be text or a JSON object")
        return self._check(raw)

    def _parse_text(self, text: str) -> dict[str, Any]:
        text = text.strip()
        primary = self._primary()
        if self.args_format == "code":
            if text.startswith("{"):
                value = parse_json_arguments(text)
                if isinstance(value, dict) and (primary is None or primary.name in value):
                    return value
            if primary is None:
                raise ToolInputError(f"tool {self.name!r} takes code but has no single parameter to pass it to")
            return {primary.name: extract_code(text)} if text else {}
        if not text:
            return {}
        value = parse_json_arguments(text)
        if isinstance(value, dict):
            return value
        if primary is not None and value is not _NOT_PARSED:
            return {primary.name: value}  # a bare JSON value ("Paris", 3): the lone parameter's
        if primary is not None and primary.schema.get("type", "string") == "string":
            return {primary.name: text}  # not JSON at all: the raw text, if the parameter takes text
        if value is _NOT_PARSED:
            raise ToolInputError(f"the Action Input of tool {self.name!r} is not a JSON object: {text!r}. "
                                 f"Write it as {self._example()}")
        raise ToolInputError(f"the Action Input of tool {self.name!r} must be a JSON object like {self._example()}, "
                             f"got {json.dumps(value, ensure_ascii=False)}")

    def _check(self, raw: dict[str, Any]) -> dict[str, Any]:
        by_name = {p.name: p for p in self.parameters}
        unknown = [k for k in raw if k not in by_name]
        if unknown and not self.accepts_extra:
            valid = ", ".join(by_name) or "none"
            raise ToolInputError(f"tool {self.name!r} has no parameter {', '.join(repr(k) for k in unknown)} "
                                 f"(its parameters: {valid})")
        missing = [p.name for p in self.parameters if p.required and p.name not in raw]
        if missing:
            raise ToolInputError(f"tool {self.name!r} needs the argument{'s' if len(missing) > 1 else ''} "
                                 f"{', '.join(repr(m) for m in missing)}; write the Action Input as {self._example()}")
        out: dict[str, Any] = {}
        for key, value in raw.items():
            p = by_name.get(key)
            if p is None:
                out[key] = value
            elif value is None and not p.required:
                out[key] = None
            else:
                out[key] = _coerce(value, p.schema, key, self.name)
        return out

    def run(self, **kwargs: Any) -> Any:
        """Do the work (default: call ``fn``). Subclasses that keep state override this."""
        if self.fn is None:
            raise NotImplementedError(f"tool {self.name!r} has no function: pass fn= or override run()")
        return self.fn(**kwargs)

    def call(self, arguments: str | Mapping[str, Any] | None) -> str:
        """Run on the model's Action Input; the result as text for the Observation.

        Raises :class:`ToolInputError` for input that does not fit the parameters; whatever the
        tool itself raises propagates (the agent turns both into an Observation).
        """
        result = self.run(**self.parse_arguments(arguments))
        if isinstance(result, str):
            return result
        try:
            return json.dumps(result, ensure_ascii=False)
        except (TypeError, ValueError):
            return str(result)


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None,
         name_for_human: str | None = None, args_format: str = "json") -> Any:
    """Decorator: ``@tool`` or ``@tool(name=..., description=...)`` turns a function into a :class:`Tool`."""
    def wrap(f: Callable[..., Any]) -> Tool:
        return Tool.from_function(f, name=name, description=description, name_for_human=name_for_human,
                                  args_format=args_format)
    return wrap(fn) if fn is not None else wrap


def as_tool(obj: Tool | Callable[..., Any] | str) -> Tool:
    """A Tool from a Tool, a plain function, or a registered name."""
    if isinstance(obj, Tool):
        return obj
    if isinstance(obj, str):
        return get_tool(obj)
    if callable(obj):
        return Tool.from_function(obj)
    raise TypeError(f"not a tool: {obj!r} (give a Tool, a function or a registered tool name)")


# ---------------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Tool | Callable[[], Tool] | str] = {}


def register_tool(name: str, tool_or_factory: Tool | Callable[[], Tool] | str) -> None:
    """Make a tool available by name: a Tool, a zero-argument factory returning one (a fresh tool
    per agent, for tools with state), or ``"module:attribute"`` naming either (imported on first use)."""
    if isinstance(tool_or_factory, str) and ":" not in tool_or_factory:
        raise ValueError(f"a lazy tool is given as 'module:attribute', got {tool_or_factory!r}")
    _REGISTRY[name] = tool_or_factory


def unregister_tool(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered_tools() -> list[str]:
    return sorted(_REGISTRY)


def get_tool(name: str) -> Tool:
    """The registered tool ``name`` (factories are called each time)."""
    if name not in _REGISTRY:
        known = ", ".join(registered_tools()) or "none"
        raise KeyError(f"no tool is registered as {name!r} (registered: {known})")
    obj = _REGISTRY[name]
    if isinstance(obj, str):
        module, _, attr = obj.partition(":")
        obj = getattr(importlib.import_module(module), attr)
    if not isinstance(obj, Tool):
        obj = obj()
        if not isinstance(obj, Tool):
            raise TypeError(f"the factory registered as {name!r} returned {type(obj).__name__}, not a Tool")
    return obj
