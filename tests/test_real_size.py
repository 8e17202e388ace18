"""Real-size smoke run (CPU): a random 12-layer, 768-wide RWKV-4 with the Pile models'
vocabulary (50277, the size of RWKV-4 169M) trains ProSG for 3 steps on one 512-token
example (256 prompt + 256 response tokens, in chunks of 128 with the state carried)
and generates with the delta. Run in a subprocess so that its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is this run's alone; the figure is
printed (``pytest -s``) and bounded. Marked slow (~1-2 minutes on two cores); it runs
in the default ``pytest tests`` and is deselected with ``-m "not slow"``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, resource, sys, time
import torch
torch.manual_seed(0)
from prosg.data import TokenizedPair
from prosg.method.train import TrainConfig, train
from prosg.models import RWKV4Config, RWKV4LM
from prosg.models.generation import generate, prefill
from prosg.models.testing import randomize_

t0 = time.perf_counter()
config = RWKV4Config(vocab_size=50277, hidden_size=768, num_hidden_layers=12, rescale_every=6)
model = randomize_(RWKV4LM(config, init=False)).eval()
g = torch.Generator().manual_seed(1)
ids = torch.randint(1, 50277, (512,), generator=g).tolist()
pairs = [TokenizedPair(ids[:256], ids[256:], meta={"line": 1})]
cfg = TrainConfig(steps=3, batch_size=1, warmup_steps=0, lr=1e-3, data_file="synthetic", tokenizer="none",
                  chunk_length=128, generator=dict(rank=4, hidden_size=64))
result = train(model, cfg, sys.argv[1], pairs=pairs, progress=False, log_every=1, save_every=3)
gen = result["generator"]
prompt = torch.tensor([ids[:256]])
with torch.no_grad():
    delta = gen(model, prompt)
    out = generate(model, prompt[:, -1:], 16, delta, state=prefill(model, prompt, [255]))
print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "history": result["history"],
                  "generated": out.shape[1] - 1, "seconds": round(time.perf_counter() - t0, 1),
                  "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


@pytest.mark.slow
def test_real_size_rwkv4_trains_and_generates_on_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run")], env=env, capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"\nreal-size smoke: {report['params'] / 1e6:.1f}M parameters, 3 steps + 16 tokens in "
          f"{report['seconds']} s, peak RSS {report['maxrss_mib']:.0f} MiB")
    assert report["params"] > 160e6 and report["generated"] == 16
    losses = [h["loss"] for h in report["history"]]
    assert len(losses) == 3 and all(l == l and l < 20 for l in losses)  # finite, near log(50277) = 10.8
    assert losses[0] == pytest.approx(report["history"][0]["base_loss"], abs=1e-4)  # zero delta at step 1
    # model 0.68 GB in float32; a peak far above a few GB would mean a [T, V] tensor kept per chunk
    assert report["maxrss_mib"] < 6000
    assert (tmp_path / "run" / "generator_config.json").is_file()
