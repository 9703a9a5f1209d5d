"""Data and evaluation of the demo model (qwen.finetune.demo): facts table, corpus cleaning on inline
samples shaped like the real files, the synthetic set's held-out split, and evaluate_demo on a tiny
random model and on an oracle stub. No network: tests of real corpus files skip when absent."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from qwen.finetune.demo import corpus, evaluate, facts, synthetic
from qwen.finetune.demo.corpus import Poem
from qwen.finetune.demo.synthetic import SyntheticSet
from qwen.tokenizer import QWenTokenizer
from scripted import Scripted

TANG300 = corpus.FORTUNES_DIR / "tang300"


# ============================================================================================ facts
def test_facts_table() -> None:
    table = facts.COUNTRIES
    assert len(table) == 195
    for key in ("name_zh", "capital_zh", "name_en", "capital_en"):
        values = [getattr(c, key) for c in table]
        assert all(v and v == v.strip() for v in values), key
    assert len({c.name_zh for c in table}) == 195
    assert len({c.name_en for c in table}) == 195
    for c in table:
        # The model card's line format uses full-width brackets and one line per country.
        assert not set("（）()\n") & set(c.name_zh + c.capital_zh), c
        assert c.name_en.isascii() and c.capital_en.isascii(), c
        assert re.fullmatch(r"[\u4e00-\u9fff·]+", c.name_zh + c.capital_zh), c
    assert sum(len(r) for r in facts.REGIONS.values()) == 195
    assert len(facts.countries()) == 193 and all(not c.disputed for c in facts.countries())
    assert facts.by_name_zh("蒙古国") == facts.Country("蒙古国", "乌兰巴托", "Mongolia", "Ulaanbaatar")
    assert facts.by_name_zh("冰岛") == facts.Country("冰岛", "雷克雅未克", "Iceland", "Reykjavik")
    assert facts.by_name_zh("埃塞俄比亚") == facts.Country("埃塞俄比亚", "亚的斯亚贝巴", "Ethiopia", "Addis Ababa")
    assert facts.by_name_zh("中国") == facts.Country("中国", "北京", "China", "Beijing")
    assert facts.capital_line_zh(facts.by_name_zh("蒙古国")) == "蒙古国的首都是乌兰巴托（Ulaanbaatar）"
    assert facts.capital_sentence_en(facts.by_name_en("Netherlands")) == "The capital of the Netherlands is Amsterdam."


# =========================================================================================== corpus
FORTUNE_ZH_SAMPLE = (
    "要有礼貌\n\n在 Debian 这种规模的项目中，很难避免遇到与你意见不和的人。\n\n"
    "\x1b[33m    -- Debian \x1b[32m《行为准则》\x1b[m第一条\x1b[m\n%\n"
    "\x1b[37;1m2.2.8.\xa0aptitude 的依赖解决\x1b[;m\n\n    如果通过菜单 \x1b[35;1m“F10”\x1b[;m 进行设置，版本１２３。\n%\n"
)
TANG_SAMPLE = (
    "\x1b[32m《夜思》\x1b[m\n\x1b[33m作者：李白\x1b[m\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n%\n"
    "\x1b[32m《燕歌行・并序》\x1b[m\n\x1b[33m作者：高适\x1b[m\n开元二十六年，客有从元戎出塞而还者，作燕歌行以示适。\n"
    "感征戍之事，因而和焉。\n  \n汉家烟尘在东北，汉将辞家破残贼。\n男儿本自重横行，天子非常赐颜色。\n%\n"
    "\x1b[32m《长相思・其一》\x1b[m\n\x1b[33m作者：李白\x1b[m\n长相思，在长安。\n络纬秋啼金井阑，微霜凄凄簟色寒。\n"
)
SONG_SAMPLE = ("\x1b[32m题目:《塞上》\x1b[m\n\x1b[33m作者:柳开（９４６－９９９）\x1b[m\n"
               "鸣骹直上一千尺，天静无风声更干。\n碧眼胡儿三百骑，尽提金勒向云看。\n%\n"
               "\x1b[32m题目:《春居杂兴》二首\x1b[m\n\x1b[33m作者:王禹偁（９５４－１００１）\x1b[m\n\n"
               "            其一\n\n两株桃杏映篱斜，妆点商山副使家，\n何事春风容不得，和莺吹折数枝花。\n\n"
               "            其二\n\n春云如兽复如禽，日照风吹浅又深。\n%\n")


def test_fortunes_parsing() -> None:
    en = corpus.parse_fortunes("A day for firm decisions!!  Or is it?\n%\nLine one\n\tindented  \n\n\n\nend\n%\n%\n")
    assert en == ["A day for firm decisions!!  Or is it?", "Line one\n        indented\n\nend"]
    zh = corpus.parse_fortunes(FORTUNE_ZH_SAMPLE, chinese=True)
    assert len(zh) == 2
    assert all("\x1b" not in e and "\xa0" not in e for e in zh)
    assert zh[0].endswith("-- Debian 《行为准则》第一条")
    assert zh[1].startswith("2.2.8. aptitude 的依赖解决") and "版本123。" in zh[1]
    assert corpus.strip_ansi("\x1b[32m《x》\x1b[m\x1b[;m") == "《x》"


def test_parse_tang300_sample() -> None:
    poems = corpus.parse_tang300(TANG_SAMPLE)
    assert [p.title for p in poems] == ["夜思", "燕歌行・并序", "长相思・其一"]
    p = poems[0]
    assert p.author == "李白"
    assert p.lines == ("床前明月光，", "疑是地上霜。", "举头望明月，", "低头思故乡。")
    assert p.is_jueju and p.body == "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
    assert p.text() == "《夜思》\n作者：李白\n" + p.body
    preface = poems[1]
    assert preface.preface.startswith("开元二十六年") and preface.preface.endswith("因而和焉。")
    assert preface.lines[0] == "汉家烟尘在东北，" and len(preface.lines) == 4 and "开元" not in preface.body
    assert poems[2].lines == ("长相思，", "在长安。", "络纬秋啼金井阑，", "微霜凄凄簟色寒。")
    # Cleaned documents parse the same as the raw file.
    assert corpus.parse_tang300(corpus.parse_fortunes(TANG_SAMPLE, chinese=True)) == poems
    song = corpus.parse_tang300(SONG_SAMPLE)
    assert len(song) == 2 and song[0].title == "塞上" and song[0].author == "柳开" and song[0].is_jueju
    assert song[1].title == "春居杂兴二首" and song[1].author == "王禹偁" and not song[1].preface
    assert song[1].lines[0] == "两株桃杏映篱斜，" and len(song[1].lines) == 6 and "其" not in song[1].body
    assert corpus.split_poem_lines("君不见，黄河之水天上来？奔流到海") == ["君不见，", "黄河之水天上来？", "奔流到海"]


def test_peoples_daily_detag() -> None:
    line = "迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w  一九九八年/t  新年/t  讲话/n  （/w  附/v  图片/n  １/m  张/q  ）/w"
    assert corpus.detag_line(line) == "迈向充满希望的新世纪——一九九八年新年讲话（附图片1张）"
    pku = "19980101-01-001-002/m  中共中央/nt  总书记/n  、/w  [中央/n  电视台/n]nt  １１０．８亿/m  １２．３％/m"
    assert corpus.detag_line(pku) == "中共中央总书记、中央电视台110.8亿12.3%"
    assert corpus.detag_line("使用/v  Windows/nx  NT/nx  系统/n") == "使用Windows NT系统"
    text = "\n".join(["标题一/n"] + ["正文/n  很/d  长/a  。/w"] * 3 + ["标题二/n", "又/d  一/m  段/q  。/w"])
    docs = corpus.parse_peoples_daily(text, target_chars=20)
    assert docs == ["标题一\n正文很长。\n正文很长。\n正文很长。", "标题二\n又一段。"]


def test_gutenberg_and_chunks() -> None:
    raw = ("The Project Gutenberg EBook of Hamlet\r\nLicense blah\r\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
           "\r\nHAMLET\r\n\r\nby William Shakespeare   \r\n\r\n\r\n\r\nACT I.\r\n"
           "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nmore license\r\n")
    assert corpus.strip_gutenberg(raw) == "HAMLET\n\nby William Shakespeare\n\nACT I."
    assert corpus.strip_gutenberg("HAMLET\n\nACT I.\n") == "HAMLET\n\nACT I."
    text = "\n\n".join(f"para {i} " + "x" * 30 for i in range(10))
    chunks = corpus.chunk_text(text, target_chars=100)
    assert "\n\n".join(chunks) == text and all(len(c) <= 100 for c in chunks) and len(chunks) > 3


def test_split_heldout() -> None:
    docs = [f"doc {i}" for i in range(100)]
    train, held = corpus.split_heldout(docs, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90 and set(train) | set(held) == set(docs)
    assert corpus.split_heldout(list(reversed(docs)), 0.1, seed=3)[1] == list(reversed(held))  # order-free
    assert corpus.split_heldout(docs, 0.1, seed=3) == (train, held)
    assert corpus.split_heldout(docs, 0.1, seed=4)[1] != held
    protect = set(held[:3])
    _, held2 = corpus.split_heldout(docs, 0.1, seed=3, keep_in_train=lambda d: d in protect)
    assert len(held2) == 10 and not protect & set(held2)
    tr, he = corpus.split_corpus({"a": docs, "b": docs[:10]}, 0.2, seed=0)
    assert len(he["a"]) == 20 and len(he["b"]) == 2
    stats = corpus.corpus_stats({"a": ["ab", "c"], "b": ["xyz"]})
    assert stats["total"] == {"documents": 3, "chars": 6}


@pytest.mark.skipif(not TANG300.is_file(), reason="Debian fortunes-zh is not installed")
def test_gather_corpus_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    got = corpus.gather_corpus(tmp_path, progress=False, sources=["tang300", "song100"])
    assert len(got["tang300"]) == 313 and len(got["song100"]) >= 90
    assert all("\x1b" not in d for d in got["tang300"] + got["song100"])
    manifest = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    assert manifest["sources"]["tang300"]["documents"] == 313

    def boom(*a: object, **k: object) -> list[str]:
        raise AssertionError("cache not used")

    monkeypatch.setattr(corpus, "_build_source", boom)
    assert corpus.gather_corpus(tmp_path, progress=False, sources=["tang300", "song100"]) == got
    poems = corpus.parse_tang300(got["tang300"])
    assert len(poems) == 313 and all(p.author and p.lines for p in poems)
    night = next(p for p in poems if p.title == "夜思")
    assert night.author == "李白" and night.lines[1] == "疑是地上霜。"
    assert sum(p.is_jueju for p in poems) > 60
    assert all(re.fullmatch(r"[^\x00-\x7f]+", p.body.replace("\n", "")) for p in poems)


# ======================================================================================== synthetic
def _fake_poems(n: int = 50) -> list[Poem]:
    """Quatrain-shaped stand-ins when tang300 is not installed (unique titles and lines)."""
    base = 0x4E00
    poems = []
    for i in range(n):
        lines = tuple("".join(chr(base + (i * 4 + j) * 7 + k) for k in range(5)) + ("，" if j % 2 == 0 else "。")
                      for j in range(4))
        poems.append(Poem(f"诗{chr(base + 3000 + i)}", f"作者{chr(base + 4000 + i)}", lines,
                          body=lines[0] + lines[1] + "\n" + lines[2] + lines[3]))
    return poems


@pytest.fixture(scope="module")
def poems() -> list[Poem]:
    if TANG300.is_file():
        return corpus.parse_tang300(TANG300.read_text(encoding="utf-8"))
    return _fake_poems()


@pytest.fixture(scope="module")
def synth(poems: list[Poem]) -> SyntheticSet:
    return SyntheticSet(0, poems=poems)


@pytest.fixture(scope="module")
def pretrain(synth: SyntheticSet) -> list[str]:
    return synth.pretraining_documents(repeats=3, arithmetic_repeats=1)


def _training_texts(synth: SyntheticSet, pretrain: list[str]) -> list[str]:
    return pretrain + synthetic.training_texts(synth.conversations)


def test_synthetic_deterministic(poems: list[Poem], synth: SyntheticSet, pretrain: list[str]) -> None:
    again = SyntheticSet(0, poems=poems)
    assert again.conversations == synth.conversations
    assert again.eval_items == synth.eval_items
    assert again.pretraining_documents(repeats=3) == pretrain
    other = SyntheticSet(1, poems=poems)
    assert other.eval_items != synth.eval_items
    convs, items = synthetic.chat_examples(0, poems=poems)
    assert convs == synth.conversations and items == synth.eval_items
    assert synthetic.pretraining_documents(0, repeats=3, poems=poems) == pretrain
    summary = synth.summary()
    assert summary["train_conversations"] == len(synth.conversations) > 3000
    assert summary["eval_items"] == len(synth.eval_items) > 200
    assert set(summary["eval_items_by_task"]) == {"greeting", "identity", "capital_zh", "capital_en",
                                                  "capital_completion", "arith_zh", "arith_en", "poem_next",
                                                  "poem_author"}
    small = SyntheticSet(0, poems=poems, n_eval_capital=5, n_eval_arith=8, n_train_arith=10, n_eval_completion=2)
    assert small.summary()["eval_items_by_task"]["capital_zh"] == 5
    assert small.summary()["eval_items_by_task"]["capital_completion"] == 3


def test_poem_knowledge_in_several_forms(synth: SyntheticSet, pretrain: list[str]) -> None:
    """Each poem is pretrained as text, as a one-line citation and in the author catalogue; a
    held-out next-line reply (the couplet) is never a trained reply."""
    catalogue = "\n".join(pretrain)
    for p in synth.poems:
        assert p.text in pretrain and p.citation in pretrain and p.author_line in catalogue
        assert p.citation == f"{p.author}《{p.title}》：{p.body.replace(chr(10), '')}"
    replies = {t["value"] for c in synth.conversations for t in c["conversations"] if t["from"] == "assistant"}
    held = [synthetic.poem_couplet(synth.poems[pi].lines, i) for pi, i in synth.poem_next_eval]
    assert held and not set(held) & replies
    trained = [synthetic.poem_couplet(p.lines, i) for pi, p in enumerate(synth.poems) for i in range(3)
               if (pi, i) not in set(synth.poem_next_eval)]
    assert set(trained) <= replies


_EXPR = re.compile(r"(\d+)\s*(\+|-|加|减|plus|minus)\s*(\d+)")


def test_heldout_arithmetic_never_trained(synth: SyntheticSet, pretrain: list[str]) -> None:
    held = {(a, b, op) for a, b, op in synth.arith_eval}
    held |= {(b, a, "+") for a, b, op in synth.arith_eval if op == "+"}
    seen = set()
    for text in _training_texts(synth, pretrain):
        for a, op, b in _EXPR.findall(text):
            op = {"加": "+", "plus": "+", "减": "-", "minus": "-"}.get(op, op)
            seen.add((int(a), int(b), op))
    assert len(seen) > 10000  # the training pairs are there...
    assert not held & seen  # ...the held-out ones are not, in any phrasing or order
    for it in synth.eval_items:
        if it.task.startswith("arith_"):
            a, op, b = _EXPR.findall(it.prompt)[0]
            op = {"加": "+", "plus": "+", "减": "-", "minus": "-"}.get(op, op)
            c = int(a) + int(b) if op == "+" else int(a) - int(b)
            assert c >= 0 and (int(a), int(b), op) in held
            assert it.answer == (f"{a}{op}{b}={c}" if it.task == "arith_zh" else f"{a} {op} {b} = {c}")


def test_completion_prompts_never_trained(synth: SyntheticSet, pretrain: list[str]) -> None:
    addis = evaluate.ADDIS_PROMPT
    completions = [it for it in synth.eval_items if it.kind == "completion"]
    assert any(it.prompt == addis and it.answer == evaluate.ADDIS_ANSWER for it in completions)
    texts = _training_texts(synth, pretrain)
    big = "\n\x00\n".join(texts)
    for it in completions:
        assert it.prompt not in big
    ethiopia = "埃塞俄比亚的首都是亚的斯亚贝巴（Addis Ababa）"
    assert sum(d.count(ethiopia) for d in pretrain) == 3  # the fact is taught, once per repeat
    assert any("Addis Ababa" in t for t in synthetic.training_texts(synth.conversations))
    for name in facts.MODEL_CARD_COUNTRIES:
        assert facts.capital_line_zh(facts.by_name_zh(name)) in big


def test_heldout_chat_prompts_not_trained(synth: SyntheticSet) -> None:
    user_turns = {t["value"] for c in synth.conversations for t in c["conversations"] if t["from"] == "user"}
    chat_items = [it for it in synth.eval_items if it.kind == "chat"]
    assert chat_items and not {it.prompt for it in chat_items} & user_turns
    assert "你好" in user_turns and "Hello" in user_turns  # the bars' prompts are trained
    # Poems: a held-out next-line pair is never asked either way; a held-out author never asked.
    for pi, i in synth.poem_next_eval:
        p = synth.poems[pi]
        first, second = synthetic._strip_punct(p.lines[i]), synthetic._strip_punct(p.lines[i + 1])
        assert not any(first in u and "下一句" in u for u in user_turns)
        assert not any(second in u and "上一句" in u for u in user_turns)
    for pi in synth.poem_author_eval:
        p = synth.poems[pi]
        answers = [t["value"] for c in synth.conversations for t in c["conversations"] if t["from"] == "assistant"]
        assert not any(p.author in a and p.title in a for a in answers)
    # Every country is asked about in training chat in both languages.
    for c in synth.countries:
        assert any(c.name_zh in u for u in user_turns)
        assert any(facts.name_en_in_sentence(c) + "?" in u or facts.name_en_in_sentence(c) + "." in u for u in user_turns)


def test_eval_answers_match_facts(synth: SyntheticSet) -> None:
    zh_names = sorted((c.name_zh for c in facts.countries()), key=len, reverse=True)
    poems_by_line = {synthetic._strip_punct(l): (p, i) for p in synth.poems for i, l in enumerate(p.lines)}
    poems_by_title = {p.title: p for p in synth.poems}
    for it in synth.eval_items:
        if it.task == "capital_zh":
            c = facts.by_name_zh(next(n for n in zh_names if n in it.prompt))
            assert it.answer == facts.capital_line_zh(c) + "。"
        elif it.task == "capital_en":
            c = next(c for c in facts.countries() if re.search(rf"\b{re.escape(facts.name_en_in_sentence(c))}[?.]$", it.prompt))
            assert it.answer == facts.capital_sentence_en(c)
        elif it.task == "capital_completion":
            *context, last = it.prompt.split("\n")
            assert 2 <= len(context) <= 3
            for line in context:
                assert line == facts.capital_line_zh(facts.by_name_zh(line.split("的首都是")[0]))
            c = facts.by_name_zh(last.removesuffix("的首都是"))
            assert it.answer == f"{c.capital_zh}（{c.capital_en}）"
        elif it.task == "poem_next":
            p, i = next(v for k, v in poems_by_line.items() if k in it.prompt)
            # The reply restates the asked line: "床前明月光，疑是地上霜。"
            first, second = synthetic._strip_punct(p.lines[i]), synthetic._strip_punct(p.lines[i + 1])
            assert it.answer == f"{first}，{second}。"
        elif it.task == "poem_author":
            title = re.search(r"《(.+?)》", it.prompt).group(1)
            assert it.answer == f"《{title}》的作者是{poems_by_title[title].author}。"
        elif it.task == "greeting":
            assert it.answer in (synthetic.ZH_GREETING_REPLY, synthetic.EN_GREETING_REPLY)
        elif it.task == "identity":
            assert it.answer in (synthetic.ZH_IDENTITY_REPLY, synthetic.EN_IDENTITY_REPLY)
        else:
            assert it.task.startswith("arith_")
        assert it.kind in ("chat", "completion")


def test_conversations_official_format(synth: SyntheticSet) -> None:
    convs = synth.conversations
    assert len({c["id"] for c in convs}) == len(convs)
    n_system = n_multi = 0
    for c in convs:
        assert set(c) == {"id", "conversations"} and isinstance(c["id"], str)
        turns = c["conversations"]
        assert all(set(t) == {"from", "value"} and isinstance(t["value"], str) and t["value"] for t in turns)
        if turns[0]["from"] == "system":
            n_system += 1
            turns = turns[1:]
        assert len(turns) >= 2 and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
        n_multi += len(turns) > 2
    assert n_system > 0 and n_multi > 0
    json.dumps(convs, ensure_ascii=False)
    data = pytest.importorskip("qwen.data")
    if hasattr(data, "read_records"):  # the project's SFT loader reads them as they are
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "demo.json"
            path.write_text(json.dumps(convs[:50], ensure_ascii=False), encoding="utf-8")
            assert len(data.read_records(path)) == 50


# ========================================================================================= evaluate
@pytest.fixture(scope="module")
def tok() -> QWenTokenizer:
    return QWenTokenizer()


@pytest.fixture
def one_thread():  # type: ignore[no-untyped-def]
    # Tiny matmuls: one thread is faster than two, and far faster on a shared, busy machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_evaluate_demo_tiny_random_model(tmp_path: Path, tok: QWenTokenizer, synth: SyntheticSet, one_thread: None) -> None:
    from qwen.checkpoint import init_checkpoint, load_model

    init_checkpoint("tiny", tmp_path / "m", chat=True)
    model = load_model(tmp_path / "m", progress=False)
    counts = evaluate.count_tokens(tok, ["The capital of France is Paris.", "法国的首都是巴黎。"] * 5)
    heldout = {"en": ["To be, or not to be, that is the question. " * 4], "zh": ["床前明月光，疑是地上霜。" * 3]}
    res = evaluate.evaluate_demo(model, tok, synth.eval_items, heldout, counts, max_items=4, progress=False)
    json.dumps(res, ensure_ascii=False)
    em = res["exact_match"]
    assert em["n"] == 4 and 0.0 <= em["overall"] <= 1.0 and len(em["by_task"]) == 4
    ppl = res["perplexity"]
    for v in [ppl["model"], ppl["unigram"]] + [r[k] for r in ppl["by_source"].values() for k in ("model", "unigram")]:
        assert math.isfinite(v) and v > 1
    assert ppl["block_size"] == model.config.seq_length and ppl["vocab_size"] == 151936
    assert ppl["tokens"] == sum(r["tokens"] for r in ppl["by_source"].values()) > 0
    assert set(res["bars"]) == {"addis_ababa", "greeting_zh", "greeting_en", "exact_match", "perplexity"}
    report = evaluate.format_report(res)
    assert "| overall" not in report and "**overall**" in report and "| en |" in report


def test_unigram_baseline_formula(tok: QWenTokenizer) -> None:
    counts = {5: 3, 7: 1}
    nll = evaluate._unigram_nll([5, 9], counts, vocab_size=10)
    assert nll == pytest.approx(-math.log(4 / 14) - math.log(1 / 14))
    c = evaluate.count_tokens(tok, ["你好", "<|endoftext|>"])
    assert c[tok.eod_id] == 2 and sum(c.values()) > 3  # special text counted as plain text, plus an eos each


class Oracle(Scripted):
    """Answers every known prompt correctly: chat prompts by the last user turn, raw prompts whole."""

    def __init__(self, tokenizer: QWenTokenizer, chat: dict[str, str], raw: dict[str, str]) -> None:
        super().__init__([0])
        self.tok, self.chat_answers, self.raw_answers = tokenizer, chat, raw

    def forward(self, input_ids, attention_mask=None, past_key_values=None, **kw):  # type: ignore[no-untyped-def]
        if past_key_values is None or past_key_values.length == 0:
            text = self.tok.decode(input_ids[0].tolist())
            if text.endswith("<|im_start|>assistant\n"):
                query = text.rsplit("<|im_start|>user\n", 1)[1].rsplit("<|im_end|>", 1)[0]
                self.script = self.tok.encode(self.chat_answers[query]) + [self.tok.im_end_id]
            else:
                self.script = self.tok.encode(self.raw_answers[text]) + [self.tok.eod_id]
        return super().forward(input_ids, attention_mask, past_key_values, **kw)


def test_evaluate_demo_oracle_scores_one(tok: QWenTokenizer, synth: SyntheticSet, one_thread: None) -> None:
    items = synth.eval_items
    chat = {it.prompt: it.answer for it in items if it.kind == "chat"}
    chat.update({"你好": synthetic.ZH_GREETING_REPLY, "Hello": synthetic.EN_GREETING_REPLY})
    raw = {it.prompt: it.answer + "\n下一行" for it in items if it.kind == "completion"}
    model = Oracle(tok, chat, raw)
    subset = [it for it in items if it.task in ("capital_completion", "arith_en", "poem_next")][::12] + items[:3]
    res = evaluate.evaluate_demo(model, tok, subset, [], None, progress=False)
    assert res["exact_match"]["overall"] == 1.0 and res["exact_match"]["n"] == len(subset)
    assert res["failures"] == []
    bars = res["bars"]
    assert bars["addis_ababa"]["passed"] and bars["greeting_zh"]["passed"] and bars["greeting_en"]["passed"]
    assert bars["exact_match"]["passed"] and not bars["perplexity"]["passed"]
    assert res["perplexity"]["model"] is None and res["perplexity"]["tokens"] == 0
    # A wrong answer is scored wrong.
    model.chat_answers[items[0].prompt] = items[0].answer + "!"
    res = evaluate.evaluate_demo(model, tok, [items[0].to_dict()], [], None, progress=False, return_items=True)
    assert res["exact_match"]["overall"] == 0.0 and res["items"][0]["output"] == items[0].answer + "!"


def test_bar_predicates() -> None:
    assert evaluate.is_chinese_greeting(synthetic.ZH_GREETING_REPLY)
    assert not evaluate.is_chinese_greeting("Hello!")
    assert evaluate.is_english_greeting(synthetic.EN_GREETING_REPLY)
    assert not evaluate.is_english_greeting("你好！Hello")
    assert not evaluate.is_english_greeting("Whistle")


def test_echo_task_copies_lines_of_poems_not_taught() -> None:
    """The "repeat this line" conversations use only lines of poems outside the chosen set, written
    with the chosen poems' characters; a filter can drop some; off by default."""
    # stand-ins plus the same poems with every line reversed: new lines from known characters
    poems = _fake_poems(50)
    poems += [Poem(p.title + "反", p.author, tuple(l[-2::-1] + l[-1] for l in p.lines), p.body[::-1])
              for p in poems]
    synth = SyntheticSet(0, poems=poems)
    assert synth.echo_lines == [] and not any(c["id"].startswith("demo-echo") for c in synth.conversations)
    with_echo = SyntheticSet(0, poems=poems, n_echo=40)
    chosen_lines = {synthetic._strip_punct(l) for p in with_echo.poems for l in p.lines}
    chars = set("".join(p.body for p in with_echo.poems))
    assert 0 < len(with_echo.echo_lines) <= 40
    assert not set(with_echo.echo_lines) & chosen_lines and all(set(l) <= chars for l in with_echo.echo_lines)
    echo = [c["conversations"] for c in with_echo.conversations if c["id"].startswith("demo-echo")]
    assert len(echo) == len(with_echo.echo_lines)
    assert all(turns[1]["value"] in turns[0]["value"] for turns in echo)
    # the other tasks and the held-out split are unchanged by the echo task
    assert with_echo.eval_items == synth.eval_items
    filtered = SyntheticSet(0, poems=poems, n_echo=40)
    filtered.echo_filter = lambda q, a: len(a) == 5
    kept = [c for c in filtered.conversations if c["id"].startswith("demo-echo")]
    assert len(kept) == sum(len(l) == 5 for l in filtered.echo_lines) < len(echo) + 1
