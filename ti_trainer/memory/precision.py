"""Autocast and loss scaling for the chosen precision, on whatever device the backend uses."""

from __future__ import annotations

import contextlib

import torch


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "auto": bf16 where the GPU supports it (no loss scaler needed), fp16 on older GPUs, fp32 on the CPU.
    An explicit choice is kept, on the CPU too (its autocast supports bf16 and fp16)."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device):
    """A loss scaler for fp16 only; None otherwise (and on a CPU whose torch has no CPU scaler)."""
    if precision != "fp16":
        return None
    if device.type == "cuda":
        try:
            return torch.amp.GradScaler("cuda")
        except (AttributeError, TypeError):  # torch 2.1 has only torch.cuda.amp.GradScaler
            return torch.cuda.amp.GradScaler()
    try:
        return torch.amp.GradScaler(device.type)
    except (AttributeError, TypeError, RuntimeError):
        return None
