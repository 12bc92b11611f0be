"""The figures of a trial, drawn from its fold models' test predictions.

A trial ends with one model per cross-validation fold; each predicts its fold's test documents
(:mod:`hilbert.train.out_of_fold`), so every document gets one honest prediction per
repeat, never seen in training: the ROC curves and confusion matrices of the whole corpus
rather than of one small fold (the first repeat's rows, each document once). The CKA, expert
and attention figures read one fold model's documents only (embedding spaces and expert numbers
of different fold models are unrelated).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from matplotlib.figure import Figure

from hilbert.train.out_of_fold import OutOfFold
from hilbert.sweep.plots import (confusion_matrices, cka_matrix, expert_utilisation, layer_weights, roc_curves,
                                 segment_attention)


def trial_figures(outputs: OutOfFold, classes: Mapping[str, Sequence[str]] | None = None) -> dict[str, Figure]:
    """Figures for a trial's run, by artifact name.

    ROC curves and confusion matrices pool the out-of-fold predictions of the first repeat; CKA,
    expert use and segment attention come from the reference fold's model alone (see the module
    docstring). ``classes`` defaults to the plan's class names.
    """
    classes = classes if classes is not None else outputs.classes
    once = outputs.first_repeat()
    labels = {task: values[once] for task, values in outputs.labels.items()}
    probabilities = {task: values[once] for task, values in outputs.probabilities.items()}
    figures = {"roc_curves": roc_curves(labels, probabilities, classes),
               "confusion_matrices": confusion_matrices(labels, probabilities, classes)}
    rows = outputs.rows_of(outputs.reference_fold)
    if rows.sum() >= 2:
        figures["cka"] = cka_matrix({name: embedding[rows] for name, embedding in outputs.embeddings.items()})
    if outputs.gates is not None and rows.any():
        figures["expert_utilisation"] = expert_utilisation(outputs.gates[rows])
    if outputs.attention:
        figures["segment_attention"] = segment_attention(outputs.attention, outputs.attention_doc_ids,
                                                         outputs.modalities)
    if outputs.layer_weights:  # layer=all features: what each fold model learned to read
        figures["layer_weights"] = layer_weights(outputs.layer_weights)
    return figures
