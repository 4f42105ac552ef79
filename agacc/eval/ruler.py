"""RULER-style synthetic tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"; task definitions and prompt templates after NVIDIA/RULER
``scripts/data/synthetic``), generated offline, with this project's own code.

Tasks (``TASKS``: name -> generator):

* ``niah_single``     one needle "One of the special magic numbers for <adj-noun> is: <7 digits>." in a
                      haystack; ask for its number.
* ``niah_multikey``   ``keys`` needles with different keys (distractors), one asked.
* ``niah_multivalue`` one key with ``values`` needles (different numbers); all must be returned.
* ``niah_multiquery`` ``queries`` needles with different keys; all asked at once, all numbers returned.
* ``vt``              variable tracking: chains "VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE", ... hidden in
                      noise; return every variable that holds the value (one in-context example first).
* ``cwe``             common words extraction: a numbered word list where ``num_cw`` words repeat
                      ``freq_cw`` times and the others ``freq_ucw`` times; return the ``num_cw`` most
                      common (one in-context example first).
* ``fwe``             frequent words extraction: synthetic 6-letter words with Zipf(``alpha``) counts, the
                      top-ranked one replaced by the noise "..."; return the three most frequent words.

The haystack of the needle tasks is the repo's / OS prose (``tasks.read_text`` / ``tasks.default_text``,
``haystack="text"``) or RULER's "noise" (the repeated grass-is-green sentences, ``haystack="noise"``).

Every generator is ``(tok, context_tokens, samples, seed=0, ...) -> list[Sample]``: each prompt (BOS +
template) is the largest that fits in ``context_tokens`` tokens of ``tok`` (a haystack token or a list
word more would overflow), so it is within a few tokens of the length asked. Samples are drawn from a
``random.Random`` seeded by (task, seed, context_tokens, sample index): the same seed gives the same
samples on every run. ``answers`` are lists of strings; ``metric`` is ``"string_match_all"``, RULER's
metric (the fraction of the reference strings contained, case-insensitively, in the output: 1 / 0 for
one reference, partial credit for several), computed by ``score`` / ``METRICS`` here (the runner's
``metrics.best_score`` takes the best single reference, which is RULER's ``string_match_part``).
``answer_ids`` are the tokens of a reference rendering of all the answers (for ``match`` scoring), and
``max_new_tokens`` is sized to it. Each sample carries the context / question split of
``tasks._with_split`` (``context_ids``: BOS + instructions + document; ``question_ids``: the question and
the answer prefix) for the query-agnostic protocol. ``meta`` says the task, the lengths and, for the
needle and chain tasks, where each inserted line lies in ``prompt_ids`` (``spans``: [start, end) token
indices) and its depth.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from agacc.eval.tasks import FILLER, Sample, _bos, _fit_tokens, _ids, _with_answer, _with_split, default_text

METRIC = "string_match_all"

# --- metrics (RULER scripts/eval/synthetic/constants.py) ---------------------------------------------


def _clean(prediction: str) -> str:
    """RULER's post-processing of a prediction: control characters become newlines, ends stripped."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, answers: list[str]) -> float:
    """Fraction of the reference strings contained (case-insensitive) in the prediction."""
    if not answers:
        return 0.0
    pred = _clean(prediction).lower()
    return sum(1.0 for a in answers if str(a).lower() in pred) / len(answers)


def string_match_part(prediction: str, answers: list[str]) -> float:
    """1 if any reference string is contained (case-insensitive) in the prediction (RULER's QA metric)."""
    pred = _clean(prediction).lower()
    return float(any(str(a).lower() in pred for a in answers))


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def score(sample: Sample, prediction: str) -> float:
    """The sample's RULER metric on a prediction (all of ``sample.answers`` at once)."""
    return METRICS[sample.metric](prediction, sample.answers)


# --- words -------------------------------------------------------------------------------------------

