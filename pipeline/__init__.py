"""MNIST training pipeline: the course's models as DVC stages, orchestrated by Prefect."""

import os

# TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notices) says nothing a user can act on.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Log records of the pipeline's own modules go to Prefect (dashboard) as well as to the terminal.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline")
# No telemetry from a temporary Prefect server (its heartbeat can also hit "database is locked").
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
