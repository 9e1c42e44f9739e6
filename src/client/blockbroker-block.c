/* blockbroker-block: the libxl hotplug script for vbd backends; hands the disk to policyd.
 *   XENBUS_PATH=[/local/domain/<be>/]backend/vbd/<fe>/<devid> blockbroker-block add|remove
 *
 * Trust: runs as root, spawned by libxl once per disk (libxl waits for it). It trusts its
 * environment (libxl's) and talks only to policyd: first on policyd's block socket
 * (BLOCKBROKER_BLOCK_SOCKET, default /run/blockbroker-policyd/block.sock; "" skips it), else,
 * if that cannot be connected to or policyd answers `busy` (nothing was read), over the system
 * bus (dbus-daemon, which also activates a policyd that is not running). It re-validates
 * nothing policyd validates (policyd checks XENBUS_PATH and reads params/mode from XenStore
 * itself). What arrives on the bus socket (replies relayed by dbus-daemon, signals) is parsed
 * with every length, offset, alignment and padding checked, 64 KiB at most for the reply (other
 * messages are read past), either byte order; the block socket's one reply packet is at most
 * 1 KiB, its words checked; only an error's name and message leave either parser, as printable
 * ASCII, truncated, backslashes doubled for xenstore-write. Fuzzed under ASan/UBSan by
 * tests/client/test_blockscript_wire.py and tests/fuzz/blockscript_fuzz.c. Static C, raw
 * D-Bus: libxl's wait is each disk's share of a domain start (why, and what it replaced:
 * docs/client.md; the block socket: docs/architecture.md).
 *
 * add:    Attach(XENBUS_PATH) (block socket: "BB1 attach <XENBUS_PATH>"); policyd writes the
 *         physical-device trio and hotplug-status in one transaction, so success writes nothing.
 *         Failure: `blockbroker-block add <path>: <ErrorName>: <message>` on stderr and, if
 *         the backend dir still exists (a write would re-create a dir libxl removed),
 *         xenstore-write hotplug-error and hotplug-status=error;
 *         each tool is killed after 4 s, and with this script if libxl kills it (no orphaned
 *         writer re-creates a backend dir libxl removed).
 * remove: Detach(XENBUS_PATH) ("BB1 detach ..."); a backend policyd does not know
 *         (Error.NotFound) is success.
 * Exit: 0 ok; 1 failed (error reply, no bus, no reply in 8 s (30 s while dbus-daemon activates
 * policyd for this call), bad reply; local failures carry libdbus's names:
 * org.freedesktop.DBus.Error.NoServer, NoReply, ...); 2 usage. Once policyd has read a request
 * on the block socket its reply is final (it may have acted on it): the same deadline, no D-Bus
 * retry.
 *
 * Layout: limits and protocol constants; error state; the bus socket (connect, send, receive);
 * building the outgoing messages; parsing the incoming ones; the call; the direct path (the
 * block socket); the failure report; main.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define LITERAL_LEN(s) (sizeof(s) - 1) /* a string literal's length, without its NUL */

/* --- Limits ---------------------------------------------------------------------------------- */

#ifndef REPLY_TIMEOUT_MS /* overall deadline, well under libxl's 40 s hotplug timeout; only the
                          * tests' sanitizer build shortens it (-DREPLY_TIMEOUT_MS=...) */
#define REPLY_TIMEOUT_MS 8000
#endif
#ifndef ACTIVATION_TIMEOUT_MS /* the deadline instead when dbus-daemon is activating policyd for
                               * this call: its own activation bound (service_start_timeout,
                               * 25 s) plus the call, still under libxl's 40 s */
#define ACTIVATION_TIMEOUT_MS 30000
#endif
#define MAX_MSG 65536       /* largest message accepted (dbus-daemon's replies here are < 1 KiB) */
#define MAX_AUTH_LINE 256   /* "OK <32 hex digits>\r\n" is 37 bytes */
#define MAX_XENBUS_PATH 512 /* libxl's are ~40 bytes */
#define MAX_TEXT 512        /* error name/message bytes kept */

/* --- The D-Bus protocol (the D-Bus specification, "Message Protocol") ------------------------ */

/* Byte 0 of every message: the byte order of all its integers. */
#define LITTLE_ENDIAN_MARK 'l'
#define BIG_ENDIAN_MARK 'B'
#define PROTOCOL_VERSION 1

/* The fixed header: byte order, type, flags, version (one byte each), then three uint32s:
 * the body's length, the serial, the header fields' length. */
#define HEADER_LEN 16
#define HEADER_BODY_LEN_AT 4    /* where the body's length is */
#define HEADER_FIELDS_LEN_AT 12 /* where the header fields' length is (the array follows) */
#define BODY_ALIGN 8            /* the body, and each header field, start 8-aligned */

enum message_type {
	MSG_INVALID = 0,
	MSG_METHOD_CALL = 1,
	MSG_METHOD_RETURN = 2,
	MSG_ERROR = 3,
	MSG_SIGNAL = 4,
};

/* Header field codes; each field is a (byte code, variant value) struct. */
enum header_field {
	FIELD_INVALID = 0,
	FIELD_PATH = 1,
	FIELD_INTERFACE = 2,
	FIELD_MEMBER = 3,
	FIELD_ERROR_NAME = 4,
	FIELD_REPLY_SERIAL = 5,
	FIELD_DESTINATION = 6,
	FIELD_SENDER = 7,
	FIELD_SIGNATURE = 8,
	FIELD_UNIX_FDS = 9,
};

/* Type codes used here. */
#define TYPE_UINT32 'u'
#define TYPE_STRING 's'
#define TYPE_OBJECT_PATH 'o'
#define TYPE_SIGNATURE 'g'

/* The value type the spec fixes for each known header field; codes past the table (future
 * fields) may carry any basic type, and are skipped. */
static const char header_field_types[] = {
	[FIELD_PATH] = TYPE_OBJECT_PATH,
	[FIELD_INTERFACE] = TYPE_STRING,
	[FIELD_MEMBER] = TYPE_STRING,
	[FIELD_ERROR_NAME] = TYPE_STRING,
	[FIELD_REPLY_SERIAL] = TYPE_UINT32,
	[FIELD_DESTINATION] = TYPE_STRING,
	[FIELD_SENDER] = TYPE_STRING,
	[FIELD_SIGNATURE] = TYPE_SIGNATURE,
	[FIELD_UNIX_FDS] = TYPE_UINT32,
};

