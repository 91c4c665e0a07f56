"""What the device did while a round ran: the host samples the round's container at a fixed
interval (the cell's `telemetry.interval_s`) into telemetry.parquet beside the round's metrics.

CPU and memory come from the container's cgroup files, found through /proc/<pid>/cgroup of its
init process: cgroup v2 (cpu.stat usage_usec, memory.current) or v1 (cpuacct.usage,
memory.usage_in_bytes). Reading two small files costs microseconds, where `docker stats
--no-stream` costs a process and about 1.5 s (measured on the 2-core VM): it is the fallback only.
Memory is counted as `docker stats` counts it: usage minus inactive file cache. GPUs: the
vendor's tool, `nvidia-smi ... -lms N` streaming CSV, `amd-smi metric --json` or
`rocm-smi --showuse --showpower --showmemuse --json` polled.

Samples carry epoch seconds (one kernel's clock for the host and the container), so they align
with the start and end of each repeat that bench_cell records in raw.json (label_samples). Parsing
and labelling are pure; Sampler is the thin thread that reads and polls.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import atomic, serving

VERSION = 1
_F64, _STR, _INT = pa.float64(), pa.string(), pa.int64()
# One row per sample: of the container (cpu_cores, memory_mb) or of one GPU (gpu set).
COLUMNS = {
    "t_s": (_F64, "epoch seconds of the sample (the host's clock, which the container shares)"),
    "t_rel_s": (_F64, "seconds since the container started"),
    "source": (_STR, "cgroup-v2 | cgroup-v1 | docker-stats | nvidia-smi | amd-smi | rocm-smi"),
    "gpu": (_INT, "GPU index as the vendor tool numbers it; null for a container sample"),
    "cpu_cores": (_F64, "CPU cores the container used since the previous sample (1.0 = one core busy)"),
    "memory_mb": (_F64, "container memory without inactive file cache, MiB"),
    "gpu_util_pct": (_F64, "GPU utilization, %"),
    "power_w": (_F64, "GPU power draw, W"),
    "sm_clock_mhz": (_F64, "SM / graphics clock, MHz"),
    "vram_mb": (_F64, "GPU memory used, MiB"),
    "vram_pct": (_F64, "GPU memory used, % (rocm-smi reports only a share)"),
    "phase": (_STR, "load | repeat | between (warm-up, prompts) | after, from raw.json's marks"),
    "point": (_STR, "the repeat running at the sample: 'batch B, I→O, repeat R'; null outside one"),
}
SCHEMA = pa.schema(
    [pa.field(name, typ) for name, (typ, _) in COLUMNS.items()],
    metadata={"cellbench.telemetry_version": str(VERSION)},
)
DEFAULT_INTERVAL_S = 1.0


# ---------------------------------------------------------------------------------------------
# cgroup files of a container


@dataclass(frozen=True)
class CgroupFiles:
    version: int
    cpu: Path  # v2: cpu.stat; v1: cpuacct.usage
    memory: Path  # v2: memory.current; v1: memory.usage_in_bytes
    memory_stat: Path


def cgroup_files(proc_cgroup: str, root: Path = Path("/sys/fs/cgroup")) -> list[CgroupFiles]:
    """Candidate files of a process's cgroup, from the text of /proc/<pid>/cgroup; v1 first when
    its cpuacct and memory controllers are listed (a hybrid host keeps them there, not in v2)."""
    v1: dict[str, str] = {}
    v2 = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        for controller in controllers.split(","):
            v1[controller] = path
        if controllers:
            v1[controllers] = path  # the mount point is named after the joined list: cpu,cpuacct
    found = []
    if "cpuacct" in v1 and "memory" in v1:
        mem = root / "memory" / v1["memory"].lstrip("/")
        for mount in ("cpuacct", "cpu,cpuacct"):
            cpu = root / mount / v1["cpuacct"].lstrip("/") / "cpuacct.usage"
            found.append(CgroupFiles(1, cpu, mem / "memory.usage_in_bytes", mem / "memory.stat"))
    if v2 is not None:
        for base in (root, root / "unified"):
            folder = base / v2.lstrip("/")
            found.append(CgroupFiles(2, folder / "cpu.stat", folder / "memory.current", folder / "memory.stat"))
    return found


def cpu_seconds(text: str, version: int) -> float:
    """CPU seconds the cgroup used: v2 cpu.stat usage_usec, v1 cpuacct.usage (nanoseconds)."""
    if version == 2:
        match = re.search(r"^usage_usec (\d+)$", text, re.MULTILINE)
        if not match:
            raise ValueError("cpu.stat has no usage_usec")
        return int(match.group(1)) / 1e6
    return int(text.strip()) / 1e9


def memory_mib(usage: str, stat: str, version: int) -> float:
    """Usage minus inactive file cache, as `docker stats` shows it (v1: total_inactive_file)."""
    key = "inactive_file" if version == 2 else "total_inactive_file"
    match = re.search(rf"^{key} (\d+)$", stat, re.MULTILINE)
    inactive = int(match.group(1)) if match else 0
    used = int(usage.strip())
    return (used - inactive if inactive < used else used) / 2**20


def cpu_cores(previous: tuple[float, float] | None, current: tuple[float, float]) -> float | None:
    """(wall s, CPU s) samples -> cores busy between them; None for the first one."""
    if previous is None or current[0] <= previous[0]:
        return None
    return max(0.0, (current[1] - previous[1]) / (current[0] - previous[0]))


_UNITS = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 1e3, "mb": 1e6, "gb": 1e9}


def docker_stats(line: str) -> dict:
    """One `docker stats --no-stream --format '{{json .}}'` line -> cpu_cores, memory_mb.
    CPUPerc is docker's share of one core in % (200 % = two cores)."""
    record = json.loads(line)
    cpu = float(record["CPUPerc"].rstrip("%")) / 100
    match = re.match(r"\s*([0-9.]+)\s*([A-Za-z]+)", record["MemUsage"])
    memory = float(match.group(1)) * _UNITS[match.group(2).lower()] / 2**20 if match else None
    return {"cpu_cores": cpu, "memory_mb": memory}


