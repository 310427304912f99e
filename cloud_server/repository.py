"""The model repository: which bundles exist on disk, which are loaded, and in what state.

Two layouts:

* a single bundle (``bundle`` setting): served under its plan's model name as version ``1``;
* a repository directory (``model_repository`` setting), Triton's layout::

      ROOT/<model name>/<version>/plan.json ...   (version: a positive integer directory name)

  Every version of every model is loaded at start. ``RepositoryModelLoad`` (re)loads all versions of one
  model from disk (new versions appear, removed ones go); ``RepositoryModelUnload`` drains and drops it.
  A request for version ``""`` gets the highest loaded version.

Loading builds a :class:`ServedModel` through the factory the data plane passes in (tail + batcher); a
bundle that fails to load is listed by ``index()`` as ``UNAVAILABLE`` with the reason, and the other models
keep serving.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cloud_server.batcher import Batcher
from cloud_server.tail import TailRuntime
from splitinfer import wire
from splitinfer.bundle import read_plan
from splitinfer.errors import BundleError, NotFound, SplitInferError
from splitinfer.omp_teams import run_in_own_thread

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")


@dataclass
class ServedModel:
    """One loaded version of a model: its tail runtime and its batcher."""

    name: str
    version: str
    tail: TailRuntime
    batcher: Batcher


@dataclass
class IndexEntry:
    """One row of ``RepositoryIndex``."""

    name: str
    version: str
    state: str  # READY, UNAVAILABLE, UNLOADED
    reason: str = ""


ModelFactory = Callable[[str, str, Path], ServedModel]


class ModelRepository:
    """Loaded models by name and version, plus what the disk holds."""

    def __init__(self, factory: ModelFactory, root: Path | None = None, bundle: Path | None = None):
        if (root is None) == (bundle is None):
            raise BundleError("give exactly one of a bundle directory or a model repository directory")
        self.factory = factory
        self.root = Path(root) if root is not None else None
        self.bundle = Path(bundle) if bundle is not None else None
        self.models: dict[str, dict[str, ServedModel]] = {}
        self.failures: dict[tuple[str, str], str] = {}
        self.unloaded: set[str] = set()
        self._lock = asyncio.Lock()

    # -------------------------------------------------------------------------------------------- disk

    def scan(self) -> dict[str, dict[str, Path]]:
        """``{name: {version: bundle dir}}`` as the disk holds it now."""
        if self.bundle is not None:
            plan = read_plan(self.bundle)  # raises BundleError with a clear message
            return {plan.model.name: {wire.MODEL_VERSION: self.bundle}}
        if not self.root.is_dir():
            raise BundleError(f"model repository {self.root} is not a directory")
        found: dict[str, dict[str, Path]] = {}
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not _NAME.match(model_dir.name):
                log.warning("skipping repository entry with an invalid model name",
                            extra={"fields": {"path": str(model_dir)}})
                continue
            versions = {v.name: v for v in model_dir.iterdir() if v.is_dir() and v.name.isdigit()
                        and int(v.name) > 0}
            if versions:
                found[model_dir.name] = versions
        return found

    # ---------------------------------------------------------------------------------------- load/unload

    async def load_all(self) -> None:
        """Load every version of every model on disk (at start); fails only if nothing could be loaded."""
        names = list(self.scan())
        for name in names:
            await self.load(name, strict=False)
        if not self.models:
            detail = "; ".join(f"{n}/{v}: {r}" for (n, v), r in self.failures.items()) or "no bundles found"
            raise BundleError(f"no model could be loaded from {self.root or self.bundle}: {detail}")

    async def load(self, name: str, strict: bool = True) -> None:
        """(Re)load all on-disk versions of ``name``; old versions drain and go once the new ones are ready.

        A version that fails to reload keeps serving its previous copy (if any), and with ``strict`` the call
        then raises BundleError naming the failed versions (FAILED_PRECONDITION).
        """
        async with self._lock:
            on_disk = self.scan()
            if name not in on_disk:
                raise NotFound(f"model {name!r} is not in the repository")
            old = self.models.get(name, {})
            fresh: dict[str, ServedModel] = {}
            kept: dict[str, ServedModel] = {}
            errors: list[str] = []
            for version, path in sorted(on_disk[name].items(), key=lambda kv: int(kv[0])):
                try:
                    fresh[version] = await run_in_own_thread(self.factory, name, version, path,
                                                               name="load-model")
                    self.failures.pop((name, version), None)
                except SplitInferError as exc:
                    self.failures[(name, version)] = str(exc)
                    errors.append(f"version {version}: {exc}")
                    if version in old:
                        kept[version] = old[version]
                    log.error("cannot load model", extra={"fields": {"model": name, "version": version,
                                                                     "error": str(exc),
                                                                     "kept_previous": version in old}})
            serving = {**kept, **fresh}
            for served in fresh.values():
                served.batcher.start()
            if serving:
                self.models[name] = serving
                self.unloaded.discard(name)
            retired = [m for v, m in old.items() if serving.get(v) is not m]
            # Draining the retired copies must finish even if the caller goes away (deadline, cancel).
            await asyncio.shield(asyncio.gather(*(m.batcher.close() for m in retired)))
            if fresh:
                log.info("model loaded", extra={"fields": {"model": name, "versions": sorted(fresh),
                                                           "kept_previous": sorted(kept)}})
            elif not kept:
                log.error("model not loaded: no version could be loaded", extra={"fields": {"model": name}})
            if strict and errors:
                kept_note = f"; still serving the previous copy of {', '.join(sorted(kept))}" if kept else ""
                raise BundleError(f"cannot load model {name!r}: {'; '.join(errors)}{kept_note}")

    async def unload(self, name: str) -> None:
        """Refuse new requests for ``name``, finish its queued ones, then drop it."""
        async with self._lock:
            served = self.models.pop(name, None)
            if served is None:
                raise NotFound(f"model {name!r} is not loaded")
            self.unloaded.add(name)
            await asyncio.shield(asyncio.gather(*(m.batcher.close() for m in served.values())))
            log.info("model unloaded", extra={"fields": {"model": name}})

    async def close(self) -> None:
        """Drain every batcher (server shutdown)."""
        for versions in self.models.values():
            for model in versions.values():
                await model.batcher.close()

    # -------------------------------------------------------------------------------------------- query

    def get(self, name: str, version: str = "") -> ServedModel:
        """The loaded model ``name`` at ``version`` (``""``: the highest loaded version)."""
        versions = self.models.get(name)
        if not versions:
            known = ", ".join(sorted(self.models)) or "none"
            raise NotFound(f"unknown model {name!r}; this server serves: {known}")
        if not version:
            return versions[max(versions, key=int)]
        if version not in versions:
            raise NotFound(f"unknown version {version!r} of model {name!r}; available: "
                           f"{', '.join(sorted(versions, key=int))}")
        return versions[version]

    def names(self) -> list[str]:
        """Names of the loaded models."""
        return sorted(self.models)

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model version on disk or loaded, with its state."""
        entries: dict[tuple[str, str], IndexEntry] = {}
        try:
            on_disk = self.scan()
        except SplitInferError as exc:
            log.warning("cannot scan the model repository", extra={"fields": {"error": str(exc)}})
            on_disk = {}
        for name, versions in on_disk.items():
            for version in versions:
                state, reason = ("UNLOADED", "unloaded by request") if name in self.unloaded else (
                    "UNAVAILABLE", "not loaded")
                entries[(name, version)] = IndexEntry(name, version, state, reason)
        for (name, version), reason in self.failures.items():
            entries[(name, version)] = IndexEntry(name, version, "UNAVAILABLE", reason)
        for name, versions in self.models.items():
            for version in versions:
                entries[(name, version)] = IndexEntry(name, version, "READY")
        rows = sorted(entries.values(), key=lambda e: (e.name, int(e.version) if e.version.isdigit() else 0))
        return [e for e in rows if e.state == "READY"] if ready_only else rows


