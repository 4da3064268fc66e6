"""Procedurally drawn car pictures in the layout of the Kaggle Stanford Cars archive.

The demo pipeline and the tests run on these instead of the 1.8 GB download.
They are written exactly as `eduardo4jesus/stanford-cars-dataset` unpacks:

    car_devkit/devkit/{cars_meta.mat, cars_train_annos.mat, cars_test_annos.mat}
    cars_train/cars_train/00001.jpg ...
    cars_test/cars_test/00001.jpg ...

so that the download, preprocess (including `bbox_crop`) and evaluation code
take the same path through them as through the real archive. The pictures are side views of cars
(body, cabin, windows, wheels with hubcaps, lights) in varied styles, colours,
sizes and positions on varied backgrounds: enough structure that a generative
model has something to learn and FID separates a good model from a bad one.

Every picture is drawn from its own generator, seeded by (seed, split,
number), so a file's bytes depend only on those: a larger set contains a
smaller one, and any subset can be drawn in any order or process.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

# The real archive's split: 8,144 train and 8,041 test pictures.
TRAIN_FRACTION = 8144 / (8144 + 8041)

SPLITS = ("train", "test")

GRAYSCALE_FRACTION = 0.02

# Body styles as fractions of the car's length L. wheel: tyre radius;
# body: height of the lower body; cabin: (rear base, rear roof, front roof,
# front base, height), measured from the rear bumper.
STYLES: dict[str, dict] = {
    "Sedan": {"wheel": 0.088, "body": 0.20, "cabin": (0.22, 0.34, 0.60, 0.76, 0.16)},
    "Hatchback": {"wheel": 0.090, "body": 0.22, "cabin": (0.07, 0.12, 0.52, 0.72, 0.18)},
    "SUV": {"wheel": 0.105, "body": 0.27, "cabin": (0.05, 0.07, 0.60, 0.76, 0.19)},
    "Pickup": {"wheel": 0.100, "body": 0.25, "cabin": (0.40, 0.43, 0.64, 0.76, 0.18)},
    "Coupe": {"wheel": 0.085, "body": 0.17, "cabin": (0.26, 0.40, 0.57, 0.74, 0.13)},
}

COLOURS: dict[str, list[tuple[int, int, int]]] = {
    "Red": [(185, 22, 28), (135, 16, 32), (215, 64, 34)],
    "Blue": [(32, 62, 165), (22, 40, 92), (62, 124, 192)],
    "Green": [(32, 112, 62), (22, 70, 50), (112, 142, 42)],
    "Black": [(24, 24, 27), (52, 52, 58), (40, 34, 36)],
    "White": [(232, 232, 226), (188, 190, 194), (212, 202, 180)],
    "Yellow": [(232, 190, 32), (240, 140, 24), (250, 214, 90)],
}

# Class k (0-based) is style k // len(COLOURS), colour k % len(COLOURS).
CLASS_NAMES: tuple[str, ...] = tuple(
    f"Synthetic {colour} {style}" for style in STYLES for colour in COLOURS
)


@dataclass(frozen=True)
class SyntheticCar:
    image: Image.Image  # RGB, or L for the few grayscale pictures
    mask: Image.Image  # L, 255 where the car was drawn
    bbox: tuple[int, int, int, int]  # (x1, y1, x2, y2), 0-based, end-exclusive, tight on mask
    class_index: int  # 0-based index into CLASS_NAMES


def split_counts(count: int) -> tuple[int, int]:
    """(train, test) sizes in the real archive's ratio, neither split empty."""
    if count < 2:
        raise ValueError(f"synthetic count must be at least 2 (one per split), got {count}")
    n_train = min(count - 1, max(1, round(count * TRAIN_FRACTION)))
    return n_train, count - n_train


