"""Smoke test of bench.py: `--quick` runs every section on the tiny preset in seconds and writes a
JSON report with positive numbers everywhere. No timing assertions: the machine may be busy."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_quick_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "DPH_DATA"}  # the built-in suite only
    r = subprocess.run([sys.executable, "-m", "tools.bench", "--quick", "--threads", "1", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]  # (it takes ~10-15 s on 2 cores)
    R = json.loads(out.read_text())

    for key in ("config", "machine", "peak", "packing", "sft", "dph", "eval", "generate",
                "frozen", "memory", "attention_backend", "targets", "mfu_formula", "command"):
        assert key in R, key
    assert R["config"]["quick"] is True
    assert positive(R["peak"]["gflops"])

    assert 0 < R["packing"]["builtin"]["efficiency"] <= 1
    assert "skipped" in R["packing"]["real"]  # DPH_DATA unset

    modes = R["sft"]["tiny"]["modes"]
    assert set(modes) == {"packed_masked", "packed_causal", "padded"}
    for m in modes.values():
        for k in ("tokens_per_s", "tokens_per_s_best", "mfu", "mfu_incl_logits",
                  "mfu_same_round_median", "flops_per_token"):
            assert positive(m[k]), (k, m)
        assert m["mfu_incl_logits"] > m["mfu"]  # the logits term only adds FLOPs
    assert isinstance(R["sft"]["tiny"]["mask_cost"], float)

    for variant in ("head", "head+dpo"):
        v = R["dph"]["variants"][variant]
        assert positive(v["shared"]["pairs_per_s"]) and positive(v["padded"]["pairs_per_s"])
        assert positive(v["speedup"]["median"]) and positive(v["speedup"]["best_calls"])
    # the shared-prefix layout really holds fewer token slots than the padded one
    assert R["dph"]["shapes"]["shared"]["slots"] < R["dph"]["shapes"]["padded"]["slots"]
    assert R["eval"]["shapes"]["shared"]["slots"] < R["eval"]["shapes"]["padded"]["slots"]
    for lay in ("shared", "padded"):
        assert positive(R["eval"][lay]["candidates_per_s"])
    assert positive(R["eval"]["speedup"]["median"])
    for k in ("cache", "no_cache"):
        assert positive(R["generate"][k]["tokens_per_s"])
    assert positive(R["generate"]["speedup"]["median"])
    for k in ("backbone", "cache"):
        assert positive(R["frozen"][k]["pairs_per_s"])
    assert positive(R["frozen"]["fill_pairs_per_s"]) and positive(R["frozen"]["speedup"]["median"])

    items = R["memory"]["items"]
    expected = ({f"sft/tiny/{m}" for m in modes}
                | {f"dph/tiny/{v}/{lay}" for v in ("head", "head+dpo")
                   for lay in ("shared", "padded")}
                | {f"eval/tiny/{lay}" for lay in ("shared", "padded")}
                | {"generate/tiny/cache", "generate/tiny/no_cache"})
    assert set(items) == expected
    for name, m in items.items():
        assert "error" not in m, (name, m)
        assert positive(m["peak_mib"]), (name, m)
        assert m["step_mib"] >= 0

    assert R["attention_backend"]["masked"]["kernel"] != "unknown"
    names = " ".join(t["name"] for t in R["targets"])
    for word in ("packing", "evaluation", "DPH", "KV-cache", "MFU", "masking"):
        assert word in names, word
    for t in R["targets"]:
        assert isinstance(t["pass"], bool) and isinstance(t["value"], float)
    assert ("PASS" in r.stdout) or ("MISS" in r.stdout)


def _bench(args, hide_transformers=False, timeout=180):
    code = ("import runpy, sys\n"
            + ("sys.modules['transformers'] = None  # import transformers -> ImportError\n"
               if hide_transformers else "")
            + f"sys.argv = ['bench'] + {list(args)!r}\n"
            "runpy.run_module('tools.bench', run_name='__main__')\n")
    env = {k: v for k, v in os.environ.items() if k != "DPH_DATA"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_peers_without_transformers_is_a_one_line_error(tmp_path):
    out = tmp_path / "bench.json"
    r = _bench(["--quick", "--peers", "--out", str(out)], hide_transformers=True)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip() == ("error: --peers compares with Hugging Face transformers, which "
                                "is not installed: pip install transformers")
    assert not out.exists()  # it fails before measuring anything


def test_peers_quick_times_the_same_work_as_transformers(tmp_path):
    """Where transformers is installed: the four comparisons run, and before timing each one
    checked that both sides compute the same numbers from the same weights."""
    pytest.importorskip("transformers", reason="transformers is not installed (never a "
                                               "requirement; --peers needs it)")
    out = tmp_path / "bench.json"
    r = _bench(["--quick", "--sections", "peers", "--threads", "1", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    P = json.loads(out.read_text())["peers"]
    assert set(P["work"]) == {"pretrain tiny", "sft25 tiny", "reward tiny", "choice tiny"}
    for name, w in P["work"].items():
        assert positive(w["project"][f"{w['unit']}_per_s"]) and positive(w["hf"][f"{w['unit']}_per_s"])
        assert positive(w["speedup"]["median"])
        if name != "sft25 tiny":  # HF has no document masks: its SFT loss differs by design
            assert w["same_output"]["max_relative_difference"] <= 1e-4
    assert "Against Hugging Face transformers" in r.stdout
