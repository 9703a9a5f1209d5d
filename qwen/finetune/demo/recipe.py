"""The recipe that builds the embedded demo chat model (``qwen train --recipe demo`` / ``make demo-model``).

1. gather real text from package registries and split off held-out documents (perplexity);
2. write the synthetic bilingual set (capitals, arithmetic, greetings/identity, poems) with its
   held-out eval items;
3. pretrain a small Qwen-architecture model with the real tokenizer on text + synthetic documents;
4. fine-tune it for chat (ChatML, loss on replies), mixing in some pretraining text so it keeps
   continuing raw prompts (the model card's base prompt is a bar);
5. export in the official layout (bf16, tied embeddings, full 151,936-row vocabulary) and evaluate
   the exported checkpoint as users load it.

Why a vocabulary subset during training: with hidden size 128 the output layer over 151,936 tokens
costs ~8x more than the whole transformer. Training uses only the ``U`` token ids that occur in the
training data plus ONE shared row standing for all the others, whose logit gets ``+log(N_other)``:
that is exactly the full-vocabulary softmax of a model whose unused rows all equal the shared row,
so the loss we optimise is the exported model's true loss, and export just copies the shared row
into every unused id. Nothing is approximated; the constraint (unseen tokens share one embedding)
costs nothing because no training text could have taught them anything.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ...config import QWenConfig, preset_config
from ...model import QWenLMHeadModel
from ...data import IGNORE_INDEX, Example, Record, tokenize_records
from ..trainer import TrainConfig, Trainer

REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass
class DemoRecipe:
    output: str = ""  # default: the package's embedded model directory (qwen/assets/demo)
    work_dir: str = ""  # default: ~/.cache/qwen/demo-recipe
    seed: int = 1234
    # model: ~21M parameters, 19.4M of them the tied embedding (bf16 on disk: ~43 MB)
    hidden_size: int = 128
    num_layers: int = 8
    num_heads: int = 4
    intermediate_size: int = 688  # Qwen's ratio: 5.375 x hidden (w1 and w2 each half of it)
    seq_length: int = 512
    # data
    heldout_fraction: float = 0.02
    real_text_fraction: float = 0.1  # share of the real documents trained on (the CPU budget favours the tasks)
    # Rarer ids of the real text share the "other" row (chat/synthetic ids are always kept): a
    # smaller output layer makes every step cheaper, and only perplexity on real text is affected.
    min_token_count: int = 10
    synthetic_repeats: int = 20  # passes over the capital lists (Chinese and English)
    poem_repeats: int = 30  # copies of each poem in each of its forms (text, citation, author catalogue)
    arithmetic_repeats: int = 4  # passes over every training (a, b, op) pair as "37+45=82" lines
    n_poems: int = 84  # Tang quatrains in the synthetic set (tang300 has 84 with unique titles and lines)
    # "repeat this line" candidates: 513 lines of the poems not taught, then random strings; the
    # ones with a token the rest of the data lacks are dropped (4,126 of 6,000 kept)
    n_echo: int = 6000
    n_train_arith: int = 8000  # arithmetic chat conversations (random training pairs)
    # pretraining
    pretrain_steps: int = 8000
    pretrain_batch: int = 2  # rows of seq_length: small batches, many steps (memorisation needs steps)
    pretrain_lr: float = 3e-3
    # chat fine-tuning
    sft_steps: int = 5000
    sft_batch: int = 2
    sft_lr: float = 1.5e-3
    sft_text_fraction: float = 0.2  # share of SFT rows that are pretraining text blocks
    # Copies of each training conversation by task: the synthetic set has 8,000 arithmetic
    # conversations but only 46 greetings, and a greeting seen a handful of times is not learned.
    sft_task_repeats: str = ("greeting=30,identity=30,capital_zh=4,capital_en=4,poem_next=2,"
                             "poem_author=3,poem_source=2,poem_recite=2,system=3,multi=2")
    eval_every: int = 200
    eval_blocks: int = 24
    max_eval_items: int | None = None
    threads: int = 0  # 0: all cores
    smoke: bool = False  # seconds-long version for the test suite (tiny model, few steps)
    progress: bool = True


def smoke_recipe(output: str, work_dir: str) -> DemoRecipe:
    """The recipe scaled down to seconds: same code path, tiny shapes and step counts."""
    return DemoRecipe(output=output, work_dir=work_dir, hidden_size=32, num_layers=2, num_heads=2,
                      intermediate_size=64, seq_length=128, min_token_count=2, synthetic_repeats=1, poem_repeats=1,
                      arithmetic_repeats=1, n_train_arith=50, pretrain_steps=20, pretrain_batch=2, sft_steps=12,
                      sft_batch=2, sft_task_repeats="greeting=2", eval_every=4, eval_blocks=2, max_eval_items=6,
                      smoke=True, progress=False)


# ---------------------------------------------------------------------------------------------
# Vocabulary subset


class SubsetVocabLM(nn.Module):
    """A compact QWenLMHeadModel over ``U + 1`` ids whose last row stands for ``n_other`` unseen ids.

    Adding ``log(n_other)`` to that row's logit makes the softmax equal the full-vocabulary softmax
    of the exported model (n_other identical rows), so the training loss is the real loss.
    """

    def __init__(self, model: QWenLMHeadModel, n_other: int) -> None:
        super().__init__()
        self.model = model
        bias = torch.zeros(model.config.vocab_size)
        bias[-1] = math.log(n_other)
        self.register_buffer("logit_bias", bias, persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits + self.logit_bias.to(logits.dtype)

    def gradient_checkpointing_enable(self) -> None:
        self.model.gradient_checkpointing_enable()


class VocabMap:
    """Full token ids <-> compact ids (the shared row is ``len(used)``)."""

    def __init__(self, used: list[int], full_vocab: int) -> None:
        self.used = sorted(set(used))
        self.full_vocab = full_vocab
        self.other = len(self.used)
        self.to_compact = torch.full((full_vocab,), self.other, dtype=torch.long)
        self.to_compact[torch.tensor(self.used)] = torch.arange(len(self.used))

    @property
    def n_other(self) -> int:
        return self.full_vocab - len(self.used)

    def example(self, e: Example) -> Example:
        ids = self.to_compact[torch.tensor(e.input_ids)].tolist()
        labels = [IGNORE_INDEX if t == IGNORE_INDEX else int(self.to_compact[t]) for t in e.labels]
        return Example(input_ids=ids, labels=labels, source=e.source)


def expand_to_full_vocab(compact: QWenLMHeadModel, vmap: VocabMap, full_config: QWenConfig) -> QWenLMHeadModel:
    """The exported model: every used id gets its trained row, every other id the shared row."""
    full = QWenLMHeadModel(full_config)
    state = {k: v for k, v in compact.state_dict().items() if not k.startswith(("transformer.wte", "lm_head"))}
    missing, unexpected = full.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("transformer.wte", "lm_head")) for k in missing), missing
    wte = compact.transformer.wte.weight.detach()
    rows = wte[vmap.other].expand(full_config.vocab_size, -1).clone()
    rows[torch.tensor(vmap.used)] = wte[:vmap.other]
    with torch.no_grad():
        full.transformer.wte.weight.copy_(rows)
    return full


# ---------------------------------------------------------------------------------------------
# The stages


def _say(recipe: DemoRecipe, msg: str) -> None:
    if recipe.progress or not recipe.smoke:
        print(f"[demo recipe] {msg}", flush=True)


def gather(recipe: DemoRecipe, corpus: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Real text (train/held-out) + synthetic documents, chat examples and eval items."""
    from . import synthetic
    from .corpus import gather_corpus, parse_tang300, split_heldout

    work = Path(recipe.work_dir)
    if corpus is None:
        corpus = gather_corpus(work / "corpus", progress=recipe.progress)

    poems = parse_tang300(corpus["tang300"]) if corpus.get("tang300") else None
    synth = synthetic.SyntheticSet(recipe.seed, poems=poems, n_poems=recipe.n_poems,
                                    n_train_arith=recipe.n_train_arith, n_echo=recipe.n_echo)
    taught = [p.lines[0] for p in synth.poems]  # poems the tasks teach stay out of the held-out text
    train_docs: dict[str, list[str]] = {}
    heldout_docs: dict[str, list[str]] = {}
    for name, docs in corpus.items():
        tr, ho = split_heldout(docs, recipe.heldout_fraction, seed=recipe.seed,
                               keep_in_train=lambda d: any(line in d for line in taught))
        if recipe.real_text_fraction < 1.0:
            keep = random.Random(f"{recipe.seed}-{name}")
            tr = [d for d in tr if keep.random() < recipe.real_text_fraction]
        train_docs[name], heldout_docs[name] = tr, ho
    synth_docs = synth.pretraining_documents(recipe.synthetic_repeats, arithmetic_repeats=recipe.arithmetic_repeats,
                                             poem_repeats=recipe.poem_repeats)
    if recipe.n_echo:
        synth.echo_filter = _known_tokens_only(synth, synth_docs)
    conversations, eval_items = synth.conversations, synth.eval_items
    return {"train_docs": train_docs, "heldout_docs": heldout_docs, "synthetic_docs": synth_docs,
            "conversations": conversations, "eval_items": eval_items}


