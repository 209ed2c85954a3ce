"""BEVPlace v1 (Luo et al., ICCV 2023), written from the authors' description and code so that
their trained checkpoint loads tensor for tensor (see `checkpoint.py` for the key layout).

The network: a 5-scale x 5-rotation group of the BEV image; a light CNN per transformed image;
its features bilinearly sampled where each of the 841 keypoints of a 5-pixel grid lands after the
transform; a bilinear group CNN over the 5 x 5 group axis -> one 128-d, L2-normalised local
feature per keypoint; NetVLAD (64 clusters) over them -> an 8,192-d global descriptor.

Speed, with the reference's outputs kept: every warp of the group is a fixed resampling of a
151 x 151 image, so its sampling grids are computed once and all 25 warps run as one
`grid_sample`; transformed images of one size share one CNN batch (10 sizes: padding them to one
would add a third more convolution work, and instance norm would need masks); NetVLAD is matrix
products. The inference copy (`for_inference`) runs most convolutions in bfloat16, NHWC, with
in-place instance norms (see there).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bevplace_ros.models.netvlad import NetVLAD

MODEL_KIND = "bevplace_v1"
FEATURE_DIM = 128
CNN_DIM = 32
SCALES = 5  # 1, 1/2, ... 1/16, each level blurred once more than the previous
ROTATIONS = 5  # -90 ... +90 degrees in 45-degree steps
KEYPOINT_STEP = 5  # pixels between keypoints of the sampling grid
# The authors' input: the PNG read as RGB (three equal channels), ImageNet mean/std, then x255.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# OpenCV's warpAffine quantises source coordinates to 1/32 pixel; reproduced to match it exactly.
_WARP_SUBPIXELS = 32
_GROUP_CNN_CHUNK = 211  # keypoints per group-CNN call: a quarter of one image's grid


@dataclass(frozen=True)
class BEVPlaceV1Config:
    image_size: int = 151  # the published images; grids and warps are built for this size

    # No anti-aliasing blur before the group (the scale pyramid blurs instead); named so that the
    # local-feature cache key (training/feature_bank.py) treats both model kinds alike.
    input_blur_px: float = 0.0

    def __post_init__(self) -> None:
        if not 3 * KEYPOINT_STEP <= self.image_size <= 1024:
            raise ValueError(f"BEVPlaceV1Config.image_size must be in [{3 * KEYPOINT_STEP}, 1024], got {self.image_size}")
        if self.input_blur_px != 0.0:
            raise ValueError("BEVPlaceV1Config.input_blur_px must be 0 (the network has no input blur)")

    def to_dict(self) -> dict:
        return asdict(self)


def keypoint_grid(image_size: int) -> np.ndarray:
    """(N, 2) float32 (x=column, y=row) of the keypoints, row-major: a (g, g) grid, g = len(axis)."""
    axis = np.arange(KEYPOINT_STEP, image_size - KEYPOINT_STEP, KEYPOINT_STEP)
    xs, ys = np.meshgrid(axis, axis)
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)


def grid_side(image_size: int) -> int:
    return len(range(KEYPOINT_STEP, image_size - KEYPOINT_STEP, KEYPOINT_STEP))


def grid_coords(pixels: torch.Tensor, image_size: int) -> torch.Tensor:
    """Image pixel coordinates -> fractional coordinates on the (g, g) keypoint grid (bev_pose)."""
    del image_size  # the grid starts at pixel KEYPOINT_STEP whatever the size
    return (pixels - KEYPOINT_STEP) / KEYPOINT_STEP


def group_transforms(image_size: int) -> list[tuple[np.ndarray, np.ndarray, tuple[int, int]]]:
    """(A (2, 3) float32 forward affine, scale index, (width, height)) of the 25 transforms,
    scale-major, computed in float32 the way the authors' preprocessing does."""
    size = image_size
    corners = np.asarray([[0, 0], [0, size], [size, size], [size, 0]], np.float32)
    centre = corners.mean(0)
    out = []
    for si in range(SCALES):
        scale = 0.5**si
        for ri in range(ROTATIONS):
            angle = np.deg2rad(-90.0 + 45.0 * ri)
            M = scale * np.asarray([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], np.float32)
            turned = (corners - centre[None]) @ M.T
            low = turned.min(0)
            width, height = np.round((turned - low[None]).max(0)).astype(np.int32)
            offset = -M @ centre - low
            out.append((np.concatenate([M, offset[:, None]], 1), si, (int(width), int(height))))
    return out


