"""StreamingForecaster: along a drive it forecasts what the one-shot pipeline forecasts (latents to 1e-5), encodes
one history frame per call after the first, and falls back to a full encode on a scene change, a skipped keyframe,
a repeated window or unnamed frames; the bench's streaming stages compute the same chain."""
import dataclasses

import numpy as np
import pytest
import torch

from occ_mfd.builder import build
from occ_mfd.data.index import DatasetIndex, FrameEntry, SceneEntry, save_index
from occ_mfd.data.occ3d import OccFrame, labels_path, write_labels
from occ_mfd.data.records import OccBatch, collate_sequences
from occ_mfd.data.sequences import OccSequenceDataset
from occ_mfd.eval.speed import consecutive_windows, streaming_stages, time_stages
from occ_mfd.grid import FREE_ID
from occ_mfd.models.pipeline import OccForecastPipeline
from occ_mfd.models.snapshot import InferenceParts, snapshot_from_parts
from occ_mfd.models.streaming import StreamingForecaster
from occ_mfd.objectives.flow_matching import OccFlowTeacher
from test_eval_cli import G, NET, VAE

P, F, FRAMES = 4, 6, 15          # 15 frames: 6 windows of P + F per scene


def make_drives(root):
    """Two val scenes of FRAMES random keyframes (10 × 10 × 2); the ego drives 0.4 m and turns 0.05 rad per frame,
    so every window re-expresses the poses in another current frame and the cv-warp prior moves voxels."""
    scenes = []
    for si, name in enumerate(("scene-a", "scene-b")):
        frames = []
        for k in range(FRAMES):
            rng = np.random.default_rng(100 * si + k)
            sem = np.where(rng.random(G.shape) < 0.5, FREE_ID, rng.integers(0, 17, G.shape)).astype(np.uint8)
            write_labels(labels_path(root, name, f"{name}-{k}"), OccFrame(sem, np.ones_like(sem), np.ones_like(sem)), G)
            yaw = 0.05 * k
            pose = np.eye(4)
            pose[:2, :2] = [[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]]
            pose[:2, 3] = [0.4 * k, 0.1 * k]
            frames.append(FrameEntry(f"{name}-{k}", 1_000_000 + 500_000 * k, pose))
        scenes.append(SceneEntry(name, "val", frames))
    save_index(root, DatasetIndex(G, scenes, {"kind": "test"}))
    return root


@pytest.fixture(scope="module")
def drives(tmp_path_factory):
    """scene name → its consecutive windows as batches of 1, in time order."""
    ds = OccSequenceDataset(make_drives(tmp_path_factory.mktemp("drives")), "val", past=P, future=F, mask=None)
    out = {}
    for j in range(len(ds)):
        item = ds[j]
        out.setdefault(item.scene, []).append(collate_sequences([item]))
    assert [len(w) for w in out.values()] == [FRAMES - P - F + 1] * 2
    return out


def tiny_pipeline(prior: str | None = None) -> OccForecastPipeline:
    """A random tiny teacher (2 Euler steps, CFG 2; zero-init gates randomised). Temporal attention at level 0:
    without it the tiny net's only temporal mixing is the 3-D stem's kernel of 3, and the forecast would not read
    the older history frames at all (a wrongly shifted cache would go unnoticed)."""
    torch.manual_seed(0)
    vae = snapshot_from_parts(InferenceParts("vae", {"vae": build(VAE)})).describe()
    net = dict(NET, attn_levels=(0,), heads=2, **({"prior": prior} if prior else {}))
    obj = OccFlowTeacher(net=net, vae=vae, latent_scale=1.0, cond_drop_prob=0.1, steps=2, shift=3.0, cfg_scale=2.0)
    with torch.no_grad():
        for p in obj.net.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.3)
    return OccForecastPipeline(obj.codec, obj.net, obj.sampler).eval()


def spy_vae(pipe, monkeypatch) -> list[int]:
    """Record the number of frames of every VAE encode call."""
    calls, encode = [], pipe.codec.vae.encode

    def spy(occ):
        calls.append(int(occ.shape[0]))
        return encode(occ)

    monkeypatch.setattr(pipe.codec.vae, "encode", spy)
    return calls


def gen(seed=7):
    return torch.Generator().manual_seed(seed)


def assert_close_latents(got: torch.Tensor, ref: torch.Tensor, what) -> None:
    """Sampled latents (1, F, C, H, W) equal up to 1e-5 of their scale: the history latents agree to ~1e-6 (one
    frame encoded alone vs in a batch of P rounds differently), which the random net's 2 CFG-2 steps amplify
    ~10× on latents of magnitude ~9; a wrong history changes them by > 1e-2 (test below)."""
    err, scale = (got - ref).abs().max().item(), max(1.0, ref.abs().max().item())
    assert err <= 1e-5 * scale, (what, err, scale)


@pytest.mark.parametrize("prior", [None, "cv-warp"])
def test_streamed_drive_equals_one_shot_and_encodes_one_frame_per_call(drives, prior, monkeypatch):
    pipe = tiny_pipeline(prior)
    streamer = StreamingForecaster(pipe)
    calls = spy_vae(pipe, monkeypatch)
    prior_frames = [F] if prior else []
    for i, batch in enumerate(drives["scene-a"]):
        del calls[:]
        got = streamer.forecast(batch, generator=gen())
        assert calls == ([P] if i == 0 else [1]) + prior_frames, (i, calls)   # history first, then the prior
        ref = pipe.forecast(batch, generator=gen())
        assert_close_latents(got.latents, ref.latents, i)
        assert (got.classes != ref.classes).float().mean() < 1e-3                  # argmax ties at ~1e-6 aside
        # every field of the condition (history latents, poses, prior, LiDAR trajectory) is the pipeline's, to 1e-5
        s_cond, p_cond = streamer.condition(batch, streamer._latents), pipe.encode(batch)
        for f in dataclasses.fields(p_cond):
            a, b = getattr(s_cond, f.name), getattr(p_cond, f.name)
            assert (a is None) == (b is None), f.name
            if a is not None:
                assert torch.allclose(a, b, atol=1e-5), f.name
    assert (streamer.calls, streamer.hits) == (len(drives["scene-a"]), len(drives["scene-a"]) - 1)
    assert streamer.frames_encoded == P + len(drives["scene-a"]) - 1


