# ad-hoc: cProfile of decoding (16 new tokens, batch 1, smollm2 shape) for peft r8 vs ours fused
import cProfile, pstats, sys, io, time, torch
sys.path.insert(0, "benchmarks")
import _common as C
import bench_generate as G
import peft, hydralora
dev, dt = "cuda", torch.bfloat16
class A: precision = "pure"
model = G.make_model("smollm2-135m", dev, dt, 0)
ids = torch.randint(3, 49152, (1, 32)).to(dev)
def prof(tag, net, n=16):
    kw = G.gen_kwargs(ids, n)
    with torch.inference_mode():
        net.generate(ids, **kw); torch.cuda.synchronize()
        t0 = time.perf_counter(); net.generate(ids, **kw); torch.cuda.synchronize(); t = time.perf_counter() - t0
        pr = cProfile.Profile(); pr.enable(); net.generate(ids, **kw); torch.cuda.synchronize(); pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(35)
    print(f"===== {tag}: {n} tokens in {t*1e3:.1f} ms"); print(s.getvalue()[:9000])
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(45)
    print(s.getvalue()[:9000])
prof("base", model)
lcfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
pm = C.get_peft_model(model, lcfg, A); pm.eval()
prof("peft", pm)
model = pm.unload()
hcfg = hydralora.HydraLoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, num_experts=3, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
hm = C.get_peft_model(model, hcfg, A)
hm.eval()
prof("ours fused", hm)