_NOUNS = """
acorn actor airport album anchor angle ankle answer apple apron arch arena armchair arrow artist attic
audience avenue bakery balcony ballet balloon bamboo banana bandage banker barley barrel basket bathtub
battery beach beacon beard bedroom beetle bell bench bicycle biscuit blanket blossom bonnet bottle boulder
bracelet bramble bridge brook broom bucket buffalo bullet butter button cabin cactus camera camel canal
candle canoe canyon captain carpet carrot castle cathedral cattle cellar chapel cheese cherry chimney
circus citizen cliff clock closet cloud coconut coffee collar comet compass copper cottage cotton cousin
crayon cricket crystal cupboard curtain cushion daisy desert diamond dinner doctor dolphin donkey dragon
drawer drum eagle elbow engine envelope eyebrow fabric factory falcon farmer feather fence ferry fiddle
finger fireplace flag flute forest fountain fox galaxy garage garden garlic giraffe glacier glove goblet
gorilla grape guitar hammer harbor harvest helmet hermit highway hillside honey horizon hospital hotel
iceberg island jacket jaguar jelly jewel journal jungle kettle kitchen kitten ladder lagoon lantern laundry
lemon leopard library lighthouse lizard lobster locket lumber magnet mailbox mango marble market meadow
melody mirror monkey mountain muffin museum mushroom napkin necklace needle nephew notebook oasis ocean
octopus office onion orange orchard orchestra ostrich owl oyster paddle palace pancake panther parcel
parrot pasture peach peanut pebble pelican pencil pepper piano pickle pigeon pillow pilot pirate planet
plum pocket pond potato prairie puddle pumpkin puppet pyramid quilt rabbit raccoon radio raisin ribbon
river robot rocket saddle sailor salmon sandal satellite saucer scarf scooter seagull shovel shrimp
skeleton sled slipper snail spider spinach sponge squirrel stadium statue stove strawberry submarine
sunflower swamp sweater table teapot telescope temple tent thimble thunder tiger toaster tomato tractor
trumpet tulip tunnel turkey turtle umbrella valley vase velvet village violin volcano wagon walnut walrus
wardrobe waterfall whistle willow window wizard wolf yogurt zebra
"""
_ADJECTIVES = """
able agile ancient angry anxious bitter bland bold brave breezy bright brisk bumpy busy calm careful
cheerful chilly clever cloudy clumsy cozy crisp cruel curious damp dazzling deep dizzy dusty eager early
elegant empty fancy fearless fierce fragile frosty fuzzy gentle giant gloomy glossy golden graceful greedy
grumpy hasty heavy hollow honest humble hungry icy jolly juicy keen lazy lively lonely loud lucky massive
mellow merry mighty misty modest muddy narrow nervous nimble noisy odd orange patient plain polite proud
purple quaint quick quiet rapid rare rough royal rusty sandy savage scary shaggy shiny silent silky silver
sleepy slender slow smooth sneaky soft sour spicy steady sticky stormy strange sturdy sunny swift tall
tame tender thirsty tiny tricky upbeat vast velvety vivid wary wealthy wicked wild windy wise witty wooden
young zealous
"""
_VERBS = """
admire arrive bake balance bounce breathe build carry chase climb collect cough crawl dance deliver dig
dream drift explore fetch float fold gather giggle glide grow guard hover hunt invent juggle jump knit
laugh launch listen march melt mend obey paint paddle plant polish pounce pray question race relax repair
rescue roar sail scatter scribble search shiver sing skate sketch sneeze spill splash sprint squeeze
stumble swim tickle travel tumble wander whisper wiggle yawn
"""


def _distinct(words: list[str]) -> list[str]:
    """Sorted unique words, dropping any word contained in another (so matching one word by substring
    never credits another)."""
    ws = sorted(set(words))
    return [w for w in ws if not any(w != o and w in o for o in ws)]


NOUNS = _distinct(_NOUNS.split())
ADJECTIVES = _distinct(_ADJECTIVES.split())
WORDS = _distinct(_NOUNS.split() + _ADJECTIVES.split() + _VERBS.split())  # cwe's vocabulary


def _pseudo_words(n: int, exclude) -> list[str]:
    """``n`` pronounceable made-up words (fixed: seeded), none equal to or containing a word of ``exclude``."""
    rng = random.Random("ruler-pseudo-words")
    cons, vows = "bcdfghjklmnprstvz", "aeiou"
    out, seen = [], set(exclude)
    while len(out) < n:
        w = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(rng.choice((3, 4))))
        if w not in seen and not any(x in w for x in exclude if len(x) <= len(w)) and not any(
                w in o or o in w for o in out):
            seen.add(w)
            out.append(w)
    return out


def _vocabulary(n: int) -> list[str]:
    """At least ``n`` distinct words: ``WORDS``, then made-up words."""
    return WORDS if n <= len(WORDS) else WORDS + _pseudo_words(n - len(WORDS), WORDS)


