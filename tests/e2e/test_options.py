"""The backend's options: defaults, validation and environment overrides."""

import pytest

from seqpar.options import Options, parse_options


def test_defaults_when_no_options_are_given():
    assert parse_options(None, environ={}) == Options()


def test_unknown_option_is_rejected_with_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown seqpar option\(s\) \['jacobain'\].*valid options: jacobian, tol"):
        parse_options({"jacobain": "full"}, environ={})


@pytest.mark.parametrize(
    "options, message",
    [
        ({"jacobian": "dense"}, "jacobian='dense' is not one of"),
        ({"policy": "fast"}, "policy='fast' is not one of"),
        ({"inner": "tvm"}, "inner='tvm' is not one of"),
        ({"sequential_form": "looped"}, "sequential_form='looped'"),
        ({"adjoint": "exact"}, "adjoint='exact'"),
        ({"tol": -1.0}, "tol=-1.0 must be a positive finite number"),
        ({"tol": float("inf")}, "tol=inf must be a positive finite number"),
        ({"tol": "small"}, "tol='small' must be a positive finite number"),
        ({"max_iters": 0}, "max_iters=0 must be an int >= 1"),
        ({"min_chain": 1}, "min_chain=1 must be an int >= 2"),
        ({"min_chain": 4.5}, "min_chain=4.5 must be an int >= 2"),
        ({"verify": -2}, "verify=-2 must be a bool or an int >= 0"),
        ({"debug_dir": 3}, "debug_dir=3 must be a path"),
        ({"mode": "fastest"}, "mode='fastest' is not one of inductor's modes ('default', "),
        ({"mode": "max-autotune", "inner": "eager"}, "mode='max-autotune' is inductor's; the inner backend is 'eager'"),
    ],
)
def test_bad_values_raise_value_error_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_options(options, environ={})


def test_valid_values_are_kept():
    options = parse_options(
        {"jacobian": "diag", "tol": 1e-6, "max_iters": 7, "min_chain": 3, "policy": "parallel",
         "inner": "eager", "verify": 5, "debug_dir": "/tmp/x"},
        environ={},
    )
    assert parse_options({"mode": "reduce-overhead"}, environ={}).mode == "reduce-overhead"
    assert (options.jacobian, options.tol, options.max_iters, options.min_chain) == ("diag", 1e-6, 7, 3)
    assert (options.policy, options.inner, options.verify, options.debug_dir) == ("parallel", "eager", 5, "/tmp/x")


def test_environment_overrides_verify_and_debug_dir():
    options = parse_options({"verify": False}, environ={"SEQPAR_VERIFY": "1", "SEQPAR_DEBUG_DIR": "/tmp/dump"})
    assert options.verify == 1
    assert options.debug_dir == "/tmp/dump"


def test_verify_accepts_true_and_every_n():
    assert parse_options({"verify": True}, environ={}).verify == 1
    assert parse_options({"verify": 10}, environ={}).verify == 10
    assert parse_options({}, environ={"SEQPAR_VERIFY": "off"}).verify == 0
