"""Tile sweep: time every kernel candidate of the tuner, one by one, against cuDNN (same run).

Usage on a GPU: python bench/probe_tiles.py [problem ...] [-w] [-ir]
  -w   also run with channels_last weights;  -ir  write the first compiled kernels' TTGIR to $OUT.
Prints, per candidate: do_bench median (host overhead included), CUDA-graph replay time
(GPU time alone), TFLOP/s, ratio to the better cuDNN layout, host microseconds per call,
and the relative error against a float64 reference. Logs of runs: bench/results/probes/.
"""
import sys, time, math, json, os, re
import torch, triton
import torch.nn.functional as F
from conv_backend.kernels import implicit_gemm as ig, depthwise as dw, common
from conv_backend import tuning
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchutil import host_us  # noqa: E402
torch.backends.cudnn.benchmark = True
torch.backends.cudnn.allow_tf32 = True
torch.backends.cuda.matmul.allow_tf32 = True
print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), torch.backends.cudnn.version(), flush=True)

def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")

def gbench(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")

def relerr(y, ref):
    return float((y.double() - ref).norm() / ref.norm())

PROBLEMS = [
    ("kb80", 8, 32, 64, 512, 512, 5, 9, (1, 1), (2, 4), (2, 3), 1, torch.float32),
    ("kb80bf16", 8, 32, 64, 512, 512, 5, 9, (1, 1), (2, 4), (2, 3), 1, torch.bfloat16),
    ("kb55", 8, 64, 128, 512, 1024, 3, 3, (1, 1), (0, 0), (1, 1), 1, torch.float32),
    ("r50_3x3_256_14", 32, 256, 256, 14, 14, 3, 3, (1, 1), (1, 1), (1, 1), 1, torch.bfloat16),
    ("r50_1x1_64_256", 32, 64, 256, 56, 56, 1, 1, (1, 1), (0, 0), (1, 1), 1, torch.bfloat16),
    ("r50_3x3s2_128", 32, 128, 128, 56, 56, 3, 3, (2, 2), (1, 1), (1, 1), 1, torch.bfloat16),
    ("kb82_dw", 16, 64, 64, 512, 512, 3, 3, (1, 1), (0, 0), (1, 1), 64, torch.float32),
]
only = [a for a in sys.argv[1:] if not a.startswith("-")]
for name, n, c, oc, h, w, kh, kw, s, p, d, g, dt in PROBLEMS:
    if only and name not in only:
        continue
    x = torch.randn(n, c, h, w, device="cuda", dtype=dt)
    wt = torch.randn(oc, c // g, kh, kw, device="cuda", dtype=dt) / math.sqrt(c // g * kh * kw)
    ref = F.conv2d(x.double(), wt.double(), None, s, p, d, g)
    oh, ow = ref.shape[2], ref.shape[3]
    flops = 2 * n * oc * oh * ow * (c // g) * kh * kw
    xcl = x.to(memory_format=torch.channels_last)
    wcl = wt.to(memory_format=torch.channels_last)
    t_nchw = bench(lambda: F.conv2d(x, wt, None, s, p, d, g))
    t_cl = bench(lambda: F.conv2d(xcl, wcl, None, s, p, d, g))
    if flops < 1e10:
        print(f"   cudnn host {host_us(lambda: F.conv2d(xcl, wcl, None, s, p, d, g)):.0f}us")
    g_cl = gbench(lambda: F.conv2d(xcl, wcl, None, s, p, d, g))
    best_cudnn = min(t_nchw, t_cl)
    print(f"== {name} {dt} cudnn nchw {t_nchw:.4f} cl {t_cl:.4f} (graph {g_cl:.4f}) ms ({flops/best_cudnn/1e9:.0f} TFLOP/s)", flush=True)
    prec = "tf32" if dt == torch.float32 else "ieee"
    tol = 2e-3 if dt == torch.float32 else 1e-2
    if g > 1 and g == c:
        for xin, lay in ((x, "nchw"), (xcl, "cl")):
            for cand in dw.depthwise_candidates(xin.stride(1) == 1):
                try:
                    common.select = lambda key, sig, dev, cs, run, cand=cand: cand
                    plan = dw.depthwise_plan(xin, wt, None, s, p, d)
                    e = relerr(plan(xin, wt, None), ref)
                    t = bench(lambda: plan(xin, wt, None))
                    print(f"  {lay} {cand.describe():70s} {t:.3f} ms  x{best_cudnn/t:.2f}  err {e:.1e}", flush=True)
                except Exception as exc:
                    print(f"  {cand.describe()} FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        continue
    cands = []
    if not ig.tma_reason(xcl, wt, s, g):
        cands += ig.tma_candidates(c // g, oc // g, oh, ow, n, g, dt)
    cands += ig.pointer_candidates(c // g, oc // g, dt)
    for wuse, wname in ((wt, "w-nchw"), (wcl, "w-cl")):
        for cand in cands:
            try:
                common.select = lambda key, sig, dev, cs, run, cand=cand: cand
                plan = ig.implicit_gemm_plan(xcl, wuse, None, s, p, d, g, prec, "auto")
                e = relerr(plan(xcl, wuse, None), ref)
                t = bench(lambda: plan(xcl, wuse, None))
                tg = gbench(lambda: plan(xcl, wuse, None))
                hu = host_us(lambda: plan(xcl, wuse, None)) if flops < 1e10 else 0
                ok = "" if e < tol else "  BAD"
                print(f"  {wname} {cand.describe():80s} {t:.4f} ms graph {tg:.4f} {flops/tg/1e9:.0f} TFLOP/s x{best_cudnn/t:.2f} host {hu:.0f}us err {e:.1e}{ok}", flush=True)
            except Exception as exc:
                print(f"  {cand.describe()} FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        if wname == "w-nchw" and "-w" not in sys.argv:
            break
# inspect the compiled TMA kernels
for fn in (ig.igemm_tma_kernel, ig.igemm_pointer_kernel):
    for dev, cache in fn.device_caches.items():
        for key, k in list(cache[0].items()):
            ptx = k.asm.get("ptx", ""); ttgir = k.asm.get("ttgir", "")
            print(fn.__name__, [v for v in key if isinstance(v, tuple)][-1:] if isinstance(key, tuple) else "", k.metadata.num_warps, k.metadata.shared, "wgmma:", ptx.count("wgmma.mma_async"),
                  "mma.sync:", ptx.count("mma.sync"), "cp.async.ca:", ptx.count("cp.async.ca"), "cp.async.cg:", ptx.count("cp.async.cg"), "ld.global.ca", ptx.count("ld.global.ca"), "cp.async.bulk.tensor:", ptx.count("cp.async.bulk.tensor"),
                  "convert_layout:", ttgir.count("convert_layout"), "local_load:", ttgir.count("local_load"),
                  "local_alloc:", ttgir.count("local_alloc"), "reshape:", ttgir.count("reshape"))
        if "-ir" in sys.argv:
            k = list(cache[0].values())[0]
            open(os.environ.get("OUT", "/tmp") + f"/{fn.__name__}.ttgir", "w").write(k.asm["ttgir"])
