"""Q-LoRA: LoRA over a frozen GPTQ (QuantLinear) or bitsandbytes base (qwen/finetune/qlora.py).

The quantized bases are made from a tiny float checkpoint by round-to-nearest (hidden 64, 2 layers,
int4 with group size 32, so the int4 tinygemm kernel runs as it would on a real -Int4 model).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from qwen.auto import AutoModelForCausalLM  # noqa: E402
from qwen.checkpoint import CheckpointError, init_checkpoint, load_model  # noqa: E402
from qwen.finetune.lora import LoraSettings, apply_lora, load_adapter, merge_adapter, save_adapter  # noqa: E402
from qwen.finetune.qlora import (  # noqa: E402
    QLORA_CONFIG_NAME,
    is_quantized_layer,
    load_quantized_base,
    prepare_bnb_for_training,
    quant_lora_layer_class,
)
from qwen.quant import GPTQConfig, quantize_model  # noqa: E402
from qwen.quant.linear import QuantLinear, quant_linear_layers  # noqa: E402

IDS = torch.tensor([[5, 17, 300, 42, 8, 99, 150, 7, 64, 201], [11, 3, 250, 480, 2, 19, 77, 130, 45, 9]])
SMALL = LoraSettings(r=8, alpha=16, dropout=0.0)


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    return model(input_ids=IDS).logits.float()


def _train(peft_model: torch.nn.Module, steps: int = 6, lr: float = 1e-2) -> list[float]:
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


def _quantize(src: Path, out: Path, bits: int) -> Path:
    model = load_model(src, cpu_packed_weights=False, progress=False)
    quantize_model(model, GPTQConfig(bits=bits, group_size=32), "rtn", progress=False)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A float chat checkpoint and its GPTQ int4 / int8 versions (official layout)."""
    root = tmp_path_factory.mktemp("qlora")
    fp = root / "fp"
    init_checkpoint("tiny-vocab", fp, seed=1, dtype=torch.float32, chat=True)
    return {"root": root, "fp": fp, "int4": _quantize(fp, root / "int4", 4), "int8": _quantize(fp, root / "int8", 8)}


@pytest.fixture(scope="module")
def trained(ckpts: dict[str, Path]) -> dict:
    """Q-LoRA trained a few steps on the int4 model and saved as an adapter."""
    base = load_quantized_base(ckpts["int4"], progress=False)
    codes = {k: v.clone() for k, v in base.state_dict().items()}
    base_logits = _logits(base)
    pm = apply_lora(base, SMALL, verbose=False)
    losses = _train(pm)
    adapter = ckpts["root"] / "adapter"
    save_adapter(pm, adapter, base_model_path=ckpts["int4"])
    return {"peft_model": pm, "logits": _logits(pm), "base_logits": base_logits, "losses": losses, "codes": codes,
            "adapter": adapter}