/* The basic types a header field value may have. `size` is a fixed-size value's size, or a
 * string's length prefix (uint32 for s and o, one byte for g); either is also its alignment. */
struct basic_type {
	char code;
	unsigned char size;
	unsigned char is_string;
};

static const struct basic_type basic_types[] = {
	{'y', 1, 0}, /* byte */
	{'n', 2, 0}, /* int16 */
	{'q', 2, 0}, /* uint16 */
	{'b', 4, 0}, /* boolean */
	{'i', 4, 0}, /* int32 */
	{'u', 4, 0}, /* uint32 */
	{'h', 4, 0}, /* unix fd index */
	{'x', 8, 0}, /* int64 */
	{'t', 8, 0}, /* uint64 */
	{'d', 8, 0}, /* double */
	{TYPE_STRING, 4, 1},
	{TYPE_OBJECT_PATH, 4, 1},
	{TYPE_SIGNATURE, 1, 1},
};

/* The SASL exchange before the binary protocol: a NUL byte, then CRLF-terminated lines. */
#define AUTH_EXTERNAL "\0AUTH EXTERNAL " /* followed by the uid in decimal, hex-encoded */
#define AUTH_OK "OK "                    /* the server's acceptance: "OK <guid>\r\n" */
#define AUTH_BEGIN "\r\nBEGIN\r\n"       /* ends the AUTH line and starts the binary protocol */

/* Who is called. Hello is the bus daemon's; it must come first on a new connection. */
#define DBUS_NAME "org.freedesktop.DBus"
#define DBUS_PATH "/org/freedesktop/DBus"
#define BROKER_NAME "org.qubes.BlockBroker1"
#define BROKER_PATH "/org/qubes/BlockBroker1"
#define BROKER_MANAGER "org.qubes.BlockBroker1.Manager"
#define HELLO_SERIAL 1u
#define CALL_SERIAL 2u
#define OWNER_SERIAL 3u /* GetNameOwner(BROKER_NAME), sent after the call: is it being activated? */

#define DEFAULT_SYSTEM_BUS "unix:path=/run/dbus/system_bus_socket"

/* Error names: libdbus's for local failures, and the one policyd error a remove accepts. */
#define DBUS_ERR(name) "org.freedesktop.DBus.Error." name
#define ERR_DISCONNECTED DBUS_ERR("Disconnected")
#define ERR_NO_REPLY DBUS_ERR("NoReply")
#define ERR_NO_SERVER DBUS_ERR("NoServer")
#define ERR_BAD_ADDRESS DBUS_ERR("BadAddress")
#define ERR_AUTH_FAILED DBUS_ERR("AuthFailed")
#define ERR_LIMITS_EXCEEDED DBUS_ERR("LimitsExceeded")
#define ERR_INCONSISTENT DBUS_ERR("InconsistentMessage")
#define ERR_BROKER_NOT_FOUND "org.qubes.BlockBroker1.Error.NotFound"
#define ERR_NAME_HAS_NO_OWNER DBUS_ERR("NameHasNoOwner")

/* The commands libxl gives: which method each calls, and what its failure means. */
struct command {
	const char *name;
	const char *method;
	const char *direct_op; /* the operation's word on the block socket */
	const char *error_meaning_success; /* a reply with this error name counts as done, or NULL */
	int writes_hotplug_error;          /* on failure, tell libxl through XenStore */
};

static const struct command commands[] = {
	{"add", "Attach", "attach", NULL, 1},
	/* the backend is unknown to policyd: nothing to detach */
	{"remove", "Detach", "detach", ERR_BROKER_NOT_FOUND, 0},
};

/* The Xen tools run on the failure path find only system directories (the tests' build
 * points it at stand-ins: -DTOOL_PATH=...). */
#ifndef TOOL_PATH
#define TOOL_PATH "/usr/bin:/bin:/usr/sbin:/sbin"
#endif
/* Each of those tools is killed after this long (xenstore-exists, then xenstore-write): with the
 * 8 s reply deadline, at most ~16 s in all, well under libxl's 40 s hotplug timeout. */
#ifndef TOOL_TIMEOUT_MS
#define TOOL_TIMEOUT_MS 4000
#endif
#define TOOL_POLL_NS 10000000 /* how often the deadline is looked at while a tool runs */

/* --- State ----------------------------------------------------------------------------------- */

extern char **environ;
static int bus = -1;
static int64_t started_ms;  /* CLOCK_MONOTONIC */
static int64_t deadline_ms; /* started_ms + REPLY_TIMEOUT_MS, or + ACTIVATION_TIMEOUT_MS */
static int activating;      /* GetNameOwner: no one owns BROKER_NAME, dbus-daemon activates it */
static unsigned char rx[MAX_MSG]; /* received bytes not yet consumed; rx[0] starts a message */
static size_t rx_len;
static int rx_big_endian; /* the message at rx[0] is big-endian */
static unsigned char tx[4096]; /* outgoing, little-endian; the bounded inputs fit */
static size_t tx_len;
static size_t tx_msg; /* where the message being built starts in tx */
_Static_assert(sizeof tx > 2 * MAX_XENBUS_PATH + 1024, "tx fits AUTH and the 3 calls");
static char err_name[MAX_TEXT]; /* set by fail() or an error reply */
static char err_msg[MAX_TEXT + 4];

/* --- Helpers --------------------------------------------------------------------------------- */

static int is_printable_ascii(unsigned char c)
{
	return c >= 0x20 && c < 0x7f;
}

/* A type code as shown in an error message: itself if printable, else '?'. */
static char shown_char(char c)
{
	if (is_printable_ascii((unsigned char)c))
		return c;
	return '?';
}

/* Copies n bytes as printable ASCII ('?' for anything else), truncated with "...". */
static void sanitize(char *dst, size_t cap, const void *src, size_t n)
{
	const unsigned char *s = src;
	size_t keep = n;
	size_t i;
	if (n >= cap - 1)
		keep = cap - 4; /* room for "..." and the NUL */
	for (i = 0; i < keep; i++)
		dst[i] = is_printable_ascii(s[i]) ? (char)s[i] : '?';
	if (keep < n) {
		memcpy(dst + i, "...", 3);
		i += 3;
	}
	dst[i] = 0;
}

