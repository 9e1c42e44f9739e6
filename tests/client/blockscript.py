"""blockbroker-block test helpers: where the installed binary lives (tests exercise the installed
copy), a sanitizer build of the repo's source, and FakeBus, a hostile stand-in for dbus-daemon.

Test code. FakeBus exists only because the real dbus-daemon never sends malformed replies;
everything that a real bus can do is tested against the real stack (test_blockscript_stack.py).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import pytest

VENV = Path(os.environ.get("BLOCKBROKER_VENV", "/opt/blockbroker/venv"))
BLOCK_SCRIPT = VENV / "bin" / "blockbroker-block"
REPO = Path(__file__).resolve().parents[2]
SOURCE = Path("src/client/blockbroker-block.c")  # relative to REPO, as the Makefile builds it
SANITIZER_TIMEOUT_MS = 1500  # the sanitizer build's reply deadline (the shipped one is 8000)
# and its deadline while policyd is being activated (the shipped one is 30000)
SANITIZER_ACTIVATION_TIMEOUT_MS = 3000
SANITIZER_ENV = {
    "ASAN_OPTIONS": "exitcode=86:abort_on_error=0:detect_leaks=1",
    "UBSAN_OPTIONS": "halt_on_error=1:exitcode=87:print_stacktrace=1",
}
SANITIZER_REPORT = re.compile(r"AddressSanitizer|LeakSanitizer|runtime error:|UndefinedBehavior")


def in_ci() -> bool:
    """tests/conftest.py's rule: under CI a lane that cannot run fails instead of skipping."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def makefile_cflags() -> list[str]:
    """BLOCK_SCRIPT_CFLAGS from the Makefile: the flags `make install` builds with."""
    match = re.search(r"^BLOCK_SCRIPT_CFLAGS := (.*)$", (REPO / "Makefile").read_text(), re.M)
    assert match, "Makefile has no BLOCK_SCRIPT_CFLAGS"
    return match.group(1).split()


def gcc_or_skip() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        message = "gcc is not installed (make deps installs it)"
        if in_ci():
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    return gcc


def build(out: Path, flags: list[str]) -> Path:
    """Compiles the repo's blockbroker-block.c with gcc and `flags` into `out`."""
    cmd = [gcc_or_skip(), *flags, "-o", str(out), str(SOURCE)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stderr}"
    return out


def build_sanitized(directory: Path) -> Path:
    """ASan + UBSan build (dynamic: ASan cannot be static), with a short reply deadline."""
    return build(
        directory / "blockbroker-block-asan",
        [
            "-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all", "-Wall", "-Wextra", "-Werror",
            f"-DREPLY_TIMEOUT_MS={SANITIZER_TIMEOUT_MS}",
            f"-DACTIVATION_TIMEOUT_MS={SANITIZER_ACTIVATION_TIMEOUT_MS}",
        ],
    )  # fmt: skip


# --- the D-Bus wire format, as much as the fake bus needs ------------------------------------


def _pad(buf: bytearray, align: int) -> None:
    buf.extend(b"\0" * (-len(buf) % align))


def _value(buf: bytearray, vtype: str, value: int | bytes, order: str) -> None:
    if vtype == "u":
        assert isinstance(value, int)
        _pad(buf, 4)
        buf.extend(struct.pack(order + "I", value))
    elif vtype in "so":
        assert isinstance(value, bytes)
        _pad(buf, 4)
        buf.extend(struct.pack(order + "I", len(value)) + value + b"\0")
    else:  # g
        assert isinstance(value, bytes)
        buf.extend(bytes([len(value)]) + value + b"\0")


Field = tuple[int, str, int | bytes]  # (code, type, value)


