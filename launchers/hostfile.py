"""DeepSpeed-style hostfiles: one host a line, `hostname slots=N`, `#` comments."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import UserError


class HostfileError(UserError, ValueError):
    pass


def read_hostfile(path: str | Path) -> dict[str, int]:
    """{host: slots} in file order; raises HostfileError naming the bad line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise HostfileError(f"deployment.hostfile={path}: no such file")
    hosts: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = 1
        for part in parts[1:]:
            key, _, value = part.partition("=")
            if key != "slots" or not value.isdigit() or int(value) < 1:
                raise HostfileError(f"deployment.hostfile={path} line {number}: expected 'host slots=N', got {raw!r}")
            slots = int(value)
        if parts[0] in hosts:
            raise HostfileError(f"deployment.hostfile={path} line {number}: host {parts[0]} listed twice")
        hosts[parts[0]] = slots
    if not hosts:
        raise HostfileError(f"deployment.hostfile={path}: no hosts in it")
    return hosts
