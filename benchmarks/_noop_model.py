"""The serving floor: a pyfunc model (from code) that answers 0 for every row, doing no work.

``benchmarks/serving_throughput.py`` serves it with ``mlflow models serve``, so the
figures show what the server itself costs per request.
"""

import mlflow
import numpy as np
import pandas as pd


class NoOp(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        return np.zeros(len(model_input))


mlflow.models.set_model(NoOp())
