"""Summary of 2026-12-03-cl-kernel-ab.py runs: per shape the median over processes of eager's
op step over fastres's (and over the forward and backward kernels alone), per TAG; geometric
means over the shapes. Usage: python 2026-12-03-cl-kernel-summary.py LOG TAG [TAG ...]"""
import collections,statistics as st, sys
d=collections.defaultdict(lambda: collections.defaultdict(list))
for l in open(sys.argv[1]):
    f=l.split(); d[(f[1],f[2])][f[0]].append((float(f[4]),float(f[6]),float(f[10]), float(f[8])))
tags=sys.argv[2:]
tot={t:[] for t in tags}; totf={t:[] for t in tags}
for k,v in d.items():
    r={c: st.median(x[3]/x[2] for x in v[c]) for c in tags}
    fr={c: st.median(x[3]/(x[0]) for x in v[c]) for c in tags}
    br={c: st.median(x[3]/(x[1]) for x in v[c]) for c in tags}
    print(f"{k[0]:11s} {k[1]:14s} eager/step "+" ".join(f"{c} {r[c]:.2f}" for c in tags)+"   eager/fwd "+" ".join(f"{fr[c]:.2f}" for c in tags)+"   eager/bwd "+" ".join(f"{br[c]:.2f}" for c in tags))
    for c in tags: tot[c].append(r[c]); totf[c].append(fr[c])
print("geomean eager/step", {c: round(st.geometric_mean(v),3) for c,v in tot.items()}, "eager/fwd", {c: round(st.geometric_mean(v),3) for c,v in totf.items()})
