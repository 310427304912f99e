"""Export the tail of a bundle as a Triton model repository (``splitinfer cloud export-triton``).

When one server process is not enough, the tail can run on Triton Inference Server or KServe instead. This
module writes one model into a Triton model repository::

    OUT/<model_name>/config.pbtxt      platform, max_batch_size, dynamic_batching, one CPU instance group,
                                       input/output tensors (the header comments say what the input holds)
    OUT/<model_name>/labels.txt        class names, one per line (Triton's classification extension)
    OUT/<model_name>/README.md         the same contract in prose, with the export check's figures
    OUT/<model_name>/1/model.onnx      ONNX (platform onnxruntime_onnx), or
    OUT/<model_name>/1/model.pt        TorchScript (platform pytorch_libtorch)

What the exported model computes, for split ``k`` (default: the plan's chosen split):

* ``k == 0``: the whole model. Input ``input`` FP32 ``[-1, C, H, W]``, normalised as ``plan.input`` says
  (the same tensor a stock client sends to ``splitinfer cloud serve`` for cloud-only inference).
* ``k > 0``: stages ``k..N-1``. Input ``features`` FP32 ``[-1, *boundary[k].shape]``: the DECODED boundary
  tensor. Codec decoding (uint8-affine, float32 payload bytes, the learned codec's entropy coding) is not
  part of the model; the caller (a client, a Triton python-backend step of an ensemble, a KServe transformer)
  decodes the payload first, e.g. with :func:`splitinfer.codec.get_codec`.
* ``k`` is the boundary of one of the bundle's learned bottlenecks (``--decoder``, the default there): that
  bottleneck's decoder is exported in front of the tail. Input ``symbols`` UINT8 ``[-1, *latent_shape]``: the quantized
  latent symbols, exactly what the entropy decoder (:class:`splitinfer.entropy.SymbolCoder`) returns. The
  per-channel de-quantization (``lo + s * scale``) is inside the model, so the caller needs no quantizer
  parameters, only the entropy decoding, which has no ONNX form. ``--no-decoder`` exports the bare tail.

Output ``logits`` FP32 ``[-1, num_classes]`` in every case.

Every export is checked before it is moved into place: the written file is run (ONNX Runtime, or
``torch.jit.load``) on a seeded batch of 3 and compared with :meth:`TailRuntime.run_tail` (for the learned
codec, with :meth:`TailRuntime.run_features` on the entropy-coded symbols, i.e. the server's own decode path).
A maximum absolute difference above ``1e-4 * max(1, max |reference|)`` fails the export and nothing is left
in ``OUT``. The written ``config.pbtxt`` is parsed into Triton's ``ModelConfig`` when ``tritonclient`` is
installed.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cloud_server.tail import TailRuntime
from splitinfer.bundle import Bundle, boundaries_text, load_bundle
from splitinfer.errors import InvalidInput, SplitInferError
from splitinfer.onnx_util import OPSET as ONNX_OPSET
from splitinfer.onnx_util import RTOL, compare, export_onnx, session
from splitinfer.wire import FEATURES_TENSOR, INPUT_TENSOR, MODEL_VERSION, OUTPUT_TENSOR

FORMATS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "torchscript": ("pytorch_libtorch", "model.pt")}
SYMBOLS_TENSOR = "symbols"  # the learned codec's entropy-decoded latent symbols (decoder + tail models)
CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
README_FILE = "README.md"
VERIFY_BATCH = 3
MAX_TRITON_BATCH = 1 << 16
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ExportCheckFailed(SplitInferError):
    """The tail could not be exported, or the exported model does not run or does not reproduce the torch tail."""


@dataclass
class ExportResult:
    """What was written and how the check went."""

    model_dir: Path
    model_file: Path
    model_name: str
    platform: str
    split: int
    num_stages: int
    input_name: str
    input_dtype: str  # Triton data type, e.g. TYPE_FP32
    input_dims: list[int]
    num_classes: int
    with_decoder: bool
    max_abs_diff: float
    tolerance: float
    reference_max_abs: float
    config_parsed: bool | None  # None: tritonclient not installed, not checked
    notes: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return [self.model_dir / CONFIG_FILE, self.model_file, self.model_dir / LABELS_FILE,
                self.model_dir / README_FILE]


# ------------------------------------------------------------------------------------------ exported modules
# One small wrapper per input name: TorchScript keeps the forward argument's name, and Triton's PyTorch backend
# maps a config input to the forward argument of the same name. Each wrapper copies its input first, because a
# tail's first stage may start with an in-place op (ReLU) and must not write into the server's request buffer.


class _Stages(nn.Module):
    def __init__(self, stages: list[nn.Module]):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


class FeaturesTail(_Stages):
    """Stages ``k..N-1`` on the decoded boundary-``k`` tensor."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.run(features.clone())


