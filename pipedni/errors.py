"""User-facing error types: what a user did wrong, with the value and the fix in the message."""

import contextlib


class PipeDNIError(Exception):
    """Base of every error pipedni raises on purpose."""


class ConfigError(PipeDNIError, ValueError):
    """A config file or override names an unknown key, a wrong type or an impossible value."""


class PartitionError(PipeDNIError, ValueError):
    """A model cannot be split as asked, or one stage cannot take the previous stage's output."""


class DataError(PipeDNIError, ValueError):
    """A data set is missing or malformed."""


class LaunchError(PipeDNIError, ValueError):
    """The process layout does not fit the config (world size, devices, backend)."""


class TransportError(PipeDNIError, RuntimeError):
    """A message did not arrive in time, or arrived with the wrong header."""


class DivergenceError(PipeDNIError, RuntimeError):
    """Training produced a non-finite loss or gradient (``train.on_nonfinite: stop``)."""


class CheckpointError(PipeDNIError, RuntimeError):
    """A checkpoint cannot be written, found or loaded into this run."""


# Errors the CLI reports as one line: exit code 2 (user mistakes, a checkpoint that cannot be
# written or read), 1 for a run that failed on its way (RUN_FAILURES: a lost neighbour, divergence).
USER_ERRORS = (ConfigError, PartitionError, DataError, LaunchError, TransportError, DivergenceError,
               CheckpointError)
RUN_FAILURES = (TransportError, DivergenceError)


@contextlib.contextmanager
def same_on_every_rank():
    """Mark user errors raised inside as identical on all ranks (config, data, layout), so only
    rank 0 prints them instead of N copies of one line."""
    try:
        yield
    except PipeDNIError as err:
        err.on_every_rank = True
        raise


@contextlib.contextmanager
def among_stages(who: str, what: str):
    """A collective of every stage (``who`` waits in it for ``what``): a stage that has gone, and
    whose own error says why, becomes one line here instead of gloo's or NCCL's traceback."""
    try:
        yield
    except RuntimeError as err:
        if isinstance(err, PipeDNIError):
            raise
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        lost = TransportError(f"{who} lost another stage during {what} (it exited or crashed; its own error says "
                              f"why): {detail[:120]}")
        lost.neighbour_lost = True  # a consequence: the CLI lets the other stage's own error go first
        raise lost from None

