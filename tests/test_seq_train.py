"""Sequence-level fine-tuning (training/sequence.py, --seq_train scst): the sampler next to
greedy decoding, the rewards, the sign of the SCST gradient, exact resume of a run, and bad
options refused."""

import csv
import math

import pytest
import torch
from nltk.translate.bleu_score import corpus_bleu

from data.metrics import edit_similarity, sentence_bleu
from model import Im2Latex, ModelConfig
from model.checkpoint import load_checkpoint
from model.search import greedy_search, sample_search
from tests.conftest import TINY_MODEL, run_script
from tests.test_schedule import test_bad_values_exit_non_zero_with_a_clear_message as refused
from tests.test_train import same_weights
from training import RunError
from training.config import TrainConfig
from training.distributed import Dist
from training.loop import train_step
from training.sequence import Scst, references, sample_rows, sequence_logprob

PAD, BOS, EOS = 0, 1, 2
TINY = dict(vocab_size=12, emb_dim=16, dec_rnn_h=32, enc_out_dim=32, cnn_widths=(8, 8, 16, 16))


def tiny_model(seed: int = 0, **kw) -> Im2Latex:
    torch.manual_seed(seed)
    return Im2Latex(ModelConfig(**{**TINY, **kw}))


def images(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 32, 48), generator=g, dtype=torch.uint8)


