"""tasks/loaders.py: the real data copies (with DPH_DATA set), user JSONL / text, bad input, download.

    DPH_DATA=/work/shared/data python -m pytest -q tests/test_loaders.py

Without DPH_DATA the real-data tests skip; everything else runs on small files written here
(hand-made sentences, no dataset text) and a local HTTP server on 127.0.0.1.
"""
import csv
import gzip
import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest
import tasks  # noqa: E402
from tasks import download, loaders  # noqa: E402
from tasks import ChoiceExample, InstructionExample, PreferenceExample, TaskError, TextExample  # noqa: E402

DATA = os.environ.get("DPH_DATA")
needs_data = pytest.mark.skipif(not DATA, reason="DPH_DATA is not set (e.g. DPH_DATA=/work/shared/data): "
                                                 "real-data tests skipped")

# ----------------------------------------------------------------------------------------------
# Real data: row counts of shared/data/SOURCES.md, after mapping rows to examples.
#   (task, split, source or None, examples, candidates per example or None)

COUNTS = [
    ("glue/cola", "train", None, 8551, 2), ("glue/cola", "validation", None, 1043, 2),
    ("glue/sst2", "train", None, 67349, 2), ("glue/sst2", "validation", None, 872, 2),
    ("glue/mrpc", "train", None, 3668, 2), ("glue/mrpc", "validation", None, 408, 2),
    ("glue/mrpc", "test", None, 1725, 2),  # msr_paraphrase_test.txt, labelled
    ("glue/stsb", "train", None, 5749, 6), ("glue/stsb", "validation", None, 1500, 6),
    ("glue/qnli", "validation", "official", 5463, 2),
    ("glue/qnli", "train", "glue_pretrain", 8999, 2), ("glue/qnli", "validation", "glue_pretrain", 1000, 2),
    ("glue/rte", "validation", None, 277, 2), ("glue/rte", "train", "hf_export", 2490, 2),
    ("glue/mnli", "train", "kshot", 48, 3), ("glue/mnli", "validation", "kshot", 48, 3),
    ("glue/mnli", "train", "glue_pretrain", 8999, 3), ("glue/mnli", "validation", "glue_pretrain", 1000, 3),
    ("glue/qqp", "train", "kshot", 32, 2), ("glue/qqp", "validation", "kshot", 32, 2),
    ("glue/qqp", "train", "glue_pretrain", 8999, 2), ("glue/qqp", "validation", "glue_pretrain", 1000, 2),
    ("hellaswag", "validation", None, 10042, 4),
    ("piqa", "validation", None, 1838, 2),
    ("winogrande", "validation", None, 1267, 2),
    ("arc/easy", "test", "mosaicml", 2376, 4), ("arc/challenge", "test", "mosaicml", 1172, 4),
    # LLMCBench CSV: 2251 / 570 / 1119 / 299 rows minus the rows whose options were all lost
    # (102 / 21 / 23 / 4) and those whose gold was a lost 5th option "E" (2 / 0 / 0 / 1).
    ("arc/easy", "train", "llmcbench", 2251 - 104, None),
    ("arc/easy", "validation", "llmcbench", 570 - 21, None),
    ("arc/challenge", "train", "llmcbench", 1119 - 23, None),
    ("arc/challenge", "validation", "llmcbench", 299 - 5, None),
    ("openbookqa", "test", "mosaicml", 500, 4),
    ("boolq", "validation", None, 3270, 2),
    # 2312 pairs minus 9 whose transcripts diverge before the last turn or end in an empty turn
    ("hh_rlhf", "test", None, 2312 - 9, None),
    # 5000 records minus 2 with an empty output; the last 2% (100) are validation
    ("alpaca", "train", None, 4998 - 100, None), ("alpaca", "validation", None, 100, None),
]

# What the default lookup picks in shared/data, where the official files are missing.
DEFAULT_FILES = {
    ("glue/qqp", "validation"): "glue/QQP/glue_pretrain/dev.json",
    ("glue/mnli", "validation"): "glue/MNLI/glue_pretrain/dev.json",
    ("glue/qnli", "train"): "glue/QNLI/glue_pretrain/train.json",
    ("glue/rte", "train"): "glue/RTE/hf_export/train.tsv",
    ("arc/easy", "test"): "arc/mosaicml_icl/arc_easy.jsonl",
    ("hellaswag", "validation"): "hellaswag/hellaswag_val_full.txt.bz2",
}


def _load(task, split, source=None):
    return tasks.REGISTRY[task].load(split, data_dir=DATA, **({"source": source} if source else {}))


@needs_data
@pytest.mark.parametrize("task,split,source,count,k", COUNTS,
                         ids=[f"{t}-{s}-{src}" for t, s, src, *_ in COUNTS])
