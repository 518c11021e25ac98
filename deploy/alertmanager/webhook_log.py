"""A webhook receiver for Alertmanager that prints each alert it is sent as one JSON line on
standard output (``docker compose logs -f alert-log``), then answers 200.

    python webhook_log.py --host 0.0.0.0 --port 9095

One line per alert of each notification: ``{"status": "firing" | "resolved", "labels": {...},
"annotations": {...}, "startsAt": ..., "endsAt": ..., "receiver": ...}``. Python's standard
library only: any Python 3 image runs it (docker-compose.yml uses python:3.11-slim-bookworm).
A POST that is not Alertmanager's JSON gets 400. Replace it with the receiver your team reads
(deploy/alertmanager/alertmanager.yml).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY_BYTES = 1 << 20
OUTPUT = threading.Lock()  # notifications come in on threads of their own: whole lines, one at a time


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY_BYTES:
            self.send_error(400, "expected a JSON body of Alertmanager's webhook format")
            return
        try:
            body = json.loads(self.rfile.read(length))
            alerts = body["alerts"]
            lines = [json.dumps({"status": a["status"], "labels": a.get("labels", {}),
                                 "annotations": a.get("annotations", {}), "startsAt": a.get("startsAt"),
                                 "endsAt": a.get("endsAt"), "receiver": body.get("receiver")}, sort_keys=True)
                     for a in alerts]
        except (ValueError, KeyError, TypeError, AttributeError):
            self.send_error(400, "expected a JSON body of Alertmanager's webhook format")
            return
        with OUTPUT:
            sys.stdout.write("".join(line + "\n" for line in lines))
            sys.stdout.flush()
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args) -> None:  # requests are not news; the alerts are
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="webhook_log.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=9095, help="port, 0 picks a free one (default: %(default)s)")
    args = p.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"webhook_log: listening on {args.host}:{server.server_address[1]}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