# ---------------------------------------------------------------------------------------------
# GPU tools (recorded output in tests/fixtures/telemetry/)

NVIDIA_FIELDS = ("index", "utilization.gpu", "power.draw", "clocks.sm", "memory.used")


def nvidia_command(interval_s: float, gpus: list[int]) -> list[str]:
    argv = ["nvidia-smi", f"--query-gpu={','.join(NVIDIA_FIELDS)}", "--format=csv,noheader,nounits"]
    argv += ["-lms", str(max(1, round(interval_s * 1000)))]
    return argv + (["-i", ",".join(str(g) for g in gpus)] if gpus else [])


def _number(value) -> float | None:
    """A figure from a vendor tool; None for N/A, [Not Supported] and the like."""
    if isinstance(value, dict):
        value = value.get("value")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+)\s*[A-Za-z%]*\s*", value)
        return float(match.group(1)) if match else None
    return None


def parse_nvidia_line(line: str) -> dict | None:
    """`index, util %, power W, SM MHz, memory MiB` (csv,noheader,nounits) -> a sample; None for
    a line that is not one (a blank line, a warning)."""
    parts = [part.strip() for part in line.split(",")]
    if len(parts) != len(NVIDIA_FIELDS) or not parts[0].isdigit():
        return None
    util, power, clock, memory = (_number(p) for p in parts[1:])
    return {"source": "nvidia-smi", "gpu": int(parts[0]), "gpu_util_pct": util, "power_w": power,
            "sm_clock_mhz": clock, "vram_mb": memory}  # fmt: skip


ROCM_SMI_COMMAND = ["rocm-smi", "--showuse", "--showpower", "--showmemuse", "--json"]
AMD_SMI_COMMAND = ["amd-smi", "metric", "--json"]


def parse_rocm_smi(text: str) -> list[dict]:
    """`rocm-smi --showuse --showpower --showmemuse --json`: {"card0": {"GPU use (%)": "12",
    "Current Socket Graphics Package Power (W)": "143.0" (older: "Average Graphics Package
    Power (W)"), "GPU Memory Allocated (VRAM%)": "7" (older: "GPU memory use (%)")}}."""
    samples = []
    for card, fields in sorted(json.loads(text).items()):
        match = re.fullmatch(r"card(\d+)", card)
        if not match or not isinstance(fields, dict):
            continue  # "system" and other non-card keys
        sample = {"source": "rocm-smi", "gpu": int(match.group(1)), "gpu_util_pct": None, "power_w": None,
                  "vram_pct": None}  # fmt: skip
        for key, value in fields.items():
            if re.search(r"GPU use \(%\)", key):
                sample["gpu_util_pct"] = _number(value)
            elif re.search(r"Power \(W\)", key) and sample["power_w"] is None:
                sample["power_w"] = _number(value)
            elif re.search(r"VRAM%|GPU memory use \(%\)", key, re.IGNORECASE):
                sample["vram_pct"] = _number(value)
        samples.append(sample)
    return samples


