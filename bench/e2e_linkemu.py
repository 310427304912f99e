"""The link emulator (:mod:`bench.linkemu`) as its own process whose rate and delay can be changed at run
time, for ``bench.e2e`` (``python -m bench.linkemu`` takes its settings once, on the command line).

``python -m bench.e2e_linkemu --target HOST:PORT --rate BPS --delay-ms D`` prints ``{"port": P}`` once the
emulator listens, then reads JSON lines on stdin: ``{"rate_bps": R, "delay_ms": D}`` changes both directions
(``RunningEmulator.update``: from the next chunk of every open connection, and for new ones) and answers
``{"ok": true, "t": time.monotonic()}``; end of input stops it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> None:
    from bench.linkemu import LinkSettings, start_in_thread

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True, help="HOST:PORT of the server")
    ap.add_argument("--rate", type=float, required=True, help="bandwidth each way, bit/s")
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay, ms")
    ap.add_argument("--listen-port", type=int, default=0)
    args = ap.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    emu = start_in_thread(host, int(port), LinkSettings(rate_bps=args.rate, delay_s=args.delay_ms / 1e3),
                          listen_port=args.listen_port)
    try:
        sys.stdout.write(json.dumps({"port": emu.port}) + "\n")
        sys.stdout.flush()
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
                emu.update(LinkSettings(rate_bps=float(msg["rate_bps"]), delay_s=float(msg["delay_ms"]) / 1e3))
                out = {"ok": True, "t": time.monotonic()}
            except Exception as exc:  # report, keep running
                out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            sys.stdout.write(json.dumps(out) + "\n")
            sys.stdout.flush()
    finally:
        emu.stop()


if __name__ == "__main__":
    main()