class WholeModel(_Stages):
    """Every stage, on the normalised input (split 0)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # named like the wire's tensor (INPUT_TENSOR)
        return self.run(input.clone())


class SymbolsTail(_Stages):
    """The learned bottleneck's de-quantization and decoder, then stages ``k..N-1``."""

    def __init__(self, stages: list[nn.Module], bottleneck: nn.Module):
        super().__init__(stages)
        self.quantizer = bottleneck.quantizer
        self.decoder = bottleneck.decoder
        self.max_symbol = float(bottleneck.quantizer.levels - 1)

    def forward(self, symbols: torch.Tensor) -> torch.Tensor:
        s = symbols.to(torch.float32).clamp(0.0, self.max_symbol)
        return self.run(self.decoder(self.quantizer.from_symbols(s)))


# -------------------------------------------------------------------------------------------------- export


@dataclass
class _Plan:
    """What to export, decided from the bundle and the options before anything is written."""

    split: int
    module: nn.Module
    input_name: str
    input_dtype: torch.dtype
    input_dims: list[int]
    with_decoder: bool
    model_name: str
    platform: str
    filename: str
    codec: Any = None  # the learned codec (splitinfer.bottleneck.LearnedCodec) at the split, with the decoder


def _choose_split(runtime: TailRuntime, split: int | None) -> int:
    n = runtime.num_stages
    if split is None:
        split = runtime.plan.split
        if split >= n:
            points = sorted({p.split for p in runtime.plan.operating_points if p.split < n})
            hint = f" (its operating points offload at splits {points})" if points else ""
            raise InvalidInput(f"the plan's chosen split is {split}: everything runs on the edge, there is no tail "
                               f"to export; pass --split 0..{n - 1}{hint}")
    return runtime.check_split(split)


def _check_options(fmt: str, max_batch: int) -> None:
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown format {fmt!r}; choose {' or '.join(FORMATS)}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_TRITON_BATCH:
        raise InvalidInput(f"--max-batch must be an integer in 1..{MAX_TRITON_BATCH}, got {max_batch!r}")


def _prepare(bundle: Bundle, runtime: TailRuntime, split: int | None, fmt: str, model_name: str | None,
             decoder: bool | None) -> _Plan:
    k = _choose_split(runtime, split)
    lc = bundle.learned_codec_at(k)
    at_learned = lc is not None
    if decoder and not at_learned:
        have = sorted(bundle.learned_codecs)
        where = f"one at {boundaries_text(have)} only" if have else "none"
        raise InvalidInput(f"--decoder needs the bundle's learned codec at split {k}; this bundle has {where}")
    with_decoder = at_learned if decoder is None else bool(decoder)
    stages = list(bundle.staged.stages[k:])
    base = runtime.model_name
    if with_decoder:
        module: nn.Module = SymbolsTail(stages, lc.bottleneck)
        name, dtype, dims = SYMBOLS_TENSOR, torch.uint8, list(lc.cfg.latent_shape)
        default_name = f"{base}_tail{k}_{lc.name}"
    elif k == 0:
        module = WholeModel(stages)
        name, dtype, dims = INPUT_TENSOR, torch.float32, runtime.input_shape
        default_name = base
    else:
        module = FeaturesTail(stages)
        name, dtype, dims = FEATURES_TENSOR, torch.float32, runtime.boundary_shape(k)
        default_name = f"{base}_tail{k}"
    model_name = model_name or default_name
    if not _MODEL_NAME.match(model_name):
        raise InvalidInput(f"model name {model_name!r} must be 1..128 letters, digits, '_', '.' or '-' (starting "
                           "with a letter or digit); pass --model-name")
    platform, filename = FORMATS[fmt]
    return _Plan(k, module.eval(), name, dtype, dims, with_decoder, model_name, platform, filename,
                 lc if with_decoder else None)


