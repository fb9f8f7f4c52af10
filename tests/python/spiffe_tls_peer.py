"""Mutual TLS between workloads with `spiffe-tls` from PyPI, unmodified,
its SVIDs from the Workload API at SPIFFE_ENDPOINT_SOCKET.

  spiffe_tls_peer.py serve ALLOWED_ID
      listens on 127.0.0.1 (prints `listening PORT`), accepts one client
      whose SVID is ALLOWED_ID, answers `hello CLIENT from SERVER`.
  spiffe_tls_peer.py dial 127.0.0.1:PORT EXPECTED_ID
      connects, accepting only a server whose SVID is EXPECTED_ID; prints
      `ok REPLY` or `refused REASON`.
"""
import sys

from spiffe import SpiffeId, X509Source
from spiffetls import ListenOptions, dial, listen
from spiffetls.tlsconfig.authorize import authorize_id


def peer_id(conn) -> str:
    cert = conn.get_peer_certificate().to_cryptography()
    from cryptography import x509
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)[0]


def main() -> None:
    source = X509Source(timeout_in_seconds=10)
    own = str(source.get_x509_context().default_svid.spiffe_id)
    if sys.argv[1] == "serve":
        options = ListenOptions(authorize_fn=authorize_id(SpiffeId(sys.argv[2])))
        server = listen("127.0.0.1:0", source, options)
        print(f"listening {server.getsockname()[1]}", flush=True)
        while True:
            conn, _ = server.accept()
            try:
                conn.do_handshake()
                who = peer_id(conn)
                conn.recv(100)
                conn.sendall(f"hello {who} from {own}\n".encode())
                conn.shutdown()
                print(f"accepted {who}", flush=True)
            except Exception as e:
                print(f"refused {e}", flush=True)
            finally:
                conn.close()
    else:
        try:
            conn = dial(sys.argv[2], source, authorize_fn=authorize_id(SpiffeId(sys.argv[3])))
            conn.sendall(b"hi\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = conn.recv(200)
                if not chunk:
                    break
                reply += chunk
            print(f"ok {reply.decode().strip()}", flush=True)
        except Exception as e:
            print(f"refused {e}", flush=True)
    source.close()


if __name__ == "__main__":
    main()
