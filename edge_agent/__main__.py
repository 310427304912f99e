"""``python -m edge_agent run --bundle DIR --server HOST:PORT``."""

from edge_agent.cli import app

if __name__ == "__main__":
    app(prog_name="python -m edge_agent")
