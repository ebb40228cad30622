"""The two Python pieces of scripts/gpu_check.sh; neither imports pipedni.

``python scripts/gpu_check.py env DEVICE``: this machine as one JSON line (GPU, torch, CUDA);
exit status 1 when DEVICE is cuda and torch sees none.
``python scripts/gpu_check.py table OUT_DIR``: the markdown table, from the files the parts left
in OUT_DIR (parts.tsv, env.out, *.out, *.log, train_run/summary.json); exit status 1 when any
part failed.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from pathlib import Path


def env(device: str) -> int:
    import torch

    cuda = torch.cuda.is_available()
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        smi = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip() if cuda else None
    except (OSError, subprocess.SubprocessError):
        smi = None
    print(json.dumps({"device": device, "cuda_available": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
                      "nvidia_smi": smi, "torch": torch.__version__, "cuda": torch.version.cuda,
                      "python": platform.python_version()}))
    return 0 if cuda or device == "cpu" else 1


def _json(path: Path):
    """The file as JSON, else its last JSON line, else None (a part that failed may leave none)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for candidate in [text] + [line for line in reversed(text.splitlines()) if line.startswith("{")][:1]:
        try:
            return json.loads(candidate)
        except ValueError:
            pass
    return None


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def env_figures(out: Path) -> str:
    env = _json(out / "env.out") or {}
    gpu = env.get("nvidia_smi") or env.get("gpu") or "no GPU"
    commit = (out / "commit.txt").read_text().strip() if (out / "commit.txt").exists() else "?"
    return (f"{gpu}; torch {env.get('torch', '?')} (CUDA {env.get('cuda') or '-'}), "
            f"Python {env.get('python', '?')}, commit {commit}")


def test_figures(out: Path) -> str:
    """pytest's closing line, e.g. '2 passed, 2 skipped, 12 deselected in 40.1s'."""
    text = (out / "gpu_tests.out").read_text() if (out / "gpu_tests.out").exists() else ""
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|deselected|error).*?)\s*=*$", text, re.M)
    return found[-1] if found else "no pytest summary"


def profile_figures(out: Path, name: str, device: str) -> str:
    """Per stage: forward+backward / optimizer / predictor ms for one batch, and the ideal limit."""
    result = _json(out / f"{name}.out")
    if not result:
        return "no JSON"
    stages = result["stages"]
    parts = [f"stage {s['stage_index']}: {_ms(s['fwd_bwd_sec'])} / {_ms(s.get('optimizer_sec'))} / "
             f"{_ms(s.get('predictor_sec') or None)}" for s in stages]  # the last stage has no predictor
    ideal = result["batch_size"] / max(s["fwd_bwd_sec"] for s in stages)
    ran_on = result.get("device", "cpu")  # profile.py reports its device once it can use one
    where = "" if ran_on.split(":")[0] == device else f"; **timed on {ran_on}**: the profile ignored dist.device={device}"
    return (f"ms fwd+bwd / optimizer / predictor, batch {result['batch_size']}: {'; '.join(parts)}; "
            f"ideal {ideal:.0f} samples/s{where}")


def train_figures(out: Path, run: str = "train_run") -> str:
    summary = _json(out / run / "summary.json")
    if not summary:
        return "no summary.json"
    acc = summary.get("test_accuracy")
    figures = [f"{summary['samples_per_sec']:.1f} samples/s", f"precision {summary.get('precision', 'fp32')}",
               f"test accuracy {acc:.4f}" if acc is not None else "no test accuracy",
               f"{summary['steps']} steps of {summary['batch_size']}", f"{summary['wall_time_sec']:.1f} s wall"]
    for stage in summary["stages"]:
        memory = stage.get("peak_memory_bytes")
        util = stage.get("gpu_util_percent")
        figures.append(f"stage {stage.get('stage_index', '?')}: peak {memory / 2**20:.0f} MiB"
                       + (f", GPU util {util:.0f}%" if util is not None else "") if memory else "")
    return "; ".join(f for f in figures if f)


CHECKS = {  # part name -> (what it checks, its key figures)
    "install": ("pip install -e .", lambda out, device: ""),
    "env": ("environment", lambda out, device: env_figures(out)),
    "gpu_tests": ("`pytest -m gpu`", lambda out, device: test_figures(out)),
    "profile_mlp": ("profile bench_mlp_fashion, 2 stages", lambda out, device: profile_figures(out, "profile_mlp", device)),
    "profile_lm": ("profile bench_transformer_kjv, 2 stages", lambda out, device: profile_figures(out, "profile_lm", device)),
    "train": ("2-stage 1f1b job, both ranks on one device", lambda out, device: train_figures(out)),
    "gpt2": ("configs/gpt2_small_kjv.yaml, bf16 (stages: see the note)",
             lambda out, device: train_figures(out, "gpt2_run")),
}


def _last_error(out: Path, name: str) -> str:
    """The last line a failed part wrote to stderr (its one-line error, or the exception)."""
    path = out / f"{name}.log"
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.exists() else []
    return f"`{lines[-1][:160]}`" if lines else ""


def table(out: Path) -> int:
    rows, failed = [], False
    env = _json(out / "env.out") or {}
    device = env.get("device", "cuda")
    for line in (out / "parts.tsv").read_text().splitlines():
        name, rc, seconds, note = (line.split("\t") + [""])[:4]
        what, figures = CHECKS[name]
        result = "skip" if rc == "skip" else "pass" if rc == "0" else f"**FAIL** (exit {rc})"
        failed |= result.startswith("**FAIL")
        ran = rc != "skip" and not note.startswith("not run")
        error = _last_error(out, name) if result.startswith("**FAIL") and name != "gpu_tests" else ""
        details = "; ".join(f for f in (figures(out, device) if ran else "", note, error) if f)
        rows.append(f"| {what} | {result} | {seconds} | {details} |")
    total = (out / "total_sec.txt").read_text().strip() if (out / "total_sec.txt").exists() else "?"
    print(f"### GPU check: {env.get('gpu') or 'no GPU'}, device {device}\n")
    print("| check | result | s | key figures |\n|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n`scripts/gpu_check.sh`: {total} s in all; every part's output in {out}.")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("env", "table"):
        sys.exit(__doc__)
    sys.exit(env(sys.argv[2]) if sys.argv[1] == "env" else table(Path(sys.argv[2])))
