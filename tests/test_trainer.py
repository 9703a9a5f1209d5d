"""The training loop: schedule, loss normalisation, resume equivalence, signals, checkpoint damage,
and data parallelism (2-process torchrun on gloo) against a single process."""

from __future__ import annotations

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
from qwen.finetune.trainer import Trainer, cosine_schedule, epoch_micro_batches, token_loss_sum
from training_helpers import config, examples, free_port, tiny_model

REPO = Path(__file__).resolve().parents[1]


def test_cosine_schedule_warms_up_then_decays_to_floor():
    total, warm = 100, 10
    lrs = [cosine_schedule(s, total, warm, 0.1) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warmup
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-9)  # half way: mid-point of the cosine
    assert lrs[total] == pytest.approx(0.1)


def test_epoch_order_is_deterministic_and_covers_each_example_once():
    lengths = list(range(5, 105))
    a = epoch_micro_batches(lengths, 4, seed=3, epoch=1)
    assert a == epoch_micro_batches(lengths, 4, seed=3, epoch=1)
    assert a != epoch_micro_batches(lengths, 4, seed=3, epoch=2)
    flat = sorted(i for b in a for i in b)
    assert flat == list(range(100))
    grouped = epoch_micro_batches(lengths, 4, seed=3, epoch=1, group_by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(100))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in grouped)
    assert spread < sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) / 4


def test_loss_is_the_token_mean_of_the_global_batch(tmp_path):
    # batch 4 x accum 1, batch 1 x accum 4 and 2 x 2 must produce the same loss and gradient
    data = examples(8)
    results = []
    for bs, acc in ((4, 1), (1, 4), (2, 2)):
        model = tiny_model()
        trainer = Trainer(model, data, config(tmp_path / f"{bs}", batch_size=bs, grad_accum=acc, max_steps=1,
                                              max_grad_norm=None), pad_id=0)
        grads = {}
        trainer.optimizer.step = lambda *a, **k: grads.update(
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        batches = trainer.step_batches(0)
        metrics = trainer.train_step()
        results.append((grads, metrics["loss"], sorted(i for b in batches for i in b)))
    (ref, ref_loss, ref_idx) = results[0]
    assert len(ref) == len(list(tiny_model().parameters()))
    for grads, loss, idx in results[1:]:
        assert idx == ref_idx
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        for k in ref:
            torch.testing.assert_close(grads[k], ref[k], rtol=1e-4, atol=1e-7, msg=k)


def test_eval_loss_equals_direct_computation(tmp_path):
    data = examples(10)
    model = tiny_model()
    trainer = Trainer(model, data, config(tmp_path), pad_id=0, eval_examples=data[:5])
    got = trainer.evaluate()
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for e in data[:5]:
            ids = torch.tensor([e.input_ids])
            total += float(token_loss_sum(model(ids).logits, torch.tensor([e.labels])))
            count += sum(1 for t in e.labels[1:] if t != -100)
    assert got == pytest.approx(total / count, rel=1e-5)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_interrupted_and_resumed_run_reaches_the_same_weights(tmp_path):
    data = examples(24)
    # dropout makes the result depend on the restored RNG state, not only on the data order
    kw = dict(emb_dropout_prob=0.1, attn_dropout_prob=0.1)
    straight = tiny_model(**kw)
    Trainer(straight, data, config(tmp_path / "a", max_steps=8), pad_id=0).train()

    first = tiny_model(**kw)
    t1 = Trainer(first, data, config(tmp_path / "b", max_steps=8), pad_id=0,
                 on_log=lambda r: os.kill(os.getpid(), signal.SIGINT) if r["step"] == 3 else None)
    r1 = t1.train()  # the real SIGINT handler: checkpoint at the end of step 3, then stop
    assert r1.interrupted and r1.steps == 3
    assert (tmp_path / "b" / "checkpoints" / "step-00000003" / "trainer_state.json").exists()

    torch.manual_seed(12345)  # a fresh process would have a different RNG state: resume must restore it
    second = tiny_model(seed=99, **kw)  # different init: resume must overwrite everything
    t2 = Trainer(second, data, config(tmp_path / "b", max_steps=8), pad_id=0)
    r2 = t2.train(resume=True)
    assert not r2.interrupted and t2.step == 8
    ref = _weights(straight)
    for k, v in _weights(second).items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-6, msg=k)
    # the metrics file has each step once
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    a = [json.loads(line)["loss"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line)["loss"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert a == pytest.approx(b, rel=1e-6)
    assert (tmp_path / "b" / "loss.png").stat().st_size > 1000


def test_keep_last_and_damaged_checkpoints_fail_loudly(tmp_path):
    data = examples(24)
    Trainer(tiny_model(), data, config(tmp_path, max_steps=6, save_every=1, keep_last=2), pad_id=0).train()
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-00000005", "step-00000006"]

    with pytest.raises(CheckpointError, match="batch_size"):
        Trainer(tiny_model(), data, config(tmp_path, max_steps=6, batch_size=3, grad_accum=1), pad_id=0).train(
            resume=tmp_path / "checkpoints" / "step-00000006")

    weights = tmp_path / "checkpoints" / "step-00000006" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-10] ^= 0xFF  # one flipped bit in the tensor data
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="model.safetensors is damaged"):
        Trainer(tiny_model(), data, config(tmp_path, max_steps=6), pad_id=0).train(resume=True)

    opt = tmp_path / "checkpoints" / "step-00000005" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="optimizer.pt is damaged"):
        Trainer(tiny_model(), data, config(tmp_path, max_steps=6), pad_id=0).train(
            resume=tmp_path / "checkpoints" / "step-00000005")

    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        Trainer(tiny_model(), data, config(tmp_path / "empty"), pad_id=0).train(resume=True)



