"""pytest-benchmark wiring: ``--preset`` picks the cases, the environment goes into the JSON.

Run through ``python benchmarks/run.py --preset quick`` (which also writes the tables and plots),
or directly: ``python -m pytest benchmarks --preset quick --benchmark-json out.json``.
"""
import os
from functools import lru_cache

import pytest
import torch

from benchmarks.env import capture_environment, peak_bandwidth_gbps
from benchmarks.presets import PRESETS, get_preset
from benchmarks.providers import make_inputs, reference_loss_and_grad, reference_semantics

_ENVIRONMENT = pytest.StashKey[dict]()


def pytest_addoption(parser):
    group = parser.getgroup("fastkd benchmarks")
    group.addoption("--preset", default=os.environ.get("FASTKD_BENCH_PRESET", "quick"),
                    choices=sorted(PRESETS), help="benchmark preset (default: quick)")
    group.addoption("--bench-device", default="cuda" if torch.cuda.is_available() else "cpu",
                    choices=("cpu", "cuda"), help="device for the loss and cache benchmarks")


def pytest_generate_tests(metafunc):
    if "loss_case" in metafunc.fixturenames:
        preset = get_preset(metafunc.config.getoption("--preset"))
        pairs = [(case, provider) for case in preset.loss_cases
                 for provider in preset.providers_for(case)]
        metafunc.parametrize(("loss_case", "provider"), pairs,
                             ids=[f"{case.id}-{provider}" for case, provider in pairs])


@pytest.fixture(scope="session")
def preset(pytestconfig):
    return get_preset(pytestconfig.getoption("--preset"))


@pytest.fixture(scope="session")
def device(pytestconfig):
    name = pytestconfig.getoption("--bench-device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.exit("--bench-device cuda given but torch sees no CUDA device", returncode=2)
    return name


@pytest.fixture(scope="session")
def environment(pytestconfig, device):
    env = capture_environment(measure_cpu_bandwidth=True)
    env["bench_device"] = device
    env["peak_bandwidth_gbps"] = peak_bandwidth_gbps(device, env)
    pytestconfig.stash[_ENVIRONMENT] = env
    return env


@pytest.fixture(scope="session")
def case_data(device):
    """``case_data(case) -> (student, teacher, labels, reference_of)``, kept for the latest case
    only (the providers of one case run back to back), so large inputs are made once and each
    float64 reference (``reference_of(provider)``; sparse cases have two) computed once."""
    @lru_cache(maxsize=1)
    def build(case):
        student, teacher, labels = make_inputs(case, device)

        @lru_cache(maxsize=None)
        def reference(semantics):
            return reference_loss_and_grad(case, student, teacher, labels, semantics=semantics)

        def reference_of(provider):
            return reference(reference_semantics(case, provider))
        return student, teacher, labels, reference_of
    yield build
    build.cache_clear()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    environment = config.stash.get(_ENVIRONMENT, None)
    if environment is not None and hasattr(os, "getloadavg"):
        environment["load_average_at_end_1_5_15_min"] = list(os.getloadavg())
    output_json["fastkd"] = {"preset": config.getoption("--preset"), "environment": environment}
