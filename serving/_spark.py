"""Batch scoring on Spark: the guarded model as ``mlflow.pyfunc.spark_udf`` over a DataFrame.

The ``spark`` engine of :func:`serving.batch.score`. pyspark is the optional
``stageflow[spark]`` extra and Spark needs Java, so both are checked before
anything slow and named in one line when missing. The model runs with
``on_invalid: mark``: a row its data contract refuses gets a null prediction and
the problem in ``guard_problem``; the job goes on.

In a process that already runs a SparkSession (a notebook's, a Spark job's), the
job runs on that session's SparkContext, in a session of its own settings
(``newSession``), and leaves it running. Otherwise Spark starts for the job and
stops after it: bound to loopback (``SPARK_LOCAL_IP``, ``spark.driver.host``; on a
cluster, ``STAGEFLOW_SPARK_DRIVER_HOST`` names the address executors reach), with
its UI off, its log at ERROR and its scratch space in a temporary directory
removed when it stops; its Python workers run this interpreter.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from serving.batch import (
    PREDICTION_COLUMN,
    VERSION_COLUMN,
    Scored,
    data_files,
)
from serving.guarded_model import GUARD_PROBLEM, PREDICTION, REGRESSION
from stageflow import files
from stageflow.contract import input_columns
from stageflow.errors import StageflowError, UsageError

logger = logging.getLogger(__name__)

DEFAULT_MASTER = "local[*]"
LOOPBACK = "127.0.0.1"
# The address Spark's driver binds and advertises. Loopback unless the operator names the
# one a cluster's executors can reach (they connect back to the driver).
DRIVER_HOST_ENV = "STAGEFLOW_SPARK_DRIVER_HOST"
INSTALL_HINT = "pip install 'stageflow[spark]'"
JAVA_HINT = (
    "Spark needs Java 17 or newer: install a JDK (Debian/Ubuntu: `make java-deps`) "
    "and put `java` on PATH or set JAVA_HOME"
)
_OUT = "__stageflow_scored"
_CAST_PROBLEM = "__stageflow_cast_problem"
# pandas.read_csv's default missing-value markers (its `na_values` docs): the local engine
# reads these as missing, so Spark's CSV reader must too, or the engines would disagree.
PANDAS_NA_TEXT = (
    "",
    "#N/A",
    "#N/A N/A",
    "#NA",
    "-1.#IND",
    "-1.#QNAN",
    "-NaN",
    "-nan",
    "1.#IND",
    "1.#QNAN",
    "<NA>",
    "N/A",
    "NA",
    "NULL",
    "NaN",
    "None",
    "n/a",
    "nan",
    "null",
)
# spark_udf casts a struct field of strings with `astype(str)`, so a null `guard_problem`
# arrives as this text (mlflow/pyfunc/__init__.py, _convert_struct_values). The predictions
# of such rows are kept; the text is turned back into a null.
_UDF_NULL_TEXT = ("<NA>", "None", "nan")
_QUIET_LOG4J = """\
rootLogger.level = error
logger.repl.name = org.apache.spark.repl.Main
logger.repl.level = error
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{HH:mm:ss} %p %c{1}: %m%n
"""


def require_engine() -> None:
    """pyspark importable and a Java runtime findable, else one line saying what to install.

    Raises:
        UsageError: naming what is missing and how to install it.
    """
    try:
        import pyspark  # noqa: F401, PLC0415 - the optional extra
    except ImportError:
        raise UsageError(
            f"--engine spark needs pyspark, which is not installed: {INSTALL_HINT}"
        ) from None
    if java_executable() is None:
        home = os.environ.get("JAVA_HOME")
        where = f"JAVA_HOME={home} has no bin/java" if home else "no `java` on PATH, no JAVA_HOME"
        raise UsageError(f"{JAVA_HINT} ({where})")


def java_executable() -> str | None:
    """The ``java`` Spark will start: ``$JAVA_HOME/bin/java`` if set (as spark-submit does),
    else the one on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home:
        candidate = Path(home) / "bin" / "java"
        return str(candidate) if os.access(candidate, os.X_OK) else None
    return shutil.which("java")


