"""The logistic-regression baseline's fit: the row-space rotation it uses when documents are fewer
than feature columns reaches the same model as a fit on the raw columns."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from hilbert.train.baseline import logistic_regression


def _corpus(rows: int, columns: int, classes: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, columns))
    labels = rng.integers(0, classes, rows + 30)
    features = (centres[labels] + 2.0 * rng.normal(size=(rows + 30, columns))).astype(np.float32)
    features[:, :3] *= 50.0  # unequal column scales, as when timing columns sit beside embeddings
    return features[:rows], labels[:rows], features[rows:]


@pytest.mark.parametrize("regularisation", [0.01, 1.0, 10.0])
def test_fewer_documents_than_columns_give_the_probabilities_of_the_plain_fit(regularisation):
    train, labels, unseen = _corpus(rows=40, columns=700)
    rotated = logistic_regression(regularisation, *train.shape)
    assert len(rotated.steps) == 3  # the rotation is in use here
    plain = make_pipeline(StandardScaler(), LogisticRegression(C=regularisation, class_weight="balanced",
                                                               max_iter=20000, tol=1e-10))
    rotated.set_params(logisticregression__tol=1e-10, logisticregression__max_iter=20000)
    expected = plain.fit(train, labels).predict_proba(unseen)
    got = rotated.fit(train, labels).predict_proba(unseen)
    np.testing.assert_allclose(got, expected, atol=1e-4)  # float32 features: 5e-5 seen at C=10
    # at the solver's default tolerance both fits stop a few 1e-3 short of the optimum (plain: up
    # to 3.3e-3 on these documents, rotated: up to 2.1e-3)
    default = logistic_regression(regularisation, *train.shape).fit(train, labels).predict_proba(unseen)
    np.testing.assert_allclose(default, expected, atol=5e-3)


def test_more_documents_than_columns_fit_the_columns_directly():
    train, labels, unseen = _corpus(rows=200, columns=20)
    model = logistic_regression(1.0, *train.shape)
    assert [name for name, _ in model.steps] == ["standardscaler", "logisticregression"]
    probabilities = model.fit(train, labels).predict_proba(unseen)
    assert probabilities.shape == (30, 4) and np.allclose(probabilities.sum(axis=1), 1.0)
