"""batch_stacks: a stack of per-step copies of one computation becomes one batched computation, equal in values.

Each case captures a Dynamo graph (fake example values, as the backend gets
it), batches its stacks, and compares the batched graph with eager in float64
(bitwise for pointwise ops and selects: the batched op computes each row as
the copy did; linear to 1e-12, a matmul summing in another order).
"""

import torch
import torch.nn.functional as F

from seqpar.backend import SeqparBackend
from seqpar.passes.vectorize import batch_stacks

T, B, D = 8, 3, 5


def captured(fn, *args):
    """Dynamo's graph of ``fn`` and the compiled ``fn``, which runs that graph as it is when called."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return lambda *inputs: gm(*inputs)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=capture, fullgraph=True)
    compiled(*args)
    (gm,) = graphs
    return gm, compiled


def ops(gm, name):
    return sum(1 for node in gm.graph.nodes if getattr(node.target, "__name__", node.target) == name)


def batched_equals_eager(fn, *args, expected_batched=1, atol=0.0):
    gm, compiled = captured(fn, *args)
    assert batch_stacks(gm) == expected_batched
    torch.testing.assert_close(compiled(*args), fn(*args), rtol=0, atol=atol)
    return gm


def inputs(seed=0):
    torch.manual_seed(seed)
    return torch.randn(B, T, D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)


def test_pointwise_copies_with_a_shared_weight_become_one_op_on_the_slices():
    def fn(x, w):
        return torch.stack([torch.sigmoid(x[:, t]) * w + 1.0 for t in range(T)], dim=1)

    gm = batched_equals_eager(fn, *inputs())
    assert ops(gm, "sigmoid") == 1 and ops(gm, "stack") == 0


def test_a_lower_rank_operand_is_aligned_to_the_right_as_each_step_broadcast_it():
    def fn(x, y):  # x[:, t]: (B, D), y[t]: (D,)
        return torch.stack([x[:, t] * y[t] for t in range(T)])

    x, _ = inputs()
    batched_equals_eager(fn, x, torch.randn(T, D, dtype=torch.float64))


def test_values_before_the_run_of_copies_are_kept_in_front():
    def fn(x, h0):  # a chain's states after its first step was peeled: [h0, f(x_1), .., f(x_{T-1})]
        return torch.stack([h0] + [torch.tanh(x[:, t]) for t in range(1, T)])

    x, _ = inputs()
    batched_equals_eager(fn, x, torch.randn(B, D, dtype=torch.float64))


def test_every_other_step_and_reversed_steps_are_slices_too():
    def fn(x):
        return torch.stack([x[:, 2 * t].exp() for t in range(T // 2)] + [x[:, T - 1 - t].exp() for t in range(2)])

    batched_equals_eager(fn, inputs()[0])


def test_linear_with_a_shared_weight_maps_the_steps_at_once():
    def fn(x, weight, bias):
        return torch.stack([F.linear(x[:, t].float(), weight, bias) for t in range(T)], dim=-2)

    weight, bias = torch.randn(4, D), torch.randn(4)
    batched_equals_eager(fn, inputs()[0], weight, bias, atol=1e-6)


def test_matmul_of_per_step_matrices_broadcasts_its_batch_dims_with_the_steps():
    def outer(k, v):  # xLSTM's k_l v_l^T per head: (B, H, D, 1) @ (B, H, 1, E)
        return torch.stack([k[:, :, t][:, :, :, None] @ v[:, :, t][..., None, :] for t in range(T)])

    k, v = torch.randn(B, 2, T, D, dtype=torch.float64), torch.randn(B, 2, T, 3, dtype=torch.float64)
    gm = batched_equals_eager(outer, k, v)
    assert ops(gm, "matmul") == 1 and ops(gm, "getitem") == 2

    def with_shared_batch(x, w):  # per step (B, D) @ shared (2, D, 4) -> (2, B, 4): the step dim goes in front of 2
        return torch.stack([torch.matmul(x[:, t], w) for t in range(T)])

    batched_equals_eager(with_shared_batch, inputs()[0], torch.randn(2, D, 4, dtype=torch.float64), atol=1e-12)

    def vector_times_shared(x, w):  # a per-step vector operand: batched it would be a matrix
        return torch.stack([torch.matmul(x[0, t], w) for t in range(T)])

    gm, _ = captured(vector_times_shared, inputs()[0], torch.randn(D, 4, dtype=torch.float64))
    assert batch_stacks(gm) == 0


def test_an_index_around_the_step_int_is_applied_to_the_stacked_slices():
    # xLSTM's native loop reads its gates as f[:, :, t, None] and its keys as k[:, :, t, :]: these stacks were left
    # as L copies, hundreds of nodes for inductor (a 256-step xLSTM block took 5 minutes to compile).
    def fn(x, w):
        gates = torch.stack([F.logsigmoid(x[:, t, None]) * w for t in range(T)])
        keys = torch.stack([x[:, t, :] + 1.0 for t in range(T)])
        picked = torch.stack([x[:, t, None, 1:4] for t in range(1, T, 2)])
        return gates, keys, picked

    gm = batched_equals_eager(fn, *inputs(), expected_batched=3)
    assert ops(gm, "log_sigmoid") == 1 and ops(gm, "stack") == 0


def test_stacks_that_batching_would_change_stay():
    x, w = inputs()
    cases = {
        "an op it does not know": lambda x, w: torch.stack([torch.cumsum(x[:, t], 0) for t in range(T)]),
        "an in-place op": lambda x, w: torch.stack([(x[:, t] * w).relu_() for t in range(T)]),
        "a random draw": lambda x, w: torch.stack([F.dropout(x[:, t], 0.5, training=True) for t in range(T)]),
        "advanced indexing": lambda x, w: torch.stack([x[:, t][[0, 2]] for t in range(T)]),
        "a weight that differs per step": lambda x, w: torch.stack([x[:, t] * (w + t) for t in range(T)]),
        "steps of different tensors": lambda x, w: torch.stack([x[:, t] if t % 2 else w.expand(B, D)
                                                                for t in range(T)]),
    }
    for reason, fn in cases.items():
        torch.manual_seed(0)
        gm, _ = captured(fn, x, w)
        assert batch_stacks(gm) == 0, reason


def test_a_rank0_step_value_that_would_promote_differently_when_stacked_stays():
    def fn(x, c):  # x[t] * c: float32 0-d times float64 0-d is float64; stacked (T,) float32 times it is float32
        return torch.stack([x[t] * c for t in range(T)])

    x, c = torch.randn(T), torch.tensor(2.0, dtype=torch.float64)
    gm, compiled = captured(fn, x, c)
    assert batch_stacks(gm) == 0
    assert compiled(x, c).dtype == torch.float64


def test_a_recurrence_reading_computed_inputs_compiles_to_a_graph_of_constant_size():
    """The chain's per-step inputs ``x[:, t] * 2 + b`` are computed once for all steps: the graph the inner
    compiler gets does not grow with the number of steps."""

    def run(x, a, b):
        h, out = torch.zeros(x.shape[0], x.shape[2], dtype=x.dtype), []
        for t in range(x.shape[1]):
            h = a * h + (x[:, t] * 2.0 + b)
            out.append(h)
        return torch.stack(out, dim=1)

    sizes = []
    for steps in (32, 96):
        torch.manual_seed(0)
        x, a, b = torch.randn(2, steps, 4, dtype=torch.float64), torch.rand(4, dtype=torch.float64), torch.randn(4)
        backend = SeqparBackend({"policy": "parallel", "inner": "eager"})
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(run, backend=backend)(x, a, b.double()), run(x, a, b.double()),
                                   rtol=1e-12, atol=1e-12)
        (record,) = backend.graphs
        assert [chain.decision for chain in record.chains] == ["parallel"]
        sizes.append(len(record.rewritten_code.splitlines()))
    assert sizes[0] == sizes[1] < 40


def test_reshapes_and_dim_taking_ops_get_the_step_dim_in_front():
    def fn(x):
        rows = [torch.softmax(x[:, t].reshape(B * D).unsqueeze(0).transpose(0, 1), dim=0).sum(-1) for t in range(T)]
        return torch.stack(rows)

    gm = batched_equals_eager(fn, inputs()[0])
    assert ops(gm, "softmax") == 1


def test_dim_taking_ops_at_their_default_dims_stay():
    x = inputs()[0]
    for fn in (lambda x: torch.stack([x[:, t].flatten() for t in range(T)]),
               lambda x: torch.stack([x[:, t].amax() for t in range(T)]),
               lambda x: torch.stack([x[:, t].view(torch.int64) for t in range(T)])):
        gm, compiled = captured(fn, x)
        assert batch_stacks(gm) == 0


def test_copies_with_an_in_place_write_between_them_stay():
    """Row t reads x before the t-th increment: batched at the stack, every row would read the last x."""

    def fn(x):
        rows = []
        for t in range(T):
            rows.append(x[:, t] * 2.0)
            x.add_(1.0)
        return torch.stack(rows)

    x = inputs()[0]
    gm, compiled = captured(fn, x.clone())
    assert batch_stacks(gm) == 0
    torch.testing.assert_close(compiled(x.clone()), fn(x.clone()), rtol=0, atol=0)
