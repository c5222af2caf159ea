"""User-facing errors: each carries one paragraph that names the culprit and the fix."""


class PipelineError(Exception):
    """A mistake the user can fix; stages print its message without a traceback."""


class ConfigError(PipelineError):
    """params.yaml holds a key or value the pipeline cannot use."""


class DataError(PipelineError):
    """An input file is missing, truncated or not what it claims to be."""


class FetchError(PipelineError):
    """No mirror could deliver a verified copy of a file."""


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite."""


class ExportError(PipelineError):
    """An exported model failed its own check or was fed bad input."""


class DiskFull(PipelineError):
    """A write ran out of space; nothing partial was kept."""
