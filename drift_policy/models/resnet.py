"""Image observation encoder: a ResNet-18 trunk with GroupNorm and spatial-softmax pooling, trained from scratch.

The visual Diffusion Policy recipe (Chi et al. 2023, building on robomimic): per camera a ResNet-18 whose
BatchNorm layers are replaced by GroupNorm (BatchNorm's running statistics interact badly with the EMA of the
weights and with small batches), whose global average pooling is replaced by a spatial softmax (keypoint
coordinates keep *where* things are, which a pushing policy needs), followed by a linear layer to a small
feature vector. Training uses a random crop per frame (96 -> 84 for Push-T, 84 -> 76 for robomimic), evaluation
the centre crop.

Input images are uint8 (or float in 0..255), [B, 3, H, W]; they are cropped while still uint8 (cheap) and then
scaled to [-1, 1] (Diffusion Policy's image range normaliser maps [0, 1] to [-1, 1] as well).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RESNET_PRESETS", "VISION_BACKBONES", "SpatialSoftmax", "BasicBlock", "ResNet18GN", "ShallowConvGN",
           "ImageEncoder", "MultiImageEncoder"]

# Trunk widths and BasicBlocks per stage. "resnet18" is the standard ResNet-18 (11.18M trunk parameters);
# "resnet18_half" the same layout at half the width (about a quarter of the convolution FLOPs); "tiny" is for CPU
# tests and quick runs.
RESNET_PRESETS = {
    "resnet18": dict(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)),
    "resnet18_half": dict(widths=(32, 64, 128, 256), blocks=(2, 2, 2, 2)),
    "tiny": dict(widths=(16, 32, 64, 128), blocks=(1, 1, 1, 1)),
}
# Every trunk that ``policy.vision_backbone`` names: the ResNet presets and "shallow" (ShallowConvGN).
VISION_BACKBONES = (*RESNET_PRESETS, "shallow")


def _gn(channels: int) -> nn.GroupNorm:
    """GroupNorm with 16 channels per group (Diffusion Policy's choice), at least one group."""
    return nn.GroupNorm(max(1, channels // 16), channels)


class SpatialSoftmax(nn.Module):
    """Feature map [B, C, H, W] -> keypoints [B, num_kp * 2]: the expected (x, y) of each softmax-normalised map.

    A 1x1 convolution makes ``num_kp`` maps (``num_kp=None``: use the C input maps directly), each map is
    softmax-normalised over its H*W locations, and the expected pixel coordinate under that distribution is
    returned, with x (columns) and y (rows) in [-1, 1] (-1 = centre of the first pixel, +1 = of the last).
    Output layout: (x_0, y_0, x_1, y_1, ...).

    The temperature is fixed (default 1): the 1x1 convolution in front already scales the logits freely, so a
    learnable temperature would only duplicate that scale (a redundant, non-identifiable parameter). It is kept
    as a constructor argument for feature maps used without the projection (``num_kp=None``).
    """

    def __init__(self, in_channels: int, height: int, width: int, num_kp: int | None = 32, temperature: float = 1.0):
        super().__init__()
        if height < 1 or width < 1:
            raise ValueError(f"feature map must be at least 1x1, got {height}x{width}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.in_channels, self.height, self.width = in_channels, height, width
        self.proj = nn.Conv2d(in_channels, num_kp, kernel_size=1) if num_kp is not None else nn.Identity()
        self.num_kp = num_kp if num_kp is not None else in_channels
        self.temperature = float(temperature)
        ys, xs = torch.meshgrid(torch.linspace(-1.0, 1.0, height), torch.linspace(-1.0, 1.0, width), indexing="ij")
        self.register_buffer("pos", torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1), persistent=False)  # [HW, 2]

    @property
    def out_dim(self) -> int:
        return self.num_kp * 2

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1:] != (self.in_channels, self.height, self.width):
            raise ValueError(f"SpatialSoftmax expects [B, {self.in_channels}, {self.height}, {self.width}], "
                             f"got {list(x.shape)}")
        logits = self.proj(x).flatten(2).float() / self.temperature  # [B, K, HW]
        attn = logits.softmax(dim=-1)                                 # [B, K, HW]
        kp = attn @ self.pos                                          # [B, K, 2]
        return kp.flatten(1)                                          # [B, K*2]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _gn(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _gn(c_out)
        self.skip = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _gn(c_out))
                     if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.norm1(self.conv1(x)))   # [B, C_out, H/s, W/s]
        h = self.norm2(self.conv2(h))
        return F.relu(h + self.skip(x))


