"""Real datasets: readers for the paper's benchmarks, user JSONL and plain text (tasks/download.py
fetches the benchmarks).

SPECS lists the paper's tasks and MIXTURES the mixtures (tasks/registry.py builds the registry
from them; importing this module registers nothing):

    glue     glue/{cola,sst2,mrpc,qqp,stsb,mnli,mnli_mm,qnli,rte}  (GLUE without WNLI)
    gpt4all  hellaswag, openbookqa, winogrande, arc/easy, arc/challenge, boolq, piqa
    race     race/middle, race/high
    paper    glue + race + gpt4all + hh_rlhf (preference) + alpaca (instruction)

plus glue/wnli (loadable, in no mixture; see WNLI_NOTE) and the dynamic families
``jsonl:path/to/file.jsonl`` and ``text:path/to/corpus.txt`` (``jsonl_task`` and ``text_task``
build their specs; tasks.DYNAMIC registers them when a --tasks value names one).

Every loader is ``loader(split, data_dir=None, seed=0, n=None, **_)`` -> list of examples, in
file order; ``n`` keeps a seeded random subset of n examples (still in file order). data_dir
defaults to the environment variable DPH_DATA. Files are looked up relative to data_dir, the
official distribution layout first (what ``download`` writes), then the layouts of the copies
in shared/data (SOURCES.md); ``source="official"|"glue_pretrain"|"kshot"|...`` restricts the
lookup to one of them, ``resolve_files(task, split)`` says which file would be read.

Errors are one line, TaskError (tasks/types.py): "path:line: what is wrong" for bad data, and
MissingSplit (a TaskError) when a split does not exist (unlabelled test sets, no train split
in the copies) or its files are not there, naming every path tried. Training code can skip a
task on MissingSplit and must stop on any other TaskError.

Templates and verbalisers (candidate index = label):

    task              system kind     fields                    candidates
    glue/cola         acceptability   Sentence                  no / yes
    glue/sst2         sentiment       Sentence                  negative / positive
    glue/mrpc         paraphrase      Sentence 1, Sentence 2    no / yes   (F1 positive: 1)
    glue/qqp          paraphrase      Question 1, Question 2    no / yes   (F1 positive: 1)
    glue/stsb         similarity      Sentence 1, Sentence 2    "0".."5" (label round(score),
                                                                          value = the score)
    glue/mnli(_mm)    nli3            Premise, Hypothesis       True / Neither / False
    glue/qnli         qa_entailment   Question, Sentence        yes / no   (0 = entailment)
    glue/rte          entailment      Premise, Hypothesis       yes / no   (0 = entailment)
    glue/wnli         entailment      Premise, Hypothesis       no / yes   (1 = entailment, as GLUE)
    race/*            multiple_choice Passage, Question+Choices "A. option" ...
    arc/*, openbookqa multiple_choice Question + Choices        "A. option" ...
    boolq             yes_no          Passage, Question         no / yes
    hellaswag         continuation    Context                   the 4 bare endings
    piqa              goal            Goal                      the 2 bare solutions
    winogrande        continuation    Context                   option + rest of sentence (2)

WinoGrande: the copies are MosaicML's (context_options = sentence up to the blank with each
option filled in, continuation = the rest), so the blanked sentence is not stored. The two
context options differ only in the option, so their common prefix, cut back to a word boundary,
is the sentence up to the blank; that prefix is the prompt ("Context: Sarah was a much better
surgeon than Maria so") and the candidates are "option + rest" ("Maria always got the easier
cases."), exactly the verbaliser used here and lm-eval-harness's partial scoring. The official
format (sentence with "_") is converted to the same form, so both give identical examples.

    python -m tasks.loaders                # table of tasks, splits and example counts ($DPH_DATA)
    python -m tasks download --tasks glue --data-dir data   # tasks/download.py
"""
from __future__ import annotations

import bz2
import csv
import gzip
import json
import os
import random
import re
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Optional

from .types import (LETTERS, SPLITS, SYSTEM_PROMPTS, ChoiceExample, InstructionExample,
                    MissingSplit, PreferenceExample, TaskError, TaskSpec, TextExample, lettered,
                    prompt)


class _Bad(Exception):
    """A problem with one record; the reader adds "path:line: " and raises TaskError."""


# ----------------------------------------------------------------------------------------------
# Small helpers


def _data_dir(data_dir) -> Path:
    d = data_dir or os.environ.get("DPH_DATA")
    if not d:
        raise TaskError("no data directory: pass --data-dir or set DPH_DATA "
                           "(python -m tasks download --tasks ... fetches the files)")
    return Path(d)


def _subsample(examples: list, n, seed: int) -> list:
    if n is None or n >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def _label(raw, mapping: dict) -> int:
    if raw not in mapping:
        raise _Bad(f"label {raw!r} is not one of {', '.join(map(repr, mapping))}")
    return mapping[raw]


def _index(i, k: int) -> int:
    if isinstance(i, bool) or not isinstance(i, int):
        raise _Bad(f"label {i!r} is not an integer")
    if not 0 <= i < k:
        raise _Bad(f"label {i} outside 0..{k - 1}")
    return i


def _text(d: dict, key: str) -> str:
    if key not in d:
        raise _Bad(f"missing key {key!r}")
    if not isinstance(d[key], str):
        raise _Bad(f"{key!r} is not a string")
    return d[key].strip()


def _records(path: Path, rows):
    """Run a per-record function over (where, record) pairs, turning _Bad into a one-line
    TaskError that names the file and line (or item)."""
    for where, rec in rows:
        try:
            yield rec()
        except _Bad as e:
            raise TaskError(f"{path}:{where}: {e}") from None


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8-sig", newline="")  # -sig: MRPC files start with a BOM


def _lines(path: Path):
    """(line number, line without its end-of-line) for a text file; decode errors -> TaskError."""
    try:
        with _open_text(path) as f:
            for i, line in enumerate(f, 1):
                yield i, line.rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:
        raise TaskError(f"{path}: cannot read ({e})") from None


def _jsonl(path: Path):
    """(line number, object) for each non-blank line of a JSONL file."""
    for i, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}:{i}: bad JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise TaskError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
        yield i, obj


