"""What a version's model accepts, as every stage asks it: the input columns.

A guarded model (``serving/guarded_model.py``) carries its data contract; any other
pyfunc model carries an input signature. The gates compare versions' columns, batch
scoring reads files with their types: both ask here.
"""

from __future__ import annotations

from mlflow.exceptions import MlflowException


def input_columns(pyfunc) -> dict[str, tuple[str, bool]] | None:
    """``{column: (MLflow type name, required)}`` of a loaded pyfunc model, or None.

    Reads the contract of a guarded model, else the input signature of any other.
    """
    contract = _contract(pyfunc)
    if contract is not None:
        return {c["name"]: (c["type"], not c["nullable"]) for c in contract["columns"]}
    schema = pyfunc.metadata.get_input_schema()
    if schema is None or not schema.has_input_names():
        return None
    return {
        str(spec.name): (getattr(spec.type, "name", str(spec.type)), spec.required)
        for spec in schema.inputs
    }


def ignored_columns(pyfunc) -> frozenset[str]:
    """The columns a loaded guarded model accepts and drops unused (its contract's
    ``ignored_columns``: identifiers and constants training dropped); none for any other."""
    return frozenset(map(str, (_contract(pyfunc) or {}).get("ignored_columns", ())))


def _contract(pyfunc) -> dict | None:
    """A guarded model's data contract; None for any other model."""
    try:
        return getattr(pyfunc.unwrap_python_model(), "contract", None)
    except MlflowException:  # not a python model (e.g. the plain sklearn flavor)
        return None