/* Records why the script fails (reported by report_failure); returns -1 for the caller. */
__attribute__((format(printf, 2, 3))) static int fail(const char *name, const char *fmt, ...)
{
	va_list ap;
	snprintf(err_name, sizeof err_name, "%s", name);
	va_start(ap, fmt);
	vsnprintf(err_msg, sizeof err_msg, fmt, ap);
	va_end(ap);
	return -1;
}

/* A malformed message on the bus. */
#define bad_message(...) fail(ERR_INCONSISTENT, __VA_ARGS__)

static int64_t now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* --- The bus socket: send and receive, by the deadline --------------------------------------- */

/* Waits until the bus socket is ready for `events`, or fails once the deadline has passed. */
static int wait_for_bus(short events)
{
	int64_t left_ms = deadline_ms - now_ms();
	if (left_ms <= 0) {
		if (activating)
			return fail(ERR_NO_REPLY, "no reply within %d ms (policyd was being "
				    "activated)", ACTIVATION_TIMEOUT_MS);
		return fail(ERR_NO_REPLY, "no reply within %d ms", REPLY_TIMEOUT_MS);
	}
	struct pollfd p = {.fd = bus, .events = events};
	if (poll(&p, 1, (int)left_ms) < 0 && errno != EINTR)
		return fail(ERR_DISCONNECTED, "poll: %s", strerror(errno));
	return 0;
}

/* After a send or recv `r` that moved nothing: the bus closed, a real error, or not ready yet
 * (EAGAIN, EINTR), which waits for `events`. `doing` names the direction in the error. */
static int after_no_progress(ssize_t r, const char *doing, short events)
{
	if (r == 0)
		return fail(ERR_DISCONNECTED, "the bus closed the connection");
	if (errno != EAGAIN && errno != EINTR)
		return fail(ERR_DISCONNECTED, "%s the bus: %s", doing, strerror(errno));
	return wait_for_bus(events);
}

