/* libFuzzer harness for blockbroker-block's reply parsers: D-Bus, and policyd's block socket
 * (test code, no privileges).
 *
 * The script's source is included whole, its main renamed, so the fuzzed code is the shipped
 * code. Each input is fed to both parsers in turn:
 * - the block socket: the input is one SOCK_SEQPACKET packet on a socketpair, read by
 *   receive_direct() (so a packet longer than the script's buffer is covered) and parsed by
 *   parse_direct_reply();
 * - D-Bus: the input is what the bus would send after the script's pipelined AUTH, Hello and
 *   call: the auth reply line, then any messages. It is written to one end of a socketpair,
 *   which is then shut down, and read_auth_reply() and await_reply() read it from the other,
 *   exactly as from dbus-daemon (so reads split anywhere and streams longer than rx are
 *   covered; the end of the stream is the bus closing the connection).
 *
 * Properties, beyond ASan/UBSan: the D-Bus parser returns 0 (the call's METHOD_RETURN) or -1,
 * the block-socket one 0, -1 or USE_DBUS (busy), each failure with err_name set; err_name and
 * err_msg are NUL-terminated printable ASCII within their arrays; and rx never holds more than
 * its size. Build and run: tests/fuzz/fuzzrun.py.
 */
#define main blockbroker_block_main
#include "../../src/client/blockbroker-block.c"
#undef main

static void check_text(const char *s, size_t cap)
{
	size_t n = strnlen(s, cap);
	if (n == cap)
		abort(); /* not NUL-terminated within its array */
	for (size_t i = 0; i < n; i++)
		if (!is_printable_ascii((unsigned char)s[i]))
			abort(); /* an unsanitized byte would reach stderr and XenStore */
}

static void reset(void)
{
	rx_len = 0;
	err_name[0] = 0;
	err_msg[0] = 0;
	started_ms = now_ms();
	deadline_ms = started_ms + REPLY_TIMEOUT_MS;
	activating = 0;
}

static void check_failure(int r)
{
	if (r != 0 && !err_name[0])
		abort(); /* every failure is named */
	check_text(err_name, sizeof err_name);
	check_text(err_msg, sizeof err_msg);
}

/* The block socket's reply: the input as one packet. */
static void direct_reply(const uint8_t *data, size_t size)
{
	int sv[2];
	size_t n = 0;
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
		abort();
	int big = 1 << 21;
	setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
	if (send(sv[0], data, size, 0) != (ssize_t)size)
		abort();
	bus = sv[1];
	reset();
	int r = receive_direct(&n);
	if (r == USE_DBUS)
		abort(); /* only a reset connection is that, and this one is not reset */
	if (r == 0) {
		if (n > MAX_DIRECT_REPLY || (n != size && size <= MAX_DIRECT_REPLY))
			abort(); /* a reply within the bound is read whole; nothing longer is taken */
		r = parse_direct_reply(direct_rx, n);
	} else if (size <= MAX_DIRECT_REPLY) {
		abort(); /* only an overlong packet fails to be read */
	}
	if (r != 0 && r != -1 && r != USE_DBUS)
		abort();
	check_failure(r);
	close(sv[0]);
	close(sv[1]);
	bus = -1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	direct_reply(data, size);
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
		abort();
	int big = 1 << 21;
	setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
	size_t sent = 0;
	while (sent < size) { /* -max_len keeps inputs within the socket's buffer */
		ssize_t r = write(sv[0], data + sent, size - sent);
		if (r <= 0)
			abort();
		sent += (size_t)r;
	}
	shutdown(sv[0], SHUT_WR);
	bus = sv[1];
	reset();
	int r = read_auth_reply("0");
	if (r == 0)
		r = await_reply();
	if (r != 0 && r != -1)
		abort();
	check_failure(r);
	if (rx_len > sizeof rx)
		abort();
	close(sv[0]);
	close(sv[1]);
	bus = -1;
	return 0;
}
