"""An OIDC relying party made of code from PyPI, unmodified: PyJWT's
PyJWKClient finds the keys through the issuer's discovery document, and
jwt.decode checks a JWT-SVID that the workload fetched through the
`spiffe` package's Workload API client. Prints one JSON object.

  oidc_verify.py verify DISCOVERY_URL ISSUER AUDIENCE
      one JWT-SVID, verified; the same token for another audience refused;
      the answers' content type and cache headers.
  oidc_verify.py rotation DISCOVERY_URL ISSUER AUDIENCE STATIC_DIR SECONDS
      JWT-SVIDs until one is signed by a new key (at most SECONDS), each
      verified with one PyJWKClient; the first token's key still served;
      the static files equal the served documents.
  oidc_verify.py foreign DISCOVERY_URL ISSUER AUDIENCE
      this workload's JWT-SVID (of another trust domain) must be refused.
"""
import json
import os
import sys
import time
import urllib.request

import jwt
from spiffe import WorkloadApiClient


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r), r.headers.get("Content-Type"), r.headers.get("Cache-Control")


class Relying:
    def __init__(self, discovery_url: str, issuer: str, audience: str):
        self.discovery, self.content_type, self.cache = get(discovery_url)
        if self.discovery["issuer"] != issuer:
            raise SystemExit(f"discovery names issuer {self.discovery['issuer']!r}")
        self.issuer, self.audience = issuer, audience
        self.jwks = jwt.PyJWKClient(self.discovery["jwks_uri"])
        self.algs = self.discovery["id_token_signing_alg_values_supported"]

    def verify(self, token: str, audience=None, verify_exp=True) -> dict:
        key = self.jwks.get_signing_key_from_jwt(token)
        return jwt.decode(
            token,
            key.key,
            algorithms=self.algs,
            audience=audience or self.audience,
            issuer=self.issuer,
            options={"verify_exp": verify_exp, "require": ["exp", "iat", "iss", "sub", "aud"]},
        )


def fetch(client: WorkloadApiClient, audience: str) -> str:
    return client.fetch_jwt_svid(audience={audience}).token


def refused(call) -> str:
    try:
        call()
    except Exception as e:
        return type(e).__name__
    return ""


def main() -> None:
    mode, discovery_url, issuer, audience = sys.argv[1:5]
    rp = Relying(discovery_url, issuer, audience)
    client = WorkloadApiClient()
    token = fetch(client, audience)
    out = {}
    if mode == "verify":
        claims = rp.verify(token)
        _, jwks_type, jwks_cache = get(rp.discovery["jwks_uri"])
        out = {
            "sub": claims["sub"],
            "iss": claims["iss"],
            "algs": rp.algs,
            "discovery_content_type": rp.content_type,
            "discovery_cache_control": rp.cache,
            "jwks_content_type": jwks_type,
            "jwks_cache_control": jwks_cache,
            "wrong_audience_refused": refused(lambda: rp.verify(token, "not-the-audience")),
        }
    elif mode == "rotation":
        static_dir, seconds = sys.argv[5], float(sys.argv[6])
        first_kid = jwt.get_unverified_header(token)["kid"]
        rp.verify(token)
        deadline = time.monotonic() + seconds
        new = None
        while time.monotonic() < deadline:
            t = fetch(client, audience)
            rp.verify(t)
            if jwt.get_unverified_header(t)["kid"] != first_kid:
                new = t
                break
            time.sleep(1)
        if new is None:
            raise SystemExit(f"no token of a new key within {seconds}s")
        served_jwks, _, _ = get(rp.discovery["jwks_uri"])
        served_discovery, _, _ = get(discovery_url)
        with open(os.path.join(static_dir, "jwks.json")) as f:
            file_jwks = json.load(f)
        with open(os.path.join(static_dir, ".well-known", "openid-configuration")) as f:
            file_discovery = json.load(f)
        out = {
            "first_kid": first_kid,
            "new_kid": jwt.get_unverified_header(new)["kid"],
            "new_sub": rp.verify(new)["sub"],
            # The first key stays published while its tokens can live.
            "first_token_key_served": rp.verify(token, verify_exp=False)["sub"],
            "served_kids": sorted(k["kid"] for k in served_jwks["keys"]),
            "static_jwks_matches": file_jwks == served_jwks,
            "static_discovery_matches": file_discovery == served_discovery,
        }
    elif mode == "foreign":
        out = {
            "sub": jwt.decode(token, options={"verify_signature": False})["sub"],
            "refused": refused(lambda: rp.verify(token)),
        }
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
