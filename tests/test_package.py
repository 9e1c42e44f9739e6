"""`make deb` builds a Debian package that lintian accepts without errors, whose files, conffiles
and maintainer scripts are what docs/packaging.md says, and whose private venv imports every
module from the extracted tree. Installing it under a real systemd is the Xen lab's job.

Test code, runs as root (apt-get for the build dependencies, dpkg-buildpackage). The build takes
about 40 s; BLOCKBROKER_DEB=path/to/blockbroker_*.deb checks an existing package instead."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parent.parent
VENV = "/usr/lib/blockbroker/venv"
# The venv's interpreter: the build machine's python3 (debian/rules), e.g. python3.11.
PYTHON = Path(os.path.realpath("/usr/bin/python3")).name


def project_version() -> str:
    version: str = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return version


@pytest.fixture(scope="module")
def deb() -> Path:
    given = os.environ.get("BLOCKBROKER_DEB")
    if given:
        return Path(given)
    subprocess.run(["make", "-s", "-C", str(REPO), "deb"], check=True, capture_output=True)
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], check=True, capture_output=True, text=True
    ).stdout.strip()
    path = REPO / "dist/deb" / f"blockbroker_{project_version()}_{arch}.deb"
    assert path.is_file(), "make deb did not produce blockbroker_<version>_<arch>.deb"
    return path


@pytest.fixture(scope="module")
def control(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("control")
    subprocess.run(["dpkg-deb", "-e", str(deb), str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def contents(deb: Path) -> dict[str, str]:
    """Path -> `dpkg -c` line (mode, owner, size, date, path[, -> target])."""
    listing = subprocess.run(["dpkg", "-c", str(deb)], check=True, capture_output=True, text=True)
    entries = {}
    for line in listing.stdout.splitlines():
        path = line.split(None, 5)[5].split(" -> ")[0]
        entries[path.removeprefix(".").rstrip("/") or "/"] = line
    return entries


def test_changelog_version_is_the_projects() -> None:
    changelog = (REPO / "debian/changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"blockbroker ({project_version()})")


def test_files_are_where_docs_say(contents: dict[str, str]) -> None:
    expected_files = {
        "/usr/libexec/blockbroker/blockbroker-block": "-rwxr-xr-x",
        f"{VENV}/bin/blockbroker": "-rwxr-xr-x",
        f"{VENV}/pyvenv.cfg": "-rw-r--r--",
        "/etc/blockbroker/broker.toml": "-rw-r--r--",
        "/etc/blockbroker/policy.d/50-default.policy": "-rw-r--r--",
        "/lib/systemd/system/blockbroker-broker.service": "-rw-r--r--",
        "/lib/systemd/system/blockbroker-broker.socket": "-rw-r--r--",
        "/lib/systemd/system/blockbroker-policyd.service": "-rw-r--r--",
        "/usr/lib/sysusers.d/blockbroker.conf": "-rw-r--r--",
        "/usr/lib/tmpfiles.d/blockbroker.conf": "-rw-r--r--",
        "/usr/share/dbus-1/system.d/org.qubes.BlockBroker1.conf": "-rw-r--r--",
        "/usr/share/dbus-1/system-services/org.qubes.BlockBroker1.service": "-rw-r--r--",
        "/usr/share/dbus-1/interfaces/org.qubes.BlockBroker1.Manager.xml": "-rw-r--r--",
        "/usr/share/dbus-1/interfaces/org.qubes.BlockBroker1.Export.xml": "-rw-r--r--",
        "/usr/share/dbus-1/interfaces/org.qubes.BlockBroker1.Request.xml": "-rw-r--r--",
        "/usr/share/polkit-1/actions/org.qubes.blockbroker.policy": "-rw-r--r--",
        "/etc/qubes-rpc/blockbroker.RequestExport": "-rwxr-xr-x",
        "/etc/qubes/policy.d/50-blockbroker.policy": "-rw-r--r--",
        "/usr/share/man/man1/blockbroker.1.gz": "-rw-r--r--",
        "/usr/share/man/man5/blockbroker.policy.5.gz": "-rw-r--r--",
        "/usr/share/man/man8/blockbroker-block.8.gz": "-rw-r--r--",
        "/usr/share/man/man8/blockbroker-broker.8.gz": "-rw-r--r--",
        "/usr/share/man/man8/blockbroker-policyd.8.gz": "-rw-r--r--",
        "/usr/share/doc/blockbroker/packaging.md": "-rw-r--r--",
        "/usr/share/doc/blockbroker/copyright": "-rw-r--r--",
        "/var/lib/blockbroker/images": "drwxr-x---",
    }
    for path, mode in expected_files.items():
        assert path in contents, path
        assert contents[path].startswith(mode), contents[path]
        assert " root/root " in contents[path], contents[path]
    expected_links = {
        "/usr/bin/blockbroker": "../lib/blockbroker/venv/bin/blockbroker",
        "/usr/sbin/blockbroker-broker": "../lib/blockbroker/venv/bin/blockbroker-broker",
        "/usr/sbin/blockbroker-policyd": "../lib/blockbroker/venv/bin/blockbroker-policyd",
        "/usr/libexec/blockbroker/blockbroker-qrexec-bridge": (
            "../../lib/blockbroker/venv/bin/blockbroker-qrexec-bridge"
        ),
        "/etc/xen/scripts/blockbroker-block": "/usr/libexec/blockbroker/blockbroker-block",
    }
    for path, target in expected_links.items():
        assert contents[path].endswith(f" -> {target}"), contents[path]
    # Debian ships no bytecode (postinst compiles it), no pip, no activate scripts.
    assert not [p for p in contents if "__pycache__" in p or p.endswith(".pyc")]
    assert not [p for p in contents if "/site-packages/pip/" in p or "/bin/activate" in p]


def test_conffiles_are_the_configuration(control: Path) -> None:
    assert sorted((control / "conffiles").read_text().split()) == [
        "/etc/blockbroker/broker.toml",
        "/etc/blockbroker/policy.d/50-default.policy",
        "/etc/qubes-rpc/blockbroker.RequestExport",
        "/etc/qubes/policy.d/50-blockbroker.policy",
    ]


def test_depends_on_the_venvs_interpreter(control: Path) -> None:
    fields = (control / "control").read_text()
    depends = re.search(r"^Depends: (.*)$", fields, re.M)
    assert depends is not None
    names = {part.strip().split()[0] for part in depends.group(1).split(",")}
    assert {PYTHON, "libseccomp2", "polkitd", "libcap2"} <= names, names


def test_maintainer_scripts(control: Path) -> None:
    postinst = (control / "postinst").read_text()
    # users and groups before /run/blockbroker (group blockbroker), then the units
    sysusers = postinst.index("systemd-sysusers")
    assert sysusers < postinst.index("systemd-tmpfiles") < postinst.index("deb-systemd-helper")
    assert "deb-systemd-helper enable 'blockbroker-broker.socket'" in postinst
    # install starts the socket; upgrade restarts it and try-restarts policyd (no stop + start)
    assert "deb-systemd-invoke $_dh_action 'blockbroker-broker.socket'" in postinst
    assert "_dh_action=restart" in postinst
    assert re.search(r"deb-systemd-invoke try-restart .*'blockbroker-policyd.service'", postinst)
    # policyd and the broker's service are not enabled (D-Bus and socket activation)
    assert "deb-systemd-helper debian-installed 'blockbroker-policyd.service'" in postinst
    assert "deb-systemd-helper debian-installed 'blockbroker-broker.service'" in postinst
    # no preinst stopping units before an upgrade (that would flush policyd's fd store)
    assert not (control / "preinst").exists() or "stop" not in (control / "preinst").read_text()
    prerm = (control / "prerm").read_text()
    assert "refusing to remove" in prerm and "blockbroker-export" in prerm
    # policyd is stopped only in the `remove` branch, after the export check
    assert prerm.index("exports_in_use)") < prerm.index("stop blockbroker-policyd.service")
    postrm = (control / "postrm").read_text()
    purge = postrm[postrm.index("purge)") :]
    assert "userdel blockbroker" in purge and "groupdel" in purge
    assert "deb-systemd-helper purge" in postrm
    for script in ("postinst", "prerm", "postrm"):
        subprocess.run(["sh", "-n", str(control / script)], check=True)


def test_extracted_tree_is_relocated_and_imports(
    deb: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    venv = root / VENV.lstrip("/")
    for script in ("blockbroker", "blockbroker-broker", "blockbroker-policyd"):
        assert (venv / "bin" / script).read_text().splitlines()[0] == f"#!{VENV}/bin/python"
    assert f"command = /usr/bin/{PYTHON} -m venv {VENV}" in (venv / "pyvenv.cfg").read_text()
    # Nothing names the build directory; no unit, activation or qrexec file the developer
    # install (the docs describe both, so they are not searched for /opt).
    leftovers = subprocess.run(["grep", "-rlI", "/dist/deb/", str(root)], capture_output=True)
    assert leftovers.stdout == b"", leftovers.stdout
    system_files = [str(root / d) for d in ("etc", "lib/systemd", "usr/share/dbus-1")]
    opt = subprocess.run(["grep", "-rlI", "/opt/blockbroker", *system_files], capture_output=True)
    assert opt.stdout == b"", opt.stdout
    # The venv's python is a relative link to /usr/bin/python3.X: give the scratch root one.
    (root / "usr/bin" / PYTHON).symlink_to(f"/usr/bin/{PYTHON}")
    modules = (
        "broker.main, policyd.main, client.cli, client.bridge, dbus_fast, pyxs, prctl, pyseccomp"
    )
    subprocess.run([str(venv / "bin/python"), "-c", f"import {modules}"], check=True)
    units = (root / "lib/systemd/system/blockbroker-policyd.service").read_text()
    assert "ExecStart=/usr/sbin/blockbroker-policyd " in units
    block = root / "usr/libexec/blockbroker/blockbroker-block"
    usage = subprocess.run([str(block)], capture_output=True, env={})
    assert usage.returncode == 2


def test_man_pages_render(deb: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    for page in sorted((tmp_path / "usr/share/man").glob("man*/*.gz")):
        text = subprocess.run(
            ["man", "--warnings", "-l", str(page)],
            capture_output=True,
            text=True,
            env={**os.environ, "MANWIDTH": "80"},
        )
        assert text.returncode == 0 and "NAME" in text.stdout, page
        assert text.stderr == "", (page, text.stderr)


def test_lintian_has_no_errors(deb: Path) -> None:
    result = subprocess.run(
        ["lintian", "--fail-on", "error", str(deb)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tags = {line.split()[2] for line in result.stdout.splitlines() if line.startswith("W: ")}
    # each warning is justified in docs/packaging.md; a new one must be added there
    documented = (REPO / "docs/packaging.md").read_text()
    assert all(f"`{tag}`" in documented for tag in tags), tags


@pytest.mark.parametrize("version", ["1.0-1", "next", "1.0 x", "1.0;true"])
def test_deb_version_must_be_a_native_version(version: str) -> None:
    """DEB_VERSION (a test build's version, e.g. the lab's upgrade) is checked before anything is
    built: a Debian revision or anything not a native version is refused."""
    result = subprocess.run(
        ["make", "-s", "-C", str(REPO), "deb", f"DEB_VERSION={version}", "DEB_DIR=/nonexistent"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode != 0
    assert "DEB_VERSION must be a native package version" in result.stdout + result.stderr
    assert not Path("/nonexistent").exists()