def test_real_counts_and_rendering(task, split, source, count, k):
    exs = _load(task, split, source)
    assert len(exs) == count
    kind = tasks.REGISTRY[task].kind
    for ex in exs[:: max(1, len(exs) // 25)]:  # a spread-out sample of ~25
        assert ex.kind == kind and ex.task == task
        msgs = ex.messages
        assert msgs[0]["role"] == "system" and msgs[-1]["role"] == "user"
        assert all(m["content"] for m in msgs)
        if kind == "choice":
            assert len(msgs) == 2 and msgs[1]["content"].endswith("\nAnswer:")
            assert 0 <= ex.label < len(ex.candidates)
            assert all(c.strip() == c and c for c in ex.candidates)
            assert len(set(ex.candidates)) == len(ex.candidates)
            if k is not None:
                assert len(ex.candidates) == k
            else:
                assert 3 <= len(ex.candidates) <= 5
        elif kind == "preference":
            assert ex.chosen and ex.rejected and ex.chosen != ex.rejected
        else:
            assert ex.answer


@needs_data
def test_real_default_files():
    for (task, split), rel in DEFAULT_FILES.items():
        assert loaders.resolve_files(task, split, DATA)[0] == Path(DATA) / rel


@needs_data
def test_real_missing_splits_say_why():
    with pytest.raises(loaders.MissingSplit, match="not public"):
        _load("glue/cola", "test")
    with pytest.raises(loaders.MissingSplit, match="glue/mnli"):
        _load("glue/mnli_mm", "train")
    with pytest.raises(loaders.MissingSplit, match=r"tried .*hellaswag_train\.jsonl"):
        _load("hellaswag", "train")
    with pytest.raises(loaders.MissingSplit, match="dev_mismatched"):
        _load("glue/mnli_mm", "validation")


@needs_data
def test_real_labels_and_values():
    # STS-B: label = score rounded half up, value = the score itself
    for ex in _load("glue/stsb", "validation"):
        assert ex.label == int(ex.value + 0.5) and 0 <= ex.value <= 5
    # RTE hf_export: HF's 0 = entailment must become our 0 ("yes"). The file has 1249 zeros and
    # 1241 ones, so a flipped mapping would show.
    with open(Path(DATA) / "glue/RTE/hf_export/train.tsv", encoding="utf-8") as f:
        raw = [line.rstrip("\n").split("\t")[2] for line in f][1:]
    exs = _load("glue/rte", "train")
    assert [ex.label for ex in exs] == [int(r) for r in raw]
    assert exs[0].candidates == ["yes", "no"]
    # MNLI: all three classes present, verbalised True / Neither / False
    assert {ex.label for ex in _load("glue/mnli", "validation")} == {0, 1, 2}


@needs_data
def test_real_arc_csv_drops_only_lost_rows():
    path = Path(DATA) / "arc/llmcbench_csv/ARC-E/dev/arc_easy_dev.csv"
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    lost = [r for r in rows if not any(o.strip() for o in r[1:5]) or r[5] == "E"]
    assert len(rows) - len(lost) == len(_load("arc/easy", "train", "llmcbench"))


@needs_data
def test_real_winogrande_rebuilds_the_sentence():
    # prompt prefix + gold candidate = the MosaicML context option + continuation
    path = Path(DATA) / "winogrande/mosaicml_icl/winogrande.jsonl"
    raw = [json.loads(line) for line in open(path, encoding="utf-8")]
    for ex, r in zip(_load("winogrande", "validation"), raw):
        prefix = ex.messages[1]["content"][len("Context: "):-len("\nAnswer:")]
        rest = r["continuation"].strip()
        sep = "" if rest.startswith(loaders._NO_SPACE_BEFORE) else " "
        rebuilt = f"{r['context_options'][r['gold']]}{sep}{rest}"
        # compared word by word: a few sentences have double spaces
        assert f"{prefix} {ex.candidates[ex.label]}".split() == rebuilt.split()
        assert ex.label == r["gold"]


@needs_data
def test_real_mrpc_dev_ids_match_dev():
    ids = {tuple(line.split()) for line in open(Path(DATA) / "glue/MRPC/dev_ids.tsv")}
    assert len(ids) == 408
    with open(Path(DATA) / "glue/MRPC/dev.tsv", encoding="utf-8-sig") as f:
        dev = {tuple(line.split("\t")[1:3]) for line in f.read().splitlines()[1:]}
    assert dev == ids


@needs_data
def test_real_subsample_is_seeded_and_ordered():
    a = tasks.REGISTRY["glue/cola"].load("validation", data_dir=DATA, n=50, seed=1)
    b = tasks.REGISTRY["glue/cola"].load("validation", data_dir=DATA, n=50, seed=1)
    c = tasks.REGISTRY["glue/cola"].load("validation", data_dir=DATA, n=50, seed=2)
    full = tasks.REGISTRY["glue/cola"].load("validation", data_dir=DATA)
    assert a == b and a != c and len(a) == 50
    pos = [full.index(ex) for ex in a]
    assert pos == sorted(pos)


# ----------------------------------------------------------------------------------------------
# Registry, mixtures


def test_registry_and_mixtures():
    assert tasks.MIXTURES["glue"] == ["glue/cola", "glue/sst2", "glue/mrpc", "glue/qqp", "glue/stsb",
                                      "glue/mnli", "glue/mnli_mm", "glue/qnli", "glue/rte"]
    assert "glue/wnli" in tasks.REGISTRY and all("glue/wnli" not in m for m in tasks.MIXTURES.values())
    assert tasks.MIXTURES["gpt4all"] == ["hellaswag", "openbookqa", "winogrande", "arc/easy",
                                         "arc/challenge", "boolq", "piqa"]
    assert tasks.MIXTURES["race"] == ["race/middle", "race/high"]
    paper = tasks.MIXTURES["paper"]
    assert len(paper) == len(set(paper)) == 9 + 2 + 7 + 2 and paper[-2:] == ["hh_rlhf", "alpaca"]
    for name in paper:
        spec = tasks.REGISTRY[name]
        assert spec.eval_split in tasks.SPLITS
    assert tasks.REGISTRY["glue/mrpc"].metrics == ("f1", "acc")
    assert tasks.REGISTRY["glue/stsb"].metrics == ("pearson", "spearman")
    assert tasks.REGISTRY["glue/cola"].metrics == ("mcc",)
    R = tasks.REGISTRY
    assert R["glue/mrpc"].eval_split == "test" and R["boolq"].eval_split == "validation"
    assert R["hh_rlhf"].kind == "preference" and R["alpaca"].kind == "instruction"


def test_registry_is_built_from_the_spec_lists():
    """The registry is the suite's and the readers' plain spec lists; importing a reader module
    (in a fresh interpreter) loads no registry and registers nothing."""
    from tasks import registry, suite
    assert list(tasks.REGISTRY)[:len(suite.SPECS) + len(loaders.SPECS)] == \
        [s.name for s in suite.SPECS + loaders.SPECS]
    assert all(tasks.REGISTRY[s.name] is s for s in suite.SPECS + loaders.SPECS)
    assert tasks.MIXTURES == {**suite.MIXTURES, **loaders.MIXTURES} and registry.MIXTURES is tasks.MIXTURES
    assert set(tasks.DYNAMIC) == {"jsonl", "text"}
    code = ("import sys, tasks.types, tasks.suite, tasks.loaders, tasks.download, tasks.metrics; "
            "print(sorted(m for m in sys.modules if m.startswith('tasks')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == ("['tasks', 'tasks.download', 'tasks.loaders', 'tasks.metrics', "
                           "'tasks.suite', 'tasks.types']")


def test_no_data_dir(monkeypatch):
    monkeypatch.delenv("DPH_DATA", raising=False)
    with pytest.raises(TaskError, match="DPH_DATA"):
        tasks.REGISTRY["glue/sst2"].load("train")


# ----------------------------------------------------------------------------------------------
# Formats on small hand-made files


def write(path: Path, text: str, enc="utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=enc)
    return path


def jsonl(path: Path, rows) -> Path:
    return write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_glue_tsv_quoting_bom_and_errors(tmp_path):
    # MRPC layout: BOM, header, a field opening with a bare quote (must stay literal)
    write(tmp_path / "glue/MRPC/train.tsv",
          "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
          '1\t1\t2\t"The cat sat, he said.\tA cat sat.\n'
          "0\t3\t4\tBlue skies.\tGrey skies.\n")
    exs = tasks.REGISTRY["glue/mrpc"].load("train", data_dir=tmp_path)
    assert [ex.label for ex in exs] == [1, 0]
    assert exs[0].messages[1]["content"] == ('Sentence 1: "The cat sat, he said.\n'
                                             "Sentence 2: A cat sat.\nAnswer:")
    assert exs[0].candidates == ["no", "yes"]
    # wrong column count -> file:line
    write(tmp_path / "glue/SST-2/train.tsv", "sentence\tlabel\na fine film \t1\nno tab here\n")
    with pytest.raises(TaskError, match=r"SST-2/train\.tsv:3: expected 2 tab-separated columns, got 1$"):
        tasks.REGISTRY["glue/sst2"].load("train", data_dir=tmp_path)
    # label out of range
    write(tmp_path / "glue/SST-2/train.tsv", "sentence\tlabel\na fine film \t1\na dull one \t7\n")
    with pytest.raises(TaskError, match=r"train\.tsv:3: label '7' is not one of '0', '1'"):
        tasks.REGISTRY["glue/sst2"].load("train", data_dir=tmp_path)
    # header without the needed column
    write(tmp_path / "glue/SST-2/train.tsv", "text\tlabel\na fine film\t1\n")
    with pytest.raises(TaskError, match=r"train\.tsv:1: header lacks column\(s\) sentence"):
        tasks.REGISTRY["glue/sst2"].load("train", data_dir=tmp_path)
    # STS-B score out of range; CoLA (no header)
    head = "index\tsentence1\tsentence2\tscore\n"
    write(tmp_path / "glue/STS-B/dev.tsv", head + "0\ta\tb\t2.5\n1\tc\td\t5.5\n")
    with pytest.raises(TaskError, match=r"dev\.tsv:3: score 5.5 outside 0..5"):
        tasks.REGISTRY["glue/stsb"].load("validation", data_dir=tmp_path)
    write(tmp_path / "glue/STS-B/dev.tsv", head + "0\ta\tb\t2.5\n")
    ex = tasks.REGISTRY["glue/stsb"].load("validation", data_dir=tmp_path)[0]
    assert (ex.label, ex.value, len(ex.candidates)) == (3, 2.5, 6)  # half up, not banker's 2
    write(tmp_path / "glue/CoLA/dev.tsv", "src\t0\t*\tThem is here.\nsrc\t1\t\tThey are here.\n")
    assert [e.label for e in tasks.REGISTRY["glue/cola"].load("validation", data_dir=tmp_path)] == [0, 1]


def test_mrpc_built_from_msr_files(tmp_path):
    head = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    write(tmp_path / "glue/MRPC/msr_paraphrase_train.txt",
          head + "1\t1\t2\tOne.\tUno.\n0\t3\t4\tTwo.\tDos.\n1\t5\t6\tThree.\tTres.\n")
    write(tmp_path / "glue/MRPC/dev_ids.tsv", "3\t4\n")
    train = tasks.REGISTRY["glue/mrpc"].load("train", data_dir=tmp_path)
    dev = tasks.REGISTRY["glue/mrpc"].load("validation", data_dir=tmp_path)
    assert [e.label for e in train] == [1, 1] and [e.label for e in dev] == [0]


def test_glue_pretrain_json_and_mnli_kshot(tmp_path):
    write(tmp_path / "glue/MNLI/glue_pretrain/train.json", json.dumps({
        "0": {"text_a": "A dog runs.", "text_b": "An animal moves.", "label": "entailment"},
        "1": {"text_a": "A dog runs.", "text_b": "A cat sleeps.", "label": "neutral"},
        "2": {"text_a": "A dog runs.", "text_b": "Nothing moves.", "label": "contradiction"}}, indent=1))
    exs = tasks.REGISTRY["glue/mnli"].load("train", data_dir=tmp_path)
    assert [e.label for e in exs] == [0, 1, 2] and exs[0].candidates == ["True", "Neither", "False"]
    write(tmp_path / "glue/MNLI/glue_pretrain/train.json",
          json.dumps({"0": {"text_a": "x", "text_b": "y", "label": "maybe"}}))
    with pytest.raises(TaskError, match="train.json:item 0: label 'maybe'"):
        tasks.REGISTRY["glue/mnli"].load("train", data_dir=tmp_path)
    write(tmp_path / "glue/MNLI/glue_pretrain/train.json", '{"0": {"text_a": "x",\n "text_b": }}')
    with pytest.raises(TaskError, match=r"train\.json:2: bad JSON"):
        tasks.REGISTRY["glue/mnli"].load("train", data_dir=tmp_path)
    cols = ["index", "promptID", "pairID", "genre", "s1b", "s2b", "s1p", "s2p", "sentence1", "sentence2",
            "label1", "gold_label"]
    row = ["0", "1", "1e", "fiction", "(", "(", "(", "(", "Rain fell.", "It was wet.", "entailment",
           "entailment"]
    write(tmp_path / "glue/MNLI/k-shot/16-42/train.tsv", "\t".join(cols) + "\n" + "\t".join(row) + "\n")
    (ex,) = tasks.REGISTRY["glue/mnli"].load("train", data_dir=tmp_path, source="kshot")
    assert ex.messages[1]["content"] == "Premise: Rain fell.\nHypothesis: It was wet.\nAnswer:"
    assert ex.label == 0
    with pytest.raises(TaskError, match="no source 'nope'"):
        tasks.REGISTRY["glue/mnli"].load("train", data_dir=tmp_path, source="nope")


def _race_doc(article, qs, opts, answers):
    return json.dumps({"article": article, "questions": qs, "options": opts, "answers": answers, "id": "x"})


def test_race_tree(tmp_path):
    d = tmp_path / "race/RACE/test/middle"
    write(d / "10.txt", _race_doc("Tom has a red kite.", ["What colour?"],
                                  [["red", "blue", "green", "pink"]], ["A"]))
    write(d / "2.txt", _race_doc("Ann can swim.", ["Who swims?", "Can she?"],
                                 [["Ann", "Bo", "Cy", "Di"], ["no", "yes", "maybe", "never"]], ["A", "B"]))
    exs = tasks.REGISTRY["race/middle"].load("test", data_dir=tmp_path)
    assert [e.label for e in exs] == [0, 1, 0]  # 2.txt before 10.txt
    assert exs[0].candidates == ["A. Ann", "B. Bo", "C. Cy", "D. Di"]
    assert exs[0].messages[1]["content"] == ("Passage: Ann can swim.\nQuestion: Who swims?\n"
                                             "Choices:\nA. Ann\nB. Bo\nC. Cy\nD. Di\nAnswer:")
    write(d / "2.txt", _race_doc("Ann can swim.", ["Who swims?"], [["Ann", "Bo", "Cy", "Di"]], ["F"]))
    with pytest.raises(TaskError, match=r"2\.txt:1: label 5 outside 0..3"):
        tasks.REGISTRY["race/middle"].load("test", data_dir=tmp_path)


def test_arc_formats_agree(tmp_path):
    q, opts = "Which one is a liquid?", ["ice", "water", "steam", "sand"]
    choices = [{"label": L, "text": t} for L, t in zip("1234", opts)]
    jsonl(tmp_path / "arc/ARC-V1-Feb2018-2/ARC-Easy/ARC-Easy-Test.jsonl",
          [{"id": "q1", "question": {"stem": q, "choices": choices}, "answerKey": "2"}])
    jsonl(tmp_path / "arc/mosaicml_icl/arc_easy.jsonl",
          [{"query": "Question: " + q, "choices": opts, "gold": 1}])
    write(tmp_path / "arc/llmcbench_csv/ARC-E/dev/arc_easy_dev.csv",
          f'"{q}",{",".join(opts)},B\n"Pick a colour.",red,blue,green,,C\n'
          '"Lost options.",,,,,3\n"Five.",a,b,c,d,E\n')
    spec = tasks.REGISTRY["arc/easy"]
    a = spec.load("test", data_dir=tmp_path)
    b = spec.load("test", data_dir=tmp_path, source="mosaicml")
    c = spec.load("train", data_dir=tmp_path)
    assert a == b and a[0] == c[0] and a[0].label == 1
    assert c[1].candidates == ["A. red", "B. blue", "C. green"] and c[1].label == 2  # empty D dropped
    assert len(c) == 2  # the row with no options and the row whose gold "E" was lost are dropped


def test_boolq_formats_agree(tmp_path):
    passage, question = "Owls hunt at night and sleep in the day.", "do owls hunt at night"
    jsonl(tmp_path / "boolq/dev.jsonl",
          [{"question": question, "title": "Owl", "answer": True, "passage": passage}])
    jsonl(tmp_path / "boolq/mosaicml_icl/boolq.jsonl",
          [{"query": f"Passage: {passage}\nQuestion: {question}?", "choices": ["no", "yes"], "gold": 1}])
    a = tasks.REGISTRY["boolq"].load("validation", data_dir=tmp_path)
    b = tasks.REGISTRY["boolq"].load("validation", data_dir=tmp_path, source="mosaicml")
    assert a == b and a[0].candidates == ["no", "yes"] and a[0].label == 1
    assert a[0].messages[1]["content"] == f"Passage: {passage}\nQuestion: {question}?\nAnswer:"


def test_hellaswag_formats_agree(tmp_path):
    item = {"activity_label": "Baking", "ctx": "A man [header] mixes flour. He", "label": 2,
            "endings": ["sings.", "flies away.", "adds water [title] slowly.", "sleeps."]}
    jsonl(tmp_path / "hellaswag/hellaswag_val.jsonl", [item])
    lines = ["Baking: A man mixes flour. He", "2", "sings.", "flies away.", "adds water. slowly.",
             "sleeps."]
    raw = ("\n".join(lines) + "\n").encode()
    import bz2
    (tmp_path / "hellaswag/hellaswag_val_full.txt.bz2").write_bytes(bz2.compress(raw))
    a = tasks.REGISTRY["hellaswag"].load("validation", data_dir=tmp_path)
    b = tasks.REGISTRY["hellaswag"].load("validation", data_dir=tmp_path, source="klosax")
    assert a == b and len(a[0].candidates) == 4 and a[0].label == 2
    (tmp_path / "hellaswag/hellaswag_val_full.txt.bz2").write_bytes(bz2.compress(raw + b"Next: one\n0\n"))
    with pytest.raises(TaskError, match=r"hellaswag_val_full\.txt\.bz2:8: truncated item"):
        tasks.REGISTRY["hellaswag"].load("validation", data_dir=tmp_path, source="klosax")


def test_piqa_labels_file(tmp_path):
    jsonl(tmp_path / "piqa/valid.jsonl", [{"goal": "Dry a wet shirt.", "sol1": "Hang it in the sun.",
                                           "sol2": "Put it in the freezer."}] * 2)
    write(tmp_path / "piqa/valid-labels.lst", "0\n1\n")
    exs = tasks.REGISTRY["piqa"].load("validation", data_dir=tmp_path)
    assert [e.label for e in exs] == [0, 1] and exs[0].candidates[0] == "Hang it in the sun."
    assert exs[0].messages[1]["content"] == "Goal: Dry a wet shirt.\nAnswer:"
    write(tmp_path / "piqa/valid-labels.lst", "0\n")
    with pytest.raises(TaskError, match="1 labels for 2 items"):
        tasks.REGISTRY["piqa"].load("validation", data_dir=tmp_path)
    write(tmp_path / "piqa/valid-labels.lst", "0\n2\n")
    with pytest.raises(TaskError, match=r"valid\.jsonl:2: label '2' outside 0..1"):
        tasks.REGISTRY["piqa"].load("validation", data_dir=tmp_path)


def test_winogrande_formats_agree(tmp_path):
    rows = [("The vase fell off the shelf because the _ was wobbly.", "vase", "shelf", "2"),
            ("Kim lent Kevin a pen since _ had two.", "Kim", "Kevin", "1"),
            ("Ray bought the tall ladder, not the short one, since the _.", "tall one", "short one", "1")]
    jsonl(tmp_path / "winogrande/winogrande_1.1/dev.jsonl",
          [{"qID": str(i), "sentence": s, "option1": o1, "option2": o2, "answer": a}
           for i, (s, o1, o2, a) in enumerate(rows)])
    mosaic = []
    for s, o1, o2, a in rows:
        left, right = s.split("_")
        mosaic.append({"context_options": [left + o1, left + o2], "continuation": right.strip(),
                       "gold": int(a) - 1})
    jsonl(tmp_path / "winogrande/mosaicml_icl/winogrande.jsonl", mosaic)
    a = tasks.REGISTRY["winogrande"].load("validation", data_dir=tmp_path)
    b = tasks.REGISTRY["winogrande"].load("validation", data_dir=tmp_path, source="mosaicml")
    assert a == b
    assert a[0].messages[1]["content"] == "Context: The vase fell off the shelf because the\nAnswer:"
    assert a[0].candidates == ["vase was wobbly.", "shelf was wobbly."] and a[0].label == 1
    # options sharing a first letter are cut back to the word boundary
    assert a[1].candidates == ["Kim had two.", "Kevin had two."]
    # options sharing a first word keep it in the prompt; no space before a final "."
    assert a[2].messages[1]["content"] == ("Context: Ray bought the tall ladder, not the short one, "
                                           "since the\nAnswer:")
    assert a[2].candidates == ["tall one.", "short one."]


def test_hh_transcripts(tmp_path):
    def t(*turns):
        return "".join(f"\n\n{r}: {c}" for r, c in turns)
    shared = (("Human", "Hi"), ("Assistant", "Hello!"), ("Human", "Tell me a joke"))
    ok = {"chosen": t(*shared, ("Assistant", "A pun.")), "rejected": t(*shared, ("Assistant", "No."))}
    diverged = {"chosen": t(("Human", "Hi"), ("Assistant", "Yo")),
                "rejected": t(("Human", "Hey"), ("Assistant", "Yo!"))}
    empty = {"chosen": t(("Human", "Hi"), ("Assistant", "")),
             "rejected": t(("Human", "Hi"), ("Assistant", "Hey"))}
    p = tmp_path / "hh_rlhf/harmless-base/test.jsonl.gz"
    p.parent.mkdir(parents=True)
    with gzip.open(p, "wt", encoding="utf-8") as f:
        for r in (ok, diverged, empty):
            f.write(json.dumps(r) + "\n")
    (ex,) = tasks.REGISTRY["hh_rlhf"].load("test", data_dir=tmp_path)
    assert isinstance(ex, PreferenceExample) and (ex.chosen, ex.rejected) == ("A pun.", "No.")
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant", "user"]
    assert ex.messages[-1]["content"] == "Tell me a joke"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"chosen": "Human: no leading blank line", "rejected": "x"}) + "\n")
    with pytest.raises(TaskError, match=r"test\.jsonl\.gz:1: transcript does not start"):
        tasks.REGISTRY["hh_rlhf"].load("test", data_dir=tmp_path)
    with pytest.raises(loaders.MissingSplit, match="train and test"):
        tasks.REGISTRY["hh_rlhf"].load("validation", data_dir=tmp_path)


def test_alpaca(tmp_path):
    recs = [{"instruction": f"Say {i}.", "input": "" if i % 2 else "loudly", "output": str(i)}
            for i in range(60)]
    recs.append({"instruction": "Say nothing.", "input": "", "output": ""})  # skipped
    write(tmp_path / "alpaca/alpaca_data.json", json.dumps(recs))
    tr = tasks.REGISTRY["alpaca"].load("train", data_dir=tmp_path)
    va = tasks.REGISTRY["alpaca"].load("validation", data_dir=tmp_path)
    assert len(tr) == 59 and len(va) == 1 and va[0].answer == "59"  # round(0.02 · 60) = 1 held out
    assert isinstance(tr[0], InstructionExample) and tr[0].messages[1]["content"] == "Say 0.\n\nloudly"
    assert tr[1].messages[1]["content"] == "Say 1."
    write(tmp_path / "alpaca/alpaca_data.json", json.dumps([{"instruction": "Hi"}]))
    with pytest.raises(TaskError, match=r"alpaca_data\.json:item 0: missing key 'output'"):
        tasks.REGISTRY["alpaca"].load("train", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------
# User JSONL and plain text


def test_jsonl_choice_task(tmp_path):
    p = jsonl(tmp_path / "mine.jsonl", [
        {"prompt": "Is fire hot?", "candidates": ["no", "yes"], "label": 1},
        {"messages": [{"role": "user", "content": "Two plus two?"}], "candidates": ["3", "4", "5"],
         "label": 1},
        "",
        {"prompt": "Is ice cold?", "candidates": ["no", "yes"], "label": 1, "split": "test",
         "system": "Answer briefly."},
    ])
    spec = tasks.resolve_tasks(f"jsonl:{p}")[0]
    assert spec.name == f"jsonl:{p}" and spec.kind == "choice" and spec.eval_split == "test"
    assert loaders.jsonl_task(str(p)) is spec  # registered once
    train = spec.load("train")
    assert len(train) == 2 and all(isinstance(e, ChoiceExample) for e in train)
    assert train[0].messages == [{"role": "system", "content": tasks.SYSTEM_PROMPTS["chat"]},
                                 {"role": "user", "content": "Is fire hot?"}]
    assert train[1].messages[0]["role"] == "system" and train[1].candidates == ["3", "4", "5"]
    (test,) = spec.load("test")
    assert test.messages[0]["content"] == "Answer briefly."
    with pytest.raises(loaders.MissingSplit, match="no validation records"):
        spec.load("validation")


def test_jsonl_preference_and_instruction_fallback(tmp_path):
    p = jsonl(tmp_path / "pref.jsonl",
              [{"prompt": "Greet me.", "chosen": "Hello!", "rejected": "Go away."}])
    spec = loaders.jsonl_task(str(p))
    assert spec.kind == "preference" and spec.eval_split == "train"
    assert "evaluation uses train" in spec.description
    (ex,) = spec.load("train")
    assert (ex.chosen, ex.rejected) == ("Hello!", "Go away.")
    q = jsonl(tmp_path / "inst.jsonl",
              [{"prompt": "Name a colour.", "response": "Red.", "split": "validation"},
               {"prompt": "Name a fruit.", "response": "Pear."}])
    spec = loaders.jsonl_task(str(q))
    assert spec.kind == "instruction" and spec.eval_split == "validation" and spec.metrics == ()
    assert spec.load("validation")[0].answer == "Red."


@pytest.mark.parametrize("rows,msg", [
    (['{"prompt": "a", "candidates": ["x", "y"], "label": 0}', "{not json"], r":2: bad JSON"),
    ([{"prompt": "a", "candidates": ["w", "x", "y", "z"], "label": 4}], r":1: label 4 outside 0..3$"),
    ([{"prompt": "a", "candidates": ["x", "y"]}], r":1: missing key 'label'"),
    ([{"prompt": "a", "candidates": ["x", "y"], "label": 0}, {"prompt": "b", "response": "r"}],
     r":2: a instruction record in a file of choice records \(line 1\)"),
    ([{"prompt": "a", "label": 0}], r":1: cannot tell the kind"),
    ([{"candidates": ["x", "y"], "label": 0}], r":1: need exactly one of 'prompt' or 'messages'"),
    ([{"prompt": "a", "response": "r", "split": "dev"}], r":1: split 'dev' is not one of"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
       "response": "r"}], r":1: the last message must be the user's"),
    ([{"prompt": "a", "candidates": ["x", "y"], "label": True}], r":1: label True is not an integer"),
    ([], r": no records$"),
])
def test_jsonl_bad_input(tmp_path, rows, msg):
    p = jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(TaskError, match=msg) as e:
        loaders.jsonl_task(str(p))
    assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(TaskError, match="nope.jsonl: file not found"):
        tasks.resolve_tasks(f"jsonl:{tmp_path / 'nope.jsonl'}")


