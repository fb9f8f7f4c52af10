"""What the tests' HTTP servers (key_api.py, token_endpoint.py) share:
Python's own threading HTTP server, over TLS with a certificate of the
tests' CA (plain HTTP when CERT is `-`), and a READY file written once
it listens.
"""

import ssl
from http.server import ThreadingHTTPServer


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(addr, port, cert, key, handler, ready):
    """Serves `handler` on ADDR:PORT until killed."""
    server = Server((addr, int(port)), handler)
    if cert != "-":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    with open(ready, "w") as f:
        f.write("ready\n")
    server.serve_forever()
