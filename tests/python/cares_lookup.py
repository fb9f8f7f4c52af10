"""c-ares's getaddrinfo (through pycares, the c-ares binding on PyPI) for
one name, as a c-ares client such as Node.js's dns.resolve*, gRPC's
c-ares resolver or aiodns resolves it.

    cares_lookup.py NAME [4|6]

The channel is made with c-ares's defaults, so it reads /etc/resolv.conf
when it is created (nameserver, search, ndots, timeout, attempts) and the
hosts: line of /etc/nsswitch.conf; the lookup asks A and AAAA (AF_UNSPEC),
or one family with 4 or 6. Each address found goes to stdout, one a line;
an error goes to stderr as its ares name (e.g. `ARES_ENOTFOUND`).

Exit codes (one per ares error the tests tell apart):

    0  addresses found
    2  ARES_ENOTFOUND      (NXDOMAIN: the name does not exist)
    3  ARES_ENODATA        (the name exists, no address)
    4  ARES_ESERVFAIL      (SERVFAIL)
    5  ARES_EREFUSED       (REFUSED)
    6  ARES_ETIMEOUT       (no answer within the resolv.conf timeouts)
    7  ARES_ECONNREFUSED   (the nameserver's port is closed)
    8  ARES_EBADRESP / ARES_EFORMERR (a malformed answer, or FORMERR)
    9  the lookup did not end within 20 s (this script's own bound)
    1  any other ares error (named on stderr)
"""

import socket
import sys
import threading

import pycares
import pycares.errno as ares

CODES = {
    ares.ARES_ENOTFOUND: 2,
    ares.ARES_ENODATA: 3,
    ares.ARES_ESERVFAIL: 4,
    ares.ARES_EREFUSED: 5,
    ares.ARES_ETIMEOUT: 6,
    ares.ARES_ECONNREFUSED: 7,
    ares.ARES_EBADRESP: 8,
    ares.ARES_EFORMERR: 8,
}

# Longer than any resolv.conf of the tests makes c-ares wait (they set
# `timeout:2 attempts:1`), shorter than the tests' kill timeout.
BOUND_SECONDS = 20


def main() -> int:
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["4"], ["6"]):
        print("usage: cares_lookup.py NAME [4|6]", file=sys.stderr)
        return 64
    name = sys.argv[1]
    family = {"4": socket.AF_INET, "6": socket.AF_INET6}.get(
        (sys.argv[2:] or [""])[0], socket.AF_UNSPEC
    )
    done = threading.Event()
    result = {}

    def answered(res, error):
        result["res"], result["error"] = res, error
        done.set()

    # c-ares's own thread runs the queries; resolv.conf is read here.
    channel = pycares.Channel(event_thread=True)
    channel.getaddrinfo(name, None, answered, family=family, type=socket.SOCK_STREAM)
    if not done.wait(BOUND_SECONDS):
        print(f"no answer within {BOUND_SECONDS} s", file=sys.stderr)
        return 9
    error = result["error"]
    if error:
        print(ares.errorcode.get(error, str(error)), ares.strerror(error), file=sys.stderr)
        return CODES.get(error, 1)
    seen = []
    for node in result["res"].nodes:
        addr = node.addr[0]
        if isinstance(addr, bytes):
            addr = addr.decode()
        if addr not in seen:
            seen.append(addr)
            print(addr)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
