"""The tail in a real Triton Inference Server, through its Python backend.

``splitinfer cloud export-triton BUNDLE OUT --backend python`` writes (:func:`write_python_repository`)::

    OUT/<model>/config.pbtxt              ensemble named like the plan's model: what the edge agent calls; input
                                          ``features`` UINT8 [-1] (the payload) + request parameters split, codec,
                                          codec.<key>; output ``logits`` FP32 [-1, -1]
    OUT/<model>_decode/{config.pbtxt,1/model.py}   step 1, Python backend, no batching: payload -> ``x`` [B, n]
    OUT/<model>_tail/{config.pbtxt,1/model.py}     step 2, Python backend, dynamic batching (ragged ``x``):
                                                    the tail once per batch and split
    OUT/<model>_tail/1/bundle/            a copy of the bundle both steps load

``model.py`` is :mod:`cloud_server.triton_python_model`; both steps run :class:`~cloud_server.tail.TailRuntime`,
so decoding, checks and answers are our server's. Why an ensemble: the edge sends a 1-D payload without a batch
dimension, which only a ``max_batch_size: 0`` model accepts, and Triton forms no batches for such a model (its
scheduler's batch is ``max(1, max_batch_size)`` requests); the ensemble's first step takes the edge's request
as it is, the second batches. Each step runs in ``EXECUTION_ENV_PATH``: this project's virtual environment
(``--python-env``, default: the running one).

Running it (:func:`prepare_triton`, :func:`start_tritonserver`): Triton 2.51 with the Python backend ships
in the ``nvidia-pytriton`` wheel (PyPI). It cannot join this project's environment (it pins numpy < 2 and other
packages), so :func:`prepare_triton` installs it into a separate virtual environment (default
``runs/.venv-triton``, ~370 MB, ~20 s) and lays out a backend directory with the Python backend and the stub
built for this Python's minor version. :func:`start_tritonserver` runs ``tritonserver`` on loopback, gRPC only,
with the wheel's libraries and this Python's ``libpython`` on ``LD_LIBRARY_PATH``.

Limits of this Triton version (2.51): response parameters are not supported by the Python backend, so the edge
sees no ``server_queue_ms``/``server_compute_ms`` (0); the learned bottleneck's decoder runs once per request
(step 1), only the tail is batched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from splitinfer.bundle import read_plan
from splitinfer.daemons import Daemon
from splitinfer.errors import ConfigError, SplitInferError

PYTRITON = "nvidia-pytriton==0.7.0"  # tritonserver 2.51 (Triton release 24.10), CPU-capable, Python backend
TEMPLATE = Path(__file__).with_name("triton_python_model.py")
DEFAULT_ENV_DIR = Path("runs/.venv-triton")


def _params(values: dict[str, str]) -> str:
    return "\n".join(f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in values.items())


def _python_model(out: Path, name: str, role: str, max_batch: int, inputs: str, outputs: str, batching: str,
                  params: dict[str, str], instances: int) -> None:
    d = out / name
    (d / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TEMPLATE, d / "1" / "model.py")
    (d / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch}\ninput [ {inputs} ]\n'
        f"output [ {outputs} ]\n{batching}\ninstance_group [ {{ kind: KIND_CPU count: {instances} }} ]\n"
        f"{_params({**params, 'ROLE': role})}\n")


@dataclass
class PythonRepository:
    """What :func:`write_python_repository` wrote."""

    root: Path
    model_name: str
    decode_model: str
    tail_model: str
    bundle_copy: Path


def write_python_repository(bundle: str | Path, out: str | Path, *, model_name: str | None = None,
                            max_batch: int = 32, max_delay_us: int = 2000, torch_threads: int = 1,
                            tail_engine: str = "torch", python_env: str | Path | None = None, instances: int = 1,
                            max_request_batch: int = 64, engine_splits: list[int] | None = None,
                            force: bool = False) -> PythonRepository:
    """Write the ensemble repository (see the module docstring) for ``bundle`` into ``out``."""
    bundle = Path(bundle)
    plan = read_plan(bundle)  # a broken bundle fails here, before anything is written
    name = model_name or plan.model.name
    env = Path(python_env or sys.prefix).resolve()
    if not (env / "bin" / "activate").is_file():
        raise ConfigError(f"--python-env {env} is not a virtual environment (no bin/activate)")
    if max_batch < 1 or max_delay_us < 0 or torch_threads < 1 or instances < 1:
        raise ConfigError("max batch, torch threads and instances must be >= 1 and the delay >= 0")
    out = Path(out)
    names = (name, f"{name}_decode", f"{name}_tail")
    existing = [n for n in names if (out / n).exists()]
    if existing and not force:
        raise SplitInferError(f"{out} already holds {', '.join(existing)}; pass --force to replace")
    for n in existing:
        shutil.rmtree(out / n)
    out.mkdir(parents=True, exist_ok=True)
    copy = out / f"{name}_tail" / "1" / "bundle"
    shutil.copytree(bundle, copy)
    common = {"BUNDLE": f"{name}_tail/1/bundle", "EXECUTION_ENV_PATH": str(env), "TORCH_THREADS": str(torch_threads),
              "MAX_REQUEST_BATCH": str(max_request_batch), "TAIL_ENGINE": tail_engine,
              "TAIL_ENGINE_SPLITS": ",".join(map(str, engine_splits or []))}
    features = '{ name: "features" data_type: TYPE_UINT8 dims: [ -1 ] }'
    logits = '{ name: "logits" data_type: TYPE_FP32 dims: [ -1, -1 ] }'
    _python_model(out, f"{name}_decode", "decode", 0, features,
                  '{ name: "x" data_type: TYPE_FP32 dims: [ -1, -1 ] }', "", common, instances)
    _python_model(out, f"{name}_tail", "tail", max_batch,
                  '{ name: "x" data_type: TYPE_FP32 dims: [ -1 ] allow_ragged_batch: true }',
                  '{ name: "logits" data_type: TYPE_FP32 dims: [ -1 ] }',
                  f"dynamic_batching {{ max_queue_delay_microseconds: {max_delay_us} }}", common, instances)
    (out / name / "1").mkdir(parents=True, exist_ok=True)
    (out / name / "config.pbtxt").write_text(f'''name: "{name}"
platform: "ensemble"
max_batch_size: 0
input [ {features} ]
output [ {logits} ]
ensemble_scheduling {{ step [
  {{ model_name: "{name}_decode" model_version: -1
     input_map {{ key: "features" value: "features" }} output_map {{ key: "x" value: "flat_features" }} }},
  {{ model_name: "{name}_tail" model_version: -1
     input_map {{ key: "x" value: "flat_features" }} output_map {{ key: "logits" value: "logits" }} }}
] }}
''')
    return PythonRepository(out, name, f"{name}_decode", f"{name}_tail", copy)


# ------------------------------------------------------------------------------------------ the Triton server


@dataclass
class TritonInstall:
    """Where :func:`prepare_triton` put things."""

    env: Path
    tritonserver: Path
    libs: Path
    backends: Path

    def ld_library_path(self) -> str:
        """The wheel's bundled libraries, then the directory of this Python's libpython (the stub links it)."""
        return os.pathsep.join([str(self.libs), sysconfig.get_config_var("LIBDIR") or ""])


def _site_packages(env: Path) -> Path:
    out = subprocess.run([str(env / "bin" / "python"), "-c",
                          "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def prepare_triton(env_dir: str | Path = DEFAULT_ENV_DIR, log=print) -> TritonInstall:
    """Install ``nvidia-pytriton`` into ``env_dir`` (once) and lay out ``env_dir/backends/python`` with the stub
    for this Python's minor version; returns the paths. Raises ConfigError when pip cannot install it."""
    env = Path(env_dir).resolve()
    py = env / "bin" / "python"
    if not py.exists():
        log(f"creating {env} for Triton ({PYTRITON}) ...")
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    site = _site_packages(env)
    dist = site / "pytriton" / "tritonserver"
    if not (dist / "bin" / "tritonserver").exists():
        log(f"pip install {PYTRITON} into {env} ...")
        done = subprocess.run([str(py), "-m", "pip", "install", "-q", PYTRITON], capture_output=True, text=True)
        if done.returncode != 0:
            raise ConfigError(f"cannot install {PYTRITON} into {env}: {done.stderr.strip()[-800:]}")
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / minor / "triton_python_backend_stub"
    if not stub.exists():
        raise ConfigError(f"{PYTRITON} ships no Python-backend stub for Python {minor} ({stub})")
    backends = env / "backends"
    target = backends / "python"
    if not (target / "triton_python_backend_stub").exists():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(dist / "backends" / "python", target, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, target / "triton_python_backend_stub")
    return TritonInstall(env, dist / "bin" / "tritonserver", site / "nvidia_pytriton.libs", backends)


