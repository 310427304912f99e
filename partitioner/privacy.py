"""What the features reveal: inversion attacks on the payload a split sends, and the leakage table the planner
reads.

Threat model (see ``docs/privacy.md``): an eavesdropper on the link or a curious server sees every payload the
edge sends. It tries to rebuild the input image from it.

* **White-box** attacker: knows the head, the codec and the tail (a curious server holds the bundle). It
  trains an *inversion decoder* (:class:`InversionDecoder`) on (payload, image) pairs it makes itself from as
  many images of the task's distribution as it likes, and feeds it what the server reconstructs from the
  payload (the codec's decoded features) plus the tail's answer (the class probabilities the server returns).
* **Black-box** attacker: has neither weights nor answers. It saw the payloads of ``public`` images it chose
  (it queried the device), a smaller set, and feeds the decoder the payload's values only (uint8 levels, or
  the learned codec's integer symbols).
* **Class only**: the same decoder fed nothing but the model's predicted class. Any codec that keeps the task's
  accuracy lets the server learn the class, so this is a floor no task-preserving defence can go below
  against a white-box attacker.

Reconstructions are scored on the test set (never trained on) with SSIM and PSNR (scikit-image, data range 1)
and by the accuracy of a separate classifier (:class:`ProbeClassifier`, trained here on the training images,
not the model under attack) on them. Every figure is a measurement of one attack: a stronger attacker can only
do better, so the numbers are lower bounds on what leaks, not guarantees.

The leakage table (:class:`LeakageTable`, JSON) lists the white-box SSIM per (boundary, codec) measured here;
``plan make --max-leakage`` reads it. A boundary it has no entry for gets the entry of the deepest measured
boundary before it (for the same codec, else uint8): the features at a later boundary are a function of the
earlier ones, so an attacker who can invert the later ones could invert the earlier ones as well (data
processing); the borrowed figure is an estimate, marked as such.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from splitinfer.errors import BundleError
from splitinfer.inversion import InversionDecoder

LEAKAGE_FORMAT = "splitinfer-leakage"
LEAKAGE_VERSION = 1
EDGE_ONLY = "none"  # the codec name of edge-only entries: nothing leaves the device


# ---------------------------------------------------------------------------------------------- networks


class ProbeClassifier(nn.Module):
    """A small separate CNN that scores reconstructions: does the rebuilt image still show its class?"""

    def __init__(self, channels: int = 1, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ---------------------------------------------------------------------------------------------- training


@dataclass
class AttackConfig:
    """How an inversion decoder is trained: on ``train_images`` pairs (white-box) or ``public_images``
    (black-box), ``epochs`` of Adam at a constant ``lr`` on the pixel MSE, seeded."""

    train_images: int = 20000
    public_images: int = 5000
    test_images: int = 2000
    epochs: int = 3
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0


def _in_batches(fn: Callable[[slice], torch.Tensor], n: int, batch: int = 500) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([fn(slice(i, min(n, i + batch))).clone() for i in range(0, n, batch)])


def fit_decoder(view: torch.Tensor, images: torch.Tensor, cfg: AttackConfig, extra: torch.Tensor | None = None
                ) -> InversionDecoder:
    """Train an :class:`InversionDecoder` from payload views ``view`` (+ ``extra``) to ``images`` ([N, C, H, W]
    in [0, 1])."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    dec = InversionDecoder(view.shape[1:], images.shape[1:], extra.shape[1] if extra is not None else 0)
    # a constant learning rate: with these few epochs it reconstructed better than a one-cycle schedule (SSIM
    # 0.93 vs 0.87 for uint8 at the default model's boundary 6 in bench.privacy)
    opt = torch.optim.Adam(dec.parameters(), lr=cfg.lr)
    dec.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(view), generator=gen)
        for i in range(0, len(view), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            rec = dec(view[idx], extra[idx] if extra is not None else None)
            loss = F.mse_loss(rec, images[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return dec.eval()


def reconstruct(dec: InversionDecoder, view: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's images for ``view`` (+ ``extra``), in batches, no gradients."""
    return _in_batches(lambda s: dec(view[s], extra[s] if extra is not None else None), len(view))


def train_probe(images: torch.Tensor, labels: np.ndarray, epochs: int = 2, seed: int = 0) -> ProbeClassifier:
    """The separate classifier of reconstructions, trained on ``images`` ([N, C, H, W] in [0, 1])."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    clf = ProbeClassifier(images.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    clf.train()
    for _ in range(epochs):
        perm = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), 128):
            idx = perm[i : i + 128]
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(clf(images[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return clf.eval()


# ---------------------------------------------------------------------------------------------- scores


@dataclass
class Reconstruction:
    """Scores of one attack's reconstructions of the test images."""

    ssim: float
    psnr: float
    probe_accuracy: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        out = {"ssim": round(self.ssim, 4), "psnr": round(self.psnr, 3)}
        if self.probe_accuracy is not None:
            out["probe_accuracy"] = round(self.probe_accuracy, 4)
        out["seconds"] = round(self.seconds, 1)
        return out


def image_quality(rec: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Mean SSIM and mean PSNR (dB) of reconstructions ``rec`` against ``ref`` ([N, C, H, W] in [0, 1]), per
    image with scikit-image (7x7 window, data range 1; PSNR of a perfect image capped at 100 dB)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a = rec.detach().float().clamp(0, 1).numpy()
    b = ref.detach().float().numpy()
    ssims, psnrs = [], []
    for i in range(len(a)):
        x, y = np.moveaxis(a[i], 0, -1), np.moveaxis(b[i], 0, -1)
        ssims.append(structural_similarity(x, y, data_range=1.0, channel_axis=-1))
        psnrs.append(min(100.0, peak_signal_noise_ratio(y, x, data_range=1.0)) if not np.array_equal(x, y)
                     else 100.0)
    return float(np.mean(ssims)), float(np.mean(psnrs))


def score(rec: torch.Tensor, ref: torch.Tensor, labels: np.ndarray | None, probe: ProbeClassifier | None,
          seconds: float = 0.0) -> Reconstruction:
    """SSIM, PSNR and the probe classifier's accuracy on the reconstructions."""
    s, p = image_quality(rec, ref)
    acc = None
    if probe is not None and labels is not None:
        pred = _in_batches(lambda sl: probe(rec[sl]), len(rec)).argmax(1).numpy()
        acc = float((pred == np.asarray(labels)).mean())
    return Reconstruction(s, p, acc, seconds)


# ---------------------------------------------------------------------------------------------- attacks


@dataclass
class Victim:
    """What is attacked: the staged model, its (normalised) inputs for the attacker's training pairs, the
    public images (black-box) and the test set, with their pixel images in [0, 1]."""

    staged: object
    x_train: torch.Tensor
    img_train: torch.Tensor
    x_public: torch.Tensor
    img_public: torch.Tensor
    x_test: torch.Tensor
    img_test: torch.Tensor
    y_test: np.ndarray

    def features(self, x: torch.Tensor, boundary: int) -> torch.Tensor:
        return _in_batches(lambda s: self.staged.run(x[s], 0, boundary), len(x))

    def answers(self, feats: torch.Tensor, boundary: int) -> torch.Tensor:
        """The tail's class probabilities for (decoded) boundary features: what the server returns."""
        n = self.staged.num_stages
        return _in_batches(lambda s: torch.softmax(self.staged.run(feats[s].clone(), boundary, n), 1), len(feats))


class PayloadView:
    """How a codec's payload looks to each attacker at one boundary.

    ``whitebox(feats)``: what the server rebuilds (the codec's round trip); ``blackbox(feats)``: the payload's
    values without the model (uint8 levels, or the learned codec's symbols)."""

    def __init__(self, codec, name: str):
        self.codec, self.name = codec, name

    def whitebox(self, feats: torch.Tensor) -> torch.Tensor:
        return _in_batches(lambda s: self.codec.roundtrip_each(feats[s]), len(feats))

    def blackbox(self, feats: torch.Tensor) -> torch.Tensor:
        if hasattr(self.codec, "symbols"):
            return _in_batches(lambda s: torch.from_numpy(self.codec.symbols(feats[s])).float(), len(feats))
        return _in_batches(lambda s: uint8_levels(feats[s]), len(feats))


def uint8_levels(feats: torch.Tensor) -> torch.Tensor:
    """The uint8-affine codec's levels 0..255 of every sample encoded alone (what its payload carries beside
    the per-channel ranges), as floats scaled to [0, 1]."""
    from splitinfer.codec import UInt8AffineCodec

    out = []
    for i in range(len(feats)):
        payload, meta = UInt8AffineCodec().encode(feats[i : i + 1])
        shape = [int(d) for d in meta["shape"].split(",")] if isinstance(meta["shape"], str) else meta["shape"]
        count = math.prod(shape)
        out.append(torch.frombuffer(bytearray(payload[-count:]), dtype=torch.uint8).float().view(shape) / 255.0)
    return torch.cat(out)


def whitebox_attack(v: Victim, view: PayloadView, boundary: int, cfg: AttackConfig,
                    probe: ProbeClassifier | None = None) -> tuple[Reconstruction, torch.Tensor]:
    """Train on the attacker's own pairs (training images), with the tail's answers; score on the test set.
    Returns the scores and the test reconstructions."""
    t0 = time.perf_counter()
    f_tr = view.whitebox(v.features(v.x_train, boundary))
    a_tr = v.answers(f_tr, boundary)
    dec = fit_decoder(f_tr, v.img_train, cfg, a_tr)
    del f_tr
    f_te = view.whitebox(v.features(v.x_test, boundary))
    rec = reconstruct(dec, f_te, v.answers(f_te, boundary))
    return score(rec, v.img_test, v.y_test, probe, time.perf_counter() - t0), rec


def blackbox_attack(v: Victim, view: PayloadView, boundary: int, cfg: AttackConfig,
                    probe: ProbeClassifier | None = None) -> tuple[Reconstruction, torch.Tensor]:
    """Train on the payloads of the public images only (no weights, no answers); score on the test set."""
    t0 = time.perf_counter()
    p_tr = view.blackbox(v.features(v.x_public, boundary))
    dec = fit_decoder(p_tr, v.img_public, cfg)
    rec = reconstruct(dec, view.blackbox(v.features(v.x_test, boundary)))
    return score(rec, v.img_test, v.y_test, probe, time.perf_counter() - t0), rec


def class_only_attack(v: Victim, cfg: AttackConfig, probe: ProbeClassifier | None = None
                      ) -> tuple[Reconstruction, torch.Tensor]:
    """The floor: a decoder fed only the model's predicted class (one-hot)."""
    t0 = time.perf_counter()
    n = v.staged.num_stages

    def onehot(x: torch.Tensor) -> torch.Tensor:
        pred = _in_batches(lambda s: v.staged.run(x[s], 0, n), len(x)).argmax(1)
        return F.one_hot(pred, n_classes(v)).float()

    dec = fit_decoder(onehot(v.x_train), v.img_train, cfg)
    rec = reconstruct(dec, onehot(v.x_test))
    return score(rec, v.img_test, v.y_test, probe, time.perf_counter() - t0), rec


def n_classes(v: Victim) -> int:
    return int(v.staged.boundaries[v.staged.num_stages].shape[-1])


# ---------------------------------------------------------------------------------------------- the table


@dataclass
class LeakageEntry:
    """One measured (boundary, codec): the white-box attack's SSIM/PSNR on the test set and the payload size."""

    boundary: int
    codec: str
    ssim: float
    psnr: float | None = None
    bytes_mean: float | None = None
    probe_accuracy: float | None = None


@dataclass
class LeakageTable:
    """White-box leakage per (boundary, codec) of one model, and how it was measured."""

    model: str
    num_stages: int
    entries: list[LeakageEntry]
    attack: dict = field(default_factory=dict)

    def lookup(self, boundary: int, codec: str) -> tuple[float, str] | None:
        """(SSIM, source) for a payload sent at ``boundary`` by ``codec``: the measured entry (``measured``),
        else the deepest measured boundary before it for that codec or uint8 (``from boundary j``); edge-only
        (``boundary == num_stages``) leaks nothing (``edge-only``). None when nothing before it was measured."""
        if boundary >= self.num_stages:
            return 0.0, "edge-only"
        for e in self.entries:
            if e.boundary == boundary and e.codec == codec:
                return e.ssim, "measured"
        for name in (codec, "uint8-affine"):
            earlier = [e for e in self.entries if e.codec == name and e.boundary <= boundary]
            if earlier:
                e = max(earlier, key=lambda e: e.boundary)
                return e.ssim, f"from boundary {e.boundary} ({e.codec})"
        return None

    def ssim(self, boundary: int, codec: str) -> float | None:
        hit = self.lookup(boundary, codec)
        return None if hit is None else hit[0]

    def to_dict(self) -> dict:
        return {"format": LEAKAGE_FORMAT, "version": LEAKAGE_VERSION, "model": self.model,
                "num_stages": self.num_stages, "metric": "ssim (white-box inversion, test set)",
                "attack": self.attack, "entries": [asdict(e) for e in self.entries]}

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict, source: str = "leakage table") -> LeakageTable:
        if not isinstance(d, dict) or d.get("format") != LEAKAGE_FORMAT:
            raise BundleError(f"{source} is not a leakage table (format {LEAKAGE_FORMAT!r}); "
                              "`splitinfer plan privacy` writes one")
        if d.get("version") != LEAKAGE_VERSION:
            raise BundleError(f"{source} has leakage table version {d.get('version')!r}; this splitinfer reads "
                              f"version {LEAKAGE_VERSION}")
        try:
            entries = [LeakageEntry(**e) for e in d["entries"]]
            table = cls(str(d["model"]), int(d["num_stages"]), entries, dict(d.get("attack", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{source} is malformed: {exc}") from exc
        for e in entries:
            if not (isinstance(e.ssim, (int, float)) and -1.0 <= e.ssim <= 1.0 and 0 <= e.boundary <= table.num_stages):
                raise BundleError(f"{source}: entry {asdict(e)} is out of range (ssim in [-1, 1], boundary in "
                                  f"0..{table.num_stages})")
        return table

    @classmethod
    def load(cls, path: Path) -> LeakageTable:
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"leakage table {path} does not exist; `splitinfer plan privacy --out {path}` "
                              "measures one")
        try:
            d = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{path} is not JSON: {exc}") from exc
        return cls.from_dict(d, str(path))


def committed_leakage(model: str) -> LeakageTable | None:
    """The leakage table committed for an embedded model (``splitinfer/weights/<stem>_leakage.json``), or None."""
    from partitioner.weights import weights_dir
    from splitinfer.models import EMBEDDED_MODELS

    if model not in EMBEDDED_MODELS:
        return None
    path = weights_dir() / f"{EMBEDDED_MODELS[model].file_stem}_leakage.json"
    return LeakageTable.load(path) if path.is_file() else None


def leakage_table_for(model: str, path: Path | None) -> LeakageTable:
    """``path``'s table (checked to be ``model``'s), else the committed one; BundleError naming the command that
    measures one when there is none."""
    from splitinfer.models import EMBEDDED_MODELS

    table = LeakageTable.load(path) if path is not None else committed_leakage(model)
    if table is None and model in EMBEDDED_MODELS:
        raise BundleError(f"no leakage table for model {model}: measure one with `splitinfer plan privacy --model "
                          f"{model} --out leakage.json` and pass --leakage leakage.json")
    if table is None:
        raise BundleError(f"no leakage table for model {model}: `plan privacy` measures the embedded models (their "
                          "data is here); pass --leakage FILE with a table measured on this model's data")
    if table.model != model:
        raise BundleError(f"the leakage table was measured on model {table.model!r}, not {model!r}")
    return table


# ---------------------------------------------------------------------------------------------- measuring


def embedded_victim(model: str, cfg: AttackConfig, data_dir: str | None = None):
    """An embedded model (committed weights) and its Fashion-MNIST images as a :class:`Victim`: the attacker's
    training pairs from the training split, the public images from the validation split (disjoint from both:
    never used to train the model), the test set's first ``cfg.test_images`` as victims. Returns the victim,
    the model's bundle info and the rendered test pixels (uint8, for the image codec)."""
    from partitioner.train import model_input, split_train_validation
    from partitioner.weights import load_default
    from splitinfer.data import load_fashion_mnist, render
    from splitinfer.models import embedded_model

    size = embedded_model(model).size
    _, staged, _, info = load_default(None, model)
    train = load_fashion_mnist("train", data_dir)
    test = load_fashion_mnist("test", data_dir)
    tr_idx, va_idx = split_train_validation(len(train), int(info["config"]["seed"]))
    tr_idx, va_idx = tr_idx[: cfg.train_images], va_idx[: cfg.public_images]

    def pixels(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(render(images, size)).float().div(255).unsqueeze(1)

    te = test.images[: cfg.test_images]
    v = Victim(staged, model_input(train.images[tr_idx], size), pixels(train.images[tr_idx]),
               model_input(train.images[va_idx], size), pixels(train.images[va_idx]),
               model_input(te, size), pixels(te), np.asarray(test.labels[: cfg.test_images]))
    return v, info, render(te, size)


def image_codec_leakage(pixels: np.ndarray, spec, img_test: torch.Tensor) -> tuple[Reconstruction, float]:
    """Cloud-only sends the image file (PNG or JPEG quality 90, whichever is smaller, as the planner assumes):
    its "reconstruction" is the decoded file. Returns its scores and the mean file size."""
    import io

    from PIL import Image

    from partitioner.make import smaller_file

    rec, sizes = [], []
    for p in pixels:
        data = smaller_file(spec, p)
        sizes.append(len(data))
        with Image.open(io.BytesIO(data)) as im:
            rec.append(torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)[None])
    s, p = image_quality(torch.stack(rec), img_test)
    return Reconstruction(s, p), float(np.mean(sizes))


def payload_bytes(codec, feats: torch.Tensor, limit: int = 200) -> float:
    """Mean payload size of ``codec`` on the first ``limit`` samples, each encoded alone."""
    return float(np.mean([len(codec.encode(feats[i : i + 1])[0]) for i in range(min(limit, len(feats)))]))


def measure_leakage(model: str, v: Victim, boundaries: Sequence[int], cfg: AttackConfig, spec, pixels: np.ndarray,
                    bottlenecks: Sequence | None = None, probe: ProbeClassifier | None = None,
                    log: Callable[[str], None] = lambda _m: None) -> tuple[LeakageTable, dict[str, torch.Tensor]]:
    """White-box attacks on the uint8-affine payload at each of ``boundaries`` and on each learned codec in
    ``bottlenecks`` (at its own boundary), plus the image file at split 0; the leakage table and the test
    reconstructions by name (``uint8@B``, ``bottleneck@B``, ``image``)."""
    from splitinfer.bottleneck import LearnedCodec
    from splitinfer.codec import UInt8AffineCodec

    entries: list[LeakageEntry] = []
    recs: dict[str, torch.Tensor] = {}
    img, size = image_codec_leakage(pixels, spec, v.img_test)
    raw = payload_bytes(UInt8AffineCodec(), v.x_test)
    for name, nbytes in (("image", size), ("uint8-affine", raw)):  # at split 0 the payload is the input itself
        entries.append(LeakageEntry(0, name, round(img.ssim, 4), round(img.psnr, 3), round(nbytes, 1)))
    log(f"image file at split 0: SSIM {img.ssim:.3f}, {size:.0f} B")
    for b in boundaries:
        view = PayloadView(UInt8AffineCodec(), "uint8-affine")
        r, rec = whitebox_attack(v, view, b, cfg, probe)
        recs[f"uint8@{b}"] = rec
        nbytes = payload_bytes(view.codec, v.features(v.x_test[:200], b))
        entries.append(LeakageEntry(b, "uint8-affine", round(r.ssim, 4), round(r.psnr, 3), round(nbytes, 1),
                                    None if r.probe_accuracy is None else round(r.probe_accuracy, 4)))
        log(f"uint8 at boundary {b}: white-box SSIM {r.ssim:.3f}, PSNR {r.psnr:.1f} dB ({r.seconds:.0f} s)")
    for bn in bottlenecks or []:
        codec = LearnedCodec(bn)
        b = bn.cfg.boundary
        r, rec = whitebox_attack(v, PayloadView(codec, "bottleneck"), b, cfg, probe)
        recs[f"bottleneck@{b}"] = rec
        nbytes = payload_bytes(codec, v.features(v.x_test[:200], b))
        entries.append(LeakageEntry(b, codec.name, round(r.ssim, 4), round(r.psnr, 3), round(nbytes, 1),
                                    None if r.probe_accuracy is None else round(r.probe_accuracy, 4)))
        log(f"bottleneck at boundary {b}: white-box SSIM {r.ssim:.3f} ({r.seconds:.0f} s)")
    attack = {"kind": "white-box inversion decoder (payload as the server rebuilds it + the tail's answer)",
              **asdict(cfg), "ssim": "scikit-image structural_similarity, 7x7 window, data range 1"}
    return LeakageTable(model, v.staged.num_stages, entries, attack), recs


def reconstruction_grid(path: Path, originals: torch.Tensor, columns: dict[str, torch.Tensor], rows: int = 8,
                        title: str = "") -> Path:
    """A PNG grid: one row per test image, the input then each named reconstruction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["input", *columns]
    rows = min(rows, len(originals))
    fig, axes = plt.subplots(rows, len(names), figsize=(1.1 * len(names), 1.15 * rows + 0.6), squeeze=False)
    for j, name in enumerate(names):
        imgs = originals if name == "input" else columns[name]
        for i in range(rows):
            ax = axes[i][j]
            ax.imshow(imgs[i].permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