def parse_amd_smi(text: str) -> list[dict]:
    """`amd-smi metric --json` (ROCm 6.1+): a list of {"gpu": 0, "usage": {"gfx_activity":
    {"value": 12, "unit": "%"}}, "power": {"socket_power": {...}}, "clock": {"gfx_0": {"clk":
    {...}}}, "mem_usage": {"used_vram": {"value": 283, "unit": "MB"}}}; "N/A" where not supported."""
    records = json.loads(text)
    if isinstance(records, dict):  # a single GPU printed bare by some versions
        records = [records]
    samples = []
    for record in records:
        if not isinstance(record, dict) or "gpu" not in record:
            continue
        usage, power = record.get("usage") or {}, record.get("power") or {}
        clock = (record.get("clock") or {}).get("gfx_0") or {}
        memory = record.get("mem_usage") or {}
        samples.append(
            {
                "source": "amd-smi",
                "gpu": int(record["gpu"]),
                "gpu_util_pct": _number(usage.get("gfx_activity")),
                "power_w": _number(power.get("socket_power")),
                "sm_clock_mhz": _number(clock.get("clk")),
                "vram_mb": _number(memory.get("used_vram")),
            }
        )
    return samples


# ---------------------------------------------------------------------------------------------
# Aligning samples with the repeats of raw.json


def point_label(point: dict) -> str:
    load = serving.label(point) if point.get("load_kind") else f"batch {point['batch_size']}"
    return f"{load}, {point['input_len']}→{point['output_len']}, repeat {point['repeat'] + 1}"


def marks(raw: dict | None) -> list[tuple[float, float, str]]:
    """(start, end, label) of every repeat raw.json holds with its epoch times."""
    return [
        (p["started_at_s"], p["finished_at_s"], point_label(p))
        for p in (raw or {}).get("points", [])
        if p.get("started_at_s") is not None and p.get("finished_at_s") is not None
    ]


def label_samples(samples: list[dict], raw: dict | None, container_start: float) -> list[dict]:
    """Each sample with t_rel_s, its phase and the repeat it fell in."""
    spans = marks(raw)
    measuring = (raw or {}).get("measuring_at_s")
    last_end = spans[-1][1] if spans else None
    labelled = []
    for sample in samples:
        t = sample["t_s"]
        inside = next((label for start, end, label in spans if start <= t <= end), None)
        if inside:
            phase = "repeat"
        elif measuring is None or t < measuring:
            phase = "load"
        elif last_end is not None and t > last_end and (raw or {}).get("status") != "measuring":
            phase = "after"
        else:
            phase = "between"
        labelled.append({**sample, "t_rel_s": t - container_start, "phase": phase, "point": inside})
    return labelled


def to_table(samples: list[dict]) -> pa.Table:
    from .metrics import rows_table  # pyarrow's own conversion imports pandas: every cell would pay for it

    return rows_table(samples, SCHEMA)


def write_parquet(path: Path, samples: list[dict]) -> None:
    table = to_table(samples)
    atomic.write_with(path, lambda tmp: pq.write_table(table, tmp))


def read_parquet(path: Path) -> pa.Table:
    return pq.read_table(path)


MAX_PLOTTED_CELLS = 8  # one panel each: more would be unreadable on one page


def report_rounds(study_file: Path, results: Path | None = None) -> list[dict]:
    """For the report: per cell of the study (sorted by name, at most MAX_PLOTTED_CELLS), the
    first round with samples: {cell_name, round, samples (rows), marks (relative to the
    container's start)}. Rounds without telemetry (made before it, or switched off) are skipped."""
    from . import paths  # here: paths is light, but keep this module's imports to what sampling needs

    results = results or paths.RESULTS
    record = json.loads(Path(study_file).read_text())
    found = []
    for cell_id, rounds in sorted(record["cells"].items()):
        for k in range(1, rounds + 1):
            try:
                rows = pq.read_table(paths.cell_telemetry(cell_id, k, results)).to_pylist()
                prov = json.loads(paths.cell_provenance(cell_id, k, results).read_text())
            except (OSError, ValueError, pa.ArrowException):
                continue
            if not rows:
                continue
            offset = rows[0]["t_s"] - rows[0]["t_rel_s"]  # the container's start, epoch s
            spans = [(a - offset, b - offset, label) for a, b, label in marks(prov.get("container"))]
            found.append({"cell_name": prov["cell"]["name"], "round": k, "samples": rows, "marks": spans})
            break
    return sorted(found, key=lambda r: r["cell_name"])[:MAX_PLOTTED_CELLS]


# ---------------------------------------------------------------------------------------------
# The sampler: a thread while the container runs


def _read(path: Path) -> str:
    return Path(path).read_text()


