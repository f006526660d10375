#!/bin/sh
# Runs @modelcontextprotocol/server-everything over streamable HTTP as a
# Lever `transport: http` backend: the broker appends `-backend ADDR`, the
# server takes its port from $PORT.
set -eu
[ "${1:-}" = "-backend" ] && [ -n "${2:-}" ] || { echo "usage: $0 -backend HOST:PORT" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
PORT="${2##*:}" exec node "$here/node_modules/@modelcontextprotocol/server-everything/dist/index.js" streamableHttp
