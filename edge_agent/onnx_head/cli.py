"""``python -m edge_agent.onnx_head``: ``export`` (needs torch) and ``run`` (the torch-free request path)."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from edge_agent.onnx_head.edge import NumpyEdge
from edge_agent.onnx_head.export import export_head
from edge_agent.onnx_head.runtime import OnnxHead


def main(argv: list[str] | None = None) -> int:
    """``python -m edge_agent.onnx_head export --bundle DIR --out DIR`` (needs torch) and
    ``python -m edge_agent.onnx_head run --head DIR --images FILE.npy`` (torch-free: JSON lines of decisions with
    base64 payloads; exits with status 3 if torch was imported along the way)."""
    ap = argparse.ArgumentParser(prog="python -m edge_agent.onnx_head",
                                 description="The edge head exported to ONNX and run with ONNX Runtime.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="export a bundle's head to ONNX (needs torch)")
    ex.add_argument("--bundle", required=True)
    ex.add_argument("--out", required=True)
    ex.add_argument("--split", type=int)
    ex.add_argument("--exits", help="comma-separated exit boundaries (default: the plan's)")
    ex.add_argument("--no-operating-points", action="store_true")
    run = sub.add_parser("run", help="torch-free request path over uint8 images [N, H, W(, C)] in a .npy")
    run.add_argument("--head", required=True)
    run.add_argument("--images", required=True)
    run.add_argument("--bundle", help="check the export against this bundle and take its plan and thresholds")
    run.add_argument("--split", type=int)
    run.add_argument("--exits", help="comma-separated exit boundaries (default: the export's)")
    run.add_argument("--out", help="JSON lines file (default: stdout)")
    args = ap.parse_args(argv)
    exits = None if not args.exits else [int(b) for b in args.exits.split(",")]
    if args.cmd == "export":
        m = export_head(args.bundle, args.split, exits, args.out, operating_points=not args.no_operating_points)
        print(json.dumps({"out": args.out, "split": m.split, "exits": m.active_exits, "codec": m.codec.name,
                          "files": len(m.entries()), "bytes": sum(e.bytes for e in m.entries()),
                          "max_abs_diff": max(e.max_abs_diff for e in m.entries())}))
        return 0
    head = OnnxHead.load(args.head, bundle_dir=args.bundle)
    edge = NumpyEdge(head, args.split, exits)
    images = np.load(args.images, allow_pickle=False)
    x = edge.normalise(images)
    out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115 - closed below
    try:
        for i in range(len(x)):
            out.write(json.dumps(edge.infer(x[i : i + 1]).to_dict()) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    torch_loaded = "torch" in sys.modules
    print(json.dumps({"requests": len(x), "torch_imported": torch_loaded}), file=sys.stderr)
    return 3 if torch_loaded else 0
