"""Download the wheels the GPU machine lacks into .whl/ (cp312, manylinux x86_64): see scripts/gpu/wheels.sh.

The missing set is computed, not listed: start from pyproject's [project] dependencies, drop the packages the
machine's image already holds (scripts/gpu/present.txt, from the device notes), download each remaining one with
``pip download --no-deps`` (a pure-Python package with no wheel is built into one with ``pip wheel``), pinned to
the version installed in the Python running this script when it has one (the versions the test suite runs
against), read its Requires-Dist (markers evaluated for CPython 3.12 on
Linux x86_64, extras skipped) and walk on. Prints each wheel and the total; exits 1 above the size limit.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
MORE_PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (24, 31, 34, 35, 5, 12, 39)]
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "extra": ""}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return norm(re.split(r"[\s\[<>=!~;(]", req.strip(), maxsplit=1)[0])


def marker_ok(req: str) -> bool:
    if ";" not in req:
        return True
    marker = req.split(";", 1)[1]
    if "extra" in marker:
        return False
    try:
        from packaging.markers import Marker
    except ImportError:  # no packaging here: keep the requirement (an extra wheel costs only space)
        return True
    return Marker(marker).evaluate(ENV)


def download(name: str, dest: Path) -> Path:
    try:
        spec = f"{name}=={metadata.version(name)}"
    except metadata.PackageNotFoundError:
        spec = name
    before = set(dest.glob("*.whl"))
    base = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
            "3.12", "--implementation", "cp", "-d", str(dest)]
    for platforms in (PLATFORMS, PLATFORMS + MORE_PLATFORMS):
        cmd = base + [a for p in platforms for a in ("--platform", p)] + [spec]
        if subprocess.run(cmd, capture_output=True, text=True).returncode == 0:
            new = set(dest.glob("*.whl")) - before
            found = new or {w for w in dest.glob("*.whl") if norm(w.name.split("-")[0]) == norm(name)}
            return sorted(found)[0]
    # no wheel at all (a pure-Python sdist, e.g. prefetch_generator): build one here, if it is platform-free
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), spec],
                           capture_output=True, text=True)
    new = [w for w in set(dest.glob("*.whl")) - before if w.name.endswith("-none-any.whl")]
    if built.returncode == 0 and new:
        return new[0]
    raise SystemExit(f"no cp312 manylinux x86_64 wheel of {spec}: {built.stderr.strip()[-300:]}")


def requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    return [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dest", default=str(ROOT / ".whl"))
    parser.add_argument("--limit-mib", type=float, default=60.0)
    args = parser.parse_args()
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    present = {norm(line) for line in (ROOT / "scripts/gpu/present.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    queue = [requirement_name(d) for d in deps if marker_ok(d)]
    seen: set[str] = set()
    while queue:
        name = queue.pop(0)
        if name in seen or name in present:
            continue
        seen.add(name)
        wheel = download(name, dest)
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
        queue += [requirement_name(r) for r in requires(wheel) if marker_ok(r)]
    total = sum(w.stat().st_size for w in dest.glob("*.whl"))
    count = len(list(dest.glob("*.whl")))
    print(f"{total / 2**20:7.2f} MiB  total in {dest} ({count} wheels; limit {args.limit_mib} MiB)")
    return 0 if total <= args.limit_mib * 2**20 else 1


if __name__ == "__main__":
    sys.exit(main())
