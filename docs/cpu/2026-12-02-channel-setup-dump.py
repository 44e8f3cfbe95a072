import torch, sys, itertools
import fastres  # noqa: F401 (registers torch.ops.fastres)
out = {}
op = torch.ops.fastres.bn_act_forward; bop = torch.ops.fastres.bn_act_backward
for (N,C,H), dt, cl, res, tr, relu in itertools.product([(2,512,7),(3,37,5),(2,9,11),(4,64,3)], [torch.float32, torch.float64, torch.bfloat16], [False, True], [False, True], [False, True], [False, True]):
    g = torch.Generator().manual_seed(C*H+N)
    x = (torch.randn(N,C,H,H, generator=g)*3+1).to(dt)
    r = torch.randn(N,C,H,H, generator=g).to(dt) if res else None
    if cl:
        x = x.contiguous(memory_format=torch.channels_last); r = r.contiguous(memory_format=torch.channels_last) if r is not None else None
    w = torch.randn(C, generator=g); b = torch.randn(C, generator=g); rm = torch.randn(C, generator=g); rv = torch.rand(C, generator=g)+0.5
    y, m, v = op(x, r, w, b, rm, rv, tr, 1e-5, relu)
    gy = torch.randn(N,C,H,H, generator=g).to(dt).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    k = (N,C,H,str(dt),cl,res,tr,relu)
    out[k] = [y, m, v] + list(bop(gy, x, y, w, b, m, v, tr, 1e-5, relu, res)) + (list(bop(gy, x, None, w, b, m, v, tr, 1e-5, relu, res)) if not (res and relu) else [])
torch.save(out, sys.argv[1]); print(len(out))
