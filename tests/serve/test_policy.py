"""Policy: same transforms as training, native actions at the control rate, queueing, open loop, errors."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from xvla.data.transforms import ObservationTransform
from xvla.model.xvla import XVLA
from xvla.serve.codecs.source import resample_anchors
from xvla.serve.execution import Synchronous
from xvla.serve.policy import NonFiniteActionError, Policy
from xvla.serve.protocol import RequestError

from .helpers import STEPS, arm_source, nan_policy, raw_obs, robot_obs


def test_infer_gives_native_actions_at_control_rate(policy: Policy) -> None:
    reply = policy.infer(robot_obs(np.random.default_rng(0)))
    # 2 s horizon at 10 Hz -> 20 native steps of [dxyz cm, d axis-angle, binary gripper]
    assert reply["actions"].shape == (20, 7) and reply["actions"].dtype == np.float32
    assert reply["anchors"].shape == (30, 20)
    assert np.isfinite(reply["actions"]).all()
    assert set(np.unique(reply["actions"][:, 6])) <= {-1.0, 1.0}
    other = policy.infer({**robot_obs(np.random.default_rng(0)), "domain": "other_arm"})
    assert other["actions"].shape == (10, 7) and other["domain"] == "other_arm"  # 5 Hz source


def test_serving_inputs_equal_training_transform(policy: Policy) -> None:
    """One code path: the model inputs equal ObservationTransform(train=False) on the training-style sample."""
    obs = robot_obs(np.random.default_rng(1))
    source = policy.source
    assert source is not None
    raw = {
        "images": [cam.apply(obs["images"][cam.key]) for cam in source.cameras],
        "instruction": obs["instruction"],
        "proprio": source.state_to_canonical(obs["state"]).astype(np.float32),
        "domain_id": source.domain_id,
    }
    expected = ObservationTransform(policy.model.config, policy.tokenizer, train=False)(raw)
    got = policy.prepare(obs).inputs
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    # the wrist camera is flipped as the source says
    flipped = ObservationTransform(policy.model.config, policy.tokenizer, train=False).image(
        obs["images"]["observation.images.wrist"][::-1, ::-1]
    )
    torch.testing.assert_close(got["pixel_values"][1], flipped, rtol=0, atol=0)


def test_resampling_hits_the_anchors_when_rates_coincide(policy: Policy) -> None:
    source = dataclasses.replace(
        arm_source(), horizon_s=3.0, control_hz=10.0
    )  # 30 steps = the 30 anchor times
    obs = robot_obs(np.random.default_rng(2))
    prepared = policy.with_source(source).prepare(obs)
    anchors = policy.run([prepared])[0]["anchors"]
    canonical = resample_anchors(source, prepared.proprio, anchors)
    assert canonical.shape == (30, 20)
    np.testing.assert_allclose(canonical[:, :3], anchors[:, :3], atol=1e-5)  # positions
    np.testing.assert_allclose(canonical[:, 9], anchors[:, 9], atol=1e-6)  # gripper
    # half the rate: every other anchor
    slow = dataclasses.replace(source, control_hz=5.0)
    np.testing.assert_allclose(
        resample_anchors(slow, prepared.proprio, anchors)[:, :3], anchors[1::2, :3], atol=1e-5
    )


def test_native_actions_reach_the_predicted_poses(policy: Policy) -> None:
    """Chaining the native deltas from the sensed state reproduces the canonical poses at the control rate."""
    obs = robot_obs(np.random.default_rng(3))
    reply = policy.infer(obs)
    source = policy.source
    assert source is not None
    state = np.asarray(obs["state"], dtype=np.float64)
    states = [state]
    for a in reply["actions"][:-1]:
        nxt = source.actions_to_canonical(a[None], states[-1][None])[0]
        # back to a native state row: xyz + quat + gripper (state gripper open=0.08, closed=0)
        quat = _rot6d_to_quat(nxt[3:9])
        states.append(np.concatenate([nxt[:3], quat, [0.08 * (1 - nxt[9])]]))
    reached = source.actions_to_canonical(reply["actions"].astype(np.float64), np.stack(states))
    np.testing.assert_allclose(reached[:, :3], reply["canonical"][:, :3], atol=1e-4)


def _rot6d_to_quat(r6: np.ndarray) -> np.ndarray:
    from xvla.data import rotations

    return rotations.matrix_to_quat(rotations.to_matrix(r6[None], rotations.rot6d_format("contiguous")))[0]


def test_batch_equals_single_with_seeded_noise(policy: Policy) -> None:
    rng = np.random.default_rng(4)
    observations = [robot_obs(rng) for _ in range(3)]
    batched = policy.infer_batch(observations)
    for obs, reply in zip(observations, batched, strict=True):
        np.testing.assert_allclose(policy.infer(obs)["anchors"], reply["anchors"], atol=1e-5)


def test_noise_scale_zero_samples_one_deterministic_chunk(policy: Policy) -> None:
    cold = Policy(
        policy.model,
        policy.tokenizer,
        source=policy.source,
        config=dataclasses.replace(policy.config, seed=None, noise_scale=0.0),  # fresh draws, scaled to 0
    )
    obs = robot_obs(np.random.default_rng(8))
    first, second = cold.infer(obs)["anchors"], cold.infer(obs)["anchors"]
    np.testing.assert_array_equal(first, second)
    batch = {k: v[None] for k, v in cold.prepare(obs).inputs.items()}
    zero = torch.zeros(1, policy.model.config.num_actions, policy.model.action_space.dim)
    expected = policy.model.generate(batch, steps=policy.config.steps, noise=zero)[0].numpy()
    np.testing.assert_allclose(first, expected, atol=1e-5)
    assert not np.allclose(policy.infer(obs)["anchors"], first, atol=1e-3)  # the seeded unit noise differs
    with pytest.raises(ValueError, match=r"PolicyConfig.noise_scale: expected a value in \[0, 1\], got 2.0"):
        dataclasses.replace(policy.config, noise_scale=2.0)


def test_step_queue_and_open_loop(policy: Policy) -> None:
    calls: list[np.ndarray] = []
    looped = Policy(
        policy.model,
        policy.tokenizer,
        source=policy.source,
        config=dataclasses.replace(
            policy.config, execution=Synchronous(execute_steps=5), proprio_mode="open_loop"
        ),
    )
    original = looped.prepare

    def spy(obs, *, proprio=None):  # noqa: ANN001, ANN202
        prepared = original(obs, proprio=proprio)
        calls.append(prepared.proprio.copy())
        return prepared

    looped.prepare = spy  # type: ignore[method-assign]
    obs = robot_obs(np.random.default_rng(5))
    first_reply = looped.infer(obs)
    calls.clear()
    actions = [looped.step(obs) for _ in range(7)]
    assert len(calls) == 2  # queried at step 0 and step 5
    assert all(a.shape == (7,) for a in actions)
    np.testing.assert_allclose(actions[:5], first_reply["actions"][:5], atol=1e-5)
    # open loop: the second query's proprio is the predicted pose of the 5th executed step
    np.testing.assert_allclose(calls[1], first_reply["canonical"][4], atol=1e-5)
    looped.reset()
    calls.clear()
    looped.step(obs)
    np.testing.assert_allclose(calls[0], policy.source.state_to_canonical(obs["state"]), atol=1e-6)  # type: ignore[union-attr]


def test_raw_protocol(raw_policy: Policy) -> None:
    reply = raw_policy.infer(raw_obs(np.random.default_rng(6)))
    assert reply["actions"].shape == (30, 20)
    assert raw_policy.metadata["protocol"] == "raw" and raw_policy.metadata["proprio_dim"] == 20
    more = raw_policy.infer({**raw_obs(np.random.default_rng(6)), "steps": STEPS + 1})
    assert more["actions"].shape == (30, 20)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda o: o["images"].pop("observation.images.wrist"), "missing camera 'observation.images.wrist'"),
        (
            lambda o: o["images"].update({"observation.images.front": np.zeros((8, 8, 3), np.float32)}),
            "expected dtype uint8",
        ),
        (
            lambda o: o["images"].update({"observation.images.front": np.zeros((8, 8), np.uint8)}),
            r"expected shape \[H, W, 3\]",
        ),
        (lambda o: o["images"].update({"side": np.zeros((8, 8, 3), np.uint8)}), "unknown camera"),
        (lambda o: o.update(state=np.full(8, np.nan, np.float32)), "state: contains NaN"),
        (lambda o: o.update(state=np.zeros(6, np.float32)), r"state: expected shape \[8\]"),
        (lambda o: o.update(state=np.zeros(8, np.float32)), "state: quaternion with .*zero norm"),
        # Finite but extreme: used to pass validation and fail (or NaN) inside the model thread.
        (lambda o: o["state"].__setitem__(0, 1e20), r"state: canonical proprio\[0\] = 1e\+20 is outside"),
        (lambda o: o.update(state=np.full(8, 1e300)), r"state\[0\] = 1e\+300 is outside \[-3.403e\+38"),
        (lambda o: o["state"].__setitem__(1, -3e4), r"state: canonical proprio\[1\] = -3e\+04 is outside"),
        (lambda o: o.update(domain="mars_rover"), "unknown domain 'mars_rover'"),
        (lambda o: o.pop("instruction"), "missing field 'instruction'"),
        (lambda o: o.update(steps=0), "steps: 0 is out of range"),
    ],
)
def test_bad_robot_requests_name_the_problem(policy: Policy, change, needle: str) -> None:  # noqa: ANN001
    obs = robot_obs(np.random.default_rng(7))
    change(obs)
    with pytest.raises(RequestError, match=needle):
        policy.prepare(obs)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda o: o.pop("image0"), "missing field 'image0'"),
        (lambda o: o.update(domain_id=99), "domain_id: 99 is out of range"),
        (lambda o: o.update(proprio=[0.0] * 19), r"proprio: expected shape \[20\]"),
        (
            lambda o: (o.pop("image1"), o.update(image2=np.zeros((4, 4, 3), np.uint8))),
            "image2: given without image1",
        ),
        (lambda o: o.update(language_instruction=5), "language_instruction: expected a string"),
        (lambda o: o.update(proprio=np.full(20, 1e30)), r"proprio\[0\] = 1e\+30 is outside \[-1e\+04"),
        (lambda o: o.update(proprio=np.full(20, 1e300)), r"proprio\[0\] = 1e\+300 is outside"),
        (lambda o: o.update(proprio=[10**400] * 20), "proprio: a number is too large to be a float"),
    ],
)
def test_bad_raw_requests_name_the_problem(raw_policy: Policy, change, needle: str) -> None:  # noqa: ANN001
    obs = raw_obs(np.random.default_rng(8))
    change(obs)
    with pytest.raises(RequestError, match=needle):
        raw_policy.prepare(obs)


@pytest.mark.parametrize("raw", [False, True], ids=["source", "raw"])
def test_non_finite_actions_are_never_returned(policy: Policy, raw: bool) -> None:
    broken = nan_policy(policy.with_source(None) if raw else policy)
    obs = raw_obs(np.random.default_rng(9)) if raw else robot_obs(np.random.default_rng(9))
    with pytest.raises(NonFiniteActionError, match="the model produced non-finite actions"):
        broken.infer(obs)
    with pytest.raises(NonFiniteActionError, match=r"request 0 of a batch of 2"):
        broken.infer_batch([obs, obs])
    with pytest.raises(NonFiniteActionError):
        broken.step(obs)
    assert broken.executor.plan is None and broken.executor.in_flight is None  # nothing queued either


def test_from_checkpoint_names_unknown_source(checkpoint) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="source 'nope': not in"):
        Policy.from_checkpoint(checkpoint, source="nope", device="cpu")


def test_fast_path_through_policy_matches_eager(policy: Policy) -> None:
    """The real fast path (static shapes, precomputed step terms; CUDA graph on GPU) runs under Policy on CPU and
    gives the eager actions; it is off by default on CPU and on by default on CUDA."""
    assert not policy.fast
    fast = Policy(
        policy.model,
        policy.tokenizer,
        source=policy.source,
        config=dataclasses.replace(policy.config, fast=True),
    )
    assert fast.fast
    obs = robot_obs(np.random.default_rng(9))
    # fp32 on CPU: only summation order differs (random weights give native actions of ~100s).
    np.testing.assert_allclose(fast.infer(obs)["actions"], policy.infer(obs)["actions"], rtol=1e-5, atol=1e-3)


def test_source_from_a_file(checkpoint, tmp_path) -> None:  # noqa: ANN001
    import yaml

    source = arm_source("lab_arm", 6, control_hz=20.0)
    (tmp_path / "arm.json").write_text(json.dumps(source.to_dict()))
    (tmp_path / "arm.yaml").write_text(yaml.safe_dump(source.to_dict()))
    for name in ("arm.json", "arm.yaml"):
        loaded = Policy.from_checkpoint(checkpoint, source=str(tmp_path / name), device="cpu", steps=STEPS)
        assert loaded.source == source
        assert loaded.infer(robot_obs(np.random.default_rng(10)))["actions"].shape == (40, 7)  # 2 s at 20 Hz


# ----------------------------------------------------------------------------------------------------------
# Robots with fewer cameras than the checkpoint (issue 15, item 5)


def _same_weights(policy: Policy, **changes: object) -> XVLA:
    """The policy's model with other config options (none of them changes a parameter's shape)."""
    model = XVLA(policy.model.config.replace(**changes))
    model.load_state_dict(policy.model.state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def masking_model(policy: Policy) -> XVLA:
    return _same_weights(policy, mask_missing_views=True)


def test_two_cameras_on_a_three_view_checkpoint(policy: Policy, masking_model: XVLA) -> None:
    """Each `missing_views` choice serves the 2-camera toy arm on the 3-view checkpoint end to end, as chosen:
    "zeros" and "mask" give the third view absent (masked by the masking model), "repeat_primary" the front
    camera's image again."""
    assert policy.model.config.num_views == 3 and len(arm_source().cameras) == 2
    obs = robot_obs(np.random.default_rng(11))
    anchors = {}
    for choice, model in (("zeros", policy.model), ("mask", masking_model), ("repeat_primary", policy.model)):
        served = Policy(
            model, policy.tokenizer, source=arm_source(missing_views=choice), config=policy.config
        )
        assert served.metadata["missing_views"] == choice
        inputs = served.prepare(obs).inputs
        present = choice == "repeat_primary"
        assert inputs["image_mask"].tolist() == [True, True, present]
        expected = inputs["pixel_values"][0] if present else torch.zeros_like(inputs["pixel_values"][2])
        torch.testing.assert_close(inputs["pixel_values"][2], expected, rtol=0, atol=0)
        reply = served.infer(obs)
        assert reply["actions"].shape == (20, 7) and np.isfinite(reply["actions"]).all()
        anchors[choice] = reply["anchors"]
    # the same weights and noise: each choice changes what the model computes
    assert not np.allclose(anchors["zeros"], anchors["mask"], atol=1e-4)
    assert not np.allclose(anchors["zeros"], anchors["repeat_primary"], atol=1e-4)


