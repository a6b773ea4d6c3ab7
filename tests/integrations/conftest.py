"""The example scripts of examples/ as modules, one fixture each (loaded once per test module)."""
import os

import pytest

from paths import load_script


def _example(name):
    return load_script(os.path.join("examples", f"{name}.py"))


@pytest.fixture(scope="module")
def cifar():
    return _example("cifar10_distill")


@pytest.fixture(scope="module")
def lm():
    return _example("lm_token_distill")


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    return _example("hf_distill")


@pytest.fixture(scope="module")
def trl_example():
    return _example("trl_onpolicy")


@pytest.fixture(scope="module")
def vllm_sample():
    pytest.importorskip("transformers")
    return _example("make_vllm_sample")
