"""One kind of error for bad input: every refusal derives from :class:`MegatronUniError`.

A ``MegatronUniError`` means "the input is wrong, here is which and why" in ONE line (file, key,
sample). Every CLI turns it into that line on stderr and exit status 2 (:func:`one_line_errors`);
any other exception is a bug and keeps its traceback. This module imports nothing of the package,
so every layer can use it.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

USAGE_ERROR_EXIT = 2  # what argparse uses for a bad command line; bad input files are the same kind


class MegatronUniError(Exception):
    """Bad input refused by name: the message is one line naming the offending file/sample/key."""


class DataError(MegatronUniError, ValueError):
    """A dataset, image-code store or build input that cannot be used as given."""


def one_line_errors(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a CLI ``main``: a MegatronUniError (or a missing input file) becomes
    ``prog: error: message`` on stderr and exit status 2 instead of a traceback."""

    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def guarded(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except (MegatronUniError, FileNotFoundError) as error:
                print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
                return USAGE_ERROR_EXIT
        return guarded

    return decorate


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
