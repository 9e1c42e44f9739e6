/* blockbroker-block: the libxl hotplug script for vbd backends; hands the disk to policyd.
 *   XENBUS_PATH=[/local/domain/<be>/]backend/vbd/<fe>/<devid> blockbroker-block add|remove
 *
 * Trust: runs as root, spawned by libxl once per disk (libxl waits for it). It trusts its
 * environment (libxl's) and talks only to the system bus (dbus-daemon); it re-validates nothing
 * policyd validates (policyd checks XENBUS_PATH and reads params/mode from XenStore itself).
 * What arrives on the bus socket (replies relayed by dbus-daemon, signals) is parsed with every
 * length, offset, alignment and padding checked, 64 KiB at most for the reply (other messages
 * are read past), either byte order; only an error's name and message leave the parser, as
 * printable ASCII, truncated, backslashes doubled for xenstore-write. Fuzzed
 * under ASan/UBSan by tests/client/test_blockscript_wire.py. Static C, raw D-Bus: libxl's wait
 * is each disk's share of a domain start (why, and what it replaced: docs/client.md).
 *
 * add:    Attach(XENBUS_PATH); policyd writes the physical-device trio and hotplug-status in one
 *         transaction, so success writes nothing. Failure: `blockbroker-block add <path>:
 *         <ErrorName>: <message>` on stderr and, if the backend dir still exists (a write would
 *         re-create a dir libxl removed), xenstore-write hotplug-error and hotplug-status=error.
 * remove: Detach(XENBUS_PATH); a backend policyd does not know (Error.NotFound) is success.
 * Exit: 0 ok; 1 failed (error reply, no bus, no reply in 8 s, bad reply; local failures carry
 * libdbus's names: org.freedesktop.DBus.Error.NoServer, NoReply, ...); 2 usage.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef REPLY_TIMEOUT_MS /* overall deadline, well under libxl's 40 s hotplug timeout; only the
                          * tests' sanitizer build shortens it (-DREPLY_TIMEOUT_MS=...) */
#define REPLY_TIMEOUT_MS 8000
#endif
#define MAX_MSG 65536       /* largest message accepted (dbus-daemon's replies here are < 1 KiB) */
#define MAX_AUTH_LINE 256   /* "OK <32 hex digits>\r\n" is 37 bytes */
#define MAX_XENBUS_PATH 512 /* libxl's are ~40 bytes */
#define MAX_TEXT 512        /* error name/message bytes kept */
#define HELLO_SERIAL 1u
#define CALL_SERIAL 2u
#define DBUS_ERR(name) "org.freedesktop.DBus.Error." name
#define BAD(...) fail(DBUS_ERR("InconsistentMessage"), __VA_ARGS__)

extern char **environ;
static int bus = -1;
static int64_t deadline_ms; /* CLOCK_MONOTONIC */
static unsigned char rx[MAX_MSG]; /* received bytes not yet consumed; rx[0] starts a message */
static size_t rx_len;
static int big; /* the message at rx[0] is big-endian ('B') */
static unsigned char tx[4096];   /* outgoing, little-endian; the bounded inputs fit */
static size_t tx_len, tx_msg;    /* tx_msg: where the message being built starts */
_Static_assert(sizeof tx > 2 * MAX_XENBUS_PATH + 1024, "tx fits AUTH, Hello and the call");
static char err_name[MAX_TEXT], err_msg[MAX_TEXT + 4]; /* set by fail() or an error reply */

/* Copies n bytes as printable ASCII ('?' for anything else), truncated with "...". */
static void sanitize(char *dst, size_t cap, const void *src, size_t n)
{
	const unsigned char *s = src;
	size_t i, keep = n < cap - 1 ? n : cap - 4;
	for (i = 0; i < keep; i++)
		dst[i] = s[i] >= 0x20 && s[i] < 0x7f ? (char)s[i] : '?';
	if (keep < n)
		memcpy(dst + i, "...", 3), i += 3;
	dst[i] = 0;
}