# --- prompt templates (RULER scripts/data/synthetic/constants.py) ------------------------------------

NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_INTRO = {1: "A special magic number is hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the number afterwards.\n",
              2: "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the numbers afterwards.\n"}
NIAH_QUESTION = {1: "\nWhat is the special magic number for {query} mentioned in the provided text? "
                    "The special magic number for {query} mentioned in the provided text is",
                 2: "\nWhat are all the special magic numbers for {query} mentioned in the provided text? "
                    "The special magic numbers for {query} mentioned in the provided text are"}
VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = ("\nQuestion: Find all variables that are assigned the value {value} in the text above. "
               "Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
               "assigned the value {value}, they are:")
CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.\n")
CWE_QUESTION = ("\nQuestion: What are the {n} most common words in the above list? "
                "Answer: The top {n} words that appear most often in the list are:")
FWE_INTRO = ("Read the following coded text and track the frequency of each coded word. "
             "Find the three most frequently appeared coded words. ")
FWE_QUESTION = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three "
                "most frequently appeared words in the above coded text? Answer: According to the coded text "
                "above, the three most frequently appeared words are:")

DEPTHS = [round(100 * i / 39) / 100 for i in range(40)]  # RULER's 40 insertion depths, 0..1


# --- building blocks ---------------------------------------------------------------------------------

