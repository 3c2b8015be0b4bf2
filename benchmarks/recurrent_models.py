"""Real recurrent models on their reference PyTorch loops: eager vs seqpar vs inductor.

    .venv/bin/python benchmarks/recurrent_models.py --families mamba rwkv --seq 256 1024 --batch 1

Each family is built from a transformers config at the widths of its
smallest released checkpoint (random weights, nothing downloaded), cut to one
layer (RecurrentGemma: one recurrent and one attention block, the smallest
stack it builds), float32, CPU, ``torch.set_num_threads(--threads)``:

* ``mamba``: state-spaces/mamba-130m (hidden 768, state 16, expand 2), on
  its reference loop (``use_mambapy=False, use_associative_scan=False``);
* ``mamba_associative_scan``: the same with transformers' default ``use_associative_scan=True``, which only a
  compiled call takes (torch's ``associative_scan``; eager runs the loop);
* ``rwkv``: RWKV/rwkv-4-169m-pile (hidden 768, intermediate 3072), on
  ``rwkv_linear_attention_cpu``;
* ``recurrent_gemma``: google/recurrentgemma-2b's block widths (hidden and
  LRU 2560, 10 heads) with the MLP cut to ``--gemma-mlp`` (the 15360-wide MLP
  is not the recurrence and would take minutes per call on two cores);
* ``xlstm``: NX-AI/xLSTM-7b (hidden 4096, 8 heads, mLSTM memory 256 x 512
  per head), on its native recurrent loop (``mlstm_recurrent_sequence_native``,
  taken in inference mode for a sequence shorter than ``chunk_size``; the
  chunk size is set above every sequence), width ``--xlstm-hidden``.

For each sequence length: the forward under ``torch.no_grad`` (eval mode) and
a training step (train mode: forward, ``sum of squares``, backward; in eval
mode RWKV returns its recurrent state, written in place where its backward
needs it, and cannot be differentiated, in eager too), medians of ``--repeats`` calls
after ``--warmup`` untimed ones (``--interleaved``: in turns), eager's time
over each (``> 1``: faster than eager); with ``--bound``, the most a free
recurrence can gain, then a backend that leaves only the dense products
(:func:`recurrence_free_bounds`); the chains seqpar found and its decisions;
the largest difference of the hidden states from eager's, relative to their
scale; the first seqpar call's time (Dynamo's trace, seqpar's passes, the
inner compile of what is left).
Markdown to stdout.
"""

from __future__ import annotations

import argparse
import collections
import copy
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from torch.utils._pytree import tree_leaves

from seqpar.backend import SeqparBackend
from timing import interleaved_medians, median_time, past_trials


def mamba(hidden=768, associative_scan=False):
    import transformers

    config = transformers.MambaConfig(vocab_size=1000, hidden_size=hidden, state_size=16, expand=2, conv_kernel=4,
                                      num_hidden_layers=1, use_mambapy=False)
    config.use_associative_scan = associative_scan
    return transformers.MambaModel(config)


def mamba_associative_scan(hidden=768):
    """Mamba with its default ``use_associative_scan``: eager runs the reference loop, a compiled call torch's
    ``associative_scan`` (what inductor's column then measures)."""
    return mamba(hidden, associative_scan=True)


def rwkv(hidden=768):
    import transformers

    config = transformers.RwkvConfig(vocab_size=1000, hidden_size=hidden, attention_hidden_size=hidden,
                                     intermediate_size=4 * hidden, num_hidden_layers=2, context_length=8192)
    return transformers.RwkvModel(config)


def recurrent_gemma(hidden=2560, mlp=2560):
    import transformers

    config = transformers.RecurrentGemmaConfig(
        vocab_size=1000, hidden_size=hidden, lru_width=hidden, num_attention_heads=10, head_dim=hidden // 10,
        num_key_value_heads=1, intermediate_size=mlp, attention_window_size=2048, conv1d_width=4,
        num_hidden_layers=2, block_types=["recurrent", "attention"],
    )
    return transformers.RecurrentGemmaModel(config)


def xlstm(hidden=4096):
    import transformers

    config = transformers.xLSTMConfig(vocab_size=1000, hidden_size=hidden, num_heads=8, num_blocks=1,
                                      mode="inference", chunk_size=16384)
    return transformers.xLSTMModel(config)


