"""The `spiffe` package from PyPI, unmodified, against a SPIFFE Workload
API. Prints one JSON object.

  spiffe_interop.py fetch unix:///path/workload.sock AUDIENCE
      X.509 context (chain verified against the bundle), JWT-SVID (checked
      with the JWT bundle and through ValidateJWTSVID), and the X.509
      stream until it has carried a rotated SVID.
  spiffe_interop.py denied unix:///path/workload.sock
      every call of the client, with the gRPC status each one ends with.
"""
import datetime
import json
import sys
import threading
import time

from cryptography.hazmat.primitives import serialization
from spiffe import JwtSvid, WorkloadApiClient


def fetch(client: WorkloadApiClient, audience: str) -> dict:
    ctx = client.fetch_x509_context()
    svid = ctx.default_svid
    td = svid.spiffe_id.trust_domain
    bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(td)
    if bundle is None:
        raise SystemExit("no bundle for the SVID's own trust domain")
    # The chain: each certificate issued by the next, the last by a root of
    # the trust domain's bundle; all valid now; the key is the leaf's.
    chain = svid.cert_chain
    now = datetime.datetime.now(datetime.timezone.utc)
    for cert in chain:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise SystemExit("a certificate of the chain is not valid now")
    for child, parent in zip(chain, chain[1:]):
        child.verify_directly_issued_by(parent)
    verified = False
    for root in bundle.x509_authorities:
        try:
            chain[-1].verify_directly_issued_by(root)
            verified = True
        except Exception:
            pass
    if not verified:
        raise SystemExit("the chain does not verify against the bundle")
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if svid.private_key.public_key().public_bytes(der, spki) != chain[0].public_key().public_bytes(der, spki):
        raise SystemExit("the private key is not the leaf's")

    jwt = client.fetch_jwt_svid(audience={audience})
    jwt_bundles = client.fetch_jwt_bundles()
    jwt_bundle = jwt_bundles.get_bundle_for_trust_domain(jwt.spiffe_id.trust_domain)
    validated = JwtSvid.parse_and_validate(jwt.token, jwt_bundle, {audience})
    try:
        JwtSvid.parse_and_validate(jwt.token, jwt_bundle, {"not-the-audience"})
        wrong_refused = False
    except Exception:
        wrong_refused = True
    by_api = client.validate_jwt_svid(jwt.token, audience)
    try:
        client.validate_jwt_svid(jwt.token, "not-the-audience")
        api_wrong_refused = False
    except Exception as e:
        api_wrong_refused = "INVALID_ARGUMENT" in str(e)

    # The stream: updates until a second SVID (a renewal) arrives.
    leaves = []
    errors = []
    rotated = threading.Event()

    def on_success(update):
        leaf = update.default_svid.leaf.serial_number
        if leaf not in leaves:
            leaves.append(leaf)
        if len(leaves) >= 2:
            rotated.set()

    def on_error(e):
        errors.append(str(e))
        rotated.set()

    started = time.monotonic()
    handle = client.stream_x509_contexts(on_success, on_error, retry_connect=False)
    rotated.wait(timeout=30)
    handle.cancel()
    return {
        "x509_id": str(svid.spiffe_id),
        "chain_verified": True,
        "trust_domains": sorted(str(b.trust_domain) for b in ctx.x509_bundle_set.bundles),
        "jwt_id": str(validated.spiffe_id),
        "jwt_wrong_audience_refused": wrong_refused,
        "validated_by_api": str(by_api.spiffe_id),
        "api_wrong_audience_refused": api_wrong_refused,
        "stream_svids": len(leaves),
        "stream_rotation_ms": int((time.monotonic() - started) * 1000),
        "stream_errors": errors,
    }


def status(e: Exception) -> str:
    text = str(e)
    for code in ("PERMISSION_DENIED", "INVALID_ARGUMENT", "INTERNAL", "UNAVAILABLE"):
        if code in text:
            return code
    return text


def denied(client: WorkloadApiClient) -> dict:
    calls = {
        "fetch_x509_svid": client.fetch_x509_svid,
        "fetch_x509_context": client.fetch_x509_context,
        "fetch_x509_bundles": client.fetch_x509_bundles,
        "fetch_jwt_svid": lambda: client.fetch_jwt_svid(audience={"db"}),
        "fetch_jwt_bundles": client.fetch_jwt_bundles,
        "validate_jwt_svid": lambda: client.validate_jwt_svid("a.b.c", "db"),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = "OK"
        except Exception as e:
            out[name] = status(e)
    done = threading.Event()
    seen = []

    def on_error(e):
        seen.append(status(e))
        done.set()

    handle = client.stream_x509_contexts(lambda _: done.set(), on_error, retry_connect=False)
    done.wait(timeout=10)
    handle.cancel()
    out["stream_x509_contexts"] = seen[0] if seen else "OK"
    return out


def main() -> None:
    mode, socket = sys.argv[1], sys.argv[2]
    client = WorkloadApiClient(socket_path=socket, default_timeout=10)
    if mode == "fetch":
        result = fetch(client, sys.argv[3])
    elif mode == "denied":
        result = denied(client)
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
