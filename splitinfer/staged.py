"""Cut any fx-traceable ``nn.Module`` into stages at points where exactly one tensor is live.

A model becomes ``stages[0..N-1]``; boundary ``k`` is the tensor between ``stages[k-1]`` and ``stages[k]``
(boundary 0 is the input, boundary N the output). ``head(k)`` runs ``stages[:k]`` and ``tail(k)`` runs
``stages[k:]``; because the stages replay the traced graph's own nodes in order,
``tail(k)(head(k)(x))`` equals ``model(x)`` bit for bit.

The stage modules share parameters with the original model (no copies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice

import torch
from torch import fx, nn

from splitinfer.macs import counting_macs


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of the tensor a traced node produced on the example input (``node.meta["tensor_meta"]``;
    absent for nodes whose value is not a single tensor)."""

    shape: torch.Size
    dtype: torch.dtype


class _ShapeRecorder(fx.Interpreter):
    """Runs the traced graph once and records each tensor-valued node's :class:`TensorMeta` and every node's
    multiply-accumulates (``node.meta["macs"]``, whole batch; :mod:`splitinfer.macs`).

    torch's own ``ShapeProp`` does the same but imports sympy through torch's symbolic-shape machinery (~35 MB
    of RSS in every process that stages a model: the edge agent, the server); shape and dtype are all we use.
    """

    def __init__(self, gm: fx.GraphModule, count_macs: bool = True):
        super().__init__(gm)
        self.count_macs = count_macs

    def run_node(self, n: fx.Node):
        if not self.count_macs:
            result = super().run_node(n)
        else:
            with counting_macs() as counter:
                result = super().run_node(n)
            n.meta["macs"] = counter.macs
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = TensorMeta(result.shape, result.dtype)
        return result


@dataclass
class BoundaryInfo:
    """The single tensor live at a cut point (shape without the batch dimension)."""

    index: int
    node: str
    shape: list[int]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def fp32_bytes(self) -> int:
        """Bytes of one sample of this tensor as float32 (the uncompressed wire size)."""
        return 4 * self.numel


@dataclass
class StageInfo:
    """One stage: the traced nodes it runs, its multiply-accumulates (every matrix product it runs, attention
    included: :mod:`splitinfer.macs`) and parameters (per sample)."""

    index: int
    nodes: list[str]
    macs: int
    params: int
    modules: list[str] = field(default_factory=list)
    peak_activation_bytes: int = 0  # largest set of simultaneously live tensors while the stage runs (batch 1)


