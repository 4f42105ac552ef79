"""RULER-style synthetic tasks (agacc/eval/ruler.py), checked against references computed here from the
generated text alone (regexes, a variable-chain resolver, Counters), with the embedded model's tokenizer
(SmolLM2, when its converted copy is cached) and a small byte-level BPE trained here:

* every task at 1K and 4K tokens fills the length asked to within a few tokens, never over;
* the context / question split is exact and the answers are in the context, not in the question;
* needle tasks: each needle lies at the token span the sample gives, and the numbers of the asked keys
  are the answers; variable tracking: the chains, resolved, give exactly the answer variables; common /
  frequent words: a Counter over the generated list gives the answers, with a strict gap to the next;
* the same seed gives identical samples, another seed different ones;
* the metric (RULER's string_match_all) on hand-worked cases."""
import re
from collections import Counter

import pytest

from agacc.eval import ruler as R

SLACK = 8  # tokens a prompt may fall short of the length asked (one list word / haystack token step)


def _bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from agacc.eval.tasks import default_text

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([default_text()], trainers.BpeTrainer(
        vocab_size=3000, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module", params=["embedded", "bpe"])
def tok(request):
    if request.param == "bpe":
        return _bpe_tokenizer()
    from transformers import AutoTokenizer

    from agacc.models import EMBEDDED_NAME, cache_dir

    path = cache_dir() / EMBEDDED_NAME
    if not (path / "tokenizer.json").exists():  # not converted yet on this machine: convert it now
        import agacc

        return agacc.load_model()[1]
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def made(tok):
    """{(task, length): two samples}, seed 0."""
    return {(name, n): fn(tok, n, 2, seed=0) for name, fn in R.TASKS.items() for n in (1024, 4096)}


def _text(tok, ids):
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_registry_names():
    assert list(R.TASKS) == ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]


def test_lengths_split_and_answers(tok, made):
    for (name, n), samples in made.items():
        assert len(samples) == 2 and [s.index for s in samples] == [0, 1]
        for s in samples:
            assert n - SLACK <= len(s.prompt_ids) <= n, (name, n, len(s.prompt_ids))
            assert s.meta["prompt_tokens"] == len(s.prompt_ids) and s.meta["context_tokens"] == n
            assert s.kind == "answer" and s.metric == "string_match_all"
            assert s.has_split and s.meta["split_exact"] and s.context_ids + s.question_ids == s.prompt_ids
            assert s.answers and all(isinstance(a, str) and a for a in s.answers)
            ctx, q, ref = _text(tok, s.context_ids), _text(tok, s.question_ids), _text(tok, s.answer_ids)
            for a in s.answers:
                assert a in ctx and a not in q, (name, a)
                assert a in ref  # the reference rendering holds every answer
            assert R.score(s, ref) == 1.0
            assert len(s.answer_ids) < s.max_new_tokens <= len(s.answer_ids) + 16
            # the prompt + reference answer tokenise as one text (what match scoring teacher-forces)
            assert tok.decode(s.prompt_ids + s.answer_ids).endswith(ref)


NEEDLE = re.compile(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.")
EXPECT = {"niah_single": (1, 1, 1), "niah_multikey": (4, 1, 1), "niah_multivalue": (1, 4, 1),
          "niah_multiquery": (4, 1, 4)}  # keys in the text, values per key, keys asked


def _asked(question: str) -> list[str]:
    m = re.search(r"special magic numbers? for (.+?) mentioned", question)
    return [k for k in re.split(r", and |, | and ", m.group(1)) if k]


def test_needles_where_the_sample_says(tok, made):
    for (name, n), samples in made.items():
        if name not in EXPECT:
            continue
        n_keys, n_vals, n_asked = EXPECT[name]
        for s in samples:
            ctx = _text(tok, s.context_ids)
            found = NEEDLE.findall(ctx)
            by_key: dict[str, list[str]] = {}
            for k, v in found:
                by_key.setdefault(k, []).append(v)
            assert len(by_key) == n_keys and all(len(v) == n_vals for v in by_key.values())
            assert len({v for _, v in found}) == len(found)  # every number distinct
            asked = _asked(_text(tok, s.question_ids))
            assert len(asked) == n_asked and set(asked) <= set(by_key)
            assert sorted(s.answers) == sorted(v for k in asked for v in by_key[k])
            for v in s.answers:
                assert ctx.count(v) == 1
            # each needle at its token span: that span decodes to the needle line, and nothing around it
            assert len(s.meta["spans"]) == len(found)
            for (a, b), k, v in zip(s.meta["spans"], s.meta["needle_keys"], s.meta["needle_values"]):
                line = f"One of the special magic numbers for {k} is: {v}."
                assert _text(tok, s.prompt_ids[a:b]).strip() == line
                assert v in by_key[k]
                assert len(tok(" " + line, add_special_tokens=False)["input_ids"]) + 2 >= b - a
            starts = sorted(a for a, _ in s.meta["spans"])
            depths = sorted(s.meta["depths"])
            for st, d in zip(starts, depths):  # the depth says where in the prompt it is, roughly
                assert abs(st / len(s.prompt_ids) - d) < 0.15


def _resolve(text: str) -> dict[str, str]:
    """The value of every variable of the chains in ``text``; a variable used before it is assigned fails."""
    val: dict[str, str] = {}
    for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)", text):
        assert name not in val, f"{name} assigned twice"
        if rhs.startswith("VAR "):
            src = rhs[4:]
            assert src in val, f"{name} = {src} before {src} is assigned"
            val[name] = val[src]
        else:
            val[name] = rhs
    return val


def test_variable_tracking_chains_resolve_to_the_answer(tok, made):
    for n in (1024, 4096):
        for s in made[("vt", n)]:
            ctx, q = _text(tok, s.context_ids), _text(tok, s.question_ids)
            value = re.search(r"assigned the value (\d+) in the text above", q).group(1)
            parts = ctx.split("Memorize and track the chain(s) of variable assignment hidden in the following text.")
            assert len(parts) == 3  # the worked example, then the task
            main = _resolve(parts[2])
            assert sorted(s.answers) == sorted(k for k, v in main.items() if v == value)
            assert len(s.answers) == 5 and re.search(r"(\d+) variables are assigned", q).group(1) == "5"
            # the worked example: its stated answer is what its own chain resolves to
            ex = _resolve(parts[1])
            ex_value = re.search(r"assigned the value (\d+) in the text above", parts[1]).group(1)
            stated = parts[1].split("they are:")[-1].split()
            assert sorted(stated) == sorted(k for k, v in ex.items() if v == ex_value)
            assert not set(stated) & set(main) and value != ex_value
            for (a, b) in s.meta["spans"]:
                assert re.fullmatch(r"VAR [A-Z]{5} = (VAR [A-Z]{5}|\d+)", _text(tok, s.prompt_ids[a:b]).strip())
    # several chains, on prose: the distractor chains hold other values
    for s in R.vt(tok, 1024, 2, seed=3, chains=3, hops=2, haystack="text"):
        main = _resolve(_text(tok, s.context_ids).split("hidden in the following text.")[-1])
        value = re.search(r"assigned the value (\d+) in the", _text(tok, s.question_ids)).group(1)
        assert len(main) == 9 and len(set(main.values())) == 3
        assert sorted(s.answers) == sorted(k for k, v in main.items() if v == value)
        assert 1024 - SLACK <= len(s.prompt_ids) <= 1024


def _top(counter: Counter, k: int) -> list[str]:
    ranked = counter.most_common()
    assert ranked[k - 1][1] > ranked[k][1], "a tie at the cut: the answer is not defined"
    return [w for w, _ in ranked[:k]]


def test_common_words_answers_are_the_counted_most_common(tok, made):
    for n in (1024, 4096):
        for s in made[("cwe", n)]:
            ctx = _text(tok, s.context_ids)
            main = ctx.split("Memorize the ones that appear most often.\n")[-1]
            entries = re.findall(r"(\d+)\. (\S+)", main)
            assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
            c = Counter(w for _, w in entries)
            assert sorted(_top(c, 10)) == sorted(s.answers)
            fc, fu = (30, 3) if n >= 4096 else (6, 1)
            assert sorted(c.values())[-11:] == [c.most_common(11)[-1][1]] + [fc] * 10
            assert set(c.values()) - {fc} <= set(range(1, fu + 1)) and sum(v != fu for v in c.values()) <= 11
            assert len(entries) == s.meta["entries"]
            # the worked example's stated answer is its own list's top 10
            ex = ctx.split("Memorize the ones that appear most often.\n")[1].split("\nQuestion:")[0]
            ex_c = Counter(re.findall(r"\d+\. (\S+)", ex))
            stated = re.findall(r"\d+\. (\S+)", ctx.split("appear most often in the list are:")[1].split("\n")[0])
            assert sorted(stated) == sorted(_top(ex_c, 10)) and not set(stated) & set(c)


def test_frequent_words_answers_are_the_counted_top_three(tok, made):
    for n in (1024, 4096):
        for s in made[("fwe", n)]:
            ctx = _text(tok, s.context_ids)
            words = ctx.split("Find the three most frequently appeared coded words.")[1].split()
            c = Counter(words)
            assert c.most_common(1)[0][0] == "..."  # the top rank is the noise
            del c["..."]
            assert sorted(_top(c, 3)) == sorted(s.answers)
            assert all(re.fullmatch(r"[a-z]{6}", w) for w in c)
            # Zipf: the word of rank k appears int(N k^-2 / zeta(2)) times (N the Zipf size fitted); the
            # noise makes up the rest of the words
            z = sum(k ** -2.0 for k in range(1, 200000))
            counts = [c2 for _, c2 in Counter(words).most_common(4)]
            assert counts[1:] == [int(s.meta["size"] * k ** -2.0 / z) for k in range(2, 5)]
            assert counts[0] == int(s.meta["size"] / z) + s.meta["pad"]


def _key(s):
    return (s.prompt_ids, s.answers, s.answer_ids, s.context_ids, s.question_ids, s.max_new_tokens, s.meta)


def test_same_seed_same_samples_other_seed_other_samples(tok, made):
    for name, fn in R.TASKS.items():
        again = fn(tok, 1024, 2, seed=0)
        assert [_key(s) for s in again] == [_key(s) for s in made[(name, 1024)]], name
        other = fn(tok, 1024, 2, seed=1)
        for a, b in zip(other, again):
            assert a.prompt_ids != b.prompt_ids and a.answers != b.answers, name
        assert again[0].answers != again[1].answers, name  # samples of one run differ too


_HASH = """
import hashlib, json, sys
from transformers import AutoTokenizer
from agacc.eval import ruler as R
tok = AutoTokenizer.from_pretrained(sys.argv[1])
suite = R.ruler_suite(tok, [1024], 2, seed=5)
print(hashlib.sha1(json.dumps({k: [(s.prompt_ids, s.answers, s.answer_ids, s.question_ids) for s in v]
                               for k, v in suite.items()}).encode()).hexdigest())
"""


def test_same_samples_in_another_process(tok, tmp_path):
    """Another interpreter, another string-hash seed: the very same samples."""
    import hashlib
    import json
    import os
    import subprocess
    import sys

    path = tok.name_or_path
    if not path:  # the BPE tokenizer trained in memory: saved for the other process
        tok.save_pretrained(tmp_path)
        path = str(tmp_path)
    env = dict(os.environ, PYTHONHASHSEED="123")
    got = subprocess.run([sys.executable, "-c", _HASH, path], env=env, capture_output=True, text=True,
                         check=True).stdout.split()[-1]
    suite = R.ruler_suite(tok, [1024], 2, seed=5)
    here = hashlib.sha1(json.dumps({k: [(s.prompt_ids, s.answers, s.answer_ids, s.question_ids) for s in v]
                                    for k, v in suite.items()}).encode()).hexdigest()
    assert got == here


def test_vocabulary_extension():
    words = R._vocabulary(1500)
    assert len(words) == 1500 and len(set(words)) == 1500 and words[: len(R.WORDS)] == R.WORDS
    assert not any(a != b and a in b for a in words for b in words)  # no word credits another by substring
    assert R._vocabulary(10) == R.WORDS


def test_depths_and_noise_haystack(tok):
    ss = R.niah_single(tok, 1024, 3, depths=[0.0, 0.5, 1.0], haystack="noise")
    for s, d in zip(ss, (0.0, 0.5, 1.0)):
        assert abs(s.meta["depths"][0] - d) < 0.05 and 1024 - SLACK <= len(s.prompt_ids) <= 1024
        assert "The grass is green." in _text(tok, s.context_ids)
    with pytest.raises(ValueError):
        R.niah_single(tok, 1024, 1, haystack="essays")
    with pytest.raises(ValueError):
        R.niah_multivalue(tok, 40, 1)  # the template alone is longer


def test_suite(tok):
    suite = R.ruler_suite(tok, [1024, 2048], 1, seed=0, tasks=["niah_single", "fwe"], haystack="noise")
    assert list(suite) == ["niah_single", "fwe"]
    for name, ss in suite.items():
        assert [s.index for s in ss] == [0, 1] and [s.meta["context_tokens"] for s in ss] == [1024, 2048]
        assert [s.meta["task"] for s in ss] == [name, name]
    assert suite["niah_single"][0].meta["haystack"] == "noise"
    assert list(R.ruler_suite(tok, [1024], 1)) == list(R.TASKS)
    with pytest.raises(ValueError):
        R.ruler_suite(tok, [1024], 1, tasks=["qa"])


def test_metric_hand_worked():
    m = R.string_match_all
    assert m("The special magic number is 1234567.", ["1234567"]) == 1.0
    assert m("1234567", ["7654321"]) == 0.0
    assert m("", ["1234567"]) == 0.0 and m("anything", []) == 0.0
    four = ["1111111", "2222222", "3333333", "4444444"]
    assert m("1111111, 3333333 and that is all", four) == 0.5
    assert m("4444444 3333333 2222222 1111111", four) == 1.0
    assert m("none of them: 5555555", four) == 0.0
    assert m("they are: jmjdl ztHTQ", ["JMJDL", "ZTHTQ", "LAZBR", "STGOF"]) == 0.5  # case-insensitive
    assert m("\x00 1111111\n", ["1111111"]) == 1.0
    assert R.string_match_part("2222222 only", four) == 1.0 and R.string_match_part("no", four) == 0.0
    from agacc.eval.tasks import Sample

    s = Sample(0, "answer", [1], answers=four, metric="string_match_all")
    assert R.score(s, "1111111 2222222 3333333") == 0.75


@pytest.mark.parametrize("found", [0, 1, 2])
def test_the_runner_scores_ruler_samples_with_their_metric(monkeypatch, found):
    """``python -m agacc eval niah_multivalue``: the CLI makes the RULER samples and the runner scores the
    greedy output with ``string_match_all`` (the share of every answer found), stopping once all are in.
    The decoding is replaced by an output holding ``found`` of the sample's answers."""
    from agacc.eval import cli, runner
    from tests.helpers import tiny_model

    tok = _bpe_tokenizer()
    args = cli.build_parser().parse_args(["niah_multivalue", "--samples", "1", "--context-tokens", "256"])
    (s,) = cli.make_samples(args, tok)
    assert s.metric == "string_match_all" and len(s.answers) >= 2
    want = " ".join(s.answers[:found]) or "nothing"
    seen = {}

    def greedy(model, cache, first, max_new, eos, stop=None):
        ids = tok(want, add_special_tokens=False)["input_ids"]
        seen["stop"] = stop(ids)
        return ids

    monkeypatch.setattr(runner, "greedy", greedy)
    model = tiny_model(layers=1, vocab_size=len(tok))
    (r,) = runner.evaluate_sample(model, tok, s, runner.preset_configs(["full"], None), scoring="generate")
    assert r["score"] == pytest.approx(found / len(s.answers))
    assert seen["stop"] == (found == len(s.answers))