__attribute__((format(printf, 2, 3))) static int fail(const char *name, const char *fmt, ...)
{
	va_list ap;
	snprintf(err_name, sizeof err_name, "%s", name);
	va_start(ap, fmt);
	vsnprintf(err_msg, sizeof err_msg, fmt, ap);
	va_end(ap);
	return -1;
}

static int64_t now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* Sends tx (out) or buffers at least n (<= MAX_MSG) received bytes in rx, by the deadline. */
static int io(int out, size_t n)
{
	for (size_t sent = 0; out ? sent < tx_len : rx_len < n;) {
		ssize_t r = out ? send(bus, tx + sent, tx_len - sent, MSG_NOSIGNAL | MSG_DONTWAIT)
				: recv(bus, rx + rx_len, sizeof rx - rx_len, MSG_DONTWAIT);
		if (r > 0) {
			*(out ? &sent : &rx_len) += (size_t)r;
			continue;
		}
		if (r == 0)
			return fail(DBUS_ERR("Disconnected"), "the bus closed the connection");
		if (errno != EAGAIN && errno != EINTR)
			return fail(DBUS_ERR("Disconnected"), "%s the bus: %s",
				    out ? "writing to" : "reading from", strerror(errno));
		int64_t ms = deadline_ms - now_ms();
		if (ms <= 0)
			return fail(DBUS_ERR("NoReply"), "no reply within %d ms", REPLY_TIMEOUT_MS);
		struct pollfd p = {.fd = bus, .events = out ? POLLOUT : POLLIN};
		if (poll(&p, 1, (int)ms) < 0 && errno != EINTR)
			return fail(DBUS_ERR("Disconnected"), "poll: %s", strerror(errno));
	}
	return 0;
}

static void consume(size_t n)
{
	memmove(rx, rx + n, rx_len - n);
	rx_len -= n;
}

/* Drops the next n bytes of the stream (a message that is not the reply), by the deadline. */
static int discard(uint64_t n)
{
	while (n > 0) {
		if (!rx_len && io(0, 1) < 0)
			return -1;
		size_t k = n < rx_len ? (size_t)n : rx_len;
		consume(k);
		n -= k;
	}
	return 0;
}

static int hexval(char c)
{
	static const char digits[] = "0123456789abcdef";
	const char *d = c ? strchr(digits, c >= 'A' && c <= 'F' ? c - 'A' + 'a' : c) : NULL;
	return d ? (int)(d - digits) : -1;
}

/* connect(2) the bus socket; a full listen queue is EAGAIN at once on a non-blocking socket,
 * so that is retried every millisecond until the deadline, as a blocking connect would wait. */
static int connect_by_deadline(const struct sockaddr_un *sa, socklen_t len)
{
	while (connect(bus, (const struct sockaddr *)sa, len) != 0) {
		if (errno != EAGAIN || now_ms() >= deadline_ms)
			return -1;
		nanosleep(&(struct timespec){.tv_nsec = 1000000}, NULL);
	}
	return 0;
}

/* One D-Bus address, a..end: its sockaddr length if it is unix:path=... or unix:abstract=...
 * (the value %XX-unescaped), else 0. */
static socklen_t unix_address(const char *a, const char *end, struct sockaddr_un *sa)
{
	size_t n = 0, max = sizeof sa->sun_path - 1;
	int kind = 0; /* 1 path, 2 abstract (sun_path[0] stays 0) */
	if (end - a < 5 || strncmp(a, "unix:", 5))
		return 0;
	for (const char *kv = a + 5, *kv_end; kv < end; kv = kv_end + (kv_end < end)) {
		kv_end = kv + strcspn(kv, ",;");
		const char *eq = memchr(kv, '=', (size_t)(kv_end - kv));
		int k = !eq ? 0 : eq - kv == 4 && !strncmp(kv, "path", 4) ? 1
				 : eq - kv == 8 && !strncmp(kv, "abstract", 8) ? 2 : 0;
		if (!k)
			continue; /* guid=... and the like */
		if (kind)
			return 0; /* path and abstract, or one of them twice */
		kind = k, n = k == 2;
		for (const char *v = eq + 1; v < kv_end; v++) {
			int c = (unsigned char)*v;
			if (c == '%') {
				if (kv_end - v < 3 || hexval(v[1]) < 0 || hexval(v[2]) < 0)
					return 0;
				c = hexval(v[1]) << 4 | hexval(v[2]), v += 2;
			}
			if (n >= max || (c == 0 && k == 1))
				return 0;
			sa->sun_path[n++] = (char)c;
		}
	}
	return kind ? (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + (kind == 1)) : 0;
}

