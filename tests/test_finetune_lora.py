"""LoRA: apply for training, standard peft adapter files, adapter loading, merging (qwen/finetune/lora.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from qwen.auto import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from qwen.checkpoint import CheckpointError, init_checkpoint, load_model  # noqa: E402
from qwen.cpu_pack import PackedLinear, is_packed  # noqa: E402
from qwen.finetune.lora import (  # noqa: E402
    LoraSettings,
    apply_lora,
    is_chat_model,
    load_adapter,
    make_peft_compatible,
    merge_adapter,
    save_adapter,
)

IDS = torch.tensor([[5, 17, 300, 42, 8, 99, 150, 7, 64, 201], [11, 3, 250, 480, 2, 19, 77, 130, 45, 9]])
SMALL = LoraSettings(r=4, alpha=8, dropout=0.0)


def _load(path: Path | str, **kw) -> torch.nn.Module:
    return load_model(path, cpu_packed_weights=False, progress=False, **kw)


@torch.no_grad()
def _logits(model: torch.nn.Module, **kw) -> torch.Tensor:
    model.eval()
    return model(input_ids=IDS, return_dict=True, **kw).logits.float()


def _train(peft_model: torch.nn.Module, steps: int = 4, lr: float = 1e-2) -> list[float]:
    torch.manual_seed(0)
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = peft_model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    peft_model.eval()
    return losses


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base and a chat checkpoint whose names say the opposite of what they are (the path must not matter)."""
    root = tmp_path_factory.mktemp("lora")
    base, chat = root / "qwen-tiny-chat-1", root / "qwen-tiny-base-2"
    init_checkpoint("tiny-vocab", base, seed=1, dtype=torch.float32, chat=False)
    init_checkpoint("tiny-vocab", chat, seed=2, dtype=torch.float32, chat=True)
    return {"root": root, "base": base, "chat": chat}


@pytest.fixture(scope="module")
def trained(ckpts: dict[str, Path]) -> dict:
    """LoRA (+ embeddings) trained a few steps on the base model and saved as an adapter."""
    model = _load(ckpts["base"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = apply_lora(model, SMALL, verbose=False)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    losses = _train(pm)
    adapter = ckpts["root"] / "adapter"
    save_adapter(pm, adapter, base_model_path=ckpts["base"])
    base_state = {n.replace("base_layer.", "").replace("original_module.", ""): p
                  for n, p in pm.get_base_model().state_dict().items()
                  if "lora_" not in n and "modules_to_save" not in n}
    return {"peft_model": pm, "logits": _logits(pm), "losses": losses, "trainable": trainable, "before": before,
            "base_state": base_state, "adapter": adapter}


# ---------------------------------------------------------------------------------------------- apply
def test_zero_initialised_lora_keeps_logits(ckpts):
    model = _load(ckpts["chat"])
    ref = _logits(model)
    pm = apply_lora(model, LoraSettings(), verbose=False)  # official defaults: r=64, dropout 0.05 (off in eval)
    assert isinstance(pm, peft.PeftModel)
    assert torch.equal(_logits(pm), ref)


def test_training_lowers_loss_and_trains_only_adapters(trained):
    losses = trained["losses"]
    assert losses[-1] < losses[0] - 0.1, losses
    names = trained["trainable"]
    assert names and all(".lora_A." in n or ".lora_B." in n or ".modules_to_save." in n for n in names), names
    assert {n.split(".modules_to_save")[0] for n in names if "modules_to_save" in n} == {
        "base_model.model.transformer.wte", "base_model.model.lm_head"}
    for name, t in trained["before"].items():  # the base weights did not move
        assert torch.equal(trained["base_state"][name], t), name


def test_embeddings_trained_by_chat_format_not_path(ckpts):
    # ckpts["base"] has "chat" in its path and ckpts["chat"] has "base" in its path.
    base, chat = _load(ckpts["base"]), _load(ckpts["chat"])
    assert not is_chat_model(base) and is_chat_model(chat)
    pm_base = apply_lora(base, SMALL, verbose=False)
    pm_chat = apply_lora(chat, SMALL, verbose=False)
    assert sorted(pm_base.peft_config["default"].modules_to_save) == ["lm_head", "wte"]
    assert not pm_chat.peft_config["default"].modules_to_save
    assert not any("modules_to_save" in n for n, p in pm_chat.named_parameters() if p.requires_grad)
    forced = apply_lora(_load(ckpts["chat"]), LoraSettings(r=4, train_embeddings=True), verbose=False)
    assert sorted(forced.peft_config["default"].modules_to_save) == ["lm_head", "wte"]
    off = apply_lora(_load(ckpts["base"]), LoraSettings(r=4, train_embeddings=False), verbose=False)
    assert not off.peft_config["default"].modules_to_save
    # Without a generation config: config.json's chat_format, else chat (nothing extra trained).
    bare = _load(ckpts["base"])
    bare.generation_config = None
    assert is_chat_model(bare)
    bare.config = bare.config.update(extra={**bare.config.extra, "chat_format": "raw"})
    assert not is_chat_model(bare)


def test_gradient_checkpointing_with_frozen_embeddings(ckpts):
    pm = apply_lora(_load(ckpts["chat"]), SMALL, verbose=False)
    with torch.no_grad():  # B != 0 so every LoRA factor gets a gradient
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    pm.train()

    def grads() -> dict[str, torch.Tensor]:
        pm.zero_grad()
        pm(input_ids=IDS, labels=IDS).loss.backward()
        return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad and p.grad is not None}

    plain = grads()
    pm.gradient_checkpointing_enable()
    assert pm.get_base_model().transformer.gradient_checkpointing
    checkpointed = grads()
    pm.gradient_checkpointing_disable()
    assert len(plain) == sum(p.requires_grad for p in pm.parameters()) > 0
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-7)


