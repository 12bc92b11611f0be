"""`hilbert train` on the demo corpus with 2 DDP workers on a 2-CPU local Ray, then evaluate,
predict and embed with the models it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from hilbert.cli import app
from conftest import extract_in_process
from hilbert.data.demo import write_demo_corpus
from hilbert.data.manifest import load_manifest

pytestmark = pytest.mark.slow
REPOSITORY = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def trained(local_ray, tmp_path_factory):
    """One short cross-validated run of HILBERT and the text-only ablation on 120 demo documents."""
    root = tmp_path_factory.mktemp("train")
    manifest = write_demo_corpus(root / "corpus", n_documents=120, seed=1)
    config = yaml.safe_load((REPOSITORY / "tune" / "train-demo.yaml").read_text())
    # The features, encoded in this process (Ray Data's extraction has its own tests): the
    # command below finds them cached, as a second run would.
    extract_in_process(load_manifest(manifest), config["data"]["audio_encoder"], config["data"]["text_encoder"],
                       root / "cache")
    config.update(output_dir=str(root / "runs"), variants=["hilbert", "text_only"])
    config["data"].update(manifest=str(manifest), cache_dir=str(root / "cache"))
    config["optimization"].update(epochs=8, patience=8)
    config["cv"]["folds"] = 3
    (root / "train.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["train", str(root / "train.yaml"), "--output", str(root / "run")])
    assert result.exit_code == 0, result.output
    return root, manifest, result.output


def test_train_prints_the_table_and_beats_chance(trained):
    root, _, output = trained
    for expected in ("macro one-vs-rest ROC AUC", "pooled out-of-fold", "Δ vs HILBERT", "HILBERT", "text only",
                     "baseline: logreg", "balanced accuracy"):
        assert expected in output
    results = json.loads((root / "run" / "results.json").read_text())
    summary = results["summary"]
    # 64 training documents a fold and 8 epochs: "beats chance" with a margin over the noise,
    # not a benchmark (the README's table is the 240-document, 5-fold run).
    for task in ("arousal", "voice", "topic", "stance"):
        figures = summary["hilbert"][task]
        assert figures["pooled_auc"] > 0.55 and figures["ci95"][0] < figures["pooled_auc"] < figures["ci95"][1], figures
        assert figures["folds"] == 3 and figures["folds_defined"] == 3 and "vs_reference" not in figures
    for method in ("text_only", "baseline_logreg"):
        versus = summary[method]["topic"]["vs_reference"]
        assert versus["reference"] == "hilbert" and versus["ci95"][0] <= versus["difference"] <= versus["ci95"][1]
    # The transcripts carry nothing of arousal and voice: text alone must sit at chance there.
    for task in ("arousal", "voice"):
        low, high = summary["text_only"][task]["ci95"]
        assert low < 0.5 < high or summary["text_only"][task]["pooled_auc"] < 0.6, (task, summary["text_only"][task])
    assert sorted(p.name for p in (root / "run" / "hilbert").iterdir()) == ["fold_0", "fold_1", "fold_2"]
    assert json.loads((root / "run" / "config.json").read_text())["variants"] == ["hilbert", "text_only"]


def test_every_methods_test_predictions_are_saved(trained):
    root, manifest, _ = trained
    folder = root / "run" / "test_predictions"
    assert sorted(p.name for p in folder.iterdir()) == ["baseline_logreg.parquet", "hilbert.parquet",
                                                       "text_only.parquet"]
    table = pq.read_table(folder / "hilbert.parquet")
    classes = json.loads(table.schema.metadata[b"classes"])
    rows = table.to_pandas()
    assert set(rows["task"]) == set(classes) and len(rows) == 120 * len(classes)  # every document once per task
    assert rows.groupby("task")["doc_id"].nunique().eq(120).all()
    for task, group in rows.groupby("task"):
        probabilities = np.stack(group["probabilities"].to_numpy())
        assert probabilities.shape[1] == len(classes[task])
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    baseline = pq.read_table(folder / "baseline_logreg.parquet").to_pandas()
    assert (baseline[["doc_id", "task", "fold"]].values == rows[["doc_id", "task", "fold"]].values).all()


def test_evaluate_predict_and_embed_use_the_trained_models(trained):
    root, manifest, _ = trained
    runner = CliRunner()
    cache = ["--cache", str(root / "cache")]
    evaluated = runner.invoke(app, ["evaluate", str(root / "run" / "hilbert"), str(manifest), *cache,
                                    "--output", str(root / "eval.json")])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((root / "eval.json").read_text())
    assert metrics["topic/auc"] > 0.6  # seen documents: a sanity check, not a result
    # Every document was in some fold's training or validation split, and the command says so.
    assert metrics["documents/seen_in_training"] == metrics["documents/evaluated"] == 120
    assert "not held-out" in " ".join(evaluated.output.split())
    refused = runner.invoke(app, ["evaluate", str(root / "run" / "hilbert"), str(manifest), *cache, "--seen", "refuse"])
    assert refused.exit_code == 2 and "120 of 120 documents" in " ".join(refused.output.split())
    assert runner.invoke(app, ["evaluate", str(root / "run" / "hilbert"), str(manifest), *cache,
                               "--seen", "ignore"]).exit_code == 2

    predicted = runner.invoke(app, ["predict", str(root / "run" / "hilbert"), str(manifest), str(root / "p.parquet"), *cache])
    assert predicted.exit_code == 0, predicted.output
    table = pq.read_table(root / "p.parquet").to_pandas()
    assert len(table) == 120
    topic_columns = [c for c in table.columns if c.startswith("topic/p/")]
    np.testing.assert_allclose(table[topic_columns].sum(axis=1), 1.0, rtol=1e-5)
    assert set(table["topic"]) <= {c.split("/")[-1] for c in topic_columns}

    embedded = runner.invoke(app, ["embed", str(root / "run" / "hilbert" / "fold_1"), str(manifest),
                                   str(root / "e.parquet"), *cache])
    assert embedded.exit_code == 0, embedded.output
    rows = pq.read_table(root / "e.parquet").to_pylist()
    first = rows[0]
    assert len(first["joint_embedding"]) == 64 and len(first["audio_embedding"]) == 64
    pooling = np.array(first["audio_pooling"])  # [heads, segments], a distribution over segments
    assert pooling.shape[1] == first["segments"]
    np.testing.assert_allclose(pooling.sum(axis=1), 1.0, rtol=1e-5)


def test_evaluate_refuses_an_unknown_class_naming_document_and_field(trained):
    root, manifest, _ = trained
    lines = manifest.read_text().splitlines()
    record = json.loads(lines[0])
    record["labels"]["topic"] = "astrology"
    relabelled = root / "corpus" / "relabelled.jsonl"
    relabelled.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    result = CliRunner().invoke(app, ["evaluate", str(root / "run" / "hilbert"), str(relabelled),
                                      "--cache", str(root / "cache")])
    assert result.exit_code == 2
    assert f"doc_id {record['doc_id']!r}" in result.output and "labels.topic" in result.output
    assert "astrology" in result.output


def test_evaluate_marks_undefined_scores_and_names_tasks_it_cannot_score(trained):
    """One class left in a task (AUC undefined) and a task the model never learnt: the table says
    so instead of printing nan, and the extra task is named, not silently dropped."""
    root, manifest, _ = trained
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    voice = next(r["labels"]["voice"] for r in records if r["labels"].get("voice"))
    for record in records:
        record["labels"] = {**record["labels"], "voice": voice, "mood": "calm"}
    changed = root / "corpus" / "one-voice.jsonl"
    changed.write_text("".join(json.dumps(record) + "\n" for record in records))
    result = CliRunner().invoke(app, ["evaluate", str(root / "run" / "hilbert"), str(changed),
                                      "--cache", str(root / "cache"), "--output", str(root / "one-voice.json")],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    voice_row = next(line for line in result.output.splitlines() if line.strip("│ ").startswith("voice"))
    assert "nan" not in result.output and voice_row.split("│")[3].strip() == "-", result.output
    assert "AUC needs labelled documents of two classes" in result.output
    assert "not scored: task(s) 'mood'" in " ".join(result.output.split())
    assert json.loads((root / "one-voice.json").read_text())["voice/auc"] is None  # JSON has no NaN
