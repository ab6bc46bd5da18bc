"""Logging: the Prefect run logger inside a flow or task run, the `drplan` logger elsewhere (CLI, sandbox)."""

import logging

from prefect import get_run_logger
from prefect.exceptions import MissingContextError


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("drplan")