def start_tritonserver(install: TritonInstall, repository: str | Path, port: int, log_path: str | Path,
                       model: str | None = None, timeout: float = 120.0) -> Daemon:
    """``tritonserver`` for ``repository`` on 127.0.0.1:``port`` (gRPC only, no HTTP, no metrics), ready when
    ``model`` (or the server's health) is; raises :class:`~splitinfer.daemons.DaemonError` with its log if not."""
    env = {**os.environ, "LD_LIBRARY_PATH": install.ld_library_path(), "PYTHONDONTWRITEBYTECODE": "1"}
    args = [install.tritonserver, f"--model-repository={Path(repository).resolve()}",
            f"--backend-directory={install.backends}", "--allow-http=false", "--allow-metrics=false",
            "--allow-gpu-metrics=false", "--grpc-address=127.0.0.1", f"--grpc-port={port}",
            "--strict-readiness=true", "--exit-timeout-secs=5", "--log-verbose=0"]
    daemon = Daemon(args, name="tritonserver", log_path=log_path, env=env, new_session=True, stop_timeout=15.0)
    try:
        daemon.wait_grpc_ready(f"127.0.0.1:{port}", model=model, timeout=timeout)
    except Exception:
        daemon.kill()
        raise
    return daemon


def describe(repo: PythonRepository) -> str:
    """One line per model for the CLI."""
    return json.dumps({"repository": str(repo.root), "ensemble": repo.model_name, "steps": [repo.decode_model,
                       repo.tail_model], "bundle": str(repo.bundle_copy)})