def encode(model: Im2Latex, imgs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(imgs)


def draw(model: Im2Latex, enc: torch.Tensor, seed: int, max_len: int = 8, k: int = 3):
    with torch.no_grad():
        return sample_search(model.decoder, enc, BOS, EOS, max_len, k,
                             torch.Generator().manual_seed(seed))


def teacher_forced_logprob(model: Im2Latex, imgs: torch.Tensor, samples: list[list[int]],
                           cap: int, k: int) -> torch.Tensor:
    """Each sample's log-probability from one teacher-forced pass (as SCST scores them)."""
    tgt_in, tgt_out, mask = sample_rows(samples, cap, BOS, EOS, PAD)
    rows = torch.arange(len(imgs)).repeat_interleave(k)
    with torch.no_grad():
        return sequence_logprob(model(imgs, tgt_in, image_of_row=rows), tgt_out, mask)


def test_samples_are_valid_reproducible_and_scored_exactly_by_teacher_forcing():
    model, imgs = tiny_model().eval(), images(4)
    enc, cap, k = encode(model, imgs), 8, 3
    out = draw(model, enc, seed=5, max_len=cap, k=k)
    assert len(out.tokens) == 4 * k
    assert all(EOS not in s and len(s) <= cap for s in out.tokens)
    ended = [len(s) < cap for s in out.tokens]  # a random model: some end, some are cut
    assert any(ended) and not all(ended)
    assert draw(model, enc, seed=5, max_len=cap, k=k).tokens == out.tokens
    assert draw(model, enc, seed=6, max_len=cap, k=k).tokens != out.tokens
    # sampling's own log-probability = the teacher-forced pass's, </s> counted where drawn
    lengths = torch.tensor([len(s) + e for s, e in zip(out.tokens, ended)])
    torch.testing.assert_close(teacher_forced_logprob(model, imgs, out.tokens, cap, k),
                               out.scores * lengths)


def test_a_peaked_softmax_samples_the_greedy_sequence_which_is_teacher_forced_argmax():
    model, imgs = tiny_model(seed=2).eval(), images(3, seed=3)
    with torch.no_grad():
        model.decoder.W_out.weight.mul_(1e4)  # every softmax one-hot: sampling = argmax
    enc = encode(model, imgs)
    with torch.no_grad():
        greedy = greedy_search(model.decoder, enc, BOS, EOS, 10)
    assert draw(model, enc, seed=0, max_len=10, k=2).tokens == [
        g for g in greedy.tokens for _ in range(2)]
    with torch.no_grad():  # greedy picks the argmax of its own teacher-forced prefix
        tgt_in, tgt_out, mask = sample_rows(greedy.tokens, 10, BOS, EOS, PAD)
        logits = model(imgs, tgt_in)
    assert torch.equal(logits.argmax(-1)[mask], tgt_out[mask])


def test_image_of_row_equals_repeating_the_images():
    model, imgs = tiny_model().eval(), images(2)
    tgt_in = torch.randint(3, 12, (5, 6), generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([0, 1, 1, 0, 1])
    with torch.no_grad():
        torch.testing.assert_close(model(imgs, tgt_in, image_of_row=rows),
                                   model(imgs[rows], tgt_in))


def test_rewards_on_hand_made_cases():
    ref = [5, 6, 7, 8, 9, 10, 11, 5]
    assert sentence_bleu(ref, ref) == 1.0 and sentence_bleu([5, 6], [5, 6]) == 1.0
    assert sentence_bleu(ref, [3, 3, 3]) == 0.0 and sentence_bleu(ref, []) == 0.0
    near = ref[:-1] + [4]  # every order has matches: plain BLEU-4, as the corpus figure
    assert sentence_bleu(ref, near) == pytest.approx(corpus_bleu([[ref]], [near]))
    assert 0 < sentence_bleu(ref, [5, 6, 9, 8]) < sentence_bleu(ref, near) < 1
    assert edit_similarity([1, 2, 3], [1, 3]) == pytest.approx(2 / 3)
    assert edit_similarity([], []) == 1.0 and edit_similarity([4], []) == 0.0
    scst = Scst(samples=2, reward=edit_similarity, mix=0.0, max_len=20)
    refs = references(torch.tensor([[4, 5, EOS, PAD], [6, 7, 8, EOS]]), PAD, EOS)
    assert refs == [[4, 5], [6, 7, 8]]
    adv, sums = scst.advantages(refs, [[4, 5], [4], [6, 7, 8], [9]], [[4], [6, 7, 8]])
    torch.testing.assert_close(adv, torch.tensor([0.5, 0.0, 0.0, -1.0]))
    assert sums == [2.5, 4.0, 1.5, 2.0]


def test_sample_rows_score_eos_where_drawn_and_tell_padding_by_length():
    tgt_in, tgt_out, mask = sample_rows([[PAD, 4], [5, 6, 7]], 3, BOS, EOS, PAD)
    assert tgt_in.tolist() == [[BOS, PAD, 4], [BOS, 5, 6]]
    assert tgt_out.tolist() == [[PAD, 4, EOS], [5, 6, 7]]  # the second was cut at 3: no </s>
    assert mask.all()


def scst_step(sample: list[int], greedy: list[int],
              monkeypatch) -> tuple[float, float, dict[str, float]]:
    """One SGD step of SCST alone (mix 0) on a tiny model whose sampler is made to return
    `sample` and `greedy` for the one image (reference [4, 5, 6]): the sample's log-probability
    before and after."""
    model, imgs = tiny_model(seed=1, batch_norm=False).train(), images(1)
    monkeypatch.setattr(Scst, "decode", lambda *a: ([sample], [greedy]))
    batch = {"imgs": imgs, "tgt_in": torch.tensor([[BOS, 4, 5, 6]]),
             "tgt_out": torch.tensor([[4, 5, 6, EOS]])}

    def logprob() -> float:
        return teacher_forced_logprob(model, imgs, [sample], 10, 1).item()

    before = logprob()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scst = Scst(samples=1, reward=edit_similarity, mix=0.0, max_len=10)
    _, figures = train_step(model, batch, 1.0, Dist("cpu"), PAD, 1, False, seq=scst)
    opt.step()
    return before, logprob(), figures


def test_an_scst_step_raises_a_better_sample_and_lowers_a_worse_one(monkeypatch):
    before, after, figures = scst_step([4, 5, 6], [4, 9], monkeypatch)
    assert after > before and figures == {"reward": 1.0, "greedy_reward": pytest.approx(1 / 3)}
    before, after, figures = scst_step([7, 7, 7, 7], [4, 5, 6], monkeypatch)
    assert after < before and figures == {"reward": 0.0, "greedy_reward": 1.0}
    before, after, _ = scst_step([4, 9], [4, 9], monkeypatch)  # no advantage: no change
    assert after == before


@pytest.mark.parametrize("flags,words", [
    (["--seq_samples", "0"], "samples >= 1"),
    (["--seq_samples", "x"], "samples >= 1"),
    (["--seq_mix", "1.5"], "[0, 1]"),
    (["--seq_mix", "-0.1"], "[0, 1]"),
    (["--seq_reward", "rouge"], "invalid choice"),
    (["--seq_train", "mrt"], "invalid choice"),
])
def test_bad_values_exit_non_zero_with_a_clear_message(flags, words, capsys):
    refused(flags, words, capsys)  # parse_args exits 2 naming the flag and what it expects


def test_scst_refuses_scheduled_sampling_and_is_off_by_default():
    base = dict(data_path=".", save_dir=".")
    assert Scst.from_config(TrainConfig(**base)) is None
    with pytest.raises(RunError, match="--sample_method exp"):
        Scst.from_config(TrainConfig(**base, seq_train="scst", sample_method="exp"))


COMMON = [*TINY_MODEL, "--batch_size", "8", "--workers", "0", "--quiet", "--threads", "1",
          "--dropout", "0.2", "--epoches", "2"]
SCST = ["--seq_train", "scst", "--seq_samples", "2", "--lr", "1e-3"]  # resume reads them back


def log_figures(run) -> list[dict]:
    rows = csv.DictReader(open(run / "log.csv"))
    return [{k: v for k, v in r.items() if k not in ("minutes", "data_wait")} for r in rows]


def test_an_scst_run_stopped_mid_epoch_resumes_to_the_same_weights(tiny_dataset, tmp_path):
    ref, stopped = tmp_path / "ref", tmp_path / "stopped"
    p = run_script("train.py", "--data_path", tiny_dataset, "--save_dir", ref, *COMMON, *SCST,
                   "--print_freq", "4")
    assert "trains with dropout off" in p.stdout and " reward " in p.stdout
    assert " greedy_reward " in p.stdout
    run_script("train.py", "--data_path", tiny_dataset, "--save_dir", stopped, *COMMON, *SCST,
               "--max_steps", "3", "--save_every", "2")
    assert load_checkpoint(stopped / "last.pt")["step"] == 3
    run_script("train.py", "--data_path", tiny_dataset, "--save_dir", stopped, *COMMON,
               "--from_check_point")
    assert same_weights(ref / "last.pt", stopped / "last.pt")
    assert log_figures(ref) == log_figures(stopped)
    rows = log_figures(ref)
    assert load_checkpoint(ref / "last.pt")["args"]["seq_train"] == "scst"
    for row in rows:
        assert 0 <= float(row["reward"]) <= 1 and 0 <= float(row["greedy_reward"]) <= 1
        assert math.isfinite(float(row["val_loss"]))
    p = run_script("train.py", "--data_path", tiny_dataset, "--save_dir", tmp_path / "bad",
                   *COMMON, *SCST, "--sample_method", "exp", "--decay_k", "0.9", check=False)
    assert p.returncode == 1 and "does not combine" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "bad" / "last.pt").exists()
