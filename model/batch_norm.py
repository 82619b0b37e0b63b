"""Batch norm over the global batch of a distributed run, for backends PyTorch's SyncBatchNorm
does not serve (it needs CUDA; CPU workers under gloo would otherwise normalize each over its
own slice of the batch).

The statistics are sums, all-reduced by `_GlobalSum`, whose backward all-reduces the gradients
too, so every rank's input gradient includes the effect of its images on the other ranks'
normalization, as one process with the whole batch would compute it. Two passes (the mean,
then the squared deviations from it) keep the variance as accurate as the single-process
kernel's.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor


class _GlobalSum(torch.autograd.Function):
    """Sum over ranks. Its gradient is again a sum over ranks: every rank's loss depends on
    every rank's contribution to the sum."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def _global_sum(t: Tensor) -> Tensor:
    return _GlobalSum.apply(t)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` whose training-mode statistics cover every rank's images.  Same
    parameters and buffers, so its state dict is a BatchNorm2d's; in eval mode it is one."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        # x: B x C x H x W, this rank's images
        x32 = x.float()
        dims = (0, 2, 3)
        count = _global_sum(x32.new_tensor([x.numel() / x.shape[1]]))  # values per channel
        mean = _global_sum(x32.sum(dims)) / count  # C
        var = _global_sum((x32 - mean[:, None, None]).square().sum(dims)) / count  # C, biased
        y = (x32 - mean[:, None, None]) * torch.rsqrt(var + self.eps)[:, None, None]
        if self.weight is not None:
            y = y * self.weight[:, None, None]
        if self.bias is not None:
            y = y + self.bias[:, None, None]
        if self.track_running_stats:
            with torch.no_grad():  # as BatchNorm2d: the running variance is the unbiased one
                self.num_batches_tracked += 1
                momentum = self.momentum
                if momentum is None:  # cumulative average, as BatchNorm2d
                    momentum = 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * count / (count - 1).clamp(min=1), momentum)
        return y.to(x.dtype)


def to_global_batch_norm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm2d replaced by a GlobalBatchNorm2d holding its state."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm2d):
        state = module.state_dict()
        new = GlobalBatchNorm2d(module.num_features, eps=module.eps, momentum=module.momentum,
                                affine=module.affine,
                                track_running_stats=module.track_running_stats,
                                device=next((t.device for t in state.values()), None),
                                bias=not module.affine or module.bias is not None)  # fmt: skip
        new.load_state_dict(state)
        new.train(module.training)
        for p_new, p_old in zip(new.parameters(), module.parameters()):
            p_new.requires_grad_(p_old.requires_grad)
        return new
    for name, child in module.named_children():
        setattr(module, name, to_global_batch_norm(child))
    return module
