"""Class balance: how often each class occurs, and median-frequency class weights.

Median-frequency balancing (Eigen & Fergus 2015, as SegNet trains CamVid): a class's
frequency is its pixel count divided by the labelled pixels of the images it appears
in; its weight is the median of the frequencies over the classes present, divided by
its own frequency. Thin classes (poles, signs, pedestrians) get weights above 1, large
ones (road, sky) below 1; a class absent from the data gets weight 0.
"""

from __future__ import annotations

import numpy as np

from flaxseg.data.base import Source


class ClassBalance:
    """Running pixel counts of decoded label maps (`add` one `[H, W]` map at a time)."""

    def __init__(self, num_classes: int, ignore_index: int):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.pixels = np.zeros((num_classes,), np.int64)  # pixels of each class
        self.image_pixels = np.zeros((num_classes,), np.int64)  # labelled pixels of its images
        self.void_pixels = 0

    def add(self, label: np.ndarray) -> None:
        """Counts one label map of class indices and `ignore_index` (int `[H, W]`)."""
        valid = label[label != self.ignore_index]
        counts = np.bincount(valid.ravel(), minlength=self.num_classes)[: self.num_classes]
        self.pixels += counts
        self.image_pixels[counts > 0] += valid.size
        self.void_pixels += label.size - valid.size

    def merge(self, other: ClassBalance) -> None:
        self.pixels += other.pixels
        self.image_pixels += other.image_pixels
        self.void_pixels += other.void_pixels

    def frequencies(self) -> np.ndarray:
        """float64 `[num_classes]`: pixels / labelled pixels of the images holding the class
        (0 for a class that never occurs)."""
        return np.divide(self.pixels, self.image_pixels, out=np.zeros(self.num_classes),
                         where=self.image_pixels > 0)

    def median_frequency_weights(self) -> np.ndarray:
        """float64 `[num_classes]`: median frequency / frequency; 0 for absent classes."""
        freq = self.frequencies()
        present = freq > 0
        if not present.any():
            raise ValueError("no labelled pixels: median-frequency weights need at least one "
                             "class present")
        median = np.median(freq[present])
        return np.divide(median, freq, out=np.zeros(self.num_classes), where=present)


def class_balance(source: Source) -> ClassBalance:
    """The `ClassBalance` of every label of a source (decodes each example once)."""
    balance = ClassBalance(source.info.num_classes, source.info.ignore_index)
    for index in range(len(source)):
        balance.add(np.asarray(source[index]["label"]))
    return balance
