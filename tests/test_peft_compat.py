"""The enum shim: fails loudly when a new peft changes what registration relies on."""

import peft
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import hydralora
from hydralora._peft_compat import TESTED_PEFT, register


def test_installed_peft_is_a_tested_version():
    assert peft.__version__ in TESTED_PEFT, f"peft {peft.__version__} is untested: check the shim, then widen TESTED_PEFT"


def test_hydralora_is_registered_in_every_peft_mapping():
    member = PeftType("HYDRALORA")
    assert member is PeftType.HYDRALORA and member == "HYDRALORA"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is hydralora.HydraLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is hydralora.HydraLoraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "hydralora_"


def test_register_is_idempotent():
    register(hydralora.HydraLoraConfig, hydralora.HydraLoraModel)
    assert list(PeftType).count(PeftType.HYDRALORA) == 1


def test_config_roundtrips_through_peft_config_loading(tmp_path):
    cfg = hydralora.HydraLoraConfig(r=4, num_experts=5, top_k=2, target_modules=["q_proj"])
    cfg.save_pretrained(tmp_path)
    loaded = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, hydralora.HydraLoraConfig)
    assert (loaded.num_experts, loaded.top_k, loaded.r) == (5, 2, 4)


def test_peft_wrapper_and_checkpointing_raise_no_future_warning():
    """transformers deprecated the gradient-checkpointing names: neither building a PeftModel through hydralora nor
    turning checkpointing on may use them."""
    import warnings

    import peft

    from hydralora import HydraLoraConfig
    from hydralora._checkpointing import enable_checkpointing, is_checkpointing
    from hydralora._peft_compat import quiet_peft_checkpointing_probe
    from conftest import tiny_llama

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with quiet_peft_checkpointing_probe():
            model = peft.get_peft_model(tiny_llama(), HydraLoraConfig(r=2, num_experts=2, target_modules=["q_proj"]))
        enable_checkpointing(model)
        assert is_checkpointing(model.get_base_model())
