"""Small extractions: encoding in the calling process against starting Ray Data, by corpus size.

    python benchmarks/small_jobs.py [--sizes 1 3 10 30 60] [--audio-encoder logmel] [--text-encoder hashngram]

Each cell is one fresh process (imports, Ray start-up where it applies, encoding, the feature
set) on a fresh cache, timed from outside as a user waits for ``hilbert extract``; demo documents
of the bundled generator. Prints the audio seconds of each corpus and both wall times: the size
where Ray Data starts to win is where ``hilbert.features.extract.IN_PROCESS_SEGMENTS`` belongs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXTRACT = """
import sys
from hilbert.data.manifest import load_manifest
from hilbert.features.extract import extract_features
extract_features(load_manifest(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], progress=False,
                 in_process=sys.argv[5] == "in-process")
"""


def timed_run(manifest: Path, audio: str, text: str, cache: Path, mode: str) -> float:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", EXTRACT, str(manifest), audio, text, str(cache), mode], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 3, 10, 30, 60])
    parser.add_argument("--audio-encoder", default="logmel")
    parser.add_argument("--text-encoder", default="hashngram")
    args = parser.parse_args()

    from hilbert.data.demo import write_demo_corpus
    from hilbert.data.manifest import load_manifest

    print(f"extraction of demo documents, {args.audio_encoder} + {args.text_encoder}, {os.cpu_count()} CPUs; "
          "wall seconds of a fresh process on a fresh cache")
    print(f"{'documents':>9} {'segments':>8} {'audio s':>8} {'in-process':>11} {'Ray Data':>9} {'faster':>10}")
    with tempfile.TemporaryDirectory(prefix="hilbert-small-jobs-") as scratch:
        root = Path(scratch)
        for size in args.sizes:
            manifest = write_demo_corpus(root / f"corpus-{size}", n_documents=size, seed=size)
            documents = load_manifest(manifest).documents
            segments = sum(len(d.segments) for d in documents)
            audio_seconds = sum(s.duration for d in documents for s in d.segments)
            times = {mode: timed_run(manifest, args.audio_encoder, args.text_encoder, root / f"cache-{size}-{mode}",
                                     mode) for mode in ("in-process", "ray")}
            faster = "in-process" if times["in-process"] <= times["ray"] else "Ray Data"
            print(f"{size:>9} {segments:>8} {audio_seconds:>8.0f} {times['in-process']:>11.1f} {times['ray']:>9.1f} "
                  f"{faster:>10}")


if __name__ == "__main__":
    main()
