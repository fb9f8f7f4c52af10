/*
 * A getaddrinfo client for the DNS tests, built with `musl-gcc -static`
 * (tests/src/dns.rs) so the lookup is musl's own resolver: it reads
 * /etc/resolv.conf (nameservers, search, ndots, timeout, attempts) and
 * sends each query to every nameserver at once from one unconnected UDP
 * socket.
 *
 * usage: musl_lookup NAME [any|4|6]
 * Prints each address once, one per line, and exits 0; on failure prints
 * the EAI_* name and gai_strerror() to stderr and exits with:
 *   2 EAI_NONAME, 3 EAI_AGAIN, 4 EAI_FAIL, 5 EAI_NODATA, 6 EAI_SYSTEM,
 *   1 anything else (or bad usage).
 */
#include <arpa/inet.h>
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

static int code_of(int err, const char **name)
{
	switch (err) {
	case EAI_NONAME: *name = "EAI_NONAME"; return 2;
	case EAI_AGAIN: *name = "EAI_AGAIN"; return 3;
	case EAI_FAIL: *name = "EAI_FAIL"; return 4;
#ifdef EAI_NODATA
	case EAI_NODATA: *name = "EAI_NODATA"; return 5;
#endif
	case EAI_SYSTEM: *name = "EAI_SYSTEM"; return 6;
	default: *name = "EAI_OTHER"; return 1;
	}
}

int main(int argc, char **argv)
{
	struct addrinfo hints, *res, *ai;
	const char *name;
	int err, code;

	if (argc < 2 || argc > 3) {
		fprintf(stderr, "usage: %s NAME [any|4|6]\n", argv[0]);
		return 1;
	}
	memset(&hints, 0, sizeof hints);
	hints.ai_family = AF_UNSPEC;
	/* One socket type, so each address comes back once. */
	hints.ai_socktype = SOCK_STREAM;
	if (argc == 3 && strcmp(argv[2], "4") == 0)
		hints.ai_family = AF_INET;
	else if (argc == 3 && strcmp(argv[2], "6") == 0)
		hints.ai_family = AF_INET6;
	else if (argc == 3 && strcmp(argv[2], "any") != 0) {
		fprintf(stderr, "unknown family %s\n", argv[2]);
		return 1;
	}
	err = getaddrinfo(argv[1], NULL, &hints, &res);
	if (err != 0) {
		code = code_of(err, &name);
		fprintf(stderr, "%s %d: %s\n", name, err, gai_strerror(err));
		return code;
	}
	for (ai = res; ai; ai = ai->ai_next) {
		char text[INET6_ADDRSTRLEN];
		const void *addr;

		if (ai->ai_family == AF_INET)
			addr = &((struct sockaddr_in *)ai->ai_addr)->sin_addr;
		else if (ai->ai_family == AF_INET6)
			addr = &((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr;
		else
			continue;
		if (inet_ntop(ai->ai_family, addr, text, sizeof text))
			printf("%s\n", text);
	}
	freeaddrinfo(res);
	return 0;
}
