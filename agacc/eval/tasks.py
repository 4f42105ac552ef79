"""Tasks: each turns its inputs into a list of ``Sample``s the runner scores the same way for every
preset.

* ``passkey``  synthetic (offline): a pass key hidden at a depth in repeated filler text.
* ``needle``   needle in a haystack: a numeric needle at a depth of a haystack text (``--text``,
               default a license text shipped with the OS, else the filler), over a length x depth grid;
               or LongBench-style records from ``--data``.
* ``ppl``      streaming, teacher-forced perplexity over a text file: prefill a part, decode the rest
               through the cache; the full cache on the same tokens in the same run.
* ``longbench`` / ``scrolls``  records in their official formats from local JSONL files (``--data``),
               or via ``datasets`` when a hub is reachable; scored with each dataset's official metric.

Sample kinds: ``answer`` (the prompt is prefilled, the answer is decoded) and ``lm`` (prefix
prefilled, continuation teacher-forced).

Answer samples of the retrieval tasks also carry their prompt split in two, ``context_ids`` (BOS +
instructions + document) and ``question_ids`` (the question and the answer prefix), for the
query-agnostic protocol (``--protocol query-agnostic``: the context is compressed before the question
is read). ``needle_reuse`` makes one context with several needles and one sample per question, the
samples of a context sharing ``group`` (one compressed context answers every question).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from agacc.eval.metrics import LONGBENCH_METRICS, SCROLLS_METRICS

TASKS = ("passkey", "needle", "ppl", "longbench", "scrolls")

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
DEFAULT_TEXTS = ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/GFDL-1.3",
                 "/usr/share/common-licenses/Apache-2.0")
NEEDLE_KEYS = ("apple", "river", "violin", "castle", "lantern", "meadow", "harbor", "copper", "falcon", "garden")


@dataclass
class Sample:
    """One scored item. ``prompt_ids`` is prefilled; ``answer_ids`` (kind "answer": the reference
    answer tokens, for greedy matching) or ``target_ids`` (kind "lm": the continuation)."""
    index: int
    kind: str
    prompt_ids: list[int]
    answers: list[str] = field(default_factory=list)
    answer_ids: list[int] = field(default_factory=list)
    target_ids: list[int] = field(default_factory=list)
    metric: str = "contains"
    max_new_tokens: int = 16
    meta: dict = field(default_factory=dict)
    all_classes: list[str] | None = None
    first_line: bool = False
    # the prompt split for the query-agnostic protocol: context (compressed first), then the question
    # (+ answer prefix). ``context_ids + question_ids == prompt_ids`` when ``meta["split_exact"]``;
    # otherwise (the joint tokenisation merged tokens across the boundary) they are tokenised apart.
    context_ids: list[int] | None = None
    question_ids: list[int] | None = None
    group: int | None = None  # samples with the same group share one context (needle_reuse)

    @property
    def has_split(self) -> bool:
        return self.context_ids is not None and self.question_ids is not None


def default_text() -> str:
    for p in DEFAULT_TEXTS:
        if os.path.exists(p):
            return Path(p).read_text(errors="replace")
    return FILLER * 400


def read_text(path: str | None) -> str:
    if path is None:
        return default_text()
    text = Path(path).read_text(errors="replace")
    if not text.strip():
        raise ValueError(f"--text {path} is empty")
    return text


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _fit_tokens(tok, ids: list[int], n: int) -> list[int]:
    """Repeat ``ids`` until at least n tokens, cut to n."""
    if not ids:
        raise ValueError("empty text")
    out = list(ids)
    while len(out) < n:
        out += ids
    return out[:n]


def _depths(depths, k: int) -> list[float]:
    if depths:
        return [float(d) for d in depths]
    if k <= 1:
        return [0.5]
    return [i / (k - 1) for i in range(k)]


def _with_answer(tok, prompt: str, answer: str):
    """Prompt and answer tokens split so that ``prompt + answer`` tokenises as the concatenation."""
    p = _ids(tok, prompt)
    full = _ids(tok, prompt + answer)
    if full[: len(p)] != p:  # the join merged tokens: fall back to separate encoding
        return p, _ids(tok, answer)
    return p, full[len(p):]


def _bos(tok) -> list[int]:
    return [tok.bos_token_id] if getattr(tok, "bos_token_id", None) is not None and tok.bos_token_id != tok.eos_token_id else []


def _split(tok, prompt_ids: list[int], context_text: str, question_text: str) -> tuple[list[int], list[int], bool]:
    """``prompt_ids`` (BOS + tokens of ``context_text + question_text``) -> (context ids, question ids,
    exact): cut where the joint tokenisation has the context's own tokens; when a token straddles the
    boundary the two parts are tokenised apart (exact = False)."""
    ctx = _bos(tok) + _ids(tok, context_text)
    if prompt_ids[: len(ctx)] == ctx and len(ctx) < len(prompt_ids):
        return ctx, list(prompt_ids[len(ctx):]), True
    return ctx, _ids(tok, question_text), False


def _with_split(sample: Sample, tok, context_text: str, question_text: str) -> Sample:
    sample.context_ids, sample.question_ids, exact = _split(tok, sample.prompt_ids, context_text, question_text)
    sample.meta.update(split_exact=exact, question_tokens=len(sample.question_ids))
    return sample


def _hide(tok, hay_ids: list[int], insert: str, prefix: str, suffix: str, answer: str, length: int, depth: float,
          context: bool = False):
    """Haystack cut so the whole prompt is ``length`` tokens, ``insert`` placed at ``depth`` (0..1),
    at a sentence boundary where one is near. -> (prompt ids, answer ids[, context text]): with
    ``context``, also the text before ``suffix`` (the context of the query-agnostic split)."""
    pre, suf, ins = _ids(tok, prefix), _ids(tok, suffix), _ids(tok, " " + insert + " ")
    n_hay = max(16, length - len(pre) - len(suf) - len(ins) - len(_bos(tok)))
    hay = _fit_tokens(tok, hay_ids, n_hay)
    at = int(round(depth * n_hay))
    # move back to just after a period, if one is within 40 tokens
    for back in range(0, min(40, at)):
        if tok.decode(hay[at - back - 1: at - back]).strip().endswith("."):
            at -= back
            break
    body = tok.decode(hay[:at]) + " " + insert + " " + tok.decode(hay[at:])
    p, a = _with_answer(tok, prefix + body + suffix, answer)
    return (_bos(tok) + p, a, prefix + body) if context else (_bos(tok) + p, a)


def _sentence_start(tok, hay: list[int], at: int) -> int:
    for back in range(0, min(40, at)):
        if tok.decode(hay[at - back - 1: at - back]).strip().endswith("."):
            return at - back
    return at


def passkey(tok, context_tokens: int, samples: int, depths=None, seed: int = 0, max_new_tokens: int = 8) -> list[Sample]:
    """Pass key retrieval (Mohtashami & Jaggi, 2023): a 5-digit key at each depth of filler text."""
    rng = random.Random(seed)
    hay = _ids(tok, FILLER)
    out = []
    for i, d in enumerate(_depths(depths, samples) if depths else _depths(None, samples)):
        key = str(rng.randint(10000, 99999))
        insert = f"The pass key is {key}. Remember it. {key} is the pass key."
        prefix = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        suffix = " What is the pass key? The pass key is"
        p, a, ctx = _hide(tok, hay, insert, prefix, suffix, " " + key, context_tokens, d, context=True)
        out.append(_with_split(Sample(i, "answer", p, [key], a, metric="contains", max_new_tokens=max_new_tokens,
                                      meta={"depth": round(d, 4), "context_tokens": context_tokens, "prompt_tokens": len(p)}),
                               tok, ctx, suffix))
    return out


def needle(tok, context_tokens: int, samples: int, depths=None, text: str | None = None, seed: int = 0,
           max_new_tokens: int = 12) -> list[Sample]:
    """Needle in a haystack: "The special magic number for <key> is: <7 digits>." hidden at each depth
    of a haystack text; the question asks for it (RULER-style numeric needle, exactly scorable)."""
    rng = random.Random(seed + 1)
    hay = _ids(tok, text if text is not None else default_text())
    out = []
    for i, d in enumerate(_depths(depths, samples)):
        key = NEEDLE_KEYS[i % len(NEEDLE_KEYS)]
        val = str(rng.randint(1000000, 9999999))
        insert = f"The special magic number for {key} is: {val}."
        prefix = "Some special magic numbers are hidden within the following text. Make sure to memorize them.\n"
        suffix = f"\nWhat is the special magic number for {key} mentioned in the provided text? The special magic number for {key} mentioned in the provided text is"
        p, a, ctx = _hide(tok, hay, insert, prefix, suffix, " " + val, context_tokens, d, context=True)
        out.append(_with_split(Sample(i, "answer", p, [val], a, metric="contains", max_new_tokens=max_new_tokens,
                                      meta={"depth": round(d, 4), "context_tokens": context_tokens, "prompt_tokens": len(p)}),
                               tok, ctx, suffix))
    return out


NEEDLE_PREFIX = "Some special magic numbers are hidden within the following text. Make sure to memorize them.\n"


def _needle_question(key: str) -> str:
    return (f"\nWhat is the special magic number for {key} mentioned in the provided text? "
            f"The special magic number for {key} mentioned in the provided text is")


def needle_reuse(tok, context_tokens: int, contexts: int, questions: int = 5, depths=None, text: str | None = None,
                 seed: int = 0, max_new_tokens: int = 12) -> list[Sample]:
    """One context, several questions (reuse of one compressed context): ``questions`` needles with
    distinct keys at depths spread over the haystack (``depths``, one per question), one sample per
    needle asking for it. The samples of a context share ``group`` and ``context_ids``; each prompt is
    ``context + question`` (about ``context_tokens`` tokens), so the query-aware protocol answers the
    same questions from a prompt of its own."""
    if questions < 1 or questions > len(NEEDLE_KEYS):
        raise ValueError(f"--reuse-questions must be 1..{len(NEEDLE_KEYS)}, got {questions}")
    ds = _depths(depths, questions)
    if len(ds) != questions:
        raise ValueError(f"--depths gives {len(ds)} depths for {questions} questions per context: give one per question")
    rng = random.Random(seed + 2)
    hay_ids = _ids(tok, text if text is not None else default_text())
    pre = _ids(tok, NEEDLE_PREFIX)
    out = []
    for c in range(contexts):
        keys = rng.sample(NEEDLE_KEYS, questions)
        vals = [str(rng.randint(1000000, 9999999)) for _ in keys]
        inserts = [f"The special magic number for {k} is: {v}." for k, v in zip(keys, vals)]
        q_len = max(len(_ids(tok, _needle_question(k))) for k in keys)
        n_ins = sum(len(_ids(tok, " " + x + " ")) for x in inserts)
        n_hay = max(16, context_tokens - len(pre) - q_len - n_ins - len(_bos(tok)))
        hay = _fit_tokens(tok, hay_ids[(c * 997) % max(1, len(hay_ids)):] or hay_ids, n_hay)
        ats = [_sentence_start(tok, hay, int(round(d * n_hay))) for d in ds]
        order = sorted(range(questions), key=lambda j: ats[j])
        body, last = "", 0
        for j in order:
            body += tok.decode(hay[last: ats[j]]) + " " + inserts[j] + " "
            last = ats[j]
        body += tok.decode(hay[last:])
        ctx_text = NEEDLE_PREFIX + body
        for j, (k, v) in enumerate(zip(keys, vals)):
            q = _needle_question(k)
            p, a = _with_answer(tok, ctx_text + q, " " + v)
            p = _bos(tok) + p
            s = Sample(0, "answer", p, [v], a, metric="contains", max_new_tokens=max_new_tokens, group=c,
                       meta={"depth": round(ds[j], 4), "context_tokens": context_tokens, "prompt_tokens": len(p),
                             "context": c, "question": j, "key": k})
            out.append(_with_split(s, tok, ctx_text, q))
        shared = out[-questions].context_ids  # one list for the group (the same tokens by construction)
        for s in out[-questions:]:
            if s.context_ids != shared:
                raise RuntimeError("needle_reuse: the questions of one context split it differently")
            s.context_ids = shared
    return out


def ppl(tok, context_tokens: int, samples: int, text: str | None = None, decode_tokens: int = 128,
        prefill_tokens: int | None = None) -> list[Sample]:
    """Windows of ``context_tokens`` tokens of the text: the first ``prefill_tokens`` (default
    context - decode) are prefilled, the rest teacher-forced through the cache. Windows start at
    evenly spaced offsets (the text is repeated if it is too short)."""
    ids = _ids(tok, text if text is not None else default_text())
    decode_tokens = min(decode_tokens, context_tokens - 1) if prefill_tokens is None else context_tokens - prefill_tokens
    n_pre = context_tokens - decode_tokens
    if n_pre < 1 or decode_tokens < 1:
        raise ValueError(f"ppl needs 1 <= decode tokens < context tokens, got {decode_tokens} of {context_tokens}")
    need = context_tokens * max(1, samples)
    ids = _fit_tokens(tok, ids, max(len(ids), need))
    span = max(0, len(ids) - context_tokens)
    out = []
    for i in range(samples):
        off = 0 if samples == 1 else (span * i) // (samples - 1)
        w = ids[off: off + context_tokens]
        out.append(Sample(i, "lm", _bos(tok) + w[:n_pre], target_ids=w[n_pre:], metric="ppl",
                          meta={"offset": off, "context_tokens": context_tokens, "prefill_tokens": n_pre + len(_bos(tok))}))
    return out


# --- record formats ---------------------------------------------------------------------------------

def read_jsonl(path: str) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from e
    if not out:
        raise ValueError(f"{path} holds no records")
    return out


def normalise_records(rows: list[dict]) -> list[dict]:
    """LongBench rows ({"context", "input", "answers", ["dataset", "all_classes", "_id"]}) pass as they
    are; SCROLLS rows ({"id", "input", "output"}; one row per reference, the query and document in
    ``input``) are grouped by id into {"context": input, "input": "", "answers": [outputs...]}."""
    if all("context" in r and "answers" in r for r in rows):
        return [dict(r, input=r.get("input", "") or "", answers=list(r["answers"]) if isinstance(r["answers"], list) else [r["answers"]])
                for r in rows]
    if all("input" in r and "output" in r for r in rows):
        grouped: dict[str, dict] = {}
        for i, r in enumerate(rows):
            key = str(r.get("id", i))
            g = grouped.setdefault(key, {"_id": key, "context": r["input"], "input": "", "answers": [], "pid": r.get("pid")})
            if r["output"] is not None:
                g["answers"].append(r["output"])
        return list(grouped.values())
    missing = [i for i, r in enumerate(rows) if not ("context" in r and "answers" in r) and not ("input" in r and "output" in r)]
    raise ValueError(f"records {missing[:5]} are neither LongBench ({{context, input, answers}}) nor SCROLLS "
                     f"({{id, input, output}}) format")


def load_hub(task: str, dataset: str | None, split: str | None = None) -> list[dict]:
    """Official records via ``datasets`` (needs a reachable hub)."""
    if not dataset:
        raise ValueError(f"{task}: give --data FILE.jsonl, or --dataset NAME to load it from the hub")
    try:
        import datasets

        if task == "longbench":
            ds = datasets.load_dataset("THUDM/LongBench", dataset, split=split or "test")
        else:
            ds = datasets.load_dataset("tau/scrolls", dataset, split=split or "validation")
    except Exception as e:  # offline: say so plainly
        raise ValueError(f"cannot load {task}/{dataset} from the hub ({type(e).__name__}); pass --data FILE.jsonl") from e
    return [dict(r) for r in ds]


# English LongBench prompts (LongBench config/dataset2prompt.json) and answer lengths (dataset2maxlen)
LONGBENCH_PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "lcc": "Please complete the code given below. \n{context}Now, the next line of code is:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
LONGBENCH_MAXLEN = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32,
                    "musique": 32, "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32,
                    "samsum": 128, "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64}
GENERIC_PROMPT = "{context}\n\nQuestion: {input}\nAnswer:"
SCROLLS_PROMPT = "{context}\n\nAnswer:"


def _truncate_middle(ids: list[int], n: int | None) -> list[int]:
    """LongBench's truncation: keep the first and last n/2 tokens."""
    if n is None or len(ids) <= n:
        return ids
    half = n // 2
    return ids[:half] + ids[len(ids) - (n - half):]