def _example(p: _Plan, batch: int, runtime: TailRuntime, bundle: Bundle, seed: int) -> torch.Tensor:
    """A realistic model input: the head's output at the split for a seeded random input (symbols for the
    learned codec), so the tail sees values of the kind it will serve (non-negative after a ReLU, ...)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *runtime.input_shape, generator=g)
    with torch.inference_mode():
        feats = bundle.staged.run(x, 0, p.split).clone()
    if p.with_decoder:
        return torch.from_numpy(p.codec.symbols(feats))
    return feats


def _write_model(p: _Plan, fmt: str, example: torch.Tensor, path: Path) -> None:
    try:
        _export(p, fmt, example, path)
    except Exception as exc:  # an op the exporter cannot express, ...: the export fails, with the reason
        raise ExportCheckFailed(f"cannot export the tail from split {p.split} to {fmt}: "
                                f"{type(exc).__name__}: {exc}") from exc


def _export(p: _Plan, fmt: str, example: torch.Tensor, path: Path) -> None:
    if fmt == "onnx":  # the one ONNX exporter (splitinfer.onnx_util): TorchScript-based, dynamic batch
        path.write_bytes(export_onnx(p.module, example, p.input_name, OUTPUT_TENSOR, ONNX_OPSET))
        return
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # deprecation notices of the TorchScript-based tools, constant shape checks
        traced = torch.jit.trace(p.module, (example,), check_trace=False)
        torch.jit.save(traced, str(path))


def _run_exported(p: _Plan, fmt: str, path: Path, x: torch.Tensor) -> np.ndarray:
    """Run the written file the way Triton's backend would (ONNX Runtime, or LibTorch through torch.jit)."""
    if fmt == "onnx":
        import onnx

        onnx.checker.check_model(str(path))
        sess = session(path.read_bytes(), "the exported ONNX model", inputs=[p.input_name], outputs=[OUTPUT_TENSOR],
                       error=ExportCheckFailed)
        return sess.run(None, {p.input_name: x.numpy()})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location="cpu")
    args = [a.name for a in loaded.forward.schema.arguments[1:]]
    if args != [p.input_name]:
        raise ExportCheckFailed(f"TorchScript forward takes {args}; Triton maps the config input "
                                f"{p.input_name!r} to the forward argument of that name")
    with torch.no_grad():
        return loaded(x).to(torch.float32).numpy()


def _reference(p: _Plan, runtime: TailRuntime, bundle: Bundle, x: torch.Tensor) -> np.ndarray:
    """What ``splitinfer cloud serve`` computes for the same request (the tail may work in place: copies)."""
    if p.with_decoder:
        payload = p.codec.coder.encode(x.numpy())
        return runtime.run_features(payload, p.codec.name, {"v": 1}, p.split)
    return runtime.run_tail(x.clone(), p.split)


def _check(p: _Plan, fmt: str, path: Path, runtime: TailRuntime, bundle: Bundle) -> tuple[float, float, float]:
    x = _example(p, VERIFY_BATCH, runtime, bundle, seed=1)
    ref = _reference(p, runtime, bundle, x)
    try:
        got = _run_exported(p, fmt, path, x)
    except ExportCheckFailed:
        raise
    except Exception as exc:  # the runtime refusing the file is a failed export, whatever it raises
        raise ExportCheckFailed(f"the exported {fmt} model does not run: {type(exc).__name__}: {exc}") from exc
    agreement = compare(f"the exported {fmt} model (batch of {VERIFY_BATCH})", got, ref, rtol=RTOL,
                        against="the torch tail", error=ExportCheckFailed)
    return agreement.max_abs_diff, agreement.tolerance, agreement.reference_max_abs


# --------------------------------------------------------------------------------------------- config files


def _dims(dims: list[int]) -> str:
    return "[ " + ", ".join(str(int(d)) for d in dims) + " ]"