class _Trunk(nn.Module):
    """What the encoder reads of a trunk: its channel widths (the last is ``out_channels``), and the init both
    trunks share (Kaiming for every convolution, as torchvision's ResNet)."""

    widths: tuple[int, ...]

    @property
    def out_channels(self) -> int:
        return self.widths[-1]

    def _init_convs(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class ResNet18GN(_Trunk):
    """ResNet trunk without pooling head: [B, in_channels, H, W] -> [B, widths[-1], ~H/32, ~W/32].

    Stem: 7x7 convolution stride 2, GroupNorm, ReLU, 3x3 max-pool stride 2; then one stage per width of
    ``blocks[i]`` BasicBlocks, the first block of every stage after the first with stride 2. Randomly initialised
    (He init for convolutions, GroupNorm scale 1 / shift 0); no pretrained weights.
    """

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512), blocks: Sequence[int] = (2, 2, 2, 2),
                 in_channels: int = 3):
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"widths {widths} and blocks {blocks} must be non-empty and of equal length")
        self.widths, self.blocks = tuple(widths), tuple(blocks)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False), _gn(widths[0]),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        stages, c_in = [], widths[0]
        for i, (c, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*[BasicBlock(c_in if j == 0 else c, c, stride if j == 0 else 1)
                                          for j in range(n)]))
            c_in = c
        self.stages = nn.Sequential(*stages)
        self._init_convs()

    def output_hw(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the output map for an input of ``height`` x ``width``."""
        def down(n: int, k: int, s: int, p: int) -> int:
            return (n + 2 * p - k) // s + 1

        h, w = down(down(height, 7, 2, 3), 3, 2, 1), down(down(width, 7, 2, 3), 3, 2, 1)
        for _ in self.widths[1:]:
            h, w = down(h, 3, 2, 1), down(w, 3, 2, 1)
        return h, w

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))  # [B, widths[-1], h, w]


class ShallowConvGN(_Trunk):
    """robomimic's ShallowConv trunk with GroupNorm: [B, C, H, W] -> [B, 32, ~H/8, ~W/8].

    7x7 convolution stride 2 to 64 channels, 1x1 to 32, then two 3x3 convolutions stride 2, each followed by
    GroupNorm and ReLU (the norm as in ``ResNet18GN``, so both trunks train alike under the EMA and small
    batches). About a fifth of ResNet-18's convolution FLOPs at 84x84, and a larger map (11x11) for the spatial
    softmax. A cheaper encoder for CPU budgets, selected with ``policy.vision_backbone=shallow``.
    """

    widths = (64, 32, 32, 32)

    def __init__(self, in_channels: int = 3):
        super().__init__()
        w = self.widths
        layers, c_in = [], in_channels
        for c, k, stride in zip(w, (7, 1, 3, 3), (2, 1, 2, 2)):
            layers += [nn.Conv2d(c_in, c, k, stride, k // 2, bias=False), _gn(c), nn.ReLU(inplace=True)]
            c_in = c
        self.net = nn.Sequential(*layers)
        self._init_convs()

    def output_hw(self, height: int, width: int) -> tuple[int, int]:
        def down(n: int) -> int:                  # 7x7/s2/p3 and 3x3/s2/p1 both map n to ceil(n / 2)
            return (n + 1) // 2

        return down(down(down(height))), down(down(down(width)))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)                        # [B, 32, h, w]


def make_trunk(preset: str, in_channels: int) -> nn.Module:
    """The trunk named by ``policy.vision_backbone`` (one of VISION_BACKBONES)."""
    if preset == "shallow":
        return ShallowConvGN(in_channels)
    if preset not in RESNET_PRESETS:
        raise ValueError(f"unknown vision backbone {preset!r}; choose from {sorted(VISION_BACKBONES)}")
    return ResNet18GN(in_channels=in_channels, **RESNET_PRESETS[preset])


def _pair(v) -> tuple[int, int]:
    t = tuple(int(a) for a in v)
    if len(t) != 2 or min(t) < 1:
        raise ValueError(f"expected two positive sizes (height, width), got {v}")
    return t


class ImageEncoder(nn.Module):
    """Images [B, C, H, W] (uint8, or float in 0..255) -> features [B, feature_dim] (float32).

    Crop (``train()``: an independent random crop per sample; ``eval()``: the centre crop; ``crop_shape=None``:
    no crop), scale to [-1, 1] (``scale``), trunk (``preset``, one of ``VISION_BACKBONES``), ``SpatialSoftmax``
    with ``num_kp`` keypoints, Linear to ``feature_dim`` (``features``). ``forward(images, generator=g)`` draws
    the train-mode crop offsets from ``g`` (a CPU ``torch.Generator``) for reproducible crops.

    ``autocast`` (None, or torch.bfloat16: ``train.encoder_bf16``) runs the trunk under autocast in that dtype;
    weights, keypoints and features stay float32. ``set_channels_last`` puts the trunk in channels-last (NHWC)
    layout, the same function; eval/profile_image_step.py measures both levers (``MultiImageEncoder.set_autocast``
    sets both).
    """

    def __init__(self, image_shape: Sequence[int] = (3, 96, 96), crop_shape: Sequence[int] | None = (84, 84),
                 preset: str = "resnet18", num_kp: int = 32, feature_dim: int = 64):
        super().__init__()
        if preset not in VISION_BACKBONES:
            raise ValueError(f"unknown vision backbone {preset!r}; choose from {sorted(VISION_BACKBONES)}")
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (channels, height, width), got {image_shape}")
        self.image_shape = tuple(int(a) for a in image_shape)
        c, h, w = self.image_shape
        self.crop_shape = _pair(crop_shape) if crop_shape is not None else None
        if self.crop_shape is not None and (self.crop_shape[0] > h or self.crop_shape[1] > w):
            raise ValueError(f"crop_shape {self.crop_shape} is larger than the image {h}x{w}")
        self.preset, self.feature_dim = preset, int(feature_dim)
        self.trunk = make_trunk(preset, c)
        ch, cw = self.crop_shape if self.crop_shape is not None else (h, w)
        fh, fw = self.trunk.output_hw(ch, cw)
        self.pool = SpatialSoftmax(self.trunk.out_channels, fh, fw, num_kp=num_kp)
        self.head = nn.Linear(self.pool.out_dim, self.feature_dim)
        self.autocast: torch.dtype | None = None
        self.channels_last = False

    def set_channels_last(self, on: bool = True) -> "ImageEncoder":
        """The trunk's weights and inputs in channels-last (``on``) or contiguous layout; the same function."""
        self.channels_last = bool(on)
        self.trunk.to(memory_format=torch.channels_last if on else torch.contiguous_format)
        return self

    @property
    def out_dim(self) -> int:
        return self.feature_dim

    def crop(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[B, C, H, W] -> [B, C, h, w], same dtype: random offsets per sample in train mode, centred in eval."""
        return self._crop(images, generator)[0]

    def _crop(self, images: Tensor, generator: torch.Generator | None = None):
        """``crop``, and the crops' offsets in the stored frame: (images [B, C, h, w], top, left), the offsets [B]
        tensors for random crops and ints where every sample has the same."""
        b, _, h, w = images.shape
        if self.crop_shape is None:
            return images, 0, 0
        ch, cw = self.crop_shape
        if not self.training:
            top, left = (h - ch) // 2, (w - cw) // 2
            return images[:, :, top:top + ch, left:left + cw], top, left
        top = torch.randint(0, h - ch + 1, (b,), generator=generator).to(images.device)   # [B]
        left = torch.randint(0, w - cw + 1, (b,), generator=generator).to(images.device)  # [B]
        rows = top[:, None] + torch.arange(ch, device=images.device)                       # [B, h]
        cols = left[:, None] + torch.arange(cw, device=images.device)                      # [B, w]
        # One gather for the whole batch on the flattened pixels (3 ms for 128x3x96x96 uint8 on one CPU
        # thread; advanced indexing with four broadcast index tensors is ~7x slower).
        flat = (rows[:, :, None] * w + cols[:, None, :]).reshape(b, 1, ch * cw)            # [B, 1, h*w]
        out = images.reshape(b, images.shape[1], h * w).gather(2, flat.expand(-1, images.shape[1], -1))
        return out.reshape(b, images.shape[1], ch, cw), top, left                          # [B, C, h, w]

    def forward(self, images: Tensor, generator: torch.Generator | None = None, origin: Tensor | None = None) -> Tensor:
        """Images [B, C, H, W] -> features [B, feature_dim]. ``origin`` [B, 2] (x, y in the stored frame's pixel
        indices, pixel i's centre at i; None: none): the keypoints are measured from it (``from_origin``)."""
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"ImageEncoder expects images [B, {', '.join(map(str, self.image_shape))}], "
                             f"got {list(images.shape)}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise ValueError(f"images must be uint8 or float in 0..255, got dtype {images.dtype}")
        x, top, left = self._crop(images, generator)
        kp = self.keypoints(self.scale(x))                               # [B, 2 * num_kp]
        if origin is not None:
            kp = self.from_origin(kp, top, left, origin)
        return self.head(kp)                                             # [B, feature_dim]

    def from_origin(self, kp: Tensor, top: Tensor | int, left: Tensor | int, origin: Tensor) -> Tensor:
        """Keypoints [B, 2K] in the crop's [-1, 1] -> the same points minus ``origin`` [B, 2], in the stored frame's
        pixels over half its size (about [-2, 2]): where each is from the origin, whatever the crop's offset
        (``top``, ``left``: [B] or one int for all)."""
        _, h, w = self.image_shape
        ch, cw = self.crop_shape if self.crop_shape is not None else (h, w)
        xy = kp.view(kp.shape[0], -1, 2)                                               # [B, K, 2] (x, y)
        size = xy.new_tensor([cw - 1, ch - 1])
        offset = torch.stack([torch.as_tensor(left), torch.as_tensor(top)], dim=-1).to(xy)   # [2] or [B, 2] (x, y)
        if offset.dim() == 2:
            offset = offset.unsqueeze(1)                                               # [B, 1, 2]
        pixels = (xy + 1) / 2 * size + offset                                          # stored-frame pixel indices
        return ((pixels - origin.to(xy.dtype).unsqueeze(1)) / xy.new_tensor([w / 2, h / 2])).flatten(1)

    @staticmethod
    def scale(images: Tensor) -> Tensor:
        """uint8 (or float 0..255) images -> float32 in [-1, 1], same shape."""
        return images.float().mul_(2.0 / 255.0).sub_(1.0) if images.dtype == torch.uint8 else \
            images.float() * (2.0 / 255.0) - 1.0

    def features(self, x: Tensor) -> Tensor:
        """Cropped, scaled images [B, C, h, w] -> features [B, feature_dim] float32: trunk, keypoints, head."""
        return self.head(self.keypoints(x))                              # [B, feature_dim]

    def keypoints(self, x: Tensor) -> Tensor:
        """Cropped, scaled images [B, C, h, w] -> spatial-softmax keypoints [B, 2 * num_kp] in the crop's [-1, 1]."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # Only the trunk (nearly all the FLOPs) under autocast: keypoints and head stay float32, so the
        # coordinates keep their precision.
        with torch.autocast(x.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            fmap = self.trunk(x)                                         # [B, C', h', w']
        return self.pool(fmap.float())


class MultiImageEncoder(nn.Module):
    """One ``ImageEncoder`` per camera (weights not shared): {key: [B, C, H, W]} -> [B, len(keys) * feature_dim].

    Features are concatenated in ``image_keys`` order. ``image_shape`` / ``crop_shape`` are one value for all
    cameras or a mapping key -> value (robomimic: 84x84 images cropped to 76x76).
    """

    def __init__(self, image_keys: Sequence[str], image_shape: Sequence[int] | Mapping = (3, 96, 96),
                 crop_shape: Sequence[int] | Mapping | None = (84, 84), preset: str = "resnet18", num_kp: int = 32,
                 feature_dim: int = 64):
        super().__init__()
        self.image_keys = list(image_keys)
        if not self.image_keys or len(set(self.image_keys)) != len(self.image_keys):
            raise ValueError(f"image_keys must be non-empty and distinct, got {self.image_keys}")

        def per_key(v, k):
            return v[k] if isinstance(v, Mapping) else v

        self.encoders = nn.ModuleDict({
            k: ImageEncoder(per_key(image_shape, k), per_key(crop_shape, k), preset, num_kp, feature_dim)
            for k in self.image_keys})
        self.feature_dim = int(feature_dim)

    @property
    def out_dim(self) -> int:
        return len(self.image_keys) * self.feature_dim

    def set_autocast(self, dtype: torch.dtype | None) -> "MultiImageEncoder":
        """Every camera's encoder under autocast in ``dtype`` (None: float32), its trunk channels-last with it
        (oneDNN's bfloat16 convolutions gain from the layout, float32 ones do not: profile_step_pusht_image)."""
        for enc in self.encoders.values():
            enc.autocast = dtype
            enc.set_channels_last(dtype is not None)
        return self

    def set_channels_last(self, on: bool = True) -> "MultiImageEncoder":
        for enc in self.encoders.values():
            enc.set_channels_last(on)
        return self

    def forward(self, images: Mapping[str, Tensor], generator: torch.Generator | None = None,
                origin: Tensor | None = None) -> Tensor:
        """``origin`` [B, 2]: a point every camera sees at those pixel indices (``ImageEncoder.forward``)."""
        missing = [k for k in self.image_keys if k not in images]
        if missing:
            raise ValueError(f"missing image keys {missing}; expected {self.image_keys}")
        feats = [self.encoders[k](images[k], generator, origin) for k in self.image_keys]  # each [B, feature_dim]
        return torch.cat(feats, dim=-1)                                            # [B, n_keys * feature_dim]