def test_view_choices_the_checkpoint_cannot_honour_are_refused(policy: Policy) -> None:
    with pytest.raises(
        ValueError, match=r"missing_views: 'mask' needs a model built with mask_missing_views=true"
    ):
        policy.with_source(arm_source(missing_views="mask"))
    two_views = Policy(_same_weights(policy, num_views=2), policy.tokenizer, config=policy.config)
    three = {"key": "observation.images.side"}
    with pytest.raises(
        ValueError, match=r"source 'toy_arm': cameras: 3 cameras, but the model takes 2 view\(s\)"
    ):
        two_views.with_source(arm_source(cameras=[*arm_source().to_dict()["cameras"], three]))


def test_missing_views_round_trip_through_sources_json(checkpoint, tmp_path) -> None:  # noqa: ANN001
    """The choice is read back from a checkpoint's sources.json; one written before the field existed means
    "zeros", the behaviour it had then."""
    for path in checkpoint.iterdir():
        if path.name != "sources.json":
            (tmp_path / path.name).symlink_to(path)
    old = arm_source("old_arm", 4).to_dict()
    del old["missing_views"]
    sources = {
        "old_arm": old,
        "repeat_arm": arm_source("repeat_arm", 5, missing_views="repeat_primary").to_dict(),
    }
    (tmp_path / "sources.json").write_text(json.dumps(sources))
    obs = robot_obs(np.random.default_rng(12))
    for name, choice in (("old_arm", "zeros"), ("repeat_arm", "repeat_primary")):
        loaded = Policy.from_checkpoint(tmp_path, source=name, device="cpu", steps=STEPS, seed=0)
        assert loaded.source is not None and loaded.source.missing_views == choice
        assert loaded.prepare(obs).inputs["image_mask"].tolist() == [True, True, choice == "repeat_primary"]


# ----------------------------------------------------------------------------------------------------------
# 16-bit models


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fast"])
def test_bfloat16_model_replies_in_float32_numpy(policy: Policy, fast: bool) -> None:
    """A model run in bfloat16 (whose tensors numpy cannot hold) replies with float32 arrays, in both formats."""
    model = copy.deepcopy(policy.model).to(torch.bfloat16)
    robot = Policy(
        model, policy.tokenizer, source=policy.source, config=dataclasses.replace(policy.config, fast=fast)
    )
    reply = robot.infer(robot_obs(np.random.default_rng(13)))
    raw = robot.with_source(None).infer(raw_obs(np.random.default_rng(13)))
    for value in (reply["actions"], reply["anchors"], reply["canonical"], raw["actions"]):
        assert isinstance(value, np.ndarray) and value.dtype == np.float32 and np.isfinite(value).all()
