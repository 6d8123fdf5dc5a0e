"""What the benchmark scripts share: the library's entry point, the OpenKBP data and its seeded
pairing, the machine description, runs in child processes, and the figures of the tables.

Every script imports this module first; it puts the repository root on ``sys.path`` so that the
library of this checkout is the one imported.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

if TYPE_CHECKING:
    from SAMERegistrationLib import RegistrationResult

# --------------------------------------------------------------------------------------------
# The library: the benchmarks reach it through register() and its RegistrationResult only
# --------------------------------------------------------------------------------------------


def register_case(case: dict[str, Any], **overrides: Any) -> RegistrationResult:
    """``SAMERegistrationLib.register`` on one pair: ``case_files`` (labels scored) or images."""
    from SAMERegistrationLib import register

    return register(
        case["fixed"],
        case["moving"],
        fixed_labels=case.get("fixed_labels"),
        moving_labels=case.get("moving_labels"),
        **overrides,
    )


def library_hash(root: Path = REPO) -> str:
    """A short hash of the library's Python sources, to tell whether runs used the same code."""
    digest = hashlib.sha256()
    for path in sorted((root / "SAMERegistrationLib").rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def parse_overrides(items: Iterable[str], error: Callable[[str], Any]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as configuration overrides (VALUE is JSON, else a string).

    Keys are written with dots (``matching.min_match_share``); ``error`` is ``parser.error``.
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            error(f"--set takes KEY=VALUE, not '{item}'")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        overrides[key.strip().replace("__", ".")] = value
    if overrides:
        from SAMERegistrationLib import RegistrationConfig, SameRegistrationError

        try:  # refuse a typo now rather than in every run
            RegistrationConfig().with_overrides(overrides)
        except SameRegistrationError as err:
            error(f"--set: {err}")
    return overrides


# --------------------------------------------------------------------------------------------
# Data and pairing
# --------------------------------------------------------------------------------------------


def find_openkbp(option: Path | None) -> Path:
    base = option or Path(os.environ.get("SAME_SHARED_DATA") or REPO.parent / "shared" / "data")
    for candidate in (base / "openkbp", base):
        if any(candidate.glob("validation_pt_*_ct.nii.gz")):
            return candidate.resolve()
    sys.exit(
        f"error: no OpenKBP validation scans under {base} (looked for openkbp/validation_pt_*). "
        "Pass --data or set SAME_SHARED_DATA to the shared data folder."
    )


def validation_patients(openkbp: Path) -> list[str]:
    """Validation patients with both a CT and a label map, in numeric order."""
    return split_patients(openkbp, "validation")


def split_patients(openkbp: Path, split: str) -> list[str]:
    """Patients of an OpenKBP split ("train" or "validation") with a CT and a label map, in
    numeric order."""
    names = []
    for ct in openkbp.glob(f"{split}_pt_*_ct.nii.gz"):
        name = ct.name[: -len("_ct.nii.gz")]
        if (openkbp / f"{name}_label.nii.gz").is_file():
            names.append(name)
    return sorted(names, key=lambda n: int(re.findall(r"\d+", n)[-1]))


def draw_pairs(patients: list[str], count: int, seed: int) -> list[tuple[str, str]]:
    """``count`` distinct (fixed, moving) pairs, no self-pairs, drawn with ``seed``.

    All ordered pairs are shuffled once and the first ``count`` taken, so a smaller ``--pairs`` is
    a prefix of a larger one with the same seed.
    """
    ordered = [(f, m) for f in patients for m in patients if f != m]
    if count > len(ordered):
        sys.exit(f"error: --pairs {count} exceeds the {len(ordered)} ordered pairs available")
    random.Random(seed).shuffle(ordered)
    return ordered[:count]


def case_files(openkbp: Path, fixed: str, moving: str) -> dict[str, str]:
    """The CT and label map paths of a (fixed, moving) pair of patients."""
    return {
        "fixed": str(openkbp / f"{fixed}_ct.nii.gz"),
        "moving": str(openkbp / f"{moving}_ct.nii.gz"),
        "fixed_labels": str(openkbp / f"{fixed}_label.nii.gz"),
        "moving_labels": str(openkbp / f"{moving}_label.nii.gz"),
    }


# --------------------------------------------------------------------------------------------
# Machine and results files
# --------------------------------------------------------------------------------------------


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    memory_gb = None
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        cpu = found.group(1).strip() if found else cpu
        meminfo = Path("/proc/meminfo").read_text()
        found = re.search(r"^MemTotal:\s*(\d+) kB", meminfo, re.M)
        memory_gb = round(int(found.group(1)) / 2**20, 1) if found else None
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gb": memory_gb,
        "torch": torch.__version__,
        "torch_threads_parent": torch.get_num_threads(),
        "cuda_available": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "load_average_at_start": list(os.getloadavg()),
        "git": git_info(),
    }


def git_info() -> dict:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    changed = git("status", "--porcelain", "--", "SAMERegistrationLib")
    return {
        "commit": git("rev-parse", "HEAD"),
        "library_modified": None if changed is None else bool(changed),
    }


def machine_line(machine: dict, device: str, devices_used: list[str]) -> str:
    used = ", ".join(sorted(set(filter(None, devices_used)))) or "—"
    line = (
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), "
        f"{machine['memory_gb']} GB RAM; torch {machine['torch']}; --device {device}"
    )
    if devices_used:
        line += f" -> {used}"
    for when in ("start", "end"):
        load = machine.get(f"load_average_at_{when}")
        if load:
            line += f"; load average at {when} {', '.join(f'{x:.2f}' for x in load)}"
    return line


def jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def new_results_prefix(directory: Path, name: str) -> Path:
    """``directory/name-YYYYmmdd-HHMMSS`` (``-2``, ``-3``... when taken), claimed for this run.

    The claim is the prefix's ``.json``, created exclusively: two runs started in the same second
    (e.g. two method groups in parallel) get different files instead of overwriting each other.
    """
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    prefix, attempt = directory / stem, 1
    while True:
        try:
            prefix.with_suffix(".json").open("x").close()
            return prefix
        except FileExistsError:
            attempt += 1
            prefix = directory / f"{stem}-{attempt}"


def save_table_run(directory: Path, name: str, document: dict[str, Any]) -> Path:
    """Write a table script's results as ``directory/name-<time>.json``, with the command line and
    the machine added, and say where."""
    out = new_results_prefix(directory, name).with_suffix(".json")
    write_json(out, {"command": " ".join(sys.argv), "machine": machine_info(), **document})
    print(f"written: {out}")
    return out


def write_json(path: Path, document: Any, indent: int | None = 1) -> None:
    """Write ``document`` to ``path`` whole or not at all (a killed run leaves the old file)."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # one per writing process
    partial.write_text(json.dumps(document, indent=indent, default=jsonable), encoding="utf-8")
    partial.replace(path)


# --------------------------------------------------------------------------------------------
# One run in a fresh child process
# --------------------------------------------------------------------------------------------


def peak_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_as_worker(job_path: str, out_path: str, work: Callable[[dict, dict], None]) -> int:
    """The child's side: ``work(job, out)`` fills ``out``; any exception becomes a failed report.

    The report always holds ``status`` and the process's peak RSS (``maxrss_kb``).
    """
    job = json.loads(Path(job_path).read_text())
    out: dict = {}
    try:
        work(job, out)
        out.setdefault("status", "ok")  # work may say "skipped"
    except Exception as err:  # a failure is a failed row, never a crash of the benchmark
        out["status"] = "failed"
        out.update(error_type=type(err).__name__, error=f"{type(err).__name__}: {err}")
        out["traceback"] = traceback.format_exc()[-4000:]
    finally:
        out.setdefault("status", "failed")
        out.setdefault("maxrss_kb", peak_rss_kb())
        write_json(Path(out_path), out, indent=None)
    return 0


def run_child(
    script: Path,
    job: dict,
    scratch: Path,
    timeout: float,
    env: dict[str, str] | None = None,
    verbose: bool = False,
) -> tuple[dict, float]:
    """Run ``script --worker JOB OUT`` in a fresh Python; the worker's report and the wall time.

    A child that dies or overruns ``timeout`` gives a failed report with the tail of its log.
    """
    job_path, out_path, log_path = (scratch / n for n in ("job.json", "out.json", "child.log"))
    out_path.unlink(missing_ok=True)
    job_path.write_text(json.dumps(job))
    command = [sys.executable, str(script), "--worker", str(job_path), str(out_path)]
    clock = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(
                command,
                stdout=None if verbose else log,
                stderr=None if verbose else subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                timeout=timeout,
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
    wall = round(time.perf_counter() - clock, 3)
    if out_path.is_file():
        return json.loads(out_path.read_text()), wall
    why = f"timed out after {timeout:g} s" if code is None else f"exit status {code}"
    if code is not None and code < 0:
        why += " (killed by a signal; out of memory?)"
    tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
    return {
        "status": "failed",
        "error_type": "ChildProcess",
        "error": f"ChildProcess: {why}",
        "log": tail,
    }, wall


# --------------------------------------------------------------------------------------------
# Figures of the tables
# --------------------------------------------------------------------------------------------


def numbers(values: Iterable[Any]) -> list[float]:
    """The values that are numbers (not None, not NaN), as floats."""
    return [float(v) for v in values if isinstance(v, int | float) and not math.isnan(float(v))]


def mean_or_none(values: Iterable[Any]) -> float | None:
    clean = numbers(values)
    return statistics.fmean(clean) if clean else None


def sd_or_none(values: Iterable[Any]) -> float | None:
    clean = numbers(values)
    return statistics.stdev(clean) if len(clean) > 1 else None


def median_or_none(values: Iterable[Any]) -> float | None:
    clean = numbers(values)
    return statistics.median(clean) if clean else None


def fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def mean_text(values: Iterable[Any], digits: int = 3) -> str:
    return fmt(mean_or_none(values), digits)


def mean_sd_text(values: Iterable[Any], digits: int = 3) -> str:
    """``mean ± sd`` (no sd for a single value, a dash for none)."""
    clean = numbers(values)
    sd = sd_or_none(clean)
    return mean_text(clean, digits) + ("" if sd is None else f" ± {sd:.{digits}f}")


def markdown_table(head: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
