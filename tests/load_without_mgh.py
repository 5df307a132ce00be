"""Load exported models with stock sentence-transformers while mgh cannot be imported.

    python -I tests/load_without_mgh.py JOBS.json OUT.pt

JOBS.json: a list of {"folder", "texts", "prompt"} (prompt may be null). Every import of
``mgh_train`` or ``mgh_kernels`` raises ModuleNotFoundError (the package may be installed in this
interpreter: a meta-path finder refuses it), and ``trust_remote_code`` stays False. OUT.pt gets
one [N, D] tensor per job, in order.
"""

import importlib.abc
import json
import sys

BLOCKED = ("mgh_train", "mgh_kernels")


class BlockMgh(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (mgh is blocked in this test)", name=name)
        return None


sys.meta_path.insert(0, BlockMgh())

import torch
from sentence_transformers import SentenceTransformer

jobs = json.loads(open(sys.argv[1], encoding="utf-8").read())
out = []
for job in jobs:
    model = SentenceTransformer(job["folder"], device="cpu", trust_remote_code=False)
    out.append(model.encode(job["texts"], prompt=job["prompt"], convert_to_tensor=True).cpu())
assert not any(name.split(".")[0] in BLOCKED for name in sys.modules), "mgh was imported"
torch.save(out, sys.argv[2])