@dataclass
class _Render:
    """One prompt in text: context (instructions + document), question (+ answer prefix), the answers, a
    reference rendering of them, and the character spans of inserted lines in the context."""
    context: str
    question: str
    answers: list[str]
    answer_text: str
    spans: list[tuple[int, int]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def _rng(task: str, seed: int, context_tokens: int, i: int) -> random.Random:
    return random.Random(f"ruler:{task}:{seed}:{context_tokens}:{i}")


def _n_tokens(tok, r: _Render) -> int:
    return len(_bos(tok)) + len(_ids(tok, r.context + r.question))


def _fit(count, target: int, guess: int, what: str) -> int:
    """The largest size n >= 1 with ``count(n) <= target`` (``count`` about increasing in n): bracketed
    by secant steps from ``guess``, then regula falsi / bisection."""
    seen: dict[int, int] = {}

    def c(n):
        if n not in seen:
            seen[n] = count(n)
        return seen[n]

    lo = hi = None  # lo fits, hi does not
    n = max(1, guess)
    for _ in range(64):
        k = c(n)
        if k <= target:
            lo = n if lo is None else max(lo, n)
        else:
            hi = n if hi is None else min(hi, n)
        if lo is not None and hi is not None:
            if hi - lo <= 1:
                return lo
            klo, khi = c(lo), c(hi)
            n = lo + int((hi - lo) * (target - klo) / max(1, khi - klo))
            n = min(hi - 1, max(lo + 1, n))
            if n in seen:
                n = (lo + hi) // 2
            continue
        rate = max(k / n, 1e-3)  # tokens per unit, overhead included: steps err on the short side
        step = int((target - k) / rate)
        if hi is None and lo is not None:
            n = lo + max(1, step)
        else:  # too long so far
            if n == 1:
                raise ValueError(f"{what}: context_tokens={target} is too short for the template "
                                 f"({k} tokens at the smallest size)")
            n = max(1, min(n - 1, n + step))
    if lo is None:
        raise ValueError(f"{what}: could not fit {target} tokens")
    return lo


class _Haystack:
    """Haystack token ids and where sentences end, cut to n tokens from a given start."""

    def __init__(self, tok, haystack: str, text: str | None):
        if haystack == "noise":
            src = FILLER
        elif haystack == "text":
            src = text if text is not None else default_text()
        else:
            raise ValueError(f"haystack must be 'text' or 'noise', got {haystack!r}")
        self.tok, self.noise, self.source = tok, haystack == "noise", src
        self.ids = _ids(tok, src)
        if not self.ids:
            raise ValueError("empty haystack text")
        pieces = tok.batch_decode([[t] for t in self.ids])
        # ends[j]: a sentence ends with token j (so position j + 1 is a sentence start)
        self.ends = [p.rstrip().endswith((".", "!", "?")) for p in pieces]
        starts = [j + 1 for j, e in enumerate(self.ends) if e and j + 1 < len(self.ids)]
        self.starts = starts or [0]

    def cut(self, start: int, n: int) -> tuple[list[int], list[bool]]:
        rot = self.ids[start:] + self.ids[:start]
        ends = self.ends[start:] + self.ends[:start]
        return _fit_tokens(self.tok, rot, n), _fit_tokens(self.tok, ends, n)

    def start(self, rng: random.Random) -> int:
        return 0 if self.noise else rng.choice(self.starts)


def _snap(ends: list[bool], at: int, back: int = 40) -> int:
    """Move ``at`` back to just after a sentence end, if one is within ``back`` tokens."""
    for b in range(0, min(back, at)):
        if ends[at - b - 1]:
            return at - b
    return at


def _insert(tok, hay: list[int], ends: list[bool], inserts: list[tuple[float, str]], sep: str):
    """Haystack text with each (depth, line) inserted at a sentence start near depth * len(hay), in the
    order given for equal positions. -> (body text, char span of each insert, actual depths)."""
    n = len(hay)
    ats = [_snap(ends, min(n, max(0, int(round(d * n))))) for d, _ in inserts]
    order = sorted(range(len(inserts)), key=lambda j: (ats[j], j))
    spans: list[tuple[int, int]] = [(0, 0)] * len(inserts)
    body, last = "", 0
    for j in order:
        piece = tok.decode(hay[last: ats[j]]).strip()
        if piece:
            body += (sep if body else "") + piece
        line = inserts[j][1]
        body += sep if body else ""
        spans[j] = (len(body), len(body) + len(line))
        body += line
        last = ats[j]
    tail = tok.decode(hay[last:]).strip()
    if tail:
        body += sep + tail
    return body, spans, [round(a / n, 4) for a in ats]


def _key_value_source(rng: random.Random, exclude_text: str):
    """Draw functions for distinct adj-noun keys and distinct 7-digit values absent from the haystack."""
    used_k, used_v = set(), set()

    def key():
        while True:
            k = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
            if k not in used_k and k not in exclude_text:
                used_k.add(k)
                return k

    def value():
        while True:
            v = str(rng.randint(1_000_000, 9_999_999))
            if v not in used_v and v not in exclude_text:
                used_v.add(v)
                return v

    return key, value


def _token_spans(tok, prompt_text: str, spans: list[tuple[int, int]], offset: int) -> list[list[int]]:
    """Character spans (in the text after ``offset``) -> [start, end) token indices in BOS + ids(prompt)."""
    b = len(_bos(tok))
    if getattr(tok, "is_fast", False):
        offs = tok(prompt_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        out = []
        for cs, ce in spans:
            cs, ce = cs + offset, ce + offset
            s = next(i for i, (a, e) in enumerate(offs) if e > cs)
            e = max(i for i, (a, _) in enumerate(offs) if a < ce) + 1
            out.append([b + s, b + e])
        return out
    return [[b + len(_ids(tok, prompt_text[: cs + offset])), b + len(_ids(tok, prompt_text[: ce + offset]))]
            for cs, ce in spans]


def _make(tok, task: str, i: int, r: _Render, context_tokens: int, slack: int = 8) -> Sample:
    prompt_text = r.context + r.question
    p, a = _with_answer(tok, prompt_text, r.answer_text)
    ids = _bos(tok) + p
    meta = {"task": task, "context_tokens": context_tokens, "prompt_tokens": len(ids), **r.meta}
    if r.spans:
        meta["spans"] = _token_spans(tok, prompt_text, r.spans, 0)
    s = Sample(i, "answer", ids, list(r.answers), a, metric=METRIC, max_new_tokens=len(a) + slack, meta=meta)
    return _with_split(s, tok, r.context, r.question)


def _generate(tok, task: str, context_tokens: int, samples: int, seed: int, render, guess: int, slack: int = 8,
              pad: bool = False):
    """``render(rng, n, i) -> _Render``: sample i at size n, fitted per sample (its rng re-seeded for every
    size tried, so only the size changes while fitting). With ``pad``, ``render(rng, n, i, p)`` also takes
    a padding p, fitted second (n first, at p = 0): for a size whose steps are coarse."""
    out = []
    for i in range(samples):
        def at(n, p=0, i=i):
            return render(_rng(task, seed, context_tokens, i), n, i, p) if pad else render(
                _rng(task, seed, context_tokens, i), n, i)

        n = _fit(lambda m: _n_tokens(tok, at(m)), context_tokens, guess, task)
        guess, p = n, 0
        if pad:
            r = at(n)
            p = _fit(lambda m: _n_tokens(tok, at(n, m - 1)), context_tokens,
                     1 + context_tokens - _n_tokens(tok, r), task) - 1
        r = at(n, p)
        r.meta["size"] = n
        if pad:
            r.meta["pad"] = p
        out.append(_make(tok, task, i, r, context_tokens, slack))
    return out


# --- needle in a haystack ----------------------------------------------------------------------------

def _niah(tok, task: str, context_tokens: int, samples: int, seed: int, keys: int, values: int, queries: int,
          haystack: str, text: str | None, depths=None) -> list[Sample]:
    keys = max(keys, queries)
    hs = _Haystack(tok, haystack, text)
    sep = "\n" if hs.noise else " "
    single = values * queries == 1

    def render(rng: random.Random, n: int, i: int) -> _Render:
        new_key, new_value = _key_value_source(rng, hs.source)
        ks = [new_key() for _ in range(keys)]
        vs = [[new_value() for _ in range(values)] for _ in ks]
        needles = [(k, v, NIAH_NEEDLE.format(key=k, value=v)) for k, vv in zip(ks, vs) for v in vv]
        rng.shuffle(needles)
        ds = sorted(rng.sample(DEPTHS, len(needles)) if len(needles) <= len(DEPTHS)
                    else [rng.random() for _ in needles])
        if depths:
            ds = sorted(float(depths[(i + j) % len(depths)]) for j in range(len(needles)))
        asked = rng.sample(range(keys), queries)
        hay, ends = hs.cut(hs.start(rng), n)
        body, spans, actual = _insert(tok, hay, ends, [(d, nd[2]) for d, nd in zip(ds, needles)], sep)
        q_keys = [ks[j] for j in asked]
        query = q_keys[0] if len(q_keys) == 1 else ", ".join(q_keys[:-1]) + ", and " + q_keys[-1]
        answers = [v for j in asked for v in vs[j]]
        intro = NIAH_INTRO[1 if single else 2]
        return _Render(intro + body, NIAH_QUESTION[1 if single else 2].format(query=query), answers,
                       " " + ", ".join(answers) + ".", [(a + len(intro), b + len(intro)) for a, b in spans],
                       {**({"depth": actual[0]} if len(actual) == 1 else {}),
                        "keys": q_keys, "needle_keys": [nd[0] for nd in needles],
                        "needle_values": [nd[1] for nd in needles], "depths": actual, "haystack": haystack})

    return _generate(tok, task, context_tokens, samples, seed, render, max(16, context_tokens - 120))


def niah_single(tok, context_tokens: int, samples: int, seed: int = 0, haystack: str = "text",
                text: str | None = None, depths=None) -> list[Sample]:
    """One needle (an adj-noun key, a 7-digit number) at a random RULER depth (or ``depths[i % len]``)."""
    return _niah(tok, "niah_single", context_tokens, samples, seed, 1, 1, 1, haystack, text, depths)


def niah_multikey(tok, context_tokens: int, samples: int, seed: int = 0, keys: int = 4, haystack: str = "text",
                  text: str | None = None) -> list[Sample]:
    """``keys`` needles with different keys; the question asks for one of them."""
    return _niah(tok, "niah_multikey", context_tokens, samples, seed, keys, 1, 1, haystack, text)


def niah_multivalue(tok, context_tokens: int, samples: int, seed: int = 0, values: int = 4, haystack: str = "text",
                    text: str | None = None) -> list[Sample]:
    """One key with ``values`` needles of different numbers; every number must be returned."""
    return _niah(tok, "niah_multivalue", context_tokens, samples, seed, 1, values, 1, haystack, text)


def niah_multiquery(tok, context_tokens: int, samples: int, seed: int = 0, queries: int = 4, haystack: str = "text",
                    text: str | None = None) -> list[Sample]:
    """``queries`` needles with different keys, all asked at once; every number must be returned."""
    return _niah(tok, "niah_multiquery", context_tokens, samples, seed, queries, 1, queries, haystack, text)


# --- variable tracking -------------------------------------------------------------------------------

def _var_names(rng: random.Random, n: int, taken: set) -> list[str]:
    out = []
    while len(out) < n:
        v = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if v not in taken:
            taken.add(v)
            out.append(v)
    return out


def _chain(names: list[str], value: str) -> list[str]:
    return [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:])]


