import torch, sys
a = torch.load(sys.argv[1]); b = torch.load(sys.argv[2]); bad = 0
for k in a:
    for i,(s,t) in enumerate(zip(a[k], b[k])):
        if not torch.equal(s, t) and not (s.isnan().any() and torch.equal(s.nan_to_num(), t.nan_to_num())):
            bad += 1
            if bad < 15: print("DIFF", k, i, (s.double()-t.double()).abs().max().item())
print("cases", len(a), "differing tensors", bad)