def _input_contract(p: _Plan, bundle: Bundle) -> list[str]:
    """What the caller must send, in plain lines (config comments and README)."""
    plan = bundle.plan
    n = bundle.num_stages
    if p.with_decoder:
        lc = p.codec
        return [
            f"Decoder of the learned '{lc.name}' codec + tail from split {p.split} (stages {p.split}..{n - 1}).",
            f"Input '{p.input_name}' (UINT8 [-1, {', '.join(map(str, p.input_dims))}]): the quantized latent symbols "
            f"(0..{lc.levels - 1}),",
            "exactly what splitinfer.entropy.SymbolCoder.decode returns for the payload of a 'features' request.",
            "Entropy decoding (ANS/zstd/raw bit-packing, payload header and CRC) is NOT in this model: the caller",
            "(client, python-backend ensemble step or KServe transformer) decodes the payload first.",
            "De-quantization and the bottleneck decoder are inside the model.",
        ]
    if p.split == 0:
        mean = ", ".join(f"{v:g}" for v in plan.input.mean)
        std = ", ".join(f"{v:g}" for v in plan.input.std)
        return [
            f"The whole model (split 0, stages 0..{n - 1}).",
            f"Input '{p.input_name}' (FP32 [-1, {', '.join(map(str, p.input_dims))}]): the normalised input, "
            f"(pixel - mean) / std",
            f"with mean [{mean}] and std [{std}], as plan.json's input spec says (no codec involved).",
        ]
    return [
        f"Tail of the model from split {p.split} (stages {p.split}..{n - 1}).",
        f"Input '{p.input_name}' (FP32 [-1, {', '.join(map(str, p.input_dims))}]): the DECODED boundary-{p.split} "
        "tensor.",
        "Codec decoding (uint8-affine / float32 payload bytes -> float features) is NOT in this model: the",
        "caller (client, python-backend ensemble step or KServe transformer) decodes the payload first,",
        "e.g. splitinfer.codec.get_codec(name).decode(payload, meta).",
    ]


def _config_text(p: _Plan, bundle: Bundle, max_batch: int, source: str) -> str:
    dtype = "TYPE_UINT8" if p.input_dtype == torch.uint8 else "TYPE_FP32"
    header = [f"Written by `splitinfer cloud export-triton` from bundle {source}",
              f"(model {bundle.plan.model.name!r}, plan created {bundle.plan.created}).",
              *_input_contract(p, bundle),
              f"Output '{OUTPUT_TENSOR}' (FP32 [-1, {bundle.plan.model.num_classes}]): logits; class names in "
              f"{LABELS_FILE}."]
    lines = [f"# {h}" for h in header]
    lines += [
        f'name: "{p.model_name}"',
        f'platform: "{p.platform}"',
        f"max_batch_size: {max_batch}",
        "input [",
        "  {",
        f'    name: "{p.input_name}"',
        f"    data_type: {dtype}",
        f"    dims: {_dims(p.input_dims)}",
        "  }",
        "]",
        "output [",
        "  {",
        f'    name: "{OUTPUT_TENSOR}"',
        "    data_type: TYPE_FP32",
        f"    dims: {_dims([bundle.plan.model.num_classes])}",
        f'    label_filename: "{LABELS_FILE}"',
        "  }",
        "]",
        "instance_group [",
        "  {",
        "    kind: KIND_CPU",
        "    count: 1",
        "  }",
        "]",
        "dynamic_batching { }",
    ]
    return "\n".join(lines) + "\n"