FAMILIES = {"mamba": mamba, "mamba_associative_scan": mamba_associative_scan, "rwkv": rwkv, "recurrent_gemma": recurrent_gemma, "xlstm": xlstm}
WIDTH_OPTION = {"recurrent_gemma": ("mlp", "gemma_mlp"), "xlstm": ("hidden", "xlstm_hidden")}


def hidden_states(model):
    return lambda ids: model(ids).last_hidden_state


def training_step(fn, ids):
    def step():
        fn(ids).square().sum().backward()

    return step


def forward(fn, ids):
    def run():
        with torch.no_grad():
            fn(ids)

    return run


class OpTimes(TorchDispatchMode):
    """Calls, seconds and floating-point operations (those of the ops torch's flop counter knows: products,
    convolutions; 0 for the rest) per aten op and input shapes, for the calls made while active (forward and
    backward)."""

    def __init__(self):
        super().__init__()
        self.groups = collections.defaultdict(lambda: [0, 0.0, 0])  # (op, shapes) -> [calls, seconds, flops]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        result = func(*args, **(kwargs or {}))
        group = self.groups[(func, tuple(tuple(arg.shape) for arg in tree_leaves((args, kwargs))
                                         if isinstance(arg, torch.Tensor)))]
        group[0] += 1
        group[1] += time.perf_counter() - start
        count = flop_registry.get(func.overloadpacket)
        group[2] += count(*args, **(kwargs or {}), out_val=result) if count is not None else 0
        return result


# Dense products: what no rewrite of a loop makes faster on a CPU already running BLAS / oneDNN at its peak.
DENSE_OPS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"}


def recurrence_free_bounds(run, seq: int, eager_seconds: float) -> str:
    """Amdahl's bounds on the speed-up of eager's call ``run`` (``eager_seconds`` a call): ``T / T_outside``, the
    recurrence free and everything else at eager's speed, and ``T / T_dense``, only the dense products outside
    the loop left (no backend beats that on a CPU whose BLAS runs at its peak), with the products' work and the
    rate eager ran them at (``GFLOP at GFLOP/s``: the why of the second bound).

    ``T_outside`` and ``T_dense`` come from one more call with every aten op timed, grouped by name and input
    shapes: a group called fewer than ``seq`` times is outside the loop (projections, attention, convolutions,
    norms; a loop's ops, forward or backward, run at least once per step). These are large ops, timed to within
    a microsecond each; the loop's Python and dispatch overhead, which a rewrite also removes, counts in ``T``.
    """
    with OpTimes() as timed:
        run()
    outside = [(func.overloadpacket.__name__, seconds, flops)
               for (func, _), (calls, seconds, flops) in timed.groups.items() if calls < seq]
    dense_seconds = sum(seconds for name, seconds, _ in outside if name in DENSE_OPS)
    dense_flops = sum(flops for name, _, flops in outside if name in DENSE_OPS)
    return (f"{eager_seconds / sum(seconds for _, seconds, _ in outside):.2f}x / {eager_seconds / dense_seconds:.2f}x "
            f"({dense_flops / 1e9:.0f} GFLOP at {dense_flops / dense_seconds / 1e9:.0f} GFLOP/s)")


def built(family: str, args):
    """``family``'s model in eval mode, at the widths ``args`` give (``--gemma-mlp``, ``--xlstm-hidden``)."""
    keyword, option = WIDTH_OPTION.get(family, (None, None))
    return FAMILIES[family](**({keyword: getattr(args, option)} if keyword else {})).eval()


def add_width_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gemma-mlp", type=int, default=2560)
    parser.add_argument("--xlstm-hidden", type=int, default=4096)


def chain_decisions(graphs) -> str:
    """The chains seqpar found in ``graphs`` (its graph records): kind, length, decision/forward/adjoint, outputs."""
    return ", ".join(
        f"{chain.kind} L={chain.length} {chain.decision}/{chain.method or '-'}/{chain.adjoint or '-'}"
        f"{' y=' + str(chain.outputs) if chain.outputs else ''}"
        for graph in graphs for chain in graph.chains
    ) or "none"


def timed(calls: dict, repeats: int, args, backend) -> dict:
    """Median seconds of each call after its warm-up (``--warmup`` calls; seqpar's also past its speed trials,
    :func:`~timing.past_trials`): one form after the other, or with ``--interleaved`` in turns (one call of each
    per turn: load that comes and goes, and the order, fall on every form alike)."""
    past_trials(calls["seqpar"], backend)
    if not args.interleaved:
        return {name: median_time(call, repeats, warmup=args.warmup) for name, call in calls.items()}
    return interleaved_medians(calls, repeats, budget=0.0, warmup=args.warmup)