/* Sends all of tx. */
static int send_tx(void)
{
	size_t sent = 0;
	while (sent < tx_len) {
		ssize_t r = send(bus, tx + sent, tx_len - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (r > 0) {
			sent += (size_t)r;
			continue;
		}
		if (after_no_progress(r, "writing to", POLLOUT) < 0)
			return -1;
	}
	return 0;
}

/* Receives until rx holds at least n (<= MAX_MSG) bytes. */
static int receive_at_least(size_t n)
{
	while (rx_len < n) {
		ssize_t r = recv(bus, rx + rx_len, sizeof rx - rx_len, MSG_DONTWAIT);
		if (r > 0) {
			rx_len += (size_t)r;
			continue;
		}
		if (after_no_progress(r, "reading from", POLLIN) < 0)
			return -1;
	}
	return 0;
}

/* Drops the first n bytes of rx. */
static void consume(size_t n)
{
	memmove(rx, rx + n, rx_len - n);
	rx_len -= n;
}

/* Drops the next n bytes of the stream (a message that is not the reply). */
static int discard(uint64_t n)
{
	while (n > 0) {
		if (rx_len == 0 && receive_at_least(1) < 0)
			return -1;
		size_t k = rx_len;
		if (n < rx_len)
			k = (size_t)n;
		consume(k);
		n -= k;
	}
	return 0;
}

/* --- Connecting: DBUS_SYSTEM_BUS_ADDRESS ----------------------------------------------------- */

/* The address keys that name a socket (others, such as guid=, are ignored). */
enum address_kind {
	ADDRESS_NONE,
	ADDRESS_PATH,     /* a file system path; sun_path is NUL-terminated */
	ADDRESS_ABSTRACT, /* an abstract name; sun_path[0] is 0 and the name follows */
};

static const struct {
	const char *key;
	enum address_kind kind;
} address_keys[] = {
	{"path", ADDRESS_PATH},
	{"abstract", ADDRESS_ABSTRACT},
};

#define UNIX_PREFIX "unix:"

static int hex_digit_value(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* The kind named by the key key..eq (eq points at the '='), or ADDRESS_NONE. */
static enum address_kind address_key_kind(const char *key, const char *eq)
{
	size_t len = (size_t)(eq - key);
	for (size_t i = 0; i < ARRAY_LEN(address_keys); i++)
		if (len == strlen(address_keys[i].key) && !strncmp(key, address_keys[i].key, len))
			return address_keys[i].kind;
	return ADDRESS_NONE;
}

/* Appends the %XX-unescaped value v..end to sa->sun_path at *n; 0 if an escape is malformed,
 * the value does not fit, or a path holds a NUL byte. */
static int unescape_into(const char *v, const char *end, enum address_kind kind,
			 struct sockaddr_un *sa, size_t *n)
{
	size_t max = sizeof sa->sun_path - 1;
	for (; v < end; v++) {
		int c = (unsigned char)*v;
		if (c == '%') {
			if (end - v < 3 || hex_digit_value(v[1]) < 0 || hex_digit_value(v[2]) < 0)
				return 0;
			c = hex_digit_value(v[1]) << 4 | hex_digit_value(v[2]);
			v += 2;
		}
		if (*n >= max || (c == 0 && kind == ADDRESS_PATH))
			return 0;
		sa->sun_path[(*n)++] = (char)c;
	}
	return 1;
}

/* One D-Bus address, a..end: its sockaddr length if it is unix:path=... or unix:abstract=...
 * (the value %XX-unescaped), else 0. */
static socklen_t unix_address(const char *a, const char *end, struct sockaddr_un *sa)
{
	enum address_kind kind = ADDRESS_NONE;
	size_t n = 0;
	size_t prefix_len = LITERAL_LEN(UNIX_PREFIX);
	if ((size_t)(end - a) < prefix_len || strncmp(a, UNIX_PREFIX, prefix_len))
		return 0;
	const char *kv = a + prefix_len;
	while (kv < end) { /* key=value pairs, separated by ',' */
		const char *kv_end = kv + strcspn(kv, ",;");
		const char *eq = memchr(kv, '=', (size_t)(kv_end - kv));
		enum address_kind k = ADDRESS_NONE;
		if (eq)
			k = address_key_kind(kv, eq);
		if (k != ADDRESS_NONE) {
			if (kind != ADDRESS_NONE)
				return 0; /* path and abstract, or one of them twice */
			kind = k;
			n = 0;
			if (k == ADDRESS_ABSTRACT)
				n = 1; /* sun_path[0] stays 0 */
			if (!unescape_into(eq + 1, kv_end, k, sa, &n))
				return 0;
		}
		kv = kv_end;
		if (kv < end)
			kv++; /* past the ',' */
	}
	if (kind == ADDRESS_NONE)
		return 0;
	if (kind == ADDRESS_PATH)
		n++; /* the terminating NUL */
	return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
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

/* Opens the bus socket and connects it to sa; on failure it is closed again and errno says
 * why. */
static int try_connect(const struct sockaddr_un *sa, socklen_t len)
{
	bus = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (bus < 0)
		return -1;
	if (connect_by_deadline(sa, len) == 0)
		return 0;
	int saved = errno;
	close(bus);
	bus = -1;
	errno = saved;
	return -1;
}

/* Connects to the first usable address (unix:path= or unix:abstract=) in the `;`-separated
 * DBUS_SYSTEM_BUS_ADDRESS that accepts the connection, as libdbus tries them in turn. */
static int connect_bus(void)
{
	const char *list = getenv("DBUS_SYSTEM_BUS_ADDRESS");
	char where[128];
	int last_errno = 0;
	if (!list || !*list)
		list = DEFAULT_SYSTEM_BUS;
	const char *a = list;
	while (*a) {
		const char *end = a + strcspn(a, ";");
		struct sockaddr_un sa = {.sun_family = AF_UNIX};
		socklen_t len = unix_address(a, end, &sa);
		if (len) {
			sanitize(where, sizeof where, a, (size_t)(end - a));
			if (try_connect(&sa, len) == 0)
				return 0;
			last_errno = errno;
		}
		a = end;
		if (*a)
			a++; /* past the ';' */
	}
	if (last_errno)
		return fail(ERR_NO_SERVER, "cannot connect to the system bus at %s: %s", where,
			    strerror(last_errno));
	sanitize(where, sizeof where, list, strlen(list));
	return fail(ERR_BAD_ADDRESS, "no unix:path= or unix:abstract= address in "
		    "DBUS_SYSTEM_BUS_ADDRESS '%s'", where);
}

/* --- Building the outgoing bytes (little-endian) --------------------------------------------- */

/* Appends n bytes to tx after zero padding to `align`, relative to the message's start. */
static void put(size_t align, const void *p, size_t n)
{
	while ((tx_len - tx_msg) % align)
		tx[tx_len++] = 0;
	memcpy(tx + tx_len, p, n);
	tx_len += n;
}

static void put_u32(uint32_t v)
{
	v = htole32(v);
	put(4, &v, 4);
}

/* Overwrites the uint32 at tx[at] (a length known only once what it measures is built). */
static void put_u32_at(size_t at, uint32_t v)
{
	v = htole32(v);
	memcpy(tx + at, &v, 4);
}

/* A string-like value (s, o: uint32 length; g: byte length), with its terminating NUL. */
static void put_string(char type, const char *value)
{
	size_t n = strlen(value);
	if (type == TYPE_SIGNATURE) {
		unsigned char n8 = (unsigned char)n;
		put(1, &n8, 1);
	} else {
		put_u32((uint32_t)n);
	}
	put(1, value, n + 1);
}

/* One header field: the code, the variant's signature (length 1, the type, NUL), the value. */
static void put_field(enum header_field code, char type, const char *value)
{
	const unsigned char head[4] = {(unsigned char)code, 1, (unsigned char)type, 0};
	put(BODY_ALIGN, head, 4);
	put_string(type, value);
}

/* The fixed header of a METHOD_CALL without flags; both lengths are filled in by put_call. */
static void put_fixed_header(uint32_t serial)
{
	const unsigned char start[4] = {LITTLE_ENDIAN_MARK, MSG_METHOD_CALL, 0, PROTOCOL_VERSION};
	put(1, start, 4);
	put_u32(0); /* body length */
	put_u32(serial);
	put_u32(0); /* header fields' length */
}

/* A METHOD_CALL with one string argument (or none) appended to tx. */
static void put_call(uint32_t serial, const char *dest, const char *path, const char *iface,
		     const char *member, const char *arg)
{
	tx_msg = tx_len;
	put_fixed_header(serial);
	put_field(FIELD_PATH, TYPE_OBJECT_PATH, path);
	put_field(FIELD_INTERFACE, TYPE_STRING, iface);
	put_field(FIELD_MEMBER, TYPE_STRING, member);
	put_field(FIELD_DESTINATION, TYPE_STRING, dest);
	if (arg)
		put_field(FIELD_SIGNATURE, TYPE_SIGNATURE, "s");
	put_u32_at(tx_msg + HEADER_FIELDS_LEN_AT, (uint32_t)(tx_len - tx_msg - HEADER_LEN));
	put(BODY_ALIGN, "", 0);
	size_t body = tx_len;
	if (arg)
		put_string(TYPE_STRING, arg);
	put_u32_at(tx_msg + HEADER_BODY_LEN_AT, (uint32_t)(tx_len - body));
}

/* The AUTH EXTERNAL line for the real uid (its decimal digits, hex-encoded) and BEGIN. */
static void put_auth(const char *uid)
{
	static const char hex[] = "0123456789abcdef";
	put(1, AUTH_EXTERNAL, LITERAL_LEN(AUTH_EXTERNAL));
	for (const char *c = uid; *c; c++) {
		unsigned char b = (unsigned char)*c;
		tx[tx_len++] = (unsigned char)hex[b >> 4];
		tx[tx_len++] = (unsigned char)hex[b & 0xf];
	}
	put(1, AUTH_BEGIN, LITERAL_LEN(AUTH_BEGIN));
}

/* --- Parsing the incoming messages ----------------------------------------------------------- */

/* What is known of the message at rx[0]. Offsets are into rx. */
struct message {
	unsigned type;
	uint32_t body_len;
	uint32_t fields_len;
	uint64_t wire_len; /* its size on the wire: fixed header, fields, padding, body */
	size_t fields_end; /* where the header fields end */
	size_t body_at;    /* where the body starts (8-aligned) */
	size_t held;       /* how much of it is read into rx: all, or up to its body */
	int has_reply_serial;
	uint32_t reply_serial;
	int has_error_name;
	size_t error_name_at;
	size_t error_name_len;
	size_t signature_at; /* the body's signature; its length is 0 if there is none */
	size_t signature_len;
};

static uint32_t get_u32(size_t at)
{
	uint32_t v;
	memcpy(&v, rx + at, 4);
	if (rx_big_endian)
		return be32toh(v);
	return le32toh(v);
}

static uint64_t align_up8(uint64_t n)
{
	return (n + 7) & ~(uint64_t)7;
}

/* Moves *at to the next multiple of a, over zero padding, not beyond end. */
static int align(size_t *at, size_t a, size_t end)
{
	for (; *at % a; (*at)++)
		if (*at >= end || rx[*at])
			return bad_message("bad padding at byte %zu", *at);
	return 0;
}

static const struct basic_type *find_basic_type(char code)
{
	for (size_t i = 0; i < ARRAY_LEN(basic_types); i++)
		if (basic_types[i].code == code)
			return &basic_types[i];
	return NULL;
}

/* Checks the string whose length prefix (prefix_len bytes) is at *at: NUL-terminated, no NUL
 * inside, within end. *val and *len: its bytes. Moves *at past it. */
static int read_string(size_t prefix_len, size_t *at, size_t end, size_t *val, size_t *len)
{
	size_t n;
	if (prefix_len == 1)
		n = rx[*at];
	else
		n = get_u32(*at);
	size_t start = *at + prefix_len;
	size_t room = end - start; /* the string and its NUL must fit here */
	if (n >= room || rx[start + n] || memchr(rx + start, 0, n))
		return bad_message("unterminated or overlong string at byte %zu", *at);
	*val = start;
	*len = n;
	*at = start + n + 1;
	return 0;
}

/* Checks the basic-typed value at *at and moves past it (header field values are never
 * containers); *val and *len: a string's bytes (s, o, g) or a fixed-size value's place. */
static int read_basic_value(char type, size_t *at, size_t end, size_t *val, size_t *len)
{
	const struct basic_type *t = find_basic_type(type);
	if (!t)
		return bad_message("header field value of type '%c', not a basic type",
				   shown_char(type));
	if (align(at, t->size, end) < 0)
		return -1;
	if (end - *at < t->size)
		return bad_message("truncated value at byte %zu", *at);
	if (t->is_string)
		return read_string(t->size, at, end, val, len);
	*val = *at;
	*len = t->size;
	*at += t->size;
	return 0;
}

/* Reads the fixed header of the next message into m: byte order, type, version, lengths. */
static int read_fixed_header(struct message *m)
{
	if (receive_at_least(HEADER_LEN) < 0)
		return -1;
	if (rx[0] != LITTLE_ENDIAN_MARK && rx[0] != BIG_ENDIAN_MARK)
		return bad_message("bad byte order 0x%02x", rx[0]);
	rx_big_endian = rx[0] == BIG_ENDIAN_MARK;
	m->type = rx[1];
	m->body_len = get_u32(HEADER_BODY_LEN_AT);
	m->fields_len = get_u32(HEADER_FIELDS_LEN_AT);
	if (rx[3] != PROTOCOL_VERSION || m->type == MSG_INVALID)
		return bad_message("protocol version %u, message type %u", rx[3], m->type);
	m->wire_len = align_up8(HEADER_LEN + (uint64_t)m->fields_len) + m->body_len;
	return 0;
}

/* A METHOD_RETURN or an ERROR: a reply to someone, maybe to us. Calls and signals never are. */
static int is_a_reply(const struct message *m)
{
	return m->type == MSG_METHOD_RETURN || m->type == MSG_ERROR;
}

/* Whether the header fields fit in rx. The replies here are < 1 KiB: one too long for rx is
 * read up to its body (to see whose it is) and refused if it is ours; one whose header fields
 * do not fit is not read at all. */
static int fields_fit(const struct message *m)
{
	return m->wire_len <= MAX_MSG || m->fields_len <= MAX_MSG - HEADER_LEN;
}

/* Reads the message's header fields into rx, or the whole message if it fits. */
static int read_up_to_body(struct message *m)
{
	m->fields_end = HEADER_LEN + (size_t)m->fields_len;
	m->body_at = (size_t)align_up8(m->fields_end);
	if (m->wire_len > MAX_MSG)
		m->held = m->body_at;
	else
		m->held = (size_t)m->wire_len;
	return receive_at_least(m->held);
}

/* Whether a field of this code may have a value of this type. */
static int field_type_allowed(unsigned code, char type)
{
	if (code == FIELD_INVALID)
		return 0;
	if (code < ARRAY_LEN(header_field_types))
		return header_field_types[code] == type;
	return 1;
}

/* Keeps what the reply matching needs from one header field's value. */
static void note_field(struct message *m, unsigned code, size_t val, size_t len)
{
	if (code == FIELD_ERROR_NAME) {
		m->error_name_at = val;
		m->error_name_len = len;
		m->has_error_name = 1;
	} else if (code == FIELD_REPLY_SERIAL) {
		m->reply_serial = get_u32(val);
		m->has_reply_serial = 1;
	} else if (code == FIELD_SIGNATURE) {
		m->signature_at = val;
		m->signature_len = len;
	}
}

/* Parses the header field at *at (8-aligned: code, variant signature, value) and moves past. */
static int parse_header_field(struct message *m, size_t *at)
{
	size_t end = m->fields_end;
	size_t val = 0;
	size_t len = 0;
	if (align(at, BODY_ALIGN, end) < 0)
		return -1;
	if (end - *at < 4 || rx[*at + 1] != 1 || rx[*at + 3] != 0)
		return bad_message("bad header field at byte %zu", *at);
	unsigned code = rx[*at];
	char type = (char)rx[*at + 2];
	if (!field_type_allowed(code, type))
		return bad_message("header field %u of type '%c'", code, shown_char(type));
	*at += 4;
	if (read_basic_value(type, at, end, &val, &len) < 0)
		return -1;
	note_field(m, code, val, len);
	return 0;
}

/* Parses the header fields array and the zero padding up to the body. */
static int parse_header_fields(struct message *m)
{
	size_t at = HEADER_LEN;
	while (at < m->fields_end)
		if (parse_header_field(m, &at) < 0)
			return -1;
	return align(&at, BODY_ALIGN, m->body_at);
}

/* The answer to GetNameOwner, which dbus-daemon handles after the call: NameHasNoOwner means
 * the call is waiting for policyd's activation (Python start-up and start-up reconciliation,
 * seconds on a slow machine), so the deadline becomes ACTIVATION_TIMEOUT_MS from the start.
 * dbus-daemon itself answers the call with an error if the activation fails or outlasts its
 * own service_start_timeout. Any other answer (an owner, or no answer) keeps REPLY_TIMEOUT_MS:
 * a running policyd must answer within it. */
static void note_owner_reply(const struct message *m)
{
	if (m->type != MSG_ERROR || !m->has_error_name ||
	    m->error_name_len != LITERAL_LEN(ERR_NAME_HAS_NO_OWNER) ||
	    memcmp(rx + m->error_name_at, ERR_NAME_HAS_NO_OWNER, m->error_name_len))
		return;
	activating = 1;
	deadline_ms = started_ms + ACTIVATION_TIMEOUT_MS;
}

/* Whether a reply answers us: any reply to the call, or an error to Hello (after which the
 * call cannot succeed). Hello's own return is of no interest. */
static int answers_us(const struct message *m)
{
	if (m->reply_serial == CALL_SERIAL)
		return 1;
	return m->reply_serial == HELLO_SERIAL && m->type == MSG_ERROR;
}

/* Takes the error name and message (the body's first string, if it has one) from an ERROR
 * reply into err_name and err_msg; -1, as the call failed. */
static int take_error(const struct message *m)
{
	size_t at = m->body_at;
	size_t val = 0;
	size_t len = 0;
	if (!m->has_error_name)
		return bad_message("an error reply without ERROR_NAME");
	sanitize(err_name, sizeof err_name, rx + m->error_name_at, m->error_name_len);
	snprintf(err_msg, sizeof err_msg, "(no message)");
	if (m->signature_len > 0 && rx[m->signature_at] == TYPE_STRING) {
		if (read_basic_value(TYPE_STRING, &at, m->held, &val, &len) < 0)
			return -1;
		sanitize(err_msg, sizeof err_msg, rx + val, len);
	}
	return -1;
}

/* Reads messages until the reply to CALL_SERIAL: 0 for a METHOD_RETURN; -1 with err_* set
 * for an ERROR (to the call, or to Hello) and any failure. Other messages (Hello's reply,
 * NameAcquired, signals anyone on the bus may send to this connection) are dropped, however
 * many and however long: only the deadline bounds them. Only the reply must fit in rx. */
static int await_reply(void)
{
	for (;;) {
		struct message m = {0};
		if (read_fixed_header(&m) < 0)
			return -1;
		if (!is_a_reply(&m) || !fields_fit(&m)) {
			if (discard(m.wire_len) < 0)
				return -1;
			continue;
		}
		if (read_up_to_body(&m) < 0)
			return -1;
		if (parse_header_fields(&m) < 0)
			return -1;
		if (!m.has_reply_serial)
			return bad_message("a reply without REPLY_SERIAL");
		if (m.reply_serial == OWNER_SERIAL)
			note_owner_reply(&m);
		if (!answers_us(&m)) {
			if (discard(m.wire_len) < 0)
				return -1;
			continue;
		}
		if (m.wire_len > MAX_MSG)
			return fail(ERR_LIMITS_EXCEEDED, "a reply longer than %d bytes "
				    "(header fields %u, body %u)", MAX_MSG, m.fields_len, m.body_len);
		if (m.type == MSG_METHOD_RETURN)
			return 0;
		return take_error(&m);
	}
}

/* --- The call -------------------------------------------------------------------------------- */

/* Reads the server's answer to AUTH: one line "OK <guid>\r\n", consumed from rx. */
static int read_auth_reply(const char *uid)
{
	char line[128];
	unsigned char *nl;
	while (!(nl = memchr(rx, '\n', rx_len))) {
		if (rx_len >= MAX_AUTH_LINE)
			return fail(ERR_AUTH_FAILED, "no auth reply line in %d bytes", MAX_AUTH_LINE);
		if (receive_at_least(rx_len + 1) < 0)
			return -1;
	}
	size_t n = (size_t)(nl - rx) + 1;
	/* at least "OK " and one guid byte before the CRLF */
	if (n < 6 || memcmp(rx, AUTH_OK, LITERAL_LEN(AUTH_OK)) || rx[n - 2] != '\r') {
		size_t shown = n - 1; /* without the '\n', and the '\r' if there is one */
		if (shown > 0 && rx[shown - 1] == '\r')
			shown--;
		sanitize(line, sizeof line, rx, shown);
		return fail(ERR_AUTH_FAILED, "the bus refused AUTH EXTERNAL for uid %s: '%s'", uid,
			    line);
	}
	consume(n);
	return 0;
}

/* AUTH EXTERNAL (the real uid), BEGIN, Hello, the call and GetNameOwner in one write, as
 * sd-bus pipelines them (dbus-daemon reads them in order: when it reaches GetNameOwner, the
 * call is either with policyd or waiting for its activation); then the auth reply
 * "OK <guid>" and the messages. */
static int call(const char *member, const char *arg)
{
	char uid[16];
	snprintf(uid, sizeof uid, "%u", (unsigned)getuid());
	tx_len = 0;
	put_auth(uid);
	put_call(HELLO_SERIAL, DBUS_NAME, DBUS_PATH, DBUS_NAME, "Hello", NULL);
	put_call(CALL_SERIAL, BROKER_NAME, BROKER_PATH, BROKER_MANAGER, member, arg);
	put_call(OWNER_SERIAL, DBUS_NAME, DBUS_PATH, DBUS_NAME, "GetNameOwner", BROKER_NAME);
	if (send_tx() < 0)
		return -1;
	if (read_auth_reply(uid) < 0)
		return -1;
	return await_reply();
}

/* --- The direct path: policyd's block socket (policyd.bus.blocksocket) ------------------------ */

/* One SOCK_SEQPACKET connection, one request packet, one reply packet. policyd checks the
 * caller is uid 0 (SO_PEERCRED) and runs exactly Manager.Attach/Detach; its replies:
 *   "BB1 ok" [" <object path>"]          the call's return
 *   "BB1 error <ErrorName> <message>"    the call's D-Bus error, final
 *   "BB1 busy <ErrorName> <message>"     over policyd's connection limit, request unread */
#define DEFAULT_BLOCK_SOCKET "/run/blockbroker-policyd/block.sock"
#define DIRECT_MAGIC "BB1"
#define DIRECT_OK "BB1 ok"
#define DIRECT_ERROR "BB1 error "
#define DIRECT_BUSY "BB1 busy "
#define MAX_DIRECT_REPLY 1024 /* policyd's bound (blocksocket.MAX_REPLY) */
#define USE_DBUS 1            /* nothing was sent, or policyd did not read it: call over D-Bus */

static unsigned char direct_rx[MAX_DIRECT_REPLY + 1]; /* one more: a longer packet shows */

/* Whether buf (n bytes) starts with the string literal's bytes. */
#define STARTS_WITH(buf, n, lit) \
	((n) >= LITERAL_LEN(lit) && !memcmp((buf), (lit), LITERAL_LEN(lit)))

/* The reply packet buf (n bytes): 0 for ok; -1 with err_* set for an error or a malformed or
 * empty (closed) reply; USE_DBUS with err_* set for busy. */
static int parse_direct_reply(const unsigned char *buf, size_t n)
{
	char shown[64];
	size_t at;
	int busy = 0;
	if (n == 0)
		return fail(ERR_DISCONNECTED, "policyd closed the block socket without a reply");
	if (n == LITERAL_LEN(DIRECT_OK) && STARTS_WITH(buf, n, DIRECT_OK))
		return 0;
	if (STARTS_WITH(buf, n, DIRECT_OK " "))
		return 0; /* the export's object path follows; nothing here needs it */
	if (STARTS_WITH(buf, n, DIRECT_ERROR)) {
		at = LITERAL_LEN(DIRECT_ERROR);
	} else if (STARTS_WITH(buf, n, DIRECT_BUSY)) {
		at = LITERAL_LEN(DIRECT_BUSY);
		busy = 1;
	} else {
		sanitize(shown, sizeof shown, buf, n);
		return bad_message("not a block-socket reply: '%s'", shown);
	}
	const unsigned char *name = buf + at;
	const unsigned char *space = memchr(name, ' ', n - at);
	size_t name_len = space ? (size_t)(space - name) : n - at;
	if (name_len == 0)
		return bad_message("a block-socket error reply without an error name");
	sanitize(err_name, sizeof err_name, name, name_len);
	if (space)
		sanitize(err_msg, sizeof err_msg, space + 1, n - at - name_len - 1);
	else
		snprintf(err_msg, sizeof err_msg, "(no message)");
	return busy ? USE_DBUS : -1;
}

/* Connects `bus` to the block socket; -1 (bus closed again) if there is none to use. */
static int connect_direct(void)
{
	const char *path = getenv("BLOCKBROKER_BLOCK_SOCKET");
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	if (!path)
		path = DEFAULT_BLOCK_SOCKET;
	size_t n = strlen(path);
	if (n == 0 || n >= sizeof sa.sun_path)
		return -1;
	memcpy(sa.sun_path, path, n + 1);
	bus = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (bus < 0)
		return -1;
	/* ENOENT, ECONNREFUSED: no policyd (D-Bus activation starts one); EAGAIN: its listen
	 * queue is full; anything else: not usable. Nothing was sent either way. */
	if (connect(bus, (const struct sockaddr *)&sa,
		    (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1)) == 0)
		return 0;
	close(bus);
	bus = -1;
	return -1;
}

/* Reads the one reply packet into direct_rx; its length in *n. USE_DBUS if policyd closed the
 * connection with the request unread: the kernel reports ECONNRESET (before any queued reply)
 * only when the closing end still had unread packets, and the script sends just the one, so
 * policyd never saw it (it is stopping, or over its connection limit). */
static int receive_direct(size_t *n)
{
	for (;;) {
		ssize_t r = recv(bus, direct_rx, sizeof direct_rx, MSG_DONTWAIT | MSG_TRUNC);
		if (r >= 0) {
			if ((size_t)r >= sizeof direct_rx)
				return fail(ERR_LIMITS_EXCEEDED, "a block-socket reply of %zd bytes "
					    "(at most %d)", r, MAX_DIRECT_REPLY);
			*n = (size_t)r;
			return 0;
		}
		if (errno == ECONNRESET)
			return USE_DBUS;
		if (errno != EAGAIN && errno != EINTR)
			return fail(ERR_DISCONNECTED, "reading from the block socket: %s",
				    strerror(errno));
		if (wait_for_bus(POLLIN) < 0)
			return -1;
	}
}

/* The call on the block socket: 0 done; -1 failed, err_* set (final: once policyd has read the
 * request, it may have acted on it); USE_DBUS: no socket, the request could not be sent, or
 * policyd closed without reading it or answered busy. */
static int direct_call(const struct command *cmd, const char *path)
{
	char request[MAX_XENBUS_PATH + 32];
	size_t n = 0;
	if (connect_direct() < 0)
		return USE_DBUS;
	int len = snprintf(request, sizeof request, DIRECT_MAGIC " %s %s", cmd->direct_op, path);
	for (;;) {
		ssize_t r = send(bus, request, (size_t)len, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (r == len)
			break;
		if (r >= 0 || (errno != EAGAIN && errno != EINTR))
			return USE_DBUS; /* a packet is sent whole or not at all: this one was not */
		if (wait_for_bus(POLLOUT) < 0)
			return -1;
	}
	int received = receive_direct(&n);
	if (received != 0)
		return received;
	return parse_direct_reply(direct_rx, n);
}

/* --- The failure report: stderr and XenStore ------------------------------------------------- */

/* Runs a Xen tool on the failure path (PATH fixed, XENSTORED_PATH inherited); 0: it exited 0.
 * Bounded: SIGKILLed after TOOL_TIMEOUT_MS, and at once if this script dies first
 * (PR_SET_PDEATHSIG; libxl SIGKILLs a script that outlives its hotplug timeout and then removes
 * the backend directory: an orphaned xenstore-write would re-create it). */
static int run(char *const argv[], int quiet)
{
	pid_t parent = getpid();
	pid_t pid = fork();
	int status = -1;
	if (pid < 0)
		return -1;
	if (pid == 0) {
		/* armed before exec and kept by it; if the script is already gone, the parent
		 * check catches what the signal would have */
		if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0 || getppid() != parent)
			_exit(127);
		int null = quiet ? open("/dev/null", O_WRONLY) : -1;
		if (null >= 0 && dup2(null, 2) < 0)
			_exit(127);
		execvp(argv[0], argv);
		_exit(127);
	}
	int64_t end_ms = now_ms() + TOOL_TIMEOUT_MS;
	for (;;) {
		pid_t done = waitpid(pid, &status, WNOHANG);
		if (done == pid)
			return status;
		if (done < 0 && errno != EINTR)
			return -1;
		if (now_ms() >= end_ms)
			break;
		struct timespec pause = {0, TOOL_POLL_NS};
		nanosleep(&pause, NULL);
	}
	kill(pid, SIGKILL);
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	dprintf(2, "blockbroker-block: %s did not finish within %d ms; killed\n", argv[0],
		TOOL_TIMEOUT_MS);
	return -1;
}

/* xenstore-write decodes backslash escapes (\n, \xHH, \ooo) in values: each backslash is
 * doubled, so the node holds exactly the printable text. dst has room for 2 * strlen(src) + 1. */
static void escape_backslashes(char *dst, const char *src)
{
	size_t e = 0;
	for (const char *c = src; *c; c++) {
		if (*c == '\\')
			dst[e++] = '\\';
		dst[e++] = *c;
	}
	dst[e] = 0;
}

/* hotplug-error and hotplug-status=error under the backend path, for libxl; not if libxl
 * removed the dir meanwhile, as a write would re-create it. */
static void write_hotplug_error(const char *path, char *escaped)
{
	char error_node[MAX_XENBUS_PATH + 16];
	char status_node[MAX_XENBUS_PATH + 16];
	snprintf(error_node, sizeof error_node, "%s/hotplug-error", path);
	snprintf(status_node, sizeof status_node, "%s/hotplug-status", path);
	char *exists[] = {"xenstore-exists", "--", (char *)path, NULL};
	char *write[] = {"xenstore-write", "--", error_node, escaped, status_node, "error", NULL};
	signal(SIGPIPE, SIG_DFL);
	setenv("PATH", TOOL_PATH, 1);
	if (run(exists, 1) == 0)
		run(write, 0);
}

/* Reports err_name and err_msg on stderr and, if the command says so, in XenStore. */
static void report_failure(const struct command *cmd, const char *path)
{
	char value[sizeof err_name + sizeof err_msg + 2];
	char escaped[2 * sizeof value];
	snprintf(value, sizeof value, "%s: %s", err_name, err_msg);
	dprintf(2, "blockbroker-block %s %s: %s\n", cmd->name, path, value);
	escape_backslashes(escaped, value);
	if (cmd->writes_hotplug_error)
		write_hotplug_error(path, escaped);
}

/* --- main ------------------------------------------------------------------------------------ */

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

/* The sh pattern libxl's scripts use: backend/STAR | /local/domain/STAR/backend/STAR. */
static int is_backend_path(const char *path)
{
	if (!strncmp(path, "backend/", 8))
		return 1;
	return !strncmp(path, "/local/domain/", 14) && strstr(path + 14, "/backend/");
}

/* Exits with usage unless XENBUS_PATH is bounded, printable and a backend path. */
static void check_xenbus_path(const char *argv0, const char *path)
{
	size_t len = strnlen(path, MAX_XENBUS_PATH + 1);
	if (len > MAX_XENBUS_PATH)
		usage(argv0, "XENBUS_PATH is longer than %d bytes", MAX_XENBUS_PATH);
	for (size_t i = 0; i < len; i++)
		if (!is_printable_ascii((unsigned char)path[i]))
			usage(argv0, "XENBUS_PATH has a byte that is not printable ASCII");
	if (!is_backend_path(path))
		usage(argv0, "XENBUS_PATH must be a backend path (backend/... or /local/domain/<be>/"
			     "backend/...), got '%s'", path);
}

/* The command named by argv[1], or usage. */
static const struct command *find_command(const char *argv0, const char *name)
{
	char shown[64];
	for (size_t i = 0; i < ARRAY_LEN(commands); i++)
		if (!strcmp(name, commands[i].name))
			return &commands[i];
	sanitize(shown, sizeof shown, name, strlen(name));
	usage(argv0, "unknown command '%s'", shown);
}

/* Opens /dev/null on any of fds 0-2 that is closed (libxl's are open), so the bus socket is
 * never stderr. */
static int ensure_standard_fds(void)
{
	for (int fd = 0; fd < 3; fd++)
		if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) != fd)
			return -1;
	return 0;
}

/* Whether the call succeeded, or failed in the way the command counts as done. */
static int succeeded(const struct command *cmd, int call_result)
{
	if (call_result == 0)
		return 1;
	return cmd->error_meaning_success && !strcmp(err_name, cmd->error_meaning_success);
}

int main(int argc, char **argv)
{
	const char *argv0 = "blockbroker-block";
	const char *path = getenv("XENBUS_PATH");
	const char *name = "";
	if (argc > 0 && argv[0])
		argv0 = argv[0];
	if (argc > 1)
		name = argv[1];
	if (!path)
		path = "";
	check_xenbus_path(argv0, path);
	const struct command *cmd = find_command(argv0, name);
	if (ensure_standard_fds() < 0)
		return 1;
	signal(SIGPIPE, SIG_IGN); /* and send(MSG_NOSIGNAL): a closed bus is an error, not a kill */
	signal(SIGCHLD, SIG_DFL); /* an inherited SIG_IGN would make waitpid fail: nothing written */
	started_ms = now_ms();
	deadline_ms = started_ms + REPLY_TIMEOUT_MS;
	int result = direct_call(cmd, path);
	if (bus >= 0)
		close(bus);
	bus = -1;
	if (result == USE_DBUS) {
		result = connect_bus();
		if (result == 0)
			result = call(cmd->method, path);
		if (bus >= 0)
			close(bus);
	}
	if (succeeded(cmd, result))
		return 0;
	report_failure(cmd, path);
	return 1;
}