def write_synthetic_dataset(root: Path, count: int, seed: int) -> None:
    """Write `count` pictures and the devkit under `root`, as the Kaggle archive unpacks."""
    root = Path(root)
    devkit = root / "car_devkit" / "devkit"
    devkit.mkdir(parents=True, exist_ok=True)
    _write_mat(devkit / "cars_meta.mat", {"class_names": _cell(CLASS_NAMES)})

    for split, n in zip(SPLITS, split_counts(count)):
        folder = root / f"cars_{split}" / f"cars_{split}"
        folder.mkdir(parents=True, exist_ok=True)
        records = []
        for number in range(1, n + 1):
            car = render_car(seed, split, number)
            fname = f"{number:05d}.jpg"
            buf = io.BytesIO()
            car.image.save(buf, format="JPEG", quality=90)
            (folder / fname).write_bytes(buf.getvalue())
            x1, y1, x2, y2 = car.bbox
            # The devkit counts pixels from 1 and includes both ends.
            records.append((x1 + 1, y1 + 1, x2, y2, car.class_index + 1, fname))
        # The real test annotations carry no class.
        with_class = split == "train"
        annotations = _struct(records, with_class)
        _write_mat(devkit / f"cars_{split}_annos.mat", {"annotations": annotations})


def render_car(seed: int, split: str, number: int) -> SyntheticCar:
    """Draw picture `number` (1-based) of `split`; depends on nothing else."""
    rng = np.random.default_rng([seed, SPLITS.index(split), number])
    width = int(rng.integers(240, 481))
    height = round(width / rng.uniform(1.3, 2.0))
    style_index = int(rng.integers(len(STYLES)))
    colour_index = int(rng.integers(len(COLOURS)))
    style = list(STYLES.values())[style_index]
    family = list(COLOURS.values())[colour_index]
    body_colour = _jitter(rng, family[rng.integers(len(family))], 14)

    # The car's length and where it stands, shrunk if its roof would leave the picture.
    ground = round(height * rng.uniform(0.68, 0.95))
    length = width * rng.uniform(0.55, 0.92)
    car_height = _car_height(style)
    length = min(length, (ground - 3) / car_height, width - 6)
    left = rng.uniform(3, width - length - 3)
    horizon = round(ground - rng.uniform(0.15, 0.55) * height)

    image = _background(rng, width, height, horizon)
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    _draw_car(ImageDraw.Draw(layer), rng, style, body_colour, left, ground, length)
    if rng.random() < 0.5:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    mask = layer.getchannel("A")
    bbox = mask.getbbox()

    # The shadow is drawn under the car but is not part of it, so not in the box.
    shade = ImageDraw.Draw(image, "RGBA")
    shadow_h = max(2.0, 0.035 * length)
    shade.ellipse(
        [bbox[0] - 0.04 * length, ground - shadow_h, bbox[2] + 0.04 * length, ground + shadow_h],
        fill=(0, 0, 0, int(rng.integers(70, 140))),
    )
    image.paste(layer, (0, 0), mask)
    if rng.random() < GRAYSCALE_FRACTION:
        image = image.convert("L")
    return SyntheticCar(image, mask, bbox, style_index * len(COLOURS) + colour_index)


def _car_height(style: dict) -> float:
    """Roof height above the ground, as a fraction of the length."""
    return 0.55 * style["wheel"] + style["body"] + style["cabin"][4]


