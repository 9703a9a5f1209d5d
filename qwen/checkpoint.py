"""Load and save checkpoints in the official Qwen (v1) layout.

A checkpoint directory holds config.json, weights (model.safetensors, or sharded
model-0000k-of-0000n.safetensors + model.safetensors.index.json, or pytorch_model*.bin), qwen.tiktoken
and generation_config.json. Tensor names are the official ones, so no key map is needed.

Loading builds the model on the meta device, allocates each module on its target device and dtype,
then reads every tensor straight from the file into its parameter. We parse the safetensors header
ourselves for reading (it is 8 bytes of length + JSON): this lets us read into the destination
without mmap pages accumulating in the resident set (peak RAM ~ model + one tensor) and name the
file and tensor in every error. Writing uses the safetensors library. Saves are atomic: files are
staged in a temp directory and renamed into place, the index last.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import CONFIG_NAME, ConfigError, QWenConfig
from .hub import resolve_model_path
from .model import QWenLMHeadModel

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
GENERATION_CONFIG_NAME = "generation_config.json"
# Non-persistent buffers of older revisions that some checkpoints still carry.
IGNORED_KEY_SUFFIXES = ("attn.masked_bias", "attn.bias", "rotary_emb.inv_freq")
# Keyword arguments that the official snippets pass to from_pretrained and that mean nothing here.
IGNORED_LOAD_KWARGS = {
    "trust_remote_code", "revision", "resume_download", "low_cpu_mem_usage", "cache_dir", "local_files_only",
    "use_safetensors", "offload_folder", "offload_state_dict", "force_download", "proxies", "token",
    "use_auth_token", "attn_implementation", "_fast_init", "code_revision", "mirror", "subfolder",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "half": torch.float16,
                "float": torch.float32}


# ---------------------------------------------------------------------------------------------- reading
class SafetensorsReader:
    """Random access to the tensors of one .safetensors file, with validation of the header."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        try:
            self.file = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        size = os.fstat(self.file.fileno()).st_size
        head = self.file.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{self.path}: truncated or empty safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (claims {n} header bytes, file has {size})")
        try:
            header = json.loads(self.file.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = _ST_DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: bad header entry for tensor {name!r}: {info}") from None
            numel = 1
            for s in shape:
                numel *= s
            expected = numel * torch.empty((), dtype=dtype).element_size()
            if end - begin != expected:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)} {info['dtype']} "
                    f"(expected {expected})"
                )
            if self.data_start + end > size:
                raise CheckpointError(
                    f"{self.path}: truncated file: tensor {name!r} ends at byte {self.data_start + end} "
                    f"but the file has {size} bytes"
                )
            self.entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name``; read directly into ``out`` when it is a contiguous CPU tensor of the same dtype."""
        dtype, shape, begin, end = self.entries[name]
        direct = out is not None and out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous()
        if out is None or direct:
            buf = out if direct else torch.empty(shape, dtype=dtype)
            self._read_bytes(name, buf.reshape(-1), self.data_start + begin)
            return buf
        # Different dtype or device: convert in slices of rows so the staging buffer stays small.
        flat_out = out.reshape(shape[0], -1) if len(shape) > 1 else out.reshape(1, -1)
        row_bytes = (end - begin) // max(flat_out.shape[0], 1)
        rows = max(1, (64 << 20) // max(row_bytes, 1))
        pos = self.data_start + begin
        for r in range(0, flat_out.shape[0], rows):
            part = torch.empty((min(rows, flat_out.shape[0] - r), flat_out.shape[1]), dtype=dtype)
            self._read_bytes(name, part.reshape(-1), pos)
            pos += part.numel() * part.element_size()
            flat_out[r : r + part.shape[0]].copy_(part)
        return out

    def _read_bytes(self, name: str, flat: torch.Tensor, offset: int) -> None:
        nbytes = flat.numel() * flat.element_size()
        if nbytes == 0:
            return
        self.file.seek(offset)
        got = self.file.readinto(memoryview(flat.view(torch.uint8).numpy()))
        if got != nbytes:
            raise CheckpointError(f"{self.path}: short read for tensor {name!r} ({got} of {nbytes} bytes)")

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def find_weight_files(path: str) -> tuple[str, list[str]]:
    """("safetensors" | "bin", files) for a checkpoint directory, following the index when sharded."""
    for index_name, kind in ((SAFE_INDEX_NAME, "safetensors"), (BIN_INDEX_NAME, "bin")):
        index = os.path.join(path, index_name)
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid weight index ({e})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
            if missing:
                raise CheckpointError(f"{index}: lists shard(s) that are missing from {path}: {missing}")
            return kind, [os.path.join(path, f) for f in files]
    for name, kind in ((SAFE_WEIGHTS_NAME, "safetensors"), (BIN_WEIGHTS_NAME, "bin")):
        if os.path.exists(os.path.join(path, name)):
            return kind, [os.path.join(path, name)]
    shards = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
    if shards:
        return "safetensors", [os.path.join(path, p) for p in shards]
    raise CheckpointError(
        f"{path}: no weights found (expected {SAFE_WEIGHTS_NAME}, {SAFE_INDEX_NAME} with shards, "
        f"{BIN_WEIGHTS_NAME} or {BIN_INDEX_NAME})"
    )


def iter_checkpoint_tensors(path: str) -> Iterator[tuple[str, str, Any]]:
    """Yield (file, tensor name, reader) for every tensor of a checkpoint; readers expose read(name, out)."""
    kind, files = find_weight_files(path)
    for file in files:
        if kind == "safetensors":
            with SafetensorsReader(file) as reader:
                for name in reader.keys():
                    yield file, name, reader
        else:
            yield from _iter_bin(file)


class _BinReader:
    def __init__(self, file: str, state: dict[str, torch.Tensor]) -> None:
        self.path, self.state = file, state

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        t = self.state[name]
        if out is None:
            return t
        out.copy_(t)
        return out


def _iter_bin(file: str) -> Iterator[tuple[str, str, Any]]:
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for corrupt pickles/zips
        raise CheckpointError(f"{file}: cannot read PyTorch weights ({type(e).__name__}: {e})") from None
    reader = _BinReader(file, state)
    for name in list(state):
        yield file, name, reader


# ---------------------------------------------------------------------------------------------- placement
def resolve_dtype(config: QWenConfig, device: torch.device, torch_dtype: Any = None, bf16: bool = False,
                  fp16: bool = False, fp32: bool = False) -> torch.dtype:
    """Model dtype: explicit argument > flags > config flags > automatic (spec §1.4, CPU → fp32)."""
    if sum(bool(x) for x in (bf16, fp16, fp32)) > 1:
        raise ValueError("pass at most one of bf16=True, fp16=True, fp32=True")
    if torch_dtype is not None and torch_dtype != "auto":
        if isinstance(torch_dtype, torch.dtype):
            return torch_dtype
        name = str(torch_dtype).removeprefix("torch.")
        if name not in _DTYPE_NAMES:
            raise ValueError(f"unknown torch_dtype {torch_dtype!r}; use float32, bfloat16 or float16")
        return _DTYPE_NAMES[name]
    if torch_dtype == "auto" and config.torch_dtype:
        return _DTYPE_NAMES.get(config.torch_dtype, torch.float32)
    for flag, dtype in ((bf16, torch.bfloat16), (fp16, torch.float16), (fp32, torch.float32)):
        if flag:
            return dtype
    for flag, dtype in ((config.bf16, torch.bfloat16), (config.fp16, torch.float16), (config.fp32, torch.float32)):
        if flag:
            return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # bf16 is emulated (slow) and fp16 unusable on CPUs


def plan_device_map(config: QWenConfig, device_map: Any, dtype: torch.dtype) -> dict[str, torch.device]:
    """Device for each placement unit: transformer.wte, transformer.h.N, transformer.ln_f, lm_head."""
    units = ["transformer.wte"] + [f"transformer.h.{i}" for i in range(config.num_hidden_layers)] + [
        "transformer.ln_f", "lm_head"]
    if device_map is None:
        device_map = "cpu"
    if isinstance(device_map, (str, torch.device, int)) and str(device_map) != "auto":
        dev = torch.device(f"cuda:{device_map}" if isinstance(device_map, int) else device_map)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device_map={device_map!r} but CUDA is not available; use device_map='cpu'")
        return {u: dev for u in units}
    if str(device_map) == "auto":
        return _auto_device_map(config, units, dtype)
    if isinstance(device_map, dict):
        out: dict[str, torch.device] = {}
        for u in units:
            # The longest matching prefix wins ("" covers everything).
            match = max((k for k in device_map if k == "" or u == k or u.startswith(k + ".")), key=len, default=None)
            if match is None:
                raise ValueError(f"device_map does not place {u}")
            v = device_map[match]
            out[u] = torch.device(f"cuda:{v}" if isinstance(v, int) else v)
        return out
    raise ValueError(f"unsupported device_map {device_map!r}")


def _auto_device_map(config: QWenConfig, units: list[str], dtype: torch.dtype) -> dict[str, torch.device]:
    """Fill visible GPUs in order by free memory (keeping headroom for activations), then CPU."""
    if not torch.cuda.is_available():
        return {u: torch.device("cpu") for u in units}
    esize = torch.empty((), dtype=dtype).element_size()
    h, f, v = config.hidden_size, config.ffn_hidden_size, config.vocab_size
    sizes = {"transformer.wte": v * h * esize, "transformer.ln_f": h * esize, "lm_head": v * h * esize}
    block = (4 * h * h + 3 * h + 3 * h * f + 2 * h) * esize
    budgets = []
    for i in range(torch.cuda.device_count()):
        free, _total = torch.cuda.mem_get_info(i)
        budgets.append([torch.device(f"cuda:{i}"), int(free * 0.85)])
    out, gpu = {}, 0
    for u in units:
        need = sizes.get(u, block)
        while gpu < len(budgets) and budgets[gpu][1] < need:
            gpu += 1
        if gpu < len(budgets):
            budgets[gpu][1] -= need
            out[u] = budgets[gpu][0]
        else:
            out[u] = torch.device("cpu")
    return out


# ---------------------------------------------------------------------------------------------- load
def load_model(
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    device_map: Any = None,
    device: Any = None,
    torch_dtype: Any = None,
    bf16: bool = False,
    fp16: bool = False,
    fp32: bool = False,
    config: QWenConfig | None = None,
    progress: bool = True,
    strict: bool = True,
    **kwargs: Any,
) -> QWenLMHeadModel:
    """Load a QWenLMHeadModel from a checkpoint directory (see module docstring).

    Keyword arguments naming config fields (use_dynamic_ntk, use_logn_attn, seq_length, ...) override
    config.json; loader arguments of transformers that do not apply (trust_remote_code, revision, ...)
    are accepted and ignored. The registered load transforms (qwen/transforms.py) own further options:

    ``cpu_packed_weights`` (default: on for fp32 models placed entirely on the CPU) reorders linear
    weights for oneDNN, which makes CPU inference 1.5-2x faster (see qwen/cpu_pack.py). Pass False
    to get plain nn.Linear layers, e.g. for training or peft.

    GPTQ checkpoints (config.json ``quantization_config``, quant_method "gptq") load into QuantLinear
    layers holding the official tensors; ``quant_kernel`` picks their CPU kernel ("auto", or
    "dequant" for the exact reference path; see qwen/quant/linear.py). On the CPU their float parts
    (embeddings, norms, lm_head) default to float32.

    ``int8_lm_head=True`` (CPU, fp32) rounds lm_head to int8 for faster decode (qwen/quant/head.py):
    a deliberate, small deviation from the checkpoint, off by default.

    A LoRA adapter directory loads its base and merges the adapter (qwen/finetune/lora.py).
    """
    from .transforms import LoadContext, load_transforms

    transforms = load_transforms()
    path = resolve_model_path(pretrained_model_name_or_path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: expected a checkpoint directory")
    for t in transforms:  # e.g. bitsandbytes (load_in_4bit), LoRA adapter directories
        model = t.load_instead(path, dict(device_map=device_map, device=device, torch_dtype=torch_dtype, bf16=bf16,
                                          fp16=fp16, fp32=fp32, config=config, progress=progress, strict=strict,
                                          **kwargs))
        if model is not None:
            return model
    for k in list(kwargs):
        if k in IGNORED_LOAD_KWARGS:
            kwargs.pop(k)
    options = {k: v for t in transforms for k, v in t.options.items()}
    options.update({k: kwargs.pop(k) for k in list(kwargs) if k in options})
    if config is None:
        config = QWenConfig.from_pretrained(path)
    field_names = set(config.__dataclass_fields__)
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in field_names}
    # Generic transformers config attributes (the official batch recipe passes pad_token_id here).
    generic = {k: kwargs.pop(k) for k in list(kwargs) if k in ("pad_token_id", "eos_token_id", "bos_token_id")}
    if generic:
        config = config.update(extra={**config.extra, **generic})
    if kwargs:
        raise TypeError(f"from_pretrained got unexpected keyword arguments: {sorted(kwargs)}")
    if overrides:
        config = config.update(**overrides)
    if device is not None and device_map is None:
        device_map = device
    placement = plan_device_map(config, device_map, torch.float32)
    main_device = placement["transformer.wte"]
    ctx = LoadContext(path=path, config=config, options=options, placement=placement,
                      dtype=resolve_dtype(config, main_device, torch_dtype, bf16, fp16, fp32),
                      dtype_given=torch_dtype is not None or bf16 or fp16 or fp32)
    for t in transforms:
        t.configure(ctx)
    if ctx.dtype != torch.float32 and str(device_map) == "auto":
        ctx.placement = placement = plan_device_map(config, device_map, ctx.dtype)

    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    model.to(ctx.dtype)
    for t in transforms:
        t.install(ctx, model)
    for unit, dev in placement.items():
        if unit == "lm_head" and config.tie_word_embeddings:
            continue
        model.get_submodule(unit).to_empty(device=dev)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.transformer.wte.weight

    params: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    owner: dict[str, Any] = {}
    for t in transforms:
        extra = t.load_targets(ctx, model)
        params.update(extra)
        owner.update(dict.fromkeys(extra, t))
    loaded: set[str] = set()
    unexpected: list[str] = []
    bar = _progress(total=len(params), desc="Loading weights", enabled=progress)
    for file, name, reader in iter_checkpoint_tensors(path):
        if name not in params:
            if not name.endswith(IGNORED_KEY_SUFFIXES):
                unexpected.append(name)
            continue
        target = params[name]
        shape = tuple(reader.shape(name))
        if shape != tuple(target.shape):
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {list(shape)}, the config implies {list(target.shape)}"
            )
        if name in owner:
            owner[name].check_tensor(ctx, file, name, reader.dtype(name))
        elif not (reader.dtype(name).is_floating_point):
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {reader.dtype(name)}, expected a float tensor")
        with torch.no_grad():
            reader.read(name, target.data)
        loaded.add(name)
        bar.update(1)
    bar.close()
    for t in transforms:
        loaded |= t.after_tensors(ctx, model, loaded)
    missing = sorted(set(params) - loaded - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    if missing and strict:
        raise CheckpointError(f"{path}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        if strict:
            for t in transforms:
                reason = t.explain_unexpected(ctx, unexpected)
                if reason:
                    raise CheckpointError(f"{path}: {reason}")
        logger.warning("%s: ignored %d unexpected tensors, e.g. %s", path, len(unexpected), unexpected[:4])

    model.eval()
    for t in sorted(transforms, key=lambda t: t.order):
        t.finish(ctx, model)
    model.name_or_path = str(pretrained_model_name_or_path)
    model.generation_config = _load_generation_config(path)
    return model


def _load_generation_config(path: str) -> Any:
    from .generation_config import GenerationConfig

    file = os.path.join(path, GENERATION_CONFIG_NAME)
    return GenerationConfig.from_pretrained(path) if os.path.exists(file) else GenerationConfig()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool = True, **tqdm_options: Any) -> Any:
    """A tqdm bar (``update``/``close``), or one that does nothing when disabled or tqdm is not installed."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, **tqdm_options)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    return progress_bar(total, desc, enabled, unit="tensor", leave=False, disable=None)


