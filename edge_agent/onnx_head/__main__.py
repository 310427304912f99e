"""``python -m edge_agent.onnx_head``: see :func:`edge_agent.onnx_head.cli.main`."""

from edge_agent.onnx_head.cli import main

raise SystemExit(main())