/* Connects to the first usable address (unix:path= or unix:abstract=) in the `;`-separated
 * DBUS_SYSTEM_BUS_ADDRESS that accepts the connection, as libdbus tries them in turn. */
static int connect_bus(void)
{
	const char *list = getenv("DBUS_SYSTEM_BUS_ADDRESS"), *a, *end;
	char where[128];
	int last_errno = 0;
	if (!list || !*list)
		list = "unix:path=/run/dbus/system_bus_socket";
	for (a = list; *a; a = end + (*end != 0)) {
		struct sockaddr_un sa = {.sun_family = AF_UNIX};
		end = a + strcspn(a, ";");
		socklen_t len = unix_address(a, end, &sa);
		if (!len)
			continue;
		sanitize(where, sizeof where, a, (size_t)(end - a));
		bus = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
		if (bus >= 0 && connect_by_deadline(&sa, len) == 0)
			return 0;
		last_errno = errno;
		if (bus >= 0)
			close(bus), bus = -1;
	}
	if (last_errno)
		return fail(DBUS_ERR("NoServer"), "cannot connect to the system bus at %s: %s",
			    where, strerror(last_errno));
	sanitize(where, sizeof where, list, strlen(list));
	return fail(DBUS_ERR("BadAddress"), "no unix:path= or unix:abstract= address in "
		    "DBUS_SYSTEM_BUS_ADDRESS '%s'", where);
}

/* Appends n bytes to tx after zero padding to `align`, relative to the message's start. */
static void put(size_t align, const void *p, size_t n)
{
	while ((tx_len - tx_msg) % align)
		tx[tx_len++] = 0;
	memcpy(tx + tx_len, p, n), tx_len += n;
}

static void put_u32_at(size_t at, uint32_t v)
{
	v = htole32(v);
	memcpy(tx + at, &v, 4);
}

static void put_field(unsigned char code, char type, const char *value) /* s, o or g */
{
	uint32_t n = (uint32_t)strlen(value);
	put(8, (unsigned char[]){code, 1, (unsigned char)type, 0}, 4);
	if (type == 'g')
		put(1, (unsigned char[]){(unsigned char)n}, 1);
	else
		put(4, &(uint32_t){htole32(n)}, 4);
	put(1, value, n + 1);
}

/* A METHOD_CALL with one string argument (or none) appended to tx. */
static void put_call(uint32_t serial, const char *dest, const char *path, const char *iface,
		     const char *member, const char *arg)
{
	tx_msg = tx_len;
	put(1, "l\1\0\1\0\0\0\0\0\0\0\0\0\0\0\0", 16); /* LE, METHOD_CALL, no flags, version 1 */
	put_u32_at(tx_msg + 8, serial);
	put_field(1, 'o', path), put_field(2, 's', iface), put_field(3, 's', member);
	put_field(6, 's', dest);
	if (arg)
		put_field(8, 'g', "s");
	put_u32_at(tx_msg + 12, (uint32_t)(tx_len - tx_msg - 16)); /* header fields' length */
	put(8, "", 0); /* the body starts 8-aligned */
	size_t body = tx_len;
	if (arg)
		put(4, &(uint32_t){htole32((uint32_t)strlen(arg))}, 4), put(1, arg, strlen(arg) + 1);
	put_u32_at(tx_msg + 4, (uint32_t)(tx_len - body)); /* body length */
}

static uint32_t get_u32(size_t at)
{
	uint32_t v;
	memcpy(&v, rx + at, 4);
	return big ? be32toh(v) : le32toh(v);
}

