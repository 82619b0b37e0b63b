"""The LSTM decoder with additive attention and input feeding (Luong et al. 2015 style).

One step, for R rows (B images while training, B*K hypotheses in beam search, image-major):

    y     = Embedding(prev token)                              R x E
    h, c  = LSTMCell([y, o_prev], (h, c))                      R x H
    e_l   = beta . tanh(W_1 enc_l + W_2 h)      for l < L      R x L
    alpha = softmax(e);  context = alpha @ enc                 R x C
    o     = tanh(W_3 [h, context])                             R x H   (fed to the next step)
    logits = W_out o                                           R x V

Almost all the time goes into the energies e: a tanh over B x L x A numbers at every step (A =
attention width, 512; at full size that is 7.8M numbers per step for a batch of 32).  What keeps
it cheap:
  * W_1 enc (the "keys") is computed once per image, not once per step.
  * tanh(x) = 2 sigmoid(2x) - 1, and sigmoid is much cheaper than tanh in PyTorch's CPU kernels
    (docs/performance.md).
    We store keys = 2 W_1 enc and queries q = 2 W_2 h, so sigmoid(keys + q) is exactly
    (1 + tanh(W_1 enc + W_2 h)) / 2; the "-1" only shifts all energies of a row by sum(beta), which
    softmax ignores, so e' = 2 beta . sigmoid(keys + q) gives the same alpha.
  * `AttentionFn` does not keep the B x L x A activations for backward (autograd would store
    ~30 MB per step, 3 GB for a 100-token batch); it keeps alpha (B x L) and recomputes the
    sigmoid in backward, and `AttentionTape` accumulates the gradients of the keys and values
    across steps in place, so that each step's backward makes few passes over B x L x A memory.
  * The B x L x A gates are computed a few images at a time in one reused, cache-sized scratch
    buffer (`scratch_for`), so the passes over them hit cache instead of memory.
"""

from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from model.sampling import own_token_mask


class DecoderState(NamedTuple):
    h: Tensor  # R x H
    c: Tensor  # R x H
    o: Tensor  # R x H, attentional output of the last step, fed back as input to the next


SCRATCH_BYTES = 8 * 2**20  # CPU: gates are computed a few images at a time, in a cache-sized buffer
SCRATCH_BYTES_GPU = 2**30  # GPUs gain nothing from small chunks; this only caps the memory


