"""The torch-free edge request path on an exported head: :func:`splitinfer.head.run_head` with the head's
:class:`~splitinfer.head.ExitPolicy`, then the codec at the split (:mod:`splitinfer.codec_numpy`)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from edge_agent.onnx_head.runtime import OnnxHead
from splitinfer.errors import ConfigError, InvalidInput
from splitinfer.head import run_head, top1
from splitinfer.imaging import normalise


@dataclass
class EdgeDecision:
    """What the edge does with one request: answer from an exit / the full model, or offload ``payload``."""

    decided_by: int | str
    """Exit boundary, ``num_stages`` (edge-only plan), or ``"cloud"`` (send ``payload`` with ``meta``)."""
    label: int | None = None
    confidence: float | None = None
    split: int = 0
    codec: str | None = None
    payload: bytes | None = None
    meta: dict = field(default_factory=dict)
    exit_scores: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"decided_by": self.decided_by, "label": self.label, "confidence": self.confidence, "split": self.split,
             "codec": self.codec, "meta": self.meta, "exit_scores": {str(k): v for k, v in self.exit_scores.items()}}
        d["payload_b64"] = None if self.payload is None else base64.b64encode(self.payload).decode()
        return d


class NumpyEdge:
    """The edge request path without torch: the head and its exits (ONNX Runtime) walked by
    :func:`splitinfer.head.run_head` under the head's :class:`~splitinfer.head.ExitPolicy` (the first exit whose
    score reaches its threshold answers), then the codec at the split (numpy; the learned codec's encoder on
    ONNX Runtime). Transport, drift, adaptation and metrics are not part of it."""

    def __init__(self, head: OnnxHead, split: int | None = None, exits: Sequence[int] | None = None,
                 codec: str | None = None):
        """``split`` defaults to the planned one. ``exits`` (the enabled ones) default to those of the exported
        configuration at that split (else every exit); the plan's rule picks the ones evaluated
        (:meth:`splitinfer.plan.Plan.exits_at`). ``codec`` defaults to the exported configuration's, else the
        plan's where it applies (:meth:`~splitinfer.plan.Plan.codec_at`)."""
        self.head = head
        m, plan = head.manifest, head.plan
        self.split = m.split if split is None else int(split)
        if not 0 <= self.split <= m.num_stages:
            raise InvalidInput(f"split {self.split} outside 0..{m.num_stages}")
        known = next((c for c in m.configs if c.split == self.split), None)  # the plan's or an operating point's
        if plan is not None:
            enabled = exits if exits is not None else (known.exits if known is not None else None)
            self.exits = plan.exits_at(self.split, enabled, head.exit_boundaries)
            name = codec if codec is not None else (known.codec if known is not None else plan.codec_at(self.split))
            if self.split < m.num_stages and not plan.codec_applies(name, self.split):
                raise InvalidInput(f"codec {name!r} cannot be used at split {self.split}")
        elif known is not None and exits is None and codec is None:
            self.exits, name = list(known.exits), known.codec
        else:
            raise ConfigError("this export carries no plan.json (made by an older version): pass its bundle, or "
                              "export it again, to choose a split, exits or codec it was not exported for")
        self.codec = name
        self.encoder = head.codec(name, self.split) if self.split < m.num_stages else None
        self.policy = head.policy()

    def normalise(self, images: np.ndarray) -> np.ndarray:
        """uint8 images -> the normalised float32 input (:func:`splitinfer.imaging.normalise`)."""
        i = self.head.manifest.input
        return normalise(images, i.mean, i.std)

    def infer(self, x: np.ndarray) -> EdgeDecision:
        """One normalised input ``[1, C, H, W]`` -> the decision (and the payload when offloading)."""
        out = run_head(self.head, self.policy, x, self.split, self.exits)
        scored = {c.boundary: c.score for c in out.checks}
        if out.exit is not None:
            return EdgeDecision(out.exit.boundary, out.exit.label, out.exit.confidence, self.split,
                                exit_scores=scored)
        if self.encoder is None:  # the whole model ran on the edge: its logits answer
            confidence, label = top1(out.tensor)
            return EdgeDecision(self.split, label, confidence, self.split, exit_scores=scored)
        payload, meta = self.encoder.encode(out.tensor)
        return EdgeDecision("cloud", None, None, self.split, self.codec, payload, meta, scored)
