"""The registered model's code, as MLflow runs it: a pyfunc "model from code".

dltrain.registry.mlflow_model logs this file with `mlflow.pyfunc` (python_model=<this file>),
with the safetensors weights and their card as the model's artifacts and, as its code, the
modules of dltrain that this file imports (dltrain.model.weights, the artifact keys and what
they need; not the training or Ray code). MLflow loads the model by running this file, never
by unpickling an object, and the weights are read by dltrain.model.weights (safetensors, every
tensor checked against the card): so `mlflow.pyfunc.load_model("models:/mnist-mlp@champion")`
and `mlflow models serve` run no code that a model file brings, and need numpy, safetensors and
mlflow only (no torch).

Input: a batch of uint8 images (N, 28, 28), the model's signature; MLflow's schema enforcement
also reshapes a one-column DataFrame of 784-long rows into that. Output: class probabilities
(N, 10) float32, the same numbers `dltrain predict` takes its class from.
"""

import mlflow
import numpy as np

from dltrain.model.weights import load_weights, probabilities
from dltrain.registry.mlflow_model import ARTIFACT_CARD, ARTIFACT_WEIGHTS


class MnistMLP(mlflow.pyfunc.PythonModel):
    """The MLP over the weights in the model's artifacts."""

    def load_context(self, context):
        self.state, self.card = load_weights(context.artifacts[ARTIFACT_WEIGHTS],
                                             context.artifacts[ARTIFACT_CARD])

    # np.ndarray: a type hint MLflow infers no schema from (the signature is logged with the
    # model) and validates nothing against; without a hint it warns on every load.
    def predict(self, context, model_input: np.ndarray, params=None):
        return probabilities(self.state, np.asarray(model_input))


mlflow.models.set_model(MnistMLP())