def test_lora_trainer_checkpoints_only_trainable_weights(tmp_path):
    pytest.importorskip("peft")
    from qwen.finetune.lora import LoraSettings, apply_lora

    init_checkpoint("tiny-vocab", tmp_path / "base", seed=1, chat=True)
    model = load_model(tmp_path / "base", cpu_packed_weights=False, progress=False)
    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    trainer = Trainer(peft_model, examples(12), config(tmp_path / "run", max_steps=2, save_every=2), pad_id=0)
    trainer.train()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert saved and all("lora_" in k for k in saved)


def _train_cli(args: list[str], cwd: Path, nproc: int | None = None) -> subprocess.CompletedProcess:
    if nproc:
        port = free_port()
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
               "-m", "qwen", "train", *args]
    else:
        cmd = [sys.executable, "-m", "qwen", "train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _sft_file(path: Path) -> Path:
    rows = []
    for i in range(16):
        rows.append({"id": str(i), "conversations": [
            {"from": "user", "value": f"What is {i} + {i}?"},
            {"from": "assistant", "value": f"{i} + {i} = {2 * i}. " * (1 + i % 3)}]})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process(tmp_path, mode):
    init_checkpoint("tiny", tmp_path / "ck", seed=3, chat=True)
    data = _sft_file(tmp_path / "sft.jsonl")
    common = ["--model", "ck", "--data", str(data), "--method", "full", "--max-steps", "4", "--batch-size", "2",
              "--lr", "1e-3", "--no-progress", "--distributed", mode]
    single = _train_cli([*common, "--output", "one", "--grad-accum", "2"], tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    multi = _train_cli([*common, "--output", "two", "--grad-accum", "1"], tmp_path, nproc=2)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    # same global batch, same order, same token-mean loss: equal curves (fp32 reduction order only)
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    a = load_model(tmp_path / "one", cpu_packed_weights=False, progress=False).state_dict()
    b = load_model(tmp_path / "two", cpu_packed_weights=False, progress=False).state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