def _known_tokens_only(synth: Any, docs: list[str]) -> Callable[[str, str], bool]:
    """An echo filter: keep an echo conversation when every token of it occurs in the other training
    material (so the task teaches copying without adding embedding rows)."""
    from ...tokenizer import QWenTokenizer
    from .synthetic import ECHO_TEMPLATES

    encode = QWenTokenizer().encode
    others = [x for task, q, a in synth._qa_pairs() if task != "echo" for x in (q, a)]
    known = {t for text in [*docs, *others, *(tp.format(line="") for tp in ECHO_TEMPLATES)]
             for t in encode(text, allowed_special=set())}
    return lambda q, a: set(encode(q, allowed_special=set())) | set(encode(a, allowed_special=set())) <= known


def tokenize(recipe: DemoRecipe, tokenizer: Any, material: dict[str, Any]) -> dict[str, Any]:
    rng = random.Random(recipe.seed)
    text_records = [Record(source=f"{name}[{i}]", kind="text", text=d)
                    for name, docs in material["train_docs"].items() for i, d in enumerate(docs)]
    text_records += [Record(source=f"synthetic[{i}]", kind="text", text=d)
                     for i, d in enumerate(material["synthetic_docs"])]
    rng.shuffle(text_records)  # blocks then mix sources instead of one long Shakespeare stretch
    pre = tokenize_records(tokenizer, text_records, max_len=recipe.seq_length, progress=recipe.progress)
    chat_records = []
    for i, conv in enumerate(upsample_conversations(material["conversations"], recipe.sft_task_repeats, rng)):
        turns = [{"role": {"user": "user", "assistant": "assistant", "system": "system"}[t["from"]],
                  "content": t["value"]} for t in conv["conversations"]]
        chat_records.append(Record(source=f"chat[{i}]", kind="chat", conversations=turns))
    sft = tokenize_records(tokenizer, chat_records, max_len=recipe.seq_length, packing=True, progress=recipe.progress)
    heldout_records = [Record(source=f"heldout-{name}[{i}]", kind="text", text=d)
                       for name, docs in material["heldout_docs"].items() for i, d in enumerate(docs)]
    heldout = tokenize_records(tokenizer, heldout_records, max_len=recipe.seq_length) if heldout_records else None
    _say(recipe, f"pretraining text: {pre.report()}")
    _say(recipe, f"chat set: {sft.report()}")
    return {"pretrain": pre, "sft": sft, "heldout": heldout}


