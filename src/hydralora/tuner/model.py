"""HydraLoraModel: injects HydraLinear layers into a model, the PEFT way, and owns the model-level hooks."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers.pytorch_utils import Conv1D

from .config import HydraLoraConfig
from .layer import MERGE_INTO_QUANTIZED, MERGE_UNDER_TOKEN_ROUTING, HydraLinear, HydraLoraLayer
from .state_check import register as register_state_check


def _linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of the Linear/Conv1D modules a model has (for error messages)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and name:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


FUSED_HEAD_DROPS_BALANCE_LOSS = (
    "HydraLoraConfig.balance_loss_coef > 0, but this trainer computes its loss from a fused LM head (TRL's "
    "SFTTrainer) and would drop HydraLoRA's balance loss without a word. Train with "
    "hydralora.integrations.trl.HydraSFTTrainer (SFTTrainer that adds and logs it), or set balance_loss_coef=0."
)
FUSED_HEAD_DROPS_EXPERT_LOSSES = (
    "HydraLoraConfig.route_target_coef or expert_ortho_coef > 0, but this trainer computes its loss from a fused LM "
    "head (TRL's SFTTrainer) and would drop those losses without a word: train with `hydralora train` or "
    "transformers' Trainer, or set both to 0."
)


class HydraLoraModel(BaseTuner):
    """Creates a HydraLoRA model from a pretrained transformers model (use `peft.get_peft_model`)."""

    prefix: str = "hydralora_"
    tuner_layer_cls = HydraLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __init__(self, model, config, adapter_name="default", low_cpu_mem_usage: bool = False, state_dict=None):
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        # Hooks on the wrapped model (not on this wrapper) so that generate(), which calls the inner model's
        # forward directly, sees them too.
        self._hydra_hooks = [
            self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            self.model.register_forward_hook(self._post_forward, with_kwargs=True),
        ]
        self.aux_loss: Optional[torch.Tensor] = None
        self.route_loss: Optional[torch.Tensor] = None  # mean routing-target loss of the last training forward
        self.ortho_loss: Optional[torch.Tensor] = None  # mean expert-diversity penalty of the last training forward
        # Current weight of the routing-target loss; None: each adapter's route_target_coef (a schedule sets it).
        self.route_target_weight: Optional[float] = None
        # True when the trainer adds coef * aux_loss to its own loss (hydralora.integrations.trl.HydraSFTTrainer)
        self.trainer_adds_balance_loss = False
        register_state_check(self)  # adapter weights that fit no module, or of another shape, are refused by name

    # ----------------------------------------------------------------------------------------------------------
    # injection
    def _check_new_adapter_config(self, config: HydraLoraConfig) -> None:
        super()._check_new_adapter_config(config)
        if not config.resolved:
            raise ValueError(
                "HydraLoraConfig.num_experts='auto' must be resolved before get_peft_model: run `hydralora train` "
                "(it finds N from the training corpus) or call "
                "config.resolve_num_experts(*hydralora.clustering.resolve_num_experts(texts))."
            )

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        self._layer_cache = None
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except ValueError as err:
            if "not found in the base model" not in str(err) and "No modules were targeted" not in str(err):
                raise
            cfg = self.peft_config[adapter_name]
            raise ValueError(
                f"HydraLoraConfig.target_modules={cfg.target_modules!r} matched no module of "
                f"{type(model).__name__}. Its Linear/Conv1D modules are named: {_linear_module_names(model)} "
                "(give a list of these names, a regex over full module names, or 'all-linear')."
            ) from err

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if current_key is None:
            raise ValueError("Current key shouldn't be `None`")
        if isinstance(target, HydraLoraLayer):
            target.update_layer(adapter_name, config, inference_mode=config.inference_mode)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, Conv1D):
            if not config.fan_in_fan_out:
                config.fan_in_fan_out = True  # Conv1D stores its weight as (in, out)
        elif not isinstance(base, nn.Linear) and not hasattr(base, "in_features"):
            raise TypeError(
                f"HydraLoRA cannot adapt {current_key} ({type(base).__name__}): supported are torch.nn.Linear, "
                "transformers' Conv1D and Linear-like (quantized) layers."
            )
        new_module = HydraLinear(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ----------------------------------------------------------------------------------------------------------
    # model-level hooks: routing context and the balance loss
    def hydra_layers(self) -> list[tuple[str, HydraLoraLayer]]:
        # Cached: the hooks run on every forward (every decode step), and walking all modules costs Python time.
        if getattr(self, "_layer_cache", None) is None:
            self._layer_cache = [(n, m) for n, m in self.model.named_modules() if isinstance(m, HydraLoraLayer)]
        return self._layer_cache

    def _pre_forward(self, module, args, kwargs):
        # Per-sequence target experts for the routing-target loss: read here, never passed on to the model.
        route_labels = kwargs.pop("route_labels", None)
        if route_labels is not None and not bool((route_labels >= 0).any()):  # one check per forward, not per layer
            route_labels = None
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        embeds = kwargs.get("inputs_embeds")
        seq_len = ids.shape[1] if ids is not None and ids.dim() == 2 else (
            embeds.shape[1] if embeds is not None and embeds.dim() == 3 else None
        )
        src = ids if ids is not None else embeds
        if route_labels is not None and src is not None:
            route_labels = route_labels.to(src.device)  # once here, not a host-to-device copy per layer
        token_mask = None
        if torch.is_tensor(mask) and mask.dim() == 2 and seq_len is not None and mask.shape[1] >= seq_len:
            # (B, T): this call's tokens (decode steps). A new tensor, once here: the fused kernel reads it flat in
            # every layer, and a slice of the mask could start off a 16-byte boundary (a slower launch per call).
            token_mask = mask[:, -seq_len:].bool().contiguous()
        past = kwargs.get("past_key_values")
        if past is None:
            past = kwargs.get("cache")  # the name transformers gives the KV cache since 5.2x
        decoding = False
        if past is not None:
            get_len = getattr(past, "get_seq_length", None)
            decoding = bool(get_len() > 0) if callable(get_len) else True
        # Plain attributes, written straight into each layer's __dict__ in one update: nn.Module.__setattr__ checks
        # parameters, buffers and submodules first, a few microseconds per write, per layer and decode step.
        shared = {"_token_mask": token_mask, "_reuse_sequence_gate": decoding, "_recording": True,
                  "_route_labels": route_labels}
        for _, layer in self.hydra_layers():
            layer.__dict__.update(shared)
            aux = layer.last_aux_loss
            for name in aux:
                aux[name] = None
            routed = layer.last_route_loss
            for name in routed:
                routed[name] = None
        return args, kwargs

    def _post_forward(self, module, args, kwargs, output):
        layers = self.hydra_layers()
        terms, routes, orthos = [], [], []
        coef = route_coef = ortho_coef = 0.0
        for _, layer in layers:
            # A non-reentrant checkpoint recompute in backward must not count again; the token mask stays so the
            # recompute repeats the same ops.
            layer.__dict__["_recording"] = False
            if not layer.training:  # no balance loss outside training (_record)
                continue
            # Only adapters that ran in this forward hold a loss (_pre_forward cleared every entry): no need for
            # PEFT's active_adapters property, whose lookups cost more host time than the rest of this loop.
            for name, value in layer.last_aux_loss.items():
                if value is not None:
                    terms.append(value)
                    coef = layer.hconfig[name].balance_loss_coef
            for name, value in layer.last_route_loss.items():
                if value is not None:
                    routes.append(value)
                    route_coef = layer.hconfig[name].route_target_coef
            if torch.is_grad_enabled():
                for name in layer.last_aux_loss:  # the adapters the layer holds
                    cfg = layer.hconfig[name]
                    if cfg.expert_ortho_coef > 0 and layer.hydralora_B[name].requires_grad:
                        orthos.append(layer.expert_ortho_penalty(name))
                        ortho_coef = cfg.expert_ortho_coef
        loss = getattr(output, "loss", None)
        fused_head = getattr(output, "log_probs", None) is not None
        if coef > 0 and terms and not self.trainer_adds_balance_loss and fused_head:
            raise RuntimeError(FUSED_HEAD_DROPS_BALANCE_LOSS)
        if (routes or orthos) and fused_head:
            raise RuntimeError(FUSED_HEAD_DROPS_EXPERT_LOSSES)
        # Plain attributes written into __dict__: nn.Module.__setattr__ checks parameters, buffers and submodules
        # first, a few microseconds per write on every forward (every decode step).
        state = self.__dict__
        aux = state["aux_loss"] = self._mean(terms)
        if aux is not None and loss is not None and coef > 0:
            loss = loss + coef * aux.to(loss.dtype)
        route = state["route_loss"] = self._mean(routes)
        weight = route_coef if self.route_target_weight is None else self.route_target_weight
        if route is not None and loss is not None and weight > 0:
            loss = loss + weight * route.to(loss.dtype)
        ortho = state["ortho_loss"] = self._mean(orthos)
        if ortho is not None and loss is not None:
            loss = loss + ortho_coef * ortho.to(loss.dtype)
        if loss is not None:
            output.loss = loss
        return output

    @staticmethod
    def _mean(terms: list[torch.Tensor]) -> Optional[torch.Tensor]:
        """The mean over adapted layers of one per-layer loss, or None where no layer produced it."""
        if not terms:
            return None
        return torch.stack([t.to(terms[0].device) for t in terms]).mean()

    def _unload_and_optionally_merge(self, *args, **kwargs):
        if kwargs.get("merge", args[0] if args else True):
            self._check_merge_allowed()  # before the hooks go: a refused merge leaves the model working
        for handle in self._hydra_hooks:
            handle.remove()
        self._hydra_hooks = []
        self._layer_cache = None
        return super()._unload_and_optionally_merge(*args, **kwargs)

    def _check_merge_allowed(self):
        super()._check_merge_allowed()
        for _, layer in self.hydra_layers():
            if layer.routing_mode != "fixed":
                raise ValueError(MERGE_UNDER_TOKEN_ROUTING)
            base = layer.get_base_layer()
            if not torch.is_floating_point(base.weight):
                raise ValueError(MERGE_INTO_QUANTIZED.format(kind=type(base).__name__, dtype=base.weight.dtype))
