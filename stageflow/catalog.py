"""The names users choose from -- data sets, tasks, model families -- with no heavy imports.

The command line builds its ``--help`` from these, so they must import in
milliseconds; the loaders and estimators they name live in ``data`` and ``families``.
"""

CLASSIFICATION = "classification"
REGRESSION = "regression"
TASKS = (CLASSIFICATION, REGRESSION)
# The metric each task is judged by first, and whether higher is better.
PRIMARY_METRIC = {CLASSIFICATION: ("accuracy", True), REGRESSION: ("rmse", False)}
# Where a trained version's run keeps its held-out test split (the gates score it).
TEST_SPLIT_ARTIFACT = "data/test.parquet"

BUILTIN_PREFIX = "builtin:"
# scikit-learn's bundled data sets (``sklearn.datasets.load_NAME``): no download, work offline.
BUILTINS = ("breast_cancer", "diabetes", "digits", "iris", "wine")
BUILTIN_TARGET = "target"

LR, RF, HGB = "lr", "rf", "hgb"
FAMILIES = (LR, RF, HGB)
FAMILY_NAMES = {
    LR: "logistic / linear regression",
    RF: "random forest",
    HGB: "histogram gradient boosting",
}

# The experiments Stageflow itself writes to, beside each model's own.
LEDGER_EXPERIMENT = "stageflow-ledger"  # every stage transition and gate decision
BATCH_EXPERIMENT = "stageflow-batch"  # every batch scoring run
INFERENCE_EXPERIMENT = "stageflow-inference"  # the inference log's segments, per version
MONITORING_EXPERIMENT = "stageflow-monitoring"  # monitoring windows and labels
