"""The real oxenstored (Xen 4.17) on a host without Xen, and toolstack-like domain registration.

Test harness, runs as root. oxenstored's socket path is fixed at /run/xenstored/socket, so it
runs in its own mount namespace with the stack's private run dir bind-mounted there; clients
use that dir directly through XENSTORED_PATH. Its hypervisor interface is replaced by the
LD_PRELOAD stand-in in xenstored-shim.c (compiled on demand into a cache dir).
"""

from __future__ import annotations

import functools
import grp
import hashlib
import os
import subprocess
import uuid
from pathlib import Path

from pyxs import Client
from pyxs._internal import Op

from harness import ns
from harness.procs import Daemon, StackError
from policyd.validate import vdev_name

OXENSTORED = Path(os.environ.get("BLOCKBROKER_OXENSTORED", "/usr/lib/xen-4.17/bin/oxenstored"))
SHIM_SOURCE = Path(__file__).with_name("xenstored-shim.c")
FIXED_RUN_DIR = Path("/run/xenstored")


def cache_dir() -> Path:
    """$BLOCKBROKER_DEV_CACHE, else $XDG_CACHE_HOME/blockbroker-dev, else /var/cache/..."""
    if configured := os.environ.get("BLOCKBROKER_DEV_CACHE"):
        return Path(configured)
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg) / "blockbroker-dev"
    return Path("/var/cache/blockbroker-dev")