/* Moves *at to the next multiple of a, over zero padding, not beyond end. */
static int align(size_t *at, size_t a, size_t end)
{
	for (; *at % a; (*at)++)
		if (*at >= end || rx[*at])
			return BAD("bad padding at byte %zu", *at);
	return 0;
}

/* Checks the basic-typed value at *at and moves past it (header field values are never
 * containers); *val and *len: a string's bytes (s, o, g) or a fixed-size value's place. */
static int skip_value(char type, size_t *at, size_t end, size_t *val, size_t *len)
{
	static const char fixed[] = "y1n2q2b4i4u4h4x8t8d8";
	const char *f = type ? strchr(fixed, type) : NULL;
	size_t head = type == 's' || type == 'o' ? 4 : type == 'g' ? 1 : 0, n;
	size_t size = head ? head : f && (f - fixed) % 2 == 0 ? (size_t)(f[1] - '0') : 0;
	if (!size)
		return BAD("header field value of type '%c', not a basic type",
			   type >= 0x20 && type < 0x7f ? type : '?');
	if (align(at, size, end) < 0)
		return -1;
	if (end - *at < size)
		return BAD("truncated value at byte %zu", *at);
	if (!head) {
		*val = *at, *len = size, *at += size;
		return 0;
	}
	n = head == 1 ? rx[*at] : get_u32(*at);
	*val = *at + head, *len = n;
	if (n >= end - *at - head || rx[*at + head + n] || memchr(rx + *at + head, 0, n))
		return BAD("unterminated or overlong string at byte %zu", *at);
	*at += head + n + 1;
	return 0;
}

/* Reads messages until the reply to CALL_SERIAL: 0 for a METHOD_RETURN; -1 with err_* set
 * for an ERROR (to the call, or to Hello) and any failure. Other messages (Hello's reply,
 * NameAcquired, signals anyone on the bus may send to this connection) are dropped, however
 * many and however long: only the deadline bounds them. Only the reply must fit in rx. */
static int await_reply(void)
{
	for (;;) {
		if (io(0, 16) < 0)
			return -1;
		if (rx[0] != 'l' && rx[0] != 'B')
			return BAD("bad byte order 0x%02x", rx[0]);
		big = rx[0] == 'B';
		unsigned type = rx[1]; /* 2 METHOD_RETURN, 3 ERROR; 0 is invalid */
		uint32_t body_len = get_u32(4), fields_len = get_u32(12);
		if (rx[3] != 1 || type == 0)
			return BAD("protocol version %u, message type %u", rx[3], type);
		uint64_t wire = ((16 + (uint64_t)fields_len + 7) & ~(uint64_t)7) + body_len;
		if (type != 2 && type != 3) { /* a call or a signal: never the reply */
			if (discard(wire) < 0)
				return -1;
			continue;
		}
		/* the replies here are < 1 KiB: one too long for rx is read up to its body (to see
		 * whose it is) and refused if it is ours; one whose header fields do not fit is not */
		if (wire > MAX_MSG && fields_len > MAX_MSG - 16) {
			if (discard(wire) < 0)
				return -1;
			continue;
		}
		size_t end = 16 + (size_t)fields_len, body = (end + 7) & ~(size_t)7;
		size_t total = wire > MAX_MSG ? body : (size_t)wire, at = 16, val = 0, len = 0;
		if (io(0, total) < 0)
			return -1;
		size_t ename = 0, ename_len = 0, sig = 0, sig_len = 0;
		int has_serial = 0, has_ename = 0;
		uint32_t reply_serial = 0;
		while (at < end) { /* an array of (byte code, variant value), each 8-aligned */
			if (align(&at, 8, end) < 0)
				return -1;
			if (end - at < 4 || rx[at + 1] != 1 || rx[at + 3] != 0)
				return BAD("bad header field at byte %zu", at);
			unsigned code = rx[at];
			char vtype = (char)rx[at + 2];
			if (code == 0 || (code <= 9 && "?osssussgu"[code] != vtype)) /* the spec's types */
				return BAD("header field %u of type '%c'", code,
					   vtype >= 0x20 && vtype < 0x7f ? vtype : '?');
			at += 4;
			if (skip_value(vtype, &at, end, &val, &len) < 0)
				return -1;
			if (code == 4)
				ename = val, ename_len = len, has_ename = 1;
			else if (code == 5)
				reply_serial = get_u32(val), has_serial = 1;
			else if (code == 8)
				sig = val, sig_len = len;
		}
		if (align(&at, 8, body) < 0)
			return -1;
		if (!has_serial)
			return BAD("a reply without REPLY_SERIAL");
		if (reply_serial != CALL_SERIAL && (reply_serial != HELLO_SERIAL || type == 2)) {
			if (discard(wire) < 0)
				return -1;
			continue;
		}
		if (wire > MAX_MSG)
			return fail(DBUS_ERR("LimitsExceeded"), "a reply longer than %d bytes "
				    "(header fields %u, body %u)", MAX_MSG, fields_len, body_len);
		if (type == 2)
			return 0;
		if (!has_ename)
			return BAD("an error reply without ERROR_NAME");
		sanitize(err_name, sizeof err_name, rx + ename, ename_len);
		snprintf(err_msg, sizeof err_msg, "(no message)");
		if (sig_len > 0 && rx[sig] == 's') { /* the message is the body's first string */
			if (skip_value('s', &body, total, &val, &len) < 0)
				return -1;
			sanitize(err_msg, sizeof err_msg, rx + val, len);
		}
		return -1;
	}
}

