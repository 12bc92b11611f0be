"""Serving a registered hilbert model the MLflow way, without pickle.

- :mod:`hilbert.serving.requests`: documents of a request (rows with doc_id, audio, segments)
  checked with the manifest's own validation, every defect named by document and field.
- :mod:`hilbert.serving.served`: a loaded model with its encoders; features computed in the
  calling process (no Ray), optionally through a feature cache.
- :mod:`hilbert.serving.pyfunc`: the ``python_function`` flavour written as *models from code*
  (:mod:`hilbert.serving.pyfunc_model` is the file MLflow imports), its signature and input
  example, and :func:`~hilbert.serving.pyfunc.write_pyfunc_files`, which puts ``MLmodel`` beside a
  staged checkpoint folder so one folder serves ``hilbert predict`` and ``mlflow models serve``.
"""