def _json(path: Path):
    try:
        with _open_text(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TaskError(f"{path}:{e.lineno}: bad JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _tsv(path: Path, header: bool = True, ncols: Optional[int] = None, need=()):
    """(line number, row) of a GLUE TSV; a dict keyed by the header when there is one, which
    must name the columns in ``need``.

    GLUE files are read with quoting disabled: a field may start with a bare '"' (MRPC, QNLI),
    so csv's default dialect would swallow tabs and newlines up to the next quote.
    """
    names = None
    for i, line in _lines(path):
        if not line.strip():
            continue
        row = line.split("\t")
        if header and names is None:
            names = row
            missing = [c for c in need if c not in names]
            if missing:
                raise TaskError(f"{path}:{i}: header lacks column(s) {', '.join(missing)}")
            continue
        want = len(names) if names else ncols
        if want is not None and len(row) != want:
            raise TaskError(f"{path}:{i}: expected {want} tab-separated columns, got {len(row)}")
        yield i, (dict(zip(names, row)) if names else row)


# ----------------------------------------------------------------------------------------------
# GLUE (Wang et al., 2019)

WNLI_NOTE = ("WNLI is loadable but in no training mixture: its train and dev sets are adversarial "
             "to each other (the same sentences with flipped hypotheses) and tiny (635 / 71), so a "
             "model that fits train does worse than the majority class on dev; GLUE papers "
             "report GLUE -WNLI and +WNLI separately.")

#   name -> (system kind, field names, candidates, label map)
GLUE = {
    "glue/cola": ("acceptability", ("Sentence",), ["no", "yes"], {"0": 0, "1": 1}),
    "glue/sst2": ("sentiment", ("Sentence",), ["negative", "positive"], {"0": 0, "1": 1}),
    "glue/mrpc": ("paraphrase", ("Sentence 1", "Sentence 2"), ["no", "yes"], {"0": 0, "1": 1}),
    "glue/qqp": ("paraphrase", ("Question 1", "Question 2"), ["no", "yes"], {"0": 0, "1": 1}),
    "glue/stsb": ("similarity", ("Sentence 1", "Sentence 2"), [str(i) for i in range(6)], None),
    "glue/mnli": ("nli3", ("Premise", "Hypothesis"), ["True", "Neither", "False"],
                  {"entailment": 0, "neutral": 1, "contradiction": 2}),
    "glue/qnli": ("qa_entailment", ("Question", "Sentence"), ["yes", "no"],
                  {"entailment": 0, "not_entailment": 1}),
    "glue/rte": ("entailment", ("Premise", "Hypothesis"), ["yes", "no"],
                 {"entailment": 0, "not_entailment": 1}),
    "glue/wnli": ("entailment", ("Premise", "Hypothesis"), ["no", "yes"], {"0": 0, "1": 1}),
}
GLUE["glue/mnli_mm"] = GLUE["glue/mnli"]


def _glue_example(task: str, texts, raw_label) -> ChoiceExample:
    kind, fields, cands, labels = GLUE[task]
    texts = [t.strip() for t in texts]
    if any(not t for t in texts):
        raise _Bad("empty sentence")
    if labels is None:  # STS-B: the float score, label = score rounded half up (not banker's)
        try:
            value = float(raw_label)
        except ValueError:
            raise _Bad(f"score {raw_label!r} is not a number") from None
        if not 0.0 <= value <= 5.0:
            raise _Bad(f"score {value} outside 0..5")
        return ChoiceExample(task, prompt(kind, list(zip(fields, texts))), list(cands),
                             int(value + 0.5), value)
    return ChoiceExample(task, prompt(kind, list(zip(fields, texts))), list(cands),
                         _label(raw_label.strip(), labels))


def _glue_tsv(columns, label_col, header=True, ncols=None, relabel=None):
    """Reader for a GLUE-style TSV: text columns and the label column by header name (or index
    for headerless files); relabel maps a file's own label encoding to the official one."""
    def read(task, paths):
        path = paths[0]
        rows = _tsv(path, header=header, ncols=ncols, need=(*columns, label_col) if header else ())

        def rec(row):
            raw = row[label_col]
            if relabel is not None:
                raw = relabel.get(raw, raw)
            return _glue_example(task, [row[c] for c in columns], raw)
        return list(_records(path, ((i, partial(rec, row)) for i, row in rows)))
    return read


def _glue_pretrain(task, paths):
    """PowerfulPromptFT's glue_pretrain/*.json: {"0": {"text_a", "text_b", "label"}, ...}."""
    path = paths[0]
    data = _json(path)
    if not isinstance(data, dict):
        raise TaskError(f"{path}: expected a JSON object of items")

    def rows():
        for key, item in data.items():
            def rec(item=item):
                if not isinstance(item, dict):
                    raise _Bad("item is not an object")
                return _glue_example(task, [_text(item, "text_a"), _text(item, "text_b")],
                                     str(item.get("label", "")))
            yield f"item {key}", rec
    return list(_records(path, rows()))


def _mrpc_raw(dev: bool):
    """MSR's msr_paraphrase_train.txt split by GLUE's dev_ids.tsv (what GLUE's script does)."""
    def read(task, paths):
        src, ids_path = paths
        ids = {(r[0].strip(), r[1].strip()) for _, r in _tsv(ids_path, header=False, ncols=2)}
        need = ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")
        rows = [(i, r) for i, r in _tsv(src, need=need) if ((r["#1 ID"], r["#2 ID"]) in ids) == dev]
        recs = ((i, partial(_glue_example, task, [r["#1 String"], r["#2 String"]], r["Quality"]))
                for i, r in rows)
        return list(_records(src, recs))
    return read


# ----------------------------------------------------------------------------------------------
# Multiple choice: RACE, ARC, OpenBookQA


def _mc_example(task, fields, options, label) -> ChoiceExample:
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise _Bad("options are not a list of strings")
    options = [o.strip() for o in options]
    if len(options) < 2 or any(not o for o in options):
        raise _Bad("fewer than two options, or an empty option")
    if len(options) > len(LETTERS):
        raise _Bad(f"{len(options)} options; at most {len(LETTERS)} can be lettered")
    return ChoiceExample(task, prompt("multiple_choice", fields, choices=options),
                         lettered(options), _index(label, len(options)))


def _race(task, paths):
    """RACE: one JSON object per .txt file (article, questions, options, answers)."""
    out = []
    files = sorted(paths[0].glob("*.txt"), key=lambda p: (len(p.stem), p.stem))  # 2.txt < 10.txt
    for f in files:
        doc = _json(f)

        def rows(doc=doc):
            try:
                qs, opts, ans = doc["questions"], doc["options"], doc["answers"]
                article = doc["article"]
            except (KeyError, TypeError) as e:
                yield 1, partial(_raise, f"missing key {e}")
                return
            if not (len(qs) == len(opts) == len(ans)):
                yield 1, partial(_raise, f"{len(qs)} questions, {len(opts)} option lists, "
                                         f"{len(ans)} answers")
                return
            for q, o, a in zip(qs, opts, ans):
                yield 1, partial(_race_one, task, article, q, o, a)
        out += _records(f, rows())
    if not files:
        raise TaskError(f"{paths[0]}: no .txt files")
    return out


def _raise(msg):
    raise _Bad(msg)


def _race_one(task, article, q, options, answer):
    if not isinstance(article, str) or not isinstance(q, str):
        raise _Bad("article or question is not a string")
    if not isinstance(answer, str) or len(answer) != 1 or answer not in LETTERS:
        raise _Bad(f"answer {answer!r} is not a letter")
    return _mc_example(task, [("Passage", article.strip()), ("Question", q.strip())], options,
                       LETTERS.index(answer))


def _strip_prefix(s: str, prefix: str) -> str:
    return s[len(prefix):] if s.startswith(prefix) else s


def _ai2_jsonl(task, paths):
    """Official ARC / OpenBookQA JSONL: question.stem, question.choices[{label, text}], answerKey
    (letters, or digits "1".."5" for a few ARC questions)."""
    path = paths[0]

    def rec(obj):
        q = obj.get("question")
        if not isinstance(q, dict) or not isinstance(q.get("choices"), list) \
                or not all(isinstance(c, dict) for c in q["choices"]):
            raise _Bad("missing key 'question.choices' (a list of {label, text})")
        stem = _text(q, "stem")
        labels = [str(c.get("label", "")).strip() for c in q["choices"]]
        key = str(obj.get("answerKey", "")).strip()
        if key not in labels:
            raise _Bad(f"answerKey {key!r} is not one of the choice labels {labels}")
        return _mc_example(task, [("Question", stem)], [c.get("text", "") for c in q["choices"]],
                           labels.index(key))
    return list(_records(path, ((i, partial(rec, o)) for i, o in _jsonl(path))))


def _mosaic_mc(task, paths):
    """MosaicML ICL multiple choice: {"query", "choices", "gold"}; ARC's query starts with
    "Question: ", OpenBookQA's is the bare stem."""
    path = paths[0]

    def rec(obj):
        stem = _strip_prefix(_text(obj, "query"), "Question: ").strip()
        choices = obj.get("choices")
        if not isinstance(choices, list):
            raise _Bad("missing key 'choices'")
        return _mc_example(task, [("Question", stem)], choices, obj.get("gold"))
    return list(_records(path, ((i, partial(rec, o)) for i, o in _jsonl(path))))


def _arc_csv(task, paths):
    """LLMCBench's ARC CSV: question, A, B, C, D, answer; no header.

    Lossy: ARC questions with 3 or 5 options were forced into 4 columns. So: empty option columns
    are dropped (3-option questions); rows whose options are ALL empty are dropped (the export
    lost them: these are exactly the rows with numeric answer keys 1-4); rows whose answer is
    "E" are dropped (5-option questions whose gold option fell off the end). Numeric keys are
    mapped 1 -> A, ... for any row that keeps its options. Dropped rows per file: Easy train
    (arc_easy_dev.csv) 104 of 2251, Easy dev (arc_easy_test.csv) 21 of 570, Challenge train
    (arc_challenge_dev.csv) 23 of 1119, Challenge dev (arc_challenge_test.csv) 5 of 299.
    """
    path = paths[0]
    out = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(enumerate(csv.reader(f), 1))
    except (UnicodeDecodeError, csv.Error) as e:
        raise TaskError(f"{path}: cannot parse CSV ({e})") from None
    for i, row in rows:
        if not row:
            continue
        if len(row) != 6:
            raise TaskError(f"{path}:{i}: expected 6 comma-separated columns, got {len(row)}")
        q, opts, key = row[0].strip(), row[1:5], row[5].strip()
        key = {"1": "A", "2": "B", "3": "C", "4": "D"}.get(key, key)
        if key not in "ABCDE" or len(key) != 1:
            raise TaskError(f"{path}:{i}: answer {row[5]!r} is not A-E or 1-4")
        kept = [(letter, o) for letter, o in zip("ABCD", opts) if o.strip()]
        if key == "E" or not kept:
            continue  # the gold option, or all options, were lost in the export
        if key not in dict(kept):
            raise TaskError(f"{path}:{i}: answer {key} points at an empty option")
        try:
            out.append(_mc_example(task, [("Question", q)], [o for _, o in kept],
                                   [letter for letter, _ in kept].index(key)))
        except _Bad as e:
            raise TaskError(f"{path}:{i}: {e}") from None
    return out


# ----------------------------------------------------------------------------------------------
# BoolQ, HellaSwag, PIQA, WinoGrande


def _boolq_example(task, passage, question, label):
    if not passage or not question:
        raise _Bad("empty passage or question")
    return ChoiceExample(task, prompt("yes_no", [("Passage", passage), ("Question", question)]),
                         ["no", "yes"], label)


def _boolq_official(task, paths):
    """Official BoolQ JSONL: question (lower case, no "?"), passage, answer (bool), title.
    A "?" is added to the question, as MosaicML's copy has it, so both layouts give equal text."""
    path = paths[0]

    def rec(obj):
        q = _text(obj, "question")
        if not isinstance(obj.get("answer"), bool):
            raise _Bad("'answer' is not true/false")
        return _boolq_example(task, _text(obj, "passage"), q if q.endswith("?") else q + "?",
                              int(obj["answer"]))
    return list(_records(path, ((i, partial(rec, o)) for i, o in _jsonl(path))))


def _boolq_mosaic(task, paths):
    """MosaicML BoolQ: query "Passage: ...\\nQuestion: ...?", choices ["no", "yes"], gold."""
    path = paths[0]

    def rec(obj):
        query = _text(obj, "query")
        if not query.startswith("Passage: ") or "\nQuestion: " not in query:
            raise _Bad("query is not 'Passage: ...\\nQuestion: ...'")
        passage, question = query[len("Passage: "):].rsplit("\nQuestion: ", 1)
        if obj.get("choices") != ["no", "yes"]:
            raise _Bad(f"choices {obj.get('choices')!r} are not ['no', 'yes']")
        return _boolq_example(task, passage.strip(), question.strip(), _index(obj.get("gold"), 2))
    return list(_records(path, ((i, partial(rec, o)) for i, o in _jsonl(path))))


# HellaSwag's WikiHow items carry markup ("[header]", "[title]", "[step]"). Dropped the same
# way the klosax text copy (shared/data) already has it, so both layouts give the same text.
_HS_MARKUP = (("[header]", ""), ("[step]", ""), ("[substeps]", ""), (" [title]", ". "),
              ("[title] ", ""), ("[title].", ""), ("  ", " "))


def _hs_clean(s: str) -> str:
    for a, b in _HS_MARKUP:
        s = s.replace(a, b)
    return s.strip()


def _hellaswag_example(task, context, endings, label):
    if len(endings) != 4 or any(not e for e in endings):
        raise _Bad("expected 4 non-empty endings")
    return ChoiceExample(task, prompt("continuation", [("Context", context)]), endings,
                         _index(label, 4))


def _hellaswag_official(task, paths):
    """Official HellaSwag JSONL: activity_label, ctx, endings[4], label."""
    path = paths[0]

    def rec(obj):
        endings = obj.get("endings")
        if not isinstance(endings, list):
            raise _Bad("missing key 'endings'")
        ctx = _hs_clean(_text(obj, "activity_label")) + ": " + _hs_clean(_text(obj, "ctx"))
        return _hellaswag_example(task, ctx, [_hs_clean(str(e)) for e in endings], obj.get("label"))
    return list(_records(path, ((i, partial(rec, o)) for i, o in _jsonl(path))))


def _hellaswag_klosax(task, paths):
    """klosax/hellaswag_text_data: 6 lines per item: "activity: context", gold index, 4 endings."""
    path = paths[0]
    lines = list(_lines(path))
    while lines and not lines[-1][1].strip():
        lines.pop()
    if len(lines) % 6:
        raise TaskError(f"{path}:{lines[-1][0]}: truncated item "
                        f"({len(lines)} lines, not a multiple of 6)")

    def rec(block):
        (_, ctx), (_, lab), *ends = block
        if not lab.strip().isdigit():
            raise _Bad(f"label {lab!r} is not an integer")
        return _hellaswag_example(task, ctx.strip(), [e.strip() for _, e in ends], int(lab))
    blocks = ((lines[k][0], partial(rec, lines[k:k + 6])) for k in range(0, len(lines), 6))
    return list(_records(path, blocks))


def _piqa(task, paths):
    """PIQA: JSONL {goal, sol1, sol2} with a separate labels file, one 0/1 per line."""
    path, labels_path = paths
    items = list(_jsonl(path))
    labels = [(i, s.strip()) for i, s in _lines(labels_path) if s.strip()]
    if len(labels) != len(items):
        raise TaskError(f"{labels_path}: {len(labels)} labels for {len(items)} items "
                        f"in {path.name}")

    def rec(obj, lab):
        if lab not in ("0", "1"):
            raise _Bad(f"label {lab!r} outside 0..1")
        goal, sols = _text(obj, "goal"), [_text(obj, "sol1"), _text(obj, "sol2")]
        if not goal or not all(sols):
            raise _Bad("empty goal or solution")
        return ChoiceExample(task, prompt("goal", [("Goal", goal)]), sols, int(lab))
    pairs = ((i, partial(rec, o, lab)) for (i, o), (_, lab) in zip(items, labels))
    return list(_records(path, pairs))


_NO_SPACE_BEFORE = tuple(".,;:!?'’\")")


def _wino_example(task, context_options, continuation, gold):
    """Prompt = the sentence up to the blank; candidates = each option + the rest (module doc)."""
    if not (isinstance(context_options, list) and len(context_options) == 2
            and all(isinstance(c, str) and c.strip() for c in context_options)):
        raise _Bad("expected two non-empty context options")
    a, b = context_options
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    cut = a.rfind(" ", 0, i) + 1  # back to the start of the word where the options differ
    prefix, opts = a[:cut].strip(), [a[cut:].strip(), b[cut:].strip()]
    rest = continuation.strip()
    sep = "" if not rest or rest.startswith(_NO_SPACE_BEFORE) else " "
    cands = [o + sep + rest for o in opts]
    if cands[0] == cands[1]:
        raise _Bad("the two options give the same sentence")
    return ChoiceExample(task, prompt("continuation", [("Context", prefix)]), cands,
                         _index(gold, 2))


def _winogrande_official(task, paths):
    """Official WinoGrande JSONL: sentence with one "_", option1, option2, answer "1"/"2"."""
    path = paths[0]

    def rec(obj):
        s = _text(obj, "sentence")
        if s.count("_") != 1:
            raise _Bad(f"sentence has {s.count('_')} blanks '_', expected 1")
        ans = str(obj.get("answer", "")).strip()
        if ans not in ("1", "2"):
            raise _Bad(f"answer {ans!r} is not '1' or '2'")
        left, right = s.split("_")
        return _wino_example(task, [left + _text(obj, "option1"), left + _text(obj, "option2")],
                             right, int(ans) - 1)
    return list(_records(path, ((i, partial(rec, o)) for i, o in _jsonl(path))))


def _winogrande_mosaic(task, paths):
    """MosaicML WinoGrande: {"context_options": [2], "continuation", "gold"}."""
    path = paths[0]

    def rec(obj):
        return _wino_example(task, obj.get("context_options"), _text(obj, "continuation"),
                             obj.get("gold"))
    return list(_records(path, ((i, partial(rec, o)) for i, o in _jsonl(path))))


# ----------------------------------------------------------------------------------------------
# HH-RLHF (preference) and Alpaca (instruction)

_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def _transcript(text: str) -> list:
    """"\\n\\nHuman: ...\\n\\nAssistant: ..." -> [{"role": "user"|"assistant", "content"}, ...]."""
    parts = _TURN.split(text)
    if parts[0].strip():
        raise _Bad("transcript does not start with '\\n\\nHuman: '")
    return [{"role": "user" if parts[k] == "Human" else "assistant",
             "content": parts[k + 1].strip()} for k in range(1, len(parts), 2)]


def _hh(task, paths):
    """HH-RLHF: {"chosen", "rejected"} whole transcripts. The turns both share are the prompt;
    the final Assistant turns are chosen / rejected. Pairs that do not have that shape are
    skipped: the transcripts diverge before the last turn (or one has an extra turn), or a final
    turn is empty. In harmless-base/test that is 9 of 2,312 pairs (5 and 4). A few prompts hold
    two turns of one role in a row (4 there); they are kept as they are."""
    out = []
    for path in paths:
        def rec(obj):
            for key in ("chosen", "rejected"):
                if not isinstance(obj.get(key), str):
                    raise _Bad(f"missing key {key!r}" if key not in obj
                               else f"{key!r} is not a string")
            c, r = _transcript(obj["chosen"]), _transcript(obj["rejected"])
            if (len(c) < 2 or c[:-1] != r[:-1] or c[-1]["role"] != "assistant"
                    or r[-1]["role"] != "assistant" or c[-2]["role"] != "user"
                    or not c[-1]["content"] or not r[-1]["content"]):
                return None
            return PreferenceExample(task, _chat(c[:-1]), c[-1]["content"], r[-1]["content"])
        out += [ex for ex in _records(path, ((i, partial(rec, o)) for i, o in _jsonl(path))) if ex]
    return out


def _chat(turns: list) -> list:
    return [{"role": "system", "content": SYSTEM_PROMPTS["chat"]}] + turns


def _alpaca(task, paths, split="train", holdout=0.02):
    """Alpaca JSON array of {instruction, input, output}. Records with an empty output are
    skipped (2 of the 5,000 in shared/data: nothing to learn from). There is no official split:
    the last 2% of the rest are held out as validation (100 of 4,998)."""
    path = paths[0]
    data = _json(path)
    if not isinstance(data, list):
        raise TaskError(f"{path}: expected a JSON array of records")

    def rec(item):
        if not isinstance(item, dict):
            raise _Bad("record is not an object")
        instr, out = _text(item, "instruction"), _text(item, "output")
        inp = _text(item, "input") if "input" in item else ""
        if not instr:
            raise _Bad("empty instruction")
        if not out:
            return None
        user = instr + ("\n\n" + inp if inp else "")
        return InstructionExample(task, _chat([{"role": "user", "content": user}]), out)
    recs = ((f"item {k}", partial(rec, it)) for k, it in enumerate(data))
    exs = [ex for ex in _records(path, recs) if ex]
    if len(exs) < 2:
        raise TaskError(f"{path}: {len(exs)} usable record(s); need 2 to hold one out")
    n_val = max(1, round(holdout * len(exs)))
    return exs[-n_val:] if split == "validation" else exs[:-n_val]


# ----------------------------------------------------------------------------------------------
# The table: task -> split -> files to try, in order


@dataclass(frozen=True)
class Source:
    paths: tuple  # relative to data_dir; all must exist (a directory counts)
    read: Callable  # read(task, [absolute paths]) -> list of examples
    tag: str = "official"


def _src(read, *paths, tag="official"):
    return Source(tuple(paths), read, tag)


def _glue_sources():
    g, gp, ks = "glue/", "glue_pretrain", "kshot"
    t = {}

    def dev_train(read, folder):  # the plain GLUE layout: {train,dev}.tsv
        return {"train": [_src(read, f"{g}{folder}/train.tsv")],
                "validation": [_src(read, f"{g}{folder}/dev.tsv")]}

    def pretrain(folder, split):
        return _src(_glue_pretrain, f"{g}{folder}/glue_pretrain/{split}.json", tag=gp)

    t["glue/cola"] = dev_train(_glue_tsv([3], 1, header=False, ncols=4), "CoLA")
    t["glue/sst2"] = dev_train(_glue_tsv(["sentence"], "label"), "SST-2")
    mrpc = _glue_tsv(["#1 String", "#2 String"], "Quality")
    msr = (g + "MRPC/msr_paraphrase_train.txt", g + "MRPC/dev_ids.tsv")
    t["glue/mrpc"] = {
        "train": [_src(mrpc, g + "MRPC/train.tsv"), _src(_mrpc_raw(False), *msr, tag="msr")],
        "validation": [_src(mrpc, g + "MRPC/dev.tsv"), _src(_mrpc_raw(True), *msr, tag="msr")],
        # GLUE's test.tsv is unlabelled; MSR's own test file is the same 1,725 pairs with labels.
        "test": [_src(mrpc, g + "MRPC/msr_paraphrase_test.txt")],
    }
    # Where the official dev set is missing, glue_pretrain/dev.json stands in: 1,000 held-out
    # pairs of GLUE *train* (not GLUE dev), disjoint from glue_pretrain/train.json.
    qqp = _glue_tsv(["question1", "question2"], "is_duplicate")
    t["glue/qqp"] = {
        "train": [_src(qqp, g + "QQP/train.tsv"), pretrain("QQP", "train"),
                  _src(qqp, g + "QQP/k-shot/16-42/train.tsv", tag=ks)],
        "validation": [_src(qqp, g + "QQP/dev.tsv"), pretrain("QQP", "dev"),
                       _src(qqp, g + "QQP/k-shot/16-42/dev.tsv", tag=ks)],
    }
    t["glue/stsb"] = dev_train(_glue_tsv(["sentence1", "sentence2"], "score"), "STS-B")
    mnli = _glue_tsv(["sentence1", "sentence2"], "gold_label")
    t["glue/mnli"] = {
        "train": [_src(mnli, g + "MNLI/train.tsv"), pretrain("MNLI", "train"),
                  _src(mnli, g + "MNLI/k-shot/16-42/train.tsv", tag=ks)],
        "validation": [_src(mnli, g + "MNLI/dev_matched.tsv"), pretrain("MNLI", "dev"),
                       _src(mnli, g + "MNLI/k-shot/16-42/dev_matched.tsv", tag=ks)],
    }
    t["glue/mnli_mm"] = {
        "train": "glue/mnli_mm is MNLI's mismatched evaluation set; train on glue/mnli",
        # No stand-in: a sample of MNLI train is all matched genres; it cannot play mismatched.
        "validation": [_src(mnli, g + "MNLI/dev_mismatched.tsv")],
    }
    qnli = _glue_tsv(["question", "sentence"], "label")
    t["glue/qnli"] = {
        "train": [_src(qnli, g + "QNLI/train.tsv"), pretrain("QNLI", "train")],
        "validation": [_src(qnli, g + "QNLI/dev.tsv"), pretrain("QNLI", "dev")],
    }
    rte = _glue_tsv(["sentence1", "sentence2"], "label")
    # hf_export has Hugging Face's integer labels: 0 = entailment, 1 = not_entailment.
    rte_hf = _glue_tsv(["sentence1", "sentence2"], "label",
                       relabel={"0": "entailment", "1": "not_entailment"})
    t["glue/rte"] = {
        "train": [_src(rte, g + "RTE/train.tsv"),
                  _src(rte_hf, g + "RTE/hf_export/train.tsv", tag="hf_export")],
        "validation": [_src(rte, g + "RTE/dev.tsv")],
    }
    t["glue/wnli"] = dev_train(_glue_tsv(["sentence1", "sentence2"], "label"), "WNLI")
    for name in t:
        t[name].setdefault("test", "GLUE test labels are not public")
    return t


def _build_table():
    t = _glue_sources()
    race_roots = (("race/RACE", "official"), ("RACE", "official"), ("race", "flat"))
    for level in ("middle", "high"):
        t[f"race/{level}"] = {
            split: [_src(_race, f"{root}/{folder}/{level}", tag=tag) for root, tag in race_roots]
            for split, folder in (("train", "train"), ("validation", "dev"), ("test", "test"))}
    arc, mosaic, csvs = "arc/ARC-V1-Feb2018-2", "mosaicml", "arc/llmcbench_csv"
    for short, name, d, stem in (("easy", "ARC-Easy", "ARC-E", "arc_easy"),
                                 ("challenge", "ARC-Challenge", "ARC-C", "arc_challenge")):
        t[f"arc/{short}"] = {
            # LLMCBench's files are misnamed: *_dev.csv holds ARC Train, *_test.csv ARC Dev.
            "train": [_src(_ai2_jsonl, f"{arc}/{name}/{name}-Train.jsonl"),
                      _src(_arc_csv, f"{csvs}/{d}/dev/{stem}_dev.csv", tag="llmcbench")],
            "validation": [_src(_ai2_jsonl, f"{arc}/{name}/{name}-Dev.jsonl"),
                           _src(_arc_csv, f"{csvs}/{d}/test/{stem}_test.csv", tag="llmcbench")],
            "test": [_src(_ai2_jsonl, f"{arc}/{name}/{name}-Test.jsonl"),
                     _src(_mosaic_mc, f"arc/mosaicml_icl/{stem}.jsonl", tag=mosaic)],
        }
    obqa = "openbookqa/OpenBookQA-V1-Sep2018/Data/Main"
    t["openbookqa"] = {
        "train": [_src(_ai2_jsonl, f"{obqa}/train.jsonl")],
        "validation": [_src(_ai2_jsonl, f"{obqa}/dev.jsonl")],
        "test": [_src(_ai2_jsonl, f"{obqa}/test.jsonl"),
                 _src(_mosaic_mc, "openbookqa/mosaicml_icl/openbook_qa.jsonl", tag=mosaic)]}
    t["boolq"] = {
        "train": [_src(_boolq_official, "boolq/train.jsonl")],
        "validation": [_src(_boolq_official, "boolq/dev.jsonl"),
                       _src(_boolq_mosaic, "boolq/mosaicml_icl/boolq.jsonl", tag=mosaic)],
        "test": "BoolQ test labels are not public"}
    t["hellaswag"] = {
        "train": [_src(_hellaswag_official, "hellaswag/hellaswag_train.jsonl")],
        "validation": [_src(_hellaswag_official, "hellaswag/hellaswag_val.jsonl"),
                       _src(_hellaswag_klosax, "hellaswag/hellaswag_val_full.txt.bz2",
                            tag="klosax")],
        "test": "HellaSwag test labels are not public"}
    pz = "piqa/physicaliqa-train-dev"
    t["piqa"] = {
        "train": [_src(_piqa, f"{pz}/train.jsonl", f"{pz}/train-labels.lst"),
                  _src(_piqa, "piqa/train.jsonl", "piqa/train-labels.lst", tag="bisk")],
        "validation": [_src(_piqa, f"{pz}/dev.jsonl", f"{pz}/dev-labels.lst"),
                       _src(_piqa, "piqa/valid.jsonl", "piqa/valid-labels.lst", tag="bisk")],
        "test": "PIQA test labels are not public"}
    wg = "winogrande/winogrande_1.1"
    t["winogrande"] = {
        "train": [_src(_winogrande_official, f"{wg}/train_xl.jsonl")],
        "validation": [_src(_winogrande_official, f"{wg}/dev.jsonl"),
                       _src(_winogrande_mosaic, "winogrande/mosaicml_icl/winogrande.jsonl",
                            tag=mosaic)],
        "test": "WinoGrande test labels are not public"}
    return t


HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
TABLE = _build_table()


def _sources(task: str, split: str, source=None) -> list:
    if split not in SPLITS:
        raise TaskError(f"{task}: unknown split {split!r}; splits: {', '.join(SPLITS)}")
    entry = TABLE[task].get(split, f"{task} has no {split} split")
    if isinstance(entry, str):
        raise MissingSplit(f"{task}: no {split} split ({entry})")
    cands = [s for s in entry if source is None or s.tag == source]
    if not cands:
        tags = sorted({s.tag for s in entry})
        raise TaskError(f"{task} {split}: no source {source!r}; sources: {', '.join(tags)}")
    return cands


def _first_source(task: str, split: str, data_dir=None, source=None):
    dd = _data_dir(data_dir)
    tried = []
    for s in _sources(task, split, source):
        paths = [dd / p for p in s.paths]
        if all(p.exists() for p in paths):
            return s, paths
        tried += [str(p) for p in paths if not p.exists()]
    raise MissingSplit(f"{task} {split}: not found; tried {', '.join(tried)} "
                       f"(python -m tasks download --tasks {task} --data-dir {dd})")


def resolve_files(task: str, split: str, data_dir=None, source=None) -> list:
    """The files ``task``'s loader would read for ``split`` (the first source whose files all
    exist), or MissingSplit naming every path tried."""
    return _first_source(task, split, data_dir, source)[1]


def load_table(task, split, data_dir=None, seed=0, n=None, source=None, **_):
    """Loader for every task of TABLE: read the first available source of the split."""
    src, paths = _first_source(task, split, data_dir, source)
    exs = src.read(task, paths)
    if not exs:
        raise TaskError(f"{paths[0]}: no examples for {task} {split}")
    return _subsample(exs, n, seed)


def load_hh(split, data_dir=None, seed=0, n=None, subsets=HH_SUBSETS, **_):
    """HH-RLHF: every subset's {split}.jsonl.gz that is present (train / test only)."""
    if split not in ("train", "test"):
        raise MissingSplit(f"hh_rlhf: no {split} split (HH-RLHF has train and test)")
    dd = _data_dir(data_dir)
    paths = [dd / "hh_rlhf" / s / f"{split}.jsonl.gz" for s in subsets]
    found = [p for p in paths if p.exists()]
    if not found:
        raise MissingSplit(f"hh_rlhf {split}: not found; tried {', '.join(map(str, paths))} "
                           f"(python -m tasks download --tasks hh_rlhf --data-dir {dd})")
    exs = _hh("hh_rlhf", found)
    if not exs:
        raise TaskError(f"{found[0]}: no usable preference pairs")
    return _subsample(exs, n, seed)


def load_alpaca(split, data_dir=None, seed=0, n=None, **_):
    if split not in ("train", "validation"):
        raise MissingSplit(f"alpaca: no {split} split (train, and validation = the last 2%)")
    dd = _data_dir(data_dir)
    paths = [dd / "alpaca/alpaca_data.json", dd / "alpaca/alpaca_5000.json"]
    path = next((p for p in paths if p.exists()), None)
    if path is None:
        raise MissingSplit(f"alpaca {split}: not found; tried {', '.join(map(str, paths))} "
                           f"(python -m tasks download --tasks alpaca --data-dir {dd})")
    return _subsample(_alpaca("alpaca", [path], split), n, seed)


# ----------------------------------------------------------------------------------------------
# Specs and mixtures

_EVAL = {  # the split evaluate.py reports: test where labelled, else validation
    "glue/mrpc": "test", "race/middle": "test", "race/high": "test", "arc/easy": "test",
    "arc/challenge": "test", "openbookqa": "test",
}
_METRICS = {"glue/cola": ("mcc",), "glue/mrpc": ("f1", "acc"), "glue/qqp": ("f1", "acc"),
            "glue/stsb": ("pearson", "spearman")}
_DESCRIPTIONS = {
    "glue/cola": "CoLA acceptability (MCC); dev", "glue/sst2": "SST-2 sentiment; dev",
    "glue/mrpc": "MRPC paraphrase (F1, acc); MSR's labelled test",
    "glue/qqp": "QQP duplicate questions (F1, acc); dev, else 1k held out of train",
    "glue/stsb": "STS-B similarity as 6-way choice (Pearson, Spearman on the integer); dev",
    "glue/mnli": "MNLI matched; dev_matched, else 1k held out of train",
    "glue/mnli_mm": "MNLI mismatched; dev_mismatched (evaluation only)",
    "glue/qnli": "QNLI; dev", "glue/rte": "RTE; dev", "glue/wnli": "WNLI; dev. " + WNLI_NOTE,
    "race/middle": "RACE middle school; test", "race/high": "RACE high school; test",
    "arc/easy": "ARC-Easy; test", "arc/challenge": "ARC-Challenge; test",
    "openbookqa": "OpenBookQA; test",
    "boolq": "BoolQ; dev", "hellaswag": "HellaSwag; validation", "piqa": "PIQA; validation",
    "winogrande": "WinoGrande (option + rest of sentence); dev",
}


def _group(name):
    if name.startswith("glue/"):
        return "glue"
    return "race" if name.startswith("race/") else "gpt4all"


SPECS = [TaskSpec(name, "choice", partial(load_table, name),
                  metrics=_METRICS.get(name, ("acc",)),
                  eval_split=_EVAL.get(name, "validation"),
                  description=_DESCRIPTIONS[name], group=_group(name))
         for name in TABLE] + [
    TaskSpec("hh_rlhf", "preference", load_hh, metrics=("acc",), eval_split="test",
             description="Anthropic HH-RLHF pairs (reward accuracy); test",
             group="preference"),
    TaskSpec("alpaca", "instruction", load_alpaca, metrics=(),
             eval_split="validation",
             description="Stanford Alpaca instructions (SFT only); last 2% held out",
             group="instruction"),
]

GLUE_MIXTURE = ["glue/cola", "glue/sst2", "glue/mrpc", "glue/qqp", "glue/stsb", "glue/mnli",
                "glue/mnli_mm", "glue/qnli", "glue/rte"]  # no glue/wnli: see WNLI_NOTE
GPT4ALL_MIXTURE = ["hellaswag", "openbookqa", "winogrande", "arc/easy", "arc/challenge", "boolq",
                   "piqa"]
RACE_MIXTURE = ["race/middle", "race/high"]
MIXTURES = {
    "glue": GLUE_MIXTURE,
    "gpt4all": GPT4ALL_MIXTURE,
    "race": RACE_MIXTURE,
    "paper": GLUE_MIXTURE + RACE_MIXTURE + GPT4ALL_MIXTURE + ["hh_rlhf", "alpaca"],
}


# ----------------------------------------------------------------------------------------------
# User data: jsonl:path and text:path
#
#   choice:      {"prompt": str | "messages": [...], "candidates": [str, ...], "label": int}
#   preference:  {"prompt" | "messages", "chosen": str, "rejected": str}  (TRL explicit prompt)
#                {"chosen": [...], "rejected": [...]}  (TRL implicit prompt: two conversations
#                    that share every message but the last assistant turn; the shared messages
#                    are the prompt. UltraFeedback-binarized lines, which also carry "prompt",
#                    "messages" and scores, read this way: the answers are the LAST assistant
#                    turns, the prompt the user turn(s) before them)
#                {"prompt": [...], "chosen": [...], "rejected": [...]}  (TRL conversational
#                    explicit prompt: chosen / rejected each hold one assistant message)
#                {"system": str, "question": str, "chosen": str, "rejected": str}  (Orca-DPO-pairs;
#                    an empty system gets the default one)
#   instruction: {"prompt" | "messages", "response" | "completion": str}
# optional on any line: "system" (str), "split" ("train" | "validation" | "test"; default train).
# "messages" is a list of {"role": "system"|"user"|"assistant", "content": str} ending with a
# user turn; the default system prompt ("chat") is put first when there is none.

_KINDS = (("candidates", "choice"), ("chosen", "preference"), ("response", "instruction"),
          ("completion", "instruction"))
_ROLES = ("system", "user", "assistant")


def _system(obj) -> str:
    system = obj.get("system", SYSTEM_PROMPTS["chat"])
    if not isinstance(system, str):
        raise _Bad("'system' is not a string")
    return system


def _message_list(msgs, field: str) -> list:
    """Check a list of {"role", "content"} messages (the key `field` names it in errors); a
    system message may only come first. -> a copy holding just role and content."""
    if not isinstance(msgs, list) or not msgs:
        raise _Bad(f"{field!r} is not a non-empty list")
    out = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in _ROLES \
                or not isinstance(m.get("content"), str):
            raise _Bad(f"{field}[{k}] is not {{'role': system|user|assistant, 'content': str}}")
        if m["role"] == "system" and k:
            raise _Bad(f"{field}[{k}]: a system message can only come first")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _with_system(obj, msgs: list) -> list:
    """Prompt messages with a system message first: the record's own, else "system", else the
    default ("chat")."""
    system = _system(obj)
    return msgs if msgs[0]["role"] == "system" else [{"role": "system", "content": system}] + msgs


def _user_messages(obj) -> list:
    system = _system(obj)
    if ("prompt" in obj) == ("messages" in obj):
        raise _Bad("need exactly one of 'prompt' or 'messages'")
    if "prompt" in obj:
        text = _text(obj, "prompt")
        if not text:
            raise _Bad("empty prompt")
        return [{"role": "system", "content": system}, {"role": "user", "content": text}]
    out = _message_list(obj["messages"], "messages")
    if out[-1]["role"] != "user":
        raise _Bad("the last message must be the user's (the answer is the assistant's turn)")
    return _with_system(obj, out)


def _answers(obj, key: str) -> list:
    """The message list under "chosen" / "rejected", ending in an assistant turn."""
    if key not in obj:
        raise _Bad(f"missing key {key!r}")
    value = obj[key]
    if not isinstance(value, list) or not value:
        raise _Bad(f"{key!r}: expected a list of messages ending in an assistant turn")
    msgs = _message_list(value, key)
    if msgs[-1]["role"] != "assistant":
        raise _Bad(f"{key!r}: expected a list of messages ending in an assistant turn, "
                   f"got role {msgs[-1]['role']!r} last")
    return msgs


def _conversational_preference(obj):
    """-> (prompt messages, chosen, rejected) when "chosen" / "rejected" are message lists: TRL's
    conversational explicit prompt ("prompt" a list), else TRL's implicit prompt (the messages
    both share before their last assistant turn; UltraFeedback-binarized reads so)."""
    chosen, rejected = _answers(obj, "chosen"), _answers(obj, "rejected")
    if isinstance(obj.get("prompt"), list):
        if "messages" in obj:
            raise _Bad("need exactly one of 'prompt' or 'messages'")
        for key, msgs in (("chosen", chosen), ("rejected", rejected)):
            if len(msgs) != 1:
                raise _Bad(f"{key!r}: expected the one assistant message answering 'prompt', "
                           f"got {len(msgs)} messages")
        prompt = _message_list(obj["prompt"], "prompt")
        if prompt[-1]["role"] != "user":
            raise _Bad("'prompt': the last message must be the user's (the answer is the "
                       "assistant's turn)")
        return _with_system(obj, prompt), chosen[-1]["content"], rejected[-1]["content"]
    shared = chosen[:-1]
    if rejected[:-1] != shared:
        n = min(len(chosen), len(rejected)) - 1
        k = next((k for k in range(n) if chosen[k] != rejected[k]), n)
        raise _Bad(f"'rejected': message {k} differs from 'chosen'; the two must share every "
                   "message but the last assistant turn (the prompt)")
    if not shared:  # a lone assistant message each: the prompt is "prompt" (str) or "messages"
        return _user_messages(obj), chosen[-1]["content"], rejected[-1]["content"]
    if shared[-1]["role"] != "user":
        raise _Bad(f"'chosen': message {len(shared) - 1} (role {shared[-1]['role']!r}) comes "
                   "right before the answer; the shared prompt must end with the user's turn")
    return _with_system(obj, shared), chosen[-1]["content"], rejected[-1]["content"]


def _preference(task, obj) -> PreferenceExample:
    chosen = obj["chosen"]
    if isinstance(chosen, list):
        msgs, chosen, rejected = _conversational_preference(obj)
    elif isinstance(chosen, str):
        if "question" in obj and "prompt" not in obj and "messages" not in obj:  # Orca-DPO-pairs
            question = _text(obj, "question")
            if not question.strip():
                raise _Bad("empty 'question'")
            system = _system(obj) or SYSTEM_PROMPTS["chat"]
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        else:
            msgs = _user_messages(obj)
        chosen, rejected = chosen, _text(obj, "rejected")
    else:
        raise _Bad("'chosen' is not a string or a list of messages")
    ex = PreferenceExample(task, msgs, chosen, rejected)
    if not ex.chosen or not ex.rejected:
        raise _Bad("empty chosen or rejected answer")
    if ex.chosen.strip() == ex.rejected.strip():
        raise _Bad("chosen and rejected are the same answer")
    return ex


def _user_record(task, obj):
    """-> (kind, split, example) for one line of a user JSONL file."""
    kind = next((k for key, k in _KINDS if key in obj), None)
    if kind is None:
        raise _Bad("cannot tell the kind: expected 'candidates' + 'label', 'chosen' + 'rejected', "
                   "or 'response' (or 'completion')")
    split = obj.get("split", "train")
    if split not in SPLITS:
        raise _Bad(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if kind == "preference":
        return kind, split, _preference(task, obj)
    msgs = _user_messages(obj)
    if kind == "choice":
        cands = obj["candidates"]
        if (not isinstance(cands, list) or len(cands) < 2
                or not all(isinstance(c, str) and c.strip() for c in cands)):
            raise _Bad("'candidates' is not a list of two or more non-empty strings")
        if "label" not in obj:
            raise _Bad("missing key 'label'")
        dup = next(((i, j) for j in range(len(cands)) for i in range(j)
                    if cands[i].strip() == cands[j].strip()), None)
        if dup is not None:  # the same answer cannot be both gold and wrong
            raise _Bad(f"candidates {dup[0]} and {dup[1]} are the same answer {cands[dup[1]]!r}")
        ex = ChoiceExample(task, msgs, list(cands), _index(obj["label"], len(cands)))
    else:
        if "response" in obj and "completion" in obj:
            raise _Bad("need one of 'response' or 'completion', not both")
        key = "response" if "response" in obj else "completion"
        ex = InstructionExample(task, msgs, _text(obj, key))
        if not ex.answer:
            raise _Bad(f"empty {key}")
    return kind, split, ex


def _read_user_jsonl(task: str, path: Path):
    """-> (kind, {split: [examples]}); one kind per file."""
    if not path.is_file():
        raise TaskError(f"{path}: file not found")
    kind, first, by_split = None, None, {s: [] for s in SPLITS}
    for i, obj in _jsonl(path):
        try:
            k, split, ex = _user_record(task, obj)
        except _Bad as e:
            raise TaskError(f"{path}:{i}: {e}") from None
        if kind is None:
            kind, first = k, i
        elif k != kind:
            raise TaskError(f"{path}:{i}: a {k} record in a file of {kind} records (line {first}); "
                            "one kind per file")
        by_split[split].append(ex)
    if kind is None:
        raise TaskError(f"{path}: no records")
    return kind, by_split


def _load_user_jsonl(path, split, data_dir=None, seed=0, n=None, **_):
    task = f"jsonl:{path}"
    _, by_split = _read_user_jsonl(task, Path(path))
    if split not in SPLITS:
        raise TaskError(f"{task}: unknown split {split!r}")
    if not by_split[split]:
        have = [s for s in SPLITS if by_split[s]]
        raise MissingSplit(f"{path}: no {split} records (the file has {', '.join(have)}); "
                           f'mark lines with "split": "{split}"')
    return _subsample(by_split[split], n, seed)


def user_records(path: str):
    """(line number, object, kind, example) for each line of a user JSONL file, one line at a
    time (evaluate.py --score streams large files); unlike a jsonl: task, kinds may mix."""
    for i, obj in _jsonl(Path(path)):
        try:
            kind, _, ex = _user_record(f"jsonl:{path}", obj)
        except _Bad as e:
            raise TaskError(f"{path}:{i}: {e}") from None
        yield i, obj, kind, ex


def prompt_records(path: str):
    """(line number, object, messages) for each line of a JSONL file of prompts, {"prompt": str}
    or {"messages": [...]} (evaluate.py --generate-file); other keys are kept, not read."""
    for i, obj in _jsonl(Path(path)):
        try:
            yield i, obj, _user_messages(obj)
        except _Bad as e:
            raise TaskError(f"{path}:{i}: {e}") from None


@lru_cache(maxsize=None)
def jsonl_task(path: str) -> TaskSpec:
    """The spec of the task "jsonl:<path>", built once per path (the file is read and checked
    then); tasks.DYNAMIC["jsonl"] registers it."""
    name = f"jsonl:{path}"
    kind, by_split = _read_user_jsonl(name, Path(path))
    counts = ", ".join(f"{s} {len(v)}" for s, v in by_split.items() if v)
    eval_split = next((s for s in ("test", "validation") if by_split[s]), "train")
    note = "" if eval_split != "train" else "; no test/validation lines, so evaluation uses train"
    return TaskSpec(name, kind, partial(_load_user_jsonl, path),
                    metrics=("acc",) if kind in ("choice", "preference") else (),
                    eval_split=eval_split,
                    description=f"user {kind} data ({counts}){note}",
                    group="user")


TEXT_CHUNK = 2000  # characters per TextExample document, roughly
TEXT_HOLDOUT = 0.05  # last share of documents used as validation (= test)


def _pieces(par: str, target: int):
    """A paragraph, or pieces of it near `target` characters when it is much longer (a file with
    no blank lines would otherwise be one huge document). Cuts at line ends, then at spaces."""
    if len(par) <= 2 * target:
        yield par
        return
    buf = ""
    for line in par.split("\n"):
        while len(line) > 2 * target:
            cut = line.rfind(" ", 0, target)
            cut = cut if cut > 0 else target
            if buf:
                yield buf
                buf = ""
            yield line[:cut]
            line = line[cut:].lstrip()
        buf = f"{buf}\n{line}" if buf else line
        if len(buf) >= target:
            yield buf
            buf = ""
    if buf:
        yield buf


def _text_documents(path: Path, target: int = TEXT_CHUNK) -> list:
    if not path.is_file():
        raise TaskError(f"{path}: file not found")
    text = "\n".join(line for _, line in _lines(path))
    pars = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    docs, cur, size = [], [], 0
    for par in pars:
        for piece in _pieces(par, target):
            cur.append(piece)
            size += len(piece) + 2
            if size >= target:
                docs.append("\n\n".join(cur))
                cur, size = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    if len(docs) < 2:
        raise TaskError(f"{path}: {len(docs)} document(s) of ~{target} characters; need at least 2 "
                        "to hold one out for validation")
    return docs


def _load_text(path, split, data_dir=None, seed=0, n=None, **_):
    if split not in SPLITS:
        raise TaskError(f"text:{path}: unknown split {split!r}")
    docs = _text_documents(Path(path))
    n_val = max(1, round(TEXT_HOLDOUT * len(docs)))
    part = docs[:-n_val] if split == "train" else docs[-n_val:]
    return _subsample([TextExample(f"text:{path}", d) for d in part], n, seed)


@lru_cache(maxsize=None)
def text_task(path: str) -> TaskSpec:
    """The spec of the task "text:<path>", built once per path; tasks.DYNAMIC["text"] registers
    it. Plain text for LM pretraining, split into ~2,000-character documents at blank lines; the
    last 5% of documents are validation (and test)."""
    name = f"text:{path}"
    docs = _text_documents(Path(path))
    return TaskSpec(name, "text", partial(_load_text, path), metrics=(),
                    eval_split="validation",
                    description=f"plain text, {len(docs)} documents; "
                                "last 5% = validation",
                    group="user")


def _summary(data_dir=None) -> None:
    """Print, per task and split, the file read and the number of examples (or why not)."""
    for spec in SPECS:
        name = spec.name
        for split in SPLITS:
            try:
                exs = spec.load(split, data_dir=data_dir)
                where = resolve_files(name, split, data_dir)[0] if name in TABLE else ""
                print(f"{name:14s} {split:10s} {len(exs):7d}  {where}")
            except TaskError as e:
                print(f"{name:14s} {split:10s}       -  {e}")


if __name__ == "__main__":
    _summary()