def check_paths(input_path, output_path) -> tuple[Path, Path]:
    """A CSV or Parquet file or directory of parts in; a new directory of Parquet parts out."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.exists():
        raise UsageError(f"input {input_path} does not exist")
    input_format(input_path)
    if output_path.suffix.lower() == ".csv":
        raise UsageError(
            f"output {output_path}: Spark writes a directory of Parquet parts; "
            "name a directory (e.g. scored/ or scored.parquet)"
        )
    if output_path.exists():
        raise UsageError(f"output {output_path} already exists; choose a new path or remove it")
    if not output_path.parent.is_dir():
        raise UsageError(f"output folder {output_path.parent} does not exist")
    return input_path, output_path


def input_format(path: Path) -> str:
    """``csv`` or ``parquet``: a file's suffix, or the one suffix of a directory's parts."""
    if path.is_file():
        suffixes = {path.suffix.lower()}
    else:
        parts = data_files(path)
        if not parts:
            raise UsageError(f"input directory {path} holds no data files")
        suffixes = {p.suffix.lower() for p in parts}
    if suffixes == {".csv"}:
        return "csv"
    if suffixes == {".parquet"}:
        return "parquet"
    raise UsageError(
        f"input {path} must be .csv or .parquet files (found {', '.join(sorted(suffixes))})"
    )


def score(
    model: str,
    version: str,
    input_path: Path,
    output_path: Path,
    config: dict,
    id_column: str | None,
    master: str | None,
    model_dir: Path,
) -> Scored:
    """Score ``input_path`` on Spark into Parquet parts at ``output_path``.

    The output has the input's columns, ``prediction``, ``model_version`` and
    ``guard_problem``. Under ``on_invalid: fail`` the job still runs to the end,
    then fails naming how many rows were refused, and leaves no output.
    """
    import mlflow  # noqa: PLC0415

    # The copy batch.score verified: the driver and the executors load the same files.
    uri = str(model_dir)
    pyfunc = mlflow.pyfunc.load_model(uri)
    contract = getattr(pyfunc.unwrap_python_model(), "contract", None)
    if contract is None:
        raise StageflowError(f"{model} version {version} is not a Stageflow guarded model")
    spec = input_columns(pyfunc)

    with session(master) as spark:
        master = spark.conf.get("spark.master")  # the caller's, when its session is used
        frame = _read(spark, input_path, spec, id_column)
        udf_config = {**config, "on_invalid": "mark"}
        scored = _apply(spark, frame, uri, udf_config, contract, spec, version)
        # Spark writes into a folder of a random name made exclusively beside the output,
        # so a link planted at a guessable name is never followed.
        scratch = files.folder_beside(output_path)
        staged = scratch / "out"
        try:
            return _write(spark, scored, staged, output_path, input_path, config, master)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _write(spark, scored, staged: Path, output_path: Path, input_path: Path, config, master):
    """Write the scored frame at ``staged``, count it, and rename it onto ``output_path``.

    What is left at ``staged`` on a refusal goes with its scratch folder (the caller's).
    """
    try:
        scored.write.mode("errorifexists").parquet(str(staged))
        counts = spark.read.parquet(str(staged)).groupBy(GUARD_PROBLEM).count().collect()
    except Exception as exc:  # noqa: BLE001 - Spark raises its own types, from the JVM
        raise _explained(exc, input_path) from None
    rows = sum(r["count"] for r in counts)
    refused = Counter({r[GUARD_PROBLEM]: r["count"] for r in counts if r[GUARD_PROBLEM]})
    if config["on_invalid"] == "fail" and refused:
        listed = ", ".join(f"{p}: {n}" for p, n in sorted(refused.items()))
        raise UsageError(
            f"{input_path}: the model's contract refused {sum(refused.values())} of "
            f"{rows} rows ({listed}); --on-invalid mark scores the rest"
        )
    if rows == 0:
        raise UsageError(f"{input_path} has no rows to score")
    os.replace(staged, output_path)
    parts = len(data_files(output_path))
    return Scored(rows=rows, refused=refused, detail={"master": master, "output_parts": parts})


def _read(spark, path: Path, spec: dict, id_column: str | None):
    """The input as a DataFrame typed by the contract; a cast that fails marks its row.

    CSV is read as text and cast here (Spark's own CSV typing would turn a
    non-number into null, silently); Parquet keeps its types.
    """
    from pyspark.sql import functions as F  # noqa: PLC0415
    from pyspark.sql.types import NumericType, StringType, StructField, StructType  # noqa: PLC0415

    fmt = input_format(path)
    if fmt == "csv":
        header = _csv_header(path)
        schema = StructType([StructField(name, StringType()) for name in header])
        frame = spark.read.csv(
            str(path), header=True, schema=schema, enforceSchema=False, mode="FAILFAST"
        )
        frame = frame.select(
            [
                F.when(F.col(_quoted(c)).isin(*PANDAS_NA_TEXT), None)
                .otherwise(F.col(_quoted(c)))
                .alias(c)
                for c in header
            ]
        )
    else:
        frame = spark.read.parquet(str(path))
    columns = frame.columns
    missing = [c for c in spec if c not in columns]
    if missing:
        raise UsageError(f"{path} lacks column(s) the model needs: {', '.join(missing)}")
    if id_column and id_column not in columns:
        raise UsageError(
            f"{path} has no id column {id_column!r}; its columns: {', '.join(columns)}"
        )

    types = dict(frame.dtypes)
    failed = []
    casts = {}
    for name, (kind, _) in spec.items():
        target = {"double": "double", "boolean": "boolean"}.get(kind)
        if target is None or types[name] == target:
            continue
        field_type = frame.schema[name].dataType
        if fmt == "parquet" and not isinstance(field_type, NumericType):
            continue  # a Parquet column of the wrong type: the guard marks each row
        cast = F.col(_quoted(name)).try_cast(target)
        failed.append(F.col(_quoted(name)).isNotNull() & cast.isNull())
        casts[name] = cast
    # The failed casts are judged on the text, before the typed columns replace it.
    if failed and fmt == "csv":
        any_failed = failed[0]
        for condition in failed[1:]:
            any_failed = any_failed | condition
        frame = frame.withColumn(_CAST_PROBLEM, F.when(any_failed, F.lit("wrong_type")))
    else:
        frame = frame.withColumn(_CAST_PROBLEM, F.lit(None).cast("string"))
    return frame.withColumns(casts) if casts else frame


def _apply(spark, frame, uri: str, config: dict, contract: dict, spec: dict, version: str):
    """``frame`` with ``prediction``, ``model_version`` and ``guard_problem`` from the UDF."""
    import mlflow  # noqa: PLC0415
    from pyspark.sql import functions as F  # noqa: PLC0415

    label, final = _prediction_types(contract)
    udf = mlflow.pyfunc.spark_udf(
        spark,
        uri,
        result_type=f"{PREDICTION} {label}, {GUARD_PROBLEM} string",
        env_manager="local",
        model_config=config,
    )
    features = F.struct(*[F.col(_quoted(c)) for c in spec])
    inputs = [c for c in frame.columns if c != _CAST_PROBLEM]
    out = frame.withColumn(_OUT, udf(features))
    problem = F.col(f"{_OUT}.{GUARD_PROBLEM}")
    problem = F.when(~problem.isin(*_UDF_NULL_TEXT), problem)
    problem = F.coalesce(F.col(_CAST_PROBLEM), problem)
    prediction = F.col(f"{_OUT}.{PREDICTION}")
    if final != label:
        prediction = prediction.cast(final)
    return out.select(
        *[F.col(_quoted(c)) for c in inputs],
        F.when(problem.isNull(), prediction).alias(PREDICTION_COLUMN),
        F.lit(int(version)).cast("long").alias(VERSION_COLUMN),
        problem.alias(GUARD_PROBLEM),
    )


def _prediction_types(contract: dict) -> tuple[str, str]:
    """The UDF's prediction type and the output's: regression values are doubles; class
    labels keep their type (integers travel as doubles: spark_udf cannot carry a null
    through an integer field)."""
    if contract["task"] == REGRESSION:
        return "double", "double"
    classes = contract["target"]["classes"]
    if all(isinstance(c, bool) for c in classes):
        return "double", "boolean"
    if all(isinstance(c, int) for c in classes):
        return "double", "long"
    if all(isinstance(c, (int, float)) for c in classes):
        return "double", "double"
    return "string", "string"


def _csv_header(path: Path) -> list[str]:
    first = path if path.is_file() else data_files(path)[0]
    with open(first, encoding="utf-8", newline="") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise UsageError(f"{first} is empty: a CSV input needs a header row")
    return header


def _quoted(name: str) -> str:
    """A column name for ``F.col``: backticks keep dots and spaces literal."""
    return "`" + name.replace("`", "``") + "`"


def _explained(exc: Exception, path: Path) -> Exception:
    """A Spark failure as one line: a malformed input is the user's; the rest is ours."""
    text = str(exc)
    first = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
    if "MALFORMED" in text or "CSV header does not conform" in text or "FAILFAST" in text:
        return UsageError(f"cannot read {path}: {first[:300]}")
    return StageflowError(f"Spark failed scoring {path}: {first[:300]}")


@contextmanager
def session(master: str | None = None) -> Iterator:
    """A SparkSession for one job: on the process's running Spark if there is one, else its own.

    A SparkSession already running here (a notebook's, a Spark job's) is used and
    left running: the job gets a ``newSession()`` of it (the same SparkContext, its
    own SQL settings, so the caller's are untouched). ``master`` must then be unset
    or that session's (a process runs one SparkContext).

    Otherwise a session is started on ``master`` (default ``local[*]``), on loopback,
    quiet, with its scratch space removed when it stops; it and the JVM it started are
    stopped with it, so a process that scores twice (a test, a benchmark) leaves
    nothing running.

    Raises:
        UsageError: ``master`` names another master than the running session's.
    """
    running = _running_session()
    if running is not None:
        yield _beside(running, master)
        return
    with _own_session(master or DEFAULT_MASTER) as spark:
        yield spark


def _running_session():
    """The SparkSession this process already runs, or None: this thread's active one, else
    the process's default one, else one on a bare running SparkContext."""
    from pyspark import SparkContext  # noqa: PLC0415
    from pyspark.errors import PySparkRuntimeError  # noqa: PLC0415
    from pyspark.sql import SparkSession  # noqa: PLC0415

    # getActiveSession is per thread; a context started on another thread still holds the
    # process's one JVM-side SparkContext, which a session of our own would take over.
    context = SparkContext._active_spark_context  # noqa: SLF001 - no public "is one running"
    if context is None:
        return None
    try:
        return SparkSession.active()  # getActiveSession(), else the default session
    except PySparkRuntimeError:
        return SparkSession(context)


def _beside(running, master: str | None):
    """A new session on ``running``'s SparkContext with the settings this job relies on."""
    used = running.conf.get("spark.master")
    if master and master != used:
        raise UsageError(
            f"Spark master {master}: this process already runs a SparkSession on {used}, "
            "and a process runs one; leave the master unset to score on that session"
        )
    spark = running.newSession()
    spark.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
    spark.conf.set("spark.sql.session.timeZone", "UTC")
    return spark


@contextmanager
def _own_session(master: str) -> Iterator:
    """A SparkSession started for one job and stopped after it, with the JVM it started."""
    from pyspark import SparkContext  # noqa: PLC0415
    from pyspark.sql import SparkSession  # noqa: PLC0415

    scratch = Path(tempfile.mkdtemp(prefix="stageflow-spark-"))
    log4j = scratch / "log4j2.properties"
    log4j.write_text(_QUIET_LOG4J)
    # Spark reads these from the environment of the JVM and of its Python workers.
    host = os.environ.get(DRIVER_HOST_ENV) or LOOPBACK
    environment = {
        "SPARK_LOCAL_IP": host,
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        # Spark puts this folder first on the JVM's classpath: its log4j2.properties wins.
        "SPARK_CONF_DIR": str(scratch),
    }
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    java_options = f"-Djava.io.tmpdir={scratch} -Dlog4j2.configurationFile=file:{log4j}"
    started_jvm = SparkContext._gateway is None  # noqa: SLF001 - pyspark has no public "is a JVM up"
    logging.getLogger("py4j").setLevel(logging.WARNING)
    spark = None
    try:
        spark = (
            SparkSession.builder.master(master)
            .appName("stageflow-score")
            .config("spark.driver.host", host)
            .config("spark.driver.bindAddress", host)
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.local.dir", str(scratch))
            .config("spark.driver.extraJavaOptions", java_options)
            .config("spark.executor.extraJavaOptions", java_options)
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .config("spark.sql.session.timeZone", "UTC")
            .config("spark.executorEnv.PYSPARK_PYTHON", sys.executable)
            .getOrCreate()
        )
        spark.sparkContext.setLogLevel("ERROR")
        yield spark
    finally:
        if spark is not None:
            spark.stop()
        if started_jvm:
            _stop_jvm(SparkContext)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(scratch, ignore_errors=True)


def _stop_jvm(context_class) -> None:
    """Stop the JVM pyspark started for this process (it would outlive ``spark.stop()``)."""
    gateway = context_class._gateway  # noqa: SLF001 - shutting the JVM down is private in pyspark
    if gateway is None:
        return
    process = getattr(gateway, "proc", None)
    try:
        gateway.shutdown()
    except Exception:  # noqa: BLE001 - already gone
        logger.debug("the Spark gateway was already closed")
    context_class._gateway = None  # noqa: SLF001
    context_class._jvm = None  # noqa: SLF001
    if process is not None:
        # The JVM exits when its stdin closes (pyspark's PythonGatewayServer watches it).
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(timeout=30)
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: it must not linger
            process.kill()
            process.wait(timeout=10)
