"""The tail runtime: decode split features and run the remaining stages (or the whole model).

CPU-bound and synchronous; the data plane calls it from a thread pool. Every check on what a request
carries (split range, codec name and meta, decoded shape against the plan's boundary, batch size,
finiteness) happens here or in the codec, and fails with :class:`~splitinfer.errors.InvalidInput`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from cloud_server.decode import Staged, finish_prepared
from cloud_server.tail_engines import Engine, EngineChoice
from cloud_server.tail_engines import choose as choose_engine
from splitinfer.bottleneck import LearnedCodec
from splitinfer.bundle import Bundle
from splitinfer.codec import shape_from_str
from splitinfer.errors import BundleError, InvalidInput
from splitinfer.finite import all_finite


class TailRuntime:
    """Runs ``staged.run(x, split, num_stages)`` for decoded features, or the full model for an input.

    ``engine`` (:mod:`cloud_server.tail_engines`): what runs the tail at the plan's split and at every boundary
    with a learned codec (``torch``, ``torchscript``, ``onnxruntime`` or ``auto``); ``threads`` the intra-op
    threads an ONNX Runtime engine uses (default: torch's); ``engine_splits`` where (default: the plan's split,
    its operating points' and the learned codecs' boundaries). Other splits run eagerly. ``decoder_engine``:
    what runs the learned bottlenecks' decoder networks (:class:`~splitinfer.bottleneck.LearnedCodec`'s backend:
    ``auto``, ``onnxruntime`` or ``torch``).
    """

    def __init__(self, bundle: Bundle, max_batch: int = 64, engine: str = "torch", threads: int | None = None,
                 engine_splits: Iterable[int] | None = None, decoder_engine: str = "auto"):
        self.bundle = bundle
        self.plan = bundle.plan
        self.staged = bundle.staged
        self.max_batch = max_batch
        self.staged.eval()
        if decoder_engine != "auto":  # the learned bottlenecks' decoders (the bundle builds them with "auto")
            for b, lc in list(bundle.learned_codecs.items()):
                if lc.backend != decoder_engine:
                    bundle.learned_codecs[b] = LearnedCodec(lc.bottleneck, lc.coder.max_batch, backend=decoder_engine)
        for lc in bundle.learned_codecs.values():  # refuse larger batches from the payload header, before decoding
            lc.coder.max_batch = min(lc.coder.max_batch, max_batch)
        self.engines: dict[int, Engine] = {}
        self.engine_choices: dict[int, EngineChoice] = {}
        threads = threads or torch.get_num_threads()
        for k in self._engine_splits(engine_splits):
            if 0 <= k < self.num_stages:
                shape = self.input_shape if k == 0 else self.boundary_shape(k)
                choice = choose_engine(engine, self.staged, k, shape, threads)
                self.engine_choices[k] = choice
                self.engines[k] = choice.engine

    def _engine_splits(self, asked: Iterable[int] | None) -> list[int]:
        """Splits that get an engine: ``asked``, or the plan's split, its operating points' and every learned
        codec's boundary (the edge-only split N has no tail and is skipped)."""
        if asked is None:
            return sorted({self.plan.split, *(p.split for p in self.plan.operating_points),
                           *self.bundle.learned_codecs})
        splits = sorted(set(asked))
        bad = [k for k in splits if not 0 <= k < self.num_stages]
        if bad:
            raise BundleError(f"tail engine splits {bad} out of range: this model has tails at splits "
                              f"0..{self.num_stages - 1}")
        return splits

    @property
    def model_name(self) -> str:
        return self.plan.model.name

    @property
    def num_stages(self) -> int:
        return self.staged.num_stages

    @property
    def num_classes(self) -> int:
        return self.plan.model.num_classes

    @property
    def input_shape(self) -> list[int]:
        """Per-sample input shape ``[C, H, W]`` from the plan."""
        return list(self.plan.input.shape)

    def boundary_shape(self, split: int) -> list[int]:
        """Per-sample shape of the tensor at boundary ``split``."""
        return list(self.staged.boundaries[split].shape)

    def check_split(self, split: object) -> int:
        """A valid split is an integer in ``0..num_stages-1`` (the server runs at least one stage)."""
        if isinstance(split, bool) or not isinstance(split, int | np.integer):
            raise InvalidInput(f"parameter 'split' must be an integer, got {split!r}")
        split = int(split)
        if not 0 <= split < self.num_stages:
            raise InvalidInput(f"split {split} out of range: this model accepts 0..{self.num_stages - 1}")
        return split

    def check_batch(self, batch: int, what: str) -> None:
        """Refuse an empty batch or one above ``max_batch``."""
        if batch < 1:
            raise InvalidInput(f"{what} has batch size {batch}; at least 1 sample is needed")
        if batch > self.max_batch:
            raise InvalidInput(f"{what} has batch size {batch}, above this server's max_request_batch "
                               f"{self.max_batch}")

    def _check_sample_shape(self, shape: list[int], expected: list[int], what: str, where: str) -> None:
        if len(shape) != len(expected) + 1 or shape[1:] != expected:
            raise InvalidInput(f"{what} shape {shape} does not match {where}: expected "
                               f"[B, {', '.join(map(str, expected))}]")
        self.check_batch(shape[0], what)

    def check_meta_shape(self, text: object, split: int) -> None:
        """``codec.shape`` must be ``[B, *boundary[split].shape]`` with 1 <= B <= max_batch."""
        self._check_sample_shape(shape_from_str(text), self.boundary_shape(split), "codec.shape",
                                 f"boundary {split}")

    def check_payload_size(self, nbytes: int, split: int) -> None:
        """Cheap pre-admission check: no codec needs more than float32 values plus 8 bytes per channel."""
        shape = self.boundary_shape(split)
        numel = 1
        for d in shape:
            numel *= d
        channels = shape[0] if shape else 1
        limit = self.max_batch * (4 * numel + 8 * channels) + 1024
        if nbytes > limit:
            raise InvalidInput(f"oversized features payload: {nbytes} bytes, more than any codec needs at "
                               f"boundary {split} for up to {self.max_batch} samples ({limit})")

    def decode_features(self, payload: bytes, codec_name: object, meta: Mapping[str, object],
                        split: int) -> torch.Tensor:
        """Decode a codec payload and check it is a ``[B, *boundary[split].shape]`` float tensor."""
        codec = self.bundle.codec_for(codec_name, split)
        if "shape" in meta:  # cheap check before decoding (and allocating) anything
            self.check_meta_shape(meta["shape"], split)
        return self.checked_features(codec.decode(payload, dict(meta)), split)

    def prepare_features(self, payload: bytes, codec_name: object, meta: Mapping[str, object],
                         split: int) -> torch.Tensor | Staged:
        """As :meth:`decode_features`, but the learned bottleneck stops half way (entropy-decoded symbols) so
        that its decoder network runs once for all of a batch's payloads (:class:`~cloud_server.decode.Staged`,
        finished by :func:`~cloud_server.decode.finish_prepared`)."""
        codec = self.bundle.codec_for(codec_name, split)
        synthesize = getattr(codec, "synthesize", None)
        if synthesize is None:
            return self.decode_features(payload, codec_name, meta, split)
        if "shape" in meta:
            self.check_meta_shape(meta["shape"], split)
        rows = codec.decode_symbols(payload, dict(meta))
        self.check_batch(int(rows.shape[0]), "decoded features")
        return Staged(group=("synthesize", id(codec)), rows=rows, finish=synthesize,
                      check=lambda x: self.checked_features(x, split))

    def decode_many(self, payloads: list[bytes], codecs: list[object], metas: list[Mapping[str, object]],
                    split: int) -> torch.Tensor:
        """Decode a batch's payloads into one tensor as a batch does (the learned bottleneck's decoder once
        for all of them); raises the first payload's error (for callers that fail a batch as a whole)."""
        prepared = [self.prepare_features(p, c, m, split) for p, c, m in zip(payloads, codecs, metas, strict=True)]
        ready, outcomes = finish_prepared(prepared)
        for failure in outcomes:
            if failure is not None:
                raise failure
        xs = [ready[i] for i in range(len(prepared))]
        return xs[0] if len(xs) == 1 else torch.cat(xs)

    def checked_features(self, x: torch.Tensor, split: int) -> torch.Tensor:
        """Check decoded features: ``[B, *boundary[split].shape]``, float32, finite."""
        self._check_sample_shape(list(x.shape), self.boundary_shape(split), "decoded features",
                                 f"boundary {split}")
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
        if not all_finite(x):
            raise InvalidInput("decoded features contain NaN or infinite values")
        return x

    def run_features(self, payload: bytes, codec_name: object, meta: Mapping[str, object],
                     split: object) -> np.ndarray:
        """Decode features at ``split`` and run the tail; returns float32 logits ``[B, num_classes]``."""
        k = self.check_split(split)
        x = self.decode_features(payload, codec_name, meta, k)
        return self.run_tail(x, k)

    def run_tail(self, x: torch.Tensor, split: int) -> np.ndarray:
        """Run stages ``split..N-1`` on an already-validated tensor."""
        engine = self.engines.get(split)
        if engine is not None:
            out = engine.run(x)
        else:
            with torch.inference_mode():
                out = self.staged.run(x, split, self.num_stages)
        return out.to(torch.float32).contiguous().numpy()

    def check_input_shape(self, x: np.ndarray) -> int:
        """Refuse an input that is not ``[B, *plan.input.shape]`` with 1 <= B <= max_batch; returns B."""
        shape = [int(s) for s in x.shape]
        self._check_sample_shape(shape, self.input_shape, "input", "the model input")
        return shape[0]

    def input_tensor(self, x: np.ndarray) -> torch.Tensor:
        """A validated float32 copy of a normalised input ``[B, *plan.input.shape]``."""
        self.check_input_shape(x)
        t = torch.from_numpy(np.array(x, dtype=np.float32, copy=True))
        if not all_finite(t):
            raise InvalidInput("input contains NaN or infinite values")
        return t

    def run_input(self, x: np.ndarray) -> np.ndarray:
        """Run the full model on a normalised input ``[B, *plan.input.shape]``."""
        return self.run_tail(self.input_tensor(x), 0)
