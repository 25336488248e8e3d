"""Stageflow: the whole life of a tabular model on MLflow.

The work lives in three packages named after lifecycle stages -- ``experiments``
(train), ``registry`` (promote, roll back, status, history) and ``serving``
(serve, score). This package holds what they share: errors, the tracking
server, child processes, and the command line that is a thin door over them.
"""

__version__ = "0.1.0"
