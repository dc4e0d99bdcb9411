"""Can a tool's own environment be built on this machine (scripts/setup_*_env.sh)? Standard library only: the
backends that run in one (Collie) and the export (llama.cpp) refuse a run in one line when theirs is missing and
cannot be built here."""

from __future__ import annotations

from typing import Optional


def cannot_build_env() -> Optional[str]:
    """Why a tool's own environment (Collie's, llama.cpp's, the MLflow server's) cannot be built here, or None:
    each needs Python 3.11 and the package index."""
    import os
    import shutil
    import socket
    import subprocess
    from urllib.parse import urlparse

    py = os.environ.get("PYTHON") or shutil.which("python3") or ""
    try:
        version = (
            subprocess.run(
                [py, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
            if py
            else ""
        )
    except OSError:
        version = ""
    if version != "3.11":
        return f"it needs Python 3.11 (set PYTHON=python3.11); {py or 'python3'} is {version or 'missing'}"
    index = os.environ.get("PIP_INDEX_URL") or pip_config("index-url") or "https://pypi.org/simple"
    host = urlparse(index)
    if host.scheme in ("http", "https") and host.hostname:
        try:
            socket.create_connection((host.hostname, host.port or (443 if host.scheme == "https" else 80)), 5).close()
        except OSError as e:
            return f"the package index {host.hostname} is unreachable ({e.strerror or e})"
    return None


def pip_config(key: str) -> Optional[str]:
    import configparser
    import os

    for path in (
        "/etc/pip.conf",
        "/etc/xdg/pip/pip.conf",
        os.path.expanduser("~/.config/pip/pip.conf"),
        os.path.expanduser("~/.pip/pip.conf"),
        os.environ.get("PIP_CONFIG_FILE") or "",
    ):
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
        except configparser.Error:
            continue
        for section in ("install", "global"):
            if parser.has_option(section, key):
                return parser.get(section, key).split()[0]
    return None
