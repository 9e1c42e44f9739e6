/* bench/bench_blockscript_candidate.c: a MEASUREMENT CANDIDATE for bench_blockscript.py, not shipped.
 *
 * The libxl block script as one static C program: Attach/Detach over the raw D-Bus wire protocol
 * (AUTH EXTERNAL, Hello, one call; DBUS_SYSTEM_BUS_ADDRESS unix:path= honoured), then
 * hotplug-status over the raw xenstored socket (XENSTORED_PATH). It measures how much of
 * blockbroker-block's time is sh + dbus-send + xenstore-write start-up. Shipping it would mean a
 * second root-run parser of the D-Bus wire format (and /dev/xen/xenbus support); see
 * docs/client.md. Built by the benchmark with gcc -O2 -static.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static unsigned char buf[4096];
static size_t len;

static void pad(size_t a) { while (len % a) buf[len++] = 0; }
static void u32(uint32_t v) { pad(4); memcpy(buf + len, &v, 4); len += 4; }
static void str(const char *s) { size_t n = strlen(s); u32((uint32_t)n); memcpy(buf + len, s, n + 1); len += n + 1; }
static void sig(const char *s) { size_t n = strlen(s); buf[len++] = (unsigned char)n; memcpy(buf + len, s, n + 1); len += n + 1; }
static void field_s(int code, char t, const char *v) {
    char s[2] = {t, 0};
    pad(8); buf[len++] = (unsigned char)code; sig(s);
    if (t == 'g') sig(v); else str(v);
}

static size_t call(uint32_t serial, const char *dest, const char *path, const char *iface,
                   const char *member, const char *arg) {
    len = 0;
    buf[len++] = 'l'; buf[len++] = 1; buf[len++] = 0; buf[len++] = 1;
    size_t body_len_at = len; u32(0); u32(serial);
    size_t fields_len_at = len; u32(0);
    size_t fields_start = len;
    field_s(1, 'o', path);
    if (iface) field_s(2, 's', iface);
    field_s(3, 's', member);
    field_s(6, 's', dest);
    if (arg) field_s(8, 'g', "s");
    uint32_t flen = (uint32_t)(len - fields_start);
    memcpy(buf + fields_len_at, &flen, 4);
    pad(8);
    size_t body_start = len;
    if (arg) str(arg);
    uint32_t blen = (uint32_t)(len - body_start);
    memcpy(buf + body_len_at, &blen, 4);
    return len;
}

static int readn(int fd, void *p, size_t n) {
    size_t got = 0;
    while (got < n) { ssize_t r = read(fd, (char *)p + got, n - got); if (r <= 0) return -1; got += (size_t)r; }
    return 0;
}

/* Read messages until the reply to `serial`; returns its type (2 return, 3 error). */
static int await_reply(int fd, uint32_t serial, char *err, size_t errlen) {
    for (;;) {
        unsigned char h[16];
        if (readn(fd, h, 16)) return -1;
        uint32_t blen, flen; memcpy(&blen, h + 4, 4); memcpy(&flen, h + 12, 4);
        if (h[0] != 'l' || flen > sizeof buf || blen > sizeof buf) return -1;
        size_t rest = (((size_t)flen + 7) & ~(size_t)7) + blen;
        if (rest > sizeof buf) return -1;
        if (readn(fd, buf, rest)) return -1;
        uint32_t reply_serial = 0; const char *ename = "";
        size_t i = 0;
        while (i < flen) { /* header fields: (byte code, variant) structs, 8-aligned */
            i = (i + 7) & ~(size_t)7;
            if (i + 3 > flen) return -1;
            int code = buf[i++]; size_t sl = buf[i++];
            if (sl != 1 || i + 2 > flen) return -1;
            char t = (char)buf[i]; i += 2;
            if (t == 'u') {
                i = (i + 3) & ~(size_t)3;
                if (i + 4 > flen) return -1;
                if (code == 5) memcpy(&reply_serial, buf + i, 4);
                i += 4;
            } else if (t == 'g') {
                if (i >= flen) return -1;
                i += buf[i] + 2u;
            } else if (t == 's' || t == 'o') {
                uint32_t n;
                i = (i + 3) & ~(size_t)3;
                if (i + 4 > flen) return -1;
                memcpy(&n, buf + i, 4);
                if (n > flen || i + 4 + n + 1 > flen || buf[i + 4 + n]) return -1;
                if (code == 4) ename = (const char *)buf + i + 4;
                i += 4 + n + 1;
            } else {
                return -1; /* no other field types in a reply */
            }
        }
        if (reply_serial != serial) continue;
        if (h[1] == 3) {
            size_t b = (flen + 7) & ~(size_t)7; uint32_t n = 0;
            if (blen >= 4) memcpy(&n, buf + b, 4);
            if (n > blen - 4) n = 0;
            snprintf(err, errlen, "%s: %.*s", ename, (int)n, (const char *)buf + b + 4);
        }
        return h[1];
    }
}

