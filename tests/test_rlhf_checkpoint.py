"""rlhf.checkpoint: bitwise round trip (tied weights, optimizer, RNG streams), crash safety, pruning, errors."""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("safetensors")
np = pytest.importorskip("numpy")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from rlhf import checkpoint as ck  # noqa: E402
from rlhf.checkpoint import (  # noqa: E402
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

ROOT = Path(__file__).resolve().parents[1]


class TiedNet(nn.Module):
    """Embedding tied to the output head, with dropout so training draws from the torch RNG."""

    def __init__(self, vocab: int = 13, dim: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, ids):  # (B, T) -> (B, T, V)
        self.calls += 1
        return self.head(self.drop(torch.tanh(self.hidden(self.emb(ids)))))


def train_steps(model, opt, n):
    """n AdamW steps on random batches; returns the python/numpy draws made along the way."""
    draws = []
    for _ in range(n):
        draws.append((random.random(), float(np.random.rand())))
        ids = torch.randint(0, 13, (4, 5))
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return draws


def make(seed):
    torch.manual_seed(seed)
    model = TiedNet()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def state_of(model, opt, step):
    return {"step": step, "optimizer": opt.state_dict(), "position": {"epoch": 0, "index": 7}}


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_round_trip_resumes_bitwise(tmp_path):
    random.seed(0)
    np.random.seed(0)
    model, opt = make(0)
    train_steps(model, opt, 3)
    save_checkpoint(tmp_path, 3, model, state_of(model, opt, 3))
    draws_a, torch_a = train_steps(model, opt, 4), torch.rand(3)
    weights_a = snapshot(model)

    random.seed(99)  # a "new process": other init, other RNG streams
    np.random.seed(99)
    model2, opt2 = make(99)
    path = latest_checkpoint(tmp_path)
    assert path == tmp_path / "checkpoints" / "step-00000003"
    state = load_checkpoint(path, model2)
    opt2.load_state_dict(state["optimizer"])
    assert state["step"] == 3 and state["position"] == {"epoch": 0, "index": 7}
    draws_b, torch_b = train_steps(model2, opt2, 4), torch.rand(3)

    assert draws_a == draws_b and torch.equal(torch_a, torch_b)
    assert model2.head.weight is model2.emb.weight
    for name, value in snapshot(model2).items():
        assert torch.equal(value, weights_a[name]), name


def test_state_file_loads_weights_only(tmp_path):
    model, opt = make(0)
    train_steps(model, opt, 1)
    path = save_checkpoint(tmp_path, 1, model, state_of(model, opt, 1))
    state = torch.load(path / ck.STATE_FILE, weights_only=True)
    assert set(state) == {"step", "optimizer", "position", "rng"}
    assert {"python", "numpy", "torch"} <= set(state["rng"])
    assert sorted(p.name for p in path.iterdir()) == sorted([ck.MODEL_FILE, ck.STATE_FILE, ck.COMPLETE])


def test_rng_state_restores_every_stream():
    saved = rng_state()
    first = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4))
    cuda_first = torch.rand(4, device="cuda") if torch.cuda.is_available() else None
    set_rng_state(saved)
    again = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4))
    assert first[:4] == again[:4] and torch.equal(first[4], again[4])
    if cuda_first is not None:
        assert torch.equal(cuda_first, torch.rand(4, device="cuda"))


def test_rng_state_keeps_cached_gaussians():
    random.seed(1)  # a fresh stream, so that the next draw leaves a cached value
    np.random.seed(1)
    random.gauss(0, 1)  # python and numpy each cache the second value of a Box-Muller pair
    np.random.randn()
    assert random.getstate()[2] is not None and np.random.get_state()[3] == 1
    saved = rng_state()
    first = (random.gauss(0, 1), np.random.randn())
    set_rng_state(saved)
    assert (random.gauss(0, 1), np.random.randn()) == first


