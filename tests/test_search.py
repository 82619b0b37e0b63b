import itertools

import pytest
import torch
import torch.nn.functional as F

import model.decoder as decoder
from model import Im2Latex, ModelConfig

PAD, BOS, EOS = 0, 1, 2
TINY = dict(emb_dim=16, dec_rnn_h=48, enc_out_dim=32, cnn_widths=(8, 16, 16, 16))
TARGETS = [[4, 5, 6, 7], [8, 9, 4], [10, 11, 5, 6, 9], [7, 7, 8]]  # without <s> and </s>


def tiny_model(vocab: int = 12, seed: int = 0, **kw) -> Im2Latex:
    torch.manual_seed(seed)
    return Im2Latex(ModelConfig(vocab_size=vocab, **{**TINY, **kw}))


def random_images(n: int, seed: int = 1, height: int = 32, width: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, height, width), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def memorized() -> tuple[Im2Latex, torch.Tensor]:
    """A tiny model trained to map 4 random images to the 4 TARGETS (about 3 s on one core)."""
    model, imgs = tiny_model(), random_images(len(TARGETS))
    steps = max(map(len, TARGETS)) + 1
    tgt_in = torch.full((len(TARGETS), steps), PAD)
    tgt_out = torch.full((len(TARGETS), steps), PAD)
    for i, seq in enumerate(TARGETS):
        tgt_in[i, : len(seq) + 1] = torch.tensor([BOS, *seq])
        tgt_out[i, : len(seq) + 1] = torch.tensor([*seq, EOS])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        logits = model(imgs, tgt_in)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, f"did not memorize: loss {loss.item():.3f}"
    return model.eval(), imgs


def test_greedy_and_beam_reproduce_memorized_targets(memorized):
    model, imgs = memorized
    greedy = model.greedy(imgs, BOS, EOS, max_len=20)
    beam = model.beam_search(imgs, BOS, EOS, max_len=20, beam_size=3)
    assert greedy.tokens == TARGETS
    assert beam.tokens == TARGETS
    assert greedy.scores.shape == beam.scores.shape == (len(TARGETS),)
    assert (greedy.scores < 0).all() and (greedy.scores > -0.1).all()  # confident, mean log-prob


def test_greedy_stops_when_every_row_has_finished(memorized):
    model, imgs = memorized
    out = model.greedy(imgs, BOS, EOS, max_len=50, return_attention=True)
    steps = max(map(len, TARGETS)) + 1  # the longest target plus its </s>
    height, width = 2, 11  # encoder grid of a 32 x 48 image: 32 -> 17 -> 9 -> 4 -> 2
    assert out.attention.shape == (len(TARGETS), steps, height, width)
    torch.testing.assert_close(out.attention.sum((2, 3)), torch.ones(len(TARGETS), steps))


@pytest.mark.parametrize("decode", ["greedy", "beam"])
def test_batch_decode_equals_decoding_each_image_alone(memorized, decode):
    model, imgs = memorized
    imgs = torch.cat([imgs, random_images(2, seed=7)])  # rows that run to max_len, unfinished
    run = {
        "greedy": lambda x: model.greedy(x, BOS, EOS, max_len=12),
        "beam": lambda x: model.beam_search(x, BOS, EOS, max_len=12, beam_size=4),
    }[decode]
    together = run(imgs)
    alone = [run(img[None]) for img in imgs]
    assert together.tokens == [a.tokens[0] for a in alone]
    torch.testing.assert_close(together.scores, torch.cat([a.scores for a in alone]))


def test_beam_size_one_equals_greedy():
    model, imgs = tiny_model(vocab=9, seed=3).eval(), random_images(3, seed=4)
    greedy = model.greedy(imgs, BOS, EOS, max_len=15)
    beam = model.beam_search(imgs, BOS, EOS, max_len=15, beam_size=1)
    assert beam.tokens == greedy.tokens
    torch.testing.assert_close(beam.scores, greedy.scores)


def test_eval_decoding_is_deterministic(memorized):
    model, imgs = memorized
    a = model.beam_search(imgs, BOS, EOS, max_len=10, beam_size=3)
    b = model.beam_search(imgs, BOS, EOS, max_len=10, beam_size=3)
    assert a.tokens == b.tokens and torch.equal(a.scores, b.scores)


def _sequence_logprob(model: Im2Latex, img: torch.Tensor, seq: list[int]) -> float:
    tgt_in = torch.tensor([[BOS, *seq[:-1]]])
    with torch.no_grad():
        logp = torch.log_softmax(model(img[None], tgt_in), dim=-1)[0]
    return logp[torch.arange(len(seq)), torch.tensor(seq)].sum().item()


@pytest.mark.parametrize("seed", [0, 1])
def test_wide_beam_finds_the_exhaustive_best_sequence(seed):
    """With vocab 4 and max_len 3, a beam of 4**2 keeps every prefix, so it must return the most
    probable of all 40 possible outputs (sequences ending in </s>, or cut at max_len)."""
    vocab, max_len = 4, 3
    model, img = tiny_model(vocab=vocab, seed=seed).eval(), random_images(1, seed=seed)[0]
    others = [t for t in range(vocab) if t != EOS]
    finished = [[*p, EOS] for n in range(max_len) for p in itertools.product(others, repeat=n)]
    cut = [list(p) for p in itertools.product(others, repeat=max_len)]
    candidates = finished + cut
    assert len(candidates) == 40
    scores = {tuple(c): _sequence_logprob(model, img, c) for c in candidates}
    best = max(scores, key=scores.get)
    out = model.beam_search(img[None], BOS, EOS, max_len, beam_size=vocab**2, length_norm=0.0)
    expected = list(best[:-1]) if best[-1] == EOS else list(best)
    assert out.tokens == [expected]
    assert out.scores.item() == pytest.approx(scores[best] / len(best), abs=1e-5)


def test_beam_score_is_the_mean_logprob_of_the_returned_sequence(memorized):
    model, imgs = memorized
    out = model.beam_search(imgs, BOS, EOS, max_len=20, beam_size=4, length_norm=1.0)
    for img, tokens, score in zip(imgs, out.tokens, out.scores):
        seq = [*tokens, EOS]
        mean_logprob = _sequence_logprob(model, img, seq) / len(seq)
        assert score.item() == pytest.approx(mean_logprob, abs=1e-5)


def test_chunked_attention_scratch_gives_the_same_result(memorized, monkeypatch):
    """The gates are computed a few images at a time in a bounded scratch buffer."""
    model, imgs = memorized
    whole = model.beam_search(imgs, BOS, EOS, max_len=20, beam_size=3)
    monkeypatch.setattr(decoder, "SCRATCH_BYTES", 1)  # forces one image per chunk
    chunked = model.beam_search(imgs, BOS, EOS, max_len=20, beam_size=3)
    assert chunked.tokens == whole.tokens
    torch.testing.assert_close(chunked.scores, whole.scores)
