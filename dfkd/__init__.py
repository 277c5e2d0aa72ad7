"""dfkd: a data-free knowledge distillation engine on PyTorch and accelerate."""

__version__ = "0.1.0"
