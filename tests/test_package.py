"""`make deb` builds two Debian packages, blockbroker and blockbroker-gtk, that lintian accepts
without errors, whose files, conffiles, dependencies and maintainer scripts are what
docs/packaging.md says, and whose private venv imports every module from the extracted tree
(blockbroker-gtk's through the system Python's PyGObject). Installing them under a real systemd
is the Xen lab's job.

Test code, runs as root (apt-get for the build dependencies, dpkg-buildpackage). The build takes
about 50 s; BLOCKBROKER_DEB=path/to/blockbroker_*.deb checks existing packages instead
(blockbroker-gtk_<version>_all.deb next to it)."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path
from xml.etree import ElementTree

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
def gtk_deb(deb: Path) -> Path:
    """blockbroker-gtk (arch all), built by the same `make deb`."""
    path = deb.parent / f"blockbroker-gtk_{project_version()}_all.deb"
    assert path.is_file(), "make deb did not produce blockbroker-gtk_<version>_all.deb"
    return path


def control_fields(deb: Path) -> dict[str, str]:
    """The binary package's control fields (Depends, Recommends...), continuation lines joined."""
    text = subprocess.run(
        ["dpkg-deb", "-f", str(deb)], check=True, capture_output=True, text=True
    ).stdout
    fields: dict[str, str] = {}
    for name, value in re.findall(r"^(\S+): (.*(?:\n .*)*)", text, re.M):
        fields[name] = value
    return fields


def relation_names(field: str) -> set[str]:
    """Package names in a relation field, alternatives included ('a (>= 1) | b, c': a, b, c)."""
    return {alt.strip().split()[0] for part in field.split(",") for alt in part.split("|")}


@pytest.fixture(scope="module")
def control(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("control")
    subprocess.run(["dpkg-deb", "-e", str(deb), str(out)], check=True)
    return out


def listing(deb: Path) -> dict[str, str]:
    """Path -> `dpkg -c` line (mode, owner, size, date, path[, -> target])."""
    text = subprocess.run(["dpkg", "-c", str(deb)], check=True, capture_output=True, text=True)
    entries = {}
    for line in text.stdout.splitlines():
        path = line.split(None, 5)[5].split(" -> ")[0]
        entries[path.removeprefix(".").rstrip("/") or "/"] = line
    return entries


@pytest.fixture(scope="module")
def contents(deb: Path) -> dict[str, str]:
    return listing(deb)


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
        # blockbroker-gtk's code and entry point are in the venv; its package puts it on PATH
        f"{VENV}/bin/blockbroker-gtk": "-rwxr-xr-x",
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


GTK_FILES = {
    "/usr/share/applications/org.qubes.BlockBrokerGtk.desktop": "-rw-r--r--",
    "/usr/share/icons/hicolor/scalable/apps/org.qubes.BlockBrokerGtk.svg": "-rw-r--r--",
    "/usr/share/man/man1/blockbroker-gtk.1.gz": "-rw-r--r--",
    "/usr/share/doc/blockbroker-gtk/copyright": "-rw-r--r--",
}


def test_gtk_package_files(gtk_deb: Path, contents: dict[str, str]) -> None:
    gtk = listing(gtk_deb)
    for path, mode in GTK_FILES.items():
        assert path in gtk, path
        assert gtk[path].startswith(mode) and " root/root " in gtk[path], gtk[path]
    assert gtk["/usr/bin/blockbroker-gtk"].endswith(
        " -> ../lib/blockbroker/venv/bin/blockbroker-gtk"
    )
    # nothing of the venv in it (blockbroker ships the venv), nothing of GTK's in blockbroker
    assert not [p for p in gtk if p.startswith("/usr/lib/")]
    assert not [
        p for p in contents if p.startswith(("/usr/share/applications", "/usr/share/icons"))
    ]
    assert "/usr/bin/blockbroker-gtk" not in contents


def test_gtk_dependencies_stay_out_of_blockbroker(deb: Path, gtk_deb: Path) -> None:
    """A dom0 without a desktop installs blockbroker without GTK; blockbroker-gtk pulls it in."""
    gtk = control_fields(gtk_deb)
    assert gtk["Architecture"] == "all"
    depends = relation_names(gtk["Depends"])
    assert {"blockbroker", "python3-gi", "gir1.2-gtk-4.0", "gir1.2-adw-1"} <= depends, depends
    # arch all on arch any: the same source version (binNMU-safe), not ${binary:Version}
    assert f"blockbroker (= {project_version()})" in gtk["Depends"]
    main = control_fields(deb)
    pulled = relation_names(main["Depends"]) | relation_names(main.get("Recommends", ""))
    assert not {n for n in pulled if "gtk" in n or "gi" in n.split("-") or "adw" in n}, pulled
    assert "blockbroker-gtk" in relation_names(main.get("Suggests", ""))


def test_desktop_entry_and_icon(gtk_deb: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(gtk_deb), str(tmp_path)], check=True)
    entry = tmp_path / "usr/share/applications/org.qubes.BlockBrokerGtk.desktop"
    result = subprocess.run(["desktop-file-validate", str(entry)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr
    text = entry.read_text()
    # named after the app's GApplication id, so shells match the window to the entry and icon
    assert (
        'APP_ID: Final = "org.qubes.BlockBrokerGtk"' in (REPO / "src/client/gtk/app.py").read_text()
    )
    assert "\nExec=blockbroker-gtk\n" in text and "\nIcon=org.qubes.BlockBrokerGtk\n" in text
    icon = tmp_path / "usr/share/icons/hicolor/scalable/apps/org.qubes.BlockBrokerGtk.svg"
    root = ElementTree.parse(icon).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg" and root.get("viewBox") == "0 0 128 128"


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
    # blockbroker-gtk: the venv's entry point runs the system Python (isolated) with the venv
    # appended; --help gets past `import gi` (GTK 4, Adw), which only Debian's python3-gi has.
    assert not list(venv.glob("lib/*/site-packages/gi"))
    gtk = subprocess.run([str(venv / "bin/python"), str(venv / "bin/blockbroker-gtk"), "--help"],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})  # fmt: skip
    assert gtk.returncode == 0 and gtk.stdout.startswith("usage: blockbroker-gtk"), gtk.stderr


def test_man_pages_render(deb: Path, gtk_deb: Path, tmp_path: Path) -> None:
    for package in (deb, gtk_deb):
        subprocess.run(["dpkg-deb", "-x", str(package), str(tmp_path)], check=True)
    pages = sorted((tmp_path / "usr/share/man").glob("man*/*.gz"))
    assert len(pages) == len(list((REPO / "man").glob("*.scd"))), pages
    for page in pages:
        text = subprocess.run(
            ["man", "--warnings", "-l", str(page)],
            capture_output=True,
            text=True,
            env={**os.environ, "MANWIDTH": "80"},
        )
        assert text.returncode == 0 and "NAME" in text.stdout, page
        assert text.stderr == "", (page, text.stderr)


def test_lintian_has_no_errors(deb: Path, gtk_deb: Path) -> None:
    result = subprocess.run(
        ["lintian", "--fail-on", "error", str(deb), str(gtk_deb)], capture_output=True, text=True
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
