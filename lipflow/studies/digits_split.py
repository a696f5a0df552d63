"""The digits-MLP study's data: scikit-learn's 8×8 digits (1,797 images of 64 pixels, classes 0–9), split
into a stratified 60 % train split and the rest halved into val and test, sized as ``train_test_split``
sizes them (train ⌊0.6·n⌋, then test ⌈0.5·rest⌉). Free of torch and scikit-learn, so the workflow's
resource rules can size the study's job from it."""

import math

DIGITS_IMAGES = 1797
IMAGE_FEATURES, CLASSES = 64, 10  # 8×8 pixels, digits 0–9
TRAIN_FRACTION = 0.6
TEST_FRACTION_OF_REST = 0.5


def images_in_test_split() -> int:
    """Images in the test split: ⌈0.5·(n − ⌊0.6·n⌋)⌉ = 360."""
    rest = DIGITS_IMAGES - math.floor(TRAIN_FRACTION * DIGITS_IMAGES)
    return math.ceil(TEST_FRACTION_OF_REST * rest)
