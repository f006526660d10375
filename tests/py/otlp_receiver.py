"""A real OTLP/HTTP receiver for the tests: decodes every export with the
official OpenTelemetry protobuf definitions (PyPI opentelemetry-proto) and
appends one JSON line per request to OUT: {"path", "raw" (hex of the body),
"msg" (the decoded message)}. A body that does not decode is a 400 and an
{"error"} line.

usage: otlp_receiver.py OUT [stall|grpc]
Prints "otlp receiver ready PORT" once listening. With `stall`, requests
are read and never answered. With `grpc`, it is an OTLP/gRPC receiver
(grpcio and the official service definitions) instead, writing the same
lines ("path" /v1/logs or /v1/traces, "content_type" application/grpc).
"""

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

OUT = sys.argv[1]
MODE = sys.argv[2] if len(sys.argv) > 2 else ""
STALL = MODE == "stall"
KINDS = {
    "/v1/logs": ExportLogsServiceRequest,
    "/v1/traces": ExportTraceServiceRequest,
    "/v1/metrics": ExportMetricsServiceRequest,
}


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


def record(path, msg):
    entry = {
        "path": path,
        "raw": msg.SerializeToString().hex(),
        "msg": MessageToDict(msg),
        "content_type": "application/grpc",
    }
    with open(OUT, "a") as f:
        f.write(json.dumps(entry) + "\n")


def serve_grpc():
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Logs(logs_service_pb2_grpc.LogsServiceServicer):
        def Export(self, request, context):
            record("/v1/logs", request)
            return logs_service_pb2.ExportLogsServiceResponse()

    class Traces(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            record("/v1/traces", request)
            return trace_service_pb2.ExportTraceServiceResponse()

    class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(self, request, context):
            record("/v1/metrics", request)
            return metrics_service_pb2.ExportMetricsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"otlp receiver ready {port}", flush=True)
    server.wait_for_termination()


if MODE == "grpc":
    serve_grpc()
else:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"otlp receiver ready {server.server_address[1]}", flush=True)
    server.serve_forever()
