"""examples/hf_distill.py in its seconds-long smoke mode: every stage runs (teacher pretraining,
three `fastkd cache` layouts of an hf: teacher, four student runs) and reports sane numbers."""
import math
import os

import pytest
from paths import ROOT, load_script

pytest.importorskip("transformers")

EXAMPLE = os.path.join(ROOT, "examples",
                       "hf_distill.py")


def test_hf_distill_smoke(tmp_path, capsys):
    module = load_script(EXAMPLE)
    results = module.main(["--smoke", "--work-dir", str(tmp_path),
                           "--sources", "sample", "dense", "topk"])
    out = capsys.readouterr().out
    assert "held-out ppl" in out and "labels only" in out
    assert len(results) == 5
    for result in results.values():
        # byte-level model: perplexity between 1 and the vocabulary size (256) plus slack
        assert math.isfinite(result["perplexity"]) and 1 < result["perplexity"] < 1000
    sizes = {name: result["bytes_per_token"] for name, result in results.items()
             if "bytes_per_token" in result}
    dense = next(size for name, size in sizes.items() if "dense" in name)
    assert dense > 2 * 256  # fp16 rows of V = 256
    assert all(size < dense / 4 for name, size in sizes.items() if "dense" not in name)