def _draw_car(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    style: dict,
    colour: tuple[int, int, int],
    left: float,
    ground: float,
    length: float,
) -> None:
    """Draw a car facing right whose rear bumper is at `left` and wheels on `ground`."""
    L = length

    def xy(u: float, v: float) -> tuple[float, float]:
        # u: along the car from the rear bumper, v: height above the ground; both in L.
        return (left + u * L, ground - v * L)

    r = style["wheel"] * rng.uniform(0.92, 1.08)
    bottom = 0.55 * r
    top = bottom + style["body"]
    rear_base, rear_roof, front_roof, front_base, cabin_h = (
        c + rng.uniform(-0.02, 0.02) for c in style["cabin"]
    )
    roof = top + cabin_h
    dark = _shade(colour, 0.55)
    light = _shade(colour, 1.25)

    # Lower body: a slab with a chamfered rear, a hood sloping down to the nose.
    nose_drop = rng.uniform(0.03, 0.07)
    body = [
        xy(0.02, bottom), xy(0.0, bottom + 0.04), xy(0.0, top - 0.03), xy(0.03, top),
        xy(front_base + 0.02, top), xy(0.97, top - nose_drop * 0.6),
        xy(1.0, top - nose_drop), xy(1.0, bottom + 0.03), xy(0.98, bottom),
    ]
    draw.polygon(body, fill=colour)
    shoulder = [xy(0.03, top - 0.015), xy(front_base, top - 0.015)]
    draw.line(shoulder, fill=light, width=max(1, round(0.012 * L)))

    cabin = [xy(rear_base, top), xy(rear_roof, roof), xy(front_roof, roof), xy(front_base, top)]
    draw.polygon(cabin, fill=colour)
    cabin_shape = (rear_base, rear_roof, front_roof, front_base, top, roof)
    _draw_windows(draw, rng, xy, cabin_shape, colour)

    # Door seams and a handle just behind the front door's leading edge.
    seam_w = max(1, round(0.006 * L))
    for u in (front_base - 0.02, (rear_base + front_base) / 2):
        draw.line([xy(u, top), xy(u, bottom + 0.02)], fill=dark, width=seam_w)
    handle_u = (rear_base + front_base) / 2 + 0.03
    draw.rectangle([*xy(handle_u, top - 0.03), *xy(handle_u + 0.05, top - 0.045)], fill=dark)

    # Lights and bumpers.
    head = _jitter(rng, (250, 240, 200), 6)
    lamp_top = top - nose_drop - 0.005
    draw.ellipse([*xy(0.935, lamp_top), *xy(0.995, lamp_top - 0.04)], fill=head)
    draw.rectangle([*xy(0.005, top - 0.035), *xy(0.035, top - 0.085)], fill=(200, 20, 20))
    bumper = _jitter(rng, (45, 45, 48), 10)
    draw.rectangle([*xy(0.0, bottom + 0.045), *xy(0.06, bottom + 0.005)], fill=bumper)
    draw.rectangle([*xy(0.94, bottom + 0.045), *xy(1.0, bottom + 0.005)], fill=bumper)

    rim = _jitter(rng, [(200, 202, 206), (120, 122, 128), (190, 160, 90)][rng.integers(3)], 10)
    for u in (0.19 + rng.uniform(-0.02, 0.02), 0.80 + rng.uniform(-0.02, 0.02)):
        cx, cy = xy(u, r)
        _circle(draw, cx, cy, 1.18 * r * L, (18, 18, 20))  # wheel arch
        _circle(draw, cx, cy, r * L, (30, 30, 32))  # tyre
        _circle(draw, cx, cy, 0.62 * r * L, rim)
        _circle(draw, cx, cy, 0.2 * r * L, _shade(rim, 0.6))


def _draw_windows(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    xy: Callable[[float, float], tuple[float, float]],
    cabin_shape: tuple[float, ...],
    colour: tuple[int, int, int],
) -> None:
    """Side windows inset in the cabin, split by a pillar."""
    rear_base, rear_roof, front_roof, front_base, top, roof = cabin_shape
    glass = _jitter(rng, (48, 62, 84), 14)
    inset = 0.018
    sill, head = top + inset, roof - inset

    def along(base: float, roof_u: float, v: float) -> float:
        # Where the sloping cabin edge from (base, top) to (roof_u, roof) is at height v.
        return base + (roof_u - base) * (v - top) / (roof - top)

    back = [along(rear_base, rear_roof, v) + inset * 1.5 for v in (sill, head)]
    front = [along(front_base, front_roof, v) - inset * 1.5 for v in (sill, head)]
    window = [xy(back[0], sill), xy(back[1], head), xy(front[1], head), xy(front[0], sill)]
    draw.polygon(window, fill=glass)
    pillar = (back[0] + front[0]) / 2 + rng.uniform(-0.03, 0.05)
    pillar_colour = colour if rng.random() < 0.6 else (22, 22, 24)
    draw.rectangle([*xy(pillar - 0.012, head), *xy(pillar + 0.012, sill)], fill=pillar_colour)
    # A pale streak of reflected sky across the front window.
    streak = _shade(glass, 1.8)
    s = pillar + 0.04
    low, high = sill + 0.005, head - 0.005
    streak_shape = [xy(s, low), xy(s + 0.04, high), xy(s + 0.06, high), xy(s + 0.02, low)]
    draw.polygon(streak_shape, fill=streak)


