"""Fixtures shared by the cache tests."""
import pytest

import cache_helpers


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    """``(cache folder, teacher)``: the digits cached by the real CLI from a trained teacher's
    checkpoint, in 6 shards (one per test module)."""
    return cache_helpers.cache_trained_digits(tmp_path_factory.mktemp("digits"))