VT_EXAMPLE_VALUE = "12345"


def vt(tok, context_tokens: int, samples: int, seed: int = 0, chains: int = 1, hops: int = 4,
       haystack: str = "noise", text: str | None = None, example: bool = True) -> list[Sample]:
    """Variable tracking: ``chains`` chains of ``hops`` + 1 variables ("VAR A = 12345", "VAR B = VAR A",
    ...), each chain's lines in order at random places of the haystack (RULER's noise by default); the
    question gives the first chain's value and asks for every variable holding it. With ``example``, a
    short worked example (value 12345, other names) comes first, as RULER's in-context example."""
    hs = _Haystack(tok, haystack, text)
    sep = "\n" if hs.noise else " "
    line = FILLER.strip()

    def render(rng: random.Random, n: int, i: int) -> _Render:
        taken: set = set()
        ex = ""
        if example:
            ex_names = _var_names(rng, hops + 1, taken)
            ex_lines = [x for st in _chain(ex_names, VT_EXAMPLE_VALUE) for x in (line, st)] + [line]
            ex = (VT_INTRO + "\n".join(ex_lines) + VT_QUESTION.format(value=VT_EXAMPLE_VALUE, n=hops + 1)
                  + " " + " ".join(ex_names) + "\n\n")
        values: list[str] = []
        while len(values) < chains:
            v = str(rng.randint(10000, 99999))
            if v != VT_EXAMPLE_VALUE and v not in values and v not in hs.source:
                values.append(v)
        names = [_var_names(rng, hops + 1, taken) for _ in range(chains)]
        stmts = [_chain(nm, v) for nm, v in zip(names, values)]
        order = [c for c in range(chains) for _ in range(hops + 1)]
        rng.shuffle(order)  # an interleaving of the chains, each chain's lines in order
        nxt = [0] * chains
        seq = []
        for c in order:
            seq.append(stmts[c][nxt[c]])
            nxt[c] += 1
        ds = sorted(rng.random() for _ in seq)
        hay, ends = hs.cut(hs.start(rng), n)
        body, spans, actual = _insert(tok, hay, ends, list(zip(ds, seq)), sep)
        intro = ex + VT_INTRO
        return _Render(intro + body, VT_QUESTION.format(value=values[0], n=hops + 1), list(names[0]),
                       " " + " ".join(names[0]), [(a + len(intro), b + len(intro)) for a, b in spans],
                       {"value": values[0], "chains": chains, "hops": hops, "depths": actual, "haystack": haystack})

    return _generate(tok, "vt", context_tokens, samples, seed, render, max(16, context_tokens - 300))