def _background(rng: np.random.Generator, width: int, height: int, horizon: int) -> Image.Image:
    kind = rng.integers(3)
    rows = np.arange(height, dtype=np.float32)[:, None]
    if kind == 0:  # sky gradient over road or grass, sometimes buildings or trees on the skyline
        sky_top = _jitter(rng, (70, 130, 210), 30)
        sky_low = _jitter(rng, (200, 220, 240), 20)
        floor = _jitter(rng, [(95, 95, 98), (70, 120, 55), (180, 160, 120)][rng.integers(3)], 20)
        t = np.clip(rows / max(horizon, 1), 0, 1)
        sky = _lerp(sky_top, sky_low, t)
        t = np.clip((rows - horizon) / max(height - horizon, 1), 0, 1)
        below = _lerp(floor, _shade(floor, 0.75), t)
        column = np.where(rows < horizon, sky, below)
    elif kind == 1:  # plain wall and floor, as in a showroom
        wall = _jitter(rng, (200, 195, 185), 50)
        floor = _jitter(rng, (150, 145, 140), 50)
        t = rows / height
        upper, lower = _lerp(wall, _shade(wall, 0.85), t), _lerp(floor, _shade(floor, 0.8), t)
        column = np.where(rows < horizon, upper, lower)
    else:  # blotchy texture: coarse noise blown up, plus grain
        base = np.array(_jitter(rng, (130, 130, 120), 60), dtype=np.float32)
        # Mostly brightness, a little hue: walls and foliage, not confetti.
        grid = (int(rng.integers(3, 8)), int(rng.integers(4, 10)))
        coarse = base + rng.normal(0, 35, size=(*grid, 1)) + rng.normal(0, 10, size=(*grid, 3))
        coarse = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8))
        coarse = coarse.resize((width, height), Image.Resampling.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.float32)
        pixels = pixels + rng.normal(0, 8, size=(height, width, 1)).astype(np.float32)
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    pixels = np.broadcast_to(column[:, None, :], (height, width, 3))
    image = Image.fromarray(np.ascontiguousarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    if kind == 0 and rng.random() < 0.6:
        _draw_skyline(ImageDraw.Draw(image), rng, width, horizon)
    return image


def _draw_skyline(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, horizon: int
) -> None:
    """Buildings or trees standing on the horizon, well behind the car."""
    trees = rng.random() < 0.5
    x = -rng.uniform(0, 30)
    while x < width:
        w = rng.uniform(15, 60)
        h = rng.uniform(10, 60)
        if trees:
            colour = _jitter(rng, (50, 95, 45), 20)
            draw.ellipse([x, horizon - h, x + w, horizon + 0.2 * h], fill=colour)
        else:
            colour = _jitter(rng, (140, 140, 150), 40)
            draw.rectangle([x, horizon - h, x + w, horizon], fill=colour)
        x += w * rng.uniform(0.6, 1.3)


def _circle(
    draw: ImageDraw.ImageDraw, cx: float, cy: float, radius: float, fill: tuple[int, int, int]
) -> None:
    draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)


def _jitter(rng: np.random.Generator, rgb, amount: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.uniform(-amount, amount), 0, 255)) for c in rgb)


def _shade(rgb, factor: float) -> tuple[int, int, int]:
    return tuple(int(min(255, c * factor)) for c in rgb)


def _lerp(a, b, t: np.ndarray) -> np.ndarray:
    """Rows of colour from a (t = 0) to b (t = 1); t has shape (H, 1)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a + (b - a) * t


def _struct(records: list[tuple], with_class: bool) -> np.ndarray:
    """A 1×N MATLAB struct array shaped like the devkit's `annotations`."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    if not with_class:
        fields.remove("class")
    array = np.empty((1, len(records)), dtype=[(f, object) for f in fields])
    for i, (x1, y1, x2, y2, cls, fname) in enumerate(records):
        numbers = [x1, y1, x2, y2] + ([cls] if with_class else [])
        # MATLAB stored the real numbers as the smallest unsigned type that fits.
        array[0, i] = tuple(np.uint8(n) if n < 256 else np.uint16(n) for n in numbers) + (fname,)
    return array


def _cell(strings: tuple[str, ...]) -> np.ndarray:
    cell = np.empty((1, len(strings)), dtype=object)
    cell[0, :] = list(strings)
    return cell


def _write_mat(path: Path, variables: dict) -> None:
    from scipy.io import savemat

    buf = io.BytesIO()
    savemat(buf, variables)
    data = bytearray(buf.getvalue())
    # The MAT-5 header's 116-byte text holds the creation time and platform;
    # a fixed text keeps the files byte-identical from run to run.
    data[:116] = b"MATLAB 5.0 MAT-file, synthetic Stanford Cars devkit".ljust(116)
    path.write_bytes(bytes(data))
