"""A real OTLP/HTTP receiver for the tests: decodes every export with the
official OpenTelemetry protobuf definitions (PyPI opentelemetry-proto) and
appends one JSON line per request to OUT: {"path", "raw" (hex of the body),
"msg" (the decoded message)}. A body that does not decode is a 400 and an
{"error"} line.

usage: otlp_receiver.py OUT [stall]
Prints "otlp receiver ready PORT" once listening. With `stall`, requests
are read and never answered.
"""

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

OUT = sys.argv[1]
STALL = len(sys.argv) > 2 and sys.argv[2] == "stall"
KINDS = {"/v1/logs": ExportLogsServiceRequest, "/v1/traces": ExportTraceServiceRequest}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if STALL:
            time.sleep(3600)
            return
        kind = KINDS.get(self.path)
        entry = {"path": self.path, "raw": body.hex()}
        status = 200
        try:
            if kind is None:
                raise ValueError("unknown path")
            msg = kind()
            msg.ParseFromString(body)
            entry["msg"] = MessageToDict(msg)
            entry["content_type"] = self.headers.get("content-type")
        except Exception as e:  # noqa: BLE001 - report anything that does not decode
            entry["error"] = str(e)
            status = 400
        with open(OUT, "a") as f:
            f.write(json.dumps(entry) + "\n")
        self.send_response(status)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(f"otlp receiver ready {server.server_address[1]}", flush=True)
server.serve_forever()
