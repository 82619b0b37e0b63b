"""The step counter behind the arithmetic floor (bench/floor.py), and what it shows of the model:
a training step never waits on the host, however many tokens it decodes."""

import pytest
import torch
import torch.nn.functional as F

from bench.floor import count_step, floor
from model import Im2Latex, ModelConfig

TINY = dict(vocab_size=20, emb_dim=16, dec_rnn_h=24, enc_out_dim=32, cnn_widths=(8, 16, 16, 16))


def test_a_matmul_counts_its_flops_and_the_bytes_it_must_move():
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    c = count_step(lambda: a @ b)
    assert c.flops == {"float32": 2 * 64 * 32 * 16}
    assert c.bytes == 4 * (64 * 32 + 32 * 16 + 64 * 16)
    assert (c.ops, c.syncs) == (1, 0)


def test_views_move_nothing_and_broadcast_inputs_are_read_once():
    x = torch.randn(8, 16)
    assert count_step(lambda: x.t().view(16, 8)[2:]).bytes == 0
    row = torch.randn(1, 16).expand(8, 16)  # stride 0 along the first dim: 16 distinct numbers
    c = count_step(lambda: x + row)
    assert c.bytes == 4 * (8 * 16 + 16 + 8 * 16)
    assert c.flops == {}  # elementwise work is bounded by bytes, not counted as matmul FLOPs


def test_reading_a_value_back_is_a_host_sync():
    x = torch.randn(5)
    assert count_step(lambda: float(x.sum())).syncs == 1
    assert count_step(lambda: bool(x.max() > 0)).syncs == 1


def test_floor_is_work_over_measured_rate_whichever_bound_is_larger():
    a, b = torch.randn(64, 32, dtype=torch.bfloat16), torch.randn(32, 16, dtype=torch.bfloat16)
    c = count_step(lambda: a @ b)
    rates = {"flops_bfloat16": 1e9, "bytes": 1e6}
    f = floor(c, rates)
    assert f["compute_s"] == pytest.approx(2 * 64 * 32 * 16 / 1e9)
    assert f["memory_s"] == pytest.approx(c.bytes / 1e6)
    assert f["floor_s"] == max(f["compute_s"], f["memory_s"])


def _train_step(steps: int, teacher_forcing: float):
    torch.manual_seed(0)
    model = Im2Latex(ModelConfig(**TINY))
    opt = model.configure_optimizer(lr=1e-3)
    imgs = torch.randint(0, 256, (3, 1, 32, 48), dtype=torch.uint8)
    tgt = torch.randint(4, 20, (3, steps + 1))

    def step():
        logits = model(imgs, tgt[:, :-1], teacher_forcing=teacher_forcing)
        F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


@pytest.mark.parametrize("teacher_forcing", [1.0, 0.5])
def test_a_training_step_never_syncs_with_the_host_at_any_length(teacher_forcing):
    short = count_step(_train_step(4, teacher_forcing))
    long = count_step(_train_step(12, teacher_forcing))
    assert short.syncs == long.syncs == 0
    assert long.ops > short.ops  # the decoder loop was counted, token by token


def test_the_work_splits_by_model_part_and_adds_up():
    c = count_step(_train_step(6, 1.0))
    assert set(c.parts) == {"encoder", "decoder", "other"}  # other: the loss and Adam
    for key, total in (("ops", c.ops), ("bytes", c.bytes), ("flops", sum(c.flops.values()))):
        assert sum(p[key] for p in c.parts.values()) == total, key
    assert c.parts["encoder"]["flops"] > 0 and c.parts["decoder"]["flops"] > 0
    assert c.parts["other"]["flops"] == 0  # no matmul outside the model
    assert c.parts["decoder"]["ops"] > c.parts["encoder"]["ops"] + c.parts["other"]["ops"]