# ---------------------------------------------------------------------------------------------- save
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def save_model(
    model: QWenLMHeadModel,
    save_directory: str | os.PathLike,
    max_shard_size: int | str = "2GB",
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    safe_serialization: bool = True,
    **unused: Any,
) -> None:
    """Write ``model`` in the official layout (config, sharded safetensors + index, generation config,
    qwen.tiktoken, tokenizer_config.json), atomically."""
    from safetensors.torch import save_file

    if not safe_serialization:
        raise ValueError("only safetensors output is supported (safe_serialization=True)")
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".qwen-save-", dir=out))
    try:
        from .transforms import load_transforms, method

        transforms = load_transforms()
        for t in transforms:
            reason = t.refuse_save(model)
            if reason:
                raise RuntimeError(reason)
        quant_names: set[str] = set()
        for t in transforms:
            # e.g. GPTQ: codes and scales keep their official dtypes; the float rest is fp16 (spec §10).
            kept = t.saved_state(model)
            if kept is not None:
                quant_names |= kept[0]
                dtype = dtype or kept[1]
            t.write_files(model, str(stage))
        state = {}
        for name, t in model.state_dict().items():
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue  # shared with wte; loaders re-tie it
            t = t.detach()
            if dtype is not None and t.is_floating_point() and name not in quant_names:
                t = t.to(dtype)
            state[name] = t.to("cpu").contiguous()
        limit = _parse_size(max_shard_size)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in state.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > limit:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        names = ([SAFE_WEIGHTS_NAME] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map = {}
        for shard_name, shard in zip(names, shards):
            save_file(shard, str(stage / shard_name), metadata={"format": "pt"})
            weight_map.update({k: shard_name for k in shard})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (stage / SAFE_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

        cfg = model.config.to_dict()
        first = next(iter(state.values()))
        cfg["torch_dtype"] = str(first.dtype).removeprefix("torch.")
        cfg["architectures"] = ["QWenLMHeadModel"]
        cfg["model_type"] = "qwen"
        cfg.setdefault("auto_map", {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        })
        (stage / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
        if model.generation_config is not None:
            model.generation_config.save_pretrained(stage)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(stage))
        else:  # the tokenizer layer's default (the source checkpoint's tokenizer, else the bundled one)
            save_default = method("save_default_tokenizer")
            if save_default is not None:
                save_default(model, str(stage))
        # Keep the official remote-code files next to the weights when the source had them.
        src = model.name_or_path
        if src and os.path.isdir(src) and os.path.abspath(src) != str(out.resolve()):
            for p in Path(src).glob("*.py"):
                shutil.copy2(p, stage / p.name)
            for p in Path(src).glob("*.c*"):
                if p.suffix in (".cpp", ".cu"):
                    shutil.copy2(p, stage / p.name)

        # Publish: shards first, then the rest, the index last; then drop stale shards.
        order = sorted(stage.iterdir(), key=lambda p: (p.name == SAFE_INDEX_NAME, not p.name.endswith(".safetensors")))
        for p in order:
            os.replace(p, out / p.name)
        keep = set(names)
        for p in out.glob("model*.safetensors"):
            if p.name not in keep:
                p.unlink()
        if len(shards) == 1 and (out / SAFE_INDEX_NAME).exists():
            (out / SAFE_INDEX_NAME).unlink()
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def init_checkpoint(preset_or_config: str | QWenConfig, save_directory: str | os.PathLike, seed: int = 0,
                    dtype: torch.dtype = torch.bfloat16, chat: bool = True, **overrides: Any) -> QWenConfig:
    """Write a random-weight checkpoint in the official layout (for testing pipelines without weights)."""
    from .config import preset_config
    from .generation_config import QWEN_7B_BASE, QWEN_7B_CHAT, GenerationConfig

    config = preset_config(preset_or_config, **overrides) if isinstance(preset_or_config, str) else preset_or_config
    config = config.update(torch_dtype=str(dtype).removeprefix("torch."))
    torch.manual_seed(seed)
    model = QWenLMHeadModel(config)
    model.init_weights(seed=seed)
    model.to(dtype)
    model.generation_config = GenerationConfig.from_dict(dict(QWEN_7B_CHAT if chat else QWEN_7B_BASE))
    save_model(model, save_directory)
    return config


def describe_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Config summary, parameter count, dtypes and size on disk, without loading the weights."""
    path = resolve_model_path(path)
    config = QWenConfig.from_pretrained(path)
    kind, files = find_weight_files(path)
    dtypes: dict[str, int] = {}
    n = 0
    for _file, name, reader in iter_checkpoint_tensors(path):
        count = 1
        for s in reader.shape(name):
            count *= s
        n += count
        key = str(reader.dtype(name)).removeprefix("torch.")
        dtypes[key] = dtypes.get(key, 0) + count
    disk = sum(os.path.getsize(f) for f in files)
    return {"path": path, "format": kind, "files": len(files), "parameters": n, "dtypes": dtypes,
            "size_on_disk": disk, "config": config}


__all__ = ["load_model", "save_model", "init_checkpoint", "describe_checkpoint", "CheckpointError", "ConfigError",
           "SafetensorsReader", "find_weight_files"]
