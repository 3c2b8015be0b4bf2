"""The backend's options: names, defaults, validation, environment overrides.

``torch.compile(model, backend="seqpar", options={...})`` accepts exactly the
fields of :class:`Options`. ``SEQPAR_VERIFY=1`` (or ``=N``: every N-th call)
and ``SEQPAR_DEBUG_DIR=path`` override ``verify`` and ``debug_dir``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .runtime.spec import ADJOINT_CHOICES as ADJOINTS
from .runtime.spec import JACOBIAN_CHOICES as JACOBIANS

POLICIES = ("auto", "parallel", "sequential")
SEQUENTIAL_FORMS = ("auto", "unrolled", "rolled")
INNER_BACKENDS = ("inductor", "eager", "aot_eager")


@dataclass(frozen=True)
class Options:
    """Validated backend options.

    jacobian:   blocks of the Newton linearisation: "full" (Newton), "diag"
                (quasi-Newton), "identity" (Picard), "estimate" (``J ~ c_l I``
                per step from one VJP with a random probe), "auto" (by state
                width; for denoising chains Picard or the estimate, by the
                predictability probe).
    tol:        relative convergence tolerance: the solve stops when
                ``max_k |ds_k| <= tol max_k |s_k|`` for every state vector (one
                batch element at one position), whatever the states' scale;
                None: by dtype (1e-10 float64, 1e-5 float32; ten times smaller
                for the linearly converging Jacobians, all but "full").
    max_iters:  parallel iterations before the rest is evaluated sequentially;
                None: 40, or for a windowed solve ``4 * ceil(L / window) + 40``.
    window:     active positions per parallel iteration (sliding-window
                Picard, ParaDiGMS): an int >= 1, None (the whole chain) or
                "auto": 32 for denoising chains, the whole chain otherwise;
                any window at most the positions whose Jacobian blocks fit
                1/16 of the device's memory (seqpar.runtime.budget).
    min_chain:  shortest chain worth rewriting (segments).
    policy:     "auto" (cost model + predictability probe; an inference graph
                is then timed against the original graph on its first calls and
                the faster kept: :mod:`seqpar.speed`), "parallel" or
                "sequential" for every chain.
    sequential_form: how a chain kept sequential is compiled: "unrolled" (left
                in the graph for the inner backend: its run speed and compile
                time), "rolled" (one op looping over stacked parameters: fast
                to compile, eager run speed; a contractive chain kept for cost
                runs a compiled loop where it can: the C loop of a small dense
                step, or with inner="inductor" its step, with the producers of
                its per-step inputs, compiled by inductor), "auto": rolled from
                64 steps up and for every ``scan`` (a scan "unrolled" stays a scan).
    adjoint:    backward solve: "auto" (cost model), "parallel", "sequential"; a
                chain autograd does not record (under ``torch.no_grad``) has none.
    inner:      backend for the rest of the graph.
    mode:       inductor's mode for the inner backend's compile (``inner="inductor"``): "default",
                "reduce-overhead" (CUDA graphs), "max-autotune", "max-autotune-no-cudagraphs" (torch's
                ``list_mode_options``). ``torch.compile(..., mode=...)`` arrives here; torch.compile takes
                ``mode`` or ``options``, not both, so with other options pass it among them.
    verify:     0/False: off; True/1: check the first call; N > 1: the first
                and every N-th call. A check compares each chain's solve with
                its sequential loop (a mismatched chain is solved sequentially
                from then on) and the graph's outputs with the original graph
                (a mismatch there runs the original graph from then on).
    debug_dir:  directory for the debug dump (None: no dump).
    """

    jacobian: str = "auto"
    tol: float | None = None
    max_iters: int | None = None
    window: int | str | None = "auto"
    min_chain: int = 8
    policy: str = "auto"
    sequential_form: str = "auto"
    adjoint: str = "auto"
    inner: str = "inductor"
    mode: str = "default"
    verify: int = 0
    debug_dir: str | None = None


def _valid_names() -> str:
    return ", ".join(field.name for field in dataclasses.fields(Options))


def parse_options(options: dict | None, environ=os.environ) -> Options:
    """Validate ``options`` (unknown keys and bad values raise ValueError) and apply the environment."""
    options = dict(options or {})
    unknown = sorted(set(options) - {field.name for field in dataclasses.fields(Options)})
    if unknown:
        raise ValueError(f"unknown seqpar option(s) {unknown}; valid options: {_valid_names()}")
    if environ.get("SEQPAR_VERIFY"):
        options["verify"] = environ["SEQPAR_VERIFY"]
    if environ.get("SEQPAR_DEBUG_DIR"):
        options["debug_dir"] = environ["SEQPAR_DEBUG_DIR"]
    for name, choices in (
        ("jacobian", JACOBIANS),
        ("policy", POLICIES),
        ("sequential_form", SEQUENTIAL_FORMS),
        ("inner", INNER_BACKENDS),
        ("adjoint", ADJOINTS),
    ):
        if name in options and options[name] not in choices:
            raise ValueError(f"seqpar option {name}={options[name]!r} is not one of {choices}")
    if options.get("tol") is not None:
        tol = options["tol"]
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < float("inf"):
            raise ValueError(f"seqpar option tol={tol!r} must be a positive finite number")
        options["tol"] = float(tol)
    for name, lowest in (("max_iters", 1), ("min_chain", 2)):
        value = options.get(name)
        if value is None and name == "max_iters":
            continue
        if name in options and (isinstance(value, bool) or not isinstance(value, int) or value < lowest):
            raise ValueError(f"seqpar option {name}={value!r} must be an int >= {lowest}")
    _check_mode(options.get("mode", "default"), options.get("inner", "inductor"))
    window = options.get("window", "auto")
    if window not in ("auto", None) and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"seqpar option window={window!r} must be None, 'auto' or an int >= 1")
    if "verify" in options:
        options["verify"] = _parse_verify(options["verify"])
    if options.get("debug_dir") is not None and not isinstance(options["debug_dir"], (str, os.PathLike)):
        raise ValueError(f"seqpar option debug_dir={options['debug_dir']!r} must be a path")
    if options.get("debug_dir") is not None:
        options["debug_dir"] = os.fspath(options["debug_dir"])
    return Options(**options)


def _check_mode(mode, inner: str) -> None:
    """A mode is one of inductor's, and only for inductor."""
    from torch._inductor import list_mode_options

    modes = tuple(list_mode_options())
    if mode not in modes:
        raise ValueError(f"seqpar option mode={mode!r} is not one of inductor's modes {modes}")
    if mode != "default" and inner != "inductor":
        raise ValueError(f"seqpar option mode={mode!r} is inductor's; the inner backend is {inner!r} "
                         "(inner='inductor' takes a mode)")


def _parse_verify(value) -> int:
    if isinstance(value, str):
        lowered = value.strip().lower()
        value = {"true": 1, "yes": 1, "on": 1, "false": 0, "no": 0, "off": 0}.get(lowered, lowered)
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"seqpar option verify={value!r} must be a bool or a positive int") from None
    if isinstance(value, bool):
        return int(value)
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"seqpar option verify={value!r} must be a bool or an int >= 0")
    return value
