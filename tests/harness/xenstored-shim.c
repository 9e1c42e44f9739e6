/*
 * LD_PRELOAD stand-in for the hypervisor interface of oxenstored (Xen 4.17), so the REAL
 * XenStore daemon runs on a host without Xen. Test harness only; loaded into oxenstored,
 * which runs as root inside the harness's private mount namespace.
 *
 * What it replaces, and why:
 *  - setrlimit/setrlimit64: oxenstored raises RLIMIT_NOFILE to values a container may refuse.
 *  - xc_interface_open/close, xc_domain_getinfolist: no hypervisor to ask; no domains exist.
 *  - xenevtchn_*: no event channels. The "port" fd is a pipe nobody writes, so oxenstored's
 *    select loop sees no events and serves only its unix socket clients (all of them dom0).
 * Everything else (the store, transactions, permissions, quotas, watches) is oxenstored's own.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <sys/resource.h>
#include <unistd.h>

static int fake_handle[64];
static int never_ready_pipe[2] = {-1, -1};

int setrlimit(__rlimit_resource_t resource, const struct rlimit *limit)
{
    (void)resource;
    (void)limit;
    return 0;
}

int setrlimit64(__rlimit_resource_t resource, const struct rlimit64 *limit)
{
    (void)resource;
    (void)limit;
    return 0;
}

void *xc_interface_open(void *logger, void *dombuild_logger, unsigned open_flags)
{
    (void)logger;
    (void)dombuild_logger;
    (void)open_flags;
    return fake_handle;
}

int xc_interface_close(void *xch)
{
    (void)xch;
    return 0;
}

int xc_domain_getinfolist(void *xch, unsigned first_domain, unsigned max_domains, void *info)
{
    (void)xch;
    (void)first_domain;
    (void)max_domains;
    (void)info;
    return 0;
}

void *xenevtchn_open(void *logger, unsigned open_flags)
{
    (void)logger;
    (void)open_flags;
    if (never_ready_pipe[0] < 0 && pipe(never_ready_pipe) != 0)
        return NULL;
    return fake_handle;
}

int xenevtchn_fd(void *xce)
{
    (void)xce;
    return never_ready_pipe[0];
}

int xenevtchn_close(void *xce)
{
    (void)xce;
    return 0;
}

int xenevtchn_bind_virq(void *xce, unsigned virq)
{
    (void)xce;
    (void)virq;
    return 1;
}

int xenevtchn_unmask(void *xce, unsigned port)
{
    (void)xce;
    (void)port;
    return 0;
}

int xenevtchn_notify(void *xce, unsigned port)
{
    (void)xce;
    (void)port;
    return 0;
}

int xenevtchn_pending(void *xce)
{
    (void)xce;
    return -1;
}