def build_shim() -> Path:
    """Compile the shim once per source version; concurrent builders race harmlessly."""
    source = SHIM_SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    target = cache_dir() / f"xenstored-shim-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    compile_cmd = ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-o", str(partial)]
    result = subprocess.run(
        [*compile_cmd, str(SHIM_SOURCE)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise StackError(f"compiling {SHIM_SOURCE} failed:\n{result.stderr}")
    os.replace(partial, target)
    return target


def write_config(state_dir: Path) -> Path:
    """oxenstored.conf: no persistence, logs in the stack dir, no /proc/xen files."""
    config = state_dir / "oxenstored.conf"
    config.write_text(
        f"pid-file = {state_dir}/oxenstored.pid\n"
        "persistent = false\n"
        f"xenstored-log-file = {state_dir}/xenstored-internal.log\n"
        "xenstored-log-level = info\n"
        f"access-log-file = {state_dir}/xenstored-access.log\n"
        f"xenstored-port = {state_dir}/no-such-port\n"
        f"xenstored-kva = {state_dir}/no-such-kva\n"
    )
    return config


def oxenstored_daemon(state_dir: Path, run_dir: Path, log_path: Path) -> Daemon:
    """A Daemon for oxenstored whose /run/xenstored is `run_dir` (in its own mount namespace)."""
    shim = build_shim()
    config = write_config(state_dir)
    FIXED_RUN_DIR.mkdir(parents=True, exist_ok=True)  # the mount point; left empty on the host
    return Daemon(
        name="oxenstored",
        argv=[str(OXENSTORED), "--no-fork", "--no-domain-init", "--config-file", str(config)],
        log_path=log_path,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LD_PRELOAD": str(shim)},
        preexec=functools.partial(ns.private_binds, [(run_dir, FIXED_RUN_DIR)]),
    )


def answers(socket_path: Path) -> bool:
    """True once oxenstored accepts connections and answers a request."""
    if not socket_path.exists():
        return False
    try:
        with Client(unix_socket_path=str(socket_path)) as client:
            client.exists(b"/")
    except Exception:  # OSError, or pyxs's own error types while the daemon starts up
        return False
    return True


def share_socket(run_dir: Path, group: str) -> None:
    """Let `group` (policyd's) reach the socket, as a distribution's xenstored group would."""
    gid = grp.getgrnam(group).gr_gid
    os.chown(run_dir, 0, gid)
    run_dir.chmod(0o750)
    for name in ("socket", "socket_ro"):
        path = run_dir / name
        if path.exists():
            os.chown(path, 0, gid)
            path.chmod(0o660)


def _mknod(client: Client, path: str, perms: list[str], value: str = "") -> None:
    client.ack(Op.WRITE, path.encode() + b"\0" + value.encode())  # write() refuses empty values
    client.set_perms(path.encode(), [p.encode() for p in perms])


def register_dom0(client: Client) -> None:
    """What xen-init-dom0 writes for dom0, plus the backend dirs libxl creates on first use."""
    client.transaction()
    _mknod(client, "/local/domain/0", ["n0"])
    _mknod(client, "/local/domain/0/name", ["n0"], "Domain-0")
    _mknod(client, "/local/domain/0/domid", ["n0"], "0")
    _mknod(client, "/local/domain/0/backend", ["n0"])
    _mknod(client, "/local/domain/0/backend/vbd", ["n0"])
    _mknod(client, "/local/domain/0/device-model", ["n0"])
    if not client.commit():
        raise StackError("registering dom0 in XenStore conflicted with another writer")


def register_domain(client: Client, name: str, domid: int) -> None:
    """Register a guest like libxl__domain_make: the domain reads its own dir, dom0 owns it.

    Permission lists are XenStore's: the first entry names the owner (who may do anything) and
    the default access for everyone else (n=none, r=read, w=write, b=both); later entries are
    per-domain grants. libxl uses roperm = [n0, rN] and rwperm = [nN].
    """
    roperm = ["n0", f"r{domid}"]
    rwperm = [f"n{domid}"]
    dom = f"/local/domain/{domid}"
    vm = f"/vm/{uuid.uuid5(uuid.NAMESPACE_OID, f'blockbroker-devstack/{name}/{domid}')}"
    client.transaction()
    _mknod(client, vm, roperm)
    _mknod(client, f"{vm}/name", roperm, name)
    _mknod(client, f"{vm}/uuid", roperm, vm.rsplit("/", 1)[1])
    _mknod(client, dom, roperm)
    _mknod(client, f"{dom}/vm", roperm, vm)
    _mknod(client, f"{dom}/name", roperm, name)
    _mknod(client, f"{dom}/domid", roperm, str(domid))
    _mknod(client, f"{dom}/device", roperm)
    _mknod(client, f"{dom}/control", roperm)
    _mknod(client, f"{dom}/control/shutdown", rwperm)
    for writable in ("data", "drivers", "feature", "attr", "error"):
        _mknod(client, f"{dom}/{writable}", rwperm)
    _mknod(client, f"/libxl/{domid}", ["n0"])
    _mknod(client, f"/libxl/{domid}/type", ["n0"], "pv")
    if not client.commit():
        raise StackError(f"registering domain {name} ({domid}) in XenStore conflicted")


def write_libxl_vbd(
    client: Client,
    frontend_domid: int,
    devid: int,
    params: str,
    mode: str = "r",
    extra: dict[str, str] | None = None,
) -> str:
    """The nodes libxl's device_disk_add writes for `disk=[..., script=blockbroker-block]`, in
    one transaction, before it runs the hotplug script; returns the backend path. The backend
    is dom0's and readable by the frontend, the frontend the other way round (parents made
    first when missing, with the same permissions); backend `state` 2 (InitWait): libxl runs
    the script once blkback got there. `extra` adds or replaces backend nodes (junk tests)."""
    be = f"/local/domain/0/backend/vbd/{frontend_domid}/{devid}"
    fe = f"/local/domain/{frontend_domid}/device/vbd/{devid}"
    be_perms, fe_perms = ["n0", f"r{frontend_domid}"], [f"n{frontend_domid}", "r0"]
    back = {
        "frontend": fe,
        "frontend-id": str(frontend_domid),
        "params": params,
        "script": "/etc/xen/scripts/blockbroker-block",
        "online": "1",
        "removable": "0",
        "bootable": "1",
        "state": "2",
        "dev": vdev_name(devid),
        "type": "phy",
        "mode": mode,
        "device-type": "disk",
        "discard-enable": "0",
        **(extra or {}),
    }
    front = {
        "backend": be,
        "backend-id": "0",
        "state": "1",
        "virtual-device": str(devid),
        "device-type": "disk",
    }
    client.transaction()
    try:
        for path, perms in ((be.rsplit("/", 1)[0], be_perms), (fe.rsplit("/", 1)[0], fe_perms)):
            if not client.exists(path.encode()):
                _mknod(client, path, perms)
        _mknod(client, be, be_perms)
        _mknod(client, fe, fe_perms)
        for base, nodes in ((be, back), (fe, front)):
            for name, value in nodes.items():
                client.write(f"{base}/{name}".encode(), value.encode())
    except BaseException:
        client.rollback()
        raise
    if not client.commit():
        raise StackError("writing the vbd nodes conflicted with another writer")
    return be


def begin_libxl_remove(client: Client, be: str) -> None:
    """What libxl's device removal writes first, in one transaction, before it waits for
    blkback to close and runs the hotplug script's `remove`: online = 0, state 5 (Closing)."""
    client.transaction()
    try:
        client.write(f"{be}/online".encode(), b"0")
        client.write(f"{be}/state".encode(), b"5")
    except BaseException:
        client.rollback()
        raise
    if not client.commit():
        raise StackError("writing online=0 conflicted with another writer")
