"""Where the evaluation harness's training step spends its time: FLOPs, achieved rate, and this CPU's ceiling.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_step_flops.py
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_step_flops.py --sizes 8,28 --members 1,5,30

For the downstream CNN (:class:`~synthgen.models.ensemble.GroupedCNN`, width ``--width``, batch
64) at each image size and member count E, counts the floating-point operations of one training
step (forward + backward, ``torch.utils.flop_counter``: convolutions and matmuls, the work that
scales with E), times ``--steps`` steps of forward, backward and AdamW, and prints milliseconds per
member-step and the achieved GFLOP/s. The ceiling rows time a large matrix product and a large
convolution on the same threads: the rate this CPU reaches when arithmetic is all there is. When
the grouped step already runs near that rate, batching more members cannot make a member-step
much cheaper: only less arithmetic (or cheaper arithmetic) can.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from synthgen.models import ensemble
from synthgen.models.small_cnn import SmallCNNConfig, seeded_cnn
from synthgen.host_memory import keep_freed_memory


def timed(step, repeats: int) -> float:
    """Seconds per call of ``step`` (after two warm-up calls)."""
    step(), step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats


def member_flops(size: int, width: int, batch: int = 64) -> int:
    """FLOPs of one member's forward + backward (a plain E = 1 network: the counter does not divide grouped convs by E)."""
    model = ensemble.GroupedCNN.from_member_states(SmallCNNConfig(width=width), (size, size), [seeded_cnn(SmallCNNConfig(width=width), (size, size), 0).state_dict()])
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(torch.randn(batch, 1, size, size)).reshape(-1, 10), torch.randint(0, 10, (batch,))).backward()
    return counter.get_total_flops()


def cnn_step(size: int, members: int, width: int, batch: int = 64):
    """One training step of E grouped CNNs as a closure (E members do E times one member's arithmetic)."""
    config = SmallCNNConfig(width=width)
    states = [seeded_cnn(config, (size, size), seed).state_dict() for seed in range(members)]
    model = ensemble.GroupedCNN.from_member_states(config, (size, size), states).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(batch, members, size, size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, config.n_classes, (members * batch,))

    def step() -> None:
        loss = F.cross_entropy(model(images).reshape(-1, config.n_classes), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def ceilings(repeats: int) -> list[tuple[str, float]]:
    """GFLOP/s of a 1024^3 fp32 matrix product and of a 64 -> 64 channel 3x3 convolution on 128 maps of 32x32."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    matmul = 2 * 1024**3 / timed(lambda: a @ b, repeats) / 1e9
    x = torch.randn(128, 64, 32, 32).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(64, 64, 3, 3).contiguous(memory_format=torch.channels_last)
    conv = 2 * 128 * 32 * 32 * 64 * 64 * 9 / timed(lambda: F.conv2d(x, weight, padding=1), repeats) / 1e9
    return [("1024^3 matrix product", matmul), ("3x3 conv 64->64, 128 x 32x32", conv)]


def main(
    sizes: Annotated[str, typer.Option(help="Image sizes, comma-separated.")] = "8,28",
    members: Annotated[str, typer.Option(help="Member counts E, comma-separated.")] = "1,5,30",
    width: Annotated[int, typer.Option(help="CNN width (evaluate.width).")] = 16,
    steps: Annotated[int, typer.Option(help="Timed steps per row.")] = 30,
) -> None:
    keep_freed_memory()  # as the CLI runs the stages (SYNTHGEN_HOST_MEMORY=default: glibc's own malloc)
    console = Console(width=160)
    threads = os.environ.get("OMP_NUM_THREADS")
    console.print("$ " + (f"OMP_NUM_THREADS={threads} " if threads else "") + shlex.join([sys.executable, *sys.argv]), highlight=False)
    table = Table(title=f"evaluate training step: FLOPs and rate ({torch.get_num_threads()} threads, width {width}, batch 64)")
    for column in ("work", "MFLOP per member-step", "ms per member-step", "GFLOP/s", "share of the ceiling"):
        table.add_column(column, justify="left" if column == "work" else "right")
    rows = []
    for size in (int(s) for s in sizes.split(",")):
        for count in (int(e) for e in members.split(",")):
            step, flops = cnn_step(size, count, width), count * member_flops(size, width)
            seconds = timed(step, steps)
            rows.append((f"{size}x{size}, E={count}", flops / count / 1e6, 1e3 * seconds / count, flops / seconds / 1e9))
    ceiling = dict(ceilings(max(3, steps // 10)))
    best_ceiling = max(ceiling.values())  # the faster of the two: what this CPU reaches
    for work, mflop, ms, rate in rows:
        table.add_row(work, f"{mflop:.1f}", f"{ms:.2f}", f"{rate:.1f}", f"{rate / best_ceiling:.0%}")
    for work, rate in ceiling.items():
        table.add_row(f"ceiling: {work}", "", "", f"{rate:.1f}", f"{rate / best_ceiling:.0%}")
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