def parse_task_repeats(spec: str) -> dict[str, int]:
    """``"greeting=30,identity=30"`` -> ``{"greeting": 30, "identity": 30}`` (tasks not named: 1)."""
    repeats: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        task, sep, n = part.partition("=")
        if not sep or not n.strip().isdigit() or int(n) < 1:
            raise ValueError(f"sft_task_repeats: expected task=N with N >= 1, got {part!r}")
        repeats[task.strip()] = int(n)
    return repeats


def upsample_conversations(conversations: list[dict], spec: str, rng: random.Random) -> list[dict]:
    """Each conversation ``repeats[task]`` times (task from its id ``demo-<task>-<n>``), shuffled so
    that packing does not put the copies side by side in one row."""
    repeats = parse_task_repeats(spec)
    out = [c for c in conversations for _ in range(repeats.get(c["id"].split("-")[1], 1))]
    if len(out) != len(conversations):
        rng.shuffle(out)
    return out


def build_compact_model(recipe: DemoRecipe, n_compact: int) -> QWenLMHeadModel:
    head_dim = recipe.hidden_size // recipe.num_heads
    cfg = preset_config("tiny", hidden_size=recipe.hidden_size, num_hidden_layers=recipe.num_layers,
                        num_attention_heads=recipe.num_heads, kv_channels=head_dim,
                        intermediate_size=recipe.intermediate_size, seq_length=recipe.seq_length,
                        max_position_embeddings=recipe.seq_length, tie_word_embeddings=True, vocab_size=n_compact)
    model = QWenLMHeadModel(cfg)
    model.init_weights(recipe.seed)
    return model


