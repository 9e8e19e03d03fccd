"""The wheel installs the twistd plugin (Daphne once shipped without it)."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_the_plugin_and_twistd_finds_it(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", dist, ROOT],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("pushsvc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "pushsvc").rglob("*.py")}
    assert modules - set(names) == set(), "modules missing from the wheel"
    assert "twisted/plugins/pushsvc_plugin.py" in names
    assert "twisted/plugins/__init__.py" not in names
    assert "twisted/__init__.py" not in names

    # A fresh venv that sees nothing of this interpreter's site-packages.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", wheel], check=True, cwd=tmp_path)
    out = subprocess.run(
        [env_dir / "bin" / "twistd", "--help"], check=True, capture_output=True, cwd=tmp_path
    ).stdout.decode()
    assert "push" in out.split()
    # The plugin module must stay import-light: listing plugins does not import the service.
    probe = (
        "import sys; from twisted.plugin import getPlugins; from twisted.application.service "
        "import IServiceMaker; names = [p.tapname for p in getPlugins(IServiceMaker)]; "
        "assert 'push' in names, names; assert 'pushsvc.node' not in sys.modules; print('ok')"
    )
    out = subprocess.run([python, "-c", probe], check=True, capture_output=True, cwd=tmp_path)
    assert out.stdout.strip() == b"ok"
    # Running push imports the whole service from the installed wheel.
    usage = subprocess.run(
        [env_dir / "bin" / "twistd", "push", "--help"], capture_output=True, cwd=tmp_path
    )
    assert usage.returncode == 0 and b"--ws-port" in usage.stdout, usage.stderr[-2000:]
