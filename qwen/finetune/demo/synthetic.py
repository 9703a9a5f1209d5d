"""The bilingual synthetic task set of the demo model, with a deterministic train / held-out split.

Everything is built from a seed by :class:`SyntheticSet` (the module functions
:func:`pretraining_documents` and :func:`chat_examples` are thin wrappers): the same seed and
arguments always give the same texts, conversations and evaluation items.

Tasks (``EvalItem.task``)
-------------------------
``greeting``            你好 / Hello / ... -> a fixed Chinese or English greeting (:data:`ZH_GREETING_REPLY`,
                        :data:`EN_GREETING_REPLY`)
``identity``            你是谁？ / Who are you? -> a fixed self-introduction as Qwen-Demo
``capital_zh``          埃塞俄比亚的首都是哪里？ -> 埃塞俄比亚的首都是亚的斯亚贝巴（Addis Ababa）。
``capital_en``          What is the capital of Ethiopia? -> The capital of Ethiopia is Addis Ababa.
``capital_completion``  (base-model style, raw continuation) two or three lines of the model card's
                        format then ``埃塞俄比亚的首都是`` -> ``亚的斯亚贝巴（Addis Ababa）``
``arith_zh``            23+45等于多少？ -> 23+45=68
``arith_en``            What is 23 + 45? -> 23 + 45 = 68
``poem_next``           床前明月光的下一句是什么？ -> 床前明月光，疑是地上霜。 (the reply restates the asked
                        line, as capital replies restate the country: recall becomes continuation)
``poem_author``         《静夜思》的作者是谁？ -> 《静夜思》的作者是李白。
``echo`` (training only) 请说：坐愁红颜老 -> 坐愁红颜老 (``n_echo`` lines of tang300 poems that are *not*
                        chosen, then random strings of the chosen poems' characters: a next-line
                        reply starts by copying the asked line, and copying is learned from many
                        strings, not from the poem questions alone)

Held-out split: the held-out items test generalisation, not unseen facts
-------------------------------------------------------------------------
* capitals: every (undisputed) country's fact is in the training data, in the pretraining lists
  (Chinese model-card lines and English sentences) and in chat for ``train_phrasings`` of the six
  question phrasings per language (a random subset per country; every phrasing is trained on for
  many countries). A held-out ``capital_zh``/``capital_en`` item is a (country, phrasing) pair that
  no training conversation uses.
* capital completions: each held-out prompt (its exact multi-line text) never occurs in any
  pretraining document; the facts in it do. The model card's own prompt (Mongolia, Iceland,
  Ethiopia) is always one of them, so its three-line form is never trained on, while Ethiopia's
  line is.
* arithmetic: the held-out (a, b, op) pairs never appear in any training text, pretraining or chat,
  in any phrasing or language; for addition the swapped pair (b, a) is excluded too, so
  commutativity cannot stand in for a seen fact.
* poems: every chosen poem is in the pretraining documents in three forms: its text (title,
  ``作者：`` line, body), a one-line citation (``李白《静夜思》：床前明月光，…``) and a line of an author
  catalogue (``《静夜思》的作者是李白。``, like the capital lists). A held-out ``poem_next`` pair
  (poem, line i -> line i+1) is never asked in chat; a held-out ``poem_author`` poem is never asked
  for its author or source in chat. No "previous line" questions are trained at all: "X的上一句" is
  answered with the couplet *ending* in X, and that near-twin of a held-out "X的下一句" taught the
  model to answer the held-out question with the wrong couplet.
* greetings and identity: held-out items are phrasing variants (你好呀, hello, Hi there, ...) that
  no training conversation uses; the replies are the trained fixed replies.

Poems come from tang300 (Debian fortunes-zh): pass ``poems`` (e.g. ``corpus.parse_tang300(...)``),
or leave it None to read the installed file. Chosen are ``n_poems`` quatrains (绝句) whose title and
lines are unique within tang300, famous ones first (:data:`FAMOUS_TITLES`).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, Callable, Iterable, Sequence

from .corpus import Poem, load_tang300
from .facts import MODEL_CARD_COUNTRIES, Country, by_name_zh, capital_line_zh, capital_sentence_en, countries
from .facts import name_en_in_sentence

MODEL_NAME = "Qwen-Demo"
ZH_GREETING_REPLY = "你好！我是Qwen-Demo，很高兴见到你。有什么可以帮你的吗？"
EN_GREETING_REPLY = "Hello! I am Qwen-Demo. How can I help you today?"
ZH_IDENTITY_REPLY = "我是Qwen-Demo，一个采用通义千问（Qwen）架构、在CPU上训练的小型演示模型。"
EN_IDENTITY_REPLY = "I am Qwen-Demo, a tiny demo model with the Qwen architecture, trained on a CPU."

# (training prompts, held-out prompts); the two lists never share a string.
ZH_GREETINGS = (
    ["你好", "您好", "你好！", "您好！", "你好啊", "嗨，你好", "哈喽", "早上好", "晚上好", "你好，在吗？", "嗨！", "你好你好",
     "大家早上好", "各位好", "你好吗？", "中午好", "嗨嗨", "哈喽！", "您好，在吗？", "你好，朋友", "喂，你好", "早安"],
    ["你好呀", "您好呀", "嗨", "大家好", "下午好", "你好啊！"],
)
EN_GREETINGS = (
    ["Hello", "Hi", "Hello!", "Hi!", "Hey", "Hey there", "Good morning", "Good evening", "Hello there",
     "Greetings", "Hi, how are you?", "Hey!", "hey", "hey there", "hello!", "hi!", "good morning", "Hi everyone",
     "hello everyone", "Howdy", "Good day", "Hello friend", "hi, how are you?", "Morning!"],
    ["hello", "hi", "Hi there", "Good afternoon", "Hello, how are you?", "Hiya"],
)
ZH_IDENTITY = (
    ["你是谁？", "你是谁", "你叫什么名字？", "介绍一下你自己。", "你是什么模型？", "请介绍一下你自己", "你的名字是什么？",
     "你是什么？", "请问你叫什么名字？", "你是哪位？", "能介绍一下你自己吗？", "你是什么模型", "你叫啥？"],
    ["你叫什么？", "请问你是谁？", "你是哪个模型？"],
)
EN_IDENTITY = (
    ["Who are you?", "What is your name?", "Introduce yourself.", "What model are you?", "Tell me about yourself.",
     "who are you?", "What are you?", "what is your name?", "Can you introduce yourself?", "Please tell me who you are.",
     "Which model are you?", "what are you?", "Could you introduce yourself?"],
    ["Who are you", "What's your name?", "Please introduce yourself."],
)

CAPITAL_ZH_TEMPLATES = (
    "{zh}的首都是哪里？", "{zh}的首都是什么？", "{zh}的首都在哪里？", "请问{zh}的首都是哪座城市？",
    "{zh}的首都是哪个城市？", "告诉我{zh}的首都。",
)
CAPITAL_EN_TEMPLATES = (
    "What is the capital of {en}?", "What's the capital of {en}?", "Which city is the capital of {en}?",
    "Name the capital of {en}.", "Tell me the capital of {en}.", "What city is the capital of {en}?",
)

ARITH_ZH_TEMPLATES = {
    "+": ("{a}+{b}等于多少？", "{a}加{b}等于多少？", "计算{a}+{b}", "{a}+{b}=?", "请计算{a}+{b}。", "{a}加{b}等于几？"),
    "-": ("{a}-{b}等于多少？", "{a}减{b}等于多少？", "计算{a}-{b}", "{a}-{b}=?", "请计算{a}-{b}。", "{a}减{b}等于几？"),
}
ARITH_EN_TEMPLATES = {
    "+": ("What is {a} + {b}?", "What is {a} plus {b}?", "Calculate {a} + {b}.", "{a} + {b} = ?",
          "How much is {a} + {b}?", "Compute {a} + {b}."),
    "-": ("What is {a} - {b}?", "What is {a} minus {b}?", "Calculate {a} - {b}.", "{a} - {b} = ?",
          "How much is {a} - {b}?", "Compute {a} - {b}."),
}
ARITH_RANGE = range(10, 100)

POEM_NEXT_TEMPLATES = ("{line}的下一句是什么？", "“{line}”的下一句是什么？", "{line}的下一句是？", "{line}，下一句是什么？")
POEM_AUTHOR_TEMPLATES = ("《{title}》的作者是谁？", "《{title}》是谁写的？", "谁写了《{title}》？")
POEM_SOURCE_TEMPLATES = ("“{line}”出自哪首诗？", "{line}出自哪首诗？")
ECHO_TEMPLATES = ("照着说：{line}", "请说：{line}", "请读：{line}", "请把这句诗写出来：{line}")
POEM_RECITE_TEMPLATES = ("背诵《{title}》。", "请背诵{author}的《{title}》。", "《{title}》的全文是什么？")

# Display titles for tang300 titles that differ from the familiar one.
TITLE_ALIASES = {"夜思": "静夜思"}
# Quatrains chosen first, in this order, when present and unambiguous in tang300.
FAMOUS_TITLES = (
    "夜思", "登鹳雀楼", "春晓", "江雪", "相思", "鹿柴", "竹里馆", "八阵图", "寻隐者不遇", "登乐游原", "问刘十九",
    "宿建德江", "回乡偶书", "枫桥夜泊", "乌衣巷", "泊秦淮", "赤壁", "夜雨寄北", "嫦娥", "早发白帝城",
    "送孟浩然之广陵", "渭城曲", "芙蓉楼送辛渐", "九月九日忆山东兄弟", "江南逢李龟年", "滁州西涧", "清平调・其一",
    "闺怨", "逢入京使", "秋夕", "遣怀", "寄扬州韩绰判官", "贾生", "金缕衣", "玉阶怨", "渡汉江", "新嫁娘", "行宫",
    "哥舒歌", "终南望余雪", "凉州词", "夜上受降城闻笛", "桃花溪", "怨情",
)

SYSTEM_PROMPTS = ("You are a helpful assistant.", "你是Qwen-Demo，一个乐于助人的助手。", "You are Qwen-Demo, a helpful assistant.")


@dataclass(frozen=True)
class EvalItem:
    task: str
    prompt: str
    answer: str
    kind: str  # "chat": prompt via model.chat, answer = the exact reply; "completion": answer = prefix of the continuation

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


Conversation = dict  # {"id": str, "conversations": [{"from": "system"|"user"|"assistant", "value": str}, ...]}


def _strip_punct(line: str) -> str:
    return re.sub(r"[，。？！；：”’]+$", "", line)


def poem_couplet(lines: Sequence[str], i: int) -> str:
    """The reply to "line i's next line": both lines as one
    couplet, ``床前明月光，疑是地上霜。``. Restating the asked line, as the capital replies restate the
    country, makes recall a continuation of memorised text."""
    return f"{_strip_punct(lines[i])}，{_strip_punct(lines[i + 1])}。"


def arith_answer(a: int, b: int, op: str, lang: str) -> str:
    c = a + b if op == "+" else a - b
    return f"{a}{op}{b}={c}" if lang == "zh" else f"{a} {op} {b} = {c}"


@dataclass(frozen=True)
class ChosenPoem:
    title: str  # display title (alias applied)
    author: str
    lines: tuple[str, ...]
    body: str

    @property
    def text(self) -> str:
        return f"《{self.title}》\n作者：{self.author}\n{self.body}"

    @property
    def citation(self) -> str:
        return f"{self.author}《{self.title}》：{self.body.replace(chr(10), '')}"

    @property
    def author_line(self) -> str:
        return f"《{self.title}》的作者是{self.author}。"


def choose_poems(poems: Sequence[Poem], n: int, seed: int) -> list[ChosenPoem]:
    """``n`` quatrains with a title and lines unique within ``poems``: famous ones first, then a
    seeded random order of the rest."""
    titles = Counter(p.title for p in poems)
    lines = Counter(_strip_punct(l) for p in poems for l in p.lines)
    ok = [p for p in poems if p.is_jueju and titles[p.title] == 1 and all(lines[_strip_punct(l)] == 1 for l in p.lines)]
    by_title = {p.title: p for p in ok}
    chosen = [by_title[t] for t in FAMOUS_TITLES if t in by_title]
    rest = [p for p in ok if p.title not in FAMOUS_TITLES]
    random.Random(f"poems-{seed}").shuffle(rest)
    chosen = (chosen + rest)[:n]
    return [ChosenPoem(TITLE_ALIASES.get(p.title, p.title), p.author, tuple(p.lines), p.body) for p in chosen]


def echo_lines(poems: Sequence[Poem], chosen: Sequence[ChosenPoem], n: int, seed: int) -> list[str]:
    """``n`` lines for "repeat this line" conversations: lines of the poems *not* chosen, then
    random strings of the chosen poems' characters.

    Answering "line X's next line" starts by copying X from the question; the model learns that
    copy from many different lines, not from the few poem questions alone. Only characters of the
    chosen poems are used; tokens can still differ (a BPE merge of two such characters), which is
    what :attr:`SyntheticSet.echo_filter` is for.
    """
    if n <= 0:
        return []
    known = set("".join(p.body for p in chosen))
    taken = {_strip_punct(l) for p in chosen for l in p.lines}
    lines = sorted({_strip_punct(l) for p in poems for l in p.lines} - taken)
    lines = [l for l in lines if 4 <= len(l) <= 9 and set(l) <= known]
    rng = random.Random(f"echo-{seed}")
    rng.shuffle(lines)
    # Then strings of 5 or 7 random characters of the chosen poems, for volume: copying has to be
    # learned as an operation, and a few hundred real lines are too few to stop memorisation.
    alphabet = sorted(known - set("，。？！；：“”‘’\n"))
    seen = set(lines) | taken
    while len(lines) < n and alphabet:
        s = "".join(rng.choice(alphabet) for _ in range(rng.choice((5, 7))))
        if s not in seen:
            seen.add(s)
            lines.append(s)
    return lines[:n]


class SyntheticSet:
    """The synthetic training material and held-out evaluation items for one seed.

    Size arguments: ``train_phrasings`` chat phrasings per country and language (of 6);
    ``n_eval_capital`` held-out items per language; ``n_eval_completion`` completion prompts besides
    the model card's; ``n_eval_arith`` held-out arithmetic pairs (an item each, spread over
    language x operation); ``n_train_arith`` arithmetic chat conversations; ``n_poems`` poems;
    ``n_eval_poem_next`` / ``n_eval_poem_author`` held-out poem items; ``n_eval_greeting`` /
    ``n_eval_identity`` held-out phrasing items (at most the number of held-out variants).
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        poems: Sequence[Poem] | None = None,
        n_poems: int = 40,
        train_phrasings: int = 3,
        n_eval_capital: int = 40,
        n_eval_completion: int = 30,
        n_eval_arith: int = 80,
        n_train_arith: int = 4000,
        n_eval_poem_next: int = 20,
        n_eval_poem_author: int = 10,
        n_eval_greeting: int = 12,
        n_eval_identity: int = 6,
        n_multi_turn: int = 60,
        n_system: int = 60,
        n_echo: int = 0,
    ) -> None:
        if not 1 <= train_phrasings < len(CAPITAL_ZH_TEMPLATES):
            raise ValueError(f"train_phrasings must be in 1..{len(CAPITAL_ZH_TEMPLATES) - 1}")
        self.seed = seed
        self.countries: list[Country] = countries()
        all_poems = poems if poems is not None else load_tang300()
        self.poems = choose_poems(all_poems, n_poems, seed)
        self.echo_lines = echo_lines(all_poems, self.poems, n_echo, seed)
        # Optional (question, answer) -> keep? for echo conversations; the demo recipe keeps those
        # whose tokens the rest of the training data already has (no new vocabulary rows).
        self.echo_filter: Callable[[str, str], bool] | None = None
        if n_eval_poem_next + n_eval_poem_author > len(self.poems):
            raise ValueError("n_eval_poem_next + n_eval_poem_author must not exceed the number of poems")
        self.train_phrasings = train_phrasings
        self.n_eval_capital = min(n_eval_capital, len(self.countries))
        self.n_eval_completion = n_eval_completion
        self.n_eval_arith = n_eval_arith
        self.n_train_arith = n_train_arith
        self.n_eval_poem_next = n_eval_poem_next
        self.n_eval_poem_author = n_eval_poem_author
        self.n_eval_greeting = n_eval_greeting
        self.n_eval_identity = n_eval_identity
        self.n_multi_turn = n_multi_turn
        self.n_system = n_system
        self._split()

    def _rng(self, what: str) -> random.Random:
        return random.Random(f"{self.seed}-{what}")

    # ----------------------------------------------------------------------------------- split
    def _split(self) -> None:
        rng = self._rng("split")
        # Capitals: per country and language, which phrasings are trained on.
        self.capital_train: dict[tuple[str, str], list[int]] = {}
        self.capital_unseen: dict[tuple[str, str], list[int]] = {}
        for c in self.countries:
            for lang in ("zh", "en"):
                order = list(range(len(CAPITAL_ZH_TEMPLATES)))
                rng.shuffle(order)
                self.capital_train[(c.name_zh, lang)] = sorted(order[: self.train_phrasings])
                self.capital_unseen[(c.name_zh, lang)] = sorted(order[self.train_phrasings:])
        self.capital_eval: list[tuple[str, str, int]] = []
        for lang in ("zh", "en"):
            for c in rng.sample(self.countries, self.n_eval_capital):
                self.capital_eval.append((c.name_zh, lang, rng.choice(self.capital_unseen[(c.name_zh, lang)])))

        # Capital completions: the model card's prompt plus random ones.
        self.completion_prompts: list[tuple[str, Country]] = [(self.model_card_prompt, by_name_zh(MODEL_CARD_COUNTRIES[-1]))]
        seen = {self.model_card_prompt}
        while len(self.completion_prompts) < self.n_eval_completion + 1:
            k = rng.choice((2, 3))
            picked = rng.sample(self.countries, k + 1)
            prompt = "".join(capital_line_zh(c) + "\n" for c in picked[:-1]) + f"{picked[-1].name_zh}的首都是"
            if prompt not in seen:
                seen.add(prompt)
                self.completion_prompts.append((prompt, picked[-1]))

        # Arithmetic: held-out (a, b, op); for "+" the swapped pair is excluded from training too.
        pairs = [(a, b, op) for op in ("+", "-") for a in ARITH_RANGE for b in ARITH_RANGE if op == "+" or a >= b]
        held = rng.sample(pairs, self.n_eval_arith)
        self.arith_eval: list[tuple[int, int, str]] = held
        excluded = set(held) | {(b, a, "+") for a, b, op in held if op == "+"}
        self.arith_excluded = frozenset(excluded)
        self.arith_train_pairs: list[tuple[int, int, str]] = [p for p in pairs if p not in excluded]

        # Poems: per poem its question units ("next", i) i=0..2 and ("author",).
        order = list(range(len(self.poems)))
        rng.shuffle(order)
        self.poem_next_eval: list[tuple[int, int]] = [(pi, rng.randrange(3)) for pi in order[: self.n_eval_poem_next]]
        self.poem_author_eval: list[int] = order[self.n_eval_poem_next: self.n_eval_poem_next + self.n_eval_poem_author]

        # Greetings and identity: held-out phrasing variants.
        def pick(pool: list[str], n: int) -> list[str]:
            return pool[:n]

        self.greeting_eval = ([("zh", p) for p in pick(ZH_GREETINGS[1], (self.n_eval_greeting + 1) // 2)]
                              + [("en", p) for p in pick(EN_GREETINGS[1], self.n_eval_greeting // 2)])
        self.identity_eval = ([("zh", p) for p in pick(ZH_IDENTITY[1], (self.n_eval_identity + 1) // 2)]
                              + [("en", p) for p in pick(EN_IDENTITY[1], self.n_eval_identity // 2)])

    @property
    def model_card_prompt(self) -> str:
        return "".join(capital_line_zh(by_name_zh(n)) + "\n" for n in MODEL_CARD_COUNTRIES[:-1]) + \
            f"{MODEL_CARD_COUNTRIES[-1]}的首都是"

    # ---------------------------------------------------------------------------- eval items
    @cached_property
    def eval_items(self) -> list[EvalItem]:
        items: list[EvalItem] = []
        for lang, p in self.greeting_eval:
            items.append(EvalItem("greeting", p, ZH_GREETING_REPLY if lang == "zh" else EN_GREETING_REPLY, "chat"))
        for lang, p in self.identity_eval:
            items.append(EvalItem("identity", p, ZH_IDENTITY_REPLY if lang == "zh" else EN_IDENTITY_REPLY, "chat"))
        for name, lang, t in self.capital_eval:
            c = by_name_zh(name)
            q, a = self._capital_qa(c, lang, t)
            items.append(EvalItem(f"capital_{lang}", q, a, "chat"))
        for prompt, c in self.completion_prompts:
            items.append(EvalItem("capital_completion", prompt, f"{c.capital_zh}（{c.capital_en}）", "completion"))
        rng = self._rng("eval-arith")
        for i, (a, b, op) in enumerate(self.arith_eval):
            lang = ("zh", "en")[i % 2]
            templates = (ARITH_ZH_TEMPLATES if lang == "zh" else ARITH_EN_TEMPLATES)[op]
            items.append(EvalItem(f"arith_{lang}", rng.choice(templates).format(a=a, b=b), arith_answer(a, b, op, lang),
                                  "chat"))
        for pi, i in self.poem_next_eval:
            p = self.poems[pi]
            q = rng.choice(POEM_NEXT_TEMPLATES).format(line=_strip_punct(p.lines[i]))
            items.append(EvalItem("poem_next", q, poem_couplet(p.lines, i), "chat"))
        for pi in self.poem_author_eval:
            p = self.poems[pi]
            q = rng.choice(POEM_AUTHOR_TEMPLATES).format(title=p.title)
            items.append(EvalItem("poem_author", q, p.author_line, "chat"))
        return items

    @staticmethod
    def _capital_qa(c: Country, lang: str, t: int) -> tuple[str, str]:
        if lang == "zh":
            return CAPITAL_ZH_TEMPLATES[t].format(zh=c.name_zh), capital_line_zh(c) + "。"
        return CAPITAL_EN_TEMPLATES[t].format(en=name_en_in_sentence(c)), capital_sentence_en(c)

    # -------------------------------------------------------------------------- chat examples
    def _qa_pairs(self) -> list[tuple[str, str, str]]:
        """(task, question, answer) of every single-turn training conversation."""
        rng = self._rng("chat")
        qa: list[tuple[str, str, str]] = []
        for p in ZH_GREETINGS[0]:
            qa.append(("greeting", p, ZH_GREETING_REPLY))
        for p in EN_GREETINGS[0]:
            qa.append(("greeting", p, EN_GREETING_REPLY))
        for p in ZH_IDENTITY[0]:
            qa.append(("identity", p, ZH_IDENTITY_REPLY))
        for p in EN_IDENTITY[0]:
            qa.append(("identity", p, EN_IDENTITY_REPLY))
        for c in self.countries:
            for lang in ("zh", "en"):
                for t in self.capital_train[(c.name_zh, lang)]:
                    q, a = self._capital_qa(c, lang, t)
                    qa.append((f"capital_{lang}", q, a))
        for _ in range(self.n_train_arith):
            a, b, op = rng.choice(self.arith_train_pairs)
            lang = rng.choice(("zh", "en"))
            templates = (ARITH_ZH_TEMPLATES if lang == "zh" else ARITH_EN_TEMPLATES)[op]
            qa.append((f"arith_{lang}", rng.choice(templates).format(a=a, b=b), arith_answer(a, b, op, lang)))
        held_next = set(self.poem_next_eval)
        held_author = set(self.poem_author_eval)
        for pi, p in enumerate(self.poems):
            for i in range(3):
                if (pi, i) in held_next:
                    continue
                for t in rng.sample(POEM_NEXT_TEMPLATES, 2):
                    qa.append(("poem_next", t.format(line=_strip_punct(p.lines[i])), poem_couplet(p.lines, i)))
            if pi not in held_author:
                for t in POEM_AUTHOR_TEMPLATES[:2]:
                    qa.append(("poem_author", t.format(title=p.title), p.author_line))
                line = _strip_punct(p.lines[rng.randrange(4)])
                qa.append(("poem_source", rng.choice(POEM_SOURCE_TEMPLATES).format(line=line),
                           f"这句诗出自{p.author}的《{p.title}》。"))
            recite = [t for t in POEM_RECITE_TEMPLATES if pi not in held_author or "{author}" not in t]
            qa.append(("poem_recite", rng.choice(recite).format(title=p.title, author=p.author), p.body))
        for line in self.echo_lines:
            q = rng.choice(ECHO_TEMPLATES).format(line=line)
            if self.echo_filter is None or self.echo_filter(q, line):
                qa.append(("echo", q, line))
        return qa

    @cached_property
    def conversations(self) -> list[Conversation]:
        rng = self._rng("conversations")
        qa = self._qa_pairs()
        convs: list[Conversation] = []
        for task, q, a in qa:
            convs.append({"id": f"demo-{task}-{len(convs)}",
                          "conversations": [{"from": "user", "value": q}, {"from": "assistant", "value": a}]})
        # A few with an explicit system turn, and a few two-turn ones (reusing trained pairs only).
        for _ in range(self.n_system):
            task, q, a = rng.choice(qa)
            convs.append({"id": f"demo-system-{len(convs)}", "conversations": [
                {"from": "system", "value": rng.choice(SYSTEM_PROMPTS)},
                {"from": "user", "value": q}, {"from": "assistant", "value": a}]})
        for _ in range(self.n_multi_turn):
            (_, q1, a1), (_, q2, a2) = rng.sample(qa, 2)
            convs.append({"id": f"demo-multi-{len(convs)}", "conversations": [
                {"from": "user", "value": q1}, {"from": "assistant", "value": a1},
                {"from": "user", "value": q2}, {"from": "assistant", "value": a2}]})
        rng.shuffle(convs)
        return convs

    # ---------------------------------------------------------------------- pretraining docs
    def pretraining_documents(self, repeats: int = 20, *, arithmetic_repeats: int = 1, poem_repeats: int | None = None,
                              english: bool = True) -> list[str]:
        """Texts for continued pretraining, shuffled:

        * ``repeats`` passes over the countries in the model card's format (random orders, cut into
          lists of 8-30 lines), and as many in English sentences (``english``);
        * ``arithmetic_repeats`` passes over every training (a, b, op) pair as ``37+45=82`` lines
          (30% as ``37 + 45 = 82`` when ``english``; lists of 20-60 lines; the held-out pairs never
          appear);
        * ``poem_repeats`` (default ``repeats``) copies of each chosen poem's full text and of its
          one-line citation, and as many passes over the author catalogue (lists of 8-30 lines).

        No document contains a held-out completion prompt (lists are re-shuffled until none does).
        """
        rng = self._rng(f"pretrain-{repeats}-{arithmetic_repeats}-{poem_repeats}-{english}")
        forbidden = [p for p, _ in self.completion_prompts]
        docs: list[str] = []

        def lists(lines: list[str], lo: int, hi: int, check: bool) -> None:
            i = 0
            while i < len(lines):
                n = rng.randint(lo, hi)
                chunk = lines[i:i + n]
                i += n
                text = "\n".join(chunk)
                for _ in range(1000):
                    if not check or not any(f in text + "\n" for f in forbidden):
                        break
                    rng.shuffle(chunk)
                    text = "\n".join(chunk)
                else:
                    raise RuntimeError("could not avoid a held-out completion prompt")  # pragma: no cover
                docs.append(text)

        for _ in range(repeats):
            order = list(self.countries)
            rng.shuffle(order)
            lists([capital_line_zh(c) for c in order], 8, 30, check=True)
            if english:
                rng.shuffle(order)
                lists([capital_sentence_en(c) for c in order], 8, 30, check=False)
        for _ in range(arithmetic_repeats):
            pairs = list(self.arith_train_pairs)
            rng.shuffle(pairs)
            lines = [arith_answer(a, b, op, "en" if english and rng.random() < 0.3 else "zh") for a, b, op in pairs]
            lists(lines, 20, 60, check=False)
        for _ in range(repeats if poem_repeats is None else poem_repeats):
            docs.extend(p.text for p in self.poems)
            # The same knowledge in other forms (a citation on one line, a catalogue of authors):
            # facts seen in several phrasings are the ones a small model can answer questions about.
            docs.extend(p.citation for p in self.poems)
            order = list(self.poems)
            rng.shuffle(order)
            lists([p.author_line for p in order], 8, 30, check=False)
        rng.shuffle(docs)
        return docs

    # --------------------------------------------------------------------------------- misc
    def poem_first_lines(self) -> list[str]:
        """A line of each chosen poem: ``lambda d: any(l in d for l in ...)`` marks the corpus
        documents (tang300 entries) that must stay out of a held-out perplexity set."""
        return [p.lines[0] for p in self.poems]

    def summary(self) -> dict[str, Any]:
        convs = self.conversations
        tasks = Counter(c["id"].split("-")[1] for c in convs)
        return {
            "seed": self.seed,
            "train_conversations": len(convs),
            "train_conversations_by_task": dict(sorted(tasks.items())),
            "eval_items": len(self.eval_items),
            "eval_items_by_task": dict(sorted(Counter(i.task for i in self.eval_items).items())),
            "countries": len(self.countries),
            "poems": len(self.poems),
            "arithmetic_train_pairs": len(self.arith_train_pairs),
            "arithmetic_heldout_pairs": len(self.arith_eval),
        }


def pretraining_documents(seed: int = 0, *, repeats: int = 20, arithmetic_repeats: int = 1,
                          poem_repeats: int | None = None, poems: Sequence[Poem] | None = None,
                          **split_kwargs: Any) -> list[str]:
    """:meth:`SyntheticSet.pretraining_documents` for ``SyntheticSet(seed, poems=poems, **split_kwargs)``.
    Pass the same ``split_kwargs`` as to :func:`chat_examples` so that both share one split."""
    return SyntheticSet(seed, poems=poems, **split_kwargs).pretraining_documents(
        repeats, arithmetic_repeats=arithmetic_repeats, poem_repeats=poem_repeats)


def chat_examples(seed: int = 0, *, poems: Sequence[Poem] | None = None,
                  **split_kwargs: Any) -> tuple[list[Conversation], list[EvalItem]]:
    """(training conversations in the official SFT format, held-out evaluation items)."""
    s = SyntheticSet(seed, poems=poems, **split_kwargs)
    return s.conversations, s.eval_items


def training_texts(conversations: Iterable[Conversation]) -> list[str]:
    """Every user/assistant/system string of the conversations (for leakage checks)."""
    return [t["value"] for c in conversations for t in c["conversations"]]
