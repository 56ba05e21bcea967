"""TRL's SFTTrainer with a HydraLoRA peft_config: trains, adds and logs the balance loss, saves a loadable adapter."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import peft  # noqa: E402

import hydralora  # noqa: E402
from hydralora import HydraLoraConfig  # noqa: E402
from hydralora.integrations.trl import HydraSFTTrainer  # noqa: E402

from conftest import tiny_tokenizer  # noqa: E402


def _setup(tmp_path, coef):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=48, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))
    rows = [{"prompt": f"Q: How many apples do I have? {'plausible' if i % 2 else 'cherry'}\nA:", "completion": " three"}
            for i in range(16)]
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                     report_to=[], use_cpu=True, save_strategy="no", max_length=32, learning_rate=1e-2, seed=0)
    cfg = HydraLoraConfig(r=4, num_experts=3, target_modules=["q_proj", "v_proj"], balance_loss_coef=coef,
                          task_type="CAUSAL_LM")
    return dict(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=cfg)


def test_stock_sft_trainer_trains_and_saves_a_loadable_adapter(tmp_path):
    setup = _setup(tmp_path, coef=0.0)
    base_state = {k: v.clone() for k, v in setup["model"].state_dict().items()}
    trainer = SFTTrainer(**setup)
    assert isinstance(trainer.model, peft.PeftModel) and hydralora.hydra_layers(trainer.model)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("hydralora_B" in n for n in changed)
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    base = LlamaForCausalLM(trainer.model.get_base_model().config)
    base.load_state_dict(base_state)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    trained = trainer.model.state_dict()
    saved = {k: v for k, v in loaded.state_dict().items() if "hydralora_" in k}
    assert saved and all(torch.equal(v, trained[k]) for k, v in saved.items())
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        adapted = loaded(input_ids=ids).logits
        with loaded.disable_adapter():
            plain = loaded(input_ids=ids).logits
    assert not torch.allclose(adapted, plain)  # the trained experts change the output


def test_stock_sft_trainer_refuses_to_drop_the_balance_loss(tmp_path):
    trainer = SFTTrainer(**_setup(tmp_path, coef=0.1))
    with pytest.raises(RuntimeError, match="HydraSFTTrainer"):
        trainer.train()


def test_hydra_sft_trainer_adds_and_logs_the_balance_loss(tmp_path):
    coef = 0.5
    trainer = HydraSFTTrainer(**_setup(tmp_path, coef=coef))
    trainer.train()
    logged = [h["balance_loss"] for h in trainer.state.log_history if "balance_loss" in h]
    assert len(logged) == 3 and all(v > 0 for v in logged)
    # The trained loss is SFTTrainer's plus coef x the balance loss of the same forward.
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    with torch.no_grad():
        total = trainer.compute_loss(trainer.model, dict(batch))
        aux = hydralora.get_aux_loss(trainer.model)
        plain = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch))
    torch.testing.assert_close(total, plain + coef * aux)
    trainer.save_model(str(tmp_path / "adapter"))
    base = LlamaForCausalLM(trainer.model.get_base_model().config)
    assert hydralora.hydra_layers(hydralora.load_adapter(base, tmp_path / "adapter"))