def measure(family: str, seq: int, batch: int, repeats: int, args) -> str:
    torch._dynamo.reset()  # every row compiles afresh (the rows share the lambda's code: Dynamo's recompile limit)
    torch.manual_seed(0)
    model = built(family, args)
    ids = torch.randint(0, 1000, (batch, seq))
    backend = SeqparBackend({"policy": args.policy})
    models = {"eager": model, "seqpar": copy.deepcopy(model)}
    if not args.no_inductor:  # inductor compiles the unrolled loop: minutes per model at 256+ steps
        models["inductor"] = copy.deepcopy(model)
    fns = {name: hidden_states(module) if name == "eager" else
           torch.compile(hidden_states(module), backend=backend if name == "seqpar" else "inductor")
           for name, module in models.items()}
    cells = []
    with torch.no_grad():
        reference = fns["eager"](ids)
        scale = reference.abs().max().item()
        start = time.perf_counter()
        solved = fns["seqpar"](ids)
        compile_seconds = time.perf_counter() - start
        difference = (solved - reference).abs().max().item() / scale
    for kind, make in (("forward", forward), ("training", training_step)):
        if kind not in args.kinds:
            cells += ["not run", "-", "-", "-"]
            continue
        for module in models.values():
            module.train(kind == "training")
        try:
            times = timed({name: make(fn, ids) for name, fn in fns.items()}, repeats, args, backend)
        except RuntimeError as error:  # a model that eager cannot differentiate
            cells += [f"fails: {str(error)[:60]}", "-", "-", "-"]
            continue
        cells.append(f"{times['eager'] * 1e3:.1f} ms")
        cells += [f"{times['eager'] / times[name]:.2f}x" if name in times else "-" for name in ("seqpar", "inductor")]
        cells.append(recurrence_free_bounds(make(fns["eager"], ids), seq, times["eager"]) if args.bound else "-")
    decisions = chain_decisions(backend.graphs)
    kept = [f"{'training' if graph.speed.with_backward else 'forward'}: {graph.speed.kept}"
            for graph in backend.graphs if graph.speed is not None and graph.speed.kept]
    if kept:
        decisions += f"; graphs kept by the speed trial: {', '.join(kept)}"
    return (f"| {family} | {batch} | {seq} | " + " | ".join(cells)
            + f" | {difference:.1e} | {compile_seconds:.0f} s | {decisions} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--seq", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed calls per form: the median of 3 moved by 20%% between runs of seconds-long calls "
                             "(RESULTS, Mamba's associative_scan at batch 4), more than the 0.95 margin of §4")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed calls first (the first compiles; the second still allocates and builds caches; "
                             "seqpar's first run until its speed trials have decided)")
    parser.add_argument("--threads", type=int, default=2)
    add_width_options(parser)
    parser.add_argument("--no-inductor", action="store_true", help="leave out inductor's column")
    parser.add_argument("--interleaved", action="store_true",
                        help="time eager, seqpar and inductor in turns (calls of a second or more vary 10-30%% "
                             "between phases of one process; default: one after the other)")
    parser.add_argument("--bound", action="store_true",
                        help="time one more eager call per kind op by op: the speed-up a free recurrence would give "
                             "(the rest as eager runs it / only the dense products left)")
    parser.add_argument("--kinds", nargs="+", default=["forward", "training"], choices=["forward", "training"],
                        help="what to time (eager's training step at 4096 steps takes minutes a call)")
    parser.add_argument("--policy", default="auto", choices=["auto", "parallel", "sequential"],
                        help="seqpar's policy (default: auto, the cost model's choice)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, float32, CPU, seqpar policy {args.policy!r}; ratios are eager's time over each "
          "(> 1: faster than eager)\n")
    print("| family | batch | seq | forward eager | seqpar | inductor | bound | training eager | seqpar | inductor "
          "| bound | seqpar error | seqpar first call | chains (decision/forward/adjoint) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for family in args.families:
        for batch in args.batch:
            for seq in args.seq:
                print(measure(family, seq, batch, args.repeats, args), flush=True)


if __name__ == "__main__":
    main()