/* AUTH EXTERNAL (the real uid), BEGIN, Hello and the call in one write, as sd-bus pipelines
 * them (dbus-daemon reads them in order); then the auth reply "OK <guid>" and the messages. */
static int call(const char *member, const char *arg)
{
	char uid[16], line[128];
	snprintf(uid, sizeof uid, "%u", (unsigned)getuid());
	memcpy(tx, "\0AUTH EXTERNAL ", 15), tx_len = 15;
	for (const char *c = uid; *c; c++)
		tx_len += (size_t)snprintf((char *)tx + tx_len, 3, "%02x", (unsigned char)*c);
	memcpy(tx + tx_len, "\r\nBEGIN\r\n", 9), tx_len += 9;
	put_call(HELLO_SERIAL, "org.freedesktop.DBus", "/org/freedesktop/DBus",
		 "org.freedesktop.DBus", "Hello", NULL);
	put_call(CALL_SERIAL, "org.qubes.BlockBroker1", "/org/qubes/BlockBroker1",
		 "org.qubes.BlockBroker1.Manager", member, arg);
	if (io(1, 0) < 0)
		return -1;
	unsigned char *nl;
	while (!(nl = memchr(rx, '\n', rx_len))) {
		if (rx_len >= MAX_AUTH_LINE)
			return fail(DBUS_ERR("AuthFailed"), "no auth reply line in %d bytes",
				    MAX_AUTH_LINE);
		if (io(0, rx_len + 1) < 0)
			return -1;
	}
	size_t n = (size_t)(nl - rx) + 1;
	if (n < 6 || memcmp(rx, "OK ", 3) || rx[n - 2] != '\r') {
		sanitize(line, sizeof line, rx, n >= 2 && rx[n - 2] == '\r' ? n - 2 : n - 1);
		return fail(DBUS_ERR("AuthFailed"), "the bus refused AUTH EXTERNAL for uid %s: '%s'",
			    uid, line);
	}
	consume(n);
	return await_reply();
}

/* Runs a Xen tool on the failure path (PATH fixed, XENSTORED_PATH inherited); 0: it exited 0. */
static int run(char *const argv[], int quiet)
{
	posix_spawn_file_actions_t fa;
	pid_t pid;
	int status = -1;
	posix_spawn_file_actions_init(&fa);
	if (quiet)
		posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
	if (posix_spawnp(&pid, argv[0], &fa, NULL, argv, environ) == 0)
		while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
			;
	posix_spawn_file_actions_destroy(&fa);
	return status;
}