def triton_model_config_module():
    """tritonclient's ``model_config_pb2``, loaded by file path: importing ``tritonclient.grpc`` itself would
    register Triton's ``inference.*`` service symbols, which clash with our stubs in protobuf's default pool
    (``model_config.proto`` alone does not). Raises ImportError when tritonclient is not installed."""
    import importlib.util
    import sys
    from pathlib import Path as _Path

    name = "_splitinfer_triton_model_config_pb2"
    if name in sys.modules:
        return sys.modules[name]
    import tritonclient

    path = _Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise ImportError(f"tritonclient has no {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def parse_config(text: str):
    """Parse ``config.pbtxt`` text into Triton's ``ModelConfig`` (needs ``tritonclient[grpc]``)."""
    from google.protobuf import text_format

    return text_format.Parse(text, triton_model_config_module().ModelConfig())


def _check_config(text: str) -> bool | None:
    try:
        triton_model_config_module()
    except ImportError:
        return None
    from google.protobuf import text_format

    try:
        parse_config(text)
    except text_format.ParseError as exc:
        raise ExportCheckFailed(f"the written {CONFIG_FILE} is not a valid Triton ModelConfig: {exc}") from exc
    return True


def _readme(r: ExportResult, p: _Plan, bundle: Bundle, source: str, max_batch: int) -> str:
    contract = "\n".join(_input_contract(p, bundle))
    return f"""# {r.model_name}

Exported by `splitinfer cloud export-triton` from the bundle `{source}` (model `{bundle.plan.model.name}`).

{contract}

Output `{OUTPUT_TENSOR}`: FP32 `[-1, {r.num_classes}]` logits; class names in `{LABELS_FILE}`.

Platform `{r.platform}`, `max_batch_size: {max_batch}` with `dynamic_batching`, one CPU instance.

Export check: the written model on a batch of {VERIFY_BATCH} against the torch tail of `splitinfer cloud serve`:
max abs diff {r.max_abs_diff:.3g} (tolerance {r.tolerance:.3g}, largest |logit| {r.reference_max_abs:.3g}).

Serve: `tritonserver --model-repository <this directory's parent>`; see docs/export-triton.md in splitinfer.
"""


# -------------------------------------------------------------------------------------------------- entry


def export_triton(bundle_path: str | Path, out: str | Path, split: int | None = None, fmt: str = "onnx",
                  max_batch: int = 64, model_name: str | None = None, decoder: bool | None = None,
                  force: bool = False) -> ExportResult:
    """Write ``OUT/<model_name>/`` (config, labels, README, ``1/model.onnx|pt``) for the tail of a bundle.

    ``split`` defaults to the plan's chosen split; ``decoder`` (default: when the bundle carries a learned codec
    at the split) puts the bottleneck decoder in front of the tail. Raises
    :class:`~splitinfer.errors.BundleError` for a bad bundle, :class:`~splitinfer.errors.InvalidInput` for bad
    options (split out of range, unknown format, existing model directory without ``force``, ...) and
    :class:`ExportCheckFailed` when the exported model does not reproduce the torch tail; on any error
    nothing is left in ``out``.
    """
    _check_options(fmt, max_batch)
    bundle = load_bundle(bundle_path)
    runtime = TailRuntime(bundle, max_batch=max(VERIFY_BATCH, max_batch))  # the check runs a batch of 3
    p = _prepare(bundle, runtime, split, fmt, model_name, decoder)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"{out} exists and is not a directory (the model repository)")
    target = out / p.model_name
    if target.exists() and not force:
        raise InvalidInput(f"{target} already exists; pass --force to replace it")
    out.mkdir(parents=True, exist_ok=True)
    source = str(Path(bundle_path))
    # Built and checked in a hidden staging directory with no version directory (nothing a polling Triton
    # would load), then assembled and renamed into place in one step.
    staging = Path(tempfile.mkdtemp(prefix=f".{p.model_name}.", dir=out))
    trash = None
    try:
        model_file = staging / p.filename
        _write_model(p, fmt, _example(p, 2, runtime, bundle, seed=0), model_file)
        diff, tol, scale = _check(p, fmt, model_file, runtime, bundle)
        config = _config_text(p, bundle, max_batch, source)
        parsed = _check_config(config)
        result = ExportResult(
            model_dir=target, model_file=target / MODEL_VERSION / p.filename, model_name=p.model_name,
            platform=p.platform, split=p.split, num_stages=bundle.num_stages, input_name=p.input_name,
            input_dtype="TYPE_UINT8" if p.input_dtype == torch.uint8 else "TYPE_FP32", input_dims=p.input_dims,
            num_classes=bundle.plan.model.num_classes, with_decoder=p.with_decoder, max_abs_diff=diff,
            tolerance=tol, reference_max_abs=scale, config_parsed=parsed)
        (staging / LABELS_FILE).write_text("".join(f"{label}\n" for label in bundle.plan.input.labels))
        (staging / README_FILE).write_text(_readme(result, p, bundle, source, max_batch))
        (staging / MODEL_VERSION).mkdir()
        model_file.rename(staging / MODEL_VERSION / p.filename)
        (staging / CONFIG_FILE).write_text(config)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a model repository is usually read by another user
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{p.model_name}.old.", dir=out))
            target.rename(trash / p.model_name)
        try:
            staging.rename(target)
        except OSError:
            if trash is not None:  # put the previous model back
                (trash / p.model_name).rename(target)
            raise
    finally:
        for leftover in (staging, trash):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return result
