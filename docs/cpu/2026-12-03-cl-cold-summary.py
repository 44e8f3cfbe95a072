"""Summary of 2026-12-03-cl-cold-steps.py runs: per shape and TAG the medians over processes of
eager's step over fastres's, cold and warm, and fastres's cold step in us; geometric means.
Usage: python docs/cpu/2026-12-03-cl-cold-summary.py LOG TAG [TAG ...]"""
import collections, statistics as st, sys
d=collections.defaultdict(lambda: collections.defaultdict(list))
for l in open(sys.argv[1]):
    f=l.split(); d[(f[1],f[2])][f[0]].append((float(f[10]), float(f[18]), float(f[7])))
tags=sys.argv[2:]; tot={t:[] for t in tags}; totw={t:[] for t in tags}
for k,v in d.items():
    print(f"{k[0]:11s} {k[1]:14s} cold "+" ".join(f"{t} {st.median(x[0] for x in v[t]):.2f}" for t in tags)+" | fastres cold us "+" ".join(f"{st.median(x[2] for x in v[t]):.0f}" for t in tags)+" | warm "+" ".join(f"{st.median(x[1] for x in v[t]):.2f}" for t in tags))
    for t in tags: tot[t].append(st.median(x[0] for x in v[t])); totw[t].append(st.median(x[1] for x in v[t]))
print("geomean cold", {t: round(st.geometric_mean(v),3) for t,v in tot.items()}, "warm", {t: round(st.geometric_mean(v),3) for t,v in totw.items()})
