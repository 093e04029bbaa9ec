"""CPU ms of one 3x3x3 convolution (forward + backward), the same voxels at batch 1, 2 and 4,
through torch's ``Conv3d`` (and the backend torch picks) and through srdvol's ``TimeConv3d``.

Run from the repository root, one thread::

    taskset -c 0 python benchmarks/issue13/conv_batch_one.py
"""

from __future__ import annotations

import os
import time

import torch

from srdvol.model.layers import TimeConv3d


def cpu_ms(module: torch.nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    x = x.clone().requires_grad_(True)
    for _ in range(2):
        module(x).sum().backward()
    start = time.process_time()
    for _ in range(repeats):
        module(x).sum().backward()
    return (time.process_time() - start) / repeats * 1000


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    plain = torch.nn.Conv3d(8, 8, 3, padding=1)
    ours = TimeConv3d(8, 8, 3, padding=1)
    print(f"load average {os.getloadavg()}")
    print("| input | torch backend | torch Conv3d ms | srdvol TimeConv3d ms |")
    print("|---|---|---|---|")
    for shape in [(1, 8, 64, 32, 32), (2, 8, 32, 32, 32), (4, 8, 16, 32, 32)]:
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last_3d)
        backend = torch._C._select_conv_backend(
            x,
            plain.weight,
            plain.bias,
            plain.stride,
            plain.padding,
            plain.dilation,
            False,
            [0, 0, 0],
            1,
            None,
        )
        print(
            f"| {shape} | {str(backend).split('.')[-1]} | {cpu_ms(plain, x):.1f} "
            f"| {cpu_ms(ours, x):.1f} |"
        )


if __name__ == "__main__":
    main()