def test_packed_model_refused(ckpts):
    model = load_model(ckpts["chat"], progress=False, cpu_packed_weights=True)
    assert is_packed(model)
    with pytest.raises(ValueError, match="cpu_packed_weights=False"):
        apply_lora(model, SMALL, verbose=False)


# ---------------------------------------------------------------------------------------------- save / load
def test_saved_adapter_is_standard_peft(trained, ckpts):
    adapter = trained["adapter"]
    files = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "qwen.tiktoken", "tokenizer_config.json",
            "generation_config.json"} <= files
    assert not any(name.startswith(".") for name in os.listdir(adapter.parent))  # no staging leftovers
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(ckpts["base"].resolve())
    assert os.path.isabs(cfg["base_model_name_or_path"])
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["peft_type"] == "LORA"
    assert sorted(cfg["target_modules"]) == ["c_attn", "c_proj", "w1", "w2"]
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["inference_mode"] is True
    assert sorted(cfg["modules_to_save"]) == ["lm_head", "wte"]
    # Only keys old peft (the official README pins peft<0.8) understands, as the defaults are in use.
    assert set(cfg) <= {"peft_type", "auto_mapping", "base_model_name_or_path", "revision", "task_type",
                        "inference_mode", "r", "target_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
                        "bias", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
                        "rank_pattern", "alpha_pattern"}
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
    assert "base_model.model.transformer.h.1.mlp.w2.lora_B.weight" in keys
    assert "base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight" in keys  # c_proj matches both projections
    assert {"base_model.model.transformer.wte.weight", "base_model.model.lm_head.weight"} <= keys
    assert len(keys) == 2 + 2 * 5 * 2  # embeddings + (A, B) x 5 linears x 2 layers
    assert not any(".default." in k for k in keys)


def test_load_model_on_adapter_dir_merges(trained):
    adapter = trained["adapter"]
    model = load_model(adapter, progress=False)
    assert type(model).__name__ == "QWenLMHeadModel" and not hasattr(model, "peft_config")
    assert isinstance(model.transformer.h[0].attn.c_attn, PackedLinear)  # packed again: fast CPU inference
    assert (_logits(model) - trained["logits"]).abs().max() < 1e-5
    auto = AutoModelForCausalLM.from_pretrained(str(adapter), trust_remote_code=True, progress=False)
    assert (_logits(auto) - trained["logits"]).abs().max() < 1e-5
    assert auto.generation_config.chat_format == "raw"
    tok = AutoTokenizer.from_pretrained(str(adapter), trust_remote_code=True)
    assert tok.decode(tok.encode("hello LoRA")) == "hello LoRA"


def test_load_adapter_unmerged_and_peft_from_pretrained(trained, ckpts):
    pm = load_adapter(_load(ckpts["base"]), trained["adapter"], merge=False)
    assert isinstance(pm, peft.PeftModel)
    assert not any(p.requires_grad for p in pm.parameters())
    assert (_logits(pm) - trained["logits"]).abs().max() < 1e-6
    # peft's own loader on our model reads the same files (standard format cross-check).
    theirs = peft.PeftModel.from_pretrained(make_peft_compatible(_load(ckpts["base"])), str(trained["adapter"]))
    assert (_logits(theirs) - trained["logits"]).abs().max() < 1e-6


