"""A WebSocket upstream for the credential broker's tests: the
`websockets` package's server over TLS (Python's ssl) with a certificate
of the tests' own CA, which requires an API key in a header of the
opening handshake, and echoes every message it gets.

    ws_api.py ADDR PORT CERT KEY HEADER KEYFILE READY

A handshake without HEADER equal to the key in KEYFILE gets 401. Each
text message M is answered `echo: M`. READY is a file written once the
server listens.
"""

import asyncio
import http
import ssl
import sys

from websockets.asyncio.server import serve


def main():
    addr, port, cert, key, header, key_file, ready = sys.argv[1:8]
    with open(key_file) as f:
        secret = f.read().strip()

    def check_key(connection, request):
        if request.headers.get(header) != secret:
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong key\n")
        return None

    async def echo(websocket):
        async for message in websocket:
            await websocket.send(f"echo: {message}")

    async def run():
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        async with serve(echo, addr, int(port), ssl=context, process_request=check_key) as server:
            with open(ready, "w") as f:
                f.write("ready\n")
            await server.serve_forever()

    asyncio.run(run())


if __name__ == "__main__":
    main()
