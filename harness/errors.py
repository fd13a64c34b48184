"""Typed exceptions shared by the harness. Each carries the exit code the CLI uses."""

from __future__ import annotations


class TandemError(Exception):
    """Base of every error the harness raises on purpose."""

    exit_code = 3


class ConfigError(TandemError, ValueError):
    """A suite, case or option is malformed: the message names the key path and the value."""

    exit_code = 2


class DataError(TandemError, ValueError):
    """An input file (weights, tokens, results) is missing or malformed."""

    exit_code = 2


class EngineError(TandemError):
    """libtandem returned a non-OK status; `status` is its name, the message is the engine's."""

    exit_code = 3

    def __init__(self, message: str, status: str = "TD_ERR_INTERNAL"):
        super().__init__(message)
        self.status = status


class RankFailure(TandemError):
    """A pipeline rank failed or the job did not finish in time."""

    exit_code = 3


class ParityFailure(TandemError):
    exit_code = 1