def test_official_style_adapter_without_embeddings(trained, ckpts, tmp_path, caplog):
    """The official finetune.py saves only lora_* tensors even when modules_to_save is set."""
    from safetensors.torch import load_file, save_file

    lora_only = tmp_path / "official"
    shutil.copytree(trained["adapter"], lora_only)
    state = load_file(str(lora_only / "adapter_model.safetensors"))
    state = {k: v for k, v in state.items() if "lora_" in k}
    (lora_only / "adapter_model.safetensors").unlink()
    torch.save(state, lora_only / "adapter_model.bin")  # older transformers wrote .bin
    with caplog.at_level("WARNING"):
        model = load_model(lora_only, progress=False, cpu_packed_weights=False)
    assert "modules_to_save" in caplog.text and "wte" in caplog.text
    full = load_model(trained["adapter"], progress=False, cpu_packed_weights=False)
    base = _load(ckpts["base"])
    assert torch.equal(model.transformer.wte.weight, base.transformer.wte.weight)
    assert torch.equal(model.transformer.h[1].mlp.w1.weight, full.transformer.h[1].mlp.w1.weight)
    # A missing LoRA tensor is an error, not a silent no-op.
    state.pop("base_model.model.transformer.h.0.mlp.w1.lora_A.weight")
    save_file(state, str(lora_only / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing .*h\.0\.mlp\.w1\.lora_A"):
        load_model(lora_only, progress=False)


def test_tied_embeddings_stay_tied(tmp_path):
    init_checkpoint("tiny-vocab", tmp_path / "tied", seed=3, dtype=torch.float32, chat=False, tie_word_embeddings=True)
    model = _load(tmp_path / "tied")
    assert model.lm_head.weight is model.transformer.wte.weight
    pm = apply_lora(model, SMALL, verbose=False)
    base = pm.get_base_model()
    assert base.lm_head.modules_to_save["default"].weight is base.transformer.wte.modules_to_save["default"].weight
    _train(pm, steps=2)
    ref = _logits(pm)
    save_adapter(pm, tmp_path / "adapter", base_model_path=tmp_path / "tied")
    loaded = load_model(tmp_path / "adapter", progress=False)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert (_logits(loaded) - ref).abs().max() < 1e-5
    theirs = peft.PeftModel.from_pretrained(make_peft_compatible(_load(tmp_path / "tied")), str(tmp_path / "adapter"))
    assert (_logits(theirs) - ref).abs().max() < 1e-6
    merged = _load(merge_adapter(tmp_path / "adapter", tmp_path / "merged"))
    assert merged.lm_head.weight is merged.transformer.wte.weight
    assert (_logits(merged) - ref).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------- merge
def test_merge_adapter_and_cli(trained, ckpts, tmp_path, capsys):
    out = merge_adapter(trained["adapter"], tmp_path / "merged")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "qwen.tiktoken", "tokenizer_config.json",
            "generation_config.json"} <= files
    assert not (out / "adapter_config.json").exists()
    merged = load_model(out, progress=False)
    assert (_logits(merged) - trained["logits"]).abs().max() < 1e-5
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"  # the base's dtype

    from qwen.cli import main

    assert main(["merge", str(trained["adapter"]), "--output", str(tmp_path / "cli"), "--dtype", "bf16",
                 "--base", str(ckpts["base"])]) == 0
    assert "wrote merged checkpoint" in capsys.readouterr().out
    cli = load_model(tmp_path / "cli", progress=False, torch_dtype=torch.float32)
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    bf16_ref = merged.state_dict()["transformer.h.0.attn.c_attn.weight"].to(torch.bfloat16).float()
    assert torch.equal(cli.state_dict()["transformer.h.0.attn.c_attn.weight"], bf16_ref)
    with pytest.raises(SystemExit) as e:
        main(["merge", "--help"])
    assert e.value.code == 0
    assert "--output" in capsys.readouterr().out


def test_missing_base_gives_clear_error(trained, ckpts, tmp_path, capsys):
    moved = tmp_path / "moved-adapter"
    shutil.copytree(trained["adapter"], moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone" / "Qwen-7B")
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"gone/Qwen-7B.*not found.*base_model_path"):
        load_model(moved, progress=False)
    from qwen.cli import main

    assert main(["merge", str(moved), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "gone/Qwen-7B" in err and "--base" in err
    assert not (tmp_path / "out").exists()
    # An explicit base wins; a base path relative to the adapter directory resolves too.
    model = load_model(moved, base_model_path=ckpts["base"], progress=False)
    assert (_logits(model) - trained["logits"]).abs().max() < 1e-5
    cfg["base_model_name_or_path"] = os.path.relpath(ckpts["base"], moved)
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    assert (_logits(load_model(moved, progress=False)) - trained["logits"]).abs().max() < 1e-5


def test_writes_are_atomic(trained, ckpts, tmp_path, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def fail_after_writing(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)  # a complete weights file, then a crash
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail_after_writing)
    with pytest.raises(OSError, match="disk full"):
        merge_adapter(trained["adapter"], tmp_path / "merged")
    with pytest.raises(OSError, match="disk full"):
        save_adapter(trained["peft_model"], tmp_path / "adapter", base_model_path=ckpts["base"])
    assert os.listdir(tmp_path) == []  # neither the output nor a staging directory is left behind
    # Re-saving into an existing directory (a training output dir) keeps what else is there.
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    (tmp_path / "run" / "step-00000010").mkdir(parents=True)
    save_adapter(trained["peft_model"], tmp_path / "run", base_model_path=ckpts["base"])
    assert {"step-00000010", "adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "run"))
    assert (_logits(load_model(tmp_path / "run", progress=False)) - trained["logits"]).abs().max() < 1e-5


def test_clear_error_without_peft(ckpts, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'qwen\[train\]'"):
        apply_lora(_load(ckpts["chat"]), SMALL, verbose=False)
