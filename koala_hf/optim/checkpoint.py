"""How a KOALA optimizer's state is saved and loaded, through torch's public state-dict hooks.

Per-parameter state lives in ``optimizer.state[p]``, as in every torch optimizer. The filter-wide state (the
noise estimate ``R`` per group (E2), the step and skip counters, the variant's own: KOALA-V's ``P``, KOALA-M's
``P``, ``qw_avg`` and mode) lives in ``optimizer.state["koala"]`` and travels in ``state_dict()`` under the
``"koala"`` key of the first parameter's state, as torch's LBFGS keeps its own: every key of ``"state"`` is a
parameter, as ``torch.distributed.checkpoint`` (FSDP2 checkpoints) requires, and the parameter groups hold
only hyperparameters, so that a group's representation does not depend on its position.

Saving: a state-dict post-hook moves the filter-wide state into the first parameter's state (:func:`pack`).

Loading (:class:`Loading`, whose hooks are registered for one ``load_state_dict`` call): a pre-hook that runs
after the user's pre-hooks refuses another variant's or another optimizer's state, naming both, takes the
filter-wide state from where each layout put it (the first parameter's state; the first parameter group, as
saved before 0.3; ``state["koala"]``, before that), and sets aside the per-layer scalar state
(``layer_scalar_keys``), which torch would cast to the parameter's dtype; a post-hook that runs before the
user's post-hooks moves the filter-wide state back into ``optimizer.state["koala"]`` on the parameters' device
(counters handed back as Python numbers become tensors again, entries saved before they existed get their
initial value) and restores the per-layer scalars in float32 or wider.

Each variant declares what identifies its state (class attributes of :class:`KoalaOptimizer` subclasses):
``layer_state_keys`` (per parameter), ``filter_state_keys`` (its own filter-wide entries) and
``identifying_hyperparameters`` (keys only its parameter groups have, for state dicts without any state yet).
"""

from __future__ import annotations

import torch

FILTER_STATE = "koala"
COUNTERS = ("step", "skipped_steps", "negative_loss_steps")
# Variants register themselves here when their class is created (KoalaOptimizer.__init_subclass__).
VARIANTS: list[type] = []


def register_variant(cls: type) -> None:
    """Record a class that declares its own state keys (its subclasses share its state and are not recorded)."""
    if "layer_state_keys" in cls.__dict__ and cls not in VARIANTS:
        VARIANTS.append(cls)


def pack(optimizer, state_dict: dict) -> dict:
    """State-dict post-hook: the filter-wide state moves from ``state["koala"]`` into the first parameter's state."""
    state = dict(state_dict["state"])
    filter_state = state.pop(FILTER_STATE, None)
    holder = next((index for group in state_dict["param_groups"] for index in group["params"]), None)
    if filter_state is not None and holder is not None:
        state[holder] = {**state.get(holder, {}), FILTER_STATE: filter_state}
    return {**state_dict, "state": state}


def saved_filter_state(state: dict, groups: list[dict]) -> dict | None:
    """The filter-wide state of a saved state dict, wherever its layout put it (without moving it)."""
    for entry in state.values():
        if isinstance(entry, dict) and FILTER_STATE in entry:
            return entry[FILTER_STATE]
    if groups and FILTER_STATE in groups[0]:
        return groups[0][FILTER_STATE]
    return state.get(FILTER_STATE)


def saved_variant(state_dict: dict) -> str | None:
    """The class that saved ``state_dict``: a KOALA variant's name, a description of another optimizer, or ``None``
    (nothing to tell by: no state and no parameter groups)."""
    state = state_dict.get("state", {})
    groups = state_dict.get("param_groups", [])
    layer_keys = set().union(*(set(value) - {FILTER_STATE} for key, value in state.items() if key != FILTER_STATE))
    filter_keys = set(saved_filter_state(state, groups) or {})
    scores = {cls: len(layer_keys & (set(cls.layer_state_keys) | set(cls.retired_layer_state_keys)))
              + len(filter_keys & set(cls.filter_state_keys)) for cls in VARIANTS}
    best = max(scores.values(), default=0)
    if best > 0 and list(scores.values()).count(best) == 1:
        return max(scores, key=scores.get).__name__
    if layer_keys:
        return f"another optimizer (state {', '.join(sorted(map(str, layer_keys)))})"
    if groups:
        matching = [cls for cls in VARIANTS if all(key in group for group in groups for key in cls.identifying_hyperparameters)]
        if matching:  # the most specific: KOALA++'s groups have KOALA-V's hyperparameters and more
            return max(matching, key=lambda cls: len(cls.identifying_hyperparameters)).__name__
        return f"another optimizer (hyperparameters {', '.join(sorted(set(groups[0]) - {'params', FILTER_STATE}))})"
    return None


