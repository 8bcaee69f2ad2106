"""`annstream run` with kill -9 points that the fault bench arms from outside.

    python -m annstream.testing.crash_points --kill-file PATH run --config FILE

runs the ordinary CLI after wrapping three places of the service; each one, when reached,
checks `PATH`. A file holding `POINT N` counts down at every hit of POINT and at zero is
removed, a line `crash point POINT reached` is printed, and the process SIGKILLs itself:
- `store_written`: a sink write stored lists, before the changelog and the offset commit;
- `snapshot`: a part of an index snapshot was written to its temporary file (a torn write);
- `restore`: one engagement partition's head state was restored, others may still be due.
Nothing changes when the file is absent, so one launcher serves every run of a fault bench.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

__all__ = ["POINTS", "arm", "main"]

POINTS = ("store_written", "snapshot", "restore")
REACHED = "crash point {} reached"


def arm(kill_file: Path, point: str, hits: int = 1) -> None:
    """Kill the service at the `hits`-th time it reaches `point` from now on."""
    if point not in POINTS or hits < 1:
        raise ValueError(f"point must be one of {POINTS} and hits >= 1, got {point!r} {hits}")
    tmp = kill_file.with_suffix(".tmp")
    tmp.write_text(f"{point} {hits}\n")
    os.replace(tmp, kill_file)


def _hit(kill_file: Path, point: str) -> None:
    try:
        armed, count = kill_file.read_text().split()
    except (OSError, ValueError):
        return
    if armed != point:
        return
    left = int(count) - 1
    if left > 0:
        kill_file.write_text(f"{point} {left}\n")
        return
    kill_file.unlink(missing_ok=True)
    print(REACHED.format(point), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _install(kill_file: Path) -> None:
    import annstream.snapshot as snapshot
    from annstream.sink import NeighbourSink
    from consumers.head_state import HeadStateLog

    write = NeighbourSink.write

    def write_then_maybe_die(self: NeighbourSink, *args: Any, **kwargs: Any) -> Any:
        result = write(self, *args, **kwargs)
        if result.stored.any():
            _hit(kill_file, "store_written")
        return result

    restore = HeadStateLog.restore

    def restore_then_maybe_die(self: HeadStateLog, *args: Any, **kwargs: Any) -> Any:
        out = restore(self, *args, **kwargs)
        _hit(kill_file, "restore")
        return out

    class _TornFile:
        def __init__(self, f: Any) -> None:
            self._f = f

        def write(self, data: Any) -> int:
            n = int(self._f.write(data))
            self._f.flush()
            _hit(kill_file, "snapshot")
            return n

        def __getattr__(self, name: str) -> Any:
            return getattr(self._f, name)

        def __enter__(self) -> _TornFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self._f.close()

    def open_torn(*args: Any, **kwargs: Any) -> _TornFile:
        return _TornFile(open(*args, **kwargs))

    NeighbourSink.write = write_then_maybe_die  # type: ignore[method-assign]
    HeadStateLog.restore = restore_then_maybe_die  # type: ignore[method-assign]
    snapshot.open = open_torn  # type: ignore[attr-defined]


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--kill-file":
        raise SystemExit("usage: python -m annstream.testing.crash_points --kill-file PATH ...")
    _install(Path(argv[1]))
    from annstream.cli import main as cli

    return cli(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
