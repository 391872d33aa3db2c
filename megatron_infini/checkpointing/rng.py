"""RNG states of one rank as plain tensors and lists (loadable with torch.load(weights_only=True))."""

from __future__ import annotations

import random

import numpy as np
import torch


def capture() -> dict:
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2] or -1],
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
        try:
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

            state["cuda_tracker"] = {
                k: v for k, v in get_cuda_rng_tracker().get_states().items() if isinstance(v, torch.Tensor)
            }
        except Exception:  # no tracker initialised
            pass
    return state


def _numpy_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}


def restore(state: dict) -> None:
    py = state["python"]
    version, gauss_next = py[-2], py[-1]
    random.setstate((version, tuple(int(x) for x in py[:-2]), None if gauss_next == -1 else gauss_next))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
        if "cuda_tracker" in state:
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

            get_cuda_rng_tracker().set_states(state["cuda_tracker"])
