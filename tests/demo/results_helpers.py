"""Synthetic `results.json` content for report tests, and the keys docs/demo.md documents."""

from __future__ import annotations

from typing import Any

from xvla.demo import SCALES

# Top-level keys of results.json that docs/demo.md documents.
RESULT_KEYS = {
    "config",
    "machine",
    "timing_s",
    "budget_s",
    "data",
    "oracle",
    "pretrain",
    "adapt",
    "heldout_eval",
    "pretrain_eval",
    "learning_curve",
    "scratch",
    "soft_prompts",
}
SUMMARY_KEYS = {"successes", "episodes", "success_rate", "ci95", "mean_steps", "tasks"}


def _summary(k: int, n: int) -> dict[str, Any]:
    return {
        "successes": k,
        "episodes": n,
        "success_rate": k / n,
        "ci95": [0.1, 0.9],
        "mean_steps": 50.0,
        "tasks": {},
    }


def synthetic_results() -> dict[str, Any]:
    cfg = SCALES["default"].to_dict()
    history = {
        "step": [10, 20, 30],
        "loss": [9.0, 5.0, 3.0],
        "per_source": {"mw_sawyer": [10.0, None, 3.0], "rs_panda": [8.0, 4.0, 2.5]},
    }
    val = {
        "overall": {"flow_loss": 2.0, "l1": 0.1, "samples": 64},
        "per_source": {"mw_sawyer": {"flow_loss": 2.2, "l1": 0.12, "samples": 32}},
    }
    data = {
        "robot": "Panda",
        "role": "pre-training",
        "domain_id": 1,
        "fps": 20.0,
        "tasks": ["Lift"],
        "episodes": 20,
        "val_episodes": 2,
        "frames": 2000,
        "expert_success_rate": 0.95,
        "expert_attempts": 21,
    }
    return {
        "config": cfg,
        "machine": {
            "device": "CPU",
            "cpu_capability": "AVX2",
            "cpu_count": 2,
            "load_average": 0.5,
            "threads": 2,
            "workers": 2,
        },
        "timing_s": {"generate": 200.0, "pretrain": 500.0, "total": 1300.0},
        "budget_s": cfg["budget_s"],
        "data": {"rs_panda": data, "rs_kinova3": {**data, "role": "held-out", "domain_id": 5}},
        "oracle": {"rs_kinova3": {**_summary(2, 2), "expert_success_rate": 1.0}},
        "pretrain": {
            "checkpoint": "x",
            "steps": 30,
            "final_loss": 3.0,
            "samples_per_s": 20.0,
            "history": history,
            "validation": val,
            "parameters": 1_700_000,
            "num_domains": 5,
        },
        "adapt": {
            "checkpoint": "y",
            "steps": 30,
            "final_loss": 2.0,
            "samples_per_s": 20.0,
            "history": {**history, "per_source": {"rs_kinova3": [5.0, 4.0, 3.0]}},
            "validation": val,
            "domain_id": 5,
            "init_from": "rs_panda",
            "init_domain_id": 1,
            "prompt_steps": 10,
            "mode": "full",
            "retrieval": [{"domain_id": 1, "name": "rs_panda", "loss": 4.0}],
            "domains": {"rs_panda": 1, "rs_kinova3": 5},
        },
        "heldout_eval": {
            "untrained": _summary(0, 10),
            "pre_adaptation": _summary(1, 20),
            "adapted": _summary(9, 20),
        },
        "pretrain_eval": {"rs_panda": {**_summary(3, 4), "milestones": {"reach": 4, "grasp": 3}}},
        "learning_curve": {
            "rs_panda": [
                {"step": 10, "samples": 160, **_summary(1, 5)},
                {"step": 30, "samples": 480, **_summary(3, 4)},
            ]
        },
        "soft_prompts": {
            "explained_variance": [0.6, 0.3],
            "domains": {
                "rs_panda": {"domain_id": 1, "point": [0.1, 0.2], "norm": 1.0, "cosine_to_heldout": 0.8},
                "rs_kinova3": {"domain_id": 5, "point": [0.3, -0.1], "norm": 1.0, "cosine_to_heldout": 1.0},
            },
        },
    }
