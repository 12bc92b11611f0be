"""The file MLflow imports to load a hilbert model ("models from code"; see hilbert.serving.pyfunc).

A copy of it is logged with every model; the model itself comes from the installed hilbert, so
it stays this one line.
"""

from mlflow.models import set_model

from hilbert.serving.pyfunc import HilbertPythonModel

set_model(HilbertPythonModel())