static int xs_write(const char *path, const char *value) {
    const char *sock = getenv("XENSTORED_PATH");
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", sock ? sock : "/run/xenstored/socket");
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a)) return -1;
    size_t pl = strlen(path) + 1, vl = strlen(value);
    uint32_t h[4] = {11 /* XS_WRITE */, 0, 0, (uint32_t)(pl + vl)};
    unsigned char m[1024];
    if (16 + pl + vl > sizeof m) return -1;
    memcpy(m, h, 16); memcpy(m + 16, path, pl); memcpy(m + 16 + pl, value, vl);
    if (write(fd, m, 16 + pl + vl) != (ssize_t)(16 + pl + vl)) return -1;
    uint32_t r[4];
    if (readn(fd, r, 16) || r[3] > sizeof m || readn(fd, m, r[3])) return -1;
    close(fd);
    return r[0] == 11 ? 0 : -1;
}

int main(int argc, char **argv) {
    const char *be = getenv("XENBUS_PATH");
    if (argc != 2 || !be || (strcmp(argv[1], "add") && strcmp(argv[1], "remove"))) return 2;
    int add = !strcmp(argv[1], "add");
    const char *addr = getenv("DBUS_SYSTEM_BUS_ADDRESS");
    const char *p = addr && !strncmp(addr, "unix:path=", 10) ? addr + 10 : "/run/dbus/system_bus_socket";
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%.*s", (int)strcspn(p, ","), p);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a)) { perror("connect"); return 1; }
    char auth[64], uid[16]; snprintf(uid, sizeof uid, "%u", (unsigned)getuid());
    int n = snprintf(auth, sizeof auth, "%cAUTH EXTERNAL ", 0);
    for (char *c = uid; *c; c++) n += snprintf(auth + n, sizeof auth - (size_t)n, "%02x", *c);
    n += snprintf(auth + n, sizeof auth - (size_t)n, "\r\n");
    if (write(fd, auth, (size_t)n) != n) return 1;
    char line[256]; ssize_t r = read(fd, line, sizeof line);
    if (r < 2 || strncmp(line, "OK", 2)) return 1;
    if (write(fd, "BEGIN\r\n", 7) != 7) return 1;
    size_t l1 = call(1, "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello", NULL);
    if (write(fd, buf, l1) != (ssize_t)l1) return 1;
    size_t l2 = call(2, "org.qubes.BlockBroker1", "/org/qubes/BlockBroker1", "org.qubes.BlockBroker1.Manager",
                     add ? "Attach" : "Detach", be);
    if (write(fd, buf, l2) != (ssize_t)l2) return 1;
    char err[512] = "";
    int t = await_reply(fd, 2, err, sizeof err);
    close(fd);
    if (t != 2) { fprintf(stderr, "%s\n", err); return 1; }
    if (add) {
        char node[512]; snprintf(node, sizeof node, "%s/hotplug-status", be);
        if (xs_write(node, "connected")) return 1;
    }
    return 0;
}
