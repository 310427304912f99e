"""Progress bars that appear only where someone watches: on a terminal.

Every long loop (training, profiling, the demo's requests) shows a tqdm bar on stderr when its command's
``--progress`` is on (the default) *and* stderr is a terminal. Redirected to a file, a journal or a CI log,
a bar would write hundreds of carriage-return updates, so it stays silent there.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr, disabled unless ``enabled`` and stderr is a terminal."""
    stream = kwargs.pop("file", sys.stderr)
    shown = enabled and hasattr(stream, "isatty") and stream.isatty()
    return tqdm(iterable, file=stream, disable=not shown, **kwargs)