# --- common words extraction -------------------------------------------------------------------------

def _numbered(words: list[str]) -> str:
    return " ".join(f"{j + 1}. {w}" for j, w in enumerate(words))


def cwe(tok, context_tokens: int, samples: int, seed: int = 0, num_cw: int = 10, freq_cw: int | None = None,
        freq_ucw: int | None = None, example: bool = True) -> list[Sample]:
    """Common words extraction: a numbered list of words in random order where ``num_cw`` words appear
    ``freq_cw`` times each and every other word ``freq_ucw`` times (RULER: 30 / 3 from 4K tokens, 6 / 1
    below; the last word fewer times where only that fits), as many entries as fit; return the ``num_cw``
    common ones. With ``example``, one worked example (20 words at 3 / 1 below 4K, 40 at 10 / 3 from 4K)
    comes first."""
    big = context_tokens >= 4096
    fc = freq_cw if freq_cw is not None else (30 if big else 6)
    fu = freq_ucw if freq_ucw is not None else (3 if big else 1)
    if fc <= fu:
        raise ValueError(f"cwe: freq_cw ({fc}) must exceed freq_ucw ({fu})")
    ex_n, ex_fc, ex_fu = (40, 10, 3) if big else (20, 3, 1)
    question = CWE_QUESTION.format(n=num_cw)

    def listing(rng, words, k, f_common, f_other, extra=None):
        """``words[:k]`` f_common times, the rest f_other times but the last one ``extra`` times."""
        lst = words[:k] * f_common + words[k:-1] * f_other + words[-1:] * (f_other if extra is None else extra)
        rng.shuffle(lst)
        return _numbered(lst)

    def render(rng: random.Random, n: int, i: int) -> _Render:
        # n: list entries past the common words' (so the list grows one entry at a time): u other words,
        # the last of them (n - 1) % fu + 1 times
        u = (n + fu - 1) // fu
        ex_words = ex_n if example else 0
        vocab = _vocabulary(ex_words + num_cw + u)
        words = rng.sample(vocab, ex_words + num_cw + u)
        ex = ""
        if example:
            ew = words[:ex_words]
            ex = CWE_INTRO + listing(rng, ew, num_cw, ex_fc, ex_fu) + question + " " + _numbered(ew[:num_cw]) + "\n"
        main = words[ex_words:]
        common = main[:num_cw]
        return _Render(ex + CWE_INTRO + listing(rng, main, num_cw, fc, fu, (n - 1) % fu + 1), question, list(common),
                       " " + _numbered(common),
                       meta={"num_cw": num_cw, "freq_cw": fc, "freq_ucw": fu, "distinct_words": len(main),
                             "entries": num_cw * fc + n})

    guess = max(1, context_tokens // 5 - num_cw * fc)
    return _generate(tok, "cwe", context_tokens, samples, seed, render, guess)


# --- frequent words extraction -----------------------------------------------------------------------

def _zeta(a: float, terms: int = 1000) -> float:
    """Riemann zeta(a), a > 1: the partial sum plus the Euler-Maclaurin tail."""
    s = sum(k ** -a for k in range(1, terms))
    return s + terms ** (1 - a) / (a - 1) + 0.5 * terms ** -a


def fwe(tok, context_tokens: int, samples: int, seed: int = 0, alpha: float = 2.0, vocab_size: int | None = None,
        word_len: int = 6) -> list[Sample]:
    """Frequent words extraction: ``vocab_size`` (default context_tokens // 50, as RULER) random
    ``word_len``-letter words; the word of rank k appears int(N k^-alpha / zeta(alpha)) times, rank 1
    being the noise "..."; the text is the shuffled words, N as large as fits (``meta["size"]``), the
    tokens left filled with more "..." (``meta["pad"]``). Return ranks 2-4 (the three most frequent words)."""
    vs = vocab_size if vocab_size is not None else max(8, context_tokens // 50)
    z = _zeta(alpha)
    weights = [k ** -alpha / z for k in range(1, vs + 1)]

    def render(rng: random.Random, n: int, i: int, pad: int) -> _Render:
        vocab: list[str] = []
        seen: set = set()
        while len(vocab) < vs:
            w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(word_len))
            if w not in seen:
                seen.add(w)
                vocab.append(w)
        vocab[0] = "..."
        counts = [int(n * w) for w in weights]
        counts[0] += pad  # the fitted Zipf size's steps can add several words at once: more noise fills up
        words = [w for w, c in zip(vocab, counts) for _ in range(c)]
        rng.shuffle(words)
        return _Render(FWE_INTRO + " ".join(words), FWE_QUESTION, vocab[1:4], " " + ", ".join(vocab[1:4]) + ".",
                       meta={"alpha": alpha, "vocab_size": vs, "counts": counts[:5], "words": len(words)})

    out = _generate(tok, "fwe", context_tokens, samples, seed, render, max(1, context_tokens // 4), pad=True)
    for s in out:
        c = s.meta["counts"]
        if not c[3] > c[4] > -1 or c[3] == 0:
            raise ValueError(f"fwe: context_tokens={context_tokens} too short for distinct top-3 counts {c}")
    return out


# --- registry ----------------------------------------------------------------------------------------

TASKS = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "vt": vt,
    "cwe": cwe,
    "fwe": fwe,
}


def ruler_suite(tok, lengths, samples: int, seed: int = 0, tasks=None, **kw) -> dict[str, list[Sample]]:
    """Every task (``tasks``, default all of ``TASKS``) at every length of ``lengths`` -> {task: samples},
    the lengths one after another in each list, indices running over the list (``meta["context_tokens"]``
    tells the lengths apart). ``kw`` (e.g. ``haystack``, ``text``) goes to the generators that take it."""
    import inspect

    out = {}
    for name in tasks or TASKS:
        if name not in TASKS:
            raise ValueError(f"unknown RULER task {name!r}; choose from {', '.join(TASKS)}")
        fn = TASKS[name]
        params = inspect.signature(fn).parameters
        extra = {k: v for k, v in kw.items() if k in params}
        got = []
        for n in lengths:
            for s in fn(tok, int(n), samples, seed=seed, **extra):
                s.index = len(got)
                got.append(s)
        out[name] = got
    return out
