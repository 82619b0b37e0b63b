"""STAND-IN for luopeixiang/im2latex, the reference we measure our speed against.

This is NOT their code.  It is our own re-implementation, written from a description of their
algorithm, that keeps the costs of their implementation so the comparison runs anywhere without a
checkout.  Same layer shapes and parameter names as their `model/model.py` `Im2LatexModel`, same
constructor and methods (`encode`, `init_decoder`, `step_decoding`, `forward(imgs, formulas,
epsilon)` returning per-step softmax probabilities), so the decoding loops below also drive the
real module when `--baseline_repo` points at a checkout.  Costs deliberately kept:

  * 3-channel float images in;
  * the attention's projection W_1 enc recomputed at every decoder step, and a plain
    tanh(W_1 enc + W_2 h) whose B x L x 512 activations autograd stores for every step;
  * softmax probabilities out, so the loss is log(softmax(x)) (`baseline_loss`);
  * in training, one scheduled-sampling coin per step for the whole batch, read with `.item()`;
  * decoding runs the encoder with autograd on; greedy decoding always runs max_len steps;
    beam search goes image by image, with Python loops over hypotheses, re-gathers the encoder
    output with index_select at every step and takes top-k over the flattened beam.

One deliberate difference: their training forward feeds the initial o_0 at every step (it stores
the new o_t under another name); the stand-in feeds o_t back, which costs the same and computes
the same function as our model, so the two can be checked against each other.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model.position import add_position_features


class BaselineIm2Latex(nn.Module):
    def __init__(
        self,
        out_size: int,
        emb_size: int,
        dec_rnn_h: int,
        enc_out_dim: int = 512,
        n_layer: int = 1,
        add_pos_feat: bool = False,
        dropout: float = 0.0,
        cnn_widths: tuple[int, ...] = (64, 128, 256, 256),  # not theirs: lets tests stay small
    ):
        super().__init__()
        w = (3, *cnn_widths, enc_out_dim)
        conv = list(zip(w[:-1], w[1:]))
        self.cnn_encoder = nn.Sequential(
            nn.Conv2d(*conv[0], 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2, 2, 1),
            nn.Conv2d(*conv[1], 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2, 2, 1),
            nn.Conv2d(*conv[2], 3, 1, 1), nn.ReLU(),
            nn.Conv2d(*conv[3], 3, 1, 1), nn.ReLU(), nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(*conv[4], 3, 1, 0), nn.ReLU(),
        )  # fmt: skip
        self.rnn_decoder = nn.LSTMCell(dec_rnn_h + emb_size, dec_rnn_h)
        self.embedding = nn.Embedding(out_size, emb_size)
        self.init_wh = nn.Linear(enc_out_dim, dec_rnn_h)
        self.init_wc = nn.Linear(enc_out_dim, dec_rnn_h)
        self.init_wo = nn.Linear(enc_out_dim, dec_rnn_h)
        self.beta = nn.Parameter(torch.empty(enc_out_dim).uniform_(-1e-2, 1e-2))
        self.W_1 = nn.Linear(enc_out_dim, enc_out_dim, bias=False)
        self.W_2 = nn.Linear(dec_rnn_h, enc_out_dim, bias=False)
        self.W_3 = nn.Linear(dec_rnn_h + enc_out_dim, dec_rnn_h, bias=False)
        self.W_out = nn.Linear(dec_rnn_h, out_size, bias=False)
        self.add_pos_feat = add_pos_feat
        self.dropout = nn.Dropout(dropout)

    def forward(self, imgs: Tensor, formulas: Tensor, epsilon: float = 1.0) -> Tensor:
        """imgs B x 3 x H x W float, formulas B x T -> softmax probabilities B x T x V."""
        enc = self.encode(imgs)
        states, o = self.init_decoder(enc)
        probs = []
        for t in range(formulas.shape[1]):
            tgt = formulas[:, t : t + 1]
            if probs and torch.rand(()).item() > epsilon:  # one coin per step, host round trip
                tgt = torch.log(probs[-1]).argmax(dim=1, keepdim=True)
            states, o, p = self.step_decoding(states, o, enc, tgt)
            probs.append(p)
        return torch.stack(probs, dim=1)

    def encode(self, imgs: Tensor) -> Tensor:
        feats = self.cnn_encoder(imgs).permute(0, 2, 3, 1)  # B x H' x W' x C
        if self.add_pos_feat:
            feats = add_position_features(feats)
        return feats.reshape(feats.shape[0], -1, feats.shape[-1])  # B x L x C

    def init_decoder(self, enc: Tensor) -> tuple[tuple[Tensor, Tensor], Tensor]:
        mean = enc.mean(dim=1)
        h, c, o = (torch.tanh(w(mean)) for w in (self.init_wh, self.init_wc, self.init_wo))
        return (h, c), o

    def step_decoding(self, states, o, enc: Tensor, tgt: Tensor):
        y = self.embedding(tgt).squeeze(1)  # B x E
        h, c = self.rnn_decoder(torch.cat([y, o], dim=1), states)
        h, c = self.dropout(h), self.dropout(c)
        energy = torch.tanh(self.W_1(enc) + self.W_2(h).unsqueeze(1))  # W_1 enc, every step
        alpha = F.softmax((self.beta * energy).sum(-1), dim=-1)  # B x L
        context = torch.bmm(alpha.unsqueeze(1), enc).squeeze(1)  # B x C
        o = self.dropout(torch.tanh(self.W_3(torch.cat([h, context], dim=1))))
        return (h, c), o, F.softmax(self.W_out(o), dim=1)


def baseline_loss(probs: Tensor, target: Tensor, pad: int) -> Tensor:
    """Their loss: log of softmax probabilities, then NLL."""
    return F.nll_loss(torch.log(probs).flatten(0, 1), target.flatten(), ignore_index=pad)


def to_rgb(imgs: Tensor) -> Tensor:
    """Our B x 1 x H x W uint8 images as their B x 3 x H x W floats in [0, 1]."""
    return (imgs.float() / 255.0).expand(-1, 3, -1, -1).contiguous()


_RENAMES = {"decoder.cell.": "rnn_decoder.", "decoder.embed.": "embedding.",
            "decoder.init_h.": "init_wh.", "decoder.init_c.": "init_wc.",
            "decoder.init_o.": "init_wo.", "decoder.attention.": "", "decoder.": "",
            "encoder.net.": "cnn_encoder."}  # fmt: skip


def baseline_name(name: str) -> str:
    """The name of our parameter `name` in their model ("decoder.attention.W_1.weight" ->
    "W_1.weight")."""
    prefix = next(p for p in _RENAMES if name.startswith(p))
    return _RENAMES[prefix] + name[len(prefix) :]


def copy_weights(ours: nn.Module, theirs: nn.Module) -> None:
    """Load an `Im2Latex`'s weights into a baseline (stand-in or original): same function.

    Their first convolution sees three copies of the gray channel, so it gets our weights / 3.
    """
    state = {baseline_name(name): value for name, value in ours.state_dict().items()}
    state["cnn_encoder.0.weight"] = state["cnn_encoder.0.weight"].repeat(1, 3, 1, 1) / 3
    theirs.load_state_dict(state)


@torch.no_grad()
def _steps(model: nn.Module, states, o, enc: Tensor, tgt: Tensor):
    return model.step_decoding(states, o, enc, tgt)


def baseline_greedy(model: nn.Module, imgs: Tensor, bos: int, max_len: int) -> Tensor:
    """Batched greedy decoding as they do it: encoder with autograd on, always max_len steps.
    Returns B x max_len token ids."""
    enc = model.encode(imgs)
    states, o = model.init_decoder(enc)
    tgt = torch.full((imgs.shape[0], 1), bos, dtype=torch.long)
    out = torch.zeros(imgs.shape[0], max_len, dtype=torch.long)
    for t in range(max_len):
        states, o, p = _steps(model, states, o, enc, tgt)
        tgt = p.argmax(dim=1, keepdim=True)
        out[:, t : t + 1] = tgt
    return out


def baseline_beam_search(
    model: nn.Module, imgs: Tensor, bos: int, eos: int, max_len: int, beam_size: int
) -> list[list[int]]:
    """Beam search one image at a time, as they do it (no length normalisation)."""
    return [_beam_one(model, img.unsqueeze(0), bos, eos, max_len, beam_size) for img in imgs]


def _beam_one(model, img: Tensor, bos: int, eos: int, max_len: int, beam_size: int) -> list[int]:
    enc = model.encode(img)  # 1 x L x C, autograd on
    states, o = model.init_decoder(enc.expand(beam_size, -1, -1))
    k = beam_size
    ids = torch.full((k,), bos, dtype=torch.long)
    scores = torch.tensor([0.0] + [-1e10] * (k - 1))
    seqs = [[] for _ in range(k)]
    done, done_scores = [], []
    for t in range(max_len):
        enc_k = enc.index_select(0, torch.zeros(k, dtype=torch.long))  # re-gathered every step
        states, o, p = _steps(model, states, o, enc_k, ids.unsqueeze(1))
        logp = torch.log(p) + scores.unsqueeze(1)  # k x V
        scores, flat = logp.view(-1).topk(k)
        parents, ids = flat // p.shape[1], flat % p.shape[1]
        keep = []
        for i in range(k):  # Python loop over hypotheses
            seq = seqs[parents[i].item()] + [ids[i].item()]
            if ids[i].item() == eos or t == max_len - 1:
                done.append(seq)
                done_scores.append(scores[i].item())
            else:
                keep.append((i, seq))
        k = len(keep)
        if k == 0:
            break
        rows = torch.tensor([i for i, _ in keep])
        seqs = [seq for _, seq in keep]
        ids, scores = ids[rows], scores[rows]
        chosen = parents[rows]
        states, o = (states[0][chosen], states[1][chosen]), o[chosen]
    best = done[max(range(len(done)), key=done_scores.__getitem__)]
    return best[:-1] if best and best[-1] == eos else best
