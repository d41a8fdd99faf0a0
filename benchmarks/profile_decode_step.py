"""Where a decode step's time goes: cProfile of the host and torch.profiler of the device.

Usage: python benchmarks/profile_decode_step.py MODEL_OR_ENGINE [BATCH] (builds a cached engine if needed).
"""
import cProfile
import pstats
import random
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kiln.builder.engine_cache import engine_for
from kiln.runtime import SamplingParams
from kiln.runtime.engine_core import EngineCore, EngineCoreRequest

model = sys.argv[1]
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 64
engine = engine_for(model, max_batch_size=batch, max_seq_len=512, max_num_tokens=2048)
# The engine core alone, stepped in this thread: what a step costs without the front end.
ex = EngineCore(str(engine))
rng = random.Random(0)
params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
for i in range(batch):
    ex.add_request(EngineCoreRequest(f"r{i}", [rng.randrange(100, 300) for _ in range(128)], params, frozenset(),
                                     time.monotonic()))
for _ in range(12):  # prefill and a few decode steps
    ex.step()
sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
sync()
t = time.perf_counter()
for _ in range(20):
    ex.step()
sync()
print(f"decode step, batch {batch}: {(time.perf_counter() - t) / 20 * 1000:.2f} ms")
prof = cProfile.Profile()
prof.enable()
for _ in range(20):
    ex.step()
sync()
prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(18)
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
with profile(activities=activities) as p:
    for _ in range(5):
        ex.step()
    sync()
key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
print(p.key_averages().table(sort_by=key, row_limit=15))
