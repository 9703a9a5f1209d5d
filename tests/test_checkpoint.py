"""Checkpoints: official layout in and out, bit-exact round trips, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen import AutoModelForCausalLM
from qwen.checkpoint import CheckpointError, SafetensorsReader, describe_checkpoint, init_checkpoint, load_model
from qwen.config import ConfigError, preset_config
from qwen.model import QWenLMHeadModel


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    init_checkpoint("tiny-vocab", path, seed=3, dtype=torch.bfloat16)
    return path


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_init_writes_the_official_layout(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "qwen.tiktoken",
            "tokenizer_config.json"} <= names
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["architectures"] == ["QWenLMHeadModel"] and cfg["model_type"] == "qwen"
    assert cfg["torch_dtype"] == "bfloat16" and cfg["seq_length"] == 64
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"
    reader = SafetensorsReader(tiny_dir / "model.safetensors")
    assert reader.metadata == {"format": "pt"}  # transformers refuses safetensors without it
    assert "transformer.h.1.mlp.c_proj.weight" in reader.keys()
    assert reader.dtype("transformer.wte.weight") == torch.bfloat16
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen["chat_format"] == "chatml" and gen["top_p"] == 0.8


def test_load_defaults_to_fp32_on_cpu_and_accepts_official_kwargs(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), device_map="cpu", trust_remote_code=True,
                                                 revision="v1.1.4", use_dynamic_ntk=False).eval()
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.config.use_dynamic_ntk is False
    assert model.generation_config.chat_format == "chatml"
    bf16 = load_model(tiny_dir, bf16=True, progress=False)
    assert bf16.dtype == torch.bfloat16
    assert load_model(tiny_dir, torch_dtype="auto", progress=False).dtype == torch.bfloat16
    assert load_model(tiny_dir, torch_dtype=torch.float16, progress=False).dtype == torch.float16
    # fp32 values are exactly the bf16 ones, widened.
    assert torch.equal(model.transformer.wte.weight, bf16.transformer.wte.weight.float())
    with pytest.raises(TypeError, match="unexpected keyword"):
        load_model(tiny_dir, not_a_real_option=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_bit_exact_and_sharded(tmp_path, dtype):
    torch.manual_seed(0)
    model = QWenLMHeadModel(preset_config("tiny-vocab")).to(dtype)
    model.init_weights(seed=1)
    model.to(dtype)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    loaded = load_model(tmp_path, torch_dtype=dtype, progress=False, cpu_packed_weights=False)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, loaded(ids).logits)
    # The default CPU load (fp32: packed for oneDNN) keeps the exact weights in its state dict.
    packed = load_model(tmp_path, torch_dtype=dtype, progress=False)
    for (k, a), (k2, b) in zip(model.state_dict().items(), packed.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    # Saving again unsharded replaces the shards and the index, leaving no stale files.
    loaded.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("model-*.safetensors")) and not (tmp_path / "model.safetensors.index.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".qwen-save-")]


def test_loads_pytorch_bin_checkpoints(tmp_path, tiny_dir):
    ref = load_model(tiny_dir, progress=False)
    out = copy_dir(tiny_dir, tmp_path / "bin")
    (out / "model.safetensors").unlink()
    torch.save(ref.state_dict(), out / "pytorch_model.bin")
    model = load_model(out, progress=False)
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)


def test_tied_embeddings_round_trip(tmp_path):
    init_checkpoint("tiny-vocab", tmp_path, tie_word_embeddings=True, dtype=torch.float32)
    assert "lm_head.weight" not in SafetensorsReader(tmp_path / "model.safetensors").keys()
    model = load_model(tmp_path, progress=False)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_device_map_dict_and_auto_fall_back_to_cpu(tiny_dir):
    model = load_model(tiny_dir, device_map={"": "cpu"}, progress=False)
    assert all(p.device.type == "cpu" for p in model.parameters())
    if not torch.cuda.is_available():
        assert load_model(tiny_dir, device_map="auto", progress=False).device.type == "cpu"
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            load_model(tiny_dir, device_map="cuda", progress=False)


def test_describe_checkpoint(tiny_dir):
    info = describe_checkpoint(tiny_dir)
    assert info["parameters"] == preset_config("tiny-vocab").num_parameters()
    assert info["dtypes"] == {"bfloat16": info["parameters"]}
    assert info["size_on_disk"] == os.path.getsize(tiny_dir / "model.safetensors")


# ------------------------------------------------------------------------------------------ bad input
def test_directory_without_weights(tmp_path, tiny_dir):
    out = copy_dir(tiny_dir, tmp_path / "noweights")
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_model(out, progress=False)


def test_missing_path_and_hub_id():
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_model("Qwen/Qwen-7B-Chat")


def test_config_missing_seq_length(tmp_path, tiny_dir):
    out = copy_dir(tiny_dir, tmp_path / "noseq")
    cfg = json.loads((out / "config.json").read_text())
    del cfg["seq_length"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json: missing field 'seq_length'"):
        load_model(out, progress=False)


def test_truncated_safetensors_names_file_and_tensor(tmp_path, tiny_dir):
    out = copy_dir(tiny_dir, tmp_path / "trunc")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated file: tensor '.*'"):
        load_model(out, progress=False)


def test_corrupt_safetensors_header(tmp_path, tiny_dir):
    out = copy_dir(tiny_dir, tmp_path / "corrupt")
    data = bytearray((out / "model.safetensors").read_bytes())
    data[8:20] = b"\x00garbage!!\x00"
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors header"):
        load_model(out, progress=False)
    (out / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or empty"):
        load_model(out, progress=False)


def test_tensor_of_wrong_shape(tmp_path, tiny_dir):
    from safetensors.torch import save_file

    out = copy_dir(tiny_dir, tmp_path / "shape")
    model = load_model(tiny_dir, progress=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["transformer.h.1.mlp.w1.weight"] = torch.zeros(7, 64)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensor 'transformer.h.1.mlp.w1.weight' has shape \[7, 64\], "
                                              r"the config implies \[128, 64\]"):
        load_model(out, progress=False)


def test_missing_tensor_and_missing_shard(tmp_path, tiny_dir):
    from safetensors.torch import save_file

    out = copy_dir(tiny_dir, tmp_path / "missing")
    model = load_model(tiny_dir, progress=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "transformer.ln_f.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensors \['transformer.ln_f.weight'\]"):
        load_model(out, progress=False)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    (sharded / "model-00002-of-00004.safetensors").unlink(missing_ok=True)
    shard_names = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values()
    victim = sorted(set(shard_names))[1]
    (sharded / victim).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=f"missing from .*{victim}"):
        load_model(sharded, progress=False)


def test_peak_memory_while_loading_stays_near_model_size(tmp_path):
    """Peak RSS growth while loading a bf16 checkpoint into fp32 (and packing it for the CPU, the default)
    stays within 1.3x the fp32 model size. Proportions as in Qwen-1.8B (the LM head ~15% of the model):
    packing holds one layer twice for a moment."""
    init_checkpoint("tiny", tmp_path, dtype=torch.bfloat16, hidden_size=512, intermediate_size=2752,
                    num_attention_heads=4, kv_channels=128, num_hidden_layers=24, vocab_size=32000)
    script = f"""
import resource, torch, sys
sys.path.insert(0, {str(Path(__file__).parents[1])!r})
from qwen.checkpoint import load_model
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = load_model({str(tmp_path)!r}, progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
from qwen.cpu_pack import is_packed
assert is_packed(model)
print(size, after - before)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    size, growth = int(out[0]), int(out[1])
    assert size > 300e6  # big enough for the ratio to mean something
    assert growth <= 1.3 * size, (growth / size)
