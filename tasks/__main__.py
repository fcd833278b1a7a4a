"""python -m tasks download --tasks glue,race --data-dir DIR   fetch the official datasets
python -m tasks show --tasks synth/race -n 2                 print examples as the loaders give them
"""
import argparse
import json
import sys

from tasks import download, resolve_tasks


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["download"]:
        return download.main(argv[1:])
    if argv[:1] == ["show"]:
        p = argparse.ArgumentParser(prog="python -m tasks show", description="print rendered examples")
        p.add_argument("--tasks", default="builtin")
        p.add_argument("--split", default="train")
        p.add_argument("-n", type=int, default=1)
        a = p.parse_args(argv[1:])
        for spec in resolve_tasks(a.tasks):
            for ex in spec.load(a.split)[:a.n]:
                print(f"== {spec.name} ==\n" + json.dumps(ex.__dict__, indent=1, ensure_ascii=False))
        return 0
    print("usage: python -m tasks {download,show} [--help]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
