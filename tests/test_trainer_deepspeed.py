"""DeepSpeed ZeRO-2/3 under the Trainer, on CPU: the same losses and weights as the plain Trainer
(one process, and two processes under torchrun), resume from DeepSpeed checkpoints, the dropped
optimizer/scheduler sections of a user config, LoRA with trained embeddings under ZeRO-3.

Slow, and skipped without deepspeed (pip install deepspeed==0.19.8). The first DeepSpeed run in a
fresh environment JIT-builds a communication op (about a minute); later runs reuse it."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen.checkpoint import init_checkpoint, load_model
from qwen.finetune.checkpoints import CheckpointError
from qwen.finetune.ds import load_config, resolve_config
from qwen.finetune.trainer import Trainer, cosine_schedule
from training_helpers import config, examples, free_port, tiny_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="deepspeed is not installed (pip install deepspeed==0.19.8)"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # torch.distributed deprecations inside DeepSpeed
]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def world_of_one(monkeypatch):
    """The variables torchrun would set, for a single process (DeepSpeed joins a gloo group of one)."""
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(free_port())), ("DS_ACCELERATOR", "cpu")):
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module", autouse=True)
def _close_process_group():
    yield
    import torch.distributed as dist

    if dist.is_initialized():  # deepspeed.initialize left a world-of-one group behind
        dist.destroy_process_group()


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(got: dict, ref: dict, atol: float) -> None:
    assert set(got) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=atol, msg=k)


# ------------------------------------------------------------------------------------------- config


def test_config_autos_are_filled_and_the_optimizer_and_scheduler_dropped():
    for name in ("zero2", "zero3"):
        raw, path = load_config(name)
        assert path.parent.name == "finetune" and "scheduler" not in raw and "optimizer" not in raw
        cfg = resolve_config(raw, batch_size=2, grad_accum=8, world_size=4, max_grad_norm=1.0, precision="bf16",
                             hidden_size=64)
        assert "auto" not in json.dumps(cfg)
        assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"],
                cfg["gradient_clipping"]) == (2, 8, 64, 1.0)
        assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    # an official-style config: its WarmupLR scheduler and optimizer go, with a warning each
    said: list[str] = []
    official = {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
                "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}},
                "zero_optimization": {"stage": 2}, "gradient_clipping": "auto"}
    cfg = resolve_config(official, batch_size=1, grad_accum=1, world_size=1, max_grad_norm=None, precision="fp32",
                         warn=said.append)
    assert "optimizer" not in cfg and "scheduler" not in cfg and cfg["gradient_clipping"] == 0.0
    assert len(said) == 2 and "WarmupLR" in said[1] and "cosine" in said[1]
    # explicit values must agree with the run; unknown "auto"s are refused
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=4.*--batch-size"):
        resolve_config({"train_micro_batch_size_per_gpu": 4}, batch_size=2, grad_accum=1, world_size=1,
                       max_grad_norm=1.0, precision="fp32")
    with pytest.raises(ValueError, match="bf16.enabled.*--precision"):
        resolve_config({"bf16": {"enabled": True}}, batch_size=2, grad_accum=1, world_size=1, max_grad_norm=1.0,
                       precision="fp32")
    with pytest.raises(ValueError, match="zero_optimization.offload_param.device"):
        resolve_config({"zero_optimization": {"offload_param": {"device": "auto"}}}, batch_size=2, grad_accum=1,
                       world_size=1, max_grad_norm=1.0, precision="fp32")
    with pytest.raises(FileNotFoundError, match="zero4"):
        load_config("zero4")


# ------------------------------------------------------------------------------------------- in process


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_matches_the_plain_trainer(tmp_path, stage):
    data = examples(24)
    plain_model = tiny_model()
    plain = Trainer(plain_model, data, config(tmp_path / "plain", max_steps=4), pad_id=0).train()
    ds_trainer = Trainer(tiny_model(), data, config(tmp_path / "ds", max_steps=4, deepspeed=stage), pad_id=0)
    assert ds_trainer.ds is not None and ds_trainer.ds.stage == int(stage[-1])
    result = ds_trainer.train()
    assert [r["loss"] for r in result.history] == pytest.approx([r["loss"] for r in plain.history], rel=1e-5)
    assert [r["lr"] for r in result.history] == pytest.approx([r["lr"] for r in plain.history], rel=1e-12)
    assert [r["grad_norm"] for r in result.history] == pytest.approx([r["grad_norm"] for r in plain.history],
                                                                     rel=1e-3)
    # the gathered full weights (ZeRO-3: the module itself holds only shards)
    _assert_same_weights(ds_trainer._model_state(), plain_model.state_dict(), atol=1e-5)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_resume_from_a_deepspeed_checkpoint_reaches_the_same_weights(tmp_path, stage):
    data = examples(24)
    kw = dict(emb_dropout_prob=0.1, attn_dropout_prob=0.1)  # the restored RNG state matters
    straight = Trainer(tiny_model(**kw), data, config(tmp_path / "a", deepspeed=stage), pad_id=0)
    straight.train()
    reference = straight._model_state()

    first = Trainer(tiny_model(**kw), data, config(tmp_path / "b", deepspeed=stage), pad_id=0,
                    on_log=lambda r: os.kill(os.getpid(), signal.SIGINT) if r["step"] == 3 else None)
    assert first.train().interrupted and first.step == 3
    ckpt = tmp_path / "b" / "checkpoints" / "step-00000003"
    manifest = json.loads((ckpt / "trainer_state.json").read_text())
    shards = [name for name in manifest["files"] if name.startswith("deepspeed/")]
    assert manifest["deepspeed_stage"] == int(stage[-1]) and any("optim_states" in n for n in shards)
    assert "rng-rank0.pt" in manifest["files"]

    torch.manual_seed(12345)
    second = Trainer(tiny_model(seed=99, **kw), data, config(tmp_path / "b", deepspeed=stage), pad_id=0)
    result = second.train(resume=True)
    assert not result.interrupted and second.step == 6
    _assert_same_weights(second._model_state(), reference, atol=1e-6)
    assert [r["step"] for r in _metrics(tmp_path / "b")] == list(range(1, 7))
    assert [r["loss"] for r in _metrics(tmp_path / "b")] == pytest.approx(
        [r["loss"] for r in _metrics(tmp_path / "a")], rel=1e-6)

    with pytest.raises(CheckpointError, match=f"DeepSpeed ZeRO-{stage[-1]}, this run uses no DeepSpeed"):
        Trainer(tiny_model(), data, config(tmp_path / "b"), pad_id=0).train(resume=ckpt)
    shard = ckpt / next(n for n in shards if "optim_states" in n)
    blob = bytearray(shard.read_bytes())
    blob[-20] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="optim_states.pt is damaged"):
        Trainer(tiny_model(), data, config(tmp_path / "b", deepspeed=stage), pad_id=0).train(resume=ckpt)


def test_lora_resume_under_zero3_restores_adapters_and_trained_embeddings(tmp_path):
    pytest.importorskip("peft")
    from qwen.finetune.lora import LoraSettings, apply_lora

    def lora_model(adapter_seed: int):
        base = tiny_model(emb_dropout_prob=0.1)  # the same frozen base: checkpoints hold the trained part only
        torch.manual_seed(adapter_seed)
        return apply_lora(base, LoraSettings(r=4, alpha=8, dropout=0.1, train_embeddings=True), verbose=False)

    data = examples(24)
    straight = Trainer(lora_model(1), data, config(tmp_path / "a", deepspeed="zero3"), pad_id=0)
    straight.train()
    reference = straight._model_state()
    assert any("modules_to_save" in k for k in reference) and any("lora_A" in k for k in reference)
    first = Trainer(lora_model(1), data, config(tmp_path / "b", deepspeed="zero3"), pad_id=0,
                    on_log=lambda r: os.kill(os.getpid(), signal.SIGINT) if r["step"] == 3 else None)
    assert first.train().interrupted
    second = Trainer(lora_model(77), data, config(tmp_path / "b", deepspeed="zero3"), pad_id=0)
    second.train(resume=True)
    _assert_same_weights(second._model_state(), reference, atol=1e-6)


def test_a_user_config_keeps_our_optimizer_and_cosine_schedule(tmp_path, capsys):
    user = tmp_path / "ds_official_style.json"
    user.write_text(json.dumps({
        "optimizer": {"type": "AdamW", "params": {"lr": 0.5, "weight_decay": 0.0}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.5,
                                                     "warmup_num_steps": 1}},
        "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
        "gradient_clipping": "auto", "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto"}))
    data = examples(24)
    plain = Trainer(tiny_model(), data, config(tmp_path / "plain", max_steps=4), pad_id=0).train()
    capsys.readouterr()
    result = Trainer(tiny_model(), data, config(tmp_path / "ds", max_steps=4, deepspeed=str(user)), pad_id=0).train()
    out = capsys.readouterr().out
    assert "ignoring the DeepSpeed config's 'scheduler' section (WarmupLR)" in out
    assert "ignoring the DeepSpeed config's 'optimizer' section (AdamW)" in out
    expected = [3e-3 * cosine_schedule(s, 4, 2, 0.0) for s in range(4)]  # warmup 2, cosine to 0 at step 4
    assert [r["lr"] for r in result.history] == pytest.approx(expected, rel=1e-12)
    assert [r["loss"] for r in result.history] == pytest.approx([r["loss"] for r in plain.history], rel=1e-5)


# ------------------------------------------------------------------------------------------- qwen train


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny *base* checkpoint (so LoRA also trains wte and lm_head) and a small SFT file."""
    root = tmp_path_factory.mktemp("ds_cli")
    init_checkpoint("tiny", root / "ck", seed=3, chat=False)
    rows = [{"id": str(i), "conversations": [{"from": "user", "value": f"What is {i} + {i}?"},
                                             {"from": "assistant", "value": f"{i} + {i} = {2 * i}. " * (1 + i % 3)}]}
            for i in range(16)]
    (root / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:5]))  # 3 eval batches over 2 ranks
    return root