def warp_source_coords(A: np.ndarray, width: int, height: int) -> np.ndarray:
    """(height, width, 2) source (x, y) of every output pixel of cv2.warpAffine(INTER_LINEAR) with
    forward matrix A: the inverse map in double, then OpenCV's fixed point (10 bits, rounded to
    1/32 pixel)."""
    m = A.astype(np.float64).ravel()
    det = m[0] * m[4] - m[1] * m[3]
    inv_det = 1.0 / det
    a11, a12, a21, a22 = m[4] * inv_det, -m[1] * inv_det, -m[3] * inv_det, m[0] * inv_det
    b1 = -a11 * m[2] - a12 * m[5]
    b2 = -a21 * m[2] - a22 * m[5]
    ab_scale, round_delta = 1 << 10, (1 << 10) // _WARP_SUBPIXELS // 2
    x = np.arange(width, dtype=np.float64)
    y = np.arange(height, dtype=np.float64)
    fx = np.rint(a11 * x * ab_scale).astype(np.int64)[None, :] + (np.rint((a12 * y + b1) * ab_scale).astype(np.int64) + round_delta)[:, None]
    fy = np.rint(a21 * x * ab_scale).astype(np.int64)[None, :] + (np.rint((a22 * y + b2) * ab_scale).astype(np.int64) + round_delta)[:, None]
    shift = 10 - 5  # AB_BITS - INTER_BITS
    return np.stack([(fx >> shift) / _WARP_SUBPIXELS, (fy >> shift) / _WARP_SUBPIXELS], axis=-1)


def gaussian_kernel_5(sigma: float = 1.5) -> torch.Tensor:
    """OpenCV's GaussianBlur((5, 5), sigma) kernel, 1-D."""
    x = torch.arange(-2, 3, dtype=torch.float64)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return (k / k.sum()).float()


def l2_normalise(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The authors' normalisation: norm clamped at 1e-6 (F.normalize clamps at 1e-12). A sum of
    squares: `Tensor.norm` over the channels of an NCHW map was ~20x slower on the CPU."""
    return x / x.square().sum(dim=dim, keepdim=True).sqrt().clamp(min=1e-6)


def avg_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """nn.AvgPool2d(2, 2) as strided adds (rows, then columns): ~10x faster than avg_pool2d on NCHW here."""
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    rows = x[..., 0:h:2, :w] + x[..., 1:h:2, :w]
    return (rows[..., 0::2] + rows[..., 1::2]).mul_(0.25)


def instance_norm_(x: torch.Tensor, relu: bool) -> torch.Tensor:
    """InstanceNorm2d (eps 1e-5, no affine), optionally ReLU, in place on a float tensor laid out
    NCHW or NHWC: sums instead of var_mean (Welford, ~4x slower on CPU here), three in-place passes."""
    n, c = x.shape[:2]
    flat = x.view(n * c, -1, 1) if x.is_contiguous() else x.permute(0, 2, 3, 1).view(n, -1, c)
    mean = flat.sum(1, keepdim=True) / flat.shape[1]
    var = (torch.linalg.vector_norm(flat, dim=1, keepdim=True).square_() / flat.shape[1] - mean * mean).clamp_(min=0)
    flat.sub_(mean).mul_(torch.rsqrt(var.add_(1e-5)))
    return x.relu_() if relu else x


class LightCNN(nn.Module):
    """Four 5x5 convolutions with instance norm, one 2x2 average pool: 32 channels at 1/2 size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Sequential(
            nn.Conv2d(3, 16, 5, 1, 2, bias=False), nn.InstanceNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, CNN_DIM, 5, 1, 2, bias=False), nn.InstanceNorm2d(CNN_DIM), nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2),
        )
        self.conv1 = nn.Sequential(
            nn.Conv2d(CNN_DIM, CNN_DIM, 5, 1, 2, bias=False), nn.InstanceNorm2d(CNN_DIM), nn.ReLU(inplace=True),
            nn.Conv2d(CNN_DIM, CNN_DIM, 5, 1, 2, bias=False), nn.InstanceNorm2d(CNN_DIM),
        )
        self.inference = False  # set by `for_inference()`: in-place norms, its convolutions' own dtypes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.inference:
            return l2_normalise(self.conv1(self.conv0(x)), dim=1)
        convs = (self.conv0[0], self.conv0[3], self.conv1[0], self.conv1[3])
        for i, conv in enumerate(convs):
            x = x.to(conv.weight.dtype, memory_format=torch.channels_last)
            x = instance_norm_(conv(x).float(), relu=i < 3)
            if i == 1:
                x = avg_pool_2x2(x)
        return l2_normalise(x, dim=1)


