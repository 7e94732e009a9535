"""FAISS's numpy search keeps its ``params`` keyword after ``faiss.contrib.torch_utils`` (which
pytorch-metric-learning imports) replaced every index's ``search``: Milvus Lite, run in the
process, searches with ``params``. Run in a child process, so the replacement does not leak
into the other tests."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import numpy as np, faiss, torch
import faiss.contrib.torch_utils  # replaces search process-wide, without params
from retrieval.index.faiss_runtime import keep_numpy_search_params

index = faiss.IndexHNSWFlat(8, 16, faiss.METRIC_INNER_PRODUCT)
x = np.random.default_rng(0).standard_normal((50, 8)).astype("float32")
x /= np.linalg.norm(x, axis=1, keepdims=True)
index.add(x)
params = faiss.SearchParametersHNSW(efSearch=32)
try:
    index.search(x[:2], 3, params=params)
    print("no error before")
except TypeError:
    print("refused before")
print("mended", keep_numpy_search_params() > 0)
scores, ids = index.search(x[:2], 3, params=params)
print("numpy", ids[:, 0].tolist())
t_scores, t_ids = index.search(torch.from_numpy(x[:2]), 3)
print("torch", t_ids[:, 0].tolist())
print("again", keep_numpy_search_params())
"""


def test_numpy_search_takes_params_again_and_torch_search_still_works():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines == [
        "refused before",
        "mended True",
        "numpy [0, 1]",
        "torch [0, 1]",
        "again 0",
    ], out.stdout + out.stderr
