"""The architecture's two import rules: the core imports no role (except its composition root, splitinfer/cli),
and the edge role's modules load without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("partitioner", "edge_agent", "cloud_server", "bench", "tests")
TORCH_FREE = ("edge_agent.app", "edge_agent.cli", "edge_agent.runtime", "edge_agent.engine", "edge_agent.onnx_head",
              "splitinfer.cli", "splitinfer.plan", "splitinfer.head", "splitinfer.imaging", "splitinfer.entropy")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_core_imports_no_role_outside_its_composition_root():
    core = [p for p in (ROOT / "splitinfer").rglob("*.py")
            if "cli" not in p.relative_to(ROOT / "splitinfer").parts[:1] and "protocol" not in p.parts]
    assert len(core) > 20
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.split(".")[0] in ROLES)
                 for p in core}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_edge_role_loads_without_torch():
    # torch made unimportable: any import of it along the way fails loudly
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n"
            "            raise ImportError(f'torch imported: {name}')\n"
            "sys.meta_path.insert(0, Block())\n"
            f"for m in {TORCH_FREE!r}:\n"
            "    __import__(m)\n"
            "print('torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False"