def _residual_pair(cin: int) -> tuple[nn.Sequential, nn.Conv2d]:
    return nn.Sequential(nn.Conv2d(cin, 64, 3, 1, 1), nn.ReLU(True), nn.Conv2d(64, 64, 3, 1, 1)), nn.Conv2d(cin, 64, 1, 1)


class BilinearGroupCNN(nn.Module):
    """Two small residual CNNs over the 5 x 5 (scale, rotation) group of each keypoint; the
    outer product of their 8- and 16-channel outputs, summed over the group, is the 128-d feature."""

    def __init__(self) -> None:
        super().__init__()
        for net, width in (("network1", 8), ("network2", 16)):
            for block, cin in (("embed1", CNN_DIM), ("embed2", 64)):
                body, short = _residual_pair(cin)
                setattr(self, f"{net}_{block}", body)
                setattr(self, f"{net}_{block}_short", short)
                setattr(self, f"{net}_{block}_relu", nn.ReLU(True))
            setattr(self, f"{net}_embed3", nn.Sequential(nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU(True), nn.Conv2d(64, width, 3, 1, 1)))

    def _branch(self, net: str, x: torch.Tensor) -> torch.Tensor:
        for block in ("embed1", "embed2"):
            x = F.relu(getattr(self, f"{net}_{block}")(x) + getattr(self, f"{net}_{block}_short")(x))
        return getattr(self, f"{net}_embed3")(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(M, 32, 5, 5) group features -> (M, 128) unit local features."""
        m = x.shape[0]
        a = self._branch("network1", x).float().reshape(m, 8, SCALES * ROTATIONS)
        b = self._branch("network2", x).float().reshape(m, 16, SCALES * ROTATIONS)
        return l2_normalise(torch.bmm(a, b.transpose(1, 2)).reshape(m, FEATURE_DIM), dim=1)


class _Holder(nn.Module):
    """Keeps the authors' module nesting (encoder.extractor.extractor...) so their keys fit."""

    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


class BEVPlaceV1(nn.Module):
    """forward(images (B,1,S,S) in [0,1]) -> (local (B,128,g,g) on the keypoint grid, global (B,8192))."""

    kind = MODEL_KIND
    feature_coords = staticmethod(grid_coords)  # pixel -> keypoint-grid cell, for bev_pose

    def __init__(self, cfg: BEVPlaceV1Config = BEVPlaceV1Config()) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = _Holder(extractor=_Holder(extractor=LightCNN()), embedder=_Holder(embedder=BilinearGroupCNN()))
        self.vlad = NetVLAD(clusters=64, dim=FEATURE_DIM)
        with torch.no_grad():
            self.vlad.assign.bias.zero_()  # the authors' assignment has no bias
        self.vlad.assign.bias.requires_grad_(False)
        self.rotations = ROTATIONS
        self.channels_last = False
        self._build_group(cfg.image_size)

    @property
    def backbone(self) -> nn.Module:
        """What makes the local features (the cache key hashes it), NetVLAD excluded."""
        return self.encoder

    @property
    def descriptor_dim(self) -> int:
        return self.vlad.out_dim

    def _build_group(self, size: int) -> None:
        """Fixed per image size: one sampling grid for all 25 warps, and the keypoints' places."""
        transforms = group_transforms(size)
        shapes = sorted({(w, h) for _, _, (w, h) in transforms}, key=lambda s: (-s[0], -s[1]))
        # Sources: the SCALES blur levels side by side, 4 px of zeros between, so a sample just
        # outside one level blends with zeros exactly as OpenCV's constant border does.
        gap = 4
        pitch = size + gap
        atlas_w = SCALES * pitch
        grids, keypoint_grids, self._groups = [], [], []
        points = keypoint_grid(size)
        order = []
        for shape in shapes:
            members = [t for t, (_, _, wh) in enumerate(transforms) if wh == shape]
            self._groups.append((len(members), shape))
            order.extend(members)
            for t in members:
                A, si, (w, h) = transforms[t]
                src = warp_source_coords(A, w, h)
                outside = (src[..., 0] <= -1) | (src[..., 0] >= size) | (src[..., 1] <= -1) | (src[..., 1] >= size)
                src[..., 0] += si * pitch + gap
                src[outside] = -2.0  # falls on zeros before the first level
                grids.append(np.stack([2 * src[..., 0] / (atlas_w + gap - 1) - 1, 2 * src[..., 1] / (size - 1) - 1], -1).reshape(-1, 2))
                # keypoints: warped, halved by the average pool, normalised as the authors do
                # (align_corners=True-style scaling, then sampled with align_corners=False)
                warped = points @ A[:, :2].T + A[:, 2][None]
                pooled = (warped + 0.5) / 2 - 0.5
                fw, fh = w // 2, h // 2
                norm = np.stack([(pooled[:, 0] - (fw - 1) / 2) / ((fw - 1) / 2), (pooled[:, 1] - (fh - 1) / 2) / ((fh - 1) / 2)], -1)
                keypoint_grids.append(norm.astype(np.float32))
        self._atlas = (gap, pitch, atlas_w + gap)
        self.register_buffer("warp_grid", torch.from_numpy(np.concatenate(grids).astype(np.float32))[None, None], persistent=False)
        self.register_buffer("keypoint_sample_grid", torch.from_numpy(np.stack(keypoint_grids))[:, None], persistent=False)
        # position of transform t (scale-major) in the group-sorted order
        self.register_buffer("group_order", torch.argsort(torch.as_tensor(order)), persistent=False)
        self.register_buffer("blur_kernel", gaussian_kernel_5(), persistent=False)
        a = torch.tensor([255.0 / s / 128.0 for s in IMAGENET_STD])
        b = torch.tensor([(-m / s * 255.0 - 127.0) / 128.0 for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
        self.register_buffer("input_scale", a.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", b.view(1, 3, 1, 1), persistent=False)

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        """cv2.GaussianBlur((5, 5), 1.5) with its reflect-101 border, separable."""
        k = self.blur_kernel
        x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="reflect"), k.view(1, 1, 1, 5))
        return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="reflect"), k.view(1, 1, 5, 1))

    def _warped_group(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The 25 transformed, normalised 3-channel images, as one batch per output size."""
        b, size = images.shape[0], self.cfg.image_size
        gap, pitch, atlas_w = self._atlas
        levels = [images]
        for _ in range(SCALES - 1):
            levels.append(self._blur(levels[-1]))
        # normalise each level the authors' way; the warp's zero border is their border 127
        levels = [lv * self.input_scale + self.input_shift for lv in levels]
        atlas = images.new_zeros(b, 3, size, atlas_w)
        for si, lv in enumerate(levels):
            atlas[..., si * pitch + gap : si * pitch + gap + size] = lv
        flat = F.grid_sample(atlas, self.warp_grid.expand(b, -1, -1, -1), mode="bilinear", padding_mode="zeros", align_corners=True)
        out, start = [], 0
        for count, (w, h) in self._groups:
            chunk = flat[..., start : start + count * w * h].reshape(b, 3, count, h, w)
            out.append(chunk.transpose(1, 2).reshape(b * count, 3, h, w))
            start += count * w * h
        return out

    def _group_features(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 1, S, S) -> (N, 32, 5, 5) light-CNN features of each keypoint over the group (scale, rotation)."""
        cnn = self.encoder.extractor.extractor
        sampled, t0 = [], 0
        for (count, _), warped in zip(self._groups, self._warped_group(image)):
            grid = self.keypoint_sample_grid[t0 : t0 + count]
            sampled.append(F.grid_sample(cnn(warped), grid, mode="bilinear", align_corners=False)[:, :, 0])
            t0 += count
        dtype = next(self.encoder.embedder.parameters()).dtype
        group = torch.cat(sampled)[self.group_order].to(dtype)  # (25, 32, N) scale-major
        # laid out NHWC in memory: one copy, and the layout oneDNN runs the group CNN fastest in
        group = group.permute(2, 0, 1).reshape(-1, SCALES, ROTATIONS, CNN_DIM).permute(0, 3, 1, 2)
        return group if self.channels_last else group.contiguous()

    def local_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) in [0, 1] -> (B, 128, g, g) unit features on the 5-pixel keypoint grid.

        One image at a time through the light CNN and ~200 keypoints at a time through the group CNN:
        activations that stay in the core's cache. Measured CPU time per image (one thread): whole
        batches of 16 images cost 1.6x more than single images, and the group CNN on chunks of 211
        keypoints ~25 % less than on all 841 at once.
        """
        b, size = images.shape[0], self.cfg.image_size
        group = torch.cat([self._group_features(images[i : i + 1]) for i in range(b)])  # (B*N, 32, 5, 5)
        embedder = self.encoder.embedder.embedder
        local = torch.cat([embedder(group[s : s + _GROUP_CNN_CHUNK]) for s in range(0, len(group), _GROUP_CNN_CHUNK)])
        side = grid_side(size)
        return local.reshape(b, side, side, FEATURE_DIM).permute(0, 3, 1, 2)

    def global_descriptor(self, local: torch.Tensor) -> torch.Tensor:
        return self.vlad(local)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.cfg.image_size
        if images.ndim != 4 or images.shape[1:] != (1, size, size):
            raise ValueError(f"BEVPlace v1 takes (B, 1, {size}, {size}) images, got {tuple(images.shape)}")
        local = self.local_features(images)
        return local, self.global_descriptor(local)

    def for_inference(self) -> "BEVPlaceV1":
        """Eval copy, descriptors within cosine 0.99995 of the authors' (test_bevplace_v1.py).
        bfloat16 (avx512_bf16 here, tensor cores on CUDA) where it keeps that: the group CNN (about
        half its float32 time), and the light CNN's convolutions after the first (instance norm
        stays float32; with the first convolution in bfloat16 too the descriptor fell to cosine
        0.9997). Both CNNs NHWC: oneDNN runs the group CNN's 841 x 5 x 5 maps ~1.6x faster so, and
        the light CNN ~12 % faster (its instance norm reduces over H, W of NHWC just as well)."""
        fast = BEVPlaceV1(self.cfg)
        fast.load_state_dict(self.state_dict())
        cnn = fast.encoder.extractor.extractor
        cnn.to(memory_format=torch.channels_last)
        for conv in (cnn.conv0[3], cnn.conv1[0], cnn.conv1[3]):
            conv.to(torch.bfloat16)
        cnn.inference = True
        fast.encoder.embedder = fast.encoder.embedder.to(torch.bfloat16, memory_format=torch.channels_last)
        fast.channels_last = True
        return fast.eval()
