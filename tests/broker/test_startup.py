"""Start-up: config checks, the socket's owner and mode, socket activation, the peer uid check."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokerlab import BROKER_BIN, Broker, make_image, start_broker, stop_broker, write_config

from broker import protocol
from broker.config import ConfigError, check_fail_closed, load_config
from broker.protocol import Request, RequestKind
from policyd.brokerclient import encode_request, parse_reply

TESTS_DIR = Path(__file__).resolve().parent.parent  # the child imports harness from here

pytestmark = pytest.mark.root

NOBODY = 65534


def run_broker(config: Path, sock: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BROKER_BIN), "--config", str(config), "--socket", str(sock)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    "problem",
    ["world-writable", "group-writable", "not root-owned", "unknown key", "no such user",
     "bad toml", "symlinked root", "missing root", "bad major", "diskless not bool",
     "bad landlock"],
)  # fmt: skip
def test_unsafe_or_invalid_config_refuses_to_start(workdir: Path, problem: str) -> None:
    root = workdir / "root"
    config = write_config(workdir / "broker.toml", "root", [root], [7])
    if problem == "world-writable":
        config.chmod(0o646)
    elif problem == "group-writable":
        config.chmod(0o664)
    elif problem == "not root-owned":
        os.chown(config, NOBODY, NOBODY)
    elif problem == "unknown key":
        config.write_text(config.read_text() + "allow_everything = true\n")
    elif problem == "no such user":
        write_config(config, "no-such-user-blockbroker", [root], [7])
    elif problem == "bad toml":
        config.write_text("client_user = \n")
    elif problem == "symlinked root":
        (workdir / "link").symlink_to(root)
        write_config(config, "root", [workdir / "link"], [7])
    elif problem == "missing root":
        write_config(config, "root", [workdir / "missing"], [7])
    elif problem == "bad major":
        write_config(config, "root", [root], [-1])
    elif problem == "diskless not bool":
        config.write_text(config.read_text() + 'root_without_block_device = "yes"\n')
    elif problem == "bad landlock":
        config.write_text(config.read_text() + 'landlock = "off"\n')
    result = run_broker(config, workdir / "broker.sock")
    assert result.returncode == 2, result.stderr
    assert "event=startup_failed" in result.stderr
    assert not (workdir / "broker.sock").exists()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other uids can traverse (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="blockbroker-test-"))
    d.chmod(0o711)
    (d / "root").mkdir()
    yield d
    shutil.rmtree(d)


@pytest.mark.parametrize("client_user", ["nobody", NOBODY, str(NOBODY)])
def test_socket_owned_by_the_client_user(shared_dir: Path, client_user: str | int) -> None:
    config = write_config(shared_dir / "broker.toml", client_user, [shared_dir / "root"], [7])
    broker = start_broker(config, shared_dir / "broker.sock", shared_dir / "root")
    try:
        st = (shared_dir / "broker.sock").stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == NOBODY
        # root can connect (it bypasses the mode) but its uid is not the client's: rejected
        sock = broker.raw()
        frame = encode_request(Request(RequestKind.LOOP_FILE, path=b"/x"))
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            sock.sendmsg([frame])
            if sock.recv(4096) == b"":
                raise ConnectionResetError
        sock.close()
        assert broker.wait_log("event=peer_rejected pid=") and broker.wait_log("uid=0")
        # the client user itself is served
        image = make_image(shared_dir / "root" / "nobody.img")
        assert child_loop_file(broker, str(image), NOBODY) == "ok"
    finally:
        stop_broker(broker)


def child_loop_file(broker: Broker, path: str, uid: int) -> str:
    """A child process running as `uid` asks for a loop device; prints ok or the error."""
    script = (
        f"import os, sys\nsys.path.insert(0, {str(TESTS_DIR)!r})\n"
        "from harness.brokerclient import BrokerClient, BrokerError\n"
        f"c = BrokerClient({str(broker.socket_path)!r})\n"
        "try:\n"
        f"    fd, ident = c.loop_file({path!r}, writable=False)\n"
        "    print('ok')\n"
        "except BrokerError as e:\n"
        "    print(e.code.name)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], user=uid, capture_output=True, text=True, timeout=30,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_other_uid_is_rejected_by_peercred(shared_dir: Path) -> None:
    config = write_config(shared_dir / "broker.toml", "root", [shared_dir / "root"], [7])
    broker = start_broker(config, shared_dir / "broker.sock", shared_dir / "root")
    try:
        image = make_image(shared_dir / "root" / "a.img")
        keep = broker.raw()  # the current client's connection must survive the intruder
        os.chmod(shared_dir / "broker.sock", 0o666)  # let the file mode pass; SO_PEERCRED stays
        assert child_loop_file(broker, str(image), NOBODY) == "UNAVAILABLE"
        assert broker.wait_log(f"uid={NOBODY} expected_uid=0")
        keep.sendmsg([encode_request(Request(RequestKind.LOOP_FILE, path=b"/nope"))])
        reply = parse_reply(keep.recv(4096))
        assert reply.code == protocol.ErrorCode.OUTSIDE_ROOTS
        keep.close()
        broker.assert_serves()
    finally:
        stop_broker(broker)


def test_socket_activation(workdir: Path) -> None:
    root = workdir / "root"
    config = write_config(workdir / "broker.toml", "root", [root], [7])
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    path = workdir / "activated.sock"
    listener.bind(str(path))
    listener.listen(4)
    fd = listener.fileno()
    shell = f'exec 3<&{fd} {fd}<&-; export LISTEN_FDS=1 LISTEN_PID=$$; exec "$0" --config "$1"'
    proc = subprocess.Popen(
        ["bash", "-c", shell, str(BROKER_BIN), str(config)],  # bash: dash stops at fd 9
        pass_fds=[fd],
        stderr=subprocess.PIPE,
    )
    listener.close()
    broker = Broker(proc, path, root)
    try:
        broker.assert_serves()
        assert int(broker.status("Seccomp")) == 2
    finally:
        stop_broker(broker)
        assert proc.stderr is not None
        proc.stderr.close()


def test_without_socket_or_activation_refuses(workdir: Path) -> None:
    config = write_config(workdir / "broker.toml", "root", [workdir / "root"], [7])
    result = subprocess.run(
        [str(BROKER_BIN), "--config", str(config)], capture_output=True, text=True, timeout=30,
        check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "LISTEN_FDS" in result.stderr


def test_root_on_no_block_device_fails_closed(workdir: Path) -> None:
    """A btrfs/ZFS/overlay/9p root has no block device behind stat("/"): the root disk cannot
    be protected by number, so the broker refuses to start unless the config says so."""
    config = load_config(str(write_config(workdir / "broker.toml", "root", [workdir], [7])))
    with pytest.raises(ConfigError, match="root_without_block_device"):
        check_fail_closed(config, frozenset(), 7)
    check_fail_closed(config, frozenset({os.makedev(8, 0)}), 7)  # a root disk was found
    (workdir / "broker.toml").write_text(
        (workdir / "broker.toml").read_text() + "root_without_block_device = true\n"
    )
    check_fail_closed(load_config(str(workdir / "broker.toml")), frozenset(), 7)