# ---------------------------------------------------------------------------------------------- QuantLinear
def _layer(bits: int, act_order: bool) -> QuantLinear:
    gen = torch.Generator().manual_seed(bits + act_order)
    n, k, g = 64, 128, 32
    q = torch.randint(0, 2**bits, (n, k), dtype=torch.int32, generator=gen)
    scales = (torch.rand(k // g, n, generator=gen) * 0.02 + 0.001).half()
    zeros = torch.randint(1, 2**bits - 1, (k // g, n), dtype=torch.int32, generator=gen)
    g_idx = torch.arange(k, dtype=torch.int32) // g
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    return QuantLinear.from_codes(q, scales, zeros, g_idx, bits, g)


@pytest.mark.parametrize("bits, kernel, act_order", [
    (4, "int4-tinygemm", False), (4, "int4-tinygemm", True), (8, "int8-fbgemm", False), (8, "int8-fbgemm", True),
    (8, "qwen-kernels", False), (8, "qwen-kernels", True), (4, "dequant", True),
])
def test_quant_linear_backward_uses_the_dequantized_weight(bits, kernel, act_order):
    """The CPU kernels have no autograd formula (tinygemm raises, fbgemm silently returns no gradient):
    with an input that requires grad the layer runs the same kernel and dx = dy @ W (W dequantized)."""
    layer = _layer(bits, act_order)
    layer.prepare(torch.device("cpu"), torch.float32, kernel)
    x = torch.randn(2, 5, 128, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(y, layer(x))  # the forward is the inference kernel's, bit for bit
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    # fp32 sums in another order than the reference matmul: |dx| ~ 0.05, so 1e-5 is ~2e-4 relative
    torch.testing.assert_close(x.grad, grad_y @ layer.dequantized_weight(), rtol=1e-5, atol=1e-5)
    assert layer.kernel == kernel and not any(b.requires_grad for b in layer.buffers())


# ---------------------------------------------------------------------------------------------- GPTQ Q-LoRA
def test_zero_initialised_adapter_keeps_the_quantized_logits(ckpts):
    base = load_quantized_base(ckpts["int4"], progress=False)
    ref = _logits(base)
    pm = apply_lora(base, LoraSettings(), verbose=False)  # official defaults: r 64, alpha 16, dropout 0.05
    block = pm.get_base_model().transformer.h[0]
    for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.w1, block.mlp.w2, block.mlp.c_proj):
        assert isinstance(layer, quant_lora_layer_class()) and isinstance(layer.base_layer, QuantLinear)
        assert layer.base_layer.kernel == "int4-tinygemm"
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)  # chat model: no embeddings
    assert not any(p.requires_grad for m in pm.modules() if is_quantized_layer(m) for p in m.parameters())
    assert torch.equal(_logits(pm), ref)  # B = 0 (dropout is off in eval)


def test_qlora_steps_lower_the_loss_and_leave_the_codes_alone(trained):
    losses = trained["losses"]
    # Measured 6.27 -> 5.40 over 6 steps (lr 1e-2, r 8); a real decrease, not noise.
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    state = {k.replace("base_layer.", ""): v for k, v in trained["peft_model"].get_base_model().state_dict().items()
             if "lora_" not in k}
    assert state.keys() == trained["codes"].keys()
    for name, tensor in trained["codes"].items():  # codes, scales, zeros, biases, embeddings, norms
        assert torch.equal(state[name], tensor), name
    assert (trained["logits"] - trained["base_logits"]).abs().max() > 0.1


def test_int8_gptq_base_trains_too(ckpts):
    base = load_quantized_base(ckpts["int8"], progress=False)
    assert {layer.kernel for _, layer in quant_linear_layers(base)} == {"qwen-kernels"}
    losses = _train(apply_lora(base, SMALL, verbose=False), steps=4)
    assert losses[-1] < losses[0] - 0.2, losses


def test_gradient_checkpointing_gives_the_same_gradients(ckpts):
    pm = apply_lora(load_quantized_base(ckpts["int4"], progress=False), SMALL, verbose=False)
    with torch.no_grad():  # B != 0 so every factor gets a gradient through the quantized layers
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
    pm.enable_input_require_grads()
    checkpointed = grads()
    assert len(plain) == sum(p.requires_grad for p in pm.parameters()) > 0
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-7)


def test_saved_adapter_reloads_on_the_quantized_base(trained, ckpts):
    adapter = trained["adapter"]
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(ckpts["int4"].resolve())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 8
    assert json.loads((adapter / QLORA_CONFIG_NAME).read_text()) == {"quant_method": "gptq", "bits": 4,
                                                                     "group_size": 32}
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys and len(keys) == 2 * 5 * 2

    model = AutoModelForCausalLM.from_pretrained(str(adapter), progress=False)
    assert type(model).__name__ == "QWenLMHeadModel"
    assert isinstance(model.transformer.h[1].mlp.w2, quant_lora_layer_class())  # unmerged, on QuantLinear
    assert torch.equal(_logits(model), trained["logits"])
    out = model.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 4)
    with pytest.raises(ValueError, match="cannot be merged into quantized weights"):
        load_adapter(load_quantized_base(ckpts["int4"], progress=False), adapter, merge=True)


def test_merge_goes_into_the_full_precision_base(trained, ckpts, tmp_path, capsys):
    """merged = W_fp + s B A, so merged-model logits must equal fp base + the unmerged adapter (same fp
    base) up to fp32 rounding. The Q-LoRA model itself differs from both by the int4 rounding of the
    base, so it is compared loosely: the adapter must move the logits the same way on both bases."""
    from qwen.cli import main

    adapter = trained["adapter"]
    assert main(["merge", str(adapter), "--output", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert "GPTQ-quantized checkpoint" in err and "--base" in err and not (tmp_path / "bad").exists()
    with pytest.raises(CheckpointError, match="full-precision checkpoint it was quantized from"):
        merge_adapter(adapter, tmp_path / "bad", base_model_path=ckpts["int4"])

    assert main(["merge", str(adapter), "--base", str(ckpts["fp"]), "--output", str(tmp_path / "merged")]) == 0
    merged = _logits(load_model(tmp_path / "merged", progress=False))
    fp = _logits(load_model(ckpts["fp"], cpu_packed_weights=False, progress=False))
    unmerged = _logits(load_adapter(load_model(ckpts["fp"], cpu_packed_weights=False, progress=False), adapter,
                                    merge=False))
    assert (merged - unmerged).abs().max() < 1e-5  # measured 3e-7
    effect_fp, effect_q = (merged - fp).flatten(), (trained["logits"] - trained["base_logits"]).flatten()
    assert effect_fp.abs().max() > 0.1
    assert torch.nn.functional.cosine_similarity(effect_fp, effect_q, dim=0) > 0.95  # measured 0.998
    quant_error = (fp - trained["base_logits"]).abs().mean()
    assert (merged - trained["logits"]).abs().mean() < 2 * quant_error


def test_base_model_trains_float_embeddings_not_quantized_layers(ckpts):
    """As LoRA: a base-format checkpoint (chat_format raw) also trains wte and lm_head, which stay float in
    a GPTQ checkpoint (the official Q-LoRA never trains them: docs/differences.md)."""
    init_checkpoint("tiny-vocab", ckpts["root"] / "fp-base", seed=2, dtype=torch.float32, chat=False)
    int4 = _quantize(ckpts["root"] / "fp-base", ckpts["root"] / "int4-base", 4)
    pm = apply_lora(load_quantized_base(int4, progress=False), SMALL, verbose=False)
    assert sorted(pm.peft_config["default"].modules_to_save) == ["lm_head", "wte"]
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    embeddings = [n for n in trainable if ".modules_to_save." in n]
    assert len(embeddings) == 2 and all(trainable[n].dtype == torch.float32 for n in embeddings)
    assert not any(p.requires_grad for m in pm.modules() if is_quantized_layer(m) for p in m.parameters())
    off = apply_lora(load_quantized_base(int4, progress=False), LoraSettings(r=4, train_embeddings=False),
                     verbose=False)
    assert not off.peft_config["default"].modules_to_save


def test_refusals(ckpts):
    with pytest.raises(ValueError, match="needs a quantized base.*--quantize"):
        load_quantized_base(ckpts["fp"], progress=False)
    with pytest.raises(ValueError, match="already a GPTQ-quantized checkpoint"):
        load_quantized_base(ckpts["int4"], quantize="nf4", progress=False)
    with pytest.raises(ValueError, match="bias"):
        apply_lora(load_quantized_base(ckpts["int4"], progress=False), LoraSettings(r=4, bias="all"), verbose=False)


# ---------------------------------------------------------------------------------------------- NF4
def _bnb_backward_problem() -> str | None:
    """None when bitsandbytes 4-bit layers backpropagate to their input on this machine, else why not."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        return f"bitsandbytes is not installed ({e})"
    try:
        layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")
        layer = layer.to("cpu")
        x = torch.randn(2, 64, requires_grad=True)
        layer(x).sum().backward()
        if x.grad is None:
            return "bitsandbytes 4-bit layers give no input gradient on the CPU"
    except Exception as e:  # noqa: BLE001 - any backend failure means "not supported here"
        return f"bitsandbytes 4-bit backward fails on the CPU: {type(e).__name__}: {e}"
    return None


def test_nf4_qlora_trains_reloads_and_merges(ckpts, tmp_path):
    problem = _bnb_backward_problem()
    if problem:
        pytest.skip(problem)
    import bitsandbytes as bnb

    base = load_quantized_base(ckpts["fp"], quantize="nf4", progress=False)
    assert isinstance(base.transformer.h[0].attn.c_attn, bnb.nn.Linear4bit)
    # apply_lora does this itself; done first here so that the reference pass below runs the layers as
    # training will (an eval pass would repack them into bitsandbytes' CPU inference layout).
    prepare_bnb_for_training(base)
    ref = _logits(base)
    pm = apply_lora(base, SMALL, verbose=False)
    assert isinstance(pm.get_base_model().transformer.h[0].attn.c_attn, peft.tuners.lora.bnb.Linear4bit)
    assert torch.equal(_logits(pm), ref)
    losses = _train(pm)
    assert losses[-1] < losses[0] - 0.3, losses  # measured 6.27 -> 5.4
    trained_logits = _logits(pm)
    adapter = save_adapter(pm, tmp_path / "adapter", base_model_path=ckpts["fp"])
    assert json.loads((adapter / QLORA_CONFIG_NAME).read_text())["quant_type"] == "nf4"
    # The adapter names the float checkpoint; qlora_config.json says to quantize it to NF4 on load.
    reloaded = AutoModelForCausalLM.from_pretrained(str(adapter), progress=False)
    assert isinstance(reloaded.transformer.h[0].attn.c_attn.base_layer, bnb.nn.Linear4bit)
    exact = AutoModelForCausalLM.from_pretrained(str(adapter), progress=False)
    prepare_bnb_for_training(exact)  # the training-time path: the same numbers
    assert torch.equal(_logits(exact), trained_logits)
    # For inference bitsandbytes may switch to its AVX512-BF16 layout (bf16 absmax): bf16-sized differences.
    assert (_logits(reloaded) - trained_logits).abs().max() < 0.05  # measured 0.006
    merged = _logits(load_model(merge_adapter(adapter, tmp_path / "merged"), progress=False))
    unmerged = _logits(load_adapter(load_model(ckpts["fp"], cpu_packed_weights=False, progress=False), adapter,
                                    merge=False))
    assert (merged - unmerged).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------- CLI
def _sft_file(path: Path) -> Path:
    rows = [{"id": str(i), "conversations": [{"from": "user", "value": f"What is {i} + {i}?"},
                                             {"from": "assistant", "value": f"{i} + {i} = {2 * i}."}]}
            for i in range(8)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_cli_qlora_end_to_end(tmp_path, capsys):
    from qwen.cli import main

    init_checkpoint("tiny", tmp_path / "fp", seed=0, dtype=torch.float32, chat=True)
    assert main(["quantize", "--model", str(tmp_path / "fp"), "--output", str(tmp_path / "int4"), "--method", "rtn",
                 "--bits", "4", "--group-size", "32", "--no-progress"]) == 0
    data = _sft_file(tmp_path / "sft.jsonl")
    common = ["--data", str(data), "--max-steps", "3", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-2",
              "--lora-r", "4", "--no-progress"]
    out = tmp_path / "out"
    rc = main(["train", "--method", "qlora", "--model", str(tmp_path / "int4"), "--output", str(out),
               "--gradient-checkpointing", "--save-every", "2", *common])
    assert rc == 0, capsys.readouterr().err
    assert "Q-LoRA over GPTQ int4" in capsys.readouterr().out
    # Resuming from the step-2 checkpoint reaches the same adapter bit for bit.
    rc = main(["train", "--method", "qlora", "--model", str(tmp_path / "int4"), "--output", str(tmp_path / "resumed"),
               "--gradient-checkpointing", "--resume", str(out / "checkpoints" / "step-00000002"), *common])
    assert rc == 0, capsys.readouterr().err
    from safetensors.torch import load_file

    straight = load_file(str(out / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((tmp_path / "int4").resolve()) and cfg["r"] == 4
    assert (out / QLORA_CONFIG_NAME).is_file()
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3]
    model = AutoModelForCausalLM.from_pretrained(str(out), progress=False)
    assert isinstance(model.transformer.h[0].attn.c_attn, quant_lora_layer_class())
    assert model.generate(torch.tensor([[872, 198]]), max_new_tokens=3, do_sample=False).shape == (1, 5)

    if _bnb_backward_problem() is None:  # the same on a float checkpoint, NF4-quantized at load time
        rc = main(["train", "--method", "qlora", "--quantize", "nf4", "--model", str(tmp_path / "fp"),
                   "--output", str(tmp_path / "nf4"), *common])
        assert rc == 0, capsys.readouterr().err
        assert "Q-LoRA over bitsandbytes NF4" in capsys.readouterr().out
        cfg = json.loads((tmp_path / "nf4" / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == str((tmp_path / "fp").resolve())
        assert json.loads((tmp_path / "nf4" / QLORA_CONFIG_NAME).read_text())["quant_type"] == "nf4"

    # Usage errors are reported, not raised.
    for args, message in (
        (["--method", "qlora", "--model", str(tmp_path / "fp")], "needs a quantized base"),
        (["--method", "lora", "--quantize", "nf4", "--model", str(tmp_path / "fp")], "--method qlora only"),
        (["--method", "qlora", "--model", str(tmp_path / "int4"), "--distributed", "fsdp"], "fsdp"),
    ):
        assert main(["train", *args, "--output", str(tmp_path / "x"), *common]) == 2
        assert message in capsys.readouterr().err
    shutil.rmtree(tmp_path / "x", ignore_errors=True)
