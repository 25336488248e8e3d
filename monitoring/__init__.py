"""Monitoring: what each served version saw and answered, against what it learned.

Public surface:
    read_log -- the inference log of a model in a window (the writer is serving.inference_log);
    feedback -- store labels that arrived later (``stageflow feedback``);
    monitor, MonitorResult -- drift, live metrics and alarms per version (``stageflow monitor``);
    parse_duration, Window -- ``--since 15m`` and the window it means;
    MONITORING_EXPERIMENT -- where feedback and monitoring runs live.
The reference distributions a version is trained with: ``monitoring.reference``.
"""

from monitoring.assess import MonitorResult, VersionReport, monitor
from monitoring.labels import MONITORING_EXPERIMENT, FeedbackResult, feedback
from monitoring.read import read_log
from monitoring.window import DEFAULT_SINCE, Window, parse_duration

__all__ = [
    "DEFAULT_SINCE",
    "MONITORING_EXPERIMENT",
    "FeedbackResult",
    "MonitorResult",
    "VersionReport",
    "Window",
    "feedback",
    "monitor",
    "parse_duration",
    "read_log",
]
