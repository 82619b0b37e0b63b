import io
import json

import pytest
import torch
import torch.nn.functional as F

import model.decoder as decoder
from model import Im2Latex, ModelConfig, teacher_forcing_ratio
from model.position import add_position_features, position_features
from model.sampling import own_token_mask

TINY = dict(emb_dim=16, dec_rnn_h=24, enc_out_dim=32, cnn_widths=(8, 16, 16, 16))


def tiny_model(seed: int = 0, **kw) -> Im2Latex:
    torch.manual_seed(seed)
    return Im2Latex(ModelConfig(**{"vocab_size": 20, **TINY, **kw}))


def images(n: int = 3, height: int = 32, width: int = 48, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, height, width), generator=g, dtype=torch.uint8)


def tokens(n: int = 3, steps: int = 6, seed: int = 2, vocab: int = 20) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, steps), generator=g)


def test_config_round_trips_through_a_weights_only_checkpoint():
    cfg = ModelConfig(vocab_size=7, cnn_widths=(4, 8, 8, 8), add_position_features=True)
    d = cfg.to_dict()
    json.dumps(d)  # plain types only
    buf = io.BytesIO()
    torch.save({"model_config": d}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["model_config"]
    assert ModelConfig.from_dict(loaded) == cfg


def test_encoder_grid_of_a_64x320_image():
    """conv/pool geometry of the reference CNN: 64 x 320 -> 6 x 79 = 474 vectors."""
    model = tiny_model()
    enc = model.encode(torch.zeros(2, 1, 64, 320, dtype=torch.uint8))
    assert enc.shape == (2, 6 * 79, 32)


def test_uint8_input_equals_float_input_in_unit_range():
    model, imgs = tiny_model(), images()
    torch.testing.assert_close(model.encode(imgs), model.encode(imgs.float() / 255))
    with pytest.raises(ValueError):
        model.encode(imgs.expand(-1, 3, -1, -1))  # one channel only


def test_position_features_encode_row_and_column():
    n = 2  # timescales per axis for 10 channels; channels 8 and 9 stay zero
    sig = position_features(3, 4, 10)
    assert sig.shape == (3, 4, 10)
    inv = torch.tensor([1.0, 1e-4])  # 1 / timescale, geometric from 1 to 1e4
    for y in range(3):
        for x in range(4):
            torch.testing.assert_close(sig[y, x, :n], torch.sin(y * inv))
            torch.testing.assert_close(sig[y, x, n : 2 * n], torch.cos(y * inv))
            torch.testing.assert_close(sig[y, x, 2 * n : 3 * n], torch.sin(x * inv))
            torch.testing.assert_close(sig[y, x, 3 * n : 4 * n], torch.cos(x * inv))
    assert not sig[..., 8:].any()
    x = torch.randn(2, 3, 4, 10)
    torch.testing.assert_close(add_position_features(x), x + sig)


def test_add_position_features_flag_adds_the_signal_to_the_encoder_output():
    plain, with_pos = tiny_model(seed=3), tiny_model(seed=3, add_position_features=True)
    imgs = images()
    delta = with_pos.encode(imgs) - plain.encode(imgs)  # B x L x C, grid 2 x 11
    signal = position_features(2, 11, 32).view(1, 22, 32)
    torch.testing.assert_close(delta, signal.expand(3, -1, -1))


@pytest.mark.parametrize("scratch_bytes", [None, 1])
def test_matches_the_plain_reference_formulation_forward_and_gradients(scratch_bytes, monkeypatch):
    """Our sigmoid-based, tape-accumulated attention against a straightforward implementation
    (bench/baseline.py: tanh(W_1 enc + W_2 h) every step, plain autograd), in float64; also with
    the gates computed one image at a time (scratch_bytes=1)."""
    from bench.baseline import BaselineIm2Latex, baseline_loss, baseline_name, copy_weights

    if scratch_bytes is not None:
        monkeypatch.setattr(decoder, "SCRATCH_BYTES", scratch_bytes)

    ours = tiny_model(add_position_features=True, batch_norm=False).double()
    ref = BaselineIm2Latex(20, 16, 24, 32, add_pos_feat=True, cnn_widths=(8, 16, 16, 16))
    ref = ref.double()
    copy_weights(ours, ref)
    imgs, tgt = torch.rand(3, 1, 32, 48, dtype=torch.float64), tokens(steps=7)
    loss = F.cross_entropy(ours(imgs, tgt).flatten(0, 1), tgt.flatten())
    ref_loss = baseline_loss(ref(imgs.expand(-1, 3, -1, -1), tgt), tgt, pad=-100)
    torch.testing.assert_close(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    ref_grads = {name: p.grad for name, p in ref.named_parameters()}
    ref_grads["cnn_encoder.0.weight"] = ref_grads["cnn_encoder.0.weight"].sum(1, keepdim=True) / 3
    assert len(list(ours.parameters())) == len(ref_grads)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[baseline_name(name)], msg=name)


def test_attention_output_is_fed_back_to_later_steps():
    """o_t = tanh(W_3 [h, context]) must be the next step's input: the last step's logits must
    depend on what W_3 produced at step 0 (the reference code reused o_0 at every step)."""
    model, first = tiny_model(), []

    def keep_first(module, inputs, output):
        if not first:
            output.retain_grad()
            first.append(output)

    model.decoder.W_3.register_forward_hook(keep_first)
    logits = model(images(), tokens(steps=3))
    logits[:, 2].sum().backward()
    assert first[0].grad.abs().sum() > 0


def test_training_attention_does_not_save_per_step_gate_activations():
    """autograd would keep a B x L x A tensor per step; the custom backward recomputes it."""
    model = tiny_model(enc_out_dim=256, dec_rnn_h=16, emb_dim=8)
    imgs, tgt = images(n=2, width=96), tokens(n=2, steps=12)

    def saved_bytes(steps: int) -> int:
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(imgs, tgt[:, :steps])
        return sum(storages.values())

    per_step = (saved_bytes(12) - saved_bytes(2)) / 10
    gate_bytes = 2 * (2 * 23) * 256 * 4  # B x L x A float32, grid 2 x 23
    assert per_step < gate_bytes / 4


def test_teacher_forcing_zero_feeds_only_the_models_own_tokens():
    model, imgs = tiny_model(), images()
    a, b = tokens(seed=4), tokens(seed=5)
    b[:, 0] = a[:, 0]  # same <s>, different ground truth afterwards
    forced = model(imgs, a, teacher_forcing=0.0)
    torch.testing.assert_close(forced, model(imgs, b, teacher_forcing=0.0))
    assert not torch.allclose(model(imgs, a), model(imgs, b))


def test_scheduled_sampling_is_per_example_and_reproducible_from_the_generator():
    mask = own_token_mask(64, 10, 0.5, torch.Generator().manual_seed(0))
    again = own_token_mask(64, 10, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    assert 0.35 < mask.float().mean() < 0.65
    assert all(0 < column.sum() < 64 for column in mask.T)  # not one coin for the whole batch
    assert own_token_mask(4, 10, 1.0) is None

    model, imgs, tgt = tiny_model(), images(), tokens()

    def run(seed):
        return model(imgs, tgt, teacher_forcing=0.5, generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(run(1), run(1))
    assert not torch.allclose(run(1), model(imgs, tgt))


def test_teacher_forcing_schedules():
    assert teacher_forcing_ratio("teacher_forcing", 10_000, 0.5) == 1.0
    assert teacher_forcing_ratio("exp", 0, 0.99) == 1.0
    assert teacher_forcing_ratio("exp", 2, 0.5) == pytest.approx(0.25)
    assert teacher_forcing_ratio("inv_sigmoid", 0, 10.0) == pytest.approx(10 / 11)
    inv = [teacher_forcing_ratio("inv_sigmoid", s, 100.0) for s in (0, 100, 500, 1000, 10**6)]
    assert inv == sorted(inv, reverse=True) and inv[-1] == 0.0
    for method, k in [("exp", 1.5), ("inv_sigmoid", 0.5), ("linear", 1.0)]:
        with pytest.raises(ValueError):
            teacher_forcing_ratio(method, 1, k)


def test_extend_vocab_keeps_old_rows_and_outputs():
    model, imgs, tgt = tiny_model(), images(), tokens()
    before = model(imgs, tgt).detach()
    model.extend_vocab(23)
    assert model.cfg.vocab_size == 23
    after = model(imgs, tgt)
    assert after.shape == (3, 6, 23)
    torch.testing.assert_close(after[..., :20], before)
    assert sum(p.shape[0] == 23 for p in model.parameters()) == 2  # embedding and W_out
    with pytest.raises(ValueError):
        model.extend_vocab(10)


def test_amp_runs_the_cnn_in_bf16_and_stays_close_to_fp32():
    model, imgs, tgt = tiny_model(), images(), tokens()
    ref = model(imgs, tgt)
    logits = model(imgs, tgt, amp=True)
    assert logits.dtype == torch.float32
    assert (logits - ref).abs().max() < 0.05 * ref.abs().max()
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_amp_training_converges_like_fp32():
    """bf16 autocast in the CNN must not derail training: both precisions fit a small batch."""
    imgs, tgt = images(n=4), tokens(n=4, steps=5)
    losses = {}
    for amp in (False, True):
        model = tiny_model(seed=5)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(100):
            logits = model(imgs, tgt[:, :-1], amp=amp)
            loss = F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[amp] = loss.item()
    initial = torch.log(torch.tensor(20.0)).item()  # uniform over the vocabulary
    assert losses[False] < 0.2 * initial and losses[True] < 0.2 * initial, losses


def test_frozen_encoder_gets_no_gradient_and_leaves_decoder_gradients_unchanged():
    imgs, tgt = images(), tokens()
    grads = []
    for freeze in (False, True):
        model = tiny_model(seed=6)
        for p in model.encoder.parameters():
            p.requires_grad_(not freeze)
        model(imgs, tgt).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    unfrozen, frozen = grads
    assert all(frozen[n] is None for n in frozen if n.startswith("encoder."))
    for name in (n for n in frozen if n.startswith("decoder.")):
        torch.testing.assert_close(frozen[name], unfrozen[name], msg=name)


def test_image_scale_shrinks_the_encoder_grid():
    imgs = torch.full((2, 1, 64, 320), 255, dtype=torch.uint8)
    full = Im2Latex(ModelConfig(vocab_size=10, emb_dim=8, dec_rnn_h=16, enc_out_dim=16,
                                cnn_widths=(4, 4, 8, 8)))
    half = Im2Latex(ModelConfig(vocab_size=10, emb_dim=8, dec_rnn_h=16, enc_out_dim=16,
                                cnn_widths=(4, 4, 8, 8), image_scale=0.5))
    assert half.encode(imgs).shape[1] < full.encode(imgs).shape[1] / 3
    assert ModelConfig.from_dict(half.cfg.to_dict()).image_scale == 0.5


def test_batch_norm_encoder_tells_image_positions_apart_from_the_first_step():
    """The plain five-conv stack at PyTorch's default init shrinks its input layer by layer;
    its outputs barely vary over the image, and a real-corpus run sat on the unigram loss for
    a whole epoch. With batch norm the features vary at unit scale."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.full((4, 1, 64, 320), 255, dtype=torch.uint8)
    ink = torch.rand(4, 1, 64, 320, generator=g) < 0.1
    imgs[ink] = 0

    def spread(batch_norm: bool) -> float:
        torch.manual_seed(0)
        model = Im2Latex(ModelConfig(vocab_size=10, batch_norm=batch_norm))
        with torch.no_grad():
            return model.encode(imgs).std(dim=1).mean().item()  # over positions L

    assert spread(batch_norm=False) < 0.05
    assert spread(batch_norm=True) > 0.3


def test_checkpoints_saved_before_batch_norm_load_as_the_plain_stack():
    old = tiny_model(batch_norm=False).cfg.to_dict()
    del old["batch_norm"]
    cfg = ModelConfig.from_dict(old)
    assert cfg.batch_norm is False
    Im2Latex(cfg).load_state_dict(tiny_model(batch_norm=False).state_dict())


def test_a_frozen_encoder_keeps_its_batch_norm_statistics():
    model = tiny_model(seed=6)
    model.freeze_encoder()
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    model.train()
    model(images(), tokens()).sum().backward()
    after = model.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.decoder.training and not model.encoder.training
    assert all(p.grad is None for p in model.encoder.parameters())


def test_an_empty_batch_runs_in_training_and_evaluation():
    """A distributed rank whose slice of a bucket's last batch is empty still runs the step."""
    model = tiny_model()
    imgs, tgt = images(0), tokens(0)
    logits = model(imgs, tgt)
    assert logits.shape == (0, 6, 20)
    F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum").backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    with torch.no_grad():
        assert model.eval()(imgs, tgt).shape == (0, 6, 20)