def test_text_task(tmp_path):
    pars = [f"Paragraph {i}. " + "word " * 60 for i in range(200)]  # ~320 characters each
    p = write(tmp_path / "corpus.txt", "\n\n".join(pars) + "\n")
    spec = tasks.resolve_tasks(f"text:{p}")[0]
    assert spec.kind == "text" and spec.eval_split == "validation"
    train, val, test = (spec.load(s) for s in ("train", "validation", "test"))
    docs = train + val
    assert all(isinstance(d, TextExample) for d in docs) and val == test
    assert len(val) == max(1, round(0.05 * len(docs)))
    assert all(1900 <= len(d.text) <= 2600 for d in docs[:-1])  # ~2,000 characters, whole paragraphs
    assert "\n\n".join(d.text for d in docs) == "\n\n".join(pars)  # nothing lost, in order
    # a file without blank lines is still cut into documents
    q = write(tmp_path / "lines.txt", "\n".join("line %d %s" % (i, "x" * 50) for i in range(2000)))
    docs = loaders.text_task(str(q)).load("train")
    assert len(docs) > 40 and max(len(d.text) for d in docs) <= 4000
    with pytest.raises(TaskError, match="need at least 2"):
        loaders.text_task(str(write(tmp_path / "tiny.txt", "Just one short paragraph.")))


