"""The OAuth 2.0 token endpoint of the credential broker's tests: an
HTTPS server (Python's own http.server and ssl) with a certificate of
the tests' own CA that takes a JWT-SVID, validates it as a relying party
does (PyJWT, unmodified: the keys from the JWKS that idgate's OIDC
discovery document names; signature, `iss`, `aud`, `exp`, and `sub`
the expected SPIFFE ID) and issues an access token.

    token_endpoint.py ADDR PORT CERT KEY DISCOVERY_URL AUDIENCE SUBJECT TOKEN_FILE CALLS READY

`POST /token` takes an RFC 8693 token exchange (the JWT-SVID as
`subject_token`) or a client credentials grant with the JWT-SVID as
`client_assertion` (RFC 7523). A valid one gets the token in TOKEN_FILE:
`{"access_token": ..., "token_type": "Bearer", "expires_in": 300}`;
any other gets 400 or 401 with an OAuth error. Each request appends a
line to CALLS: `issued SUB`, or `refused ERROR REASON`. READY is a file
written once the server listens.
"""

import json
import sys
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler

import jwt

from serving import serve

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class Refused(Exception):
    def __init__(self, status, error, description):
        super().__init__(description)
        self.status, self.error, self.description = status, error, description


def main():
    addr, port, cert, key, discovery_url, audience, subject, token_file, calls, ready = sys.argv[1:11]
    with open(token_file) as f:
        access_token = f.read().strip()
    lock = threading.Lock()
    relying = {}

    def keys():
        # Read once the agent serves it (the first request comes later).
        with lock:
            if not relying:
                with urllib.request.urlopen(discovery_url, timeout=10) as r:
                    discovery = json.load(r)
                relying["issuer"] = discovery["issuer"]
                relying["algs"] = discovery["id_token_signing_alg_values_supported"]
                relying["jwks"] = jwt.PyJWKClient(discovery["jwks_uri"])
            return relying

    def validate(form):
        grant = form.get("grant_type")
        if grant == TOKEN_EXCHANGE:
            if form.get("subject_token_type") != JWT_TOKEN_TYPE:
                raise Refused(400, "invalid_request", "subject_token_type is not a JWT")
            token = form.get("subject_token")
        elif grant == "client_credentials":
            if form.get("client_assertion_type") != JWT_BEARER:
                raise Refused(401, "invalid_client", "client_assertion_type is not jwt-bearer")
            token = form.get("client_assertion")
        else:
            raise Refused(400, "unsupported_grant_type", f"grant_type {grant!r}")
        if not token:
            raise Refused(400, "invalid_request", "no JWT")
        rp = keys()
        try:
            key = rp["jwks"].get_signing_key_from_jwt(token)
            claims = jwt.decode(
                token,
                key.key,
                algorithms=rp["algs"],
                audience=audience,
                issuer=rp["issuer"],
                options={"require": ["exp", "iss", "sub", "aud"]},
            )
        except jwt.PyJWTError as e:
            # The name of the check that failed, never the token.
            raise Refused(401, "invalid_grant", f"the JWT was refused: {type(e).__name__}")
        if claims["sub"] != subject:
            raise Refused(401, "invalid_grant", "the JWT's subject is not the expected one")
        return claims["sub"]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            sys.stderr.write("token_endpoint: " + (fmt % args) + "\n")

        def reply(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("cache-control", "no-store")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def called(self, line):
            with lock, open(calls, "a") as f:
                f.write(line + "\n")

        def do_POST(self):
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length).decode()
            if self.path != "/token":
                self.reply(404, {"error": "not_found"})
                return
            if self.headers.get("content-type") != "application/x-www-form-urlencoded":
                self.reply(400, {"error": "invalid_request", "error_description": "not a form"})
                return
            form = dict(urllib.parse.parse_qsl(body))
            try:
                sub = validate(form)
            except Refused as e:
                self.called(f"refused {e.error} {e.description}")
                self.reply(e.status, {"error": e.error, "error_description": e.description})
                return
            self.called(f"issued {sub}")
            self.reply(
                200,
                {"access_token": access_token, "token_type": "Bearer", "expires_in": 300},
            )

    serve(addr, port, cert, key, Handler, ready)


if __name__ == "__main__":
    main()