def records_task(tok, rows: list[dict], task: str, context_tokens: int | None, samples: int | None,
                 dataset: str | None = None, metric: str | None = None, max_new_tokens: int | None = None,
                 limit: int | None = None) -> list[Sample]:
    """LongBench / SCROLLS / needle-style records -> samples (prompt = template filled), metric after the
    dataset (``dataset`` or each record's "dataset"). A prompt is cut (LongBench's middle truncation)
    only to ``context_tokens`` when asked, else only when it does not fit ``limit`` (the model's
    positions) with its answer budget; each sample's meta says whether it was cut ("truncated", the
    whole "record_tokens") and, for needle-style records, whether an answer survived the cut
    ("answer_in_prompt")."""
    rows = normalise_records(rows)
    if samples:
        rows = rows[:samples]
    out = []
    for i, r in enumerate(rows):
        ds = dataset or r.get("dataset") or ""
        if task == "scrolls":
            tmpl = SCROLLS_PROMPT
            m = metric or SCROLLS_METRICS.get(ds, "qa_f1")
            mx = max_new_tokens or 64
        elif task == "longbench":
            tmpl = LONGBENCH_PROMPTS.get(ds, GENERIC_PROMPT)
            m = metric or LONGBENCH_METRICS.get(ds, "qa_f1")
            mx = max_new_tokens or LONGBENCH_MAXLEN.get(ds, 32)
        else:  # needle / passkey records: the answer must appear in the output
            tmpl = GENERIC_PROMPT
            m = metric or "contains"
            mx = max_new_tokens or 16
        prompt = tmpl.format(context=r["context"], input=r.get("input", ""))
        whole = _ids(tok, prompt)
        cap = context_tokens if context_tokens is not None else (
            limit - len(_bos(tok)) - mx if limit is not None else None)
        kept = _truncate_middle(whole, cap)
        ids = _bos(tok) + kept
        answers = [str(a) for a in r["answers"]]
        meta = {"dataset": ds, "id": r.get("_id", r.get("id", i)), "prompt_tokens": len(ids),
                "context_tokens": context_tokens, "record_tokens": len(whole), "truncated": len(kept) < len(whole)}
        if task not in ("longbench", "scrolls"):  # extractive: the answer is in the context, or was cut out
            meta["answer_in_prompt"] = any(a in tok.decode(kept) for a in answers)
        smp = Sample(i, "answer", ids, answers, metric=m, max_new_tokens=mx, all_classes=r.get("all_classes"),
                     first_line=ds in ("trec", "triviaqa", "samsum", "lsht"), meta=meta)
        _record_split(smp, tok, tmpl, r)
        out.append(smp)
    return out


def _record_split(s: Sample, tok, tmpl: str, r: dict) -> None:
    """The query-agnostic split of a record's prompt: the context is the template up to and including
    ``{context}``, the question the rest (``{input}`` and the answer cue). The question's tokens are
    the last ones of the (possibly cut) prompt when the joint tokenisation ends with them
    (``split_exact``); a template without ``{context}`` before ``{input}`` has no split."""
    if "{context}" not in tmpl or tmpl.find("{input}") < tmpl.find("{context}") and "{input}" in tmpl:
        return
    tail = tmpl.split("{context}", 1)[1]
    q_text = tail.replace("{input}", r.get("input", "") or "")
    q = _ids(tok, q_text)
    if not q or len(q) >= len(s.prompt_ids):
        return
    exact = s.prompt_ids[-len(q):] == q
    s.context_ids, s.question_ids = list(s.prompt_ids[: len(s.prompt_ids) - len(q)]), q
    s.meta.update(split_exact=exact, question_tokens=len(q))
