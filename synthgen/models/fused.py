"""Inference-only form of the conditional-BN generator: the same function, about 3x faster on the CPU.

:class:`cgan.Generator` (the cGAN's EMA generator and the cVAE's decoder) is written for training:
BatchNorm, then a per-class scale and shift, ReLU, 2x nearest upsampling and a 3x3 conv at the
upsampled size. In eval mode the same function can be computed with less work:

* **folded norm**: BN with running statistics followed by the class affine is one per-class
  ``x * scale[y] + shift[y]``, applied in place on the channels-last view (one pass, not four);
* **transposed convs**: a 3x3 conv of a 2x nearest-upsampled map is one stride-2 transposed conv
  whose 4x4 kernel sums the 3x3 taps (:func:`cgan.transposed_kernel`, what training runs too):
  16 instead of 36 multiply-adds per (input, output) channel pair per input pixel, and no
  upsampled tensor is ever built. (It replaced four 2x2 sub-pixel convs and their interleave:
  1.3-1.6x faster forward at 28x28 and 32x32 on 2 CPU cores, batch 1024; the generate bench's
  sampling row moved within noise, docs/RESULTS.md.)

Agrees with the training module to float rounding (tests/test_models.py). Build it with
:meth:`FusedGenerator.from_generator` after the weights are final; it copies what it needs.
"""

from __future__ import annotations

import torch
from torch import nn

from synthgen.models.cgan import ConditionalBatchNorm, Generator, center_crop, transposed_kernel, transposed_upsample


def fold_norm(norm: ConditionalBatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN + class affine -> per-class (scale, shift), each (n_classes, C)."""
    bn = norm.norm
    inverse_std = torch.rsqrt(bn.running_var + bn.eps)
    scale = (1.0 + norm.gain.weight) * inverse_std
    return scale, norm.bias.weight - bn.running_mean * scale


def affine_relu_(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """In place: relu(x * scale + shift) with per-sample (N, C) scale/shift, on the channels-last view."""
    view = x.permute(0, 2, 3, 1)  # (N, H, W, C): C is the contiguous axis of a channels-last tensor
    view.mul_(scale[:, None, None, :].to(view.dtype)).add_(shift[:, None, None, :].to(view.dtype)).relu_()
    return x


class FusedGenerator(nn.Module):
    """(z (N, latent_dim), labels (N,)) -> raw image (N, C, H, W), like the Generator it was built from."""

    def __init__(self, generator: Generator):
        super().__init__()
        self.image_size = tuple(generator.config.image_shape[1:])
        self.base_size = generator.base_size
        self.embed = nn.Embedding.from_pretrained(generator.embed.weight.detach().clone())
        self.stem = nn.Linear(generator.stem.in_features, generator.stem.out_features)
        self.stem.load_state_dict(generator.stem.state_dict())
        for i, (norm, conv) in enumerate(zip(generator.norms, generator.convs)):
            scale, shift = fold_norm(norm)
            self.register_buffer(f"scale{i}", scale.detach().clone())
            self.register_buffer(f"shift{i}", shift.detach().clone())
            self.register_buffer(f"weight{i}", transposed_kernel(conv.weight.detach()).contiguous(memory_format=torch.channels_last))
            self.register_buffer(f"bias{i}", conv.bias.detach().clone())
        self.n_levels = len(generator.convs)
        out_scale, out_shift = fold_norm(generator.out_norm)
        self.register_buffer("out_scale", out_scale.detach().clone())
        self.register_buffer("out_shift", out_shift.detach().clone())
        self.out_conv = nn.Conv2d(generator.out_conv.in_channels, generator.out_conv.out_channels, 3, padding=1)
        self.out_conv.load_state_dict(generator.out_conv.state_dict())
        self.out_conv.to(memory_format=torch.channels_last)
        self.eval()

    @classmethod
    @torch.no_grad()
    def from_generator(cls, generator: Generator) -> "FusedGenerator":
        if not isinstance(generator, Generator):
            raise TypeError(f"expected a cgan.Generator, got {type(generator).__name__}")
        return cls(generator).to(next(generator.parameters()).device)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.stem(torch.cat([z, self.embed(labels).to(z.dtype)], dim=1))
        h = h.view(len(z), -1, *self.base_size).contiguous(memory_format=torch.channels_last)  # (N, C0, h0, w0)
        for i in range(self.n_levels):
            h = affine_relu_(h, getattr(self, f"scale{i}")[labels], getattr(self, f"shift{i}")[labels])
            h = transposed_upsample(h, getattr(self, f"weight{i}"), getattr(self, f"bias{i}"))
        h = self.out_conv(affine_relu_(h, self.out_scale[labels], self.out_shift[labels]))
        return center_crop(h, self.image_size)
