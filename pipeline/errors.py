"""User-facing errors: each carries one paragraph that names the culprit and the fix; and redact_url, for
the URLs they (and logs) show."""

from urllib.parse import urlsplit, urlunsplit


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


def redact_url(url: str) -> str:
    """`url` fit to log or store: without user and password, each query value as '***', no fragment.

    Anything that is not a URL with a scheme (a local path) comes back as it is.
    """
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:  # not parseable (a bad port, a broken IPv6 address): nothing of it is safe to show
        return f"{url.split('://', 1)[0]}://***"
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port is not None else "")
    # key=value keeps its key; a piece without '=' (a bare token, `?abc123`) goes whole
    query = "&".join(f"{piece.split('=', 1)[0]}=***" if "=" in piece else "***" for piece in parts.query.split("&") if piece)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
