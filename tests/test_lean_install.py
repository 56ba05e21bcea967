"""The core works without the `train` extra: a fresh process where its modules cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# Modules only the `train` extra installs (accelerate, tqdm and pyyaml arrive with peft/transformers anyway).
BLOCKED = ("sklearn", "matplotlib", "datasets", "tensorboard", "pandas", "pyarrow", "kneed", "gguf")

# A None entry in sys.modules makes both `import` and importlib.util.find_spec (which transformers uses to
# probe optional packages) behave as if the package were not installed.
BLOCKER = f"""
import sys
BLOCKED = {BLOCKED!r}
for name in BLOCKED:
    sys.modules[name] = None
sys.path.insert(0, {str(TESTS)!r})
"""


def run_without_train_extra(body: str, tmp_path: Path) -> dict:
    """Run `body` in a new interpreter with the train extra blocked; it fills the dict `result`."""
    script = BLOCKER + "result = {}\n" + textwrap.dedent(body) + (
        "\nresult['leaked'] = sorted({m.split('.')[0] for m, v in sys.modules.items() if v is not None} & set(BLOCKED))"
        f"\nimport json; open({str(tmp_path / 'result.json')!r}, 'w').write(json.dumps(result))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "result.json").read_text())


@pytest.fixture(scope="module")
def lean(tmp_path_factory) -> dict:
    """One interpreter without the train extra: the core API, the CLI's export, and the train tools' errors."""
    tmp_path = tmp_path_factory.mktemp("lean")
    return run_without_train_extra(f"""
        import torch, peft, hydralora
        from conftest import tiny_llama, tiny_tokenizer
        torch.manual_seed(0)
        base_dir = {str(tmp_path / "base")!r}
        tiny_llama().save_pretrained(base_dir)
        tiny_tokenizer().save_pretrained(base_dir)
        from transformers import AutoModelForCausalLM
        cfg = hydralora.HydraLoraConfig(r=4, num_experts=3, target_modules=["q_proj", "v_proj"])
        model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), cfg)
        for _, layer in hydralora.hydra_layers(model):  # non-zero experts, so the update is visible
            for p in layer.hydralora_B.values():
                torch.nn.init.normal_(p, std=0.1)
        model.save_pretrained("adapter")
        x = torch.randint(1, 100, (1, 6))
        loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), "adapter").eval()
        hydralora.set_routing(loaded, "fixed", "mean")
        with torch.no_grad():
            want = loaded(x).logits
        hydralora.export_lora(loaded, "lora", gate="mean")
        merged = hydralora.merge_and_unload(loaded, gate="mean")
        with torch.no_grad():
            result["merge_err"] = (merged(x).logits - want).abs().max().item()
        lora = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), "lora").eval()
        with torch.no_grad():
            result["export_err"] = (lora(x).logits - want).abs().max().item()
        from hydralora.cli import main
        result["cli_export"] = main(["export", "adapter", "cli-lora", "--model", base_dir])
        result["cli_lora_files"] = sorted(__import__("os").listdir("cli-lora"))
        import contextlib, io
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            result["train_rc"] = main(["train", "--max-steps", "1"])
        result["train_err"] = err.getvalue()
        import hydralora.clustering as clustering
        result["methods"] = list(clustering.AUTO_N_METHODS)
        try:
            clustering.suggest_num_experts
        except ImportError as e:
            result["clustering_err"] = str(e)
    """, tmp_path)


def test_core_api_without_train_extra(lean):
    assert lean["leaked"] == []
    assert lean["merge_err"] < 1e-4 and lean["export_err"] < 1e-4
    assert lean["cli_export"] == 0
    assert "adapter_model.safetensors" in lean["cli_lora_files"]


def test_train_tools_name_the_extra(lean):
    assert lean["train_rc"] == 2
    assert 'pip install "hydralora[train]"' in lean["train_err"]
    assert "lsa-consensus" in lean["methods"]
    assert "scikit-learn" in lean["clustering_err"] and 'pip install "hydralora[train]"' in lean["clustering_err"]


@pytest.mark.parametrize("module", ["sklearn", "matplotlib"])
def test_missing_extra_message_names_package_and_extra(module):
    from hydralora._extras import missing_extra

    err = missing_extra(module, "Something")
    assert isinstance(err, ImportError)
    assert {"sklearn": "scikit-learn"}.get(module, module) in str(err) and 'hydralora[train]' in str(err)
