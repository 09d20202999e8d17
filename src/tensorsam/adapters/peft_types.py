"""Our tuners' names in peft's ``PeftType`` enum, and their registration.

peft's ``register_peft_method`` (peft ≥ 0.15) only accepts a name already in the ``PeftType``
enum, and configs, saving and ``PeftModel.from_pretrained`` look methods up by that enum.  A
stdlib ``Enum`` cannot grow, so ``aenum.extend_enum`` adds the member (once; a peft that one day
ships the name natively is used as it is).
"""

from __future__ import annotations

from peft.utils import PeftType


def peft_type(name: str) -> PeftType:
    """The ``PeftType`` member ``name`` (upper case), added to the enum if missing."""
    if name not in PeftType.__members__:
        try:
            from aenum import extend_enum
        except ImportError:
            raise ImportError(f"tensorsam's {name} tuner needs the 'aenum' package to add {name} to peft's "
                              "PeftType enum: pip install 'tensorsam[hf]' (or pip install aenum)") from None
        extend_enum(PeftType, name, name)
    return PeftType[name]


def register(name: str, config_cls, model_cls) -> None:
    """``peft.utils.register_peft_method`` for ``name`` (lower case), unless already done by us."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    member = peft_type(name.upper())
    known = PEFT_TYPE_TO_CONFIG_MAPPING.get(member)
    if known is config_cls:
        return
    if known is not None:
        raise RuntimeError(f"peft already has a method {name!r} ({known.__module__}.{known.__name__}); "
                           f"tensorsam cannot register its own {config_cls.__name__} under that name")
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
