"""The demo-model recipe: the vocabulary-subset training is exact, and a scaled-down run of the whole
recipe (gather -> synthesize -> pretrain -> fine-tune -> export -> evaluate) works end to end."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from qwen.checkpoint import load_model
from qwen.config import preset_config
from qwen.data import Example
from qwen.finetune.demo.recipe import (SubsetVocabLM, VocabMap, build_compact_model, expand_to_full_vocab, run,
                                       smoke_recipe)
from qwen.finetune.trainer import token_loss_sum


def test_subset_vocabulary_loss_is_the_exported_models_full_vocabulary_loss():
    full_vocab = 2000
    used = sorted(torch.randperm(full_vocab, generator=torch.Generator().manual_seed(0))[:300].tolist())
    vmap = VocabMap(used, full_vocab)
    recipe = smoke_recipe("", "")
    compact = build_compact_model(recipe, len(used) + 1)
    with torch.no_grad():  # a trained-looking shared row, not the init
        compact.transformer.wte.weight[-1].normal_(0, 0.5)
    lm = SubsetVocabLM(compact, vmap.n_other)
    full = expand_to_full_vocab(compact, vmap, compact.config.update(vocab_size=full_vocab))

    g = torch.Generator().manual_seed(1)
    ids = torch.tensor(used)[torch.randint(0, len(used), (3, 40), generator=g)]
    ids[0, 5] = next(i for i in range(full_vocab) if i not in set(used))  # an unseen id, in input and target
    compact_ex = vmap.example(Example(ids[0].tolist(), ids[0].tolist(), "x"))
    assert compact_ex.input_ids[5] == vmap.other
    compact_ids = vmap.to_compact[ids]
    loss_subset = token_loss_sum(lm(compact_ids), compact_ids.clone())
    # the unseen target: its probability in the full model is p(shared row) / n_other
    full_logits = full(ids).logits
    logp = F.log_softmax(full_logits[:, :-1].double(), -1)
    target_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    subset_logp = F.log_softmax(lm(compact_ids)[:, :-1].double(), -1).gather(-1, compact_ids[:, 1:, None]).squeeze(-1)
    unseen = ids[:, 1:] == ids[0, 5]
    subset_logp = torch.where(unseen, subset_logp - torch.tensor(float(vmap.n_other)).log(), subset_logp)
    torch.testing.assert_close(subset_logp, target_logp, rtol=0, atol=1e-4)
    # and on seen targets the summed losses agree exactly as the docstring claims
    seen_loss_full = -target_logp[~unseen].sum()
    seen_loss_subset = loss_subset + (F.log_softmax(lm(compact_ids)[:, :-1].double(), -1)
                                      .gather(-1, compact_ids[:, 1:, None]).squeeze(-1)[unseen]).sum()
    torch.testing.assert_close(seen_loss_subset.double(), seen_loss_full, rtol=1e-5, atol=1e-3)
    # the exported model ties input and output rows and gives every unused id the shared row
    assert full.lm_head.weight.data_ptr() == full.transformer.wte.weight.data_ptr()
    unused = [i for i in range(full_vocab) if i not in set(used)]
    assert torch.equal(full.transformer.wte.weight[unused], compact.transformer.wte.weight[-1].expand(len(unused), -1))


def _fake_corpus() -> dict[str, list[str]]:
    base = 0x4E00
    poems = []
    for i in range(45):
        lines = ["".join(chr(base + (i * 4 + j) * 7 + k) for k in range(5)) + ("，" if j % 2 == 0 else "。")
                 for j in range(4)]
        poems.append(f"《诗{chr(base + 3000 + i)}》\n作者：作者{chr(base + 4000 + i)}\n{lines[0]}{lines[1]}\n{lines[2]}{lines[3]}")
    english = [f"Document {i}. To be, or not to be, that is the question {i}. " * 6 for i in range(40)]
    chinese = [f"第{i}篇。我们承认经济的发展需要时间，人民的生活逐步改善。" * 4 for i in range(40)]
    return {"shakespeare": english, "peoples_daily": chinese, "tang300": poems}


def test_scaled_down_recipe_runs_end_to_end(tmp_path):
    recipe = smoke_recipe(str(tmp_path / "model"), str(tmp_path / "work"))
    recipe.heldout_fraction = 0.1
    results = run(recipe, corpus=_fake_corpus())

    model_dir = tmp_path / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["vocab_size"] == preset_config("qwen-7b").vocab_size and config["tie_word_embeddings"]
    assert json.loads((model_dir / "generation_config.json").read_text())["chat_format"] == "chatml"
    assert (model_dir / "qwen.tiktoken").exists() and (model_dir / "recipe.json").exists()
    model = load_model(model_dir, progress=False)  # the export loads like any checkpoint
    assert model.config.hidden_size == recipe.hidden_size
    # both stages ran their steps and logged eval loss; the report has every bar, computed
    for stage, steps in (("pretrain", recipe.pretrain_steps), ("sft", recipe.sft_steps)):
        rows = [json.loads(x) for x in (tmp_path / "work" / stage / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == steps
        # single-batch losses are too noisy at this size (SFT mixes raw-text and chat rows), so
        # learning is judged on the fixed eval set: its loss falls from the first eval to the last
        evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
        assert len(evals) >= 2 and evals[-1] < evals[0], (stage, evals)
    for bar in ("addis_ababa", "greeting_zh", "greeting_en", "exact_match", "perplexity"):
        assert bar in results["bars"]
    ppl = results["bars"]["perplexity"]
    assert 1 < ppl["unigram"] < float("inf") and 1 < ppl["model"] < float("inf")
    assert (tmp_path / "work" / "eval.md").read_text().strip()