def test_latest_ignores_tmp_and_incomplete(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    model, _ = make(0)
    save_checkpoint(tmp_path, 5, model, {"step": 5})
    root = tmp_path / "checkpoints"
    (root / "step-00000009").mkdir()  # no COMPLETE
    (root / "step-00000009" / ck.MODEL_FILE).write_bytes(b"partial")
    (root / ".tmp-step-00000010-123").mkdir()
    (root / ".tmp-step-00000010-123" / ck.COMPLETE).write_text("10\n")
    (root / "notes").mkdir()
    assert latest_checkpoint(tmp_path) == root / "step-00000005"
    with pytest.raises(ValueError, match="incomplete"):
        load_checkpoint(root / "step-00000009", model)


def test_pruning_keeps_newest(tmp_path):
    model, _ = make(0)
    for step in range(1, 6):
        save_checkpoint(tmp_path, step * 10, model, {"step": step * 10}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000040", "step-00000050"]
    for step in range(6, 9):
        save_checkpoint(tmp_path, step * 10, model, {"step": step * 10}, keep=0)
    assert len(list_checkpoints(tmp_path)) == 5


def test_saving_earlier_step_drops_abandoned_later_ones(tmp_path):
    model, _ = make(0)
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, model, {"step": step}, keep=5)
    save_checkpoint(tmp_path, 15, model, {"step": 15}, keep=5)  # a fresh run restarted in the same directory
    assert [ck.checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [10, 15]


def test_resave_same_step_replaces(tmp_path):
    model, _ = make(0)
    save_checkpoint(tmp_path, 4, model, {"tag": "old"})
    with torch.no_grad():
        model.hidden.bias.fill_(2.5)
    save_checkpoint(tmp_path, 4, model, {"tag": "new"})
    other, _ = make(1)
    assert load_checkpoint(latest_checkpoint(tmp_path), other)["tag"] == "new"
    assert torch.equal(other.hidden.bias, torch.full((8,), 2.5))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000004"]


@pytest.mark.parametrize("fail_at", ["replace", "torch_save"])
def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch, fail_at):
    model, _ = make(0)
    save_checkpoint(tmp_path, 1, model, {"step": 1}, keep=1)
    good = snapshot(model)
    with torch.no_grad():
        model.hidden.weight.add_(1.0)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(ck.os, "replace", boom) if fail_at == "replace" else m.setattr(ck.torch, "save", boom)
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(tmp_path, 2, model, {"step": 2}, keep=1)
    root = tmp_path / "checkpoints"
    assert any(p.name.startswith(".tmp-step-00000002") for p in root.iterdir())
    fresh, _ = make(5)
    assert latest_checkpoint(tmp_path) == root / "step-00000001"
    assert load_checkpoint(root / "step-00000001", fresh)["step"] == 1
    assert all(torch.equal(v, good[k]) for k, v in snapshot(fresh).items())
    save_checkpoint(tmp_path, 2, model, {"step": 2}, keep=1)  # the next save cleans up
    assert [p.name for p in root.iterdir()] == ["step-00000002"]


_CHILD = """
import os, signal, sys, torch
from rlhf import checkpoint as ck
out, point = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = torch.nn.Linear(4, 4)
ck.save_checkpoint(out, 1, model, {"step": 1}, keep=1)
with torch.no_grad():
    model.weight.add_(1.0)
if point == "prune":  # a later checkpoint of an abandoned run, removed by the next save
    ck.save_checkpoint(out, 9, torch.nn.Linear(4, 4), {"step": 9}, keep=5)


def die(*args, **kwargs):
    if point == "prune":  # delete part of the checkpoint first
        os.remove(os.path.join(args[0], ck.MODEL_FILE))
    os.kill(os.getpid(), signal.SIGKILL)


setattr(*{"rename": (ck.os, "replace"), "prune": (ck.shutil, "rmtree")}[point], die)
ck.save_checkpoint(out, 2, model, {"step": 2}, keep=1)
"""


def test_sigkill_mid_save_leaves_a_loadable_checkpoint(tmp_path):
    """A process killed (no cleanup at all) before the rename, or in the middle of deleting an old checkpoint,
    leaves a good latest checkpoint."""
    expected = {"rename": 1, "prune": 2}
    procs = {
        point: subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / point), point], cwd=ROOT)
        for point in expected
    }
    torch.manual_seed(0)
    base = nn.Linear(4, 4).weight.detach().clone()
    for point, proc in procs.items():
        assert proc.wait(timeout=60) == -signal.SIGKILL, point
        path = latest_checkpoint(tmp_path / point)
        assert ck.checkpoint_step(path) == expected[point], point
        model = nn.Linear(4, 4)
        assert load_checkpoint(path, model)["step"] == expected[point]
        assert torch.equal(model.weight, base + (expected[point] - 1)), point
        save_checkpoint(tmp_path / point, 3, model, {"step": 3}, keep=1)  # recovers and cleans up
        assert os.listdir(tmp_path / point / "checkpoints") == ["step-00000003"]


def test_load_errors(tmp_path):
    model, _ = make(0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", model)
    path = save_checkpoint(tmp_path, 1, model, {"step": 1})
    with pytest.raises(ValueError, match="does not match the model"):
        load_checkpoint(path, nn.Linear(3, 3))
    state_bytes = (path / ck.STATE_FILE).read_bytes()
    (path / ck.STATE_FILE).write_bytes(state_bytes[: len(state_bytes) // 2])
    with pytest.raises(ValueError, match="cannot read trainer_state.pt"):
        load_checkpoint(path, model)
    (path / ck.STATE_FILE).write_bytes(state_bytes)
    weights = (path / ck.MODEL_FILE).read_bytes()
    (path / ck.MODEL_FILE).write_bytes(weights[:20])
    with pytest.raises(ValueError, match="cannot read model.safetensors"):
        load_checkpoint(path, model)
    (path / ck.MODEL_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_checkpoint(path, model)


def test_state_must_be_plain(tmp_path):
    model, _ = make(0)
    with pytest.raises(ValueError, match=r"state\['metrics'\]\['loss'\] is a float64"):
        save_checkpoint(tmp_path, 1, model, {"metrics": {"loss": np.float64(0.5)}})
    with pytest.raises(ValueError, match=r"state\['fn'\] is a object"):
        save_checkpoint(tmp_path, 1, model, {"fn": object()})
    with pytest.raises(ValueError, match=r"state\['steps'\]\[1\] is a int64"):
        save_checkpoint(tmp_path, 1, model, {"steps": [1, np.int64(2)]})
    assert latest_checkpoint(tmp_path) is None
