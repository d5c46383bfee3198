"""tools/gpu_check.py, the GPU check, is not broken: its CPU form runs every check that exists on a CPU and
passes, and without a GPU the script refuses in one line."""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"
CPU_CHECKS = ["fp16", "bf16", "int8", "int4", "compile", "parallel"]  # all of them have a CPU form


def run(*args, **env):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env={**clean, **env}, timeout=120)


def test_tiny_model_on_the_cpu_passes_every_check():
    out = run("--tiny", "--device", "cpu")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    for name in CPU_CHECKS:
        line = next((line for line in lines if line.split(":")[0].split()[-1:] == [name]), None)
        assert line is not None and line.startswith(f"PASS {name}: ") and "tok/s" in line, (name, out.stdout)
    assert not any(line.startswith("FAIL") for line in lines), out.stdout
    assert max(map(len, lines)) <= 88, out.stdout


def test_without_a_gpu_it_stops_with_one_error_line():
    out = run(CUDA_VISIBLE_DEVICES="")  # no GPU, whatever the machine has
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--tiny --device cpu" in lines[0]


def test_the_cpu_needs_the_tiny_model():
    out = run("--device", "cpu")
    assert out.returncode == 2 and out.stderr.startswith("error: ") and len(out.stderr.splitlines()) == 1
