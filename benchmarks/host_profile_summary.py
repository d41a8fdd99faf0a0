"""Where a profiled run's host time goes: py-spy's collapsed stacks (``--format raw``) summed by function, as
self time and as time below it (inclusive), the heaviest first; optionally only the samples under a function.

Usage: python benchmarks/host_profile_summary.py STACKS.txt [--under FUNCTION] [--top N]
"""
import argparse
from collections import Counter

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("stacks", help="py-spy record --format raw output")
p.add_argument("--under", default="", help="only samples whose stack holds a frame of this function name")
p.add_argument("--top", type=int, default=30)
a = p.parse_args()

own, below = Counter(), Counter()
total = 0
with open(a.stacks) as f:
    for line in f:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        frames = stack.split(";")
        names = [fr.split(" (")[0] for fr in frames]
        if a.under and a.under not in names:
            continue
        n = int(count)
        total += n
        own[frames[-1]] += n
        for fr in set(frames):
            below[fr] += n
print(f"{total} samples" + (f" under {a.under}" if a.under else ""))
print("self:")
for fr, n in own.most_common(a.top):
    print(f"  {100 * n / total:5.1f}%  {fr}")
print("inclusive:")
for fr, n in below.most_common(a.top):
    print(f"  {100 * n / total:5.1f}%  {fr}")