__attribute__((format(printf, 2, 3), noreturn)) static void usage(const char *argv0,
								   const char *fmt, ...)
{
	va_list ap;
	dprintf(2, "blockbroker-block: ");
	va_start(ap, fmt);
	vdprintf(2, fmt, ap);
	va_end(ap);
	dprintf(2, "\nusage: XENBUS_PATH=[/local/domain/<be>/]backend/vbd/<fe>/<devid> %s "
		   "add|remove\n", argv0);
	exit(2);
}

int main(int argc, char **argv)
{
	const char *argv0 = argc > 0 && argv[0] ? argv[0] : "blockbroker-block";
	const char *path = getenv("XENBUS_PATH"), *cmd = argc > 1 ? argv[1] : "";
	char shown[64];
	path = path ? path : "";
	size_t plen = strnlen(path, MAX_XENBUS_PATH + 1);
	if (plen > MAX_XENBUS_PATH)
		usage(argv0, "XENBUS_PATH is longer than %d bytes", MAX_XENBUS_PATH);
	for (size_t i = 0; i < plen; i++)
		if (path[i] < 0x20 || path[i] > 0x7e)
			usage(argv0, "XENBUS_PATH has a byte that is not printable ASCII");
	if (strncmp(path, "backend/", 8) && /* sh: case backend/STAR | /local/domain/STAR/backend/STAR */
	    (strncmp(path, "/local/domain/", 14) || !strstr(path + 14, "/backend/")))
		usage(argv0, "XENBUS_PATH must be a backend path (backend/... or /local/domain/<be>/"
			     "backend/...), got '%s'", path);
	int add = !strcmp(cmd, "add");
	if (!add && strcmp(cmd, "remove")) {
		sanitize(shown, sizeof shown, cmd, strlen(cmd));
		usage(argv0, "unknown command '%s'", shown);
	}
	for (int fd = 0; fd < 3; fd++) /* 0-2 open (libxl's are): the bus socket is never stderr */
		if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) != fd)
			return 1;
	signal(SIGPIPE, SIG_IGN); /* and send(MSG_NOSIGNAL): a closed bus is an error, not a kill */
	signal(SIGCHLD, SIG_DFL); /* an inherited SIG_IGN would make waitpid fail: nothing written */
	deadline_ms = now_ms() + REPLY_TIMEOUT_MS;
	int ok = connect_bus() == 0 && call(add ? "Attach" : "Detach", path) == 0;
	if (bus >= 0)
		close(bus);
	if (ok || (!add && !strcmp(err_name, "org.qubes.BlockBroker1.Error.NotFound")))
		return 0;
	char value[sizeof err_name + sizeof err_msg + 2], escaped[2 * sizeof value];
	snprintf(value, sizeof value, "%s: %s", err_name, err_msg);
	dprintf(2, "blockbroker-block %s %s: %s\n", cmd, path, value);
	/* xenstore-write decodes backslash escapes (\n, \xHH, \ooo) in values: each backslash
	 * is doubled, so the node holds exactly the printable text above */
	size_t e = 0;
	for (const char *c = value; *c; c++) {
		if (*c == '\\')
			escaped[e++] = '\\';
		escaped[e++] = *c;
	}
	escaped[e] = 0;
	if (add) {
		char error_node[MAX_XENBUS_PATH + 16], status_node[MAX_XENBUS_PATH + 16];
		snprintf(error_node, sizeof error_node, "%s/hotplug-error", path);
		snprintf(status_node, sizeof status_node, "%s/hotplug-status", path);
		char *exists[] = {"xenstore-exists", "--", (char *)path, NULL};
		char *write[] = {"xenstore-write", "--", error_node, escaped, status_node, "error",
				 NULL};
		signal(SIGPIPE, SIG_DFL), setenv("PATH", "/usr/bin:/bin:/usr/sbin:/sbin", 1);
		if (run(exists, 1) == 0) /* not if libxl removed the dir: a write would re-create it */
			run(write, 0);
	}
	return 1;
}