def marshal(
    msg_type: int,
    fields: list[Field],
    body: bytes = b"",
    *,
    big: bool = False,
    serial: int = 1000,
) -> bytes:
    """One message; `body` is raw bytes placed at the 8-aligned body offset."""
    order = ">" if big else "<"
    buf = bytearray(b"B" if big else b"l")
    buf.extend(bytes([msg_type, 0, 1]))
    buf.extend(struct.pack(order + "III", len(body), serial, 0))
    for code, vtype, value in fields:
        _pad(buf, 8)
        buf.extend(bytes([code, 1, ord(vtype), 0]))
        _value(buf, vtype, value, order)
    struct.pack_into(order + "I", buf, 12, len(buf) - 16)
    _pad(buf, 8)
    return bytes(buf) + body


def string_body(text: bytes, *, big: bool = False) -> bytes:
    return struct.pack((">" if big else "<") + "I", len(text)) + text + b"\0"


def error_reply(
    name: bytes, text: bytes, *, reply_serial: int = 2, big: bool = False, serial: int = 1000
) -> bytes:
    fields: list[Field] = [
        (4, "s", name), (5, "u", reply_serial), (6, "s", b":1.7"), (8, "g", b"s"),
        (7, "s", b":1.0"),
    ]  # fmt: skip
    return marshal(3, fields, string_body(text, big=big), big=big, serial=serial)


def method_return(*, reply_serial: int = 2, big: bool = False) -> bytes:
    return marshal(2, [(5, "u", reply_serial), (6, "s", b":1.7"), (7, "s", b":1.0")], big=big)


def name_acquired(serial: int = 2) -> bytes:
    fields: list[Field] = [
        (1, "o", b"/org/freedesktop/DBus"), (2, "s", b"org.freedesktop.DBus"),
        (3, "s", b"NameAcquired"), (6, "s", b":1.7"), (7, "s", b"org.freedesktop.DBus"),
        (8, "g", b"s"),
    ]  # fmt: skip
    return marshal(4, fields, string_body(b":1.7"), serial=serial)


@dataclass
class Call:
    """A method call the client sent, decoded (little-endian, as the client writes them)."""

    serial: int
    fields: dict[int, int | bytes]
    body: bytes


def _decode(buf: bytes) -> tuple[Call, int] | None:
    """The first message in buf and its size, or None while incomplete."""
    if len(buf) < 16:
        return None
    assert buf[0:1] == b"l" and buf[3] == 1, buf[:16]
    body_len, serial, fields_len = struct.unpack_from("<III", buf, 4)
    end = 16 + fields_len
    body_at = end + (-end % 8)
    if len(buf) < body_at + body_len:
        return None
    fields: dict[int, int | bytes] = {}
    at = 16
    while at < end:
        at += -at % 8
        code, _, vtype = buf[at], buf[at + 1], chr(buf[at + 2])
        at += 4
        if vtype == "u":
            at += -at % 4
            fields[code] = struct.unpack_from("<I", buf, at)[0]
            at += 4
        elif vtype in "so":
            at += -at % 4
            (n,) = struct.unpack_from("<I", buf, at)
            fields[code] = buf[at + 4 : at + 4 + n]
            at += 4 + n + 1
        else:
            n = buf[at]
            fields[code] = buf[at + 1 : at + 1 + n]
            at += 1 + n + 1
    return Call(serial, fields, buf[body_at : body_at + body_len]), body_at + body_len


class OneConnection:
    """What both stand-ins share: listen at `path`, serve one client connection on a thread
    (`_exchange`), with 20 s bounds; __exit__ joins it and raises what it raised."""

    path: Path
    error: BaseException | None

    def _listen(self, kind: int, address: str) -> None:
        self._listener = socket.socket(socket.AF_UNIX, kind)
        self._listener.bind(address)
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(timeout=30)
        self._listener.close()
        self.path.unlink(missing_ok=True)
        if self.error is not None:
            raise self.error

    def _serve(self) -> None:
        try:
            self._listener.settimeout(20)
            conn, _ = self._listener.accept()
            conn.settimeout(20)
            with conn:
                self._exchange(conn)
        except BaseException as e:  # reported by __exit__
            self.error = e

    def _exchange(self, conn: socket.socket) -> None:
        raise NotImplementedError


