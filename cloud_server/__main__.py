"""``python -m cloud_server serve --bundle DIR [--host H] [--port P] [--metrics-port M]``."""

from cloud_server.cli import app

if __name__ == "__main__":
    app(prog_name="cloud_server")