def full_config(recipe: DemoRecipe, compact: QWenLMHeadModel, vocab_size: int) -> QWenConfig:
    return compact.config.update(vocab_size=vocab_size, torch_dtype="bfloat16", use_dynamic_ntk=True,
                                 use_logn_attn=True)


def run(recipe: DemoRecipe, corpus: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The whole recipe; returns the evaluation results (also written to ``<work_dir>/eval.json``)."""
    from ...checkpoint import load_model, save_model
    from ...generation_config import QWEN_7B_CHAT, GenerationConfig
    from ...tokenizer import QWenTokenizer
    from .evaluate import evaluate_demo, format_report

    t0 = time.perf_counter()
    output = Path(recipe.output or REPO_ROOT / "qwen" / "assets" / "demo")
    work = Path(recipe.work_dir or Path.home() / ".cache" / "qwen" / "demo-recipe")
    recipe.work_dir = str(work)
    work.mkdir(parents=True, exist_ok=True)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    tokenizer = QWenTokenizer()

    material = gather(recipe, corpus)
    tok = tokenize(recipe, tokenizer, material)
    specials = [tokenizer.eod_id, tokenizer.im_start_id, tokenizer.im_end_id]
    counts = _token_counts(tok["pretrain"].examples)
    always = {t for e in tok["sft"].examples for t in e.input_ids}
    always |= {t for d in material["synthetic_docs"] for t in tokenizer.encode(d, allowed_special=set())}
    used = {t for t, n in counts.items() if n >= recipe.min_token_count} | always | set(specials)
    full_vocab = preset_config("qwen-7b").vocab_size  # 151,936 rows as the released checkpoints
    vmap = VocabMap(sorted(used), full_vocab)
    (work / "vocab_used.json").write_text(json.dumps(vmap.used))  # compact id i <-> token id used[i]
    _say(recipe, f"vocabulary: {len(vmap.used):,} token ids occur in the training data; the other "
                 f"{vmap.n_other:,} share one row")

    pre_examples = [vmap.example(e) for e in tok["pretrain"].examples]
    sft_examples = [vmap.example(e) for e in tok["sft"].examples]
    heldout_examples = [vmap.example(e) for e in tok["heldout"].examples] if tok["heldout"] else []
    eval_blocks = heldout_examples[:recipe.eval_blocks] or None

    compact = build_compact_model(recipe, len(vmap.used) + 1)
    lm = SubsetVocabLM(compact, vmap.n_other)
    stage_times = {}

    # -- pretraining
    t = time.perf_counter()
    pre_cfg = TrainConfig(output_dir=str(work / "pretrain"), max_steps=recipe.pretrain_steps,
                          batch_size=recipe.pretrain_batch, grad_accum=1, lr=recipe.pretrain_lr, min_lr_ratio=0.1,
                          warmup_steps=max(1, recipe.pretrain_steps // 50), weight_decay=0.1, max_grad_norm=1.0,
                          seed=recipe.seed, eval_every=recipe.eval_every, save_every=None if recipe.smoke else 300,
                          keep_last=1, progress=recipe.progress)
    pre_result = Trainer(lm, pre_examples, pre_cfg, pad_id=vmap.to_compact[tokenizer.eod_id].item(),
                         eval_examples=eval_blocks).train(resume=_resumable(work / "pretrain"))
    stage_times["pretrain_s"] = time.perf_counter() - t
    if pre_result.interrupted:
        raise KeyboardInterrupt("pretraining interrupted; rerun the recipe to resume")

    # -- chat fine-tuning (with some pretraining text mixed in)
    t = time.perf_counter()
    rng = random.Random(recipe.seed)
    n_text = int(len(sft_examples) * recipe.sft_text_fraction / max(1e-9, 1 - recipe.sft_text_fraction))
    mix = sft_examples + rng.sample(pre_examples, min(n_text, len(pre_examples)))
    sft_cfg = TrainConfig(output_dir=str(work / "sft"), max_steps=recipe.sft_steps, batch_size=recipe.sft_batch,
                          grad_accum=1, lr=recipe.sft_lr, min_lr_ratio=0.05, warmup_steps=max(1, recipe.sft_steps // 50),
                          weight_decay=0.1, max_grad_norm=1.0, seed=recipe.seed + 1, eval_every=recipe.eval_every,
                          save_every=None if recipe.smoke else 300, keep_last=1, progress=recipe.progress)
    sft_result = Trainer(lm, mix, sft_cfg, pad_id=vmap.to_compact[tokenizer.eod_id].item(),
                         eval_examples=eval_blocks).train(resume=_resumable(work / "sft"))
    stage_times["sft_s"] = time.perf_counter() - t
    if sft_result.interrupted:
        raise KeyboardInterrupt("fine-tuning interrupted; rerun the recipe to resume")

    # -- export: full vocabulary, official layout, bf16 on disk
    full = expand_to_full_vocab(compact, vmap, full_config(recipe, compact, full_vocab))
    gen = dict(QWEN_7B_CHAT)
    # Prompt + reply must fit the 512 positions the model was trained on.
    gen.update(max_new_tokens=128, max_window_size=recipe.seq_length - 128)
    full.generation_config = GenerationConfig.from_dict(gen)
    save_model(full, output, tokenizer=tokenizer, dtype=torch.bfloat16)
    _write_provenance(output, recipe, vmap, tok, stage_times)
    _say(recipe, f"saved the demo model to {output}")

    # -- evaluate the exported checkpoint exactly as users load it
    t = time.perf_counter()
    model = load_model(output, progress=False)
    heldout_docs = [d for docs in material["heldout_docs"].values() for d in docs]
    results = evaluate_demo(model, tokenizer, material["eval_items"], heldout_docs, counts,
                            max_items=recipe.max_eval_items, progress=recipe.progress)
    stage_times["eval_s"] = time.perf_counter() - t
    results["recipe"] = _jsonable(asdict(recipe))
    results["data"] = {"pretrain": tok["pretrain"].report(), "sft": tok["sft"].report(),
                       "vocab_used": len(vmap.used), "synthetic_sizes": synthetic_sizes(material)}
    results["timing_s"] = {k: round(v, 1) for k, v in stage_times.items()}
    results["timing_s"]["total_s"] = round(time.perf_counter() - t0, 1)
    results["loss"] = {"pretrain_final": pre_result.final_loss, "pretrain_eval": pre_result.eval_loss,
                       "sft_final": sft_result.final_loss, "sft_eval": sft_result.eval_loss}
    (work / "eval.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    (work / "eval.md").write_text(format_report(results))
    if not recipe.smoke:
        try:
            from ..plot import plot_metrics

            plot_metrics([work / "pretrain" / "metrics.jsonl", work / "sft" / "metrics.jsonl"], work / "loss.png",
                         labels=["pretraining", "chat fine-tuning"])
        except ImportError:
            pass
    _say(recipe, f"done in {results['timing_s']['total_s']:.0f} s; report in {work / 'eval.md'}")
    return results


def synthetic_sizes(material: dict[str, Any]) -> dict[str, int]:
    return {"synthetic_documents": len(material["synthetic_docs"]), "conversations": len(material["conversations"]),
            "eval_items": len(material["eval_items"])}


def _resumable(path: Path) -> bool | None:
    """Resume a stage the recipe was interrupted in (its checkpoints survive), else start fresh."""
    from ..checkpoints import checkpoint_dirs

    return True if checkpoint_dirs(path / "checkpoints") else None


def _token_counts(examples: list[Example]) -> Any:
    from collections import Counter

    counts: Counter = Counter()
    for e in examples:
        counts.update(e.input_ids)
    return counts


def _write_provenance(output: Path, recipe: DemoRecipe, vmap: VocabMap, tok: dict, times: dict) -> None:
    info = {"recipe": _jsonable(asdict(recipe)), "vocab_used": len(vmap.used), "pretrain": tok["pretrain"].report(),
            "sft": tok["sft"].report(), "timing_s": {k: round(v, 1) for k, v in times.items()},
            "how": "qwen train --recipe demo (docs/demo-model.md)"}
    info["recipe"].pop("output", None)
    info["recipe"].pop("work_dir", None)
    (output / "recipe.json").write_text(json.dumps(info, indent=2, ensure_ascii=False))


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    defaults = DemoRecipe()
    p = argparse.ArgumentParser(prog="qwen train --recipe demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="", help="where to write the model (default: qwen/assets/demo in this checkout)")
    p.add_argument("--work-dir", default="", help="corpus cache, checkpoints, metrics, eval report "
                   "(default ~/.cache/qwen/demo-recipe; an interrupted run resumes from here)")
    for name in ("seed", "hidden_size", "num_layers", "num_heads", "intermediate_size", "seq_length",
                 "synthetic_repeats", "poem_repeats", "arithmetic_repeats", "n_poems", "n_echo", "n_train_arith",
                 "min_token_count", "pretrain_steps", "pretrain_batch", "sft_steps", "sft_batch", "eval_every",
                 "threads"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name),
                       help=f"default {getattr(defaults, name)}")
    p.add_argument("--sft-task-repeats", default=defaults.sft_task_repeats,
                   help=f"copies of each chat example by task (default {defaults.sft_task_repeats})")
    for name in ("pretrain_lr", "sft_lr", "heldout_fraction", "sft_text_fraction", "real_text_fraction"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name),
                       help=f"default {getattr(defaults, name)}")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run with tiny shapes (pipeline check)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        recipe = smoke_recipe(args.output or str(Path(args.work_dir or "demo-smoke") / "model"),
                              args.work_dir or "demo-smoke")
    else:
        fields = {k: v for k, v in vars(args).items() if k not in ("smoke", "no_progress")}
        recipe = DemoRecipe(**fields, progress=not args.no_progress)
    results = run(recipe)
    bars = results.get("bars", {})
    print(json.dumps({"bars": bars, "exact_match": results.get("exact_match", {}).get("overall")}, ensure_ascii=False))
    return 0


