"""The benchmarks are GPU-ready: every one takes ``--device`` (default cpu), nothing in them or in the
package moves tensors with ``.cuda()``, the CPU is named only where a part deliberately stays there,
and the shared helpers (benchmarks/devices.py) refuse a device the machine lacks and report the
machine (device, CPU flags, load) with the results."""

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import devices  # noqa: E402

# Where a benchmark names the CPU on purpose, whatever --device says (and why).
CPU_ON_PURPOSE = {
    "bench_memory.py": 1,  # the base checkpoint's values do not matter for memory: written on the CPU
    "bench_real_arch.py": 1,  # parameter and FLOP counts do not depend on the device
}


def _scripts() -> list[Path]:
    return sorted(BENCH.glob("bench_*.py"))


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and (getattr(n.func, "id", None) == name or getattr(n.func, "attr", None) == name)
    ]


def _named_cpu(tree: ast.AST) -> int:
    """``torch.device("cpu")`` calls in ``tree``."""
    return sum(
        1 for c in _calls(tree, "device") if c.args and isinstance(c.args[0], ast.Constant) and c.args[0].value == "cpu"
    )


@pytest.mark.parametrize("script", _scripts(), ids=lambda p: p.name)
def test_every_benchmark_takes_a_device(script):
    tree = ast.parse(script.read_text())
    assert _calls(tree, "add_device_argument"), f"{script.name}: add --device (devices.add_device_argument)"
    assert _named_cpu(tree) == CPU_ON_PURPOSE.get(script.name, 0), f"{script.name}: use the --device given"


def test_nothing_moves_tensors_with_cuda_calls():
    # .cuda() pins a tensor to the current GPU behind the caller's back; .to(device) says where.
    files = [*_scripts(), *sorted((ROOT / "src" / "difflora").rglob("*.py"))]
    found = [f"{p.name}:{c.lineno}" for p in files for c in _calls(ast.parse(p.read_text()), "cuda")]
    assert found == []


def test_a_cuda_device_is_refused_up_front_where_there_is_none():
    assert devices.parse_device("cpu") == torch.device("cpu")
    with pytest.raises(argparse.ArgumentTypeError, match="the benchmarks run on cpu or cuda"):
        devices.parse_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(argparse.ArgumentTypeError, match="this machine has no CUDA device; use --device cpu"):
            devices.parse_device("cuda")


def test_the_machine_line_names_device_flags_and_load():
    info = devices.machine(torch.device("cpu"))
    assert set(info["cpu_flags"]) <= set(devices.SHOWN_FLAGS)
    line = devices.machine_line(info)
    assert line.startswith("device cpu, ") and "CPU flags: " in line and "native bf16: " in line
    assert "load average" in line
    t0 = devices.clock(torch.device("cpu"))
    assert devices.clock(torch.device("cpu")) >= t0


def _tiny_step(device: torch.device, precision: str) -> torch.Tensor:
    import bench_scale

    trainer = bench_scale.difflora_trainer("tiny-unet", 2, device)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.step(precision, compiled=False)
    return torch.stack([(p.detach() - b).abs().max() for p, b in zip(trainer.model.parameters(), before, strict=True)])


def test_the_p5_step_runs_on_the_device_given_in_the_precision_given():
    changed = _tiny_step(torch.device("cpu"), "auto")
    assert torch.isfinite(changed).all() and changed.max() > 0  # a real step: the weights moved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the CPU run above stands in")
def test_the_p5_step_runs_on_cuda_without_host_reads():
    torch.cuda.set_sync_debug_mode("warn")
    try:
        changed = _tiny_step(torch.device("cuda"), "auto")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert changed.device.type == "cuda" and torch.isfinite(changed).all()


def test_the_plain_sdpa_variant_really_swaps_the_unets_attention():
    import bench_scale

    from difflora.nets import layers, unet

    assert unet.dot_product_attention is layers.dot_product_attention
    with bench_scale.plain_sdpa():
        assert unet.dot_product_attention is torch.nn.functional.scaled_dot_product_attention
    assert unet.dot_product_attention is layers.dot_product_attention


_FAULTS = """
import sys
sys.path.insert(0, {bench!r})
import torch, devices
steady = devices.steady_allocator()
before = devices.minor_faults()
torch.empty(10 << 20).fill_(1.0)  # 40 MiB: above glibc's largest self-tuned mmap threshold (32 MiB)
print(steady, devices.minor_faults() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_the_steady_allocator_is_set_on_glibc_and_page_faults_are_counted():
    # Whether a later block reuses freed memory depends on where the kernel placed the heap (glibc
    # maps a block when the heap cannot grow), so only what is deterministic is asserted: mallopt
    # takes the settings, and a fresh 40 MiB block is counted as ~10,240 pages of 4 KiB faulted in.
    code = _FAULTS.format(bench=str(BENCH))
    steady, faults = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert steady == "True" and int(faults) >= 10_000