class Sampler:
    """Samples a running container (and its GPUs) every interval_s until the with-block ends.

    `find` resolves the container's init pid (None until it exists); it is `docker inspect` by
    default, replaced in tests."""

    def __init__(
        self,
        runtime: str,
        name: str,
        settings: dict | None,
        device: str = "cpu",
        gpus: list[int] | None = None,
        find: Callable[[], int | None] | None = None,
        read: Callable[[Path], str] = _read,
    ):
        settings = settings or {}
        self.enabled = settings.get("enabled", True)
        self.interval_s = float(settings.get("interval_s", DEFAULT_INTERVAL_S))
        self.runtime, self.name, self.device, self.gpus = runtime, name, device, gpus or []
        self.find = find or self._inspect_pid
        self.read = read
        self.samples: list[dict] = []
        self.notes: list[str] = []  # why a source gave nothing (recorded in provenance)
        self.start = time.time()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._gpu_process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _inspect_pid(self) -> int | None:
        done = subprocess.run(
            [self.runtime, "inspect", "-f", "{{.State.Pid}}", self.name], capture_output=True, text=True, check=False
        )
        pid = done.stdout.strip()
        return int(pid) if done.returncode == 0 and pid.isdigit() and int(pid) > 0 else None

    def _add(self, sample: dict) -> None:
        with self._lock:
            self.samples.append(sample)

    def __enter__(self):
        self.start = time.time()
        if self.enabled:
            self._spawn(self._container_loop)
            if self.device in ("cuda", "rocm"):
                self._spawn(self._gpu_loop)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._gpu_process and self._gpu_process.poll() is None:
            self._gpu_process.terminate()
        for thread in self._threads:
            thread.join(timeout=10)
        if self._gpu_process:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._gpu_process.wait(timeout=5)
        self.samples.sort(key=lambda s: (s["t_s"], s.get("gpu") is not None, s.get("gpu") or 0))

    def _spawn(self, target) -> None:
        thread = threading.Thread(target=target, name=f"cellbench-telemetry-{target.__name__}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _files(self) -> CgroupFiles | None:
        """The container's cgroup files once it runs (polled at the interval until then)."""
        while not self._stop.is_set():
            pid = self.find()
            if pid:
                try:
                    candidates = cgroup_files(self.read(Path(f"/proc/{pid}/cgroup")))
                except OSError:
                    candidates = []
                for files in candidates:
                    with contextlib.suppress(OSError, ValueError):
                        cpu_seconds(self.read(files.cpu), files.version)
                        return files
                return None
            self._stop.wait(min(self.interval_s, 0.5))
        return None

    def _container_loop(self) -> None:
        files = self._files()
        if files is None and not self._stop.is_set():
            self.notes.append("container cgroup files not found: sampled with `docker stats` instead")
        previous = None
        while not self._stop.is_set():
            now = time.time()
            try:
                if files:
                    used = cpu_seconds(self.read(files.cpu), files.version)
                    memory = memory_mib(self.read(files.memory), self.read(files.memory_stat), files.version)
                    current = (time.monotonic(), used)
                    self._add({"t_s": now, "source": f"cgroup-v{files.version}",
                               "cpu_cores": cpu_cores(previous, current), "memory_mb": memory})  # fmt: skip
                    previous = current
                else:
                    self._docker_stats(now)
            except (OSError, ValueError):
                break  # the container is gone
            self._stop.wait(max(0.0, self.interval_s - (time.time() - now)))

    def _docker_stats(self, now: float) -> None:
        done = subprocess.run(
            [self.runtime, "stats", "--no-stream", "--format", "{{json .}}", self.name],
            capture_output=True, text=True, check=False, timeout=30,
        )  # fmt: skip
        if done.returncode != 0 or not done.stdout.strip():
            raise OSError("docker stats: container gone")
        self._add({"t_s": now, "source": "docker-stats", **docker_stats(done.stdout.strip().splitlines()[0])})

    def _gpu_loop(self) -> None:
        if self.device == "cuda":
            if not shutil.which("nvidia-smi"):
                self.notes.append("nvidia-smi not found: no GPU telemetry")
                return
            self._gpu_process = subprocess.Popen(
                nvidia_command(self.interval_s, self.gpus), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
            for line in self._gpu_process.stdout:
                sample = parse_nvidia_line(line)
                if sample:
                    self._add({"t_s": time.time(), **sample})
            return
        tool = next((argv for argv in (AMD_SMI_COMMAND, ROCM_SMI_COMMAND) if shutil.which(argv[0])), None)
        if tool is None:
            self.notes.append("neither amd-smi nor rocm-smi found: no GPU telemetry")
            return
        parse = parse_amd_smi if tool is AMD_SMI_COMMAND else parse_rocm_smi
        while not self._stop.is_set():
            now = time.time()
            done = subprocess.run(tool, capture_output=True, text=True, check=False, timeout=30)
            with contextlib.suppress(ValueError):
                for sample in parse(done.stdout):
                    if not self.gpus or sample["gpu"] in self.gpus:
                        self._add({"t_s": now, **sample})
            self._stop.wait(max(0.0, self.interval_s - (time.time() - now)))
