"""Fetches an X.509-SVID, bundles and a JWT-SVID from a SPIFFE Workload API
with the `spiffe` package from PyPI, verifies them, and prints one JSON
object. Usage: spiffe_interop.py unix:///path/to/workload.sock AUDIENCE
"""
import datetime
import json
import sys

import grpc
from cryptography.hazmat.primitives import serialization
from spiffe import JwtSvid, WorkloadApiClient

# gRPC C-core sends the socket path as the HTTP/2 `:authority` on Unix
# sockets; the h2 crate under idgate's tonic server refuses that as a
# malformed authority (hyperium/h2 pull request 487, unmerged). The
# channel is given the `localhost` authority that grpc-go and tonic
# clients send on Unix sockets; the package itself is used unchanged.
_insecure_channel = grpc.insecure_channel


def _localhost_authority(target, options=None, *args, **kwargs):
    options = list(options or []) + [("grpc.default_authority", "localhost")]
    return _insecure_channel(target, options, *args, **kwargs)


grpc.insecure_channel = _localhost_authority


def main() -> None:
    socket, audience = sys.argv[1], sys.argv[2]
    client = WorkloadApiClient(socket_path=socket, default_timeout=10)
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
    print(json.dumps({
        "x509_id": str(svid.spiffe_id),
        "chain_verified": True,
        "trust_domains": sorted(str(b.trust_domain) for b in ctx.x509_bundle_set.bundles),
        "jwt_id": str(validated.spiffe_id),
        "jwt_wrong_audience_refused": wrong_refused,
    }))


if __name__ == "__main__":
    main()
