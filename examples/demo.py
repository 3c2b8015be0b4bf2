"""seqpar demo: a 1024-layer tanh MLP trained through torch.compile(backend="seqpar").

Prints what seqpar found and decided, checks outputs and gradients against
eager PyTorch, and times a training step (forward + backward) against eager
in the same run, both with one intra-op thread. Twice: the model as it is
(an ``nn.Sequential`` of 1024 blocks: Dynamo inlines every block), and the
same blocks as ``seqpar.scan_layers(model)`` (one scan over stacked
parameters: Dynamo traces one block, and PyTorch pays per-parameter costs for
2 tensors instead of 2048).
"""

import statistics
import time

import torch
import torch.nn as nn

import seqpar

DEPTH, WIDTH, BATCH = 1024, 4, 1


def deep_mlp(depth: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)])


def training_step(model, x):
    model.zero_grad(set_to_none=True)
    loss = model(x).square().sum()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def median_time(fn, repeats=15):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(name, compiled, model, x, stacked_grads=lambda grads: grads):
    """Compile time, equality with eager ``model`` and the training-step speedup of ``compiled``.

    ``stacked_grads`` maps eager ``model``'s per-layer gradients to ``compiled``'s parameters.
    """
    start = time.perf_counter()
    loss, grads = training_step(compiled, x)
    print(f"{name}: compile + first step: {time.perf_counter() - start:.1f} s")
    ref_loss, ref_grads = training_step(model, x)
    ref_grads = stacked_grads(ref_grads)
    grad_error = max(float((g - r).abs().max() / r.abs().max().clamp_min(1e-12)) for g, r in zip(grads, ref_grads))
    print(f"{name}: loss: seqpar {loss.item():.7f}  eager {ref_loss.item():.7f}")
    print(f"{name}: largest gradient error relative to the largest gradient entry: {grad_error:.2e}")
    eager = median_time(lambda: training_step(model, x))
    parallel = median_time(lambda: training_step(compiled, x))
    print(f"{name}: training step: eager {eager * 1e3:.1f} ms, seqpar {parallel * 1e3:.1f} ms, "
          f"speedup {eager / parallel:.2f}x\n")


def main():
    # One intra-op thread for both sides: on tensors this small, OpenMP's worker
    # threads only add barrier waits (milliseconds per op when another process
    # holds the second core), which would make either timing meaningless.
    torch.set_num_threads(1)
    model = deep_mlp(DEPTH, WIDTH)
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(1))
    print(f"model: {DEPTH} x (Linear({WIDTH}, {WIDTH}) + Tanh), batch {BATCH}, float32, CPU\n")
    print(seqpar.explain(model, x), "\n")
    compare("nn.Sequential", torch.compile(model, backend="seqpar", options={"verify": True}), model, x)

    # The same blocks as one scan: parameters stacked as (1024, 4, 4) weights and (1024, 4) biases.
    scanned = seqpar.scan_layers(model)
    compare("scan_layers", torch.compile(scanned, backend="seqpar", options={"verify": True}), model, x,
            stacked_grads=lambda grads: [torch.stack(grads[0::2]), torch.stack(grads[1::2])])


if __name__ == "__main__":
    main()