def refuse_foreign_state(optimizer, state_dict: dict) -> None:
    """Raise ``ValueError`` naming both when ``state_dict`` is another variant's or another optimizer's."""
    saved = saved_variant(state_dict)
    mine = type(optimizer).__name__
    if saved is not None and saved not in {cls.__name__ for cls in type(optimizer).__mro__}:
        raise ValueError(
            f"This optimizer state was saved by {saved}; it cannot be loaded into {mine}, whose state differs. "
            f"Load it into a {saved} built over the same parameters, or start {mine} from fresh state (leave the "
            "optimizer state out of the checkpoint you load)."
        )


class Loading:
    """The hooks of one ``load_state_dict`` call (see the module docstring) and what passes between them."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer
        self.saved_ids: list = []  # the saved parameter indices, in group order
        self.layer_scalars: dict = {}  # saved parameter index -> {key: tensor}, as saved

    def prepare(self, optimizer, state_dict: dict) -> dict:
        """Load pre-hook, after the user's: refuse foreign state, take the older layout, set the scalars aside."""
        refuse_foreign_state(optimizer, state_dict)
        groups = [dict(group) for group in state_dict["param_groups"]]
        state = {key: dict(entry) if isinstance(entry, dict) else entry for key, entry in state_dict["state"].items()}
        filter_state = saved_filter_state(state, groups)
        state.pop(FILTER_STATE, None)
        retired = (FILTER_STATE, *type(optimizer).retired_layer_state_keys)  # what torch must not load per parameter
        for key in [key for key, entry in state.items() if any(name in entry for name in retired)]:
            state[key] = {name: value for name, value in state[key].items() if name not in retired}
            if not state[key]:  # the parameter had no state of its own
                del state[key]
        if filter_state is not None and groups:  # handed to restore through the first group, as torch loads groups
            groups[0][FILTER_STATE] = filter_state
        keys = type(optimizer).layer_scalar_keys
        self.saved_ids = [index for group in groups for index in group["params"]]
        self.layer_scalars = {index: {k: v for k, v in saved.items() if k in keys and isinstance(v, torch.Tensor)}
                              for index, saved in state.items()}
        return {**state_dict, "state": state, "param_groups": groups}

    def restore(self, optimizer) -> None:
        """Load post-hook, before the user's: the filter-wide state back in place, the per-layer scalars in float32+."""
        filter_state = None
        for group in optimizer.param_groups:
            saved = group.pop(FILTER_STATE, None)
            filter_state = saved if filter_state is None else filter_state
        if filter_state is not None:
            optimizer.state[FILTER_STATE] = restore_filter_state(optimizer, filter_state)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for saved_id, p in zip(self.saved_ids, params):
            for key, value in self.layer_scalars.get(saved_id, {}).items():
                dtype = torch.promote_types(value.dtype, torch.float32)
                optimizer.state[p][key] = value.to(device=p.device, dtype=dtype, copy=True)


def restore_filter_state(optimizer, saved: dict) -> dict:
    """The filter-wide state on the parameters' device: counters as int64 tensors (also when handed back as Python
    numbers), other numbers in the optimizer's scalar dtype, missing entries at their initial values (an older
    state dict), ``R`` extended with ``R_0 = 1`` for groups it does not cover yet."""
    device, dtype = optimizer._device(), optimizer._scalar_dtype()
    restored = {}
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            restored[key] = value.to(device=device, copy=True)
        elif key in COUNTERS:
            restored[key] = torch.tensor(int(value), dtype=torch.int64, device=device)
        elif isinstance(value, (int, float, list, tuple)) and not isinstance(value, bool):
            restored[key] = torch.tensor(value, dtype=dtype, device=device)
        else:
            restored[key] = value
    for key in COUNTERS:
        restored.setdefault(key, torch.zeros((), dtype=torch.int64, device=device))
    restored.setdefault("loss", torch.full((), float("nan"), dtype=dtype, device=device))
    return extend_noise_estimates(restored, len(optimizer.param_groups))


def extend_noise_estimates(filter_state: dict, groups: int) -> dict:
    """``R`` with one entry per parameter group: groups added since it was created start at ``R_0 = 1`` (E2)."""
    noise = filter_state["R"]
    if noise.numel() < groups:
        filter_state["R"] = torch.cat([noise, torch.ones(groups - noise.numel(), dtype=noise.dtype, device=noise.device)])
    return filter_state