# ----------------------------------------------------------------------------------------------
# Download against a local server


class _Quiet(http.server.SimpleHTTPRequestHandler):
    hits = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        _Quiet.hits.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    th = threading.Thread(target=httpd.serve_forever, daemon=True)
    th.start()
    _Quiet.hits = []
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _sst2_zip(root: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("SST-2/train.tsv", "sentence\tlabel\na warm film \t1\na cold film \t0\nfine \t1\n")
        z.writestr("SST-2/dev.tsv", "sentence\tlabel\nlovely \t1\n")
        z.writestr("__MACOSX/SST-2/._train.tsv", "junk")
    data = buf.getvalue()
    write(root / "glue/data/SST-2.zip", "")
    (root / "glue/data/SST-2.zip").write_bytes(data)
    return data


def _race_tgz(root: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for split in ("train", "dev", "test"):
            for level in ("middle", "high"):
                doc = _race_doc("Sam has a blue hat.", ["What colour is the hat?"],
                                [["red", "blue", "green", "black"]], ["B"]).encode()
                info = tarfile.TarInfo(f"RACE/{split}/{level}/1.txt")
                info.size = len(doc)
                t.addfile(info, io.BytesIO(doc))
    p = root / "~glai1/data/race/RACE.tar.gz"
    p.parent.mkdir(parents=True)
    p.write_bytes(buf.getvalue())
    return buf.getvalue()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _files(d: Path):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def test_download_from_local_server(server, tmp_path, monkeypatch):
    root, base = server
    sst2, race = _sst2_zip(root), _race_tgz(root)
    dd = tmp_path / "data"
    # the real SST-2 checksum does not match the fixture: refused, and nothing is left behind
    with pytest.raises(TaskError, match=r"SST-2\.zip: sha256 [0-9a-f]{64} is not the expected d67e16fb"):
        download.download(["glue/sst2"], dd, base_urls=base, log=lambda s: None)
    assert _files(dd) == []
    D = download.Download
    url = download.DOWNLOADS["glue/sst2"][0].url
    monkeypatch.setitem(download.DOWNLOADS, "glue/sst2", [D(url, _sha(sst2), "glue")])
    for t in ("race/middle", "race/high"):
        monkeypatch.setitem(download.DOWNLOADS, t, [D(download.DOWNLOADS[t][0].url, _sha(race), "race")])
    download.download("glue/sst2,race", dd, base_urls=base, log=lambda s: None)
    assert "glue/SST-2/train.tsv" in _files(dd) and "race/RACE/test/high/1.txt" in _files(dd)
    assert not any("MACOSX" in f or f.endswith(".part") or f.endswith(".zip") for f in _files(dd))
    assert len(tasks.REGISTRY["glue/sst2"].load("train", data_dir=dd)) == 3
    (ex,) = tasks.REGISTRY["race/high"].load("test", data_dir=dd)
    assert ex.label == 1 and ex.candidates[1] == "B. blue"
    # a second run finds everything in place and fetches nothing
    assert len(_Quiet.hits) == 3  # SST-2 twice (refused, then accepted), RACE once
    download.download(["race", "glue/sst2"], dd, base_urls=base, log=lambda s: None)
    assert len(_Quiet.hits) == 3
    # the CLI entry point `python -m tasks download` calls
    assert download.main(["download", "--tasks", "glue/sst2", "--data-dir", str(tmp_path / "d2"),
                         "--base-url", base]) == 0
    assert (tmp_path / "d2/glue/SST-2/dev.tsv").exists()


def test_download_errors(server, tmp_path, monkeypatch, capsys):
    root, base = server
    with pytest.raises(TaskError,
                       match=r"download http://127\.0\.0\.1:\d+/boolq/train\.jsonl: HTTP Error 404"):
        download.download(["boolq"], tmp_path / "d", base_urls=base, log=lambda s: None)
    assert _files(tmp_path / "d") == []
    with pytest.raises(TaskError, match="no download for 'synth/sentiment'"):
        download.download(["synth/sentiment"], tmp_path / "d")
    assert download.main(["--tasks", "boolq", "--data-dir", str(tmp_path / "d"), "--base-url", base]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: download ") and "404" in err[-1]
    # an archive member escaping the target folder is refused
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../evil.txt", "x")
    (root / "evil.zip").write_bytes(buf.getvalue())
    evil = download.Download("https://example.org/evil.zip", None, "glue")
    monkeypatch.setitem(download.DOWNLOADS, "glue/wnli", [evil])
    with pytest.raises(TaskError, match="outside"):
        download.download(["glue/wnli"], tmp_path / "e", base_urls=base, log=lambda s: None)
    assert not (tmp_path / "evil.txt").exists() and _files(tmp_path / "e") == []


def test_redirect():
    u = "https://dl.fbaipublicfiles.com/glue/data/CoLA.zip"
    assert download._redirect(u, None) == u
    assert download._redirect(u, "http://127.0.0.1:8000/") == "http://127.0.0.1:8000/glue/data/CoLA.zip"
    mirror = {"https://dl.fbaipublicfiles.com/glue/": "file:///m/"}
    assert download._redirect(u, mirror) == "file:///m/data/CoLA.zip"


# ----------------------------------------------------------------------------------------------
# User JSONL in the preference formats people already have (TRL, UltraFeedback, Orca)

CHAT = {"role": "system", "content": tasks.SYSTEM_PROMPTS["chat"]}


def user_errors(path: Path, rows, msg):
    """The file is refused with one line naming it, the line and `msg`."""
    p = jsonl(path, rows)
    with pytest.raises(TaskError) as e:
        loaders.jsonl_task(str(p))
    assert str(e.value).startswith(f"{p}:") and "\n" not in str(e.value), str(e.value)
    assert msg in str(e.value), str(e.value)


def test_jsonl_trl_implicit_prompt(tmp_path):
    p = jsonl(tmp_path / "implicit.jsonl", [
        '{"chosen": [{"role": "user", "content": "What colour is the sky?"}, '
        '{"role": "assistant", "content": "Blue."}], '
        '"rejected": [{"role": "user", "content": "What colour is the sky?"}, '
        '{"role": "assistant", "content": "Green."}]}',
        '{"chosen": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi."}, '
        '{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count to 2."}, '
        '{"role": "assistant", "content": "1 2"}], '
        '"rejected": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi."}, '
        '{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count to 2."}, '
        '{"role": "assistant", "content": "No."}], "split": "test"}',
    ])
    spec = loaders.jsonl_task(str(p))
    assert spec.kind == "preference" and spec.eval_split == "test"
    (ex,) = spec.load("train")
    assert isinstance(ex, PreferenceExample)
    assert ex.messages == [CHAT, {"role": "user", "content": "What colour is the sky?"}]
    assert (ex.chosen, ex.rejected) == ("Blue.", "Green.")
    (ex,) = spec.load("test")
    assert ex.messages == [{"role": "system", "content": "Be terse."},
                           {"role": "user", "content": "Hi."},
                           {"role": "assistant", "content": "Hello."},
                           {"role": "user", "content": "Count to 2."}]
    assert (ex.chosen, ex.rejected) == ("1 2", "No.")


@pytest.mark.parametrize("line,msg", [
    ('{"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], '
     '"rejected": [{"role": "user", "content": "Other Q?"}, {"role": "assistant", "content": "B."}]}',
     "'rejected': message 0 differs from 'chosen'"),
    ('{"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], '
     '"rejected": [{"role": "user", "content": "Q?"}]}',
     "'rejected': expected a list of messages ending in an assistant turn"),
    ('{"chosen": [{"role": "user", "content": "Q?"}, {"role": "bot", "content": "A."}], '
     '"rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "B."}]}',
     "chosen[1] is not {'role': system|user|assistant, 'content': str}"),
    ('{"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], '
     '"rejected": "B."}', "'rejected': expected a list of messages ending in an assistant turn"),
    ('{"chosen": [{"role": "assistant", "content": "A."}, {"role": "assistant", "content": "B."}], '
     '"rejected": [{"role": "assistant", "content": "A."}, {"role": "assistant", "content": "C."}]}',
     "'chosen': message 0 (role 'assistant') comes right before the answer"),
])
def test_jsonl_trl_implicit_prompt_errors(tmp_path, line, msg):
    user_errors(tmp_path / "implicit_bad.jsonl", [line], f":1: {msg}")


def test_jsonl_trl_conversational_explicit_prompt(tmp_path):
    p = jsonl(tmp_path / "conv_explicit.jsonl", [
        '{"prompt": [{"role": "user", "content": "Name a planet."}], '
        '"chosen": [{"role": "assistant", "content": "Mars."}], '
        '"rejected": [{"role": "assistant", "content": "The Moon."}]}',
        '{"prompt": [{"role": "system", "content": "Answer in French."}, '
        '{"role": "user", "content": "Say yes."}], '
        '"chosen": [{"role": "assistant", "content": "Oui."}], '
        '"rejected": [{"role": "assistant", "content": "Yes."}]}',
    ])
    a, b = loaders.jsonl_task(str(p)).load("train")
    assert a.messages == [CHAT, {"role": "user", "content": "Name a planet."}]
    assert (a.chosen, a.rejected) == ("Mars.", "The Moon.")
    assert b.messages == [{"role": "system", "content": "Answer in French."},
                          {"role": "user", "content": "Say yes."}]
    assert (b.chosen, b.rejected) == ("Oui.", "Yes.")


@pytest.mark.parametrize("line,msg", [
    ('{"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": "A."}, '
     '{"role": "assistant", "content": "More."}], "rejected": [{"role": "assistant", "content": "B."}]}',
     "'chosen': expected the one assistant message answering 'prompt', got 2 messages"),
    ('{"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": "A."}], '
     '"rejected": [{"role": "user", "content": "B."}]}',
     "'rejected': expected a list of messages ending in an assistant turn"),
    ('{"prompt": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Hm."}], '
     '"chosen": [{"role": "assistant", "content": "A."}], "rejected": [{"role": "assistant", "content": "B."}]}',
     "'prompt': the last message must be the user's"),
    ('{"prompt": [{"role": "person", "content": "Q?"}], "chosen": [{"role": "assistant", "content": "A."}], '
     '"rejected": [{"role": "assistant", "content": "B."}]}',
     "prompt[0] is not {'role': system|user|assistant, 'content': str}"),
])
def test_jsonl_trl_conversational_explicit_prompt_errors(tmp_path, line, msg):
    user_errors(tmp_path / "conv_explicit_bad.jsonl", [line], f":1: {msg}")


# two lines in the layout of HuggingFaceH4/ultrafeedback_binarized (hand-written text)
ULTRAFEEDBACK = [
    '{"prompt": "Give me a word that rhymes with cat.", "prompt_id": "0a1b", '
    '"chosen": [{"content": "Give me a word that rhymes with cat.", "role": "user"}, '
    '{"content": "Hat.", "role": "assistant"}], '
    '"rejected": [{"content": "Give me a word that rhymes with cat.", "role": "user"}, '
    '{"content": "Dog.", "role": "assistant"}], '
    '"messages": [{"content": "Give me a word that rhymes with cat.", "role": "user"}, '
    '{"content": "Hat.", "role": "assistant"}], "score_chosen": 8.0, "score_rejected": 2.5}',
    '{"prompt": "Is water wet?", "prompt_id": "2c3d", '
    '"chosen": [{"content": "Is water wet?", "role": "user"}, {"content": "It makes things wet.", "role": "assistant"}], '
    '"rejected": [{"content": "Is water wet?", "role": "user"}, {"content": "Water is dry.", "role": "assistant"}], '
    '"messages": [{"content": "Is water wet?", "role": "user"}, {"content": "It makes things wet.", "role": "assistant"}], '
    '"score_chosen": 7.0, "score_rejected": 1.0}',
]


def test_jsonl_ultrafeedback_binarized(tmp_path):
    p = jsonl(tmp_path / "train_prefs.jsonl", ULTRAFEEDBACK)
    spec = loaders.jsonl_task(str(p))
    assert spec.kind == "preference"
    a, b = spec.load("train")
    # the answers are the assistant turns, never the user turn the prompt repeats
    assert a.messages == [CHAT, {"role": "user", "content": "Give me a word that rhymes with cat."}]
    assert (a.chosen, a.rejected) == ("Hat.", "Dog.")
    assert b.messages == [CHAT, {"role": "user", "content": "Is water wet?"}]
    assert (b.chosen, b.rejected) == ("It makes things wet.", "Water is dry.")


def test_jsonl_ultrafeedback_binarized_errors(tmp_path):
    bad = json.loads(ULTRAFEEDBACK[1])
    bad["chosen"] = bad["chosen"][:1]  # the user turn only
    user_errors(tmp_path / "uf_bad.jsonl", [ULTRAFEEDBACK[0], json.dumps(bad)],
                ":2: 'chosen': expected a list of messages ending in an assistant turn, "
                "got role 'user' last")
    bad = json.loads(ULTRAFEEDBACK[1])
    bad["rejected"][0]["content"] = "Is fire wet?"
    user_errors(tmp_path / "uf_bad2.jsonl", [json.dumps(bad)],
                ":1: 'rejected': message 0 differs from 'chosen'")


def test_jsonl_orca_dpo_pairs(tmp_path):
    p = jsonl(tmp_path / "orca.jsonl", [
        '{"system": "You are an AI assistant.", "question": "What is 2 + 2?", '
        '"chosen": "2 + 2 is 4.", "rejected": "5."}',
        '{"system": "", "question": "Name a shape.", "chosen": "A circle.", "rejected": "Blue."}',
    ])
    spec = loaders.jsonl_task(str(p))
    assert spec.kind == "preference"
    a, b = spec.load("train")
    assert a.messages == [{"role": "system", "content": "You are an AI assistant."},
                          {"role": "user", "content": "What is 2 + 2?"}]
    assert (a.chosen, a.rejected) == ("2 + 2 is 4.", "5.")
    assert b.messages == [CHAT, {"role": "user", "content": "Name a shape."}]
    assert (b.chosen, b.rejected) == ("A circle.", "Blue.")


@pytest.mark.parametrize("line,msg", [
    ('{"system": "", "question": 7, "chosen": "A.", "rejected": "B."}', "'question' is not a string"),
    ('{"system": "", "question": "Q?", "chosen": "A."}', "missing key 'rejected'"),
    ('{"system": ["x"], "question": "Q?", "chosen": "A.", "rejected": "B."}', "'system' is not a string"),
    ('{"system": "", "question": "Q?", "chosen": "A.", "rejected": 3}', "'rejected' is not a string"),
])
def test_jsonl_orca_dpo_pairs_errors(tmp_path, line, msg):
    user_errors(tmp_path / "orca_bad.jsonl", [line], f":1: {msg}")


def test_jsonl_instruction_completion(tmp_path):
    p = jsonl(tmp_path / "completion.jsonl", [
        '{"prompt": "Name a colour.", "completion": "Red."}',
        '{"messages": [{"role": "user", "content": "Name a fruit."}], "completion": "Pear.", '
        '"split": "validation"}',
    ])
    spec = loaders.jsonl_task(str(p))
    assert spec.kind == "instruction" and spec.eval_split == "validation"
    (ex,) = spec.load("train")
    assert isinstance(ex, InstructionExample)
    assert ex.messages == [CHAT, {"role": "user", "content": "Name a colour."}] and ex.answer == "Red."
    (ex,) = spec.load("validation")
    assert ex.messages == [CHAT, {"role": "user", "content": "Name a fruit."}] and ex.answer == "Pear."
    # response and completion lines may share a file: both are instruction records
    q = jsonl(tmp_path / "mixed_inst.jsonl", ['{"prompt": "A?", "response": "a"}',
                                              '{"prompt": "B?", "completion": "b"}'])
    assert [e.answer for e in loaders.jsonl_task(str(q)).load("train")] == ["a", "b"]


@pytest.mark.parametrize("line,msg", [
    ('{"prompt": "Q?", "completion": ["A."]}', "'completion' is not a string"),
    ('{"prompt": "Q?", "completion": ""}', "empty completion"),
    ('{"prompt": "Q?", "response": "A.", "completion": "A."}',
     "need one of 'response' or 'completion', not both"),
])
def test_jsonl_instruction_completion_errors(tmp_path, line, msg):
    user_errors(tmp_path / "completion_bad.jsonl", [line], f":1: {msg}")
