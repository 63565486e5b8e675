"""docs/examples/multiturn_frontend.py's OpenAI-compatible chat call, against a stand-in HTTP server: the request it
sends is a valid chat-completions request and the answer is read back (on a GPU host, run the example against a
real server: results/frontend_asynctls_h100.json)."""

import importlib.util
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "examples",
                       "multiturn_frontend.py")


def _load():
    spec = importlib.util.spec_from_file_location("multiturn_frontend", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_openai_chat_call_sends_a_chat_completion_and_reads_the_answer():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "The code is 4471."}}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        example = _load()
        answer = example.run_openai_chat(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
    assert answer == "The code is 4471."
    path, body = seen[0]
    assert path.endswith("/chat/completions") and body["temperature"] == 0 and body["max_tokens"] == 24
    assert body["messages"][0]["role"] == "user" and example.SECRET in body["messages"][0]["content"]
