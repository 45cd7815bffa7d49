"""Images that are not chest X-rays, all available offline: the corpus the input gate is
measured on (``benchmarks/rejection.py``) and tested against. Photographs, microscopy, an MRI,
text, noise, gradients and shapes, from scikit-image's and matplotlib's bundled sample data
(matplotlib is needed: the ``test`` and ``bench`` extras install it) and generated here."""
from __future__ import annotations

import cv2
import numpy as np

__all__ = ["non_cxr_images"]


def _packaged_images() -> dict[str, np.ndarray]:
    import matplotlib.cbook
    import skimage.data

    names = ["astronaut", "binary_blobs", "brick", "camera", "cat", "cell", "checkerboard", "clock", "coffee",
             "coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry",
             "logo", "microaneurysms", "moon", "page", "retina", "rocket", "shepp_logan_phantom", "text"]
    images = {f"skimage.{n}": np.asarray(getattr(skimage.data, n)()) for n in names}
    for name, im in images.items():  # two-level images as a file would hold them
        if im.dtype == bool:
            images[name] = im.astype(np.uint8) * 255
    faces = skimage.data.lfw_subset()
    for i in (0, 50, 120):  # 25 px faces, enlarged to a plausible film size
        images[f"skimage.lfw_face{i}"] = cv2.resize(faces[i], (256, 256), interpolation=cv2.INTER_CUBIC)
    with matplotlib.cbook.get_sample_data("s1045.ima.gz") as f:
        images["matplotlib.brain_mri"] = np.frombuffer(f.read(), np.uint16).reshape(256, 256)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        images["matplotlib.grace_hopper"] = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_UNCHANGED)
    images["matplotlib.elevation_map"] = matplotlib.cbook.get_sample_data("jacksboro_fault_dem.npz")["elevation"]
    return images


def _generated_images(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = 512
    y, x = np.mgrid[0:n, 0:n] / (n - 1)
    text = np.full((n, n), 255, np.uint8)
    for row in range(12):
        cv2.putText(text, "the quick brown fox jumps", (10, 40 + row * 40), cv2.FONT_HERSHEY_SIMPLEX, 0.9, 0, 2)
    shapes = np.zeros((n, n), np.uint8)
    for _ in range(12):
        c = tuple(int(v) for v in rng.integers(0, n, 2))
        cv2.circle(shapes, c, int(rng.integers(20, 90)), int(rng.integers(60, 255)), -1)
    lungs = np.full((n, n), 200, np.uint8)  # two dark ellipses: the crudest "chest film"
    cv2.ellipse(lungs, (160, 260), (80, 160), 0, 0, 360, 60, -1)
    cv2.ellipse(lungs, (352, 260), (80, 160), 0, 0, 360, 60, -1)
    return {
        "generated.uniform_noise": rng.integers(0, 256, (n, n)).astype(np.uint8),
        "generated.gaussian_noise": np.clip(rng.normal(128, 40, (n, n)), 0, 255).astype(np.uint8),
        "generated.smooth_noise": cv2.GaussianBlur(rng.random((n, n)).astype(np.float32), (0, 0), 12),
        "generated.black": np.zeros((n, n), np.uint8),
        "generated.white": np.full((n, n), 255, np.uint8),
        "generated.grey": np.full((n, n), 128, np.uint8),
        "generated.horizontal_gradient": x.astype(np.float32),
        "generated.vertical_gradient": y.astype(np.float32),
        "generated.radial_gradient": np.hypot(x - 0.5, y - 0.5).astype(np.float32),
        "generated.stripes": (0.5 + 0.5 * np.sin(x * 40)).astype(np.float32),
        "generated.text": text,
        "generated.circles": shapes,
        "generated.two_ellipses": cv2.GaussianBlur(lungs, (0, 0), 6),
        "generated.colour_noise": rng.integers(0, 256, (n, n, 3)).astype(np.uint8),
    }


def non_cxr_images(seed: int = 0) -> dict[str, np.ndarray]:
    """The (a) corpus: ``{name: array}``, at least 30 non-chest-X-ray images, all offline."""
    return {**_packaged_images(), **_generated_images(seed)}