@dataclass
class FakeBus(OneConnection):
    """A stand-in for dbus-daemon, for one client connection, used only because the real
    dbus-daemon never sends malformed replies: it reads the client's AUTH line, answers `auth`
    (closing unless that starts with OK), then reads BEGIN and the three method calls (Hello,
    Attach/Detach, GetNameOwner) into `calls`, sends `replies`, and then closes (`hold=False`)
    or stays silent until the client hangs up (`hold=True`). Listens on `path`, or on the
    abstract socket name `abstract` if that is given."""

    path: Path
    replies: bytes = b""
    auth: bytes = b"OK 0123456789abcdef0123456789abcdef\r\n"
    hold: bool = False
    abstract: str | None = None
    calls: list[Call] = field(default_factory=list)
    auth_line: bytes = b""
    received_after: bytes = b""  # what the client sent after the calls (hold=True)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._listen(socket.SOCK_STREAM, "\0" + self.abstract if self.abstract else str(self.path))

    @property
    def address(self) -> str:
        return f"unix:abstract={self.abstract}" if self.abstract else f"unix:path={self.path}"

    def _exchange(self, conn: socket.socket) -> None:
        buf = b""
        while b"\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        self.auth_line, _, buf = buf.partition(b"\r\n")
        conn.sendall(self.auth)
        if not self.auth.startswith(b"OK"):
            return
        while len(buf) < len(b"BEGIN\r\n"):
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        assert buf.startswith(b"BEGIN\r\n"), buf[:40]
        buf = buf[len(b"BEGIN\r\n") :]
        while len(self.calls) < 3:
            decoded = _decode(buf)
            if decoded is None:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
                continue
            call, size = decoded
            self.calls.append(call)
            buf = buf[size:]
        try:
            conn.sendall(self.replies)
        except (BrokenPipeError, ConnectionResetError):
            return  # the client gave up first (a limit it enforces); its exit status says why
        if self.hold:
            while chunk := conn.recv(65536):
                self.received_after += chunk


@dataclass
class FakeBlockSocket(OneConnection):
    """A stand-in for policyd's block socket (SOCK_SEQPACKET), for one client connection, used
    only because policyd never sends malformed replies: it reads the request packet into
    `request`, sends `reply` as one packet (None: sends nothing, `close`: closes at once), then
    stays silent until the client hangs up (`hold=True`) or closes."""

    path: Path
    reply: bytes | None = b"BB1 ok"
    hold: bool = False
    close: bool = False
    request: bytes | None = None
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._listen(socket.SOCK_SEQPACKET, str(self.path))

    def _exchange(self, conn: socket.socket) -> None:
        if self.close:
            return
        self.request = conn.recv(65536)
        if self.reply is not None:
            big = max(len(self.reply) + 4096, 1 << 16)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, big)
            conn.send(self.reply)
        if self.hold:
            while conn.recv(65536):
                pass


def run_script(
    binary: Path,
    command: str,
    bus_address: str,
    xenbus_path: str = "backend/vbd/1/51712",
    *,
    extra_env: dict[str, str] | None = None,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    """Runs the script like libxl against `bus_address`; XenStore points nowhere, so a failing
    add's xenstore-exists fails and nothing is written anywhere."""
    env = {
        "PATH": "/usr/bin:/bin",
        "XENBUS_PATH": xenbus_path,
        "XENBUS_TYPE": "vbd",
        "XENBUS_BASE_PATH": "backend",
        "DBUS_SYSTEM_BUS_ADDRESS": bus_address,
        "XENSTORED_PATH": "/nonexistent/xenstored-socket",
        # no block socket unless a test gives one (FakeBlockSocket): the script falls back to
        # the bus, and never reaches a system policyd's socket
        "BLOCKBROKER_BLOCK_SOCKET": "/nonexistent/blockbroker-policyd/block.sock",
        **SANITIZER_ENV,
        **(extra_env or {}),
    }
    return subprocess.run(
        [str(binary), command],
        env=env,
        capture_output=True,
        text=True,
        errors="backslashreplace",
        check=False,
        timeout=timeout,
    )
