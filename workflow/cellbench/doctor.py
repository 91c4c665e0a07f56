"""`cellbench doctor`: can this machine run a study, and if not, what is missing.

Two layers: `gather()` collects facts about the machine (Docker, devices, groups, tools, disk,
hub cache, and what makes figures unstable: load, steal, governor, swap, other containers) with a
few quick commands and file reads, and the `*_checks()` functions judge them: pure functions,
tested with made-up facts. Each check is one line: ✅ fine, ⚠️ worth knowing but not blocking,
❌ the study cannot run until it is fixed. Stability checks are ⚠️ at most.
"""

from __future__ import annotations

import grp
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import containers, devices, hfcache, images, models, paths, runtimes

OK, WARN, FAIL = "✅", "⚠️", "❌"
# Rough unpacked sizes of the engine images by device kind, to judge free disk before a build
# (vllm/vllm-openai's cu129 variant is about 26 GB unpacked).
IMAGE_GB = {"cpu": 6, "rocm": 30, "cuda": 28}
HOST_TOOLS = {"rocm": ("rocm-smi", "rocminfo"), "cuda": ("nvidia-smi",)}
# What `docker run --gpus` needs on the host: the NVIDIA Container Toolkit's hook (docker calls
# it for --gpus; nvidia-ctk comes with the same toolkit), or a CDI spec naming the GPUs, which
# podman (and docker with CDI) use instead. A runtime *named* nvidia is not needed.
# https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/install-guide.html
NVIDIA_HOOKS = ("nvidia-container-runtime-hook", "nvidia-ctk")
CDI_DIRS = ("etc/cdi", "var/run/cdi")
NVIDIA_SMI_FACTS = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"]
# Oldest driver branch each CUDA major version of the image runs on (minor version compatibility:
# CUDA 12.x needs >= 525, CUDA 13.x >= 580;
# https://docs.nvidia.com/deploy/cuda-compatibility/#minor-version-compatibility). The image
# tag names its CUDA (vllm/vllm-openai:v0.31.0-cu129); a plain tag of v0.31.0 is CUDA 13
# (containers/cuda/Dockerfile).
CUDA_MIN_DRIVER = {12: 525, 13: 580}
DEFAULT_IMAGE_CUDA = 13
STEAL_SAMPLE_S = 0.5
STEAL_WARN = 0.02  # share of CPU time a VM's neighbours took during the sample
LOAD_WARN = 0.5  # 1-minute load average per core above which the host is not idle
MEM_LOW = 0.10  # available share of memory below which swap in use means paging while measuring
NAMES_SHOWN = 5
# `docker ps` line: name, then our cell label (empty for containers that are not ours).
PS_FORMAT = f'{{{{.Names}}}}\t{{{{.Label "{containers.LABEL_CELL}"}}}}'


@dataclass(frozen=True)
class Check:
    mark: str
    text: str


