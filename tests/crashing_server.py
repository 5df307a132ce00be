"""A stand-in for a llama-cpp-python server whose native code crashes on the first chat completion.

``python tests/crashing_server.py PORT``: answers ``GET /v1/models`` as the real server does, writes a
log line and dies of SIGSEGV on ``POST /v1/chat/completions``, which is how a miscompiled llama.cpp
build failed (issue 31). The watcher test in tests/test_llama_watch.py runs the synthesizer against it.
"""

import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": "smollm2", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        print("llama_decode: crashing in the stand-in's native decode", flush=True)
        os.kill(os.getpid(), signal.SIGSEGV)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    signal.signal(signal.SIGSEGV, signal.SIG_DFL)
    HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