def test_every_history_frame_reaches_the_forecast(drives):
    """Why the equality above can fail: every history latent, the oldest included, changes the forecast, so a
    cache shifted the wrong way or a stale frame gives another forecast."""
    pipe = tiny_pipeline()
    a = drives["scene-a"]
    cond = pipe.encode(a[1])
    x0 = pipe.noise(cond, gen())
    stale = pipe.codec.encode(a[0].past)                                          # the previous window's history
    with torch.no_grad():
        ref = pipe.sample(cond, x0)
        for k in range(P):
            wrong = cond.past_latents.clone()
            wrong[:, k] = stale[:, k]
            other = pipe.sample(dataclasses.replace(cond, past_latents=wrong), x0)
            assert (other - ref).abs().max() > 1e-2, k


def test_scene_change_skipped_keyframe_repeat_and_unnamed_frames_re_encode(drives, monkeypatch):
    pipe = tiny_pipeline("cv-warp")
    streamer = StreamingForecaster(pipe)
    calls = spy_vae(pipe, monkeypatch)
    a, b = drives["scene-a"], drives["scene-b"]
    unnamed = dataclasses.replace(a[3], scenes=[], tokens=[])
    # (window, history frames encoded): hit = 1, anything else = all P
    plan = [(a[0], P), (a[1], 1), (a[3], P),          # a[1] → a[3] skips a keyframe
            (a[4], 1), (b[5], P), (b[0], P),          # another scene; going back in time
            (b[1], 1), (b[1], P), (b[2], 1),          # the same window again
            (unnamed, P), (a[4], P), (a[5], 1)]       # unnamed frames: no cache after them
    for k, (batch, n) in enumerate(plan):
        del calls[:]
        got = streamer.forecast(batch, generator=gen())
        assert calls == [n, F], (k, calls)
        ref = pipe.forecast(batch, generator=gen())
        assert_close_latents(got.latents, ref.latents, k)
    assert streamer.hits == sum(n == 1 for _, n in plan)
    streamer.reset()
    del calls[:]
    streamer.forecast(a[5])
    assert calls == [P, F]                            # reset() forgets the drive


def test_batch_of_two_and_sampled_posteriors_are_refused(drives):
    pipe = tiny_pipeline()
    a0 = drives["scene-a"][0]
    two = OccBatch(past=a0.past.repeat(2, 1, 1, 1, 1), future=a0.future.repeat(2, 1, 1, 1, 1),
                   ego=a0.ego.repeat(2, 1, 1, 1), scenes=a0.scenes * 2, tokens=a0.tokens * 2, grid=a0.grid)
    with pytest.raises(ValueError, match="batch size 1 only.*batch of 2"):
        StreamingForecaster(pipe).forecast(two)
    pipe.codec.sample = True
    with pytest.raises(ValueError, match="sample=True"):
        StreamingForecaster(pipe)


@pytest.mark.parametrize("prior", [None, "cv-warp"])
def test_streaming_stages_on_consecutive_windows_compute_the_one_shot_forecast(drives, prior):
    """The bench's streaming chain, fed by consecutive_windows (which primes with the drive's first window and
    starts over at its end): every run continues the previous one and returns the pipeline's forecast."""
    pipe = tiny_pipeline(prior)
    streamer = StreamingForecaster(pipe)
    windows = drives["scene-b"][:3]
    stages = streaming_stages(streamer, 2, seed=5)
    assert [n for n, _ in stages] == ["encode"] + (["prior"] if prior else []) + ["sample", "decode", "argmax"]
    feed = consecutive_windows(streamer, windows)
    fed = [feed(i) for i in range(5)]
    assert [w.tokens for w in fed] == [windows[k].tokens for k in (1, 2, 1, 2, 1)]
    assert (streamer.calls, streamer.hits) == (3, 0)  # the primes only: windows[0], three times
    feed = consecutive_windows(streamer, windows)
    latents, classes = [], []

    def keep(out):
        def fn(x):
            out.append(x)
            return x
        return fn

    at = [n for n, _ in stages].index("sample") + 1
    chain = stages[:at] + [("keep latents", keep(latents))] + stages[at:] + [("keep classes", keep(classes))]
    time_stages(chain, None, runs=4, warmup=1, next_inputs=feed)
    assert (streamer.calls, streamer.hits) == (3 + 5 + 3, 5)  # 5 runs continue; primes before runs 1, 3 and 5
    latents = [x1 for x1, _cond in latents]                # the sample stage hands on (latents, condition)
    for k, lat, cls in zip((1, 2, 1, 2, 1), latents, classes, strict=True):
        ref = pipe.forecast(windows[k], steps=2, generator=gen(5))
        assert_close_latents(lat, ref.latents, k)
        assert cls.dtype == torch.uint8 and (cls != ref.classes).float().mean() < 1e-3
    with pytest.raises(ValueError, match="≥ 2 consecutive windows"):
        consecutive_windows(streamer, windows[:1])
