"""What every stage script shares: argument parsing, params, clean error exits."""

from __future__ import annotations

import argparse
import os
import sys
import typing
from pathlib import Path
from typing import Callable

from .config import ConfigError, Params, load_params


def repo_root() -> Path:
    """The DVC repository root: DVC_ROOT under dvc (also for --temp/--queue runs), else cwd."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (`prog: error: ...`) and exit status 2,
    instead of the usage text followed by the error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser(description: str) -> argparse.ArgumentParser:
    p = OneLineParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def load(args: argparse.Namespace) -> Params:
    return load_params(args.params)


def die_with_launcher() -> None:
    """Under torchrun on Linux: end this worker when the launcher dies, even by SIGKILL.

    torchrun's workers otherwise outlive it: a killed `dvc repro` would leave
    training running, writing the checkpoint a rerun is also writing.
    """
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes
    import signal

    launcher = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != launcher:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def log(message: str) -> None:
    print(message, flush=True)


# Errors whose message already says what is wrong and how to fix it: print it
# alone, without a traceback, and exit non-zero.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError)


def run(main: Callable[[], None], expected: tuple[type[BaseException], ...] = ()) -> None:
    """Run a stage's main(); an expected error becomes one line on stderr and exit 2.

    A worker of the train stage's own launcher hands its line to the launcher
    instead (torch's per-worker error file), which prints the first failure once.
    """
    try:
        main()
    except EXPECTED_ERRORS + expected as err:
        report_error(f"error: {err}")
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


LAUNCHED_ENV = "DDPM_LAUNCHED"  # set by train.stage.launch for its workers


def report_error(line: str) -> None:
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if os.environ.get(LAUNCHED_ENV) and error_file:
        import json
        import time

        Path(error_file).write_text(json.dumps(
            {"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}))
    else:
        print(line, file=sys.stderr, flush=True)
