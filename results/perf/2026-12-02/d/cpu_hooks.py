# The model hooks' host time per forward (SmolLM2 shape, q_proj + v_proj: 60 adapted layers), CPU:
#   python3 docs/perf-gpu-2026-12-02d/cpu_hooks.py [train]     (PYTHONPATH=<older src> for another version)
import time, torch, sys, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_generate as G, _common as C, hydralora
class A: precision = "pure"
m = G.make_model("smollm2-135m", "cpu", torch.float32, 0)
hcfg = hydralora.HydraLoraConfig(r=8, lora_alpha=16, num_experts=3, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
hm = C.get_peft_model(m, hcfg, A); hm.train(sys.argv[1] == "train") if len(sys.argv) > 1 else hm.eval()
tm = hm.base_model
ids = torch.zeros(1, 1, dtype=torch.long); mask = torch.ones(1, 40, dtype=torch.long)
kw = {"input_ids": ids, "attention_mask": mask}
best = 1e9
for _ in range(5):
    t = time.perf_counter()
    for _ in range(1000):
        tm._pre_forward(None, (), kw); tm._post_forward(None, (), kw, None)
    best = min(best, (time.perf_counter() - t) * 1e3)
print(hydralora.__file__, "hooks per forward us", round(best, 1))