def _train_cli(args: list[str], cwd: Path, nproc: int | None = None) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    cmd = [*launcher, "-m", "qwen", "train", "--model", "ck", "--data", "sft.jsonl", "--max-steps", "4",
           "--batch-size", "2", "--lr", "1e-3", "--no-progress", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_lora_with_trained_embeddings_under_zero3_matches_plain(workspace):
    # The official finetune.py refused ZeRO-3 + LoRA on a base model (modules_to_save wte/lm_head broke
    # under HF's zero.Init loading); here peft wraps the fully loaded model before DeepSpeed shards it.
    lora = ["--method", "lora", "--grad-accum", "2", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0"]
    plain = _train_cli([*lora, "--output", "lora_plain"], workspace)
    assert plain.returncode == 0, plain.stderr[-2000:]
    zero3 = _train_cli([*lora, "--output", "lora_z3", "--deepspeed", "zero3", "--save-every", "2"], workspace)
    assert zero3.returncode == 0, zero3.stderr[-3000:]
    assert "+ wte, lm_head" in zero3.stdout and "DeepSpeed ZeRO stage 3" in zero3.stdout
    a, b = _metrics(workspace / "lora_plain"), _metrics(workspace / "lora_z3")
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    from safetensors.torch import load_file

    ref = load_file(str(workspace / "lora_plain" / "adapter_model.safetensors"))
    got = load_file(str(workspace / "lora_z3" / "adapter_model.safetensors"))
    assert any("wte" in k for k in got) and any("lm_head" in k for k in got)
    _assert_same_weights(got, ref, atol=1e-5)
    assert (workspace / "lora_z3" / "checkpoints" / "step-00000004" / "deepspeed").is_dir()


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_torchrun_two_processes_with_deepspeed_match_one_plain_process(workspace, stage):
    out = "full_plain"  # one process, twice the accumulation: the same global batch (shared by both stages)
    if not (workspace / out / "model.safetensors").exists():
        single = _train_cli(["--method", "full", "--grad-accum", "2", "--eval-data", "dev.jsonl", "--output", out],
                            workspace)
        assert single.returncode == 0, single.stderr[-2000:]
    multi = _train_cli(["--method", "full", "--grad-accum", "1", "--eval-data", "dev.jsonl",
                        "--output", f"full_two_{stage}", "--deepspeed", stage], workspace, nproc=2)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = _metrics(workspace / out), _metrics(workspace / f"full_two_{stage}")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert two[-1]["eval_loss"] == pytest.approx(one[-1]["eval_loss"], rel=1e-5)  # uneven eval shards
    a = load_model(workspace / out, cpu_packed_weights=False, progress=False).state_dict()
    b = load_model(workspace / f"full_two_{stage}", cpu_packed_weights=False, progress=False).state_dict()
    _assert_same_weights(b, a, atol=1e-5)
