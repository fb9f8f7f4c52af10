"""The upstream "API" of the credential broker's tests: an HTTPS server
(Python's own http.server and ssl, HTTP/1.1) with a certificate of the
tests' own CA (plain HTTP when CERT is `-`), which requires an API key
in a header, as the model APIs do.

    key_api.py ADDR PORT CERT KEY HEADER KEYFILE READY

Every request without HEADER equal to the key in KEYFILE gets 401. With
it: `GET /v1/stream` answers server-sent events, five chunks 100 ms
apart (chunked, as the model APIs send them); `POST /v1/messages`
answers like the Anthropic Messages API (so its SDK can call it);
anything else answers JSON with the method, path, headers (all but
HEADER) and body it got. READY is a file written once the server
listens.
"""

import json
import sys
import time
from http.server import BaseHTTPRequestHandler

from serving import serve


def main():
    addr, port, cert, key, header, key_file, ready = sys.argv[1:8]
    with open(key_file) as f:
        secret = f.read().strip()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            sys.stderr.write("key_api: " + (fmt % args) + "\n")

        def reply(self, status, body, content_type="application/json"):
            data = body.encode()
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def handle_any(self):
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length).decode(errors="replace") if length else ""
            if self.headers.get(header) != secret:
                self.reply(401, json.dumps({"error": "missing or wrong key"}))
                return
            if self.path == "/v1/stream":
                # As the model APIs stream: chunked, one event a chunk.
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("cache-control", "no-cache")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for i in range(5):
                    event = f"data: chunk {i} {time.monotonic()}\n\n".encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                    self.wfile.flush()
                    time.sleep(0.1)
                self.wfile.write(b"0\r\n\r\n")
                return
            if self.command == "POST" and self.path == "/v1/messages":
                asked = json.loads(body or "{}")
                self.reply(
                    200,
                    json.dumps(
                        {
                            "id": "msg_test",
                            "type": "message",
                            "role": "assistant",
                            "model": asked.get("model", "test"),
                            "content": [{"type": "text", "text": "hello from the test API"}],
                            "stop_reason": "end_turn",
                            "stop_sequence": None,
                            "usage": {"input_tokens": 1, "output_tokens": 5},
                        }
                    ),
                )
                return
            self.reply(
                200,
                json.dumps(
                    {
                        "method": self.command,
                        "path": self.path,
                        # Never the key: what the workload can see.
                        "headers": {
                            k.lower(): v
                            for k, v in self.headers.items()
                            if k.lower() != header.lower()
                        },
                        "body": body,
                    }
                ),
            )

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_any

    serve(addr, port, cert, key, Handler, ready)


if __name__ == "__main__":
    main()
