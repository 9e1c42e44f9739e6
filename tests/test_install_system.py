"""`make install-system` stages every system file where a Debian/Qubes dom0 expects it, with
safe modes, and the staged broker config is one the broker itself accepts."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from broker.config import load_config

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parent.parent

EXPECTED = {
    "etc/blockbroker/broker.toml": 0o644,
    "etc/blockbroker/policy.d/50-default.policy": 0o644,
    "usr/share/dbus-1/system.d/org.qubes.BlockBroker1.conf": 0o644,
    "usr/share/dbus-1/system-services/org.qubes.BlockBroker1.service": 0o644,
    "usr/share/dbus-1/interfaces/org.qubes.BlockBroker1.Manager.xml": 0o644,
    "lib/systemd/system/blockbroker-broker.service": 0o644,
    "lib/systemd/system/blockbroker-broker.socket": 0o644,
    "lib/systemd/system/blockbroker-policyd.service": 0o644,
    "usr/share/polkit-1/actions/org.qubes.blockbroker.policy": 0o644,
    "etc/qubes-rpc/blockbroker.RequestExport": 0o755,
    "etc/qubes/policy.d/50-blockbroker.policy": 0o644,
    "var/lib/blockbroker/images": 0o750,
    "usr/share/applications/org.qubes.BlockBrokerGtk.desktop": 0o644,
    "usr/share/icons/hicolor/scalable/apps/org.qubes.BlockBrokerGtk.svg": 0o644,
}


def test_install_system_stages_every_file(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    subprocess.run(
        ["make", "-s", "-C", str(REPO), "install-system", f"DESTDIR={dest}"],
        check=True,
        capture_output=True,
    )
    for relative, mode in EXPECTED.items():
        st = (dest / relative).lstat()
        assert stat.S_IMODE(st.st_mode) == mode, relative
        assert st.st_uid == 0, relative
    for link in (
        "usr/bin/blockbroker",
        "usr/bin/blockbroker-block",
        "usr/bin/blockbroker-gtk",
        "etc/xen/scripts/blockbroker-block",
    ):
        target = os.readlink(dest / link)
        assert Path(target).is_absolute() and os.access(target, os.X_OK), link
    # The staged config is one the broker accepts, once its roots are the staged ones.
    staged = (dest / "etc/blockbroker/broker.toml").read_text()
    images = "/var/lib/blockbroker/images"
    assert f'file_roots = ["{images}"]' in staged
    copy = tmp_path / "broker.toml"
    copy.write_text(staged.replace(images, str(dest) + images))
    copy.chmod(0o644)
    config = load_config(str(copy))
    assert config.block_majors == {7, 8, 253, 259}
    assert config.file_roots == (str(dest) + images,)