def scratch_for(keys: Tensor, queries_per_image: int) -> Tensor:
    """A reusable n x N x L x A buffer for the gates of n images (n as large as the byte budget
    allows, at least 1).  On CPU it is small enough to stay in cache between the passes over it
    (faster than whole-batch passes: docs/performance.md); it is reused at every step, so no
    step faults in fresh pages."""
    batch, length, width = keys.shape
    budget = SCRATCH_BYTES if keys.device.type == "cpu" else SCRATCH_BYTES_GPU
    per_image = queries_per_image * length * width * keys.element_size()
    n = max(1, min(batch, budget // per_image))
    return keys.new_empty(n, queries_per_image, length, width)


def _chunks(batch: int, scratch: Tensor):
    """(image slice, its part of the scratch buffer) covering the batch."""
    n = scratch.shape[0]
    for i in range(0, batch, n):
        yield slice(i, i + n), scratch[: min(n, batch - i)]


def _gates(q: Tensor, keys: Tensor, out: Tensor) -> Tensor:
    """sigmoid(keys + q), written into out: q n x N x A, keys n x L x A -> n x N x L x A."""
    return torch.add(keys.unsqueeze(1), q.unsqueeze(2), out=out).sigmoid_()


def _attend(
    q: Tensor, keys: Tensor, values: Tensor, beta: Tensor, scratch: Tensor
) -> tuple[Tensor, Tensor]:
    """q: B x N x A, keys: B x L x A, values: B x L x C -> context B x N x C, alpha B x N x L."""
    batch, queries, length = q.shape[0], q.shape[1], keys.shape[1]
    energy = q.new_empty(batch, queries, length)
    for images, buf in _chunks(batch, scratch):
        s = _gates(q[images], keys[images], buf)  # n x N x L x A
        # beta . s as an in-place multiply and a last-dim sum: two fast passes, where the
        # equivalent matrix-vector product is slower on CPU (docs/performance.md).
        torch.sum(s.mul_(beta), dim=-1, out=energy[images])
    alpha = torch.softmax(energy.mul_(2), dim=-1)
    return torch.bmm(alpha, values), alpha


class AttentionTape:
    """What the T attention steps of one training pass share, so that backward touches each
    B x L x A number as few times as possible:

    * the scratch buffer for the gates (forward and the backward's recompute);
    * dLoss/dkeys accumulated in place over the steps, instead of autograd allocating and summing
      T full-size gradients;
    * the per-step alpha_t and dLoss/dcontext_t, from which dLoss/dvalues (a sum over steps of
      outer products) is one batched matmul at the end.

    `attach` routes keys and values through `_Gate`, an identity whose backward autograd runs only
    after every step's backward, and which hands the accumulated gradients back to autograd.
    """

    def __init__(self, keys: Tensor, values: Tensor, beta: Tensor):
        self.values, self.beta = values.detach(), beta.detach()
        self.scratch = scratch_for(keys, 1)
        self.values_t: Tensor | None = None  # B x C x L, made by the first backward step
        self.d_keys: Tensor | None = None  # sum_t dE_t * sigmoid'(x_t): B x L x A, times 2 beta
        self.alphas: list[Tensor] = []
        self.d_contexts: list[Tensor] = []

    def attach(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        return _Gate.apply(keys, values, self)


class _Gate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keys: Tensor, values: Tensor, tape: AttentionTape):
        ctx.set_materialize_grads(False)
        ctx.tape = tape
        return keys.view_as(keys), values.view_as(values)

    @staticmethod
    def backward(ctx, d_keys: Tensor | None, d_values: Tensor | None):
        tape = ctx.tape
        steps_ran = tape.d_keys is not None  # False if no step was part of this backward
        if steps_ran and ctx.needs_input_grad[0]:
            from_steps = tape.d_keys.mul_(2 * tape.beta)
            d_keys = from_steps if d_keys is None else from_steps + d_keys
        if steps_ran and ctx.needs_input_grad[1]:  # not with a frozen encoder
            alphas = torch.stack(tape.alphas, dim=2)  # B x L x T
            d_contexts = torch.stack(tape.d_contexts, dim=1)  # B x T x C
            from_steps = torch.bmm(alphas, d_contexts)  # B x L x C
            d_values = from_steps if d_values is None else from_steps + d_values
        tape.values_t = tape.d_keys = None  # free the buffers; a second backward starts over
        tape.alphas, tape.d_contexts = [], []
        return d_keys, d_values, None


class AttentionFn(torch.autograd.Function):
    """One query per image: (q B x A, keys B x L x A, values B x L x C, beta A, tape)
    -> (context B x C, alpha B x L).  Keeps alpha, recomputes the gates in backward, and leaves
    the gradients of keys and values on the tape (see `AttentionTape`)."""

    @staticmethod
    def forward(ctx, q: Tensor, keys: Tensor, values: Tensor, beta: Tensor, tape: AttentionTape):
        context, alpha = _attend(q.unsqueeze(1), keys, values, beta, tape.scratch)
        context, alpha = context.squeeze(1), alpha.squeeze(1)
        ctx.tape = tape
        ctx.save_for_backward(q, keys, beta, alpha)
        return context, alpha

    @staticmethod
    def backward(ctx, d_context: Tensor, d_alpha: Tensor):
        q, keys, beta, alpha = ctx.saved_tensors
        tape = ctx.tape
        if tape.d_keys is None:
            tape.values_t = tape.values.transpose(1, 2).contiguous()
            tape.d_keys = torch.zeros_like(keys)
        # context = alpha @ values
        tape.alphas.append(alpha)
        tape.d_contexts.append(d_context)
        d_alpha = d_alpha + torch.bmm(d_context.unsqueeze(1), tape.values_t).squeeze(1)  # B x L
        # alpha = softmax(energy)
        d_energy = alpha * (d_alpha - (alpha * d_alpha).sum(-1, keepdim=True))  # B x L
        # energy = 2 beta . s,  s = sigmoid(x),  x = keys + q
        d_energy = d_energy.unsqueeze(1)  # B x 1 x L
        d_q, d_beta = torch.empty_like(q), torch.zeros_like(beta)
        for images, buf in _chunks(q.shape[0], tape.scratch):
            g = d_energy[images]  # n x 1 x L
            s = _gates(q[images].unsqueeze(1), keys[images], buf).squeeze(1)  # n x L x A
            d_beta += torch.bmm(g, s).sum((0, 1))
            s_prime = s.addcmul_(s, s, value=-1)  # sigmoid' = s (1 - s), in place
            torch.bmm(g, s_prime, out=d_q[images].unsqueeze(1))
            tape.d_keys[images].addcmul_(g.transpose(1, 2), s_prime)
        return d_q.mul_(2 * beta), None, None, d_beta.mul_(2), None


class Attention(nn.Module):
    """Additive attention e = beta . tanh(W_1 enc + W_2 h) (see the module docstring)."""

    def __init__(self, enc_dim: int, hidden: int, attn_dim: int):
        super().__init__()
        self.W_1 = nn.Linear(enc_dim, attn_dim, bias=False)
        self.W_2 = nn.Linear(hidden, attn_dim, bias=False)
        # small, so that attention starts out nearly uniform
        self.beta = nn.Parameter(torch.empty(attn_dim).uniform_(-1e-2, 1e-2))

    def keys(self, enc: Tensor) -> Tensor:
        """enc B x L x C -> keys B x L x A: 2 W_1 enc, computed once per image."""
        return 2 * self.W_1(enc)

    def forward(
        self,
        h: Tensor,
        keys: Tensor,
        values: Tensor,
        scratch: Tensor | None = None,
        tape: AttentionTape | None = None,
    ) -> tuple[Tensor, Tensor]:
        """h: R x H with R = N * B rows (image-major) -> context R x C, alpha R x L.

        Training (gradients on) takes one query per image and a `tape` whose `attach` produced
        keys and values.  Decoding (no gradients) lets the N queries of an image share its keys
        and values (no B*K copies); pass a `scratch_for(keys, N)` buffer to reuse across steps.
        """
        rows, batch = h.shape[0], keys.shape[0]
        q = 2 * self.W_2(h)  # R x A
        if tape is not None:
            if rows != batch:
                raise ValueError("attention with gradients takes one query per image")
            return AttentionFn.apply(q, keys, values, self.beta, tape)
        if torch.is_grad_enabled():
            raise RuntimeError("gradients through attention need a tape: use Decoder.forward")
        if batch == 0:  # a rank's empty slice of a distributed batch: nothing to attend to
            return values.new_empty(0, values.shape[-1]), keys.new_empty(0, keys.shape[1])
        q = q.view(batch, rows // batch, -1)  # B x N x A
        if scratch is None:
            scratch = scratch_for(keys, q.shape[1])
        context, alpha = _attend(q, keys, values, self.beta, scratch)  # B x N x C, B x N x L
        return context.view(rows, -1), alpha.view(rows, -1)


class Decoder(nn.Module):
    def __init__(self, vocab_size: int, emb_dim: int, hidden: int, enc_dim: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, emb_dim)
        self.cell = nn.LSTMCell(emb_dim + hidden, hidden)
        self.init_h = nn.Linear(enc_dim, hidden)
        self.init_c = nn.Linear(enc_dim, hidden)
        self.init_o = nn.Linear(enc_dim, hidden)
        self.attention = Attention(enc_dim, hidden, enc_dim)
        self.W_3 = nn.Linear(hidden + enc_dim, hidden, bias=False)
        self.W_out = nn.Linear(hidden, vocab_size, bias=False)
        self.drop = nn.Dropout(dropout)

    def init_state(self, enc: Tensor) -> DecoderState:
        """h0, c0, o0 = tanh(Linear(mean of the encoder outputs)), each B x H."""
        mean = enc.mean(dim=1)  # B x C
        h, c, o = (torch.tanh(init(mean)) for init in (self.init_h, self.init_c, self.init_o))
        return DecoderState(h, c, o)

    def step(
        self,
        state: DecoderState,
        prev: Tensor,
        keys: Tensor,
        enc: Tensor,
        scratch: Tensor | None = None,
        tape: AttentionTape | None = None,
    ) -> tuple[DecoderState, Tensor]:
        """One step for R rows: prev tokens R -> new state, attention weights R x L.
        `scratch` is for decoding, `tape` for training (see `Attention.forward`)."""
        y = self.embed(prev)  # R x E
        h, c = self.cell(torch.cat([y, state.o], dim=1), (state.h, state.c))
        h, c = self.drop(h), self.drop(c)
        context, alpha = self.attention(h, keys, enc, scratch, tape)  # R x C, R x L
        o = self.drop(torch.tanh(self.W_3(torch.cat([h, context], dim=1))))  # R x H
        return DecoderState(h, c, o), alpha

    def forward(
        self,
        enc: Tensor,
        tgt_in: Tensor,
        teacher_forcing: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """enc B x L x C, tgt_in B x T (starting with <s>) -> logits B x T x V.

        The output projection runs once on all T steps stacked; under scheduled sampling the
        previous step's argmax is also taken (without gradient) from W_out o_{t-1}.
        """
        batch, steps = tgt_in.shape
        state = self.init_state(enc)
        keys = self.attention.keys(enc)  # B x L x A
        tape, values = None, enc
        if torch.is_grad_enabled():
            tape = AttentionTape(keys, enc, self.attention.beta)
            keys, values = tape.attach(keys, enc)
        own = own_token_mask(batch, steps, teacher_forcing, generator, enc.device)  # B x T | None
        outputs = []
        for t in range(steps):
            prev = tgt_in[:, t]
            if own is not None and t > 0:
                with torch.no_grad():
                    guess = self.W_out(state.o).argmax(-1)  # B
                prev = torch.where(own[:, t], guess, prev)
            state, _ = self.step(state, prev, keys, values, tape=tape)
            outputs.append(state.o)
        return self.W_out(torch.stack(outputs, dim=1))  # B x T x V

    def extend_vocab(self, new_size: int) -> None:
        """Grow the embedding and output rows to new_size; existing rows are kept."""
        old = self.embed.num_embeddings
        if new_size < old:
            raise ValueError(f"cannot shrink the vocabulary from {old} to {new_size}")
        weight = self.embed.weight
        embed = nn.Embedding(new_size, weight.shape[1], device=weight.device, dtype=weight.dtype)
        out = nn.Linear(
            self.W_out.in_features, new_size, bias=False, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            embed.weight[:old] = self.embed.weight
            out.weight[:old] = self.W_out.weight
        self.embed, self.W_out = embed, out
