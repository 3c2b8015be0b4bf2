"""seqpar's logger and debug dumps.

``TORCH_LOGS="+seqpar"`` turns the ``seqpar`` logger on (registered with
``torch._logging``). With ``debug_dir`` set, every compiled graph gets a folder
``graph_<k>/`` holding ``original.py`` and ``rewritten.py`` (the graph code
before and after the rewrite), ``chains.txt`` (the chain table) and
``chains.json`` (chains, decisions with reasons, and the solver stats of the
last call), and per chain ``chain_<i>_step.py`` (its step's graph) and, where
it serves per-step outputs, ``chain_<i>_outputs.py`` (their graph); ``hints.txt`` beside the folders says what the user could change
(``seqpar.report.hints_for``: graph breaks in a loop, long unrolled chains that
a scan would compile in seconds). The same texts go to ``torch._logging.trace_structured``
artifacts, which tlparse shows under ``TORCH_TRACE``.
"""

from __future__ import annotations

import json
import logging
import os

import torch._logging
from torch._logging import trace_structured

log = logging.getLogger("seqpar")
try:
    torch._logging._internal.register_log("seqpar", "seqpar")
except (AttributeError, ValueError):  # an older or newer torch._logging: plain logging still works
    pass


def emit_artifact(name: str, text: str) -> None:
    """One ``trace_structured`` string artifact, visible to tlparse."""
    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": name, "encoding": "string"},
        payload_fn=lambda: text,
    )


def write_dump(debug_dir: str | None, record) -> None:
    """Write (or refresh) the dump of one :class:`~seqpar.backend.GraphRecord`."""
    emit_artifact(f"seqpar_graph{record.index}_chains", record.table())
    emit_artifact(f"seqpar_graph{record.index}_rewritten", record.rewritten_code)
    if not debug_dir:
        return
    folder = os.path.join(debug_dir, f"graph_{record.index}")
    os.makedirs(folder, exist_ok=True)
    files = {
        "original.py": record.original_code,
        "rewritten.py": record.rewritten_code,
        "chains.txt": record.table(),
        "chains.json": json.dumps(
            {
                "graph": record.index,
                "verification": record.verification,
                "inner_error": record.inner_error,
                "speed": record.speed.summary() if record.speed is not None else None,
                "chains": [chain.as_dict() for chain in record.chains],
            },
            indent=2,
            default=str,
        ),
    }
    for index, chain in enumerate(record.chains):
        if chain.step_code:
            files[f"chain_{index}_step.py"] = chain.step_code
        if chain.output_code:
            files[f"chain_{index}_outputs.py"] = chain.output_code
    for name, text in files.items():
        with open(os.path.join(folder, name), "w") as handle:
            handle.write(text)


def write_hints(debug_dir: str | None, hints: list[str]) -> None:
    """``hints.txt`` at the top of the dump (and a ``seqpar_hints`` artifact): what the user could change."""
    if not hints:
        return
    text = "\n".join(f"hint: {hint}" for hint in hints) + "\n"
    emit_artifact("seqpar_hints", text)
    if debug_dir:
        os.makedirs(debug_dir, exist_ok=True)
        with open(os.path.join(debug_dir, "hints.txt"), "w") as handle:
            handle.write(text)