def module_macs(mod: nn.Module, out_shape: torch.Size, in_shape: torch.Size | None = None) -> int:
    """Multiply-accumulates per sample of one conv/linear call producing ``out_shape``; a compound leaf (a
    factorized layer, ``splitinfer_leaf``) counts its own from its input and output shapes."""
    if getattr(mod, "splitinfer_leaf", False):
        return int(mod.macs(in_shape, out_shape))
    out_per_sample = 1
    for s in list(out_shape)[1:]:
        out_per_sample *= s
    if isinstance(mod, nn.modules.conv._ConvNd):
        k = 1
        for s in mod.kernel_size:
            k *= s
        return out_per_sample * (mod.in_channels // mod.groups) * k
    if isinstance(mod, nn.Linear):
        return out_per_sample * mod.in_features
    return 0


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping compound leaves (``splitinfer_leaf``: a factorized layer) as one call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return bool(getattr(m, "splitinfer_leaf", False)) or super().is_leaf_module(m, module_qualified_name)


class StagedModel(nn.Module):
    """A model cut into stages; see the module docstring."""

    def __init__(self, model: nn.Module, stages: list[fx.GraphModule], stage_info: list[StageInfo],
                 boundaries: list[BoundaryInfo]):
        super().__init__()
        self.model = model
        self.stages = nn.ModuleList(stages)
        self.stage_info = stage_info
        self.boundaries = boundaries

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def run(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Run stages ``start..end-1``: boundary ``start`` tensor in, boundary ``end`` tensor out."""
        if not 0 <= start <= end <= self.num_stages:
            raise IndexError(f"stage range {start}..{end} outside 0..{self.num_stages}")
        for stage in islice(self.stages, start, end):  # a ModuleList slice builds a new ModuleList (~20 us)
            x = stage(x)
        return x

    def head(self, k: int) -> nn.Sequential:
        """The edge part: stages ``[:k]`` (identity for k = 0), in this model's train/eval mode."""
        self._check_k(k)
        return self._sequence(self.stages[:k])

    def tail(self, k: int) -> nn.Sequential:
        """The server part: stages ``[k:]`` (identity for k = N), in this model's train/eval mode."""
        self._check_k(k)
        return self._sequence(self.stages[k:])

    def _sequence(self, stages) -> nn.Sequential:
        seq = nn.Sequential(*stages)
        seq.training = self.training  # the container only: each stage keeps its own mode
        return seq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, 0, self.num_stages)

    def macs_between(self, start: int, end: int) -> int:
        """Multiply-accumulates per sample of stages ``start..end-1``."""
        return sum(s.macs for s in self.stage_info[start:end])

    def _check_k(self, k: int) -> None:
        if not 0 <= k <= self.num_stages:
            raise IndexError(f"split {k} outside 0..{self.num_stages}")


def _tensor_bytes(node: fx.Node) -> int:
    """Bytes of one sample of the tensor a traced node produces (0 for non-tensors), from its shape metadata."""
    meta = node.meta.get("tensor_meta")
    if not isinstance(meta, TensorMeta):
        return 0
    n = 1
    for d in list(meta.shape)[1:]:
        n *= int(d)
    return n * torch.empty((), dtype=meta.dtype).element_size()


def _users_after(graph_nodes: list[fx.Node]) -> dict[fx.Node, int]:
    """For every node, the position of its last user (or its own position if unused)."""
    pos = {n: i for i, n in enumerate(graph_nodes)}
    last = {}
    for n in graph_nodes:
        last[n] = max([pos[u] for u in n.users] + [pos[n]])
    return last


def stage_model(model: nn.Module, example_input: torch.Tensor, *, count_macs: bool = True) -> StagedModel:
    """Trace ``model`` (eval mode) and cut it at every point where a single tensor value is live.

    ``example_input`` (any batch size) fixes the boundary shapes recorded in the result.
    Raises ``ValueError`` when the model cannot be traced or has more than one input/output.

    ``count_macs=False`` leaves every stage's ``macs`` at 0: the first torch dispatch mode a process enters (the
    MAC counter is one) imports torch's compiler stack, ~160 MB of resident memory, which a process that only
    runs a bundle must not pay (:func:`splitinfer.bundle.load_bundle` takes the MACs from ``plan.json``).
    """
    model = model.eval()
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model), model.__class__.__name__)
    except Exception as exc:  # fx raises many kinds of errors on untraceable code
        raise ValueError(f"model is not fx-traceable: {exc}") from exc
    with torch.no_grad():
        _ShapeRecorder(gm, count_macs).run(example_input)
    batch = max(1, int(example_input.shape[0]))

    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    outputs = [n for n in nodes if n.op == "output"]
    if len(placeholders) != 1 or len(outputs) != 1 or not isinstance(outputs[0].args[0], fx.Node):
        raise ValueError("only models with one tensor input and one tensor output can be staged")
    out_value = outputs[0].args[0]
    # get_attr nodes (parameters, buffers, constants) are re-created where used, never carried across a cut.
    compute = [n for n in nodes if n.op not in ("get_attr", "output")]
    last_use = _users_after(compute + outputs)
    pos = {n: i for i, n in enumerate(compute)}

    cut_after: list[int] = [0]  # positions (in ``compute``) of boundary nodes; 0 = the placeholder
    for i in range(1, len(compute)):
        node = compute[i]
        live = [m for m in compute[: i + 1] if last_use[m] > i and m.op != "get_attr"]
        meta = node.meta.get("tensor_meta")
        if live == [node] and isinstance(meta, TensorMeta):
            cut_after.append(i)
    if compute[cut_after[-1]] is not out_value:
        raise ValueError("the model's output is not a single tensor produced by its last node")

    stages: list[fx.GraphModule] = []
    infos: list[StageInfo] = []
    boundaries: list[BoundaryInfo] = []
    for b, p in enumerate(cut_after):
        meta = compute[p].meta["tensor_meta"]
        boundaries.append(BoundaryInfo(index=b, node=compute[p].name, shape=list(meta.shape)[1:],
                                       dtype=str(meta.dtype).replace("torch.", "")))
    for s in range(len(cut_after) - 1):
        lo, hi = cut_after[s], cut_after[s + 1]
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {compute[lo]: g.placeholder("x")}

        def lookup(n: fx.Node, env=env, g=g) -> fx.Node:
            if n not in env:
                if n.op != "get_attr":
                    raise ValueError(f"internal error: node {n.name} crosses a cut")
                env[n] = g.node_copy(n)
            return env[n]

        macs = 0
        mods: list[str] = []
        seg = compute[lo + 1 : hi + 1]
        live: dict[fx.Node, int] = {compute[lo]: _tensor_bytes(compute[lo])}
        peak = live[compute[lo]]
        for n in seg:
            env[n] = g.node_copy(n, lookup)
            if n.op == "call_module":
                mods.append(str(n.target))
            macs += n.meta.get("macs", 0)
            live[n] = _tensor_bytes(n)
            peak = max(peak, sum(live.values()))
            i = pos[n]
            for m in [m for m in live if last_use[m] <= i and m is not n]:
                del live[m]
        g.output(env[compute[hi]])
        stage = fx.GraphModule(gm, g, class_name=f"Stage{s}")
        params = sum(p.numel() for p in stage.parameters())
        stages.append(stage)
        infos.append(StageInfo(index=s, nodes=[n.name for n in seg], macs=int(macs) // batch, params=int(params),
                               modules=mods,
                               peak_activation_bytes=int(peak)))
    return StagedModel(model, stages, infos, boundaries)
