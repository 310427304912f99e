"""Keep the cyclic garbage collector off the objects a daemon loads once.

A loaded bundle is hundreds of thousands of long-lived Python objects (modules, parameters, protobuf
descriptors, the ONNX sessions' wrappers). CPython's collector walks every tracked object of a generation when
it collects it, so each full collection, triggered every few hundred thousand allocations by the per-request
messages and tensors, stalls the event loop for as long as that walk takes: a latency spike that
lands on whichever requests are in flight. :func:`freeze_loaded` collects once and moves everything alive into
the permanent generation (:func:`gc.freeze`), so later collections walk only what requests allocate. The
daemons call it after loading their models and again after a model is reloaded or unloaded: it unfreezes first,
so cyclic garbage left by a retired model is collected then (a full collection: tens to hundreds of
milliseconds, on an administrative call). Set ``SPLITINFER_NO_GC_FREEZE=1`` to keep the default behaviour.
"""

from __future__ import annotations

import gc
import os

DISABLE_ENV = "SPLITINFER_NO_GC_FREEZE"


def freeze_loaded() -> int:
    """Unfreeze, collect, then freeze every surviving object; returns the frozen count (0: disabled)."""
    if os.environ.get(DISABLE_ENV) == "1":
        return 0
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
