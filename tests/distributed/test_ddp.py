"""A model compiled with seqpar inside DistributedDataParallel, over 2 gloo ranks: training equals eager DDP.

``DDP(torch.compile(model, backend="seqpar"))`` is how a data-parallel user compiles: Dynamo's DDPOptimizer
splits the graph where DDP's gradient buckets end, so every piece reaches seqpar as its own graph, with its own
chain, and DDP's reducer all-reduces each parameter's gradient as autograd produces it (the chain op's adjoint
included). Four SGD steps on rank-dependent data must leave every parameter as eager DDP leaves it (float64,
tolerance 1e-12: Newton to 1e-10 relative converges quadratically, states and gradients exact to rounding).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from seqpar.testing.ranks import run_ranks

F64 = 1e-12


def trained(rank: int, compiled: bool, bucket_mb: float) -> tuple[torch.Tensor, list]:
    """The parameters after four SGD steps of a 32-layer tanh stack (width 128: 4 MiB of parameters, so several
    1 MiB buckets) under DDP, and the chains seqpar solved (empty when not ``compiled``)."""
    import torch._dynamo
    from torch.nn.parallel import DistributedDataParallel

    from seqpar.backend import SeqparBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(32) for m in (nn.Linear(128, 128), nn.Tanh())]).double()
    backend = SeqparBackend({"policy": "parallel", "min_chain": 4})
    ddp = DistributedDataParallel(torch.compile(model, backend=backend) if compiled else model,
                                  bucket_cap_mb=bucket_mb)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(4):
        loss = ddp(torch.randn(4, 128, dtype=torch.float64, generator=generator)).square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    chains = [(chain.decision, chain.length) for graph in backend.graphs for chain in graph.chains]
    return torch.cat([parameter.detach().flatten() for parameter in model.parameters()]), chains


def ddp_case(rank, world):
    eager, _ = trained(rank, compiled=False, bucket_mb=1)
    solved, chains = trained(rank, compiled=True, bucket_mb=1)
    return dict(error=float((solved - eager).abs().max()), chains=chains)


def test_a_seqpar_compiled_model_trains_under_ddp_as_eager_ddp_does():
    results = run_ranks(ddp_case, 2)
    for result in results:
        assert result["error"] < F64, result
        # DDP's buckets split the 32 layers into pieces, each solved as its own chain
        assert len(result["chains"]) > 1 and {decision for decision, _ in result["chains"]} == {"parallel"}
        assert sum(length for _, length in result["chains"]) == 32
