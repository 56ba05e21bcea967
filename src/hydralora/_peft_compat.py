"""The one place that reaches into PEFT's internals: add HYDRALORA to the closed PeftType enum and register.

PEFT's `register_peft_method` only accepts names already in `PeftType`. We extend the enum with `aenum` and
then register through the public function. Tested with the peft versions in TESTED_PEFT; tests/test_peft_compat.py
fails loudly when a new peft changes what this relies on.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import peft
from aenum import extend_enum
from packaging.specifiers import SpecifierSet
from peft.utils import PeftType

TESTED_PEFT = SpecifierSet(">=0.21.0,<0.22")
NAME = "hydralora"


# peft's PeftModel reads the base model's `is_gradient_checkpointing`, a name transformers has deprecated in favour
# of `is_activation_checkpointing`; the FutureWarning is about peft's code, which users cannot change.
_PEFT_PROBE_WARNING = r"`is_gradient_checkpointing` is deprecated"


def _ignore_peft_checkpointing_probe() -> None:
    warnings.filterwarnings("ignore", message=_PEFT_PROBE_WARNING, category=FutureWarning)


@contextmanager
def quiet_peft_checkpointing_probe():
    """Build or load a PeftModel without the warning above, whatever filters the caller set."""
    with warnings.catch_warnings():
        _ignore_peft_checkpointing_probe()
        yield


def register(config_cls, model_cls) -> None:
    """Idempotently add PeftType.HYDRALORA and register HydraLoRA's config and tuner with PEFT."""
    if peft.__version__ not in TESTED_PEFT:
        warnings.warn(
            f"hydralora is tested with peft {TESTED_PEFT}; found peft {peft.__version__}. If loading or saving "
            "fails, install a tested version: pip install 'peft>=0.21,<0.22'.",
            stacklevel=2,
        )
    _ignore_peft_checkpointing_probe()  # for users calling peft directly, under default warning filters
    if NAME.upper() not in PeftType.__members__:
        extend_enum(PeftType, NAME.upper(), NAME.upper())
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    peft_type = PeftType(NAME.upper())
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is config_cls:
        return
    register_peft_method(name=NAME, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
