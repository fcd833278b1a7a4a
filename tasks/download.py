"""The downloader: `python -m tasks download --tasks glue,race --data-dir DIR` (or
`python -m tasks.download ...`) fetches the official archives of the paper's datasets with the
standard library only, checks their sha256 where a trustworthy value is published, and unpacks
them in the layout tasks/loaders.py looks for first. For users with a network; nothing else in the
project needs one. Tested against a local HTTP server (tests/test_loaders.py).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .loaders import HH_SUBSETS, MIXTURES
from .types import TaskError

# ----------------------------------------------------------------------------------------------
# Download (urllib only)
#
# Checksums are sha256 values published by others who verify these exact URLs (Hugging Face
# `datasets` dataset_infos.json / checksums.txt, TensorFlow Datasets url_checksums, AI2's
# rainbow); None where no trustworthy value is known. WinoGrande: two such sources disagree,
# so it is not checked.


@dataclass(frozen=True)
class Download:
    url: str
    sha256: Optional[str]
    dest: str  # relative to data_dir: the file, or for an archive the folder it unpacks into


_FB = "https://dl.fbaipublicfiles.com/"
_GH_HH = "https://github.com/anthropics/hh-rlhf/raw/master/"
_GLUE_ZIP = {  # task -> (zip name, sha256 from HF datasets glue/dataset_infos.json)
    "glue/cola": ("CoLA", "f212fcd832b8f7b435fb991f101abf89f96b933ab400603bf198960dfc32cbff"),
    "glue/sst2": ("SST-2", "d67e16fb55739c1b32cdce9877596db1c127dc322d93c082281f64057c16deaa"),
    "glue/qqp": ("QQP-clean", "40e7c862c04eb26ee04b67fd900e76c45c6ba8e6d8fab4f8f1f8072a1a3fbae0"),
    "glue/stsb": ("STS-B", "e60a6393de5a8b5b9bac5020a1554b54e3691f9d600b775bd131e613ac179c85"),
    "glue/mnli": ("MNLI", "e7c1d896d26ed6caf700110645df426cc2d8ebf02a5ab743d5a5c68ac1c83633"),
    "glue/qnli": ("QNLIv2", "e634e78627a29adaecd4f955359b22bf5e70f2cbd93b493f2d624138a0c0e5f5"),
    "glue/rte": ("RTE", "6bf86de103ecd335f3441bd43574d23fef87ecc695977a63b82d5efb206556ee"),
    "glue/wnli": ("WNLI", "ae0e8e4d16f4d46d4a0a566ec7ecceccfd3fbfaa4a7a4b4e02848c0f2561ac46"),
}
DOWNLOADS = {t: [Download(f"{_FB}glue/data/{z}.zip", sha, "glue")]
             for t, (z, sha) in _GLUE_ZIP.items()}
DOWNLOADS["glue/mnli_mm"] = DOWNLOADS["glue/mnli"]
DOWNLOADS["glue/mrpc"] = [  # GLUE builds MRPC from MSR's files; the loader splits train/dev itself
    Download(f"{_FB}senteval/senteval_data/msr_paraphrase_train.txt",
             "60a9b09084528f0673eedee2b69cb941920f0b8cd0eeccefc464a98768457f89",
             "glue/MRPC/msr_paraphrase_train.txt"),
    Download(f"{_FB}senteval/senteval_data/msr_paraphrase_test.txt",
             "a04e271090879aaba6423d65b94950c089298587d9c084bf9cd7439bd785f784",
             "glue/MRPC/msr_paraphrase_test.txt"),
    Download(f"{_FB}glue/data/mrpc_dev_ids.tsv",
             "971d7767d81b997fd9060ade0ec23c4fc31cbb226a55d1bd4a1bac474eb81dc7",
             "glue/MRPC/dev_ids.tsv"),
]
DOWNLOADS["race/middle"] = DOWNLOADS["race/high"] = [  # sha256: HF datasets race/urls_checksums
    Download("http://www.cs.cmu.edu/~glai1/data/race/RACE.tar.gz",
             "98b54b7e656bc9e2e434f99f07863a83f89647a1f4c9428a041c3a4c51db6787", "race")]
# ARC: 680 MB, as the zip holds the ARC corpus too; sha256: TFDS
DOWNLOADS["arc/easy"] = DOWNLOADS["arc/challenge"] = [
    Download("https://ai2-datasets.s3-us-west-2.amazonaws.com/arc/ARC-V1-Feb2018.zip",
             "6d2d5ab50b2ceec6ba5f79c921be77cf2de712ea25a2b3f4fff3acc101cecfa0", "arc")]
DOWNLOADS["openbookqa"] = [  # sha256: TFDS
    Download("https://s3-us-west-2.amazonaws.com/ai2-website/data/OpenBookQA-V1-Sep2018.zip",
             "82368cf05df2e3b309c17d162e10b888b4d768fad6e171e0a041954c8553be46", "openbookqa")]
DOWNLOADS["boolq"] = [  # sha256: HF datasets boolq/dataset_infos.json
    Download("https://storage.googleapis.com/boolq/train.jsonl",
             "cc7a79d44479867e8323a7b0c5c1d82edf516ca34912201f9384c3a3d098d8db",
             "boolq/train.jsonl"),
    Download("https://storage.googleapis.com/boolq/dev.jsonl",
             "ebc29ea3808c5c611672384b3de56e83349fe38fc1fe876fd29b674d81d0a80a", "boolq/dev.jsonl")]
DOWNLOADS["hellaswag"] = [  # sha256: TFDS
    Download("https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_train.jsonl",
             "dae5e69249868cb9fe4e23ff925c60b66169564cfb7072d793cd7356a2b69f8d",
             "hellaswag/hellaswag_train.jsonl"),
    Download("https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
             "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588",
             "hellaswag/hellaswag_val.jsonl")]
_AI2 = "https://storage.googleapis.com/ai2-mosaic/public/"
# PIQA: AI2's mirror of train + dev; sha256: HF datasets, TFDS and AI2's rainbow agree
DOWNLOADS["piqa"] = [
    Download(f"{_AI2}physicaliqa/physicaliqa-train-dev.zip",
             "54d32a04f59a7e354396f321723c8d7ec35cc6b08506563d8d1ffcc15ce98ddd", "piqa")]
DOWNLOADS["winogrande"] = [
    Download(f"{_AI2}winogrande/winogrande_1.1.zip", None, "winogrande")]
DOWNLOADS["hh_rlhf"] = [
    Download(f"{_GH_HH}{s}/{sp}.jsonl.gz",
             # harmless-base/test: the sha256 of the same git blob staged in shared/data
             "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03"
             if (s, sp) == ("harmless-base", "test") else None,
             f"hh_rlhf/{s}/{sp}.jsonl.gz")
    for s in HH_SUBSETS for sp in ("train", "test")]
DOWNLOADS["alpaca"] = [
    Download("https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json",
             None, "alpaca/alpaca_data.json")]

_ARCHIVES = (".zip", ".tar.gz", ".tgz")


def _redirect(url: str, base_urls) -> str:
    """base_urls: None; a str that replaces scheme://host of every URL (a local mirror keeping
    the paths); or a dict {url prefix: replacement prefix}."""
    if not base_urls:
        return url
    if isinstance(base_urls, str):
        u = urllib.parse.urlsplit(url)
        return base_urls.rstrip("/") + u.path + (f"?{u.query}" if u.query else "")
    for old, new in base_urls.items():
        if url.startswith(old):
            return new + url[len(old):]
    return url


def _fetch(url: str, dest: Path, sha256: Optional[str], verify: bool, log) -> None:
    """Download url to dest (a temporary name in dest's folder), check it, keep it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".dl-", suffix=".part")
    try:
        h, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as r:
                while chunk := r.read(1 << 20):
                    out.write(chunk)
                    h.update(chunk)
                    size += len(chunk)
        except (urllib.error.URLError, OSError, ValueError) as e:
            why = e if isinstance(e, urllib.error.HTTPError) else (getattr(e, "reason", None) or e)
            raise TaskError(f"download {url}: {why}") from None
        with open(tmp, "rb") as f:
            if f.read(24) == b"version https://git-lfs":
                raise TaskError(f"download {url}: got a Git LFS pointer, not the file")
        if verify and sha256 and h.hexdigest() != sha256:
            raise TaskError(f"download {url}: sha256 {h.hexdigest()} is not the expected {sha256} "
                            "(a re-published file? --no-verify accepts it)")
        os.replace(tmp, dest)
        log(f"  {url} -> {dest} ({size / 1e6:.1f} MB)")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _safe_join(root: Path, name: str) -> Path:
    p = (root / name).resolve()
    if not str(p).startswith(str(root.resolve()) + os.sep):
        raise TaskError(f"archive member {name!r} would land outside {root}")
    return p


def _unpack(archive: Path, into: Path, url: str) -> None:
    """Extract into a temporary folder beside `into`, then move each file into place."""
    tmp = Path(tempfile.mkdtemp(dir=into, prefix=".unpack-"))
    try:
        try:
            if archive.name.endswith(".zip"):
                with zipfile.ZipFile(archive) as z:
                    for m in z.infolist():
                        if m.filename.startswith("__MACOSX/") or m.is_dir():
                            continue
                        target = _safe_join(tmp, m.filename)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with z.open(m) as src, open(target, "wb") as dst:
                            shutil.copyfileobj(src, dst)
            else:
                with tarfile.open(archive) as t:
                    members = [m for m in t.getmembers() if m.isfile() or m.isdir()]  # no links
                    for m in members:
                        _safe_join(tmp, m.name)
                    t.extractall(tmp, members=members)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
            raise TaskError(f"download {url}: cannot unpack ({e})") from None
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            target = into / f.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(task_names, data_dir, base_urls=None, verify=True, log=None) -> list:
    """Fetch the official files of ``task_names`` (task or mixture names) into ``data_dir`` in
    the layout the loaders look for first. Files already present are skipped (an archive leaves
    a ".<name>.done" marker once unpacked). Returns the paths written or found."""
    log = log or (lambda s: print(s, file=sys.stderr))
    names = []
    for t in ([task_names] if isinstance(task_names, str) else task_names):
        for name in (s.strip() for s in t.split(",") if s.strip()):
            for n in MIXTURES.get(name, [name]):
                if n not in DOWNLOADS:
                    raise TaskError(f"download: no download for {n!r}; downloadable: "
                                    f"{', '.join(sorted(DOWNLOADS))} (or a mixture: glue, "
                                    "gpt4all, race, paper)")
                if n not in names:
                    names.append(n)
    root = Path(data_dir)
    done, seen = [], set()
    for name in names:
        for d in DOWNLOADS[name]:
            if d.url in seen:
                continue
            seen.add(d.url)
            url = _redirect(d.url, base_urls)
            fname = urllib.parse.urlsplit(d.url).path.rsplit("/", 1)[-1]
            if fname.endswith(_ARCHIVES):
                into = root / d.dest
                marker = into / f".{fname}.done"
                if not marker.exists():
                    log(f"{name}: {fname}")
                    into.mkdir(parents=True, exist_ok=True)
                    archive = into / f".{fname}"
                    _fetch(url, archive, d.sha256, verify, log)
                    try:
                        _unpack(archive, into, url)
                    finally:
                        archive.unlink(missing_ok=True)
                    marker.write_text(d.url + "\n")
                done.append(into)
            else:
                dest = root / d.dest
                if not dest.exists():
                    log(f"{name}: {fname}")
                    _fetch(url, dest, d.sha256, verify, log)
                done.append(dest)
    return done


def main(argv=None) -> int:
    """``python -m tasks download --tasks glue,race --data-dir data``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["download"]:
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="python -m tasks download",
                                description="Fetch the official benchmark files into --data-dir.")
    p.add_argument("--tasks", required=True,
                   help="comma-separated task or mixture names "
                        "(glue, race, gpt4all, paper, hh_rlhf, ...)")
    p.add_argument("--data-dir", default=os.environ.get("DPH_DATA", "data"),
                   help="where to put the files (default: $DPH_DATA, else ./data)")
    p.add_argument("--base-url", default=None,
                   help="fetch every file from this server instead (same paths): a mirror")
    p.add_argument("--no-verify", action="store_true", help="do not check sha256 checksums")
    a = p.parse_args(argv)
    try:
        download(a.tasks, a.data_dir, base_urls=a.base_url, verify=not a.no_verify)
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done; now: DPH_DATA={a.data_dir} or --data-dir {a.data_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