def _run(argv: list[str]) -> tuple[int, str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, str(exc)
    return done.returncode, (done.stdout if done.returncode == 0 else done.stderr).strip()


def gather(study: dict | None, environ: dict[str, str], root: str = "/") -> dict:
    """Facts about this machine (and the images and models `study` names)."""
    facts: dict = {"uid": os.getuid(), "groups": {}, "tools": {}, "images": {}, "models": {}}
    for gid in os.getgroups():
        try:
            facts["groups"][gid] = grp.getgrgid(gid).gr_name
        except KeyError:
            facts["groups"][gid] = str(gid)
    code, out = _run(["docker", "version", "--format", "{{json .}}"])
    version = json.loads(out) if code == 0 and out.startswith("{") else {}
    facts["docker_client"] = (version.get("Client") or {}).get("Version") or (shutil.which("docker") and "unknown")
    facts["docker_server"] = (version.get("Server") or {}).get("Version")
    facts["docker_error"] = None if facts["docker_server"] else out.splitlines()[-1] if out else "docker not found"
    facts["runtimes"], facts["default_runtime"], docker_root = [], None, "/var/lib/docker"
    if facts["docker_server"]:
        code, out = _run(["docker", "info", "--format", "{{json .}}"])
        info = json.loads(out) if code == 0 and out.startswith("{") else {}
        facts["runtimes"] = sorted(info.get("Runtimes") or {})
        facts["default_runtime"] = info.get("DefaultRuntime")
        docker_root = info.get("DockerRootDir") or docker_root
    disk_path = next((p for p in (Path(docker_root), Path("/")) if p.exists()), Path("/"))
    facts["disk_path"], facts["disk_free_gb"] = str(disk_path), shutil.disk_usage(disk_path).free / 2**30
    facts["kfd"] = (Path(root) / "dev" / "kfd").exists()
    facts["render_nodes"] = sorted(str(p) for p in (Path(root) / "dev" / "dri").glob("renderD*"))
    facts.update(gather_gpus(environ, root))
    facts["stability"] = gather_stability(root)
    for tool in (*HOST_TOOLS["rocm"], *HOST_TOOLS["cuda"], *NVIDIA_HOOKS):
        facts["tools"][tool] = shutil.which(tool)
    facts["cdi_specs"] = cdi_specs(root)
    code, out = _run(NVIDIA_SMI_FACTS) if facts["tools"].get("nvidia-smi") else (1, "")
    rows = devices.parse_nvidia_smi_csv(out) if code == 0 else []
    facts["nvidia_driver"] = rows[0].get("driver_version") if rows else None
    try:
        facts["runtime"] = runtimes.runtime_from_env(environ)
    except runtimes.RuntimeSetupError as exc:
        facts["runtime"], facts["device_errors"] = "docker", [*facts["device_errors"], str(exc)]
    if study:
        for name, spec in study["images"].items():
            context = paths.PROJECT_ROOT / spec["context"]
            dockerfile = context / "Dockerfile"
            base = spec.get("base") or (dockerfile.is_file() and images.declared_base(dockerfile.read_text())) or None
            present = bool(facts["docker_server"] and base and images.image_id(base))
            facts["images"][name] = {"base": base, "base_present": present}
        hub = hfcache.hub_dir(environ)
        facts["hub_dir"] = str(hub)
        for name, spec in study["models"].items():
            if spec["source"] != "hf-cache":
                continue
            try:
                facts["models"][name] = {"commit": hfcache.resolve(hub, spec["repo_id"], spec.get("revision"))[1]}
            except models.ModelError as exc:
                facts["models"][name] = {"error": str(exc)}
    return facts


def gather_gpus(environ: dict[str, str], root: str = "/") -> dict:
    """GPU names by kind, and what made discovery fail (a KFD node without a render minor, a
    CELLBENCH_GPUS naming a GPU that is not there) as one-line errors, not a traceback."""
    found: dict = {"rocm_gpus": [], "cuda_gpus": [], "device_errors": []}
    for kind, discover in (("rocm", lambda: devices.rocm_gpus(root)), ("cuda", devices.cuda_gpus)):
        try:
            gpus = discover()
            found[f"{kind}_gpus"] = [gpu.name or gpu.render_node for gpu in gpus]
            if gpus and environ.get(devices.GPUS_ENV):
                devices.allowed(gpus, environ[devices.GPUS_ENV])
        except devices.DeviceError as exc:
            found["device_errors"].append(str(exc))
    return found


def cdi_specs(root: str = "/") -> list[str]:
    """CDI spec files under /etc/cdi and /var/run/cdi that name NVIDIA GPUs (kind nvidia.com/gpu)."""
    found = []
    for folder in CDI_DIRS:
        for path in sorted((Path(root) / folder).glob("*")):
            if path.suffix in (".yaml", ".yml", ".json") and "nvidia.com/gpu" in (_read(path) or ""):
                found.append("/" + str(path.relative_to(root)).lstrip("/"))
    return found


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _stat_jiffies(root: str) -> tuple[int, int] | None:
    """(steal, total) from the first line of /proc/stat."""
    text = _read(Path(root) / "proc/stat")
    fields = text.split("\n", 1)[0].split() if text else []
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal; guest time is already counted in user/nice.
    jiffies = [int(f) for f in fields[1:9]]
    return jiffies[7], sum(jiffies)


def _meminfo_kb(text: str | None) -> dict[str, int]:
    values = {}
    for line in (text or "").splitlines():
        key, _, rest = line.partition(":")
        if rest.split() and rest.split()[0].isdigit():
            values[key] = int(rest.split()[0])
    return values


def gather_stability(
    root: str = "/",
    wait: Callable[[], None] = lambda: time.sleep(STEAL_SAMPLE_S),
    docker_ps: Callable[[], tuple[int, str]] = lambda: _run(["docker", "ps", "--format", PS_FORMAT]),
) -> dict:
    """Facts that move figures between runs, read from /proc and /sys under `root`.

    `wait` runs between the two /proc/stat samples and `docker_ps` lists running containers;
    tests replace both.
    """
    cpu_dir = Path(root) / "sys/devices/system/cpu"
    cpuinfo = _read(Path(root) / "proc/cpuinfo") or ""
    models_seen = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    cores = sum(1 for line in cpuinfo.splitlines() if line.split(":")[0].strip() == "processor")
    loadavg = (_read(Path(root) / "proc/loadavg") or "").split()
    before = _stat_jiffies(root)
    wait()
    after = _stat_jiffies(root)
    governors: dict[str, int] = {}
    for path in sorted(cpu_dir.glob("cpu[0-9]*/cpufreq/scaling_governor")):
        name = (_read(path) or "").strip()
        if name:
            governors[name] = governors.get(name, 0) + 1
    # intel_pstate says whether turbo is off; other drivers say whether boost is on.
    no_turbo = (_read(cpu_dir / "intel_pstate/no_turbo") or "").strip()
    boost = (_read(cpu_dir / "cpufreq/boost") or "").strip()
    turbo = {"0": True, "1": False}.get(no_turbo, {"1": True, "0": False}.get(boost))
    memory = _meminfo_kb(_read(Path(root) / "proc/meminfo"))
    code, out = docker_ps()
    running = [line.split("\t") + [""] for line in out.splitlines() if line.strip()] if code == 0 else None
    return {
        "cpu_model": models_seen[0] if models_seen else None,
        "cores": cores or None,
        "load1": float(loadavg[0]) if loadavg else None,
        "steal_jiffies": after[0] - before[0] if before and after else None,
        "total_jiffies": after[1] - before[1] if before and after else None,
        "governors": governors,
        "turbo": turbo,
        "mem_total_kb": memory.get("MemTotal"),
        "mem_available_kb": memory.get("MemAvailable", memory.get("MemFree")),
        "swap_used_kb": memory["SwapTotal"] - memory["SwapFree"] if "SwapTotal" in memory else None,
        "containers": [{"name": r[0], "cell": r[1]} for r in running] if running is not None else None,
        "containers_error": None if code == 0 else (out.splitlines() or ["docker ps failed"])[-1],
    }


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    return f"{shown} and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else shown


def _cpus(n: int) -> str:
    return f"{n} CPU" if n == 1 else f"{n} CPUs"


def _gb(kb: int) -> str:
    return f"{kb / 2**20:.1f} GB"


def stability_checks(facts: dict) -> list[Check]:
    """What will make figures lower or noisier on this machine; ⚠️ at most, never ❌."""
    checks = []
    cores = facts["cores"]
    model = facts["cpu_model"] or "model not listed in /proc/cpuinfo"
    checks.append(Check(OK, f"CPU: {model}, {cores or 'unknown number of'} cores"))

    if facts["containers"] is None:
        checks.append(Check(WARN, f"running containers: not checked ({facts['containers_error']})"))
    else:
        ours = [c["name"] for c in facts["containers"] if c["cell"]]
        others = [c["name"] for c in facts["containers"] if not c["cell"]]
        also = f"; also {len(ours)} cellbench cell(s): {_names(ours)}" if ours else ""
        if others:
            checks.append(
                Check(
                    WARN,
                    f"running containers: {len(others)} other than cellbench's, competing for CPU: {_names(others)}; "
                    f"stop them before measuring{also}",
                )
            )
        elif ours:
            checks.append(
                Check(
                    OK,
                    f"running containers: only cellbench cells: {_names(ours)} "
                    "(a study is running; if not, 'cellbench clean --containers')",
                )
            )
        else:
            checks.append(Check(OK, "running containers: none"))

    load = facts["load1"]
    if load is None or not cores:
        checks.append(Check(OK, "host load: /proc/loadavg not readable"))
    elif load > LOAD_WARN * cores:
        checks.append(
            Check(
                WARN,
                f"host load: other work is running: {load:.2f} on {cores} cores; "
                "figures will be lower and noisier; quiet the host or add rounds",
            )
        )
    else:
        checks.append(Check(OK, f"host load: {load:.2f} on {cores} cores (1-minute average)"))

    steal, total = facts["steal_jiffies"], facts["total_jiffies"]
    if not total:
        checks.append(Check(OK, "CPU steal: /proc/stat not readable"))
    elif steal / total > STEAL_WARN:
        checks.append(
            Check(
                WARN,
                f"CPU steal: {100 * steal / total:.1f} % of CPU time went to this VM's neighbours; "
                "figures will move with their load; use a dedicated host or add rounds",
            )
        )
    else:
        checks.append(Check(OK, f"CPU steal: {100 * steal / total:.1f} % of CPU time over {STEAL_SAMPLE_S} s"))

    governors = facts["governors"]
    counted = sum(governors.values())
    if not governors:
        checks.append(Check(OK, "CPU frequency governor: not readable (a VM usually hides it)"))
    elif set(governors) == {"performance"}:
        checks.append(Check(OK, f"CPU frequency governor: performance on {_cpus(counted)}"))
    else:
        slow = ", ".join(f"{name} on {n} of {_cpus(counted)}" for name, n in sorted(governors.items()))
        checks.append(
            Check(
                WARN,
                f"CPU frequency governor: {slow}; frequency scaling moves figures between runs: "
                "cpupower frequency-set -g performance",
            )
        )
    if facts["turbo"] is not None:
        state = "on" if facts["turbo"] else "off"
        # Both are fine; what matters is that machines compared with each other agree.
        checks.append(Check(OK, f"CPU turbo boost: {state} (keep it the same on machines you compare)"))

    swap, available, total_kb = facts["swap_used_kb"], facts["mem_available_kb"], facts["mem_total_kb"]
    if swap is None or available is None or not total_kb:
        checks.append(Check(OK, "swap: /proc/meminfo not readable"))
    elif swap > 0 and available < MEM_LOW * total_kb:
        checks.append(
            Check(
                WARN,
                f"swap: {_gb(swap)} in use and only {_gb(available)} of {_gb(total_kb)} memory available; "
                "paging stalls the engine; free memory before measuring",
            )
        )
    elif swap > 0:
        checks.append(Check(OK, f"swap: {_gb(swap)} in use, {_gb(available)} memory available"))
    else:
        checks.append(Check(OK, f"swap: none in use, {_gb(available)} memory available"))
    return checks


def machine_checks(facts: dict) -> list[Check]:
    checks = []
    if facts["docker_server"]:
        checks.append(Check(OK, f"docker: client {facts['docker_client']}, daemon {facts['docker_server']} answers"))
        runtimes = ", ".join(facts["runtimes"]) or "none listed"
        checks.append(Check(OK, f"docker runtime: {facts['default_runtime']} (default); available: {runtimes}"))
    else:
        checks.append(Check(FAIL, f"docker: no daemon answers ({facts['docker_error']}); run scripts/setup.sh"))
    for error in facts.get("device_errors", []):
        checks.append(Check(FAIL, f"GPU discovery: {error}"))
    if facts["rocm_gpus"] or facts["cuda_gpus"]:
        # nvidia-smi's names carry the vendor already ("NVIDIA H200"); KFD names may not ("gfx942").
        found = [_vendor("AMD", g) for g in facts["rocm_gpus"]] + [_vendor("NVIDIA", g) for g in facts["cuda_gpus"]]
        checks.append(Check(OK, f"GPU: {len(found)} found: {', '.join(found)}"))
    else:
        seen = [
            "/dev/kfd present" if facts["kfd"] else "no /dev/kfd",
            f"{len(facts['render_nodes'])} /dev/dri render nodes" if facts["render_nodes"] else "no /dev/dri",
            "nvidia-smi lists no GPU" if facts["tools"].get("nvidia-smi") else "no nvidia-smi",
        ]
        checks.append(Check(WARN, f"GPU: none on this machine ({', '.join(seen)}); only cpu studies can run"))
    if facts["uid"] == 0:
        checks.append(Check(OK, "groups: running as root (Docker socket and device nodes are open to it)"))
    else:
        names = set(facts["groups"].values())
        # video/render own the AMD device nodes; NVIDIA's /dev/nvidia* are open to everyone.
        amd = bool(facts["rocm_gpus"] or facts["kfd"])
        wanted = ("docker", "video", "render") if amd else ("docker",)
        missing = [g for g in wanted if g not in names]
        mark = WARN if missing else OK
        detail = f"not in {', '.join(missing)} (sudo usermod -aG {','.join(missing)} $USER)" if missing else "ok"
        checks.append(Check(mark, f"groups: {', '.join(sorted(names)) or 'none'}: {detail}"))
    for kind, label in (("rocm", "ROCm"), ("cuda", "NVIDIA")):
        tools = HOST_TOOLS[kind]
        found = [t for t in tools if facts["tools"].get(t)]
        if found == list(tools):
            checks.append(Check(OK, f"{label} tools on the host: {', '.join(tools)}"))
        else:
            missing = ", ".join(t for t in tools if t not in found)
            checks.append(Check(WARN, f"{label} tools on the host: {missing} not found (cells use the image's own)"))
    return checks


def study_checks(facts: dict, study: dict, cells: list[dict]) -> list[Check]:
    """What the study (its config and resolved cells) needs that this machine lacks."""
    checks = []
    for kind in sorted({cell["device"] for cell in cells}):
        need = max(cell["resources"]["gpus"] for cell in cells if cell["device"] == kind)
        if kind == "cpu":
            checks.append(Check(OK, "device cpu: runs on any Docker host"))
            continue
        have = len(facts[f"{kind}_gpus"])
        vendor = {"rocm": "AMD (ROCm)", "cuda": "NVIDIA"}[kind]
        if have >= need:
            checks.append(Check(OK, f"device {kind}: {have} {vendor} GPU(s), cells need {need}"))
        else:
            why = {
                "rocm": "no /dev/kfd" if not facts["kfd"] else "/dev/kfd present but no GPU in the KFD topology",
                "cuda": "nvidia-smi lists no GPU" if facts["tools"].get("nvidia-smi") else "no nvidia-smi",
            }[kind]
            checks.append(
                Check(FAIL, f"device {kind}: cells need {need} {vendor} GPU(s), this machine has {have} ({why})")
            )
        if kind == "cuda" and have:
            checks += nvidia_container_checks(facts, study)
    missing_gb = 0
    for image, spec in sorted(study["images"].items()):
        fact = facts["images"].get(image, {})
        base = fact.get("base")
        if base == images.LOCAL_BASE:
            checks.append(Check(OK, f"image {image}: base {base} is built here (debootstrap, no registry)"))
            missing_gb += IMAGE_GB[spec["device"]]
        elif fact.get("base_present"):
            checks.append(Check(OK, f"image {image}: base {base} is in the local Docker daemon"))
        else:
            checks.append(
                Check(
                    WARN,
                    f"image {image}: base {base} is not in the local Docker daemon; "
                    f"the build will 'docker pull' it (needs a registry) or 'docker load' a saved copy first",
                )
            )
            missing_gb += IMAGE_GB[spec["device"]]
    if missing_gb > facts["disk_free_gb"]:
        checks.append(
            Check(
                FAIL, f"disk: {facts['disk_free_gb']:.0f} GB free under {facts['disk_path']}, images need ~{missing_gb}"
            )
        )
    else:
        checks.append(Check(OK, f"disk: {facts['disk_free_gb']:.0f} GB free under {facts['disk_path']}"))
    for model, spec in sorted(study["models"].items()):
        if spec["source"] != "hf-cache":
            checks.append(Check(OK, f"model {model}: {spec['source']} {spec.get('package', '')}".rstrip()))
            continue
        fact = facts["models"].get(model, {})
        if fact.get("commit"):
            checks.append(Check(OK, f"model {model}: {spec['repo_id']} at {fact['commit'][:12]} in {facts['hub_dir']}"))
        elif spec.get("allow_download"):
            checks.append(
                Check(WARN, f"model {model}: {spec['repo_id']} not cached; will be downloaded (allow_download)")
            )
        else:
            checks.append(
                Check(
                    FAIL,
                    f"model {model}: {spec['repo_id']} not in {facts['hub_dir']}; run "
                    f"'hf download {spec['repo_id']}' or set allow_download: true",
                )
            )
    return checks


def _vendor(vendor: str, name: str) -> str:
    return name if name.upper().startswith(vendor) else f"{vendor} {name}"


def image_cuda_major(base: str | None) -> int:
    """CUDA major version of a vLLM CUDA image from its tag (`-cu129` -> 12); else the default."""
    match = re.search(r"[-_]cu(\d{2})\d", base or "")
    return int(match.group(1)) if match else DEFAULT_IMAGE_CUDA


def nvidia_container_checks(facts: dict, study: dict) -> list[Check]:
    """Can a container get the NVIDIA GPUs here, and is the driver new enough for the image."""
    checks = []
    hooks = [tool for tool in NVIDIA_HOOKS if facts["tools"].get(tool)]
    cdi = facts.get("cdi_specs") or []
    runtime = facts.get("runtime", "docker")
    if runtime == "podman":  # podman passes NVIDIA GPUs only as CDI devices
        if cdi:
            checks.append(Check(OK, f"NVIDIA containers: CDI spec {', '.join(cdi)} (podman --device nvidia.com/gpu=…)"))
        else:
            checks.append(
                Check(
                    FAIL,
                    "NVIDIA containers: no CDI spec under /etc/cdi or /var/run/cdi; podman needs one: "
                    "sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml",
                )
            )
    elif hooks or cdi or "nvidia" in facts["runtimes"]:
        how = [f"{tool} on PATH" for tool in hooks] + [f"CDI spec {spec}" for spec in cdi]
        how += ["docker runtime nvidia"] if "nvidia" in facts["runtimes"] else []
        checks.append(Check(OK, f"NVIDIA containers: docker --gpus can use {', '.join(how)}"))
    else:
        checks.append(
            Check(
                FAIL,
                "NVIDIA containers: docker --gpus needs the NVIDIA Container Toolkit (no "
                f"{' or '.join(NVIDIA_HOOKS)} on PATH, no CDI spec under /etc/cdi or /var/run/cdi); install it",
            )
        )
    driver = facts.get("nvidia_driver")
    bases = {
        name: fact.get("base")
        for name, fact in facts["images"].items()
        if study["images"].get(name, {}).get("device") == "cuda"
    }
    for name, base in sorted(bases.items()):
        need = CUDA_MIN_DRIVER[image_cuda_major(base)]
        if not driver:
            checks.append(
                Check(WARN, f"NVIDIA driver: version unknown (nvidia-smi said none); image {name} needs >= {need}")
            )
        elif int(driver.split(".")[0]) < need:
            checks.append(
                Check(
                    WARN,
                    f"NVIDIA driver: {driver} is older than image {name} ({base}, CUDA {image_cuda_major(base)}) "
                    f"needs (>= {need}); update the driver or use a -cu129 tag as the image's base",
                )
            )
        else:
            checks.append(Check(OK, f"NVIDIA driver: {driver} (image {name} needs >= {need})"))
    return checks


def conclusion(name: str, checks: list[Check]) -> Check:
    blockers = [c for c in checks if c.mark == FAIL]
    if blockers:
        return Check(FAIL, f"{name} cannot run here: {len(blockers)} problem(s) above")
    return Check(OK, f"{name} can run here")


def report(lines: list[Check]) -> str:
    return "\n".join(f"{c.mark} {c.text}" for c in lines)
